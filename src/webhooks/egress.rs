//! Webhook egress: the only way Fluxbase sends HTTP to a user-registered URL.
//!
//! A webhook URL is chosen by whoever holds a project key, so without a guard it is a
//! server-side request forgery primitive: `http://169.254.169.254/` reads cloud credentials,
//! `http://localhost:5432/` probes the control database. This module refuses such targets, and
//! does so twice:
//!
//! ```text
//!  registration ── validate_url ──► syntax, scheme, no credentials
//!                                   literal IP ──► classify
//!                                   host name  ──► resolve once, classify every address
//!
//!  delivery ────── post ──────────► literal IP ──► classify (reqwest does not resolve literals)
//!                     │
//!                     └─ client ──► GuardedResolver: resolve, drop forbidden addresses,
//!                                   fail the connection when none is left
//! ```
//!
//! The second check is the one that matters: a name that resolved to a public address at
//! registration may resolve to `127.0.0.1` a minute later (DNS rebinding), so the addresses the
//! socket actually connects to are filtered by the resolver the client is built with. Redirects
//! are never followed (a `302` to `http://10.0.0.1/` would otherwise undo all of this), and proxies
//! from the environment are ignored so that the filtered address is the one connected to.
//!
//! Numeric spellings such as `http://2130706433/`, `http://0x7f.1/` or `http://127.1/` need no
//! special case here: the `url` crate's WHATWG host parser turns them into `Host::Ipv4`, which
//! is classified like any other literal. IPv6 forms that embed an IPv4 address (IPv4-mapped
//! `::ffff:a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64
//! `64:ff9b::/96`, 6to4 `2002::/16`) are judged by the address they embed.
//!
//! The blocks follow the IANA IPv4 and IPv6 Special-Purpose Address Registries: every block
//! that is not globally reachable is refused, and so are the IETF protocol block `2001::/23`
//! (Teredo `2001::/32` tunnels to an IPv4 address of its choosing) and, for IPv6, everything
//! outside global unicast `2000::/3` that is not one of the embeddings above.
//!
//! `allow_private` (`FLUXBASE_WEBHOOK_ALLOW_PRIVATE`) lifts the address checks for development
//! and tests; the scheme and credential checks stay.

use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use url::{Host, Url};

/// The `User-Agent` of every webhook request.
pub const USER_AGENT: &str = concat!("Fluxbase-Webhooks/", env!("CARGO_PKG_VERSION"));

/// Why a webhook could not be sent (or registered). The delivery worker stores the `Display`
/// form in the delivery log.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// Not a usable webhook URL (syntax, scheme, credentials). Fails the registration; a stored
    /// URL never gets here.
    #[error("invalid webhook URL: {0}")]
    InvalidUrl(String),
    /// The target (host, as written in the URL) is or resolves to a forbidden address; the reason
    /// names the address and its class. At registration: refuse. At delivery: the name was
    /// rebound to a forbidden address since registration.
    #[error("webhook target {0} is not allowed: {1}")]
    Forbidden(String, String),
    /// The host name did not resolve at registration, so it could not be checked.
    #[error("webhook host {0} could not be resolved: {1}")]
    Unresolvable(String, String),
    /// The connect or the total timeout passed before a response status arrived. Retry.
    #[error("timed out before the receiver answered")]
    Timeout,
    /// No connection (refused, reset, DNS failure at send time, TLS handshake). Retry.
    #[error("connection failed: {0}")]
    Connect(String),
    /// Anything else reqwest reports while sending. Retry.
    #[error("{0}")]
    Other(String),
}

/// The receiver's answer: what the delivery worker needs to decide and to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// `Retry-After`, as delta-seconds or an HTTP-date (a date in the past is zero).
    pub retry_after: Option<Duration>,
    /// At most `max_response_bytes` bytes of the body, as lossy UTF-8.
    pub body: String,
}

/// The class of an address that webhooks may not reach by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    Private,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedAddressSpace,
    LinkLocal,
    /// 0.0.0.0/8 ("this network") and `::`.
    Unspecified,
    Multicast,
    Broadcast,
    /// 240.0.0.0/4, 192.0.0.0/24, 100::/64 and other never-routed blocks.
    Reserved,
    /// Documentation and benchmarking ranges.
    Documentation,
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::SharedAddressSpace => "shared address space (CGNAT)",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Multicast => "multicast",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Reserved => "reserved",
            AddressClass::Documentation => "documentation/benchmarking",
        })
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

