//! A client on a slow link that keeps reading a large message is not cut off as stalled: a
//! stall is measured by the bytes the server manages to write, not by how long one message or
//! flush takes as a whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Message;

use crate::support::spawn_app_with;
use crate::support::ws::room;

/// A TCP stream read at about 16 KiB every 20 ms (800 KiB/s).
struct Slow {
    inner: tokio::net::TcpStream,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Slow {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(p) = self.pause.as_mut() {
            if p.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let want = buf.remaining().min(16 * 1024);
        let mut small = vec![0u8; want];
        let mut sub = ReadBuf::new(&mut small);
        match Pin::new(&mut self.inner).poll_read(cx, &mut sub) {
            Poll::Ready(Ok(())) => {
                let n = sub.filled().len();
                buf.put_slice(&small[..n]);
                self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(20))));
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Slow {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_reading_a_large_message_steadily_is_not_cut_off() {
    let app = spawn_app_with(|c| c.realtime_client_stall_secs = 3).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE big (id int, body text)")
        .await;
    let addr = app
        .base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A fixed, modest receive buffer (no autotuning that would take in everything at once).
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    let url = format!("ws://{addr}/");
    let (mut ws, _) = tokio_tungstenite::client_async(
        url,
        Slow {
            inner: tcp,
            pause: None,
        },
    )
    .await
    .expect("websocket connect");
    use futures_util::SinkExt;
    ws.send(Message::text(
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read }).to_string(),
    ))
    .await
    .unwrap();
    // Rows of about 4 MB each, 16 MB in all (more than the server's socket send buffer, up to
    // 4 MiB, can hide): about five seconds apiece at this pace, each longer than the 3 s stall
    // bound, yet always moving. (The kernel wakes a writer blocked on a full send buffer only
    // once a good part of it is free, about every 2 s here: progress is visible at that
    // granularity, hence a bound of a few seconds.)
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO big SELECT g, repeat(md5(g::text), 128000) FROM generate_series(1, 4) g",
    )
    .await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while got.len() < 4 {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the rows did not arrive in time")
            .expect("the socket ended")
            .expect("socket error");
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "db_event" {
                    assert_eq!(
                        v["payload"]["record"]["body"].as_str().unwrap().len(),
                        128000 * 32
                    );
                    got.push(v["payload"]["record"]["id"].as_i64().unwrap());
                }
            }
            Message::Close(frame) => panic!("cut off: {frame:?}"),
            _ => {}
        }
    }
    assert_eq!(got, (1..=4).collect::<Vec<i64>>());
}
