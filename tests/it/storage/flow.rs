//! Upload, list, sign, fetch, delete on both backends, and the guide's curl upload verbatim.

use super::*;

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

    let metrics = t.metrics_text().await;
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
    let metrics = t.metrics_text().await;
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
    let metrics = t.metrics_text().await;
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
