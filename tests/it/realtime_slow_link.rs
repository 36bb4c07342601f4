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

use crate::realtime::room;
use crate::support::spawn_app_with;

/// A TCP stream read at about 8 KiB every 20 ms (400 KiB/s).
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
        let want = buf.remaining().min(8 * 1024);
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
    let app = spawn_app_with(|c| c.realtime_client_stall_secs = 1).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE big (id int, body text)")
        .await;
    let addr = app
        .base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
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
    // Rows of about 1.5 MB each: several seconds apiece at this pace, each far longer than
    // the one-second stall bound, yet always moving.
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO big SELECT g, repeat(md5(g::text), 48000) FROM generate_series(1, 2) g",
    )
    .await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while got.len() < 2 {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the rows did not arrive in time")
            .expect("the socket ended")
            .expect("socket error");
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "db_event" {
                    assert_eq!(v["payload"]["record"]["body"].as_str().unwrap().len(), 48000 * 32);
                    got.push(v["payload"]["record"]["id"].as_i64().unwrap());
                }
            }
            Message::Close(frame) => panic!("cut off: {frame:?}"),
            _ => {}
        }
    }
    assert_eq!(got, vec![1, 2]);
}
