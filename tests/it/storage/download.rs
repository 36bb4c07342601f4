//! Downloads: pre-signed local URLs that expire and refuse tampering, and stored objects served
//! as private files with a sandboxing CSP.

use super::*;

#[tokio::test]
async fn local_urls_expire_after_fifteen_minutes_and_refuse_tampering() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let (_, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "page.html",
        "text/html",
        b"<script>1</script>",
        &[],
    )
    .await;
    let key = body["file"]["s3_key"].as_str().unwrap().to_string();
    let (_, signed) = signed_url(&t, &f.read, &f.project, &key).await;
    let url = signed["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("{}/api/storage/object?", t.base)),
        "{url}"
    );

    let (status, headers, bytes) = fetch(&url).await;
    assert_eq!(status, 200);
    assert_eq!(bytes.as_ref(), b"<script>1</script>");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["content-type"], "text/html");
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"page.html\""),
        "{:?}",
        headers["content-disposition"]
    );

    // Altered: another signature, another key, a later expiry.
    let parsed = url::Url::parse(&url).unwrap();
    let params: std::collections::HashMap<String, String> =
        parsed.query_pairs().into_owned().collect();
    let with = |k: &str, v: &str| {
        let mut p = params.clone();
        p.insert(k.into(), v.into());
        format!(
            "{}/api/storage/object?{}",
            t.base,
            serde_urlencoded::to_string(&p).unwrap()
        )
    };
    let sig = &params["signature"];
    let flipped = format!(
        "{}{}",
        if sig.starts_with('0') { "1" } else { "0" },
        &sig[1..]
    );
    let later = (params["expires"].parse::<i64>().unwrap() + 3600).to_string();
    for bad in [
        with("signature", &flipped),
        with("key", &key.replace("page.html", "other.html")),
        with("expires", &later),
    ] {
        let resp = reqwest::get(&bad).await.unwrap();
        assert_eq!(resp.status(), 403, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "ACCESS_DENIED");
    }

    t.app.storage.clock.advance(Duration::from_secs(14 * 60));
    assert_eq!(fetch(&url).await.0, 200, "still valid after 14 minutes");
    t.app.storage.clock.advance(Duration::from_secs(61));
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 403, "refused after 15 minutes");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    // A fresh URL works again.
    let (_, signed) = signed_url(&t, &f.read, &f.project, &key).await;
    assert_eq!(fetch(signed["url"].as_str().unwrap()).await.0, 200);
    t.stop().await;
}

#[tokio::test]
async fn stored_objects_are_private_files_served_with_a_sandboxing_csp() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    create_bucket(&t, &f, "assets", json!({ "isPublic": true })).await;
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "page.html",
        "text/html",
        b"<script>parent.steal()</script>",
        &[("path", "deep/er/page.html")],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = body["file"]["s3_key"].as_str().unwrap().to_string();

    // Only the server's user may read what is stored: directories 0700, files 0600.
    let data_dir = t.app.config.data_dir.clone();
    assert_eq!(mode_of(&data_dir), 0o700, "the data directory");
    assert_eq!(mode_of(&data_dir.join("secrets.json")), 0o600);
    let storage = data_dir.join("storage");
    let file = storage.join(&key);
    assert_eq!(mode_of(&file), 0o600, "{}", file.display());
    let mut dir = file.parent().unwrap();
    while dir.starts_with(&storage) {
        assert_eq!(mode_of(dir), 0o700, "{}", dir.display());
        dir = dir.parent().unwrap();
    }

    // Served user files may run nothing in this origin.
    let (_, signed) = signed_url(&t, &f.read, &f.project, &key).await;
    let (status, headers, _) = fetch(signed["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-security-policy"],
        "default-src 'none'; sandbox"
    );
    let (_, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "assets",
        "logo.svg",
        "image/svg+xml",
        b"<svg onload=alert(1)/>",
        &[],
    )
    .await;
    let (status, headers, _) = fetch(body["file"]["public_url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-security-policy"],
        "default-src 'none'; sandbox"
    );
    t.stop().await;
}

