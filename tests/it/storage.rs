//! Storage v2 end to end: buckets, streamed multipart uploads, pre-signed URLs, deletes, on the
//! local backend and on S3. The S3 backend runs against a real S3-protocol server started here
//! (`s3s-fs` on a loopback port, with SigV4 authentication, header and pre-signed query forms),
//! and every download URL is fetched with a plain HTTP client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

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
        let endpoint = format!("http://{}", self.addr);
        spawn_app_with(|c| {
            c.storage = "s3".into();
            c.s3_bucket = Some(S3_BUCKET.into());
            c.s3_endpoint = Some(endpoint);
            c.s3_region = Some("us-east-1".into());
            c.s3_access_key_id = Some(S3_KEY_ID.into());
            c.s3_secret_access_key = Some(S3_SECRET.into());
        })
        .await
    }
}

/// A multipart/form-data body built by hand, so tests choose the field order and can stream.
struct Form {
    boundary: String,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Form {
    /// `before` fields, then the file part (if any), then `after` fields.
    fn new(before: &[(&str, &str)], file: Option<(&str, &str)>, after: &[(&str, &str)]) -> Form {
        let boundary = format!("----fluxbase{}", unique("b"));
        let text = |out: &mut Vec<u8>, fields: &[(&str, &str)]| {
            for (k, v) in fields {
                out.extend_from_slice(
                    format!(
                        "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                    )
                    .as_bytes(),
                );
            }
        };
        let mut head = Vec::new();
        text(&mut head, before);
        let mut tail = Vec::new();
        if let Some((filename, content_type)) = file {
            head.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
                )
                .as_bytes(),
            );
            tail.extend_from_slice(b"\r\n");
        }
        text(&mut tail, after);
        tail.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        Form {
            boundary,
            head,
            tail,
        }
    }

    fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    fn with_bytes(&self, data: &[u8]) -> Vec<u8> {
        [self.head.as_slice(), data, self.tail.as_slice()].concat()
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
async fn upload(
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

async fn create_bucket(t: &TestApp, f: &Fixture, name: &str, extra: Value) -> Value {
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

async fn metrics_text(t: &TestApp) -> String {
    let resp = t.http.get(t.url("/metrics")).send().await.unwrap();
    resp.text().await.unwrap()
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

/// Upload, list, sign, fetch, delete: the same on both backends.
async fn full_flow(t: &TestApp, object_on_backend: impl Fn(&str) -> Option<Vec<u8>>) {
    let f = t.fixture().await;
    let bucket = create_bucket(t, &f, "profile-photos", json!({})).await;
    assert_eq!(bucket["isPublic"], false);
    let data = pattern(300_000, 7);
    let (status, body) = upload(
        t,
        &f.readwrite,
        &f.project,
        "profile-photos",
        "avatar.jpg",
        "image/jpeg",
        &data,
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["success"], true);
    let file = &body["file"];
    let key = format!(
        "{}/{}/avatar.jpg",
        f.project,
        bucket["id"].as_str().unwrap()
    );
    assert_eq!(file["s3_key"], key.as_str());
    assert_eq!(file["name"], "avatar.jpg");
    assert_eq!(file["size"], 300_000);
    assert_eq!(file["content_type"], "image/jpeg");
    assert!(fluxbase::storage::is_uuid(file["id"].as_str().unwrap()));
    assert_eq!(object_on_backend(&key).as_deref(), Some(data.as_slice()));

    let metrics = metrics_text(t).await;
    assert!(
        metrics.contains("fluxbase_storage_uploaded_bytes_total 300000"),
        "{metrics}"
    );
    let files = list_files(t, &f.read, &f.project, bucket["id"].as_str().unwrap()).await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["s3_key"], key.as_str());
    let (status, buckets) = t
        .call(
            "GET",
            &format!("/api/storage/buckets?projectId={}", f.project),
            Some(&f.read),
            None,
        )
        .await;
    assert_eq!(status, 200, "{buckets}");
    assert_eq!(buckets["totalSize"], 300_000);
    assert_eq!(buckets["buckets"][0]["fileCount"], 1);

    let (status, signed) = signed_url(t, &f.read, &f.project, &key).await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["expiresIn"], 900);
    let url = signed["url"].as_str().unwrap();
    let (status, headers, bytes) = fetch(url).await;
    assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&bytes));
    assert_eq!(bytes.as_ref(), data.as_slice());
    assert_eq!(headers["content-type"], "image/jpeg");

    let q =
        serde_urlencoded::to_string([("s3Key", key.as_str()), ("projectId", &f.project)]).unwrap();
    let (status, body) = t
        .call(
            "DELETE",
            &format!("/api/storage/delete?{q}"),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"]["s3_key"], key.as_str());
    assert!(object_on_backend(&key).is_none(), "the object is gone");
    assert!(list_files(t, &f.read, &f.project, "profile-photos")
        .await
        .is_empty());
    let (status, _) = signed_url(t, &f.read, &f.project, &key).await;
    assert_eq!(status, 404);
    let (status, _) = t
        .call(
            "DELETE",
            &format!("/api/storage/delete?{q}"),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 404, "a second delete finds nothing");
    let (status, body) = t
        .call(
            "DELETE",
            &format!(
                "/api/storage/buckets?projectId={}&bucketId=profile-photos",
                f.project
            ),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_full_flow_works_on_the_local_backend() {
    let t = spawn_app().await;
    let root = t.app.config.data_dir.join("storage");
    full_flow(&t, |key| std::fs::read(root.join(key)).ok()).await;
    assert!(
        files_under(&root).is_empty(),
        "nothing left behind: {:?}",
        files_under(&root)
    );
    // The one upload was synced to the disk before its row was committed.
    let metrics = metrics_text(&t).await;
    assert!(
        metrics.contains("\nfluxbase_storage_fsyncs_total 1\n"),
        "{metrics}"
    );
    t.stop().await;
}

#[tokio::test]
async fn the_full_flow_works_on_s3_with_real_sigv4_presigned_urls() {
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    full_flow(&t, |key| std::fs::read(s3.object_path(key)).ok()).await;

    // The URL is a SigV4 pre-signed URL of the S3 server, refused once altered.
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "a.txt",
        "text/plain",
        b"hello s3",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = body["file"]["s3_key"].as_str().unwrap().to_string();
    let (_, signed) = signed_url(&t, &f.read, &f.project, &key).await;
    let url = signed["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("http://{}/{S3_BUCKET}/", s3.addr)),
        "{url}"
    );
    assert!(url.contains("X-Amz-Algorithm=AWS4-HMAC-SHA256"), "{url}");
    assert!(url.contains("X-Amz-Expires=900"), "{url}");
    let (status, _, bytes) = fetch(url).await;
    assert_eq!(status, 200);
    assert_eq!(bytes.as_ref(), b"hello s3");
    let tampered = url.replace("X-Amz-Expires=900", "X-Amz-Expires=901");
    let (status, _, _) = fetch(&tampered).await;
    assert_eq!(status, 403, "an altered pre-signed URL is refused by S3");
    // Objects keep their type, and active content is an attachment on S3's URLs too.
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
    let (_, html) = signed_url(
        &t,
        &f.read,
        &f.project,
        body["file"]["s3_key"].as_str().unwrap(),
    )
    .await;
    let (status, headers, _) = fetch(html["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html");
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"page.html\""),
        "{headers:?}"
    );
    let unsigned = format!("http://{}/{S3_BUCKET}/{key}", s3.addr);
    let (status, _, _) = fetch(&unsigned).await;
    assert_eq!(
        status, 403,
        "the bucket is not readable without a signature"
    );
    // S3 made the objects durable when each upload completed: nothing to fsync here.
    let metrics = metrics_text(&t).await;
    assert!(
        metrics.contains("\nfluxbase_storage_fsyncs_total 0\n"),
        "{metrics}"
    );
    t.stop().await;
}

/// The guide's curl command, verbatim but for the host and the project id.
const GUIDE_CURL: &str = r#"curl -X POST "https://fluxbase.vercel.app/api/storage/upload" \
  -H "Authorization: Bearer $FLUXBASE_API_KEY" \
  -F "file=@avatar.jpg" \
  -F "bucketId=profile-photos" \
  -F "projectId=YOUR_PROJECT_ID""#;

#[tokio::test]
async fn the_guides_curl_upload_command_works_verbatim() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let bucket = create_bucket(&t, &f, "profile-photos", json!({})).await;
    let dir = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("curl")));
    let avatar = pattern(204_800, 3);
    std::fs::write(dir.join("avatar.jpg"), &avatar).unwrap();
    let script = GUIDE_CURL
        .replace("https://fluxbase.vercel.app", &t.base)
        .replace("YOUR_PROJECT_ID", &f.project);
    let key = f.readwrite.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .args(["-c", &format!("{script} -sS")])
            .current_dir(&dir)
            .env("FLUXBASE_API_KEY", key)
            .output()
            .expect("sh and curl are installed (make test installs curl)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["file"]["name"], "avatar.jpg");
    assert_eq!(v["file"]["size"], 204_800);
    assert_eq!(v["file"]["content_type"], "image/jpeg");
    assert_eq!(
        v["file"]["s3_key"],
        format!(
            "{}/{}/avatar.jpg",
            f.project,
            bucket["id"].as_str().unwrap()
        )
    );
    let stored = std::fs::read(
        t.app
            .config
            .data_dir
            .join("storage")
            .join(v["file"]["s3_key"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(stored, avatar);
    t.stop().await;
}

#[tokio::test]
async fn buckets_follow_the_guides_name_rules_and_are_unique_per_project() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    for bad in ["", "Photos", "with space", "a.b", &"a".repeat(64), "ünï"] {
        let (status, body) = t
            .call(
                "POST",
                "/api/storage/buckets",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "name": bad })),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "BAD_REQUEST");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("name"));
    }
    let (status, body) = t
        .call(
            "POST",
            "/api/storage/buckets",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "name": "x", "isPublic": "yes" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let b = create_bucket(&t, &f, &"a".repeat(63), json!({})).await;
    assert_eq!(b["isPublic"], false);
    create_bucket(&t, &f, "profile-photos", json!({ "isPublic": true })).await;
    let (status, body) = t
        .call(
            "POST",
            "/api/storage/buckets",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "name": "profile-photos" })),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "CONFLICT");
    // Another project may use the same name.
    let g = t.fixture().await;
    create_bucket(&t, &g, "profile-photos", json!({})).await;

    // Rename keeps the id; a taken name is a conflict.
    let (status, body) = t
        .call(
            "PATCH",
            "/api/storage/buckets",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "bucketId": b["id"], "name": "renamed" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["bucket"]["id"], b["id"]);
    assert_eq!(body["bucket"]["name"], "renamed");
    let (status, _) = t
        .call(
            "PATCH",
            "/api/storage/buckets",
            Some(&f.admin),
            Some(
                json!({ "projectId": f.project, "bucketId": "renamed", "name": "profile-photos" }),
            ),
        )
        .await;
    assert_eq!(status, 409);
    let (status, body) = t
        .call(
            "GET",
            &format!("/api/storage/buckets?projectId={}", f.project),
            Some(&f.read),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["profile-photos", "renamed"]);
    assert_eq!(body["totalSize"], 0);
    t.stop().await;
}

#[tokio::test]
async fn a_bucket_with_files_cannot_be_deleted() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let (status, _) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "a.txt",
        "text/plain",
        b"x",
        &[],
    )
    .await;
    assert_eq!(status, 201);
    let path = format!("/api/storage/buckets?projectId={}&bucketId=docs", f.project);
    let (status, body) = t.call("DELETE", &path, Some(&f.admin), None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "CONFLICT");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not empty"),
        "{body}"
    );
    assert_eq!(list_files(&t, &f.read, &f.project, "docs").await.len(), 1);
    let key = list_files(&t, &f.read, &f.project, "docs").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // DELETE /api/storage/files by id in a JSON body.
    let (status, body) = t
        .call(
            "DELETE",
            "/api/storage/files",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "fileId": key })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = t.call("DELETE", &path, Some(&f.admin), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = t.call("DELETE", &path, Some(&f.admin), None).await;
    assert_eq!(status, 404);
    t.stop().await;
}

