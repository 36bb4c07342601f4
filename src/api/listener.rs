//! The HTTP listener: the accept loop in front of the warp routes, where anonymous clients are
//! bounded before any request exists.
//!
//! ```text
//!  accept ─► per-address count ──(over max_connections_per_address)──► 429 + close
//!               │ CountedStream (the count lives as long as the socket, WebSockets too)
//!               ▼
//!  hyper http1 (header_read_timeout: a client that does not finish its request head in time,
//!               │  idle keep-alive included, is disconnected)
//!               ▼  ClientAddr(peer) in the request's extensions
//!  the route table (crate::api) ─► rate limits by address use [`client_ip`]
//!               │ SendDeadline in the extensions: a SQL answer sets it while it is held
//!               ▼
//!  the connection task drops a connection whose deadline passed (socket, body, budget freed),
//!  and one whose socket took none of the bytes it had to send for send_stall_timeout_secs
//!  (WriteStall: any response — a file download, a SQL answer — to a client that stopped reading)
//! ```
//!
//! Behind a proxy (`trust_forwarded_for`) the per-address cap is not applied at accept: every
//! connection comes from the proxy's address, so counting it would let a few hundred idle
//! WebSockets through the proxy lock everyone out. The proxy bounds its own clients' connections
//! then (e.g. nginx `limit_conn`); the per-address request limits still use [`client_ip`].
//!
//! HTTP/1.1 only: hyper-util's version-sniffing builder reads the first bytes without any
//! timeout, which is exactly what a slow client exploits. There is no TLS here (a proxy
//! terminates it), so HTTP/2 was only reachable with prior knowledge.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use warp::http::HeaderMap;
use warp::reply::Response;
use warp::Filter;

/// The TCP peer of the connection a request came on (set by [`serve`]).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// The connection's send deadline (in each request's extensions, set by [`serve`]): a response
/// whose body must be taken by the client within a time sets it ([`SendDeadline::set`]) for as
/// long as it holds the returned guard; if the time passes first, the connection task drops the
/// connection (the socket closed, the body and what it holds dropped).
///
/// Why here and not in the body: hyper polls a response body only when its write buffer has
/// room, so once a client stops reading (the socket full) the body is never polled again and a
/// timer inside it could not fire. The connection task is the one place that always runs.
#[derive(Clone, Default)]
pub struct SendDeadline(Arc<DeadlineSlot>);

#[derive(Default)]
struct DeadlineSlot {
    /// The current deadline and the number of the guard that set it.
    at: Mutex<Option<(u64, tokio::time::Instant)>>,
    changed: tokio::sync::Notify,
    next: std::sync::atomic::AtomicU64,
}

/// Holds a connection's deadline; dropping it lifts the deadline (unless a later one replaced it).
pub struct DeadlineGuard {
    slot: Arc<DeadlineSlot>,
    id: u64,
}

impl SendDeadline {
    /// The connection is cut if this guard still lives `within` from now.
    pub fn set(&self, within: Duration) -> DeadlineGuard {
        let id = self
            .0
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.0.at() = Some((id, tokio::time::Instant::now() + within));
        self.0.changed.notify_one();
        DeadlineGuard {
            slot: self.0.clone(),
            id,
        }
    }

    /// Resolves when a deadline set on this connection passes while its guard still lives.
    async fn passed(&self) {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let at = *self.0.at();
            match at {
                None => changed.await,
                Some((_, at)) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => {
                        if self.0.at().is_some_and(|(_, now)| now <= at) {
                            return;
                        }
                    }
                    _ = changed => {}
                },
            }
        }
    }
}

impl DeadlineSlot {
    fn at(&self) -> std::sync::MutexGuard<'_, Option<(u64, tokio::time::Instant)>> {
        self.at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        let mut at = self.slot.at();
        if at.is_some_and(|(id, _)| id == self.id) {
            *at = None;
            drop(at);
            self.slot.changed.notify_one();
        }
    }
}

pub use crate::auth::ratelimit::address_key;

/// The client's address for rate limits: the socket peer, or — only when the operator says a
/// proxy in front sets it (`trust_forwarded_for`) — the last address in `X-Forwarded-For`,
/// the one that proxy saw. Anything a client writes there itself is ignored otherwise.
pub fn client_ip(
    peer: Option<ClientAddr>,
    headers: &HeaderMap,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    if trust_forwarded_for {
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        if let Some(ip) = forwarded {
            return Some(address_key(ip));
        }
    }
    peer.map(|ClientAddr(a)| address_key(a.ip()))
}

