//! A name is a file or a folder, never both: `a` and `a/b.txt` cannot both be in a bucket, on
//! any backend (the local disk refuses the pair; S3 would keep it, and the same upload must not
//! answer one way here and another there). The refusal is a clear 409 naming the path in the
//! way, with nothing left behind: no staged object, no reservation, no row.

use super::*;

/// Uploads `data` as the object `path` of bucket `docs`.
async fn put(t: &TestApp, f: &Fixture, path: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut fields = vec![("path", path)];
    fields.extend_from_slice(extra);
    upload(
        t,
        &f.readwrite,
        &f.project,
        "docs",
        "x.txt",
        "text/plain",
        path.as_bytes(),
        &fields,
    )
    .await
}

/// Rows of the project in the control database, in any state (reservations and marked deletes
/// too), by name.
async fn rows_of(t: &TestApp, project: &str) -> Vec<String> {
    let c = t.app.control.get().await.unwrap();
    c.query(
        "SELECT name FROM fluxbase.storage_files WHERE project_id = $1 ORDER BY name",
        &[&project],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The same uploads on either backend: the same answers. `staged`: the staging area's objects
/// left on the backend; `deleted`: called after deletes.
async fn a_name_is_a_file_or_a_folder(
    t: &TestApp,
    staged: impl Fn() -> Vec<String>,
    deleted: impl Fn(),
) {
    let f = t.fixture().await;
    create_bucket(t, &f, "docs", json!({})).await;
    for path in ["a/b.txt", "x"] {
        let (status, body) = put(t, &f, path, &[]).await;
        assert_eq!(status, 201, "{path}: {body}");
    }
    // (the name, what is in its way): a file inside it, or a file where its folder would be.
    for (path, existing) in [
        ("a", "a/b.txt"),
        ("a/b.txt/c", "a/b.txt"),
        ("x/y.txt", "x"),
        ("x/y/z/w.txt", "x"),
    ] {
        for extra in [&[][..], &[("upsert", "true")][..]] {
            let (status, body) = put(t, &f, path, extra).await;
            assert_eq!(status, 409, "{path} {extra:?}: {body}");
            assert_eq!(body["success"], false, "{body}");
            assert_eq!(body["error"]["code"], "CONFLICT", "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("{path:?}"))
                    && message.contains(&format!("{existing:?}")),
                "{path}: {message}"
            );
            assert!(message.contains("a file or a folder"), "{message}");
        }
    }
    // Names that only look alike are names of their own.
    for path in [
        "ab",
        "a.txt",
        "a/c.txt",
        "a/b.txt.d/e",
        "x0",
        "x.y/z",
        "xy/z",
    ] {
        let (status, body) = put(t, &f, path, &[]).await;
        assert_eq!(status, 201, "{path}: {body}");
    }
    let listed: Vec<String> = list_files(t, &f.read, &f.project, "docs")
        .await
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    let want = [
        "a.txt",
        "a/b.txt",
        "a/b.txt.d/e",
        "a/c.txt",
        "ab",
        "x",
        "x.y/z",
        "x0",
        "xy/z",
    ];
    assert_eq!(listed, want);
    // Nothing of the refused uploads: no row, no staged object.
    assert_eq!(rows_of(t, &f.project).await, want);
    assert_eq!(staged(), Vec::<String>::new());
    // Once the files inside are deleted, the name is free to be a file.
    let prefix = listed_key_prefix(t, &f).await;
    super::names::delete_object(t, &f, &format!("{prefix}/a/b.txt")).await;
    let (status, body) = put(t, &f, "a/c.txt", &[("upsert", "true")]).await;
    assert_eq!(status, 200, "{body}");
    for (inside, delete) in [("a/b.txt.d/e", true), ("a/c.txt", true), ("", false)] {
        let (status, body) = put(t, &f, "a", &[]).await;
        if !delete {
            assert_eq!(status, 201, "{body}");
            break;
        }
        assert_eq!(status, 409, "{inside} is still inside: {body}");
        super::names::delete_object(t, &f, &format!("{prefix}/{inside}")).await;
        deleted();
    }
    assert_eq!(download_named(t, &f, "a").await, Bytes::from("a"));
}

/// `<projectId>/<bucketUuid>` of bucket `docs`.
async fn listed_key_prefix(t: &TestApp, f: &Fixture) -> String {
    let files = list_files(t, &f.read, &f.project, "docs").await;
    let key = files[0]["s3_key"].as_str().unwrap();
    let name = files[0]["name"].as_str().unwrap();
    key.strip_suffix(&format!("/{name}")).unwrap().to_string()
}

async fn download_named(t: &TestApp, f: &Fixture, name: &str) -> Bytes {
    let key = format!("{}/{name}", listed_key_prefix(t, f).await);
    let (status, bytes) = download(t, f, &key).await;
    assert_eq!(status, 200);
    bytes
}

#[tokio::test]
async fn a_name_is_a_file_or_a_folder_on_the_local_disk() {
    let t = spawn_app().await;
    let staging = t.app.config.data_dir.join("storage").join(".uploads");
    a_name_is_a_file_or_a_folder(&t, || files_under(&staging), || {}).await;
    t.stop().await;
}

#[tokio::test]
async fn a_name_is_a_file_or_a_folder_on_s3() {
    let s3 = S3Server::start().await;
    let t = s3.spawn_app().await;
    let staging = s3.object_path(".uploads");
    // The test's S3 server keeps its objects as files and leaves their emptied directories
    // behind, where S3 has no directories: those go, as on S3.
    let objects = s3.object_path("");
    let prune = || remove_empty_dirs(&objects);
    a_name_is_a_file_or_a_folder(&t, || files_under(&staging), prune).await;
    t.stop().await;
}

/// With the fields first, a name taken as a folder is refused while the file's bytes still
/// arrive: the answer comes while the client still holds the rest of its body back (it sends
/// the rest only once it has the answer), and nothing is left.
#[tokio::test]
async fn a_clash_known_from_the_fields_ends_the_upload_early() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    let (status, body) = put(&t, &f, "a/b.txt", &[]).await;
    assert_eq!(status, 201, "{body}");
    let fields = [
        ("projectId", f.project.as_str()),
        ("bucketId", "docs"),
        ("path", "a"),
    ];
    let form = Form::new(&fields, Some(("x.bin", "application/octet-stream")), &[]);
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let first = [form.head.clone(), pattern(256 * 1024, 3)].concat();
    let rest = [pattern(1024 * 1024, 4), form.tail.clone()].concat();
    use futures_util::StreamExt;
    // No length declared: the bucket and the name are looked up while the body arrives.
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(first))]).chain(
        futures_util::stream::once(async move {
            let _ = held.await;
            Ok(Bytes::from(rest))
        }),
    );
    // Without the early check the server waits for the body, which waits for the answer.
    let (status, reply) = tokio::time::timeout(
        Duration::from_secs(60),
        send_upload(
            &t,
            &f.readwrite,
            "",
            &form,
            reqwest::Body::wrap_stream(stream),
        ),
    )
    .await
    .expect("no answer while the body was held back");
    drop(release);
    assert_eq!(status, 409, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("a/b.txt"),
        "{reply}"
    );
    assert_eq!(rows_of(&t, &f.project).await, ["a/b.txt"]);
    let root = t.app.config.data_dir.join("storage").join(".uploads");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !files_under(&root).is_empty() {
        assert!(Instant::now() < deadline, "left: {:?}", files_under(&root));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.stop().await;
}