#[tokio::test]
async fn the_same_name_twice_is_a_conflict_unless_upsert() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let (status, first) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "docs",
        "a.txt",
        "text/plain",
        b"first",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let (status, body) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "docs",
        "a.txt",
        "text/plain",
        b"second!",
        &[],
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "CONFLICT");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("upsert=true"));
    let key = first["file"]["s3_key"].as_str().unwrap();
    let (_, signed) = signed_url(&t, &f.read, &f.project, key).await;
    assert_eq!(
        fetch(signed["url"].as_str().unwrap()).await.2.as_ref(),
        b"first"
    );

    let (status, body) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "docs",
        "a.txt",
        "text/plain",
        b"second!",
        &[("upsert", "true")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["file"]["id"], first["file"]["id"]);
    assert_eq!(body["file"]["size"], 7);
    // upsert as a query parameter works too.
    let form = Form::new(
        &[("projectId", &f.project), ("bucketId", "docs")],
        Some(("a.txt", "text/plain")),
        &[],
    );
    let (status, body) = send_upload(
        &t,
        &f.readwrite,
        "?upsert=true",
        &form,
        form.with_bytes(b"third").into(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, signed) = signed_url(&t, &f.read, &f.project, key).await;
    assert_eq!(
        fetch(signed["url"].as_str().unwrap()).await.2.as_ref(),
        b"third"
    );
    let files = list_files(&t, &f.read, &f.project, "docs").await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["size"], 5);
    t.stop().await;
}

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

/// `object_store` percent-encodes characters such as `%`, `{` and `[` in file names on disk: the
/// upload (which syncs the file under its encoded name) and the download both find it.
#[tokio::test]
async fn names_the_store_encodes_on_disk_round_trip() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let name = "100% [draft] {v2}^.txt";
    let (status, body) = upload(
        &t,
        &f.readwrite,
        &f.project,
        "docs",
        name,
        "text/plain",
        b"encoded on disk",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["file"]["name"], name);
    let key = body["file"]["s3_key"].as_str().unwrap().to_string();
    let (status, signed) = signed_url(&t, &f.read, &f.project, &key).await;
    assert_eq!(status, 200, "{signed}");
    let (status, _, bytes) = fetch(signed["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(bytes.as_ref(), b"encoded on disk");
    let files = list_files(&t, &f.read, &f.project, "docs").await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["name"], name);
    t.stop().await;
}

/// A client that goes away in the middle of its file leaves nothing behind: no staged bytes, no
/// row. The body declares 8 MiB and stops after 3 MiB (so parts are on the disk), then the
/// connection is closed.
#[tokio::test]
async fn a_client_that_disconnects_mid_upload_leaves_nothing() {
    use tokio::io::AsyncWriteExt;
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let root = t.app.config.data_dir.join("storage");
    let staging = root.join(".uploads");
    let boundary = "----cut-short";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"projectId\"\r\n\r\n{}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"bucketId\"\r\n\r\ndocs\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n",
        f.project
    );
    let addr = t.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /api/storage/upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n{head}",
        f.readwrite,
        head.len() + 8 * 1024 * 1024
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    conn.write_all(&pattern(3 * 1024 * 1024, 9)).await.unwrap();
    conn.flush().await.unwrap();
    // The staged file exists (it has received bytes) before the client goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while files_under(&staging).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the upload never reached the disk"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files_under(&root).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            files_under(&root)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(list_files(&t, &f.read, &f.project, "docs").await.is_empty());
    t.stop().await;
}

#[tokio::test]
async fn public_buckets_have_a_stable_public_url() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "assets", json!({ "isPublic": true })).await;
    create_bucket(&t, &f, "private", json!({})).await;
    let (_, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "assets",
        "logo.svg",
        "image/svg+xml",
        b"<svg onload=alert(1)/>",
        &[("path", "brand/logo v1.svg")],
    )
    .await;
    assert_eq!(body["file"]["name"], "brand/logo v1.svg", "{body}");
    let public = body["file"]["public_url"].as_str().unwrap().to_string();
    assert!(public.ends_with("/brand/logo%20v1.svg"), "{public}");
    let (status, headers, bytes) = fetch(&public).await;
    assert_eq!(status, 200);
    assert_eq!(bytes.as_ref(), b"<svg onload=alert(1)/>");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment;"));
    // Renaming the bucket keeps the URL.
    let (status, _) = t
        .call(
            "PATCH",
            "/api/storage/buckets",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "bucketId": "assets", "name": "static" })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(fetch(&public).await.0, 200);
    // Private files have no public URL; making the bucket private closes it.
    let (_, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "private",
        "a.png",
        "image/png",
        b"png",
        &[],
    )
    .await;
    assert!(body["file"]["public_url"].is_null());
    let guess = fluxbase::storage::public_url(&t.base, body["file"]["s3_key"].as_str().unwrap());
    assert_eq!(fetch(&guess).await.0, 404);
    t.call(
        "PATCH",
        "/api/storage/buckets",
        Some(&f.admin),
        Some(json!({ "projectId": f.project, "bucketId": "static", "isPublic": false })),
    )
    .await;
    assert_eq!(fetch(&public).await.0, 404);
    t.stop().await;
}

#[tokio::test]
async fn object_names_cannot_escape_their_bucket() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let root = t.app.config.data_dir.join("storage");
    for path in [
        "../escape.txt",
        "a/../../escape.txt",
        "%2e%2e/escape.txt",
        "%2E%2E%2Fescape.txt",
        "/etc/escape.txt",
        "..\\escape.txt",
        "a\u{0}b.txt",
        "a\u{1b}b.txt",
        "a\tb.txt",
        "..",
    ] {
        let (status, body) = upload(
            &t,
            &f.admin,
            &f.project,
            "docs",
            "ok.txt",
            "text/plain",
            b"x",
            &[("path", path)],
        )
        .await;
        assert_eq!(status, 400, "{path:?}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("path"),
            "{body}"
        );
    }
    // The file's own name is checked the same way.
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "../../escape.txt",
        "text/plain",
        b"x",
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
    assert!(!t.app.config.data_dir.join("escape.txt").exists());
    assert!(list_files(&t, &f.read, &f.project, "docs").await.is_empty());
    // Served URLs cannot be pointed elsewhere either.
    for path in [
        "/api/storage/public/../../secrets.json",
        "/api/storage/public/%2e%2e/%2e%2e/secrets.json",
    ] {
        let resp = reqwest::get(t.url(path)).await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    t.stop().await;
}

