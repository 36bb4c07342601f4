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

/// A socket on the server at `base` with a small fixed receive buffer, subscribed to the
/// project with its read key.
async fn subscribed_small(
    base: &str,
    p: &crate::support::fixtures::Project,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp)
        .await
        .expect("websocket connect");
    use futures_util::SinkExt;
    ws.send(Message::text(
        json!({ "type": "subscribe", "roomId": room(&p.project), "token": p.read }).to_string(),
    ))
    .await
    .unwrap();
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            let v: Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["type"], "subscribed", "{v}");
            return ws;
        }
    }
}

/// Sockets that stopped reading do not each hold a copy of a large row change: a message past
/// 64 KiB goes out in fragments, each socket holding at most its write buffer and one fragment
/// of the message every socket shares. Before, tungstenite copied each message whole into each
/// socket's write buffer: red team rt11 took the server to 1.5 GB with 80 such sockets. A
/// socket that reads gets each change whole (one message, reassembled by its client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_stop_reading_do_not_each_hold_a_copy_of_a_large_change() {
    const SOCKETS: usize = 24;
    const ROWS: i64 = 3;
    // md5 (32 characters) repeated: ≈ 6 MB a row.
    const REPEAT: usize = 192_000;
    let server = crate::support::process::ServerProcess::start(&[]).await;
    let p = crate::support::fixtures::project(&server.base).await;
    let sql = |q: &'static str| crate::support::http::sql(&server.base, &p.admin, &p.project, q);
    sql("CREATE TABLE big (id int PRIMARY KEY, body text)").await;
    let mut stopped = Vec::new();
    for _ in 0..SOCKETS {
        stopped.push(subscribed_small(&server.base, &p).await);
    }
    let mut reader = crate::support::ws::subscribed(&server.base, &p, None).await;
    // Warm up (the stream, the room, allocator arenas), then take the baseline.
    sql("INSERT INTO big VALUES (0, 'warm')").await;
    let m = crate::support::ws::next(&mut reader).await;
    assert_eq!(m["type"], "db_event", "{m}");
    let baseline = server.peak_rss();
    sql("INSERT INTO big SELECT g, repeat(md5(g::text), 192000) FROM generate_series(1, 3) g")
        .await;
    for id in 1..=ROWS {
        let m = crate::support::ws::next(&mut reader).await;
        assert_eq!(m["type"], "db_event", "{m}");
        assert_eq!(m["payload"]["record"]["id"], id);
        let body = m["payload"]["record"]["body"].as_str().unwrap();
        assert_eq!(body.len(), 32 * REPEAT);
        assert_eq!(body, body[..32].repeat(REPEAT), "row {id} arrived altered");
    }
    // The stopped sockets' writers have fed what they could meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grew = server.peak_rss().saturating_sub(baseline);
    eprintln!("the peak grew by {} MB", grew >> 20);
    assert!(
        grew < 130 << 20,
        "{SOCKETS} sockets that stopped reading grew the peak by {} MB",
        grew >> 20
    );
    drop(stopped);
}