/// Open connections per client address.
#[derive(Default)]
struct AddressCounts(Mutex<HashMap<IpAddr, usize>>);

/// One counted connection; uncounted when dropped (with the socket).
struct AddressGuard {
    counts: Arc<AddressCounts>,
    key: IpAddr,
}

impl AddressCounts {
    fn enter(self: &Arc<Self>, key: IpAddr, cap: usize) -> Option<AddressGuard> {
        let mut counts = self.0.lock().expect("poisoned");
        let n = counts.entry(key).or_default();
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressGuard {
            counts: self.clone(),
            key,
        })
    }
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().expect("poisoned");
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Since when a connection's socket has refused the bytes the server had to send (its client not
/// reading and the kernel's buffers full), until a write succeeds again. Written by the
/// connection's socket ([`CountedStream`]) and watched by its connection task
/// ([`WriteStall::stalled`]): both run in that one task, so a write costs an atomic load.
///
/// A response body is polled only while hyper can write, so no timer in a body could see a
/// client that stopped reading; the socket is where it shows. Like nginx's `send_timeout`, the
/// clock measures the time between two writes that took bytes, not the whole response: a slow
/// client that keeps reading is never cut, however long its download.
#[derive(Default)]
struct WriteStall {
    blocked: std::sync::atomic::AtomicBool,
    since: Mutex<Option<tokio::time::Instant>>,
    began: tokio::sync::Notify,
}

impl WriteStall {
    fn since(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        self.since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socket refused a write.
    fn refused(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.blocked.swap(true, Relaxed) {
            *self.since() = Some(tokio::time::Instant::now());
            self.began.notify_one();
        }
    }

    /// The socket took bytes.
    fn took(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.blocked.load(Relaxed) {
            *self.since() = None;
            self.blocked.store(false, Relaxed);
        }
    }

    /// Resolves once the socket has refused every write for `within`.
    async fn stalled(&self, within: Duration) {
        loop {
            let began = self.began.notified();
            tokio::pin!(began);
            began.as_mut().enable();
            let since = *self.since();
            match since {
                None => began.await,
                Some(since) => {
                    tokio::time::sleep_until(since + within).await;
                    if *self.since() == Some(since) {
                        return;
                    }
                }
            }
        }
    }

    fn note<T>(&self, written: &Poll<std::io::Result<T>>, took: impl Fn(&T) -> bool) {
        match written {
            Poll::Pending => self.refused(),
            Poll::Ready(Ok(n)) if took(n) => self.took(),
            Poll::Ready(_) => {}
        }
    }
}

/// A client socket that holds its address's count for as long as it is open, and notes when
/// it refuses writes ([`WriteStall`]).
struct CountedStream {
    inner: TcpStream,
    _guard: AddressGuard,
    stall: Arc<WriteStall>,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.stall.note(&written, |n| *n > 0);
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.stall.note(&written, |n| *n > 0);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Why the connection task closed a connection itself.
enum Cut {
    /// A [`SendDeadline`] passed.
    Deadline,
    /// The socket refused every write for the stall timeout ([`WriteStall`]).
    Stalled,
}

/// What the listener enforces (from [`crate::config::Config`]).
#[derive(Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    /// A connection whose socket refuses every write this long is closed ([`WriteStall`]).
    pub send_stall_timeout: Duration,
    /// 0: no cap.
    pub max_connections_per_address: usize,
    /// A proxy in front: the peer address is the proxy's, so the cap above is not applied.
    pub trust_forwarded_for: bool,
    /// Counts connections cut at their send deadline (`fluxbase_sql_answers_cut_total`) or
    /// for a stalled send (`fluxbase_connections_stalled_total`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Serves `routes` on `listener` until `shutdown` resolves, then lets open requests finish.
pub async fn serve<F>(
    listener: TcpListener,
    routes: F,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) where
    F: Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let counts = Arc::new(AddressCounts::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a sender; when all are gone, every connection has ended.
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let cap = if limits.trust_forwarded_for {
            0
        } else {
            limits.max_connections_per_address
        };
        let Some(guard) = counts.enter(address_key(peer.ip()), cap) else {
            tracing::warn!(%peer, "refusing a connection: too many open from this address");
            tokio::spawn(refuse(stream, limits.max_connections_per_address));
            continue;
        };
        let stall = Arc::new(WriteStall::default());
        let io = TokioIo::new(CountedStream {
            inner: stream,
            _guard: guard,
            stall: stall.clone(),
        });
        let filter = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let deadline = SendDeadline::default();
        let slot = deadline.clone();
        let service = hyper::service::service_fn(move |mut req| {
            req.extensions_mut().insert(ClientAddr(peer));
            req.extensions_mut().insert(slot.clone());
            hyper::service::Service::call(&filter, req)
        });
        let mut stop = stop_rx.clone();
        let alive = alive_tx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            let within = limits.send_stall_timeout;
            let result = tokio::select! {
                r = conn.as_mut() => Ok(r),
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => Ok(r),
                        _ = deadline.passed() => Err(Cut::Deadline),
                        _ = stall.stalled(within) => Err(Cut::Stalled),
                    }
                }
                _ = deadline.passed() => Err(Cut::Deadline),
                _ = stall.stalled(within) => Err(Cut::Stalled),
            };
            // Dropping the connection (leaving this block) closes the socket and drops the
            // response body with whatever it holds.
            let count = |counter: fn(&crate::metrics::Metrics) -> &std::sync::atomic::AtomicU64| {
                if let Some(m) = &limits.metrics {
                    counter(m).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            };
            match result {
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "connection ended with an error")
                }
                Ok(Ok(())) => {}
                Err(Cut::Deadline) => {
                    tracing::warn!(%peer, "closing a connection: the client did not take a response within its send deadline");
                    count(|m| &m.sql_answers_cut);
                }
                Err(Cut::Stalled) => {
                    tracing::warn!(%peer, seconds = within.as_secs(), "closing a connection: its client took none of the response's bytes for send_stall_timeout_secs");
                    count(|m| &m.connections_stalled);
                }
            }
            drop(alive);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(alive_tx);
    let _ = alive_rx.recv().await;
}

