//! Storage throughput on the local backend: uploads (`POST /api/storage/upload`, multipart,
//! streamed from a file) and signed downloads (`GET` of the URL from `/api/storage/url`,
//! streamed into a file), for 1 MiB and 100 MiB files, beside a plain file copy
//! (`std::fs::copy`) of the same files on the same disk, in the same run. It prints MiB/s for
//! each and the ratio to the copy; the target is at least 0.7×.
//!
//! It starts the release `fluxbase` binary on a fresh data directory under `target/`
//! (embedded cluster, rate limit off). Environment: BENCH_SMALL_FILES (default 64),
//! BENCH_LARGE_FILES (default 4).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;
const TARGET: f64 = 0.7;
/// Bytes per read of the uploaded file.
const UPLOAD_CHUNK: usize = 1024 * 1024;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
    // Plain reads on the blocking pool straight into each chunk (tokio's `File` would read
    // into its own buffer and copy), 1 MiB at a time.
    let file = futures_util::stream::unfold(None, move |file: Option<std::fs::File>| {
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
    });
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

struct Run {
    label: String,
    size: u64,
    count: u64,
    copy: f64,
    upload: f64,
    download: f64,
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
    let binary = root.join("target/release/fluxbase");
    if !binary.exists() {
        bail!("build the server first: cargo build --release --bin fluxbase");
    }
    let dir = root.join("target/bench-storage");
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(&scratch)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let envs = [
        ("FLUXBASE_DATA_DIR", data.display().to_string()),
        ("FLUXBASE_LISTEN", format!("127.0.0.1:{port}")),
        ("FLUXBASE_RATE_LIMIT_REQUESTS", "0".into()),
        ("FLUXBASE_MAX_UPLOAD_BYTES", (200 * MIB).to_string()),
        ("FLUXBASE_LOG", "warn".into()),
    ];
    let init = fluxbase_bench::init_instance(&binary, &data, &envs)?;
    let project = init["project"]["id"]
        .as_str()
        .context("project")?
        .to_string();
    let admin = init["apiKeys"]["admin"]
        .as_str()
        .context("admin key")?
        .to_string();
    let _server = Server(
        Command::new(&binary)
            .arg("serve")
            .envs(envs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let server_pid = _server.0.id().to_string();
    let cpu_now = || (cpu_seconds(&server_pid), cpu_seconds("self"));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{base}/health")).send().await.is_err() {
        if Instant::now() > deadline {
            bail!("server did not start");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
        ("1 MiB", MIB, env_or("BENCH_SMALL_FILES", 64)),
        ("100 MiB", 100 * MIB, env_or("BENCH_LARGE_FILES", 4)),
    ] {
        let source = scratch.join(format!("source-{size}"));
        make_source(&source, size)?;
        // Warm the page cache for every contender alike.
        std::fs::read(&source)?;

        let started = Instant::now();
        for i in 0..count {
            std::fs::copy(&source, scratch.join(format!("copy-{size}-{i}")))?;
        }
        let copy = mib_per_s(size * count, started.elapsed());

        let mut keys = Vec::new();
        let cpu = cpu_now();
        let started = Instant::now();
        for i in 0..count {
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
            keys.push(v["file"]["s3_key"].as_str().context("s3_key")?.to_string());
        }
        let upload = mib_per_s(size * count, started.elapsed());
        let upload_cpu = cpu_since(&server_pid, cpu);

        let cpu = cpu_now();
        let started = Instant::now();
        for (i, key) in keys.iter().enumerate() {
            let signed: Value = http
                .get(format!("{base}/api/storage/url"))
                .query(&[("s3Key", key.as_str()), ("projectId", &project)])
                .bearer_auth(&admin)
                .send()
                .await?
                .json()
                .await?;
            let url = signed["url"].as_str().context("url")?;
            let mut resp = http.get(url).send().await?;
            if resp.status() != 200 {
                bail!("download failed: {}", resp.status());
            }
            // Page-cache writes, as `std::fs::copy` makes them.
            let mut out = std::fs::File::create(scratch.join(format!("down-{size}-{i}")))?;
            let mut got = 0u64;
            while let Some(chunk) = resp.chunk().await? {
                got += chunk.len() as u64;
                std::io::Write::write_all(&mut out, &chunk)?;
            }
            if got != size {
                bail!("downloaded {got} bytes of {size}");
            }
        }
        let download = mib_per_s(size * count, started.elapsed());
        let download_cpu = cpu_since(&server_pid, cpu);
        runs.push(Run {
            label: label.into(),
            size,
            count,
            copy,
            upload,
            download,
            upload_cpu,
            download_cpu,
        });
        for e in std::fs::read_dir(&scratch)?.flatten() {
            let _ = std::fs::remove_file(e.path());
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
    let mut worst = f64::INFINITY;
    for r in &runs {
        let (up, down) = (r.upload / r.copy, r.download / r.copy);
        worst = worst.min(up).min(down);
        println!(
            "{:>8} x {:<3}: copy {:>8.1} | upload {:>8.1} ({:.2}x) | signed download {:>8.1} ({:.2}x)",
            r.label, r.count, r.copy, r.upload, up, r.download, down
        );
        let per_file = |(server, client): (f64, f64)| {
            format!(
                "server {:.2} ms, client {:.2} ms",
                server * 1e3 / r.count as f64,
                client * 1e3 / r.count as f64
            )
        };
        println!(
            "{:>14} CPU per file: upload {} | download {}",
            "",
            per_file(r.upload_cpu),
            per_file(r.download_cpu)
        );
        let _ = r.size;
    }
    println!("worst ratio     : {worst:.2}x plain copy (target >= {TARGET:.2}x)");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
