//! A webhook receiver: a local HTTP server that records every request and answers with scripted
//! statuses (then 200). Stops with the test's runtime.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warp::Filter;

use super::poll;

#[derive(Clone, Debug)]
pub struct Received {
    pub headers: warp::http::HeaderMap,
    pub body: String,
    pub at: Instant,
}

/// Statuses (and `Retry-After` values) to answer with, in order; then 200.
type Script = Arc<Mutex<VecDeque<(u16, Option<&'static str>)>>>;

/// A local HTTP receiver answering with scripted statuses (then 200).
pub struct Receiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Received>>>,
    script: Script,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script: Script = Arc::default();
        let (g, s) = (got.clone(), script.clone());
        let route = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(move |headers, body: bytes::Bytes| {
                g.lock().unwrap().push(Received {
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                    at: Instant::now(),
                });
                let (status, retry_after) = s.lock().unwrap().pop_front().unwrap_or((200, None));
                let mut resp = warp::http::Response::builder().status(status);
                if let Some(ra) = retry_after {
                    resp = resp.header("retry-after", ra);
                }
                resp.body("ok".to_string()).unwrap()
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Receiver {
            url: format!("http://{addr}/hook"),
            got,
            script,
        }
    }

    pub fn answer(&self, status: u16, retry_after: Option<&'static str>) {
        self.script.lock().unwrap().push_back((status, retry_after));
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