/// Answers a connection over the per-address cap with 429 in the guide's shape, then closes it.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = serde_json::json!({
        "success": false,
        "error": {
            "code": "RATE_LIMIT",
            "message": format!("Too many open connections from this address (limit {cap}). Close some and retry."),
        }
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_counts_only_when_trusted() {
        let peer = Some(ClientAddr("10.0.0.1:5000".parse().unwrap()));
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().unwrap());
        assert_eq!(
            client_ip(peer, &headers, false),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            client_ip(peer, &headers, true),
            Some("5.6.7.8".parse().unwrap())
        );
        headers.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(
            client_ip(peer, &headers, true),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        assert_eq!(
            address_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            address_key("2001:db8:1:2:bbbb::9".parse().unwrap())
        );
        assert_eq!(
            address_key("::ffff:1.2.3.4".parse().unwrap()),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_count_is_capped_and_freed_on_drop() {
        let counts = Arc::new(AddressCounts::default());
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        let a = counts.enter(ip, 2).unwrap();
        let _b = counts.enter(ip, 2).unwrap();
        assert!(counts.enter(ip, 2).is_none());
        assert!(counts.enter("1.2.3.5".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(counts.enter(ip, 2).is_some());
    }
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_passes_only_while_its_guard_lives() {
        let slot = SendDeadline::default();
        let passed = |d: &SendDeadline| {
            let d = d.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(300), d.passed())
                    .await
                    .is_ok()
            }
        };
        assert!(!passed(&slot).await, "no deadline set");
        let guard = slot.set(Duration::from_millis(50));
        assert!(passed(&slot).await, "the deadline passed while held");
        drop(guard);
        assert!(!passed(&slot).await, "lifted with its guard");
        // A guard dropped late does not lift the next answer's deadline.
        let old = slot.set(Duration::from_secs(60));
        let _new = slot.set(Duration::from_millis(50));
        drop(old);
        assert!(passed(&slot).await, "the newer deadline stands");
        // A deadline set while the connection task already waits wakes it.
        let waiter = tokio::spawn({
            let slot = slot.clone();
            async move { slot.passed().await }
        });
        drop(_new);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _later = slot.set(Duration::from_millis(50));
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken by the new deadline")
            .unwrap();
    }
}