/// Forbidden IPv4 blocks: (network, prefix length, class). Broadcast precedes 240/4.
const V4_BLOCKS: &[(u32, u32, AddressClass)] = &[
    (v4(0, 0, 0, 0), 8, AddressClass::Unspecified),
    (v4(10, 0, 0, 0), 8, AddressClass::Private),
    (v4(100, 64, 0, 0), 10, AddressClass::SharedAddressSpace),
    (v4(127, 0, 0, 0), 8, AddressClass::Loopback),
    (v4(169, 254, 0, 0), 16, AddressClass::LinkLocal),
    (v4(172, 16, 0, 0), 12, AddressClass::Private),
    (v4(192, 0, 0, 0), 24, AddressClass::Reserved),
    (v4(192, 0, 2, 0), 24, AddressClass::Documentation),
    (v4(192, 88, 99, 0), 24, AddressClass::Reserved), // deprecated 6to4 relay anycast
    (v4(192, 168, 0, 0), 16, AddressClass::Private),
    (v4(198, 18, 0, 0), 15, AddressClass::Documentation),
    (v4(198, 51, 100, 0), 24, AddressClass::Documentation),
    (v4(203, 0, 113, 0), 24, AddressClass::Documentation),
    (v4(224, 0, 0, 0), 4, AddressClass::Multicast),
    (v4(255, 255, 255, 255), 32, AddressClass::Broadcast),
    (v4(240, 0, 0, 0), 4, AddressClass::Reserved),
];

/// Forbidden IPv6 blocks that do not embed an IPv4 address.
const V6_BLOCKS: &[(u128, u32, AddressClass)] = &[
    (
        0x0064_ff9b_0001_0000_0000_0000_0000_0000,
        48,
        AddressClass::Private,
    ), // local-use NAT64
    (
        0x0100_0000_0000_0000_0000_0000_0000_0000,
        64,
        AddressClass::Reserved,
    ), // discard-only
    (
        0x0100_0000_0000_0001_0000_0000_0000_0000,
        64,
        AddressClass::Reserved,
    ), // dummy IPv6 prefix (RFC 9780)
    (
        0x2001_0002_0000_0000_0000_0000_0000_0000,
        48,
        AddressClass::Documentation,
    ), // benchmarking
    (
        0x2001_0000_0000_0000_0000_0000_0000_0000,
        23,
        AddressClass::Reserved,
    ), // IETF protocol assignments, Teredo 2001::/32 among them
    (
        0x2001_0db8_0000_0000_0000_0000_0000_0000,
        32,
        AddressClass::Documentation,
    ),
    (
        0x3fff_0000_0000_0000_0000_0000_0000_0000,
        20,
        AddressClass::Documentation,
    ), // RFC 9637
    (
        0x5f00_0000_0000_0000_0000_0000_0000_0000,
        16,
        AddressClass::Reserved,
    ), // SRv6 SIDs (RFC 9602)
    (
        0xfc00_0000_0000_0000_0000_0000_0000_0000,
        7,
        AddressClass::Private,
    ), // unique local
    (
        0xfe80_0000_0000_0000_0000_0000_0000_0000,
        10,
        AddressClass::LinkLocal,
    ),
    (
        0xfec0_0000_0000_0000_0000_0000_0000_0000,
        10,
        AddressClass::Private,
    ), // old site-local
    (
        0xff00_0000_0000_0000_0000_0000_0000_0000,
        8,
        AddressClass::Multicast,
    ),
];

fn in_v4_block(ip: u32, net: u32, prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    ip & mask == net
}

fn in_v6_block(ip: u128, net: u128, prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    ip & mask == net
}

/// The IPv4 address an IPv6 address stands for, and how it embeds it.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<(Ipv4Addr, &'static str)> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    if in_v6_block(bits, 0xffff_0000_0000, 96) {
        Some((low32, "IPv4-mapped"))
    } else if in_v6_block(bits, 0xffff_0000_0000_0000, 96) {
        Some((low32, "IPv4-translated"))
    } else if in_v6_block(bits, 0, 96) && bits > 1 {
        Some((low32, "IPv4-compatible"))
    } else if in_v6_block(bits, 0x0064_ff9b_u128 << 96, 96) {
        Some((low32, "NAT64"))
    } else if in_v6_block(bits, 0x2002_u128 << 112, 16) {
        Some((Ipv4Addr::from((bits >> 80) as u32), "6to4"))
    } else {
        None
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let bits = u32::from(ip);
    V4_BLOCKS
        .iter()
        .find(|(net, prefix, _)| in_v4_block(bits, *net, *prefix))
        .map(|(_, _, class)| *class)
}

