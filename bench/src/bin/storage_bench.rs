//! Storage throughput on the local backend: uploads (`POST /api/storage/upload`, multipart,
//! streamed from a file) and signed downloads (`GET` of the URL from `/api/storage/url`,
//! streamed into a file), for 1 MiB and 100 MiB files, beside a plain file copy
//! (`std::fs::copy`) of the same files on the same disk, in the same run. It prints MiB/s for
//! each and the ratio to the copy; the target is at least 0.7×.
//!
//! Beside them it measures a bare-HTTP ceiling in the same run: a warp server in this process
//! that stores a `PUT` body as a file and serves a file back, with the same 1 MiB reads and
//! writes on the blocking pool as Fluxbase's local backend, but no multipart parsing, metadata,
//! auth or staging. Its ratio is what any HTTP upload or download over loopback reaches here;
//! the gap between it and Fluxbase is Fluxbase's own cost.
//!
//! And a durable copy: the same plain copy, then `fdatasync` of the new file and `fsync` of its
//! directory, which is what an upload must at least do before it answers (Fluxbase's uploads
//! are on the disk when they are reported stored). Its ratio is the most any durable store
//! reaches on this disk, with no HTTP at all.
//!
//! It starts the release `fluxbase` binary on a fresh data directory under `target/`
//! (embedded cluster, rate limit off). Environment: BENCH_SMALL_FILES (default 64),
//! BENCH_LARGE_FILES (default 4).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;
const TARGET: f64 = 0.7;
/// Bytes per read of the uploaded file.
const UPLOAD_CHUNK: usize = 1024 * 1024;

/// A file of `size` pseudo-random bytes.
fn make_source(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = left.min(MIB) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// The file at `path` read in 1 MiB chunks: plain reads on the blocking pool straight into each
/// chunk (tokio's `File` would read into its own buffer and copy).
fn file_stream(
    path: PathBuf,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(None, move |file: Option<std::fs::File>| {
        let path = path.clone();
        async move {
            let read = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut file = match file {
                    Some(f) => f,
                    None => std::fs::File::open(&path)?,
                };
                // Not zeroed first: `read_to_end` reads into the spare capacity.
                let mut buf = Vec::with_capacity(UPLOAD_CHUNK);
                (&mut file)
                    .take(UPLOAD_CHUNK as u64)
                    .read_to_end(&mut buf)?;
                Ok::<_, std::io::Error>((file, buf))
            })
            .await
            .map_err(std::io::Error::other);
            match read {
                Ok(Ok((_, buf))) if buf.is_empty() => None,
                Ok(Ok((file, buf))) => Some((Ok(Bytes::from(buf)), Some(file))),
                Ok(Err(e)) | Err(e) => Some((Err(e), None)),
            }
        }
    })
}

/// The multipart body: fields, then the file read from disk in 1 MiB chunks.
fn multipart(path: PathBuf, name: &str, project: &str) -> (String, reqwest::Body) {
    let boundary = format!("----bench{}", fluxbase::secrets::random_hex::<8>());
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"projectId\"\r\n\r\n{project}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"bucketId\"\r\n\r\nbench\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let file = file_stream(path);
    let stream = futures_util::StreamExt::chain(
        futures_util::StreamExt::chain(
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) }),
            file,
        ),
        futures_util::stream::once(async move { Ok(Bytes::from(tail)) }),
    );
    (
        format!("multipart/form-data; boundary={boundary}"),
        reqwest::Body::wrap_stream(stream),
    )
}

/// The bare-HTTP reference server (see the module docs): `PUT /<name>` stores the body as a
/// file in `dir`, `GET /<name>` serves it. Its base URL.
async fn start_bare(dir: PathBuf) -> Result<String> {
    use warp::Filter;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    fluxbase::app::no_delay(&listener)?;
    let base = format!("http://{}", listener.local_addr()?);
    let put_dir = dir.clone();
    let put = warp::put()
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::body::stream())
        .then(move |name: String, body| bare_store(put_dir.join(name), body));
    let get = warp::get()
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .then(move |name: String| bare_serve(dir.join(name)));
    tokio::spawn(warp::serve(put.or(get)).incoming(listener).run());
    Ok(base)
}

