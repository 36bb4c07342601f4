//! One attempt of one delivery: sign the stored body, send it through [`super::egress`], and
//! record what the receiver answered: delivered, retried later, or failed, and the webhook's
//! state (its failure streak, disabled on 410 Gone or after a day of failures).
//!
//! Both signatures cover the exact bytes sent. Retries follow [`BACKOFF`] with ±10 % jitter;
//! `Retry-After` is honoured up to 6 h.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::Utc;

use super::egress::{self, EgressError};
use super::Shared;
use crate::control::deliveries::{self, DeliveryStatus, Due, FailedAttempt, Successes};
use crate::control::webhooks as hooks;
use crate::secrets::random_bytes;

/// Retry delays after each failed attempt; the last repeats until `GIVE_UP_AFTER`.
const BACKOFF: [u64; 7] = [5, 30, 120, 600, 3600, 3 * 3600, 6 * 3600];
const GIVE_UP_AFTER: chrono::Duration = chrono::Duration::days(3);
const DISABLE_AFTER_FAILING: chrono::Duration = chrono::Duration::hours(24);
const RESPONSE_BODY_CAP: usize = 4096;
/// The longest `Retry-After` obeyed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// `sha256=<hex>`: the guide's `X-Fluxbase-Signature` over the raw body, keyed by the secret
/// string as given.
pub fn guide_signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// Standard Webhooks `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed
/// by the base64 part of a `whsec_` secret (or the secret's bytes when it has no such prefix).
pub fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key_bytes = secret
        .strip_prefix("whsec_")
        .and_then(|k| b64.decode(k).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", b64.encode(ctx.sign().as_ref()))
}

/// The `webhook-signature` header: the current secret's signature, then, while a rotation's
/// overlap lasts, the replaced secret's, space-delimited as Standard Webhooks has it (a
/// receiver accepts the delivery when any one of them verifies).
pub fn standard_signatures(
    secrets: &hooks::Secrets,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut header = standard_signature(&secrets.current, id, timestamp, body);
    if let Some(previous) = &secrets.previous {
        header.push(' ');
        header.push_str(&standard_signature(previous, id, timestamp, body));
    }
    header
}

/// The delay before attempt `attempts + 1`, with ±10 % jitter.
pub fn backoff(attempts: i32) -> Duration {
    let base = BACKOFF[(attempts.max(1) as usize - 1).min(BACKOFF.len() - 1)] as f64;
    let jitter = (random_bytes::<1>()[0] as f64 / 255.0 - 0.5) * 0.2;
    Duration::from_secs_f64(base * (1.0 + jitter))
}

/// The egress policy of this server's deliveries, and the HTTP client that enforces it (built at
/// the first delivery, not at start-up: a CLI command never needs one).
pub(super) struct Sender {
    allow_private: bool,
    client: OnceLock<reqwest::Client>,
}