/// The forbidden class of `ip`, or `None` for an address webhooks may reach.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(AddressClass::Unspecified),
        IpAddr::V6(v6) if v6.is_loopback() => Some(AddressClass::Loopback),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some((inner, _)) => classify_v4(inner),
            None => {
                let bits = u128::from(v6);
                V6_BLOCKS
                    .iter()
                    .find(|(net, prefix, _)| in_v6_block(bits, *net, *prefix))
                    .map(|(_, _, class)| *class)
                    // Outside global unicast: unassigned or special, never a receiver.
                    .or_else(|| {
                        (!in_v6_block(bits, 0x2000_u128 << 112, 3))
                            .then_some(AddressClass::Reserved)
                    })
            }
        },
    }
}

/// `Some("127.0.0.1 (loopback)")` for a forbidden address (unless `allow_private`), else `None`.
fn refusal(ip: IpAddr, allow_private: bool) -> Option<String> {
    if allow_private {
        return None;
    }
    let class = classify(ip)?;
    Some(match ip {
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some((inner, how)) => format!("{ip} ({how} form of {inner}, {class})"),
            None => format!("{ip} ({class})"),
        },
        IpAddr::V4(_) => format!("{ip} ({class})"),
    })
}

/// The URL checks that need no network: scheme, credentials, a host; and a literal IP host
/// classified. Returns the host name still to resolve, if any.
fn check_static(url: &Url, allow_private: bool) -> Result<Option<String>, EgressError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(EgressError::InvalidUrl(format!(
            "scheme must be http or https, not {}",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EgressError::InvalidUrl(
            "credentials in the URL are not allowed".into(),
        ));
    }
    let ip = match url.host() {
        None => return Err(EgressError::InvalidUrl("the URL has no host".into())),
        Some(Host::Domain(name)) => return Ok(Some(name.to_owned())),
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
    };
    match refusal(ip, allow_private) {
        Some(reason) => Err(EgressError::Forbidden(
            url.host_str().unwrap_or_default().to_owned(),
            format!("address {reason}"),
        )),
        None => Ok(None),
    }
}

