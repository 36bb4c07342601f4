//! Storage throughput on the local backend: uploads (`POST /api/storage/upload`, multipart,
//! streamed from a file) and signed downloads (`GET` of the URL from `/api/storage/url`,
//! streamed into a file), for 1 MiB and 100 MiB files, beside a bare-HTTP reference in the same
//! run. The ratios to the reference are the targets: 100 MiB files ≥ 0.9× (upload and
//! download), 1 MiB uploads ≥ 0.8×, 1 MiB downloads ≥ 0.9×.
//!
//! The bare-HTTP reference is this program started again as a child process (`--bare-server`,
//! so that its CPU is its own): a warp server that stores a `PUT` body as a file and serves a
//! file back, with the same 1 MiB reads and writes on the blocking pool as Fluxbase's local
//! backend (each write handed to the kernel's writeback at once, as Fluxbase does), but no
//! multipart parsing, metadata, auth or staging. Its uploads are durable like Fluxbase's: the
//! file is `fdatasync`ed and its directory `fsync`ed before it answers. The gap between it and
//! Fluxbase is Fluxbase's own cost.
//!
//! Beside them, two copies with no HTTP at all: a plain `std::fs::copy` of the same file on the
//! same disk, and a durable copy (the copy, then `fdatasync` of the new file and `fsync` of its
//! directory: the least an upload must do before it answers).
//!
//! Every contender moves one file untimed first (warm-up). Then BENCH_ROUNDS rounds (default 3):
//! in a round the contenders take turns file by file (so that the writeback of what one wrote
//! weighs on all alike), in an order reversed every round; after each round its files are
//! deleted and a `sync` runs, untimed. Each MiB/s figure is the median of the rounds'; the
//! ratio judged is, file by file, the reference's time over Fluxbase's for the same file number
//! (the two moved it one right after the other), the median over every file of every round:
//! a file that waited for another process's writeback or for a core moves one pair, where a
//! round's total (also printed, per round) moves with its slowest files. CPU per file per
//! process comes from each thread's `/proc/<pid>/task/<tid>/schedstat` (nanoseconds).
//!
//! It starts the release `fluxbase` binary on a fresh data directory under `target/`
//! (embedded cluster, rate limit off). Environment: BENCH_SMALL_FILES (default 64),
//! BENCH_LARGE_FILES (default 4), BENCH_ROUNDS (default 3); BENCH_STEPS (set: where each
//! small upload's time goes: the bare reference prints its steps on stderr, the server logs its
//! own at debug level in `<data>/server.log`, "upload steps").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;
/// The argument that makes this program the bare-HTTP reference server.
const BARE_ARG: &str = "--bare-server";
/// Fluxbase over the bare-HTTP reference: (upload, download) for 1 MiB and for 100 MiB files.
const TARGET_SMALL: (f64, f64) = (0.8, 0.9);
const TARGET_LARGE: (f64, f64) = (0.9, 0.9);
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

/// The multipart body: fields, then the file read from disk in 1 MiB chunks; its content type
/// and length (declared, as curl and browsers declare a form's).
fn multipart(path: PathBuf, name: &str, project: &str) -> (String, u64, reqwest::Body) {
    let boundary = format!("----bench{}", fluxbase::secrets::random_hex::<8>());
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"projectId\"\r\n\r\n{project}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"bucketId\"\r\n\r\nbench\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let len =
        head.len() as u64 + std::fs::metadata(&path).map_or(0, |m| m.len()) + tail.len() as u64;
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
        len,
        reqwest::Body::wrap_stream(stream),
    )
}

/// The bare-HTTP reference server (see the module docs), run as a child process: `PUT /<name>`
/// stores the body as a file in `dir`, `GET /<name>` serves it. Prints its base URL on stdout
/// and exits when its stdin closes.
async fn bare_server(dir: PathBuf) -> Result<()> {
    use tokio::io::AsyncReadExt;
    use warp::Filter;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    fluxbase::app::no_delay(&listener)?;
    println!("http://{}", listener.local_addr()?);
    let put_dir = dir.clone();
    let put = warp::put()
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::body::stream())
        .then(move |name: String, body| bare_store(put_dir.clone(), name, body));
    let get = warp::get()
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .then(move |name: String| bare_serve(dir.join(name)));
    tokio::spawn(warp::serve(put.or(get)).incoming(listener).run());
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
    Ok(())
}