#[tokio::test]
async fn uploads_over_the_limits_are_refused_and_leave_nothing() {
    let t = spawn_app_with(|c| c.max_upload_bytes = 1024 * 1024).await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let root = t.app.config.data_dir.join("storage");
    let big = pattern(2 * 1024 * 1024, 1);
    // Declared length over the limit: refused before reading.
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "big.bin",
        "application/octet-stream",
        &big,
        &[],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "PAYLOAD_TOO_LARGE");
    // Streamed without a length: refused when the limit is crossed.
    let form = Form::new(
        &[],
        Some(("big.bin", "application/octet-stream")),
        &[("bucketId", "docs"), ("projectId", &f.project)],
    );
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        [form.head.clone(), big.clone(), form.tail.clone()]
            .into_iter()
            .flat_map(|part| {
                part.chunks(64 * 1024)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>()
            })
            .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let (status, resp) = send_upload(&t, &f.admin, "", &form, body).await;
    assert_eq!(status, 413, "{resp}");
    // Exactly at the limit is fine.
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "max.bin",
        "application/octet-stream",
        &big[..1024 * 1024],
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // Per-bucket limits: size and MIME types.
    create_bucket(
        &t,
        &f,
        "avatars",
        json!({ "maxFileSize": 1000, "allowedMimeTypes": ["image/*"] }),
    )
    .await;
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "avatars",
        "a.png",
        "image/png",
        &big[..1001],
        &[],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "avatars",
        "a.html",
        "text/html",
        b"<b>",
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not allowed"));
    // With the fields first, the refusal comes before the file is read.
    let form = Form::new(
        &[("projectId", &f.project), ("bucketId", "avatars")],
        Some(("a.png", "image/png")),
        &[],
    );
    let (status, _) = send_upload(
        &t,
        &f.admin,
        "",
        &form,
        form.with_bytes(&big[..1001]).into(),
    )
    .await;
    assert_eq!(status, 413);
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "avatars",
        "a.png",
        "image/png",
        &big[..1000],
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let mut left = files_under(&root);
    left.sort();
    assert_eq!(left.len(), 2, "only the two accepted files: {left:?}");
    assert!(left.iter().all(|p| !p.starts_with(".uploads")), "{left:?}");
    t.stop().await;
}

#[tokio::test]
async fn malformed_uploads_are_refused_naming_the_field() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let cases: Vec<(Form, &str)> = vec![
        (
            Form::new(
                &[("bucketId", "docs"), ("projectId", &f.project)],
                None,
                &[],
            ),
            "file",
        ),
        (
            Form::new(
                &[("projectId", &f.project)],
                Some(("a.txt", "text/plain")),
                &[],
            ),
            "bucketId",
        ),
        (
            Form::new(&[("bucketId", "docs")], Some(("a.txt", "text/plain")), &[]),
            "projectId",
        ),
        (
            Form::new(
                &[
                    ("bucketId", "docs"),
                    ("projectId", &f.project),
                    ("colour", "red"),
                ],
                Some(("a.txt", "text/plain")),
                &[],
            ),
            "colour",
        ),
        (
            Form::new(
                &[
                    ("bucketId", "docs"),
                    ("projectId", &f.project),
                    ("upsert", "maybe"),
                ],
                Some(("a.txt", "text/plain")),
                &[],
            ),
            "upsert",
        ),
    ];
    for (form, field) in cases {
        let data: &[u8] = if field == "file" { b"" } else { b"x" };
        let (status, body) =
            send_upload(&t, &f.admin, "", &form, form.with_bytes(data).into()).await;
        assert_eq!(status, 400, "{field}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{body}"
        );
    }
    let resp = t
        .http
        .post(t.url("/api/storage/upload"))
        .bearer_auth(&f.admin)
        .json(&json!({ "projectId": f.project }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "nope",
        "a.txt",
        "text/plain",
        b"x",
        &[],
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = upload(
        &t,
        &f.admin,
        "0123456789abcdef",
        "docs",
        "a.txt",
        "text/plain",
        b"x",
        &[],
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "PROJECT_NOT_FOUND");
    assert!(files_under(&t.app.config.data_dir.join("storage")).is_empty());
    t.stop().await;
}

async fn add_member(t: &TestApp, project: &str, role: &str) -> String {
    let (token, user_id, _) = t.signup().await;
    t.app
        .control
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO fluxbase.members (project_id, user_id, role) VALUES ($1, $2, $3)",
            &[&project, &user_id, &role],
        )
        .await
        .unwrap();
    token
}