/// A download serves what the rows say now, whatever this server kept of them from the upload
/// or an earlier download: an upsert of the same size with another type serves the new bytes
/// and type at the same URL; a bucket made private answers its public URL 404 and its signed
/// URLs `private, no-store`; a deleted file is 404 at once.
#[tokio::test]
async fn downloads_follow_replacements_visibility_and_deletes() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "pub", json!({ "isPublic": true })).await;
    let (status, first) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "pub",
        "a.txt",
        "text/plain",
        b"hello",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let key = first["file"]["s3_key"].as_str().unwrap().to_string();
    let public = first["file"]["public_url"].as_str().unwrap().to_string();
    let (_, signed) = signed_url(&t, &f.read, &f.project, &key).await;
    let url = signed["url"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let (status, headers, bytes) = fetch(&url).await;
        assert_eq!((status, bytes.as_ref()), (200, b"hello".as_ref()));
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(headers["cache-control"], "public, max-age=60");
        assert_eq!(fetch(&public).await.2.as_ref(), b"hello");
    }
    // Replaced: same size, another type.
    let (status, body) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "pub",
        "a.txt",
        "image/png",
        b"world",
        &[("upsert", "true")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, bytes) = fetch(&url).await;
    assert_eq!((status, bytes.as_ref()), (200, b"world".as_ref()));
    assert_eq!(headers["content-type"], "image/png");
    // Made private.
    let (status, _) = t
        .call(
            "PATCH",
            "/api/storage/buckets",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "bucketId": "pub", "isPublic": false })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(fetch(&public).await.0, 404);
    let (status, headers, _) = fetch(&url).await;
    assert_eq!(status, 200);
    assert_eq!(headers["cache-control"], "private, no-store");
    // Deleted.
    let (status, body) = t
        .call(
            "DELETE",
            &format!(
                "/api/storage/files?projectId={}&s3Key={}",
                f.project,
                urlencode(&key)
            ),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fetch(&url).await.0, 404);
    t.stop().await;
}

/// A file a little over the size read whole (4 MiB) streams, byte for byte, as does one of
/// exactly that size (read whole).
#[tokio::test]
async fn files_around_the_whole_read_size_download_exactly() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let whole = fluxbase::storage::backend::WHOLE_READ as usize;
    for (name, len) in [("at.bin", whole), ("over.bin", whole + 1), ("empty.bin", 0)] {
        let data = pattern(len, len as u8);
        let (status, body) = upload(
            &t,
            &f.readwrite,
            &f.project,
            "docs",
            name,
            "application/octet-stream",
            &data,
            &[],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let key = body["file"]["s3_key"].as_str().unwrap();
        let (status, bytes) = download(&t, &f, key).await;
        assert_eq!(status, 200);
        assert!(
            bytes.as_ref() == data.as_slice(),
            "{name}: {} bytes",
            bytes.len()
        );
    }
    t.stop().await;
}