/// Checks a webhook URL at registration: syntax, `http`/`https` only, no credentials, and (unless
/// `allow_private`) a target that is not and does not resolve to a forbidden address. A host
/// name is resolved once and every address it resolves to must be allowed.
///
/// Passing here is not enough to send: names can be rebound, so [`client`] checks again at
/// connect time.
pub async fn validate_url(url: &str, allow_private: bool) -> Result<Url, EgressError> {
    let parsed = Url::parse(url).map_err(|e| EgressError::InvalidUrl(e.to_string()))?;
    let Some(name) = check_static(&parsed, allow_private)? else {
        return Ok(parsed);
    };
    if allow_private {
        return Ok(parsed);
    }
    let port = parsed.port_or_known_default().unwrap_or(0);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
        .await
        .map_err(|e| EgressError::Unresolvable(name.clone(), e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(EgressError::Unresolvable(name, "no addresses".into()));
    }
    let refused: Vec<String> = addrs
        .iter()
        .filter_map(|a| refusal(a.ip(), false))
        .collect();
    if !refused.is_empty() {
        return Err(EgressError::Forbidden(
            name,
            format!("resolves to {}", refused.join(", ")),
        ));
    }
    Ok(parsed)
}

/// Resolves with tokio (the system resolver) and drops every forbidden address, so the socket
/// can only connect to an allowed one. With none left the connection fails with
/// [`EgressError::Forbidden`], which [`post`] finds in reqwest's error chain.
#[derive(Debug)]
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // reqwest replaces port 0 with the URL's port.
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
                resolved.partition(|a| refusal(a.ip(), allow_private).is_none());
            if allowed.is_empty() {
                let reasons: Vec<String> = refused
                    .iter()
                    .filter_map(|a| refusal(a.ip(), allow_private))
                    .collect();
                let reason = if reasons.is_empty() {
                    "resolves to no address".to_owned()
                } else {
                    format!("resolves only to {}", reasons.join(", "))
                };
                return Err(Box::new(EgressError::Forbidden(host, reason)) as _);
            }
            if !refused.is_empty() {
                tracing::warn!(%host, ?refused, "webhook host resolves partly to forbidden addresses; skipping them");
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The webhook client: one per process, cloned into every worker, so the connection pool is
/// shared across endpoints. Redirects are not followed, proxies from the environment are not
/// used, and host names resolve through the guarded resolver (unless `allow_private`).
/// `allow_private` must match the value given to [`post`].
pub fn client(
    allow_private: bool,
    connect_timeout: Duration,
    total_timeout: Duration,
) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(connect_timeout)
        .timeout(total_timeout)
        .dns_resolver(Arc::new(GuardedResolver { allow_private }))
        .build()
        // Only TLS backend initialisation can fail here, and rustls with bundled roots does not.
        .expect("building the webhook HTTP client")
}

/// POSTs `body` with `headers` (name, value pairs: the caller sets `Content-Type` and the
/// signatures) to `url`.
///
/// Any status is a `Response`: 3xx is returned as is, not followed. The body is read up to
/// `max_response_bytes` and the rest is discarded; if the total timeout passes while the body is
/// being read, what arrived so far is returned, since the status has already been decided.
pub async fn post<K: AsRef<str>, V: AsRef<str>>(
    client: &reqwest::Client,
    url: &Url,
    headers: &[(K, V)],
    body: Bytes,
    allow_private: bool,
    max_response_bytes: usize,
) -> Result<Response, EgressError> {
    // reqwest connects to a literal IP without resolving it, so the resolver never sees it.
    check_static(url, allow_private)?;
    let headers = header_map(headers)?;
    let mut response = client
        .post(url.clone())
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(send_error)?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));

    let mut buf = Vec::new();
    let mut truncated = false;
    while buf.len() < max_response_bytes {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = max_response_bytes - buf.len();
                truncated = chunk.len() > room;
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %error_chain(&e.without_url()), "webhook response body cut short");
                break;
            }
        }
    }
    // Dropping `response` unread closes that connection rather than draining the rest.
    let truncated = truncated || buf.len() >= max_response_bytes;
    Ok(Response {
        status,
        retry_after,
        body: lossy_utf8(&buf, truncated),
    })
}

fn header_map<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Result<HeaderMap, EgressError> {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        let (name, value) = (name.as_ref(), value.as_ref());
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| EgressError::Other(format!("invalid header name {name:?}")))?;
        let header_value = HeaderValue::from_str(value)
            .map_err(|_| EgressError::Other(format!("invalid value for header {name}")))?;
        map.append(header_name, header_value);
    }
    Ok(map)
}

/// Maps a send error by what the delivery worker does next.
fn send_error(e: reqwest::Error) -> EgressError {
    let e = e.without_url();
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(EgressError::Forbidden(target, reason)) = err.downcast_ref::<EgressError>() {
            return EgressError::Forbidden(target.clone(), reason.clone());
        }
        source = err.source();
    }
    if e.is_timeout() {
        EgressError::Timeout
    } else if e.is_connect() {
        EgressError::Connect(error_chain(&e))
    } else {
        EgressError::Other(error_chain(&e))
    }
}

/// `outer: cause: root cause`, skipping a cause that repeats its parent's text.
fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut source = e.source();
    while let Some(err) = source {
        let text = err.to_string();
        if !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = err.source();
    }
    out
}

