//! `GET /api/openapi.json`: the document describes every route the server answers, is a valid
//! OpenAPI 3.1 document (linted by `openapi-spec-validator`), and schemathesis, run against the
//! live server with each kind of credential for a bounded number of cases, finds no 5xx and no
//! response that the document does not describe (status, content type, body schema).
//!
//! The Python tools come from PyPI into `.fluxbase/tools/venv` (`scripts/deps.sh test`); the test
//! fails, naming the command, when they are missing.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::support::spawn_app_with;

fn tool(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".fluxbase/tools/venv/bin")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `scripts/deps.sh test` (installs schemathesis and \
         openapi-spec-validator from PyPI)",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_lints_clean() {
    let app = spawn_app_with(|_| {}).await;
    let (status, doc) = app.call("GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/execute-sql", "post"),
        ("/api/keys/rotate", "post"),
        ("/api/storage/upload", "post"),
        ("/api/storage/public/{path}", "head"),
        ("/api/team/invites/accept", "post"),
        ("/api/openapi.json", "get"),
        ("/realtime", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not in the document"
        );
    }
    let operations: Vec<&Value> = paths
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .collect();
    for op in &operations {
        let id = op["operationId"]
            .as_str()
            .expect("every operation has an id");
        for status in ["400", "401", "500", "503"] {
            assert_eq!(
                op["responses"][status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{id}: {status}"
            );
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["info"]["description"]
        .as_str()
        .unwrap()
        .contains("\"type\":\"subscribe\""));

    let file = std::env::temp_dir().join(format!("openapi-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = Command::new(tool("openapi-spec-validator"))
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "the document does not lint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let app = spawn_app_with(|c| {
        // Sign-ups and projects schemathesis may create, bounded.
        c.max_projects_per_user = 3;
    })
    .await;
    let st = tool("st");
    let report_dir = std::env::temp_dir().join(format!("schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&report_dir).unwrap();
    // Each credential gets a project of its own, named in every `projectId` schemathesis sends,
    // so that its requests reach the handlers' logic instead of stopping at 404 (and an admin
    // key deleting its project leaves the other runs theirs).
    let mut credentials = Vec::new();
    for who in [
        "read key",
        "readwrite key",
        "admin key",
        "session",
        "anonymous",
    ] {
        let f = app.fixture().await;
        let credential = match who {
            "read key" => f.read,
            "readwrite key" => f.readwrite,
            "admin key" => f.admin,
            "session" => f.token,
            _ => String::new(),
        };
        let config = report_dir.join(format!("{}.toml", who.replace(' ', "-")));
        std::fs::write(
            &config,
            format!(
                "[parameters]\nprojectId = \"{p}\"\n\"body.projectId\" = \"{p}\"\n",
                p = f.project
            ),
        )
        .unwrap();
        credentials.push((who, credential, config));
    }
    // One run per credential, all at once (each bounded by --max-time).
    let runs = credentials.iter().map(|(who, credential, config)| {
        let mut cmd = tokio::process::Command::new(&st);
        cmd.arg("--config-file")
            .arg(config)
            .arg("run")
            .arg(app.url("/api/openapi.json"))
            .args(["--url", &app.base])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth",
            ])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--max-examples", "25", "--generation-deterministic"])
            .args(["--max-time", "60", "--request-timeout", "20", "--workers", "1"])
            .args(["--no-color", "--output-truncate", "true"])
            .arg("--report-dir")
            .arg(report_dir.join(who.replace(' ', "-")))
            // Deterministic generation keeps no example database; any other file schemathesis
            // writes lands in the scratch directory, not the working tree.
            .current_dir(&report_dir)
            .kill_on_drop(true);
        if !credential.is_empty() {
            cmd.args(["-H", &format!("Authorization: Bearer {credential}")]);
        }
        // What would end the run's own credential early (the rest of the run then only meets
        // 401): logging the session out, deleting the project, and, for the credentials allowed
        // to, revoking or rotating a key schemathesis found in an answer. Each is tested
        // elsewhere; the weaker credentials still try them (and must be refused).
        let mut ending = vec!["logout", "delete_project"];
        if matches!(*who, "admin key" | "session") {
            ending.extend(["delete_key", "rotate_key"]);
        }
        for operation in ending {
            cmd.args(["--exclude-operation-id", operation]);
        }
        async move {
            let out = tokio::time::timeout(std::time::Duration::from_secs(240), cmd.output())
                .await
                .unwrap_or_else(|_| panic!("schemathesis ({who}) ran over 240 s"))
                .unwrap();
            (who, out)
        }
    });
    let mut failures = Vec::new();
    for (who, out) in futures_util::future::join_all(runs).await {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = stdout.lines().rev().take(12).collect();
        let summary: Vec<&str> = summary.into_iter().rev().collect();
        eprintln!("schemathesis as {who}:\n{}", summary.join("\n"));
        if !out.status.success() {
            failures.push(format!(
                "── schemathesis as {who} ──\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&report_dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    app.stop().await;
}
