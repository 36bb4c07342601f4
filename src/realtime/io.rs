//! The connection under a realtime WebSocket, counting the bytes the server manages to write to
//! it: a socket's writer judges a stall by this progress (nothing written for
//! `realtime_client_stall_secs`), not by how long one whole message or flush takes, so a slow
//! link that keeps reading a large message is not cut off.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An I/O object that counts the bytes written through it.
pub struct Counted<T> {
    inner: T,
    written: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    pub fn new(inner: T) -> Counted<T> {
        Counted {
            inner,
            written: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes written so far (shared: read it while the stream is in use).
    pub fn written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs `step` to completion unless nothing is written (`written` does not move) for `stall`:
/// `Err(())` then.
pub async fn with_progress<F: std::future::Future>(
    stall: std::time::Duration,
    written: &AtomicU64,
    step: F,
) -> Result<F::Output, ()> {
    tokio::pin!(step);
    let mut seen = written.load(Ordering::Relaxed);
    loop {
        match tokio::time::timeout(stall, &mut step).await {
            Ok(out) => return Ok(out),
            Err(_) => {
                let now = written.load(Ordering::Relaxed);
                if now == seen {
                    return Err(());
                }
                seen = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_slow_steady_reader_is_progress_and_a_stopped_one_is_a_stall() {
        // A pipe with a tiny buffer: a 256 KiB write takes as long as the reader takes.
        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = Counted::new(a);
        let written = a.written();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0;
            while total < 256 * 1024 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                total += b.read(&mut buf).await.unwrap();
            }
            b
        });
        let data = vec![7u8; 256 * 1024];
        // Far longer than the stall bound in all, yet moving all the time.
        let done = with_progress(Duration::from_millis(200), &written, a.write_all(&data)).await;
        assert!(matches!(done, Ok(Ok(()))));
        assert_eq!(written.load(Ordering::Relaxed), 256 * 1024);
        let _b = reader.await.unwrap();
        // Nobody reads any more: no progress, a stall.
        let stalled = with_progress(Duration::from_millis(200), &written, a.write_all(&data)).await;
        assert!(stalled.is_err());
    }
}
