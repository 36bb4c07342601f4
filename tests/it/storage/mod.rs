//! Storage v2 end to end: buckets, streamed multipart uploads, pre-signed URLs, deletes, on the
//! local backend and on S3. The S3 backend runs against a real S3-protocol server started here
//! (`s3s-fs` on a loopback port, with SigV4 authentication, header and pre-signed query forms),
//! and every download URL is fetched with a plain HTTP client.
//!
//! The helpers that several files here use (the S3 server, uploads, buckets, listings, fetches)
//! live in this file; each file holds one part of the store's contract.

mod buckets;
mod download;
mod flow;
mod folders;
mod lifecycle;
mod names;
mod upload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::support::fixtures::{project, Project};
use crate::support::fs::mode_of;
use crate::support::multipart::Form;
use crate::support::process::ServerProcess;
use crate::support::{scratch_dir, spawn_app, spawn_app_with, unique, Fixture, TestApp};

const S3_KEY_ID: &str = "AKIAFLUXBASETEST";
const S3_SECRET: &str = "fluxbase-test-secret-key";
const S3_BUCKET: &str = "fluxbase-objects";

/// An S3-protocol server (s3s-fs) serving a directory; stoppable and restartable on its port.
struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl S3Server {
    async fn start() -> S3Server {
        let root = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("s3")));
        std::fs::create_dir_all(root.join(S3_BUCKET)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = S3Server {
            addr,
            root,
            task: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let fs = s3s_fs::FileSystem::new(&self.root).unwrap();
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(S3_KEY_ID, S3_SECRET));
        let service = builder.build();
        self.task = Some(tokio::spawn(async move {
            // Connections live in the set: aborting the server aborts them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                connections.spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        }));
    }

    /// Stops answering (every open connection is cut).
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(S3_BUCKET).join(key)
    }

    async fn spawn_app(&self) -> TestApp {
        self.spawn_app_with(|_| {}).await
    }

    /// The server on this S3 backend with its configuration changed by `tweak`.
    async fn spawn_app_with(&self, tweak: impl FnOnce(&mut fluxbase::config::Config)) -> TestApp {
        let endpoint = format!("http://{}", self.addr);
        spawn_app_with(|c| {
            c.storage = "s3".into();
            c.s3_bucket = Some(S3_BUCKET.into());
            c.s3_endpoint = Some(endpoint);
            c.s3_region = Some("us-east-1".into());
            c.s3_access_key_id = Some(S3_KEY_ID.into());
            c.s3_secret_access_key = Some(S3_SECRET.into());
            tweak(c);
        })
        .await
    }
}

impl Drop for S3Server {
    /// Stops answering even if the test ends before `stop()` (its runtime may outlive it).
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn send_upload(
    t: &TestApp,
    token: &str,
    query: &str,
    form: &Form,
    body: reqwest::Body,
) -> (u16, Value) {
    let resp = t
        .http
        .post(t.url(&format!("/api/storage/upload{query}")))
        .bearer_auth(token)
        .header("content-type", form.content_type())
        .body(body)
        .send()
        .await
        .expect("upload request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// Uploads `data` as `filename` with the guide's field order (file first).
#[allow(clippy::too_many_arguments)] // one argument per form field reads best at call sites
pub(crate) async fn upload(
    t: &TestApp,
    token: &str,
    project: &str,
    bucket: &str,
    filename: &str,
    content_type: &str,
    data: &[u8],
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let mut after = vec![("bucketId", bucket), ("projectId", project)];
    after.extend_from_slice(extra);
    let form = Form::new(&[], Some((filename, content_type)), &after);
    let body = form.with_bytes(data);
    send_upload(t, token, "", &form, body.into()).await
}

pub(crate) async fn create_bucket(t: &TestApp, f: &Fixture, name: &str, extra: Value) -> Value {
    let mut body = json!({ "projectId": f.project, "name": name });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (status, body) = t
        .call("POST", "/api/storage/buckets", Some(&f.admin), Some(body))
        .await;
    assert_eq!(status, 201, "{body}");
    body["bucket"].clone()
}

async fn list_files(t: &TestApp, token: &str, project: &str, bucket: &str) -> Vec<Value> {
    let (status, body) = t
        .call(
            "GET",
            &format!("/api/storage/files?bucketId={bucket}&projectId={project}"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["files"].as_array().unwrap().clone()
}

async fn signed_url(t: &TestApp, token: &str, project: &str, key: &str) -> (u16, Value) {
    let q = serde_urlencoded::to_string([("s3Key", key), ("projectId", project)]).unwrap();
    t.call("GET", &format!("/api/storage/url?{q}"), Some(token), None)
        .await
}

async fn fetch(url: &str) -> (u16, reqwest::header::HeaderMap, Bytes) {
    let resp = reqwest::get(url).await.expect("fetching a download URL");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect()
}

/// Every regular file under `dir` (relative paths), skipping nothing.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)]).unwrap()[2..].to_string()
}

async fn download(t: &TestApp, f: &Fixture, key: &str) -> (u16, Bytes) {
    let (status, signed) = signed_url(t, &f.read, &f.project, key).await;
    assert_eq!(status, 200, "{signed}");
    let (status, _, bytes) = fetch(signed["url"].as_str().unwrap()).await;
    (status, bytes)
}