#[tokio::test]
async fn scopes_and_roles_gate_every_storage_endpoint() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let viewer = add_member(&t, &f.project, "viewer").await;
    let developer = add_member(&t, &f.project, "developer").await;
    let bucket = create_bucket(&t, &f, "docs", json!({})).await;
    let (_, file) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "seed.txt",
        "text/plain",
        b"s",
        &[],
    )
    .await;
    let key = file["file"]["s3_key"].as_str().unwrap().to_string();
    let p = &f.project;

    // (who, may write (upload), may manage (buckets, deletes), code when refused)
    let callers = [
        (f.read.as_str(), false, false, "SCOPE_MISMATCH"),
        (f.readwrite.as_str(), true, false, "SCOPE_MISMATCH"),
        (f.admin.as_str(), true, true, ""),
        (viewer.as_str(), false, false, "INSUFFICIENT_PERMISSIONS"),
        (developer.as_str(), true, true, ""),
        (f.token.as_str(), true, true, ""),
    ];
    for (i, (who, write, manage, code)) in callers.into_iter().enumerate() {
        let expect = |allowed: bool, status: u16, body: &Value, what: &str| {
            if allowed {
                assert!(status < 300, "caller {i} {what}: {status} {body}");
            } else {
                assert_eq!(status, 403, "caller {i} {what}: {body}");
                assert_eq!(body["error"]["code"], code, "caller {i} {what}");
            }
        };
        let (s, b) = t
            .call(
                "GET",
                &format!("/api/storage/buckets?projectId={p}"),
                Some(who),
                None,
            )
            .await;
        expect(true, s, &b, "list buckets");
        let (s, b) = t
            .call(
                "GET",
                &format!("/api/storage/files?projectId={p}&bucketId=docs"),
                Some(who),
                None,
            )
            .await;
        expect(true, s, &b, "list files");
        let (s, b) = signed_url(&t, who, p, &key).await;
        expect(true, s, &b, "sign a URL");
        let name = format!("f{i}.txt");
        let (s, b) = upload(&t, who, p, "docs", &name, "text/plain", b"data", &[]).await;
        expect(write, s, &b, "upload");
        // The uploaded (or admin-seeded) file to delete.
        if !write {
            upload(&t, &f.admin, p, "docs", &name, "text/plain", b"data", &[]).await;
        }
        let k = format!("{p}/{}/{name}", bucket["id"].as_str().unwrap());
        let (s, b) = t
            .call(
                "DELETE",
                &format!("/api/storage/files?projectId={p}&s3Key={}", urlencode(&k)),
                Some(who),
                None,
            )
            .await;
        expect(manage, s, &b, "delete a file");
        let bname = format!("b{i}");
        let (s, b) = t
            .call(
                "POST",
                "/api/storage/buckets",
                Some(who),
                Some(json!({ "projectId": p, "name": bname })),
            )
            .await;
        expect(manage, s, &b, "create a bucket");
        if !manage {
            create_bucket(&t, &f, &bname, json!({})).await;
        }
        let (s, b) = t
            .call(
                "PATCH",
                "/api/storage/buckets",
                Some(who),
                Some(json!({ "projectId": p, "bucketId": bname, "isPublic": true })),
            )
            .await;
        expect(manage, s, &b, "change a bucket");
        let (s, b) = t
            .call(
                "DELETE",
                &format!("/api/storage/buckets?projectId={p}&bucketId={bname}"),
                Some(who),
                None,
            )
            .await;
        expect(manage, s, &b, "delete a bucket");
    }
    // Another project's key sees nothing of this one.
    let g = t.fixture().await;
    let (s, b) = t
        .call(
            "GET",
            &format!("/api/storage/buckets?projectId={p}"),
            Some(&g.admin),
            None,
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("SCOPE_MISMATCH"))
    );
    let (s, _) = signed_url(&t, &g.admin, &g.project, &key).await;
    assert_eq!(
        s, 404,
        "a key of another project cannot sign this project's files"
    );
    t.stop().await;
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)]).unwrap()[2..].to_string()
}

#[tokio::test]
async fn a_failing_backend_leaves_metadata_and_objects_in_agreement() {
    let mut s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "kept.txt",
        "text/plain",
        b"kept",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = body["file"]["s3_key"].as_str().unwrap().to_string();

    s3.stop().await;
    // An upload that cannot be stored is not reported successful, and is not listed.
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "lost.txt",
        "text/plain",
        b"lost",
        &[],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "STORAGE_UNAVAILABLE");
    // A delete that cannot remove the object keeps the file listed.
    let q = format!(
        "/api/storage/delete?projectId={}&s3Key={}",
        f.project,
        urlencode(&key)
    );
    let (status, body) = t.call("DELETE", &q, Some(&f.admin), None).await;
    assert_eq!(status, 503, "{body}");
    let files = list_files(&t, &f.read, &f.project, "docs").await;
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["kept.txt"]);

    let metrics = t
        .http
        .get(t.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fluxbase_storage_backend_errors_total 2"),
        "{metrics}"
    );
    s3.restart().await;
    let (_, signed) = signed_url(&t, &f.read, &f.project, &key).await;
    let (status, _, bytes) = fetch(signed["url"].as_str().unwrap()).await;
    assert_eq!((status, bytes.as_ref()), (200, b"kept".as_slice()));
    assert!(!s3
        .object_path(&format!("{}/lost.txt", key.rsplit_once('/').unwrap().0))
        .exists());
    let (status, body) = t.call("DELETE", &q, Some(&f.admin), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!s3.object_path(&key).exists());
    t.stop().await;
}