/// `HEAD` of a signed or public URL answers the headers of the `GET` (the file's length
/// included) and no body, for a small file (read whole on `GET`) and a larger one (streamed).
#[tokio::test]
async fn head_answers_the_headers_of_get_without_the_body() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "pub", json!({ "isPublic": true })).await;
    let whole = fluxbase::storage::backend::WHOLE_READ as usize;
    for (name, len) in [("small.txt", 5), ("large.bin", whole + 10)] {
        let data = pattern(len, 7);
        let (status, body) = upload(
            &t,
            &f.readwrite,
            &f.project,
            "pub",
            name,
            "text/plain",
            &data,
            &[],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let key = body["file"]["s3_key"].as_str().unwrap();
        let public = body["file"]["public_url"].as_str().unwrap().to_string();
        let (_, signed) = signed_url(&t, &f.read, &f.project, key).await;
        for url in [signed["url"].as_str().unwrap(), public.as_str()] {
            let (_, got, bytes) = fetch(url).await;
            assert_eq!(bytes.len(), len);
            let resp = reqwest::Client::new().head(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            for h in [
                "content-type",
                "content-length",
                "content-disposition",
                "cache-control",
                "content-security-policy",
            ] {
                assert_eq!(resp.headers().get(h), got.get(h), "{name}: {h}");
            }
            assert_eq!(resp.headers()["content-length"], len.to_string().as_str());
            assert!(resp.bytes().await.unwrap().is_empty());
        }
    }
    t.stop().await;
}

/// A response's head read from a raw connection (the body left unread in the socket): its
/// status and `Content-Length`, and the body bytes that came with the head.
async fn open_download(addr: &str, path: &str) -> (tokio::net::TcpStream, u16, usize, Vec<u8>) {
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    read_download_head(socket, addr, path).await
}

/// [`open_download`] from the loopback address `from` (any of 127.0.0.0/8 reaches the
/// server's 127.0.0.1): another client address.
async fn open_download_from(
    from: std::net::IpAddr,
    addr: &str,
    path: &str,
) -> (tokio::net::TcpStream, u16, usize, Vec<u8>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let socket = socket.connect(addr.parse().unwrap()).await.unwrap();
    read_download_head(socket, addr, path).await
}

async fn read_download_head(
    mut socket: tokio::net::TcpStream,
    addr: &str,
    path: &str,
) -> (tokio::net::TcpStream, u16, usize, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    (socket, status, length, got[end..].to_vec())
}

/// The read budget bounds what downloads hold: with an 8 MiB budget, twelve downloads of a
/// 4 MiB file whose clients read nothing yet can hold at most two whole files; the other ten
/// find the budget spent and stream in small chunks (counted), and all twelve then deliver
/// every byte. Once their bodies are sent, the budget is whole again and a download is read
/// whole again.
#[tokio::test]
async fn downloads_beyond_the_read_budget_stream_and_all_succeed() {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncReadExt;
    const BUDGET: u64 = 8 * 1024 * 1024;
    let t = spawn_app_with(|c| c.storage_read_budget_bytes = BUDGET).await;
    let len = fluxbase::storage::backend::WHOLE_READ as usize;
    let (data, addr, path) = signed_file(&t, len, 3).await;
    let metrics = &t.app.metrics;
    let (budgeted, small) = (
        metrics.storage_downloads_budgeted.load(Relaxed),
        metrics.storage_downloads_small.load(Relaxed),
    );
    let mut held = Vec::new();
    for _ in 0..12 {
        let (socket, status, length, first) = open_download(&addr, &path).await;
        assert_eq!((status, length), (200, len));
        held.push((socket, first));
    }
    let free = t.app.storage.read_budget_free().unwrap();
    assert!(
        free < len as u64,
        "two whole files hold the budget: {free} free"
    );
    // Two fit in the budget at once; a third may have found it once one of the first two was
    // sent whole into the kernel's socket buffers (loopback buffers can take 4 MiB), which
    // gives its share back. The rest stream in small chunks.
    let (took, streamed) = (
        metrics.storage_downloads_budgeted.load(Relaxed) - budgeted,
        metrics.storage_downloads_small.load(Relaxed) - small,
    );
    assert_eq!(took + streamed, 12);
    assert!((2..=4).contains(&took), "{took} took budget");
    assert!(streamed >= 8, "{streamed} streamed in small chunks");
    for (mut socket, mut body) in held {
        socket.read_to_end(&mut body).await.unwrap();
        assert!(body == data, "{} bytes", body.len());
    }
    // Given back once the bodies are sent (the last chunk is dropped just after the client
    // has it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.app.storage.read_budget_free() != Some(BUDGET) {
        assert!(std::time::Instant::now() < deadline, "the budget came back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, _, bytes) = fetch(&format!("http://{addr}{path}")).await;
    assert!(status == 200 && bytes.as_ref() == data.as_slice());
    assert_eq!(
        metrics.storage_downloads_budgeted.load(Relaxed) - budgeted,
        took + 1,
        "read whole again"
    );
    t.stop().await;
}

/// With no read budget at all every download streams in small chunks, a small file's and a
/// large one's alike, byte for byte (and a `HEAD` reads nothing, so takes nothing).
#[tokio::test]
async fn with_no_read_budget_every_download_streams_in_small_chunks() {
    use std::sync::atomic::Ordering::Relaxed;
    let t = spawn_app_with(|c| c.storage_read_budget_bytes = 0).await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let whole = fluxbase::storage::backend::WHOLE_READ as usize;
    let metrics = &t.app.metrics;
    for (name, len) in [("small.bin", 100_000), ("large.bin", whole + 70_000)] {
        let data = pattern(len, 5);
        let (status, body) = upload(
            &t,
            &f.readwrite,
            &f.project,
            "docs",
            name,
            "application/octet-stream",
            &data,
            &[],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let key = body["file"]["s3_key"].as_str().unwrap();
        let small = metrics.storage_downloads_small.load(Relaxed);
        let (status, bytes) = download(&t, &f, key).await;
        assert!(status == 200 && bytes.as_ref() == data.as_slice(), "{name}");
        assert_eq!(metrics.storage_downloads_small.load(Relaxed), small + 1);
        let (_, signed) = signed_url(&t, &f.read, &f.project, key).await;
        let head = reqwest::Client::new()
            .head(signed["url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(head.headers()["content-length"], len.to_string().as_str());
        assert_eq!(metrics.storage_downloads_small.load(Relaxed), small + 1);
    }
    assert_eq!(metrics.storage_downloads_budgeted.load(Relaxed), 0);
    t.stop().await;
}

/// A client address that holds downloads unread keeps at most its cap of read-budget shares
/// (`storage_read_shares_per_client`): with a budget of three streams' holds and a cap of two,
/// six unread downloads from one address take two shares and stream the rest in small chunks,
/// so a download to another address still gets the third share (without the cap the first
/// address would have taken all three). Every byte is delivered to all, and the shares come
/// back.
#[tokio::test]
async fn one_address_holding_unread_downloads_leaves_budget_to_others() {
    use fluxbase::storage::buffers::STREAM_HOLD;
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncReadExt;
    let t = spawn_app_with(|c| {
        c.storage_read_budget_bytes = 3 * STREAM_HOLD;
        c.storage_read_shares_per_client = 2;
    })
    .await;
    // Large enough that an unread stream cannot end into loopback's socket buffers.
    let (data, addr, path) = signed_file(&t, UNREAD_SIZED, 8).await;
    let metrics = &t.app.metrics;
    let buffers = t.app.storage.backend.buffers().unwrap().clone();
    let (hog, other): (std::net::IpAddr, std::net::IpAddr) =
        ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
    let (budgeted, capped) = (
        metrics.storage_downloads_budgeted.load(Relaxed),
        metrics.storage_downloads_client_capped.load(Relaxed),
    );
    let mut held = Vec::new();
    for _ in 0..6 {
        let (socket, status, length, first) = open_download_from(hog, &addr, &path).await;
        assert_eq!((status, length), (200, data.len()));
        held.push((socket, first));
    }
    assert_eq!(buffers.held_by(hog), 2, "the cap");
    assert_eq!(
        metrics.storage_downloads_budgeted.load(Relaxed) - budgeted,
        2
    );
    assert_eq!(
        metrics.storage_downloads_client_capped.load(Relaxed) - capped,
        4
    );
    // Another address still finds a share.
    let (socket, status, _, first) = open_download_from(other, &addr, &path).await;
    assert_eq!(status, 200);
    assert_eq!(buffers.held_by(other), 1, "budgeted");
    assert_eq!(
        metrics.storage_downloads_budgeted.load(Relaxed) - budgeted,
        3
    );
    held.push((socket, first));
    for (mut socket, mut body) in held {
        socket.read_to_end(&mut body).await.unwrap();
        assert!(body == data, "{} bytes", body.len());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.app.storage.read_budget_free() != Some(3 * STREAM_HOLD)
        || buffers.held_by(hog) + buffers.held_by(other) != 0
    {
        assert!(std::time::Instant::now() < deadline, "the shares came back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    t.stop().await;
}

/// A client that stops reading a download has its connection closed once its socket has taken
/// nothing for `send_stall_timeout_secs` (counted), and the read-budget share it held comes
/// back; a client that reads slowly but keeps reading is never cut, though its download lasts
/// more than twice the stall timeout.
#[tokio::test]
async fn a_download_whose_client_stops_reading_is_closed_and_a_slow_reader_is_not() {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;
    let t = spawn_app_with(|c| c.send_stall_timeout_secs = 2).await;
    let (data, addr, path) = signed_file(&t, UNREAD_SIZED, 9).await;
    let metrics = &t.app.metrics;
    let whole = t.app.storage.read_budget_free();

    let (mut stopped, status, length, mut got) = open_download(&addr, &path).await;
    assert_eq!((status, length), (200, data.len()));
    let started = Instant::now();
    while metrics.connections_stalled.load(Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the stalled download was not closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // What the kernel already had arrives, then the connection ends short of the file.
    tokio::time::timeout(Duration::from_secs(10), stopped.read_to_end(&mut got))
        .await
        .expect("the server closed the connection")
        .ok();
    assert!(got.len() < data.len(), "{} bytes", got.len());
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.app.storage.read_budget_free() != whole {
        assert!(Instant::now() < deadline, "the share came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A slow reader: 1 MiB every 200 ms, never a pause near the timeout.
    let (mut slow, status, _, mut got) = open_download(&addr, &path).await;
    assert_eq!(status, 200);
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < data.len() {
        let mut chunk = 0;
        while chunk < 1024 * 1024 && got.len() < data.len() {
            let n = slow.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            chunk += n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(4));
    assert!(got == data, "{} bytes", got.len());
    assert_eq!(metrics.connections_stalled.load(Relaxed), 1);
    t.stop().await;
}

/// Larger than loopback's socket buffers and what the server reads ahead together: a download
/// of a file this large left unread cannot end into them.
const UNREAD_SIZED: usize = 24 * 1024 * 1024;

/// A file of `len` bytes (`pattern` of `seed`) uploaded to a new project's bucket, and the
/// address and path of its signed URL.
async fn signed_file(t: &TestApp, len: usize, seed: u8) -> (Vec<u8>, String, String) {
    let f = t.fixture().await;
    create_bucket(t, &f, "docs", json!({})).await;
    let data = pattern(len, seed);
    let (status, body) = upload(
        t,
        &f.readwrite,
        &f.project,
        "docs",
        "big.bin",
        "application/octet-stream",
        &data,
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = body["file"]["s3_key"].as_str().unwrap();
    let (_, signed) = signed_url(t, &f.read, &f.project, key).await;
    let url = reqwest::Url::parse(signed["url"].as_str().unwrap()).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let path = format!("{}?{}", url.path(), url.query().unwrap());
    (data, addr, path)
}

/// A GET of `url` with `headers`: status, response headers, body.
async fn fetch_with(
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Bytes) {
    let mut req = reqwest::Client::new().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("fetching a download URL");
    let status = resp.status().as_u16();
    let got = resp.headers().clone();
    (status, got, resp.bytes().await.unwrap())
}

/// Ranges and preconditions on the URLs Fluxbase serves itself (`urls` of a file holding
/// `data`): a range's bytes with `Content-Range`, a suffix, an open end, one past the end (416
/// in the error shape), ignored forms, `If-Range`, `If-None-Match`, `If-Modified-Since`, `HEAD`.
async fn ranges_are_served(urls: &[String], data: &[u8]) {
    let len = data.len();
    for url in urls {
        let (status, whole, bytes) = fetch(url).await;
        assert_eq!(status, 200);
        assert_eq!(bytes.as_ref(), data);
        assert_eq!(whole["accept-ranges"], "bytes");
        let etag = whole["etag"].to_str().unwrap().to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        let modified = whole["last-modified"].to_str().unwrap().to_string();

        let cases: &[(String, usize, usize)] = &[
            ("bytes=0-9".into(), 0, 10),
            (format!("bytes={}-{}", len / 2, len / 2 + 99), len / 2, 100),
            (format!("bytes={}-", len - 7), len - 7, 7),
            ("bytes=-5".into(), len - 5, 5),
            (format!("bytes=-{}", len * 3), 0, len),
            (format!("bytes=3-{}", len * 9), 3, len - 3),
        ];
        for (range, start, n) in cases {
            let (status, got, bytes) = fetch_with(url, &[("range", range)]).await;
            assert_eq!(status, 206, "{range}");
            assert_eq!(bytes.as_ref(), &data[*start..start + n], "{range}");
            assert_eq!(
                got["content-range"],
                format!("bytes {start}-{}/{len}", start + n - 1).as_str(),
                "{range}"
            );
            assert_eq!(got["content-length"], n.to_string().as_str());
            assert_eq!(got["etag"], etag.as_str());
            for h in ["content-type", "content-disposition", "cache-control"] {
                assert_eq!(got.get(h), whole.get(h), "{range}: {h}");
            }
        }
        // Nothing of the file: 416 in the guide's error shape, with the size.
        for range in [format!("bytes={len}-"), "bytes=-0".into()] {
            let (status, got, bytes) = fetch_with(url, &[("range", &range)]).await;
            assert_eq!(status, 416, "{range}");
            assert_eq!(got["content-range"], format!("bytes */{len}").as_str());
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["success"], false);
            assert_eq!(body["error"]["code"], "RANGE_NOT_SATISFIABLE", "{body}");
        }
        // Forms RFC 9110 lets a server ignore: the whole file.
        for range in ["bytes=0-1,5-9", "lines=0-9", "bytes=9-3", "bytes=x-"] {
            let (status, got, bytes) = fetch_with(url, &[("range", range)]).await;
            assert_eq!(status, 200, "{range}");
            assert_eq!(bytes.len(), len);
            assert!(got.get("content-range").is_none());
        }
        // If-Range: the file's own tag keeps the range; another, or a date (even the file's
        // own: not a strong validator), gives the whole file.
        for (validator, partial) in [
            (etag.as_str(), true),
            (modified.as_str(), false),
            ("\"another\"", false),
            ("Thu, 01 Jan 2015 00:00:00 GMT", false),
        ] {
            let (status, _, bytes) =
                fetch_with(url, &[("range", "bytes=0-3"), ("if-range", validator)]).await;
            assert_eq!(status, if partial { 206 } else { 200 }, "{validator}");
            assert_eq!(bytes.len(), if partial { 4 } else { len });
        }
        // If-Match: this version's parts, 412 for another (in the error shape).
        let (status, _, bytes) =
            fetch_with(url, &[("if-match", &etag), ("range", "bytes=0-3")]).await;
        assert_eq!((status, bytes.len()), (206, 4));
        for headers in [
            vec![("if-match", "\"another\""), ("range", "bytes=0-3")],
            vec![("if-unmodified-since", "Thu, 01 Jan 2015 00:00:00 GMT")],
        ] {
            let (status, _, bytes) = fetch_with(url, &headers).await;
            assert_eq!(status, 412, "{headers:?}");
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["error"]["code"], "PRECONDITION_FAILED", "{body}");
        }
        // Two Range lines are one list of two ranges: ignored.
        let (status, _, bytes) =
            fetch_with(url, &[("range", "bytes=0-3"), ("range", "bytes=5-9")]).await;
        assert_eq!((status, bytes.len()), (200, len));
        // Revalidation: 304 with no body while the file is this one.
        for headers in [
            vec![("if-none-match", etag.as_str())],
            vec![("if-none-match", "*")],
            vec![("if-modified-since", modified.as_str())],
        ] {
            let (status, got, bytes) = fetch_with(url, &headers).await;
            assert_eq!(status, 304, "{headers:?}");
            assert!(bytes.is_empty());
            assert_eq!(got["etag"], etag.as_str());
        }
        let (status, _, bytes) = fetch_with(url, &[("if-none-match", "\"another\"")]).await;
        assert_eq!((status, bytes.len()), (200, len));
        let (status, _, _) = fetch_with(
            url,
            &[("if-modified-since", "Thu, 01 Jan 2015 00:00:00 GMT")],
        )
        .await;
        assert_eq!(status, 200);
        // HEAD ignores Range.
        let resp = reqwest::Client::new()
            .head(url)
            .header("range", "bytes=0-9")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], len.to_string().as_str());
    }
}

/// A file's public URL and (on the local backend) its signed URL.
async fn urls_of(t: &TestApp, f: &Fixture, key: &str, public: &str, local: bool) -> Vec<String> {
    let mut urls = vec![public.to_string()];
    if local {
        let (_, signed) = signed_url(t, &f.read, &f.project, key).await;
        urls.push(signed["url"].as_str().unwrap().to_string());
    }
    urls
}

/// Ranges on small (read whole) and large (streamed) files; a replaced file's old tag no longer
/// matches; the served bytes count what was sent.
async fn ranges_on(t: &TestApp, local: bool) {
    let f = t.fixture().await;
    create_bucket(t, &f, "media", json!({ "isPublic": true })).await;
    let whole = fluxbase::storage::backend::WHOLE_READ as usize;
    for (name, len) in [("clip.mp4", 1000), ("movie.mp4", whole + 4321)] {
        let data = pattern(len, 3);
        let (status, body) = upload(
            t,
            &f.readwrite,
            &f.project,
            "media",
            name,
            "video/mp4",
            &data,
            &[],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let key = body["file"]["s3_key"].as_str().unwrap().to_string();
        let public = body["file"]["public_url"].as_str().unwrap().to_string();
        let urls = urls_of(t, &f, &key, &public, local).await;
        ranges_are_served(&urls, &data).await;

        // Replaced: the old tag matches nothing (200, new bytes; If-Range gives the whole).
        let (_, before, _) = fetch(&public).await;
        let old_tag = before["etag"].to_str().unwrap().to_string();
        let new = pattern(len, 9);
        let (status, body) = upload(
            t,
            &f.readwrite,
            &f.project,
            "media",
            name,
            "video/mp4",
            &new,
            &[("upsert", "true")],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        for url in urls_of(t, &f, &key, &public, local).await {
            let (status, got, bytes) = fetch_with(&url, &[("if-none-match", &old_tag)]).await;
            assert_eq!(status, 200, "{url}");
            assert_eq!(bytes.as_ref(), new.as_slice());
            assert_ne!(got["etag"], old_tag.as_str());
            let (status, _, bytes) =
                fetch_with(&url, &[("range", "bytes=0-3"), ("if-range", &old_tag)]).await;
            assert_eq!((status, bytes.as_ref()), (200, new.as_slice()));
            // A client fetching the old version in parts is stopped, not given the new one's.
            let (status, _, _) =
                fetch_with(&url, &[("range", "bytes=4-7"), ("if-match", &old_tag)]).await;
            assert_eq!(status, 412, "{url}");
        }
    }
    // A private file's public URL stays 404 whatever the range.
    create_bucket(t, &f, "private", json!({})).await;
    let (status, body) = upload(
        t,
        &f.readwrite,
        &f.project,
        "private",
        "a.txt",
        "text/plain",
        b"secret",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = body["file"]["s3_key"].as_str().unwrap();
    let url = t.url(&format!("/api/storage/public/{key}"));
    for headers in [
        vec![("range", "bytes=0-1")],
        vec![("range", "bytes=100-")],
        vec![("if-none-match", "*")],
    ] {
        let (status, _, _) = fetch_with(&url, &headers).await;
        assert_eq!(status, 404, "{headers:?}");
    }
    // Paths through a private file, or too long for the disk, answer as a missing file does
    // (red team rt17: 503 told a private file from a missing one).
    let missing = t.url(&format!("/api/storage/public/{key}.nope/x"));
    for url in [
        format!("{url}/x"),
        format!("{url}/{}", "x".repeat(300)),
        missing,
    ] {
        for head in [false, true] {
            let req = if head {
                reqwest::Client::new().head(&url)
            } else {
                reqwest::Client::new().get(&url)
            };
            let status = req.send().await.unwrap().status();
            assert_eq!(status, 404, "{url} (HEAD {head})");
        }
    }
}

#[tokio::test]
async fn ranges_and_revalidation_are_answered_on_the_local_backend() {
    let t = spawn_app().await;
    ranges_on(&t, true).await;
    // The served bytes count a range's bytes, not the file's.
    let f = t.fixture().await;
    create_bucket(&t, &f, "count", json!({ "isPublic": true })).await;
    let (_, body) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "count",
        "c.bin",
        "application/octet-stream",
        &pattern(100_000, 1),
        &[],
    )
    .await;
    let public = body["file"]["public_url"].as_str().unwrap().to_string();
    let served = || async {
        let text = t.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix("fluxbase_storage_served_bytes_total "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = served().await;
    let (status, _, _) = fetch_with(&public, &[("range", "bytes=10-19")]).await;
    assert_eq!(status, 206);
    assert_eq!(served().await - before, 10);
    t.stop().await;
}

#[tokio::test]
async fn ranges_and_revalidation_are_answered_on_s3() {
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    ranges_on(&t, false).await;
    t.stop().await;
}

/// A signed URL of the local backend ends with the access of whoever asked for it: an API key
/// rotated or deleted, or a member removed from the project, and its URLs are 403
/// `ACCESS_DENIED`; the grant cannot be dropped or swapped (the signature covers it); the
/// key's new secret, and other keys' URLs, keep working.
#[tokio::test]
async fn a_signed_url_ends_with_the_access_of_whoever_asked_for_it() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let (status, body) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "docs",
        "a.txt",
        "text/plain",
        b"granted",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = body["file"]["s3_key"].as_str().unwrap().to_string();
    let url_for = |token: String| {
        let (t, f, key) = (&t, &f, key.clone());
        async move {
            let (status, body) = signed_url(t, &token, &f.project, &key).await;
            assert_eq!(status, 200, "{body}");
            body["url"].as_str().unwrap().to_string()
        }
    };
    let denied = |url: String| async move {
        let (status, _, bytes) = fetch(&url).await;
        assert_eq!(status, 403, "{url}");
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["code"], "ACCESS_DENIED", "{body}");
        body["error"]["message"].as_str().unwrap().to_string()
    };

    // Keys: one rotated, one deleted; the read key untouched.
    let (rotated_id, rotated) = t.new_key(&f, "read", None).await;
    let (deleted_id, deleted) = t.new_key(&f, "read", None).await;
    let (rotated_url, deleted_url, kept_url) = (
        url_for(rotated.clone()).await,
        url_for(deleted).await,
        url_for(f.read.clone()).await,
    );
    assert!(rotated_url.contains("grant=k."), "{rotated_url}");
    for url in [&rotated_url, &deleted_url, &kept_url] {
        let (status, _, bytes) = fetch(url).await;
        assert_eq!((status, bytes.as_ref()), (200, b"granted".as_slice()));
    }
    // Dropped or swapped, the grant breaks the signature.
    let (without, _) = rotated_url.split_once("&grant=").unwrap();
    let signature = rotated_url.split("&signature=").nth(1).unwrap();
    let stripped = format!("{without}&signature={signature}");
    let msg = denied(stripped).await;
    assert!(!msg.contains("rotated"), "{msg}");
    let kept_grant = kept_url
        .split("grant=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let rotated_grant = rotated_url
        .split("grant=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    denied(rotated_url.replace(rotated_grant, kept_grant)).await;

    let (status, body) = t
        .call(
            "POST",
            "/api/keys/rotate",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "keyId": rotated_id })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let new_secret = body["secret"].as_str().unwrap().to_string();
    let (status, body) = t
        .call(
            "DELETE",
            &format!("/api/keys?projectId={}&keyId={deleted_id}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let msg = denied(rotated_url).await;
    assert!(msg.contains("deleted or rotated"), "{msg}");
    denied(deleted_url).await;
    let (status, _, _) = fetch(&kept_url).await;
    assert_eq!(status, 200);
    let fresh = url_for(new_secret).await;
    let (status, _, _) = fetch(&fresh).await;
    assert_eq!(
        status, 200,
        "the rotated key's new secret signs URLs that work"
    );

    // A member's URL ends when they leave the project.
    let (token, user_id, email) = t.signup().await;
    let (status, body) = t
        .call(
            "POST",
            "/api/team",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "email": email, "role": "viewer" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let invite = body["invite"]["id"].as_str().unwrap().to_string();
    let (status, body) = t
        .call(
            "POST",
            "/api/team/invites/accept",
            Some(&token),
            Some(json!({ "inviteId": invite, "status": "accepted" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let member_url = url_for(token.clone()).await;
    assert!(member_url.contains("grant=u."), "{member_url}");
    let (status, _, _) = fetch(&member_url).await;
    assert_eq!(status, 200);
    let (status, body) = t
        .call(
            "DELETE",
            &format!("/api/team?projectId={}&userId={user_id}", f.project),
            Some(&f.token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let msg = denied(member_url).await;
    assert!(msg.contains("left the project"), "{msg}");
    t.stop().await;
}