/// Lossy UTF-8, without a replacement character for a sequence the cut split in two.
fn lossy_utf8(bytes: &[u8], truncated: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut chunks = bytes.utf8_chunks().peekable();
    while let Some(chunk) = chunks.next() {
        out.push_str(chunk.valid());
        let split_at_cut = truncated && chunks.peek().is_none() && chunk.invalid().len() < 4;
        if !chunk.invalid().is_empty() && !split_at_cut {
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
    out
}

/// Parses `Retry-After`: delta-seconds, or an HTTP-date (any of the three formats of RFC 9110)
/// measured from `now`; a date in the past is zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_forbidden_ipv4_class_is_classified() {
        use AddressClass::*;
        for (addr, class) in [
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.0.0.1", Private),
            ("10.255.255.255", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedAddressSpace),
            ("100.127.255.255", SharedAddressSpace),
            ("169.254.169.254", LinkLocal),
            ("169.254.0.1", LinkLocal),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("192.0.0.8", Reserved),
            ("192.0.2.1", Documentation),
            ("192.0.0.9", Reserved),
            ("192.0.0.170", Reserved),
            ("192.88.99.1", Reserved),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("198.18.0.1", Documentation),
            ("198.19.255.255", Documentation),
        ] {
            assert_eq!(classify(ip(addr)), Some(class), "{addr}");
        }
    }

    #[test]
    fn every_forbidden_ipv6_class_is_classified() {
        use AddressClass::*;
        for (addr, class) in [
            ("::1", Loopback),
            ("::", Unspecified),
            ("fc00::1", Private),
            ("fd12:3456:789a::1", Private),
            ("fec0::1", Private),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("ff02::1", Multicast),
            ("ff0e::101", Multicast),
            ("2001:db8::1", Documentation),
            ("100::1", Reserved),
            ("64:ff9b:1::1", Private),
            // IANA IPv6 special-purpose registry, block by block.
            ("100:0:0:1::1", Reserved),
            ("2001::1", Reserved),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Reserved), // Teredo
            ("2001:1::1", Reserved),
            ("2001:1::2", Reserved),
            ("2001:2::1", Documentation),
            ("2001:3::1", Reserved),
            ("2001:4:112::1", Reserved),
            ("2001:10::1", Reserved),
            ("2001:20::1", Reserved),
            ("2001:1ff:ffff::1", Reserved),
            ("3fff::1", Documentation),
            ("3fff:fff:ffff::1", Documentation),
            ("5f00::1", Reserved),
            // Outside 2000::/3: unassigned.
            ("4000::1", Reserved),
            ("e000::1", Reserved),
            ("1::1", Reserved),
        ] {
            assert_eq!(classify(ip(addr)), Some(class), "{addr}");
        }
    }

    #[test]
    fn ipv6_forms_embedding_a_forbidden_ipv4_address_are_judged_by_it() {
        use AddressClass::*;
        for (addr, class) in [
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:7f00:1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:100.64.0.1", SharedAddressSpace),
            ("::ffff:224.0.0.1", Multicast),
            ("::ffff:255.255.255.255", Broadcast),
            ("::127.0.0.1", Loopback),
            ("::10.0.0.1", Private),
            ("::169.254.169.254", LinkLocal),
            ("64:ff9b::127.0.0.1", Loopback),
            ("64:ff9b::a9fe:a9fe", LinkLocal),
            ("64:ff9b::192.168.0.1", Private),
            ("2002:7f00:1::", Loopback),
            ("2002:a9fe:a9fe::1", LinkLocal),
            ("2002:0a00:0001::1", Private),
            ("2002:c0a8:0101::1", Private),
            ("::ffff:0:127.0.0.1", Loopback),
            ("::ffff:0:7f00:1", Loopback),
            ("::ffff:0:10.0.0.1", Private),
            ("::ffff:0:169.254.169.254", LinkLocal),
            ("::ffff:0:192.168.1.1", Private),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::100.64.0.1", SharedAddressSpace),
            ("::ffff:192.0.0.8", Reserved),
            ("::ffff:192.88.99.1", Reserved),
        ] {
            assert_eq!(classify(ip(addr)), Some(class), "{addr}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for addr in [
            "93.184.216.34",
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.253.255.255",
            "223.255.255.255",
            "2606:4700::1",
            "2a00:1450:4001::200e",
            "::ffff:93.184.216.34",
            "64:ff9b::93.184.216.34",
            "2002:5db8:d822::1",
        ] {
            assert_eq!(classify(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn odd_spellings_of_loopback_and_zero_parse_to_the_address_they_mean() {
        for (url, host) in [
            ("http://2130706433/", Ipv4Addr::new(127, 0, 0, 1)),
            ("http://127.1/", Ipv4Addr::new(127, 0, 0, 1)),
            ("http://0x7f.1/", Ipv4Addr::new(127, 0, 0, 1)),
            ("http://0177.0.0.1/", Ipv4Addr::new(127, 0, 0, 1)),
            ("http://0x7f000001/", Ipv4Addr::new(127, 0, 0, 1)),
            ("http://127.0.0.1./", Ipv4Addr::new(127, 0, 0, 1)),
            ("http://0/", Ipv4Addr::new(0, 0, 0, 0)),
            ("http://0xa9fea9fe/", Ipv4Addr::new(169, 254, 169, 254)),
        ] {
            assert_eq!(
                Url::parse(url).unwrap().host(),
                Some(Host::Ipv4(host)),
                "{url}"
            );
        }
        assert_eq!(
            Url::parse("http://[::ffff:127.0.0.1]/").unwrap().host(),
            Some(Host::Ipv6("::ffff:127.0.0.1".parse().unwrap()))
        );
    }

    #[tokio::test]
    async fn every_forbidden_literal_target_is_refused_at_registration() {
        for url in [
            "http://127.0.0.1/",
            "http://127.0.0.1:8080/hook",
            "https://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.0.1/",
            "http://100.64.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://240.0.0.1/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fc00::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::10.0.0.1]/",
            "http://2130706433/",
            "http://127.1/",
            "http://0/",
            "http://0x7f.1/",
            "http://017700000001/",
        ] {
            match validate_url(url, false).await {
                Err(EgressError::Forbidden(_, reason)) => {
                    assert!(reason.contains('('), "{url}: {reason}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_refusal_names_the_address_and_its_class() {
        let e = validate_url("http://[::ffff:169.254.169.254]/", false)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "webhook target [::ffff:a9fe:a9fe] is not allowed: address ::ffff:169.254.169.254 \
             (IPv4-mapped form of 169.254.169.254, link-local)"
        );
        let e = validate_url("http://2130706433/", false).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "webhook target 127.0.0.1 is not allowed: address 127.0.0.1 (loopback)"
        );
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_registration() {
        match validate_url("http://localhost:9/hook", false).await {
            Err(EgressError::Forbidden(target, reason)) => {
                assert_eq!(target, "localhost");
                assert!(reason.starts_with("resolves to "), "{reason}");
                assert!(reason.contains("(loopback)"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn public_literal_targets_are_accepted_without_any_lookup() {
        for url in [
            "http://93.184.216.34/",
            "https://93.184.216.34:8443/hooks?x=1",
            "https://[2606:4700::1]/",
        ] {
            let parsed = validate_url(url, false).await.unwrap();
            assert_eq!(parsed.as_str(), url);
        }
    }

    #[tokio::test]
    async fn allow_private_lifts_the_address_checks_but_not_the_others() {
        for url in [
            "http://127.0.0.1:3000/",
            "http://localhost:3000/",
            "http://169.254.169.254/",
            "http://[::ffff:127.0.0.1]/",
            "http://2130706433/",
            "http://[fd00::1]/",
        ] {
            validate_url(url, true)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        for url in ["ftp://127.0.0.1/", "http://user:pw@127.0.0.1/"] {
            assert!(matches!(
                validate_url(url, true).await,
                Err(EgressError::InvalidUrl(_))
            ));
        }
    }

    #[tokio::test]
    async fn only_plain_http_urls_without_credentials_are_accepted() {
        for url in [
            "ftp://93.184.216.34/",
            "file:///etc/passwd",
            "gopher://93.184.216.34/",
            "javascript:alert(1)",
            "data:text/plain,hi",
            "ws://93.184.216.34/",
            "http://user@93.184.216.34/",
            "http://user:secret@93.184.216.34/",
            "http://:secret@93.184.216.34/",
            "not a url",
            "http://",
            "/relative/path",
        ] {
            assert!(
                matches!(
                    validate_url(url, false).await,
                    Err(EgressError::InvalidUrl(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        // RFC 850 and asctime forms are HTTP-dates too.
        assert_eq!(
            parse_retry_after("Tuesday, 14-Nov-23 22:13:27 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Tue Nov 14 22:13:27 2023", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn a_character_split_by_the_cap_is_dropped_not_replaced() {
        assert_eq!(lossy_utf8("abc€".as_bytes()[..4].as_ref(), true), "abc");
        assert_eq!(lossy_utf8(b"ab\xffcd", false), "ab\u{FFFD}cd");
        assert_eq!(lossy_utf8(b"ab\xff", false), "ab\u{FFFD}");
        assert_eq!(lossy_utf8("héllo".as_bytes(), false), "héllo");
    }
}