/// Removes the empty directories under `dir` (not `dir` itself).
fn remove_empty_dirs(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_empty_dirs(&p);
            let _ = std::fs::remove_dir(&p);
        }
    }
}

/// An upload whose name clashes with another upload's still in flight (its row reserved, not
/// yet committed) waits for it, then sees its row: the check cannot miss a row that two
/// processes or nodes insert at the same time. The other upload is played by a transaction
/// that takes the same name locks and inserts the row of `q/r.txt`.
#[tokio::test]
async fn a_clash_with_an_upload_in_flight_is_refused_once_it_commits() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let t = spawn_app().await;
    let f = t.fixture().await;
    let bucket = create_bucket(&t, &f, "docs", json!({})).await;
    let bucket_id = bucket["id"].as_str().unwrap().to_string();
    let other = t.app.control.get().await.unwrap();
    other.batch_execute("BEGIN").await.unwrap();
    fluxbase::control::files::lock_names(&other, &f.project, "docs", "q/r.txt")
        .await
        .unwrap();
    other
        .execute(
            "INSERT INTO fluxbase.storage_files (project_id, bucket_id, name, s3_key, size)
             VALUES ($1, $2::text::uuid, 'q/r.txt', $1 || '/' || $2 || '/q/r.txt', 1)",
            &[&f.project, &bucket_id],
        )
        .await
        .unwrap();
    let done = AtomicBool::new(false);
    let uploading = async {
        let answer = put(&t, &f, "q", &[]).await;
        done.store(true, Ordering::SeqCst);
        answer
    };
    let committing = async {
        // Until the upload waits for the name `q`'s lock (or, without the lock, has answered).
        let c = t.app.control.get().await.unwrap();
        loop {
            let waiting: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_locks l,
                       (SELECT hashtextextended('fluxbase.storage_names:' || $1 || '/q', 0) AS k) h
                     WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 1
                       AND l.classid::text::bigint = (h.k >> 32) & 4294967295
                       AND l.objid::text::bigint = h.k & 4294967295",
                    &[&bucket_id],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 || done.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        other.batch_execute("COMMIT").await.unwrap();
    };
    let ((status, body), ()) = tokio::join!(uploading, committing);
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("q/r.txt"),
        "{body}"
    );
    assert_eq!(rows_of(&t, &f.project).await, ["q/r.txt"]);
    t.stop().await;
}

/// What the local disk holds that no row lists: an empty directory where a file goes (a move
/// into it that failed after making it) is removed; a file where a folder should be is a 409
/// naming the path, never the 503 that asks the client to retry the same failure forever.
#[tokio::test]
async fn leftovers_on_the_local_disk_are_not_a_retry_loop() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let bucket = create_bucket(&t, &f, "docs", json!({})).await;
    let dir = t
        .app
        .config
        .data_dir
        .join("storage")
        .join(&f.project)
        .join(bucket["id"].as_str().unwrap());
    std::fs::create_dir_all(dir.join("empty/deeper")).unwrap();
    let (status, body) = put(&t, &f, "empty", &[]).await;
    assert_eq!(status, 409, "not empty: {body}");
    assert_eq!(body["error"]["code"], "CONFLICT", "{body}");
    std::fs::remove_dir(dir.join("empty/deeper")).unwrap();
    let (status, body) = put(&t, &f, "empty", &[]).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(download_named(&t, &f, "empty").await, Bytes::from("empty"));
    std::fs::write(dir.join("orphan"), b"no row").unwrap();
    let (status, body) = put(&t, &f, "orphan/file.txt", &[]).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "CONFLICT", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"orphan/file.txt\""),
        "{body}"
    );
    // Nothing of it stays: no row, no staged object.
    assert_eq!(rows_of(&t, &f.project).await, ["empty"]);
    assert_eq!(
        files_under(&t.app.config.data_dir.join("storage").join(".uploads")),
        Vec::<String>::new()
    );
    t.stop().await;
}
