//! The binary as a newcomer runs it: `fluxbase init --json` and `fluxbase serve` on a fresh data
//! directory start an embedded PostgreSQL cluster (as an unprivileged user when root), print the
//! keys once, stop cleanly on Ctrl-C, and the next start reuses the same project and keys.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn fluxbase(data_dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxbase"));
    cmd.env("FLUXBASE_DATA_DIR", data_dir)
        .env("FLUXBASE_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("FLUXBASE_DATABASE_URL")
        .env("FLUXBASE_LOG", "warn")
        .current_dir(data_dir);
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_healthy(base: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/health")).await {
            if r.status() == 200 {
                return;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited early: {status}");
        }
        assert!(Instant::now() < deadline, "server did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn interrupt(child: &mut Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "server exited with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn query(base: &str, key: &str, project: &str, sql: &str) -> Value {
    reqwest::Client::new()
        .post(format!("{base}/api/execute-sql"))
        .bearer_auth(key)
        .json(&json!({ "projectId": project, "query": sql }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn init_and_serve_run_an_embedded_cluster_and_reuse_it_after_ctrl_c() {
    let dir = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("cli")
    ));
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");

    let out = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            fluxbase(&dir, port)
                .args(["init", "--json"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(init["created"], true);
    let project = init["project"]["id"].as_str().unwrap().to_string();
    let admin = init["apiKeys"]["admin"].as_str().unwrap().to_string();
    let read = init["apiKeys"]["read"].as_str().unwrap().to_string();
    assert!(admin.starts_with("flx_live_"));
    assert_eq!(init["baseUrl"], base.as_str());
    // init stopped the cluster it started.
    assert!(!dir.join("pg/data/postmaster.pid").exists());

    let mut server = fluxbase(&dir, port)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_healthy(&base, &mut server).await;
    let v = query(&base, &admin, &project, "CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('kept')").await;
    assert_eq!(v["success"], true, "{v}");
    interrupt(&mut server);
    assert!(
        !dir.join("pg/data/postmaster.pid").exists(),
        "Ctrl-C left PostgreSQL running"
    );

    // Second start: same project, same keys, same data; keys are not printed again.
    let mut server = fluxbase(&dir, port)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_healthy(&base, &mut server).await;
    let v = query(&base, &read, &project, "SELECT body FROM notes").await;
    assert_eq!(v["result"]["rows"], json!([{ "body": "kept" }]), "{v}");
    interrupt(&mut server);
    let mut stderr = String::new();
    use std::io::Read;
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains(&admin), "keys are printed only once");

    let out = fluxbase(&dir, port)
        .args(["init", "--json"])
        .output()
        .unwrap();
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["created"], false);
    assert_eq!(again["project"]["id"], project.as_str());
    assert!(again.get("apiKeys").is_none());
}

#[tokio::test]
async fn project_cli_creates_suspends_and_resumes_projects() {
    let pg = crate::support::pg().await;
    let dir = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("cli")
    ));
    let url = pg.url(&crate::support::unique("ctl"));
    let run = |args: &[&str]| {
        let out = fluxbase(&dir, 0)
            .env("FLUXBASE_DATABASE_URL", &url)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["init"]);
    let created: Value =
        serde_json::from_str(&run(&["project", "create", "--name", "cli made", "--json"])).unwrap();
    let id = created["project"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["project"]["name"], "cli made");
    assert!(created["apiKeys"]["readwrite"]
        .as_str()
        .unwrap()
        .starts_with("flx_live_"));
    run(&["project", "suspend", &id]);
    let ctl = url.rsplit('/').next().unwrap().to_string();
    let status: String = pg
        .client(&ctl)
        .await
        .query_one("SELECT status FROM fluxbase.projects WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "suspended");
    run(&["project", "resume", &id]);
    let out = fluxbase(&dir, 0)
        .env("FLUXBASE_DATABASE_URL", &url)
        .args(["project", "suspend", "ffffffffffffffff"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn doctor_reports_weak_roles_and_unread_slots_and_nothing_else_on_a_good_cluster() {
    let pg = crate::support::pg().await;
    let dir = crate::support::scratch_dir(&crate::support::unique("doctor"));
    let ok = fluxbase(&dir, 0)
        .env("FLUXBASE_DATABASE_URL", pg.url("postgres"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    for problem in ["wal_level", "lacks", "max_slot_wal_keep_size", "too old"] {
        assert!(!text.contains(problem), "{text}");
    }
    // A Fluxbase slot that nobody reads is reported with what it holds.
    let slot = crate::support::unique("fluxbase_doctor");
    let c = pg.client("postgres").await;
    c.query(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();
    let out = fluxbase(&dir, 0)
        .env("FLUXBASE_DATABASE_URL", pg.url("postgres"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    c.query("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text.contains(&format!("replication slot {slot}")) && text.contains("not being read"),
        "{text}"
    );
    // A role without the needed attributes is reported with the fix.
    let role = crate::support::unique("weak");
    pg.client("postgres")
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    let url = format!("postgres://{role}:pw@127.0.0.1:{}/postgres", pg.port);
    let bad = fluxbase(&dir, 0)
        .env("FLUXBASE_DATABASE_URL", url)
        .arg("doctor")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(
        text.contains("lacks CREATEDB")
            && text.contains(&format!("ALTER ROLE \"{role}\" CREATEDB;")),
        "{text}"
    );
}