impl Sender {
    pub(super) fn new(allow_private: bool) -> Sender {
        Sender {
            allow_private,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> &reqwest::Client {
        self.client.get_or_init(|| {
            egress::client(
                self.allow_private,
                Duration::from_secs(10),
                Duration::from_secs(10),
            )
        })
    }

    /// POSTs the delivery's body, signed both ways at `timestamp`.
    async fn send(
        &self,
        d: &Due,
        body: bytes::Bytes,
        timestamp: i64,
    ) -> Result<egress::Response, EgressError> {
        let headers = [
            ("content-type", "application/json".to_string()),
            // The guide's header holds one signature: the current secret's.
            (
                "x-fluxbase-signature",
                guide_signature(&d.secret.current, &body),
            ),
            ("x-fluxbase-delivery", d.id.clone()),
            ("x-fluxbase-event", d.event_type.clone()),
            ("webhook-id", d.id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            (
                "webhook-signature",
                standard_signatures(&d.secret, &d.id, timestamp, &body),
            ),
        ];
        let url =
            url::Url::parse(&d.url).map_err(|e| EgressError::Other(format!("invalid URL: {e}")))?;
        egress::post(
            self.client(),
            &url,
            &headers,
            body,
            self.allow_private,
            RESPONSE_BODY_CAP,
        )
        .await
    }
}

/// What the worker does after an attempt.
pub(super) enum Next {
    /// The webhook's next due delivery.
    Continue,
    /// Nothing more: the webhook was disabled.
    Disabled,
}

/// What became of a delivery after an attempt.
pub(super) enum Settled {
    /// Received: added to the worker's successes, recorded with the next batch.
    Delivered,
    /// Pending again, tried at `next_attempt_at` (recorded).
    Retry {
        attempts: i32,
        next_attempt_at: chrono::DateTime<Utc>,
    },
    /// Given up (recorded), or not recorded because a redelivery was asked for meanwhile (the
    /// row, pending again, is sent by a later read): nothing more for this copy.
    Failed,
    /// The webhook was disabled (410 Gone, or a day of failures); this delivery is recorded.
    Disabled,
}

/// An attempt's answer (or why none came), and when it was sent.
pub(super) struct Sent {
    at: chrono::DateTime<Utc>,
    outcome: Result<egress::Response, EgressError>,
}

/// The server's budget for the bodies that did not come with their page (over
/// [`deliveries::INLINE_BODY_BYTES`]): each is read from the outbox when its attempt starts and
/// held until the attempt ends, within this many bytes for every drain together
/// (`webhook_large_body_memory_mb`). An attempt waits for room; one body larger than the whole
/// budget goes alone. Projects take turns ([`crate::budget::FairBudget`]) and one holds at most
/// a quarter of it while another waits: a project whose receiver never answers holds its room
/// until each attempt times out, and with a first-come queue every other project's large bodies
/// waited behind its whole backlog (red team rt11: 117 s for one 1 MB row).
pub(super) type BodyBudget = crate::budget::FairBudget;

/// A [`BodyBudget`] of `bytes`.
pub(super) fn body_budget(bytes: usize) -> BodyBudget {
    crate::budget::FairBudget::new(bytes, bytes / 4)
}

/// Sends one attempt of a delivery; nothing is recorded (see [`settle`]). A body that did not
/// come with its page is read now, within [`BodyBudget`], and sent where its webhook points
/// then. `None`: the delivery was not sent: its webhook was disabled meanwhile, or it is no longer
/// stored (its webhook or project was deleted meanwhile); an error: the outbox could not be read
/// (nothing was sent).
pub(super) async fn send(shared: &Shared, d: &Due, project: &str) -> anyhow::Result<Option<Sent>> {
    let (body, _room) = match &d.body {
        Some(body) => (body.clone(), None),
        None => {
            // Read in a task of its own: a `row` drain polls its attempts only while it looks at
            // them, and a pool connection handed to an attempt meanwhile would sit there while
            // the drain itself waits for one (with 4 connections, every one in turn).
            let (budget, pool) = (shared.large_bodies.clone(), shared.work.clone());
            let (id, bytes, project) = (d.id.clone(), d.body_bytes, project.to_string());
            let fetched = tokio::spawn(async move {
                let room = budget.room(&project, bytes).await;
                let body = deliveries::body(&pool.get().await?, &id).await?;
                anyhow::Ok(body.map(|body| (body, room)))
            })
            .await??;
            // Disabled while it waited for room: not sent (it stays pending; the drain stops
            // at its next look at the webhook). Pointed elsewhere meanwhile: sent there.
            let Some(((body, true, url, secret), room)) = fetched else {
                return Ok(None);
            };
            if url != d.url || secret != d.secret {
                let d = Due {
                    url,
                    secret,
                    ..d.clone()
                };
                let at = Utc::now();
                let outcome = shared.sender.send(&d, body, at.timestamp()).await;
                drop(room);
                return Ok(Some(Sent { at, outcome }));
            }
            (body, Some(room))
        }
    };
    let at = Utc::now();
    let outcome = shared.sender.send(d, body, at.timestamp()).await;
    Ok(Some(Sent { at, outcome }))
}

/// One attempt of one delivery, and its bookkeeping. A success is added to `delivered` (the
/// worker records a batch's successes at once); anything else is recorded here.
pub(super) async fn attempt(
    shared: &Shared,
    webhook_id: &str,
    project: &str,
    d: &Due,
    failing: &mut bool,
    delivered: &mut Successes,
) -> anyhow::Result<Next> {
    let Some(sent) = send(shared, d, project).await? else {
        return Ok(Next::Continue);
    };
    Ok(
        match settle(shared, webhook_id, d, sent, failing, delivered).await? {
            Settled::Disabled => Next::Disabled,
            // Later changes go on: first attempts keep commit order, retries wait their turn.
            Settled::Delivered | Settled::Retry { .. } | Settled::Failed => Next::Continue,
        },
    )
}

/// Records what an attempt met: a success is added to `delivered` (the worker records a batch
/// of them at once); anything else is recorded here, with the webhook's failure streak.
pub(super) async fn settle(
    shared: &Shared,
    webhook_id: &str,
    d: &Due,
    sent: Sent,
    failing: &mut bool,
    delivered: &mut Successes,
) -> anyhow::Result<Settled> {
    let attempts = d.attempts + 1;
    let now = sent.at;
    match sent.outcome {
        Ok(resp) if (200..300).contains(&resp.status) => {
            delivered.ids.push(d.id.clone());
            delivered.attempts.push(attempts);
            delivered.requeues.push(d.requeues);
            delivered.statuses.push(resp.status as i32);
            delivered.bodies.push(resp.body);
            if *failing {
                *failing = false;
                hooks::clear_failing(&shared.work.get().await?, webhook_id).await?;
            }
            Ok(Settled::Delivered)
        }
        Ok(resp) if resp.status == 410 => {
            let control = shared.work.get().await?;
            deliveries::mark_gone(&control, &d.id, (attempts, d.requeues), &resp.body).await?;
            hooks::disable(&control, webhook_id, "the endpoint answered 410 Gone").await?;
            Ok(Settled::Disabled)
        }
        other => {
            let control = shared.work.get().await?;
            let (status, body, error, retry_after) = match other {
                Ok(resp) => (
                    Some(resp.status as i32),
                    Some(resp.body),
                    format!("endpoint answered {}", resp.status),
                    resp.retry_after,
                ),
                Err(e) => (None, None, e.to_string(), None),
            };
            let delay = match retry_after {
                Some(ra) => ra.min(MAX_RETRY_AFTER),
                None => backoff(attempts).mul_f64(shared.settings.backoff_scale),
            };
            let next =
                now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(6));
            let give_up = next > d.created_at + GIVE_UP_AFTER;
            let recorded = deliveries::record_failure(
                &control,
                &d.id,
                &FailedAttempt {
                    status: if give_up {
                        DeliveryStatus::Failed
                    } else {
                        DeliveryStatus::Pending
                    },
                    attempts,
                    requeues: d.requeues,
                    next_attempt_at: next,
                    response_status: status,
                    response_body: body.as_deref(),
                    error: &error,
                },
            )
            .await?;
            *failing = true;
            let since = hooks::mark_failing(&control, webhook_id).await?;
            if since.is_some_and(|f| now - f > DISABLE_AFTER_FAILING) {
                hooks::disable(&control, webhook_id, "every delivery failed for 24 hours").await?;
                return Ok(Settled::Disabled);
            }
            Ok(if give_up || !recorded {
                // Not recorded: a redelivery was asked for meanwhile. This copy is dropped
                // (a `row` window would retry it unrecorded); the row, pending again, is sent
                // by the next read of the outbox.
                Settled::Failed
            } else {
                Settled::Retry {
                    attempts,
                    next_attempt_at: next,
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_guide_and_standard_webhooks() {
        // The guide's Node check: HMAC-SHA256 keyed by the secret string, hex, "sha256=" prefix.
        let sig = guide_signature("whsec_secret", b"{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        // Standard Webhooks' published example (secret, id, timestamp, body → signature).
        let s = standard_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(s, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn backoff_follows_the_schedule_with_jitter() {
        for (attempt, base) in [(1, 5.0), (2, 30.0), (3, 120.0), (7, 21600.0), (20, 21600.0)] {
            let d = backoff(attempt).as_secs_f64();
            assert!(d >= base * 0.89 && d <= base * 1.11, "{attempt}: {d}");
        }
    }
}