/// Writes `buf` at the end of `file` on the blocking pool; both back, `buf` emptied.
async fn write_chunk(
    mut file: std::fs::File,
    mut buf: Vec<u8>,
) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        std::io::Write::write_all(&mut file, &buf)?;
        buf.clear();
        Ok((file, buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Stores a request body in 1 MiB writes (as Fluxbase's local backend writes its parts).
async fn bare_store<S, B>(path: PathBuf, body: S) -> warp::reply::Response
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send,
    B: bytes::Buf,
{
    use futures_util::StreamExt;
    use warp::Reply;
    let stored = async {
        let mut file = tokio::task::spawn_blocking(move || std::fs::File::create(path)).await??;
        let mut buf = Vec::with_capacity(UPLOAD_CHUNK);
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk?;
            while chunk.has_remaining() {
                let n = chunk.chunk().len();
                buf.extend_from_slice(chunk.chunk());
                chunk.advance(n);
            }
            if buf.len() >= UPLOAD_CHUNK {
                (file, buf) = write_chunk(file, buf).await?;
            }
        }
        write_chunk(file, buf).await?;
        anyhow::Ok(())
    };
    let status = match stored.await {
        Ok(()) => warp::http::StatusCode::CREATED,
        Err(_) => warp::http::StatusCode::INTERNAL_SERVER_ERROR,
    };
    warp::reply::with_status(warp::reply(), status).into_response()
}

/// Serves a file in 1 MiB reads on the blocking pool (as Fluxbase's local backend reads).
async fn bare_serve(path: PathBuf) -> warp::reply::Response {
    use warp::Reply;
    let size = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(_) => return warp::http::StatusCode::NOT_FOUND.into_response(),
    };
    let body = fluxbase::api::storage::response_body(file_stream(path));
    let mut response = warp::reply::stream(body).into_response();
    response
        .headers_mut()
        .insert("content-length", size.to_string().parse().expect("digits"));
    response
}

/// Streams a response body into a new file (page-cache writes, as `std::fs::copy` makes them);
/// fails unless it is `size` bytes.
async fn save(mut resp: reqwest::Response, path: &Path, size: u64) -> Result<()> {
    if resp.status() != 200 {
        bail!("download failed: {}", resp.status());
    }
    let mut out = std::fs::File::create(path)?;
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        got += chunk.len() as u64;
        std::io::Write::write_all(&mut out, &chunk)?;
    }
    if got != size {
        bail!("downloaded {got} bytes of {size}");
    }
    Ok(())
}

/// Time spent by each contender on one file size.
#[derive(Default)]
struct Times {
    copy: Duration,
    durable_copy: Duration,
    upload: Duration,
    download: Duration,
    bare_upload: Duration,
    bare_download: Duration,
}

fn add(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 + b.0, a.1 + b.1)
}

struct Run {
    label: String,
    count: u64,
    copy: f64,
    durable_copy: f64,
    upload: f64,
    download: f64,
    /// The bare-HTTP reference's upload and download.
    bare: (f64, f64),
    /// CPU seconds (server, this client) per phase: upload, download.
    upload_cpu: (f64, f64),
    download_cpu: (f64, f64),
}

/// CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat (Linux;
/// 0 elsewhere). Shown beside the rates, which move with whatever else the machine runs.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let Some(end) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[end + 1..].split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 on every Linux build that matters.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// CPU seconds of (the server, this client) since `since`.
fn cpu_since(server: &str, since: (f64, f64)) -> (f64, f64) {
    (cpu_seconds(server) - since.0, cpu_seconds("self") - since.1)
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<()> {
    let root = fluxbase_bench::repo_root()?;
    let binary = fluxbase_bench::server_binary()?;
    let dir = root.join("target/bench-storage");
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let bare_dir = dir.join("bare");
    std::fs::create_dir_all(&bare_dir)?;
    let bare_base = start_bare(bare_dir.clone()).await?;
    let server = fluxbase_bench::ServerProcess::start(
        &binary,
        &data,
        &[("FLUXBASE_MAX_UPLOAD_BYTES", (200 * MIB).to_string())],
    )
    .await?;
    let base = server.base();
    let project = server.init_str("/project/id")?;
    let admin = server.init_str("/apiKeys/admin")?;
    let server_pid = server.pid.to_string();
    let cpu_now = || (cpu_seconds(&server_pid), cpu_seconds("self"));
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/api/storage/buckets"))
        .bearer_auth(&admin)
        .json(&json!({ "projectId": project, "name": "bench" }))
        .send()
        .await?;
    if resp.status() != 201 {
        bail!("creating the bucket: {}", resp.text().await?);
    }

    let mut runs = Vec::new();
    for (label, size, count) in [
        (
            "1 MiB",
            MIB,
            fluxbase_bench::env_or("BENCH_SMALL_FILES", 64),
        ),
        (
            "100 MiB",
            100 * MIB,
            fluxbase_bench::env_or("BENCH_LARGE_FILES", 4),
        ),
    ] {
        let source = scratch.join(format!("source-{size}"));
        make_source(&source, size)?;
        // Every contender starts from the same state: the source in the page cache, nothing
        // dirty waiting for writeback.
        std::fs::read(&source)?;
        Command::new("sync").status()?;

        // Rounds: each contender moves file `i` in turn, so that writeback of what was written
        // before weighs on all of them alike (in phases, whoever comes last pays for the rest).
        let mut t = Times::default();
        let (mut upload_cpu, mut download_cpu) = ((0.0, 0.0), (0.0, 0.0));
        for i in 0..count {
            let started = Instant::now();
            std::fs::copy(&source, scratch.join(format!("copy-{size}-{i}")))?;
            t.copy += started.elapsed();

            let started = Instant::now();
            let synced = scratch.join(format!("synced-{size}-{i}"));
            std::fs::copy(&source, &synced)?;
            std::fs::File::open(&synced)?.sync_data()?;
            std::fs::File::open(&scratch)?.sync_all()?;
            t.durable_copy += started.elapsed();

            let cpu = cpu_now();
            let started = Instant::now();
            let (ct, body) = multipart(source.clone(), &format!("f-{size}-{i}.bin"), &project);
            let resp = http
                .post(format!("{base}/api/storage/upload"))
                .bearer_auth(&admin)
                .header("content-type", ct)
                .body(body)
                .send()
                .await?;
            let status = resp.status();
            let v: Value = resp.json().await?;
            if status != 201 {
                bail!("upload failed: {v}");
            }
            t.upload += started.elapsed();
            upload_cpu = add(upload_cpu, cpu_since(&server_pid, cpu));
            let key = v["file"]["s3_key"].as_str().context("s3_key")?;

            let cpu = cpu_now();
            let started = Instant::now();
            let signed: Value = http
                .get(format!("{base}/api/storage/url"))
                .query(&[("s3Key", key), ("projectId", &project)])
                .bearer_auth(&admin)
                .send()
                .await?
                .json()
                .await?;
            let url = signed["url"].as_str().context("url")?;
            let resp = http.get(url).send().await?;
            save(resp, &scratch.join(format!("down-{size}-{i}")), size).await?;
            t.download += started.elapsed();
            download_cpu = add(download_cpu, cpu_since(&server_pid, cpu));

            let started = Instant::now();
            let resp = http
                .put(format!("{bare_base}/bare-{size}-{i}"))
                .body(reqwest::Body::wrap_stream(file_stream(source.clone())))
                .send()
                .await?;
            if resp.status() != 201 {
                bail!("bare upload failed: {}", resp.status());
            }
            t.bare_upload += started.elapsed();

            let started = Instant::now();
            let resp = http
                .get(format!("{bare_base}/bare-{size}-{i}"))
                .send()
                .await?;
            save(resp, &scratch.join(format!("bare-down-{size}-{i}")), size).await?;
            t.bare_download += started.elapsed();
        }
        let rate = |d: Duration| mib_per_s(size * count, d);
        runs.push(Run {
            label: label.into(),
            count,
            copy: rate(t.copy),
            durable_copy: rate(t.durable_copy),
            upload: rate(t.upload),
            download: rate(t.download),
            bare: (rate(t.bare_upload), rate(t.bare_download)),
            upload_cpu,
            download_cpu,
        });
        for d in [&scratch, &bare_dir] {
            for e in std::fs::read_dir(d)?.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "storage benchmark (local backend, same disk; MiB/s; load average {})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (mut worst, mut ceiling, mut durable) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for r in &runs {
        let (up, down) = (r.upload / r.copy, r.download / r.copy);
        worst = worst.min(up).min(down);
        let (bare_up, bare_down) = (r.bare.0 / r.copy, r.bare.1 / r.copy);
        ceiling = ceiling.min(bare_up).min(bare_down);
        durable = durable.min(r.durable_copy / r.copy);
        println!(
            "{:>8} x {:<3}: copy {:>8.1} | upload {:>8.1} ({:.2}x) | signed download {:>8.1} ({:.2}x)",
            r.label, r.count, r.copy, r.upload, up, r.download, down
        );
        println!(
            "{:>14} bare HTTP       | upload {:>8.1} ({:.2}x) | download        {:>8.1} ({:.2}x)",
            "", r.bare.0, bare_up, r.bare.1, bare_down
        );
        let per_file = |(server, client): (f64, f64)| {
            format!(
                "server {:.2} ms, client {:.2} ms",
                server * 1e3 / r.count as f64,
                client * 1e3 / r.count as f64
            )
        };
        println!(
            "{:>14} copy + fsync    | {:>8.1} ({:.2}x)",
            "",
            r.durable_copy,
            r.durable_copy / r.copy
        );
        println!(
            "{:>14} CPU per file: upload {} | download {}",
            "",
            per_file(r.upload_cpu),
            per_file(r.download_cpu)
        );
    }
    println!("worst ratio     : {worst:.2}x plain copy (target >= {TARGET:.2}x)");
    println!(
        "bare HTTP       : {ceiling:.2}x plain copy at worst: what an upload or download over \
         loopback HTTP reaches here without multipart, metadata or auth"
    );
    println!(
        "copy + fsync    : {durable:.2}x plain copy at worst: the most an upload that is on the \
         disk when it is answered can reach here, with no HTTP at all"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
