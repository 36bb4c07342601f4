//! The store across the server's life: start-up finishing interrupted deletes, suspension and
//! resume keeping every object, and `/ready` reporting a misconfigured S3 backend.

use super::*;

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

/// While the server runs, staged uploads nobody has written for an hour (a killed process's:
/// red team rt5 found them kept until a restart an hour later) are removed every
/// `storage_staged_sweep_secs`; one being written is not.
#[tokio::test]
async fn a_running_server_removes_staged_uploads_nobody_writes_any_more() {
    let t = crate::support::spawn_app_with(|c| c.storage_staged_sweep_secs = 1).await;
    let staging = t.app.config.data_dir.join("storage").join(".uploads");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("left"), b"cut off by a kill -9").unwrap();
    std::fs::write(staging.join("written"), b"in flight").unwrap();
    let old = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(staging.join("left"))
        .status()
        .unwrap();
    assert!(old.success());
    crate::support::poll::until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(200),
        || async {
            if staging.join("left").exists() {
                Err("the abandoned staged upload is still there".to_string())
            } else {
                Ok(())
            }
        },
    )
    .await;
    assert!(
        staging.join("written").exists(),
        "a fresh staged upload was removed"
    );
    t.stop().await;
}

#[tokio::test]
async fn start_up_lists_uploads_whose_object_was_in_place_when_a_crash_lost_their_listing() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let bucket = create_bucket(&t, &f, "docs", json!({})).await;
    let bucket_id = bucket["id"].as_str().unwrap().to_string();
    let root = t.app.config.data_dir.join("storage");
    for (name, body) in [("replaced.txt", &b"old"[..]), ("kept.txt", &b"old"[..])] {
        let (status, _) = upload(
            &t,
            &f.admin,
            &f.project,
            "docs",
            name,
            "text/plain",
            body,
            &[],
        )
        .await;
        assert_eq!(status, 201);
    }
    let key = |name: &str| format!("{}/{bucket_id}/{name}", f.project);
    std::fs::create_dir_all(root.join(".uploads")).unwrap();
    // Moved into place, listing lost: a new file, and a new version of an existing one.
    std::fs::write(root.join(key("lost.txt")), b"12345").unwrap();
    std::fs::write(root.join(key("replaced.txt")), b"1234567").unwrap();
    // Never moved: its bytes are still staged.
    std::fs::write(root.join(".uploads/still-staged"), b"abc").unwrap();
    {
        let c = t.app.control.get().await.unwrap();
        for (name, staged, size) in [
            ("lost.txt", ".uploads/gone-1", 5i64),
            ("moving.txt", ".uploads/still-staged", 3),
        ] {
            c.execute(
                "INSERT INTO fluxbase.storage_files
                   (project_id, bucket_id, name, s3_key, upload_token, upload_started_at,
                    upload_size, upload_content_type, upload_staged)
                 VALUES ($1, $2::text::uuid, $3, $4, 'tok', now(), $5, 'text/csv', $6)",
                &[&f.project, &bucket_id, &name, &key(name), &size, &staged],
            )
            .await
            .unwrap();
        }
        // Upserts: one whose object is the new version, one whose staged bytes went (its
        // upload failed) while the object at its key is still the old one.
        for (name, staged, size) in [
            ("replaced.txt", ".uploads/gone-2", 7i64),
            ("kept.txt", ".uploads/gone-3", 9),
        ] {
            let n = c
                .execute(
                    "UPDATE fluxbase.storage_files SET upload_token = 'tok',
                       upload_started_at = now(), upload_size = $3,
                       upload_content_type = 'text/csv', upload_staged = $4
                     WHERE project_id = $1 AND name = $2",
                    &[&f.project, &name, &size, &staged],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
    }

    let config = t.app.config.clone();
    t.stop().await;
    let t = crate::support::start_with(config).await;
    let rows: Vec<(String, Option<i64>, String, bool)> = t
        .app
        .control
        .get()
        .await
        .unwrap()
        .query(
            "SELECT name, size, content_type, upload_token IS NULL FROM fluxbase.storage_files
             WHERE project_id = $1 ORDER BY name",
            &[&f.project],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let row = |name: &str, size: Option<i64>, ty: &str, free: bool| {
        (name.to_string(), size, ty.to_string(), free)
    };
    assert_eq!(
        rows,
        [
            row("kept.txt", Some(3), "text/plain", false),
            row("lost.txt", Some(5), "text/csv", true),
            row("moving.txt", None, "application/octet-stream", false),
            row("replaced.txt", Some(7), "text/csv", true),
        ]
    );
    let names: Vec<String> = list_files(&t, &f.read, &f.project, "docs")
        .await
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["kept.txt", "lost.txt", "replaced.txt"]);
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

/// `/ready`'s answer: (status, error code or "ready", message).
async fn ready(t: &TestApp) -> (u16, String, String) {
    ready_as(t, None).await
}

/// `/ready` with `token` as the bearer (the metrics token: an operator).
async fn ready_as(t: &TestApp, token: Option<&str>) -> (u16, String, String) {
    let (status, body) = t.call("GET", "/ready", token, None).await;
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

    // A bucket that does not exist: the server starts, and says why it is not ready (to an
    // operator: with a metrics token set, only the token sees the cause).
    let t = s3
        .spawn_app_with(|c| {
            c.s3_bucket = Some("no-such-bucket".into());
            c.metrics_token = Some("metrics-token-for-tests".into());
        })
        .await;
    let (status, code, message) = ready(&t).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "STORAGE_UNAVAILABLE"),
        "{message}"
    );
    assert!(!message.contains("no-such-bucket"), "{message}");
    assert!(!message.contains("NoSuchBucket"), "{message}");
    assert!(!message.contains("http"), "{message}");
    let (status, code, message) = ready_as(&t, Some("metrics-token-for-tests")).await;
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
    while ready_as(&t, Some("metrics-token-for-tests")).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.stop().await;

    // Credentials the endpoint refuses.
    let t = s3
        .spawn_app_with(|c| c.s3_secret_access_key = Some("not-the-secret".into()))
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

/// `kill -9` of the server while two uploads are mid-body (a new file, and an `upsert` of an
/// existing one), then a restart: neither shows half-written (the new file is not listed, the
/// replaced one lists and serves its old bytes), the cut-off bodies are only staged files, and
/// the start-up sweep removes those once they are an hour old.
#[tokio::test]
async fn kill_9_mid_upload_leaves_nothing_half_written_and_the_sweep_removes_the_rest() {
    let mut server = ServerProcess::start(&[]).await;
    let http = reqwest::Client::new();
    let Project {
        project: project_id,
        admin,
        ..
    } = project(&server.base).await;
    let resp = http
        .post(format!("{}/api/storage/buckets", server.base))
        .bearer_auth(&admin)
        .json(&json!({ "projectId": project_id, "name": "docs" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let old = pattern(3 * 1024 * 1024, 1);
    let form = |name: &str| {
        Form::new(
            &[("projectId", &project_id), ("bucketId", "docs")],
            Some((name, "application/octet-stream")),
            &[("upsert", "true")],
        )
    };
    let f = form("doc.bin");
    let resp = http
        .post(format!("{}/api/storage/upload", server.base))
        .bearer_auth(&admin)
        .header("content-type", f.content_type())
        .body([f.head.clone(), old.clone(), f.tail.clone()].concat())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let doc: Value = resp.json().await.unwrap();
    let key = doc["file"]["s3_key"].as_str().unwrap().to_string();

    // Two uploads that send 2 MiB of their file and then nothing more.
    let staging = server.dir.join("storage/.uploads");
    let mut cut = Vec::new();
    for name in ["doc.bin", "new.bin"] {
        let f = form(name);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        tx.send(Ok(Bytes::from(f.head.clone()))).await.unwrap();
        tx.send(Ok(Bytes::from(pattern(2 * 1024 * 1024, 2))))
            .await
            .unwrap();
        let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|c| (c, rx))
        }));
        let request = http
            .post(format!("{}/api/storage/upload", server.base))
            .bearer_auth(&admin)
            .header("content-type", f.content_type())
            .body(body)
            .send();
        cut.push((tokio::spawn(request), tx));
    }
    // Both are being written to staged files (1 MiB parts leave once more bytes come).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let staged: Vec<u64> = std::fs::read_dir(&staging)
            .map(|d| d.flatten().map(|e| e.metadata().unwrap().len()).collect())
            .unwrap_or_default();
        if staged.len() == 2 && staged.iter().all(|&n| n >= 1024 * 1024) {
            break;
        }
        assert!(Instant::now() < deadline, "staged: {staged:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    for (request, tx) in cut {
        drop(tx);
        assert!(
            request.await.unwrap().is_err(),
            "no answer from a killed server"
        );
    }
    server.restart().await;

    let listed = |base: String| {
        let (http, admin, project_id) = (http.clone(), admin.clone(), project_id.clone());
        async move {
            let resp = http
                .get(format!("{base}/api/storage/files"))
                .bearer_auth(&admin)
                .query(&[("projectId", project_id.as_str()), ("bucketId", "docs")])
                .send()
                .await
                .unwrap();
            let v: Value = resp.json().await.unwrap();
            v["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f["name"].as_str().unwrap().to_string(), f["size"].as_u64()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        listed(server.base.clone()).await,
        [("doc.bin".to_string(), Some(old.len() as u64))]
    );
    let signed: Value = http
        .get(format!("{}/api/storage/url", server.base))
        .bearer_auth(&admin)
        .query(&[("s3Key", key.as_str()), ("projectId", project_id.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (status, _, bytes) = fetch(signed["url"].as_str().unwrap()).await;
    assert!(
        status == 200 && bytes.as_ref() == old.as_slice(),
        "the old bytes"
    );
    let bucket_dir = server.dir.join("storage").join(&key);
    let bucket_dir = bucket_dir.parent().unwrap();
    assert_eq!(
        files_under(bucket_dir),
        ["doc.bin"],
        "nothing else in place"
    );
    let staged: Vec<_> = std::fs::read_dir(&staging).unwrap().flatten().collect();
    assert_eq!(
        staged.len(),
        2,
        "recent staged files are left to their hour"
    );

    // An hour later (their times moved back), the next start-up removes them.
    for e in &staged {
        let moved = Command::new("touch")
            .args(["-d", "2 hours ago"])
            .arg(e.path())
            .status()
            .unwrap();
        assert!(moved.success());
    }
    server.restart().await;
    let left = std::fs::read_dir(&staging)
        .map(|d| d.count())
        .unwrap_or_default();
    assert_eq!(left, 0, "the sweep removed the cut-off uploads");
    assert_eq!(
        listed(server.base.clone()).await,
        [("doc.bin".to_string(), Some(old.len() as u64))]
    );
}
