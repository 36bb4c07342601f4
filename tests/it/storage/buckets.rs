//! Buckets: the guide's name rules, deletion, public URLs, and which scope or role may use
//! which storage endpoint.

use super::*;

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
async fn scopes_and_roles_gate_every_storage_endpoint() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let viewer = t.member(&f.project, "viewer").await.0;
    let developer = t.member(&f.project, "developer").await.0;
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

/// A listing answers a page: names under `prefix`, after `after`, at most `limit` (10,000 by
/// default), in bytewise name order, saying whether more follow; a bucket's whole list is never
/// one answer.
#[tokio::test]
async fn file_listings_come_in_pages_by_prefix() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    create_bucket(&t, &f, "docs", json!({})).await;
    for path in ["a.txt", "b/c.txt", "b/d.txt", "b/e/f.txt", "z.txt", "B.txt"] {
        let (status, body) = upload(
            &t,
            &f.readwrite,
            &f.project,
            "docs",
            "x.txt",
            "text/plain",
            b"x",
            &[("path", path)],
        )
        .await;
        assert_eq!(status, 201, "{path}: {body}");
    }
    let page = |query: String| {
        let t = &t;
        let (read, project) = (f.read.clone(), f.project.clone());
        async move {
            t.call(
                "GET",
                &format!("/api/storage/files?bucketId=docs&projectId={project}&{query}"),
                Some(&read),
                None,
            )
            .await
        }
    };
    let names = |body: &Value| -> Vec<String> {
        body["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, all) = page(String::new()).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        names(&all),
        ["B.txt", "a.txt", "b/c.txt", "b/d.txt", "b/e/f.txt", "z.txt"]
    );
    assert_eq!(
        (&all["truncated"], &all["nextAfter"]),
        (&json!(false), &Value::Null)
    );
    let (_, folder) = page("prefix=b%2F".into()).await;
    assert_eq!(
        names(&folder),
        ["b/c.txt", "b/d.txt", "b/e/f.txt"],
        "{folder}"
    );
    let (_, first) = page("prefix=b%2F&limit=2".into()).await;
    assert_eq!(names(&first), ["b/c.txt", "b/d.txt"]);
    assert_eq!(
        (&first["truncated"], &first["nextAfter"]),
        (&json!(true), &json!("b/d.txt"))
    );
    let (_, rest) = page("prefix=b%2F&limit=2&after=b%2Fd.txt".into()).await;
    assert_eq!(names(&rest), ["b/e/f.txt"]);
    assert_eq!(rest["truncated"], false);
    for bad in ["limit=0", "limit=10001", "limit=x"] {
        let (status, body) = page(bad.into()).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("BAD_REQUEST")),
            "{bad}: {body}"
        );
    }
}
