//! The engine of a project: chosen at creation, shown everywhere a project is; the embedded
//! MariaDB started for the first MySQL project and reused after a restart.

use serde_json::json;

use crate::support::app::start_with;
use crate::support::mariadb::spawn_mysql_app;
use crate::support::spawn_app;

#[tokio::test]
async fn projects_show_their_engine_and_refuse_an_unknown_one() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/projects",
            Some(&f.token),
            Some(json!({ "name": "pg", "engine": "postgresql" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["project"]["engine"], "postgresql");
    let (status, body) = app
        .call(
            "POST",
            "/api/projects",
            Some(&f.token),
            Some(json!({ "name": "default" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["project"]["engine"], "postgresql");
    for bad in [json!("oracle"), json!("MySQL"), json!(1)] {
        let (status, body) = app
            .call(
                "POST",
                "/api/projects",
                Some(&f.token),
                Some(json!({ "name": "x", "engine": bad })),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("engine"),
            "{body}"
        );
    }
    let (status, body) = app.call("GET", "/api/projects", Some(&f.token), None).await;
    assert_eq!(status, 200);
    let engines: Vec<&str> = body["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["engine"].as_str().unwrap())
        .collect();
    assert_eq!(engines, ["mysql", "postgresql", "postgresql"], "{body}");
    let (_, body) = app.call("GET", "/api/projects", Some(&f.read), None).await;
    assert_eq!(body["projects"][0]["engine"], "mysql");
    let (status, body) = app
        .call(
            "PATCH",
            "/api/projects",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "name": "renamed" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["project"]["engine"], "mysql");
    // The OpenAPI document names the field.
    let (_, doc) = app.call("GET", "/api/openapi.json", None, None).await;
    let text = doc.to_string();
    assert!(
        text.contains("\"engine\""),
        "engine missing from the OpenAPI document"
    );
}

/// No `mysql_url`: the first MySQL project starts the embedded MariaDB under the data
/// directory (as the unprivileged `mysql` user when root), and a restart reuses it.
#[tokio::test]
async fn the_embedded_mariadb_starts_for_the_first_mysql_project_and_is_reused() {
    let app = spawn_app().await;
    assert!(
        app.app.mysql.embedded().is_none(),
        "started before any MySQL project"
    );
    let f = app.mysql_fixture().await;
    let server = app.app.mysql.embedded().expect("the embedded MariaDB runs");
    let root = app.app.config.data_dir.join("mariadb");
    assert!(root.join("data/mysql").is_dir());
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')",
    )
    .await;
    // The binlog change capture needs, as configured.
    let vars = app.rows(&f.read, &f.project, "SELECT @@log_bin AS log_bin, @@binlog_format AS format, @@binlog_row_image AS image, @@binlog_row_metadata AS metadata, @@bind_address AS bind, @@local_infile AS local_infile").await;
    assert_eq!(
        vars[0],
        json!({ "log_bin": 1, "format": "ROW", "image": "FULL", "metadata": "FULL", "bind": "127.0.0.1", "local_infile": 0 })
    );
    let pid = std::fs::read_to_string(root.join("mariadbd.pid"))
        .unwrap()
        .trim()
        .to_string();
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
        if nix_is_root() {
            assert_ne!(owner, 0, "MariaDB runs as root");
        }
    }
    drop(server);
    let config = app.app.config.clone();
    app.stop().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "MariaDB outlived its server"
    );
    let again = start_with(config).await;
    assert!(
        again.app.mysql.embedded().is_some(),
        "a server with MySQL projects starts MariaDB"
    );
    assert_eq!(
        again.rows(&f.read, &f.project, "SELECT v FROM kept").await,
        vec![json!({"v": "still here"})]
    );
    again.stop().await;
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `fluxbase project create --engine mysql`: the CLI names the engine and provisions on the
/// MySQL server; an unknown engine is refused.
#[tokio::test]
async fn the_cli_creates_and_deletes_a_mysql_project() {
    let pg = crate::support::pg().await;
    let db = crate::support::mariadb::mariadb().await;
    let dir = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("cli")
    ));
    let control = crate::support::unique("ctl");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluxbase"))
            .args(args)
            .env("FLUXBASE_DATA_DIR", &dir)
            .env("FLUXBASE_DATABASE_URL", pg.url(&control))
            .env("FLUXBASE_MYSQL_URL", &db.admin_url)
            .env("FLUXBASE_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&["init", "--json"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&[
        "project", "create", "--name", "legacy", "--engine", "mysql", "--json",
    ]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["project"]["engine"], "mysql", "{out}");
    let id = created["project"]["id"].as_str().unwrap().to_string();
    let schemas = db
        .query(&format!(
            "SELECT count(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'fx_{id}'"
        ))
        .await;
    assert_eq!(schemas[0][0].as_deref(), Some("1"));
    let (ok, out, _) = run(&["project", "create", "--name", "plain"]);
    assert!(ok && out.contains("postgresql"), "{out}");
    let (ok, _, err) = run(&["project", "create", "--name", "x", "--engine", "oracle"]);
    assert!(!ok && err.contains("--engine"), "{err}");
    let (ok, _, err) = run(&["project", "delete", &id]);
    assert!(ok, "{err}");
    let schemas = db
        .query(&format!(
            "SELECT count(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'fx_{id}'"
        ))
        .await;
    assert_eq!(schemas[0][0].as_deref(), Some("0"));
}