/// The bare-HTTP reference as a child process of the benchmark.
struct Bare {
    /// Killed when dropped.
    _child: tokio::process::Child,
    pid: String,
    base: String,
}

impl Bare {
    async fn start(dir: &Path) -> Result<Bare> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg(BARE_ARG)
            .arg(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the bare-HTTP reference")?;
        let stdout = child.stdout.take().context("stdout")?;
        let base = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::BufReader::new(stdout).lines().next_line(),
        )
        .await
        .context("the bare-HTTP reference did not start within 30 s")??
        .context("the bare-HTTP reference exited")?;
        Ok(Bare {
            pid: child.id().context("pid")?.to_string(),
            base,
            _child: child,
        })
    }
}

/// Writes `buf` at offset `at`, the end of `file`, on the blocking pool, and hands the range to
/// the kernel's writeback at once (as Fluxbase's local backend does, so that the final
/// `fdatasync` finds little left to write); both back, `buf` emptied.
async fn write_chunk(
    mut file: std::fs::File,
    mut buf: Vec<u8>,
    at: u64,
) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        std::io::Write::write_all(&mut file, &buf)?;
        let len = std::num::NonZeroU64::new(buf.len() as u64);
        let _ = rustix::fs::fadvise(&file, at, len, rustix::fs::Advice::DontNeed);
        buf.clear();
        Ok((file, buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Stores a request body as `dir/name` in 1 MiB writes (as Fluxbase's local backend writes its
/// parts), then makes it durable as Fluxbase does before it answers: `fdatasync` of the file,
/// `fsync` of its directory.
async fn bare_store<S, B>(dir: PathBuf, name: String, body: S) -> warp::reply::Response
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send,
    B: bytes::Buf,
{
    use futures_util::StreamExt;
    use warp::Reply;
    let started = Instant::now();
    let stored = async {
        let path = dir.join(name);
        let mut file = tokio::task::spawn_blocking(move || std::fs::File::create(path)).await??;
        let mut buf = Vec::with_capacity(UPLOAD_CHUNK);
        let mut at = 0;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk?;
            while chunk.has_remaining() {
                let n = chunk.chunk().len();
                buf.extend_from_slice(chunk.chunk());
                chunk.advance(n);
            }
            if buf.len() >= UPLOAD_CHUNK {
                let len = buf.len() as u64;
                (file, buf) = write_chunk(file, buf, at).await?;
                at += len;
            }
        }
        let received = started.elapsed();
        let (file, _) = write_chunk(file, buf, at).await?;
        let written = started.elapsed();
        let synced = tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            let synced = started.elapsed();
            std::fs::File::open(&dir)?.sync_all()?;
            std::io::Result::Ok(synced)
        })
        .await??;
        if std::env::var_os("BENCH_STEPS").is_some() && at + UPLOAD_CHUNK as u64 <= 2 << 20 {
            // Where the reference's time goes (µs from the handler's start), for
            // docs/benchmarks.md's breakdown beside Fluxbase's debug-level "upload steps".
            eprintln!(
                "[bare steps] received_us={} written_us={} synced_us={} total_us={}",
                received.as_micros(),
                written.as_micros(),
                synced.as_micros(),
                started.elapsed().as_micros()
            );
        }
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

/// What is timed, each on its own.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Fluxbase: the multipart upload, answered once durable.
    Upload,
    /// Fluxbase: `GET /api/storage/url` (the signed URL of the file just uploaded).
    Url,
    /// Fluxbase: the `GET` of the signed URL, streamed into a file.
    Download,
    BareUpload,
    BareDownload,
    Copy,
    DurableCopy,
}
const OPS: usize = 7;

/// Time and CPU seconds (Fluxbase, the bare reference, this client) of one op over a round,
/// and each file's time in turn order (file `i` of one contender beside file `i` of the other).
#[derive(Clone, Default)]
struct Tally {
    time: Duration,
    cpu: [f64; 3],
    each: Vec<Duration>,
}

type RoundTally = [Tally; OPS];

#[derive(Clone, Copy, Debug)]
enum Contender {
    Fluxbase,
    Bare,
    Copy,
    DurableCopy,
}
const CONTENDERS: [Contender; 4] = [
    Contender::Fluxbase,
    Contender::Bare,
    Contender::Copy,
    Contender::DurableCopy,
];

/// What every turn needs.
struct Ctx {
    http: reqwest::Client,
    base: String,
    admin: String,
    project: String,
    bare_base: String,
    scratch: PathBuf,
    bare_dir: PathBuf,
    source: PathBuf,
    size: u64,
    /// Fluxbase, the bare reference, this process.
    pids: [String; 3],
}

impl Ctx {
    fn cpu(&self) -> [std::collections::HashMap<u64, u64>; 3] {
        [
            cpu_threads(&self.pids[0]),
            cpu_threads(&self.pids[1]),
            cpu_threads(&self.pids[2]),
        ]
    }

    /// Runs `op` and adds its time and CPU to `tally`.
    async fn timed<T>(
        &self,
        tally: &mut RoundTally,
        op: Op,
        run: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let cpu = self.cpu();
        let started = Instant::now();
        let out = run.await.with_context(|| format!("{op:?}"))?;
        let t = &mut tally[op as usize];
        let took = started.elapsed();
        t.time += took;
        t.each.push(took);
        let now = self.cpu();
        for i in 0..3 {
            t.cpu[i] += cpu_between(&cpu[i], &now[i]);
        }
        Ok(out)
    }

    /// One contender moves file `tag` (Fluxbase and the reference: up, then down). Fluxbase's
    /// key is pushed on `keys` (deleted after the round).
    async fn turn(
        &self,
        contender: Contender,
        tag: &str,
        tally: &mut RoundTally,
        keys: &mut Vec<String>,
    ) -> Result<()> {
        let size = self.size;
        match contender {
            Contender::Fluxbase => {
                let key = self.timed(tally, Op::Upload, self.upload(tag)).await?;
                let url = self.timed(tally, Op::Url, self.signed_url(&key)).await?;
                keys.push(key);
                let down = self.scratch.join(format!("down-{tag}"));
                self.timed(tally, Op::Download, async {
                    save(self.http.get(&url).send().await?, &down, size).await
                })
                .await?;
            }
            Contender::Bare => {
                let url = format!("{}/bare-{tag}", self.bare_base);
                self.timed(tally, Op::BareUpload, async {
                    let body = reqwest::Body::wrap_stream(file_stream(self.source.clone()));
                    let resp = self.http.put(&url).body(body).send().await?;
                    if resp.status() != 201 {
                        bail!("bare upload failed: {}", resp.status());
                    }
                    anyhow::Ok(())
                })
                .await?;
                let down = self.scratch.join(format!("bare-down-{tag}"));
                self.timed(tally, Op::BareDownload, async {
                    save(self.http.get(&url).send().await?, &down, size).await
                })
                .await?;
            }
            Contender::Copy => {
                let to = self.scratch.join(format!("copy-{tag}"));
                self.timed(tally, Op::Copy, async {
                    std::fs::copy(&self.source, &to)?;
                    anyhow::Ok(())
                })
                .await?;
            }
            Contender::DurableCopy => {
                let to = self.scratch.join(format!("synced-{tag}"));
                self.timed(tally, Op::DurableCopy, async {
                    std::fs::copy(&self.source, &to)?;
                    std::fs::File::open(&to)?.sync_data()?;
                    std::fs::File::open(&self.scratch)?.sync_all()?;
                    anyhow::Ok(())
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Uploads the source as `f-<tag>.bin`; its key.
    async fn upload(&self, tag: &str) -> Result<String> {
        let (ct, len, body) =
            multipart(self.source.clone(), &format!("f-{tag}.bin"), &self.project);
        let resp = self
            .http
            .post(format!("{}/api/storage/upload", self.base))
            .bearer_auth(&self.admin)
            .header("content-type", ct)
            .header("content-length", len)
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if status != 201 {
            bail!("upload failed: {v}");
        }
        Ok(v["file"]["s3_key"].as_str().context("s3_key")?.to_string())
    }

    async fn signed_url(&self, key: &str) -> Result<String> {
        let signed: Value = self
            .http
            .get(format!("{}/api/storage/url", self.base))
            .query(&[("s3Key", key), ("projectId", &self.project)])
            .bearer_auth(&self.admin)
            .send()
            .await?
            .json()
            .await?;
        Ok(signed["url"].as_str().context("url")?.to_string())
    }

    /// Deletes what a round stored (Fluxbase's files through the API), then `sync`, so the
    /// next round starts with nothing dirty.
    async fn clean_up(&self, keys: Vec<String>) -> Result<()> {
        for key in keys {
            let resp = self
                .http
                .delete(format!("{}/api/storage/delete", self.base))
                .query(&[("s3Key", key.as_str()), ("projectId", &self.project)])
                .bearer_auth(&self.admin)
                .send()
                .await?;
            if !resp.status().is_success() {
                bail!("deleting {key}: {}", resp.text().await?);
            }
        }
        for d in [&self.scratch, &self.bare_dir] {
            for e in std::fs::read_dir(d)?.flatten() {
                if e.path() != self.source {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
        Command::new("sync").status()?;
        Ok(())
    }
}

/// Nanoseconds on a CPU so far of each thread of a process (`self`: this one), from
/// `/proc/<pid>/task/<tid>/schedstat` (its first field; `/proc/<pid>/stat` counts in 10 ms
/// ticks, as coarse as several 1 MiB round trips). Empty if unreadable.
fn cpu_threads(pid: &str) -> std::collections::HashMap<u64, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Some(ns) = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        {
            out.insert(tid, ns);
        }
    }
    out
}

/// CPU seconds a process spent between two [`cpu_threads`] readings: every thread's own
/// difference, a thread born since counted whole (one that ended since loses its share).
fn cpu_between(
    before: &std::collections::HashMap<u64, u64>,
    after: &std::collections::HashMap<u64, u64>,
) -> f64 {
    let ns: u64 = after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    ns as f64 * 1e-9
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One file size's rounds.
struct Run {
    label: &'static str,
    size: u64,
    count: u64,
    targets: (f64, f64),
    rounds: Vec<RoundTally>,
}

impl Run {
    /// Each round's MiB/s for `op`.
    fn rates(&self, op: Op) -> Vec<f64> {
        let bytes = (self.size * self.count) as f64 / MIB as f64;
        self.rounds
            .iter()
            .map(|r| bytes / r[op as usize].time.as_secs_f64().max(1e-9))
            .collect()
    }

    fn median(&self, op: Op) -> f64 {
        median(&self.rates(op))
    }

    /// Each round's `ours` over `theirs` (they took turns file by file in that round), and
    /// their median: the judged ratio, less at the mercy of a disk that others use too than
    /// the ratio of the medians.
    fn ratios(&self, ours: Op, theirs: Op) -> (Vec<f64>, f64) {
        let (a, b) = (self.rates(ours), self.rates(theirs));
        let each: Vec<f64> = a.iter().zip(&b).map(|(a, b)| a / b).collect();
        let m = median(&each);
        (each, m)
    }

    /// File by file, the reference's time over ours (the two moved file `i` one right after
    /// the other): for each round the median of its files, and the median over every file of
    /// every round, the judged ratio. A file that waited for someone else's writeback or a
    /// descheduled process moves one pair, not the figure (a round's total time is at the
    /// mercy of its slowest files).
    fn paired(&self, ours: Op, theirs: Op) -> (Vec<f64>, f64) {
        let mut all = Vec::new();
        let per_round = self
            .rounds
            .iter()
            .map(|r| {
                let pairs: Vec<f64> = r[ours as usize]
                    .each
                    .iter()
                    .zip(&r[theirs as usize].each)
                    .map(|(a, b)| b.as_secs_f64() / a.as_secs_f64().max(1e-9))
                    .collect();
                all.extend_from_slice(&pairs);
                median(&pairs)
            })
            .collect();
        (per_round, median(&all))
    }

    /// The median time of one file of `op` over every round, in milliseconds.
    fn median_ms(&self, op: Op) -> f64 {
        let all: Vec<f64> = self
            .rounds
            .iter()
            .flat_map(|r| r[op as usize].each.iter().map(|d| d.as_secs_f64() * 1e3))
            .collect();
        median(&all)
    }

    /// The median MiB/s of `a` then `b` one after the other, each round (a download with its
    /// URL request).
    fn median_of_both(&self, a: Op, b: Op) -> f64 {
        let bytes = (self.size * self.count) as f64 / MIB as f64;
        let rates: Vec<f64> = self
            .rounds
            .iter()
            .map(|r| bytes / (r[a as usize].time + r[b as usize].time).as_secs_f64())
            .collect();
        median(&rates)
    }

    /// Milliseconds of CPU per file of process `who` (0 Fluxbase, 1 bare, 2 client) in `op`,
    /// the mean over the rounds.
    fn cpu_ms(&self, op: Op, who: usize) -> f64 {
        let total: f64 = self.rounds.iter().map(|r| r[op as usize].cpu[who]).sum();
        total * 1e3 / (self.count * self.rounds.len() as u64) as f64
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(BARE_ARG) {
        let dir = args.get(2).context("--bare-server <dir>")?;
        return bare_server(PathBuf::from(dir)).await;
    }
    let load_before = loadavg();
    let root = fluxbase_bench::repo_root()?;
    let binary = fluxbase_bench::server_binary()?;
    let dir = root.join("target/bench-storage");
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let bare_dir = dir.join("bare");
    std::fs::create_dir_all(&bare_dir)?;
    let bare = Bare::start(&bare_dir).await?;
    let mut envs = vec![("FLUXBASE_MAX_UPLOAD_BYTES", (200 * MIB).to_string())];
    if std::env::var_os("BENCH_STEPS").is_some() {
        // The server's "upload steps" lines (debug level) in its log, <data>/server.log.
        envs.push((
            "FLUXBASE_LOG",
            "warn,fluxbase::storage::upload=debug".into(),
        ));
    }
    let server = fluxbase_bench::ServerProcess::start(&binary, &data, &envs).await?;
    let rounds = fluxbase_bench::env_or("BENCH_ROUNDS", 3).max(1);
    let mut ctx = Ctx {
        http: reqwest::Client::new(),
        base: server.base(),
        admin: server.init_str("/apiKeys/admin")?,
        project: server.init_str("/project/id")?,
        bare_base: bare.base.clone(),
        scratch: scratch.clone(),
        bare_dir,
        source: PathBuf::new(),
        size: 0,
        pids: [server.pid.to_string(), bare.pid.clone(), "self".into()],
    };
    let resp = ctx
        .http
        .post(format!("{}/api/storage/buckets", ctx.base))
        .bearer_auth(&ctx.admin)
        .json(&json!({ "projectId": ctx.project, "name": "bench" }))
        .send()
        .await?;
    if resp.status() != 201 {
        bail!("creating the bucket: {}", resp.text().await?);
    }

    let mut runs = Vec::new();
    for (label, size, count, targets) in [
        (
            "1 MiB",
            MIB,
            fluxbase_bench::env_or("BENCH_SMALL_FILES", 64).max(1),
            TARGET_SMALL,
        ),
        (
            "100 MiB",
            100 * MIB,
            fluxbase_bench::env_or("BENCH_LARGE_FILES", 4).max(1),
            TARGET_LARGE,
        ),
    ] {
        ctx.source = scratch.join(format!("source-{size}"));
        ctx.size = size;
        make_source(&ctx.source, size)?;
        // Every contender starts from the same state: the source in the page cache.
        std::fs::read(&ctx.source)?;
        eprintln!("[bench] {label}: warm-up, one file each");
        let (mut warm, mut keys) = (RoundTally::default(), Vec::new());
        for c in CONTENDERS {
            ctx.turn(c, &format!("warm-{size}"), &mut warm, &mut keys)
                .await?;
        }
        ctx.clean_up(keys).await?;
        let mut run = Run {
            label,
            size,
            count,
            targets,
            rounds: Vec::new(),
        };
        for round in 0..rounds {
            let mut order = CONTENDERS;
            if round % 2 == 1 {
                order.reverse();
            }
            eprintln!(
                "[bench] {label}: round {}/{rounds}, {count} files, order {order:?}",
                round + 1
            );
            let (mut tally, mut keys) = (RoundTally::default(), Vec::new());
            for i in 0..count {
                for c in order {
                    ctx.turn(c, &format!("{size}-{round}-{i}"), &mut tally, &mut keys)
                        .await?;
                }
            }
            ctx.clean_up(keys).await?;
            run.rounds.push(tally);
        }
        runs.push(run);
    }
    print(&runs, rounds, &load_before);
    drop(server);
    drop(bare);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn check(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

fn print(runs: &[Run], rounds: u64, load_before: &str) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "storage benchmark: local backend, same disk, {cpus} CPUs shared by the server, the \
         bare reference, the client and whatever else runs; MiB/s, median of {rounds} rounds \
         (the order reversed every round); load average before {load_before}, after {}",
        loadavg()
    );
    let rounds_of = |run: &Run, op: Op| {
        run.rates(op)
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for r in runs {
        let line = |what: &str, ours: Op, theirs: Op, target: f64| {
            let (a, b) = (r.median(ours), r.median(theirs));
            let fmt = |v: Vec<f64>| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let (each, ratio) = r.paired(ours, theirs);
            let (totals, total_ratio) = r.ratios(ours, theirs);
            println!(
                "{:>8} x {:<3} {what:<9}: Fluxbase {a:>8.1} | bare HTTP {b:>8.1} | {ratio:.2}x \
                 (target >= {target:.1} {}) | per round {} | median file {:.2} ms vs {:.2} | \
                 by round totals {total_ratio:.2}x ({}) | MiB/s per round {} vs {}",
                r.label,
                r.count,
                check(ratio >= target),
                fmt(each),
                r.median_ms(ours),
                r.median_ms(theirs),
                fmt(totals),
                rounds_of(r, ours),
                rounds_of(r, theirs)
            );
        };
        line("upload", Op::Upload, Op::BareUpload, r.targets.0);
        line("download", Op::Download, Op::BareDownload, r.targets.1);
        let with_url = r.median_of_both(Op::Url, Op::Download);
        println!(
            "{:>14} download with its GET /api/storage/url first: {with_url:.1} ({:.2}x bare; \
             {:.2} ms per URL request)",
            "",
            with_url / r.median(Op::BareDownload),
            r.rounds
                .iter()
                .map(|t| t[Op::Url as usize].time.as_secs_f64())
                .sum::<f64>()
                * 1e3
                / (r.count * r.rounds.len() as u64) as f64
        );
        let copy = r.median(Op::Copy);
        let durable = r.median(Op::DurableCopy);
        println!(
            "{:>14} no HTTP: copy {copy:.1}, copy + fdatasync + directory fsync {durable:.1} \
             (Fluxbase upload {:.2}x, download {:.2}x the copy)",
            "",
            r.median(Op::Upload) / copy,
            r.median(Op::Download) / copy
        );
        println!(
            "{:>14} CPU ms per file: upload Fluxbase {:.2} + client {:.2}, bare {:.2} + client \
             {:.2} | download Fluxbase {:.2} + client {:.2} (URL request {:.2} + {:.2}), bare \
             {:.2} + client {:.2}",
            "",
            r.cpu_ms(Op::Upload, 0),
            r.cpu_ms(Op::Upload, 2),
            r.cpu_ms(Op::BareUpload, 1),
            r.cpu_ms(Op::BareUpload, 2),
            r.cpu_ms(Op::Download, 0),
            r.cpu_ms(Op::Download, 2),
            r.cpu_ms(Op::Url, 0),
            r.cpu_ms(Op::Url, 2),
            r.cpu_ms(Op::BareDownload, 1),
            r.cpu_ms(Op::BareDownload, 2),
        );
    }
    println!(
        "bare HTTP: a warp server in a child process, PUT stored in 1 MiB writes each handed to \
         the kernel's writeback, then fdatasync + directory fsync (durable before it answers, \
         like Fluxbase's uploads), GET served in 1 MiB reads; no multipart, metadata or auth. \
         Fluxbase's download is the GET of the signed URL; the line under it adds the request \
         that signs it. The ratio judged is the median over every file of every round of the \
         reference's time over Fluxbase's for the same file number (the contenders took turns \
         file by file), with each round's median beside it; 'by round totals' is the median of \
         each round's ratio of total times, which one slow file can move; the MiB/s are the \
         medians of the rounds. CPU: each thread's schedstat (ns)."
    );
}
