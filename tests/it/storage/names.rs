//! Object names: what the store encodes on disk, names that try to escape their bucket, and the
//! key the API returns being the object's key on disk and on S3 (old encoded keys migrated).

use super::*;

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

pub(super) async fn delete_object(t: &TestApp, f: &Fixture, key: &str) {
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
