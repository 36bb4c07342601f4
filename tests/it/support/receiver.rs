//! A webhook receiver: a local HTTP server that records every request and answers with scripted
//! statuses (then 200), or holds a request unanswered. Stops with the test's runtime.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use warp::Filter;

use super::poll;

#[derive(Clone, Debug)]
pub struct Received {
    pub headers: warp::http::HeaderMap,
    pub body: String,
}

impl Received {
    /// The `webhook-id` header: the delivery's id, the same across its attempts.
    pub fn delivery_id(&self) -> &str {
        self.headers["webhook-id"].to_str().unwrap()
    }
}

/// What to do with one request.
enum Step {
    /// Answer this status (and `Retry-After`).
    Answer(u16, Option<&'static str>),
    /// Record the request and answer nothing until [`Receiver::release`].
    Hold,
}

/// The steps for the next requests, in order; then 200.
type Script = Arc<Mutex<VecDeque<Step>>>;

/// A local HTTP receiver answering with scripted statuses (then 200).
pub struct Receiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Received>>>,
    script: Script,
    /// The indexes (in `got`) of the requests held unanswered.
    held: Arc<Mutex<Vec<usize>>>,
    release: Arc<Notify>,
    /// What [`Receiver::release`] answers the held requests (503 unless set).
    release_status: Arc<std::sync::atomic::AtomicU16>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script: Script = Arc::default();
        let held: Arc<Mutex<Vec<usize>>> = Arc::default();
        let release = Arc::new(Notify::new());
        let release_status = Arc::new(std::sync::atomic::AtomicU16::new(503));
        let (g, s, h, r) = (got.clone(), script.clone(), held.clone(), release.clone());
        let rs = release_status.clone();
        let route = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(move |headers, body: bytes::Bytes| {
                let (g, s, h, r) = (g.clone(), s.clone(), h.clone(), r.clone());
                let rs = rs.clone();
                async move {
                    // One lock order (script, then got): a request's step and its place in
                    // `got` are taken together.
                    let step = {
                        let mut script = s.lock().unwrap();
                        let mut got = g.lock().unwrap();
                        got.push(Received {
                            headers,
                            body: String::from_utf8_lossy(&body).into_owned(),
                        });
                        let step = script.pop_front().unwrap_or(Step::Answer(200, None));
                        if let Step::Hold = step {
                            h.lock().unwrap().push(got.len() - 1);
                        }
                        step
                    };
                    let (status, retry_after) = match step {
                        Step::Answer(status, retry_after) => (status, retry_after),
                        Step::Hold => {
                            r.notified().await;
                            (rs.load(std::sync::atomic::Ordering::SeqCst), None)
                        }
                    };
                    let mut resp = warp::http::Response::builder().status(status);
                    if let Some(ra) = retry_after {
                        resp = resp.header("retry-after", ra);
                    }
                    resp.body("ok".to_string()).unwrap()
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Receiver {
            url: format!("http://{addr}/hook"),
            got,
            script,
            held,
            release,
            release_status,
        }
    }

    /// The next unscripted request is answered `status` (with `Retry-After: retry_after`).
    pub fn answer(&self, status: u16, retry_after: Option<&'static str>) {
        self.script
            .lock()
            .unwrap()
            .push_back(Step::Answer(status, retry_after));
    }

    /// The next unscripted request is recorded and held without an answer until
    /// [`Receiver::release`] (then answered 503).
    pub fn hold(&self) {
        self.script.lock().unwrap().push_back(Step::Hold);
    }

    /// Answers every request held so far with `status`.
    pub fn release_with(&self, status: u16) {
        self.release_status
            .store(status, std::sync::atomic::Ordering::SeqCst);
        self.release.notify_waiters();
    }

    /// Answers every request held so far (503).
    pub fn release(&self) {
        self.release.notify_waiters();
    }

    /// Waits until `n` requests have been held (120 s at most); the index in `got` of the
    /// `n`-th, and that request.
    pub async fn wait_held(&self, n: usize) -> (usize, Received) {
        poll::until(
            Duration::from_secs(120),
            Duration::from_millis(20),
            || async {
                let held = self.held.lock().unwrap().clone();
                match held.get(n - 1) {
                    Some(&i) => Ok((i, self.got.lock().unwrap()[i].clone())),
                    None => Err(format!(
                        "request {n} to hold never came ({} received)",
                        self.got.lock().unwrap().len()
                    )),
                }
            },
        )
        .await
    }

    /// Waits until `n` requests arrived (20 s at most).
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        poll::until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            || async {
                let got = self.got.lock().unwrap().clone();
                if got.len() >= n {
                    Ok(got)
                } else {
                    Err(format!("only {} of {n} deliveries arrived", got.len()))
                }
            },
        )
        .await
    }
}

/// One request as a [`TimedReceiver`] saw it: when it began and ended (just before the answer
/// was written, so a request the server sends after this answer begins later), and what it was
/// answered.
#[derive(Clone, Debug)]
pub struct Timed {
    pub delivery_id: String,
    pub body: serde_json::Value,
    pub start: std::time::Instant,
    pub end: std::time::Instant,
    pub status: u16,
}

/// A receiver that answers slowly and at random: each request waits 0–`max_delay_ms` ms, and
/// about one in `fail_one_in` is answered 500 (pseudo-random, seeded per receiver).
pub struct TimedReceiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Timed>>>,
}

impl TimedReceiver {
    pub async fn start(max_delay_ms: u64, fail_one_in: u64) -> TimedReceiver {
        let got: Arc<Mutex<Vec<Timed>>> = Arc::default();
        let seed = Arc::new(std::sync::atomic::AtomicU64::new(0x9E37_79B9_7F4A_7C15));
        let g = got.clone();
        let route = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(move |headers: warp::http::HeaderMap, body: bytes::Bytes| {
                let (g, seed) = (g.clone(), seed.clone());
                async move {
                    let start = std::time::Instant::now();
                    // splitmix64 over a shared counter: a different draw for every request.
                    let mut z =
                        seed.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    let delay = z % (max_delay_ms + 1);
                    let status = if (z >> 32) % fail_one_in == 0 {
                        500
                    } else {
                        200
                    };
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    g.lock().unwrap().push(Timed {
                        delivery_id: headers["webhook-id"].to_str().unwrap().to_string(),
                        body: serde_json::from_slice(&body).unwrap(),
                        start,
                        end: std::time::Instant::now(),
                        status,
                    });
                    warp::http::Response::builder()
                        .status(status)
                        .body("ok".to_string())
                        .unwrap()
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        TimedReceiver {
            url: format!("http://{addr}/hook"),
            got,
        }
    }

    pub fn requests(&self) -> Vec<Timed> {
        self.got.lock().unwrap().clone()
    }
}