#[tokio::test]
async fn a_failed_local_write_is_not_listed() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let bucket = create_bucket(&t, &f, "docs", json!({})).await;
    // A directory where the object should go makes the final rename fail.
    let root = t.app.config.data_dir.join("storage");
    let blocked = root
        .join(&f.project)
        .join(bucket["id"].as_str().unwrap())
        .join("blocked.txt");
    std::fs::create_dir_all(blocked.join("inside")).unwrap();
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "blocked.txt",
        "text/plain",
        b"x",
        &[],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(list_files(&t, &f.read, &f.project, "docs").await.is_empty());
    let staged: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|p| p.starts_with(".uploads"))
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    // The name is free again once the obstacle is gone.
    std::fs::remove_dir_all(&blocked).unwrap();
    let (status, body) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "blocked.txt",
        "text/plain",
        b"x",
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    t.stop().await;
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real binary as a child process, so its resident memory is its own: a 200 MB upload
/// streamed from the client must not raise the server's peak RSS by anything like 200 MB.
#[tokio::test]
async fn a_200_mb_upload_keeps_the_server_memory_flat() {
    const SIZE: usize = 200 * 1024 * 1024;
    let pg = crate::support::pg().await;
    let dir = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("mem")));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_fluxbase"))
        .arg("serve")
        .env("FLUXBASE_DATA_DIR", &dir)
        .env("FLUXBASE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLUXBASE_DATABASE_URL", pg.url(&unique("ctl")))
        .env("FLUXBASE_MAX_UPLOAD_BYTES", (SIZE + 1024).to_string())
        .env("FLUXBASE_LOG", "warn")
        .stdout(Stdio::null())
        .current_dir(&dir)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !matches!(reqwest::get(format!("{base}/health")).await, Ok(r) if r.status() == 200) {
        assert!(child.0.try_wait().unwrap().is_none(), "server exited early");
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let http = reqwest::Client::new();
    let signup: Value = http
        .post(format!("{base}/api/auth/signup"))
        .json(&json!({ "email": format!("{}@example.com", unique("m")), "password": "correct horse battery" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = signup["token"].as_str().unwrap();
    let project: Value = http
        .post(format!("{base}/api/projects"))
        .bearer_auth(token)
        .json(&json!({ "name": "mem" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let project_id = project["project"]["id"].as_str().unwrap().to_string();
    let admin = project["apiKeys"]["admin"].as_str().unwrap().to_string();
    let resp = http
        .post(format!("{base}/api/storage/buckets"))
        .bearer_auth(&admin)
        .json(&json!({ "projectId": project_id, "name": "big" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    let upload_stream = |len: usize| {
        let form = Form::new(
            &[("projectId", &project_id), ("bucketId", "big")],
            Some(("big.bin", "application/octet-stream")),
            &[("upsert", "true")],
        );
        let block = Bytes::from(pattern(1024 * 1024, 9));
        let head = Bytes::from(form.head.clone());
        let tail = Bytes::from(form.tail.clone());
        let blocks = (0..len.div_ceil(block.len())).map(move |i| {
            let n = (len - i * block.len()).min(block.len());
            Ok::<_, std::io::Error>(block.slice(..n))
        });
        let stream = futures_util::stream::iter(
            std::iter::once(Ok(head))
                .chain(blocks)
                .chain(std::iter::once(Ok(tail))),
        );
        (form.content_type(), reqwest::Body::wrap_stream(stream))
    };
    // Warm up (pools, allocator arenas) with a small upload, then take the baseline.
    let (ct, body) = upload_stream(8 * 1024 * 1024);
    let resp = http
        .post(format!("{base}/api/storage/upload"))
        .bearer_auth(&admin)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let baseline = proc_status_kib(pid, "VmHWM:");

    let (ct, body) = upload_stream(SIZE);
    let resp = http
        .post(format!("{base}/api/storage/upload"))
        .bearer_auth(&admin)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["file"]["size"], SIZE as u64);
    let peak = proc_status_kib(pid, "VmHWM:");
    let grew_mib = (peak.saturating_sub(baseline)) / 1024;
    eprintln!(
        "server peak RSS: {} MiB before, {} MiB after a 200 MiB upload",
        baseline / 1024,
        peak / 1024
    );
    assert!(
        grew_mib < 48,
        "peak RSS grew by {grew_mib} MiB during a 200 MiB upload (baseline {} MiB)",
        baseline / 1024
    );
    let stored = dir
        .join("storage")
        .join(body["file"]["s3_key"].as_str().unwrap());
    assert_eq!(std::fs::metadata(stored).unwrap().len(), SIZE as u64);
}

#[tokio::test]
async fn start_up_finishes_interrupted_deletes_and_drops_abandoned_uploads() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let bucket = create_bucket(&t, &f, "docs", json!({})).await;
    let bucket_id = bucket["id"].as_str().unwrap().to_string();
    let root = t.app.config.data_dir.join("storage");
    let (_, a) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "a.txt",
        "text/plain",
        b"a",
        &[],
    )
    .await;
    let (_, b) = upload(
        &t,
        &f.admin,
        &f.project,
        "docs",
        "b.txt",
        "text/plain",
        b"b",
        &[],
    )
    .await;
    let a_key = a["file"]["s3_key"].as_str().unwrap().to_string();
    let b_key = b["file"]["s3_key"].as_str().unwrap().to_string();
    let ghost_key = format!("{}/{bucket_id}/ghost.txt", f.project);
    let fresh_key = format!("{}/{bucket_id}/fresh.txt", f.project);
    std::fs::write(root.join(&ghost_key), b"renamed, never recorded").unwrap();
    std::fs::create_dir_all(root.join(".uploads")).unwrap();
    std::fs::write(root.join(".uploads/old"), b"cut off").unwrap();
    std::fs::write(root.join(".uploads/new"), b"in flight").unwrap();
    let old = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(root.join(".uploads/old"))
        .status()
        .unwrap();
    assert!(old.success());
    {
        let c = t.app.control.get().await.unwrap();
        // A delete cut off after hiding the row; uploads cut off after reserving theirs.
        c.execute(
            "UPDATE fluxbase.storage_files SET deleting_at = now() WHERE s3_key = $1",
            &[&a_key],
        )
        .await
        .unwrap();
        for (name, key, age) in [
            ("ghost.txt", &ghost_key, "2 hours"),
            ("fresh.txt", &fresh_key, "1 minute"),
        ] {
            c.execute(
                &format!(
                    "INSERT INTO fluxbase.storage_files
                       (project_id, bucket_id, name, s3_key, upload_token, upload_started_at)
                     VALUES ($1, $2::text::uuid, $3, $4, 'tok', now() - interval '{age}')"
                ),
                &[&f.project, &bucket_id, &name, key],
            )
            .await
            .unwrap();
        }
    }
    let names = list_files(&t, &f.read, &f.project, "docs").await;
    assert_eq!(
        names.len(),
        1,
        "hidden and reserved rows are not listed: {names:?}"
    );

    let config = t.app.config.clone();
    t.stop().await;
    let t = crate::support::start_with(config).await;
    assert!(
        !root.join(&a_key).exists(),
        "the interrupted delete was finished"
    );
    assert!(root.join(&b_key).exists());
    assert!(
        !root.join(&ghost_key).exists(),
        "the abandoned upload's object is gone"
    );
    assert!(!root.join(".uploads/old").exists());
    assert!(
        root.join(".uploads/new").exists(),
        "a recent staged upload is left alone"
    );
    let rows: Vec<String> = t
        .app
        .control
        .get()
        .await
        .unwrap()
        .query(
            "SELECT name FROM fluxbase.storage_files WHERE project_id = $1 ORDER BY name",
            &[&f.project],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["b.txt", "fresh.txt"]);
    t.stop().await;
}

/// Uploads files of several sizes, suspends the project (what `fluxbase project suspend` runs),
/// checks it is refused while suspended, resumes it, and checks every file still downloads
/// byte-identical and its object is still on the backend.
async fn suspension_keeps_every_object(
    t: &TestApp,
    object_on_backend: impl Fn(&str) -> Option<Vec<u8>>,
) {
    let f = t.fixture().await;
    let bucket = create_bucket(t, &f, "kept", json!({})).await;
    let bucket_id = bucket["id"].as_str().unwrap().to_string();
    let mut uploaded = Vec::new();
    for (i, len) in [0usize, 1, 4_096, 300_000].into_iter().enumerate() {
        let data = pattern(len, i as u8 + 3);
        let name = format!("file-{i}.bin");
        let (status, body) = upload(
            t,
            &f.readwrite,
            &f.project,
            "kept",
            &name,
            "application/octet-stream",
            &data,
            &[],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        uploaded.push((body["file"]["s3_key"].as_str().unwrap().to_string(), data));
    }

    t.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Suspended)
        .await
        .unwrap();
    let (status, body) = signed_url(t, &f.read, &f.project, &uploaded[0].0).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "PROJECT_SUSPENDED", "{body}");
    for (key, data) in &uploaded {
        assert_eq!(
            object_on_backend(key).as_deref(),
            Some(data.as_slice()),
            "suspension removed {key}"
        );
    }

    t.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Active)
        .await
        .unwrap();
    assert_eq!(
        list_files(t, &f.read, &f.project, &bucket_id).await.len(),
        uploaded.len()
    );
    for (key, data) in &uploaded {
        assert_eq!(object_on_backend(key).as_deref(), Some(data.as_slice()));
        let (status, body) = signed_url(t, &f.read, &f.project, key).await;
        assert_eq!(status, 200, "{body}");
        let (status, _, bytes) = fetch(body["url"].as_str().unwrap()).await;
        assert_eq!(status, 200, "{key} after resume");
        assert_eq!(bytes.as_ref(), data.as_slice(), "{key} after resume");
    }
}

#[tokio::test]
async fn suspend_and_resume_keep_every_file_on_the_local_backend() {
    let t = spawn_app().await;
    let root = t.app.config.data_dir.join("storage");
    suspension_keeps_every_object(&t, |key| std::fs::read(root.join(key)).ok()).await;
    t.stop().await;
}

#[tokio::test]
async fn suspend_and_resume_keep_every_file_on_s3() {
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    suspension_keeps_every_object(&t, |key| std::fs::read(s3.object_path(key)).ok()).await;
    t.stop().await;
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
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

/// The name every key test uses: non-ASCII and the characters the store used to encode.
const ODD_NAME: &str = "café [v1] ~100%.txt";

/// Uploads `ODD_NAME` to a new bucket; returns (fixture, key); asserts the key is the documented
/// `<projectId>/<bucketUuid>/<name>`.
async fn upload_odd_name(t: &TestApp, data: &[u8]) -> (Fixture, String) {
    let f = t.fixture().await;
    let bucket = create_bucket(t, &f, "docs", json!({})).await;
    let (status, body) = upload(
        t,
        &f.admin,
        &f.project,
        "docs",
        ODD_NAME,
        "text/plain",
        data,
        &[],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = body["file"]["s3_key"].as_str().unwrap().to_string();
    assert_eq!(
        key,
        format!(
            "{}/{}/{ODD_NAME}",
            f.project,
            bucket["id"].as_str().unwrap()
        )
    );
    (f, key)
}

async fn download(t: &TestApp, f: &Fixture, key: &str) -> (u16, Bytes) {
    let (status, signed) = signed_url(t, &f.read, &f.project, key).await;
    assert_eq!(status, 200, "{signed}");
    let (status, _, bytes) = fetch(signed["url"].as_str().unwrap()).await;
    (status, bytes)
}

async fn delete_object(t: &TestApp, f: &Fixture, key: &str) {
    let q = format!(
        "/api/storage/delete?projectId={}&s3Key={}",
        f.project,
        urlencode(key)
    );
    let (status, body) = t.call("DELETE", &q, Some(&f.admin), None).await;
    assert_eq!(status, 200, "{body}");
}

/// Where an older version stored `key`: object_store's percent-encoded form of it.
fn legacy_key(key: &str) -> String {
    object_store::path::Path::from(key).to_string()
}

#[tokio::test]
async fn an_object_is_stored_on_disk_under_the_key_the_api_returns() {
    let t = spawn_app().await;
    let (f, key) = upload_odd_name(&t, b"real key").await;
    let storage = t.app.config.data_dir.join("storage");
    assert_eq!(std::fs::read(storage.join(&key)).unwrap(), b"real key");
    assert_eq!(
        files_under(&storage.join(&f.project)),
        [key.split_once('/').unwrap().1]
    );
    assert_eq!(download(&t, &f, &key).await, (200, Bytes::from("real key")));
    delete_object(&t, &f, &key).await;
    assert!(!storage.join(&key).exists());
    t.stop().await;
}

async fn s3_client(s3: &S3Server) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(S3_BUCKET)
        .with_endpoint(format!("http://{}", s3.addr))
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id(S3_KEY_ID)
        .with_secret_access_key(S3_SECRET)
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_s3_client_listing_the_bucket_finds_the_key_the_api_returns() {
    use futures_util::StreamExt;
    use object_store::ObjectStore;
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    let (f, key) = upload_odd_name(&t, b"real s3 key").await;
    let client = s3_client(&s3).await;
    let listed: Vec<String> = client
        .list(Some(&object_store::path::Path::from(f.project.as_str())))
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    assert_eq!(listed, std::slice::from_ref(&key));
    assert_eq!(std::fs::read(s3.object_path(&key)).unwrap(), b"real s3 key");
    assert_eq!(
        download(&t, &f, &key).await,
        (200, Bytes::from("real s3 key"))
    );
    delete_object(&t, &f, &key).await;
    assert!(!s3.object_path(&key).exists());
    t.stop().await;
}

#[tokio::test]
async fn objects_stored_under_the_old_encoded_keys_are_moved_to_their_keys_at_start_up() {
    use object_store::ObjectStore;
    // Local disk: the file where an older version put it.
    let t = spawn_app().await;
    let (f, key) = upload_odd_name(&t, b"old local").await;
    let storage = t.app.config.data_dir.join("storage");
    let old = storage.join(legacy_key(&key));
    assert_ne!(old, storage.join(&key));
    std::fs::rename(storage.join(&key), &old).unwrap();
    let config = t.app.config.clone();
    t.stop().await;
    let t = crate::support::start_with(config.clone()).await;
    assert!(!old.exists(), "the old file was moved");
    assert_eq!(std::fs::read(storage.join(&key)).unwrap(), b"old local");
    assert_eq!(
        download(&t, &f, &key).await,
        (200, Bytes::from("old local"))
    );
    // Once more: nothing left to move, nothing changes.
    t.stop().await;
    let t = crate::support::start_with(config).await;
    assert_eq!(
        download(&t, &f, &key).await,
        (200, Bytes::from("old local"))
    );
    delete_object(&t, &f, &key).await;
    assert!(!storage.join(&key).exists());
    t.stop().await;

    // S3: the object under the encoded key.
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    let (f, key) = upload_odd_name(&t, b"old s3").await;
    let client = s3_client(&s3).await;
    let real = object_store::path::Path::parse(&key).unwrap();
    let encoded = object_store::path::Path::from(key.as_str());
    assert_ne!(real, encoded);
    client.copy(&real, &encoded).await.unwrap();
    client.delete(&real).await.unwrap();
    let config = t.app.config.clone();
    t.stop().await;
    let t = crate::support::start_with(config).await;
    assert!(client.head(&encoded).await.is_err(), "the old copy is gone");
    assert_eq!(std::fs::read(s3.object_path(&key)).unwrap(), b"old s3");
    assert_eq!(download(&t, &f, &key).await, (200, Bytes::from("old s3")));
    delete_object(&t, &f, &key).await;
    assert!(client.head(&real).await.is_err());
    t.stop().await;
}

/// `café.txt` and `caf%C3%A9.txt` (the first one's percent-encoded form, and a valid name of its
/// own) in one bucket: uploading, downloading and deleting either leaves the other as it was.
async fn an_encoded_looking_name_is_an_object_of_its_own(
    t: &TestApp,
    object_on_backend: impl Fn(&str) -> Option<Vec<u8>>,
) {
    let f = t.fixture().await;
    create_bucket(t, &f, "docs", json!({})).await;
    let put = |name: &'static str, data: Vec<u8>| {
        let f = &f;
        async move {
            let (status, body) = upload(
                t,
                &f.admin,
                &f.project,
                "docs",
                name,
                "text/plain",
                &data,
                &[("upsert", "true")],
            )
            .await;
            assert!(status == 201 || status == 200, "{status} {body}");
            let key = body["file"]["s3_key"].as_str().unwrap().to_string();
            assert!(key.ends_with(&format!("/{name}")), "{key}");
            key
        }
    };
    let (plain, encoded) = ("café.txt", "caf%C3%A9.txt");
    let b_data = pattern(3000, 7);
    let a_data = pattern(2000, 1);
    let b = put(encoded, b_data.clone()).await;
    let a = put(plain, a_data.clone()).await;
    assert_ne!(a, b);
    assert_eq!(
        object_on_backend(&b),
        Some(b_data.clone()),
        "B's object kept"
    );
    assert_eq!(object_on_backend(&a), Some(a_data.clone()));
    assert_eq!(
        download(t, &f, &b).await,
        (200, Bytes::from(b_data.clone()))
    );
    assert_eq!(
        download(t, &f, &a).await,
        (200, Bytes::from(a_data.clone()))
    );

    // Deleting A leaves B; A is gone (and does not read as B).
    delete_object(t, &f, &a).await;
    assert_eq!(
        object_on_backend(&b),
        Some(b_data.clone()),
        "B's object kept"
    );
    assert_eq!(
        download(t, &f, &b).await,
        (200, Bytes::from(b_data.clone()))
    );
    let (status, _) = signed_url(t, &f.read, &f.project, &a).await;
    assert_eq!(status, 404);

    // A again, then B replaced and deleted: A stays.
    let a = put(plain, a_data.clone()).await;
    let b2_data = pattern(1000, 9);
    put(encoded, b2_data.clone()).await;
    assert_eq!(
        object_on_backend(&a),
        Some(a_data.clone()),
        "A's object kept"
    );
    assert_eq!(download(t, &f, &b).await, (200, Bytes::from(b2_data)));
    delete_object(t, &f, &b).await;
    assert_eq!(object_on_backend(&b), None);
    assert_eq!(
        object_on_backend(&a),
        Some(a_data.clone()),
        "A's object kept"
    );
    assert_eq!(download(t, &f, &a).await, (200, Bytes::from(a_data)));
}

#[tokio::test]
async fn an_encoded_looking_name_never_touches_another_object_on_the_local_backend() {
    let t = spawn_app().await;
    let storage = t.app.config.data_dir.join("storage");
    an_encoded_looking_name_is_an_object_of_its_own(&t, |key| {
        std::fs::read(storage.join(key)).ok()
    })
    .await;
    t.stop().await;
}

#[tokio::test]
async fn an_encoded_looking_name_never_touches_another_object_on_s3() {
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    an_encoded_looking_name_is_an_object_of_its_own(&t, |key| {
        std::fs::read(s3.object_path(key)).ok()
    })
    .await;
    t.stop().await;
}

/// The server on `s3` with its configuration changed by `tweak`.
async fn s3_app_with(s3: &S3Server, tweak: impl FnOnce(&mut fluxbase::config::Config)) -> TestApp {
    let endpoint = format!("http://{}", s3.addr);
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

/// `/ready`'s answer: (status, error code or "ready", message).
async fn ready(t: &TestApp) -> (u16, String, String) {
    let (status, body) = t.call("GET", "/ready", None, None).await;
    if status == 200 {
        return (
            status,
            body["status"].as_str().unwrap().to_string(),
            String::new(),
        );
    }
    assert_eq!(body["success"], false, "{body}");
    (
        status,
        body["error"]["code"].as_str().unwrap().to_string(),
        body["error"]["message"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn a_misconfigured_s3_backend_is_reported_by_ready_with_its_cause() {
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    assert_eq!(ready(&t).await.0, 200);
    t.stop().await;

    // A bucket that does not exist: the server starts, and says why it is not ready.
    let t = s3_app_with(&s3, |c| c.s3_bucket = Some("no-such-bucket".into())).await;
    let (status, code, message) = ready(&t).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "STORAGE_UNAVAILABLE"),
        "{message}"
    );
    assert!(message.contains("no-such-bucket"), "{message}");
    assert!(message.contains("NoSuchBucket"), "{message}");
    // Once the bucket exists, it is ready without a restart.
    std::fs::create_dir_all(s3.root.join("no-such-bucket")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(&t).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.stop().await;

    // Credentials the endpoint refuses.
    let t = s3_app_with(&s3, |c| {
        c.s3_secret_access_key = Some("not-the-secret".into())
    })
    .await;
    let (status, code, message) = ready(&t).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "STORAGE_UNAVAILABLE"),
        "{message}"
    );
    assert!(
        message.contains("403") || message.contains("Forbidden"),
        "{message}"
    );
    assert!(message.contains("SignatureDoesNotMatch"), "{message}");
    t.stop().await;
}
