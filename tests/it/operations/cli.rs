//! The binary as a newcomer runs it: `fluxbase init --json` and `fluxbase serve` on a fresh data
//! directory start an embedded PostgreSQL cluster (as an unprivileged user when root), print the
//! keys once, stop cleanly on Ctrl-C, and the next start reuses the same project and keys.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::process::{bound_addr, ChildGuard};

/// `fluxbase` on `data_dir` with its embedded cluster; a `serve` listens on a port of its
/// choosing and writes it to `<data_dir>/fluxbase.addr` (see [`serve`]).
fn fluxbase(data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxbase"));
    cmd.env("FLUXBASE_DATA_DIR", data_dir)
        .env("FLUXBASE_LISTEN", "127.0.0.1:0")
        .env("FLUXBASE_ADDR_FILE", data_dir.join("fluxbase.addr"))
        .env_remove("FLUXBASE_DATABASE_URL")
        .env("FLUXBASE_LOG", "warn")
        .current_dir(data_dir);
    cmd
}

/// Starts `cmd` (a `fluxbase serve`, stdout discarded) and returns it with its base URL, once
/// it listens and `/health` answers.
async fn serve(mut cmd: Command, stderr: Stdio) -> (ChildGuard, String) {
    let addr_file = Path::new(
        cmd.get_envs()
            .find(|(k, _)| *k == "FLUXBASE_ADDR_FILE")
            .and_then(|(_, v)| v)
            .expect("FLUXBASE_ADDR_FILE set"),
    )
    .to_path_buf();
    let _ = std::fs::remove_file(&addr_file); // an earlier start's
    let mut server = ChildGuard(
        cmd.arg("serve")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let addr = bound_addr(&addr_file, &mut server)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let base = format!("http://{addr}");
    wait_healthy(&base).await;
    (server, base)
}

/// `/health` of a server that has written its address (so is accepting): answers at once.
async fn wait_healthy(base: &str) {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("/health");
    assert_eq!(r.status(), 200, "/health");
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
    let out = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            // init only prints the address (it never binds): the base URL it names.
            fluxbase(&dir)
                .env("FLUXBASE_LISTEN", "127.0.0.1:8080")
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
    assert_eq!(init["baseUrl"], "http://127.0.0.1:8080");
    // init stopped the cluster it started.
    assert!(!dir.join("pg/data/postmaster.pid").exists());

    // The delivery worker scans every 10 ms: were it left running past the control pool's
    // close, stopping the embedded cluster would give it time to log failed scans.
    let mut first = fluxbase(&dir);
    first.env("FLUXBASE_WEBHOOK_SCAN_MS", "10");
    let (mut server, base) = serve(first, Stdio::piped()).await;
    let v = query(&base, &admin, &project, "CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('kept')").await;
    assert_eq!(v["success"], true, "{v}");
    interrupt(&mut server);
    assert!(
        !dir.join("pg/data/postmaster.pid").exists(),
        "Ctrl-C left PostgreSQL running"
    );
    let mut log = String::new();
    std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        !log.contains("looking for due webhook deliveries")
            && !log.contains("Pool has been closed"),
        "the way out logged failed scans:\n{log}"
    );

    // Second start: same project, same keys, same data; keys are not printed again.
    let (mut server, base) = serve(fluxbase(&dir), Stdio::piped()).await;
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
    // The bound address is printed whatever the log level (with port 0, how it is found).
    assert!(
        stderr.contains(&format!(
            "Listening on {}",
            base.trim_start_matches("http://")
        )),
        "{stderr}"
    );

    let out = fluxbase(&dir).args(["init", "--json"]).output().unwrap();
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["created"], false);
    assert_eq!(again["project"]["id"], project.as_str());
    assert!(again.get("apiKeys").is_none());
}

#[tokio::test]
async fn project_cli_creates_suspends_and_resumes_projects_under_a_running_server() {
    use crate::support::ws::{connect_to, recv, subscribe};
    let pg = crate::support::pg().await;
    let dir = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("cli")
    ));
    let ctl = crate::support::unique("ctl");
    let url = pg.url(&ctl);
    let run = |args: &[&str]| {
        let out = fluxbase(&dir)
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
    let init: Value = serde_json::from_str(&run(&["init", "--json"])).unwrap();
    let first = init["project"]["id"].as_str().unwrap().to_string();
    let first_key = init["apiKeys"]["readwrite"].as_str().unwrap().to_string();
    // A real server process on the same control database, serving while the CLI works.
    let mut server = crate::support::process::ServerProcess::start_on(&ctl, &[]).await;
    let base = server.base.clone();

    let created: Value =
        serde_json::from_str(&run(&["project", "create", "--name", "cli made", "--json"])).unwrap();
    let id = created["project"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["project"]["name"], "cli made");
    let key = created["apiKeys"]["readwrite"]
        .as_str()
        .unwrap()
        .to_string();
    let read = created["apiKeys"]["read"].as_str().unwrap().to_string();
    assert!(key.starts_with("flx_live_"));
    // The running server serves the project the CLI made (and so has it in its caches).
    let (status, v) = sql_call(&base, &key, &id, "SELECT 41 + 1 AS n").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"]["rows"], json!([{ "n": 42 }]), "{v}");
    let mut ws = connect_to(&base, "/").await;
    let ack = subscribe(&mut ws, &id, Some(&read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");

    run(&["project", "suspend", &id]);
    assert_eq!(status_in_db(&ctl, &id).await, "suspended");
    // The server heard it: the project's room is closed with the reason (its access cache was
    // emptied before), and its requests get the guide's answer for a suspended project.
    let m = recv(&mut ws).await;
    assert_eq!(m["code"], "PROJECT_SUSPENDED", "{m}");
    let (status, v) = sql_call(&base, &key, &id, "SELECT 1").await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "PROJECT_SUSPENDED", "{v}");
    // The other project is served meanwhile.
    let (status, v) = sql_call(&base, &first_key, &first, "SELECT 1 AS one").await;
    assert_eq!(status, 200, "{v}");

    run(&["project", "resume", &id]);
    assert_eq!(status_in_db(&ctl, &id).await, "active");
    // Resumed: SQL works again on the running server (once it has heard of it: a hang guard
    // well under the access cache's 60-s lifetime, so a server that never hears still fails).
    crate::support::poll::until(Duration::from_secs(30), Duration::from_millis(100), || {
        let (base, key, id) = (base.clone(), key.clone(), id.clone());
        async move {
            match sql_call(&base, &key, &id, "SELECT 41 + 1 AS n").await {
                (200, v) if v["result"]["rows"] == json!([{ "n": 42 }]) => Ok(()),
                other => Err(format!("the resumed project is not served: {other:?}")),
            }
        }
    })
    .await;
    let mut ws = connect_to(&base, "/").await;
    let ack = subscribe(&mut ws, &id, Some(&read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");

    let out = fluxbase(&dir)
        .env("FLUXBASE_DATABASE_URL", &url)
        .args(["project", "suspend", "ffffffffffffffff"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(server.is_running(), "the CLI broke the running server");
    let (status, v) = sql_call(&base, &first_key, &first, "SELECT 1 AS one").await;
    assert_eq!(status, 200, "{v}");
}

/// The project's status in the control database `ctl`.
async fn status_in_db(ctl: &str, id: &str) -> String {
    crate::support::pg()
        .await
        .client(ctl)
        .await
        .query_one("SELECT status FROM fluxbase.projects WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn doctor_reports_weak_roles_and_unread_slots_and_nothing_else_on_a_good_cluster() {
    // A cluster of its own: on the shared one, another test's project may have a slot that no
    // server reads at this moment, which the doctor rightly reports.
    let pg = crate::support::cluster::DedicatedCluster::start(&[]).await;
    let dir = crate::support::scratch_dir(&crate::support::unique("doctor"));
    let doctor = |url: String| {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                fluxbase(&dir)
                    .env("FLUXBASE_DATABASE_URL", url)
                    .arg("doctor")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let ok = doctor(pg.cluster.url("postgres")).await;
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "a good cluster: {}\n{text}{}",
        ok.status,
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        text.contains("ok: the cluster is ready for Fluxbase") && !text.contains("problem:"),
        "{text}"
    );
    // A cluster it cannot log in to: a failure that says why, not a clean bill of health.
    let url = pg.cluster.url("postgres");
    let wrong = url.replacen(&pg.cluster.password, "not-the-password", 1);
    assert_ne!(url, wrong);
    let out = doctor(wrong).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    // A Fluxbase slot that nobody reads is reported with what it holds.
    let slot = crate::support::unique("fluxbase_doctor");
    let c = pg.client("postgres").await;
    c.query(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();
    let out = doctor(pg.cluster.url("postgres")).await;
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
    c.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    let url = format!(
        "postgres://{role}:pw@127.0.0.1:{}/postgres",
        pg.cluster.port
    );
    let bad = doctor(url).await;
    assert!(!bad.status.success());
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(
        text.contains("lacks CREATEDB")
            && text.contains(&format!("ALTER ROLE \"{role}\" CREATEDB;")),
        "{text}"
    );
}

/// Runs `fluxbase ARGS` on `dir` (embedded cluster) off the async runtime, `stdin` piped in.
async fn run_cli(dir: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = fluxbase(&dir);
        cmd.args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// `fluxbase ARGS` must succeed; returns its standard output.
async fn cli_ok(dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = run_cli(dir, args, stdin).await;
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn sql_call(base: &str, key: &str, project: &str, sql: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/execute-sql"))
        .bearer_auth(key)
        .json(&json!({ "projectId": project, "query": sql }))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn login(base: &str, email: &str, password: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/auth/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// A fresh data directory (named after `tag`) and what `fluxbase init --json` printed there.
async fn initialised(tag: &str) -> (std::path::PathBuf, Value) {
    let dir = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique(tag)
    ));
    let init = serde_json::from_str(&cli_ok(&dir, &["init", "--json"], None).await).unwrap();
    (dir, init)
}

/// Logs in as the user `init` printed and creates a MySQL project (named `m`) on the server at
/// `base`: its id and admin key.
async fn mysql_project(base: &str, init: &Value) -> (String, String) {
    let email = init["user"]["email"].as_str().unwrap();
    let (status, v) = login(base, email, init["user"]["password"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{v}");
    let session = v["token"].as_str().unwrap().to_string();
    let created: Value = reqwest::Client::new()
        .post(format!("{base}/api/projects"))
        .bearer_auth(&session)
        .json(&json!({ "name": "m", "engine": "mysql" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["success"], true, "{created}");
    (
        created["project"]["id"].as_str().unwrap().to_string(),
        created["apiKeys"]["admin"].as_str().unwrap().to_string(),
    )
}

/// The process id of the embedded cluster's postmaster, from its pid file.
fn postmaster_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("pg/data/postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The server still answers normal requests (a table made at the start is still readable).
async fn still_serving(base: &str, key: &str, project: &str, step: &str) {
    let (status, v) = sql_call(base, key, project, "SELECT body FROM notes").await;
    assert_eq!(status, 200, "after {step}: {v}");
    assert_eq!(
        v["result"]["rows"],
        json!([{ "body": "kept" }]),
        "after {step}: {v}"
    );
}

#[tokio::test]
async fn cli_commands_on_a_running_servers_data_dir_use_its_cluster_and_never_restart_it() {
    let (dir, init) = initialised("clilive").await;
    let project = init["project"]["id"].as_str().unwrap().to_string();
    let admin = init["apiKeys"]["admin"].as_str().unwrap().to_string();
    let email = init["user"]["email"].as_str().unwrap().to_string();
    let first_password = init["user"]["password"].as_str().unwrap().to_string();

    let (mut server, base) = serve(fluxbase(&dir), Stdio::null()).await;
    let (status, v) = sql_call(
        &base,
        &admin,
        &project,
        "CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('kept')",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let postmaster = postmaster_pid(&dir).expect("the server's cluster runs");

    // A second server on the same data directory refuses, naming the first one.
    let mut second = ChildGuard(
        fluxbase(&dir)
            .env("FLUXBASE_ADDR_FILE", dir.join("second.addr"))
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second serve started on the same data directory");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "a second serve started");
    let mut stderr = String::new();
    use std::io::Read;
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("already running") && stderr.contains(&format!("pid {}", server.id())),
        "{stderr}"
    );
    still_serving(&base, &admin, &project, "a second serve").await;

    let again: Value =
        serde_json::from_str(&cli_ok(&dir, &["init", "--json"], None).await).unwrap();
    assert_eq!(again["created"], false);
    still_serving(&base, &admin, &project, "init").await;

    // project create: the new project's keys work against the running server at once.
    let created: Value = serde_json::from_str(
        &cli_ok(
            &dir,
            &["project", "create", "--name", "live", "--json"],
            None,
        )
        .await,
    )
    .unwrap();
    let other = created["project"]["id"].as_str().unwrap().to_string();
    let other_rw = created["apiKeys"]["readwrite"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = sql_call(&base, &other_rw, &other, "SELECT 41 + 1 AS n").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"]["rows"], json!([{ "n": 42 }]));
    still_serving(&base, &admin, &project, "project create").await;

    // project suspend: once the server has heard it (its room closes with the reason, after
    // its access cache was emptied), the project's requests are refused; the others are served.
    let mut ws = crate::support::ws::connect_to(&base, "/").await;
    let ack = crate::support::ws::subscribe(&mut ws, &project, Some(&admin)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    cli_ok(&dir, &["project", "suspend", &project], None).await;
    let m = crate::support::ws::recv(&mut ws).await;
    assert_eq!(m["code"], "PROJECT_SUSPENDED", "{m}");
    let (status, v) = sql_call(&base, &admin, &project, "SELECT 1").await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "PROJECT_SUSPENDED", "{v}");
    let (status, v) = sql_call(&base, &other_rw, &other, "SELECT 1").await;
    assert_eq!(status, 200, "{v}");
    cli_ok(&dir, &["project", "resume", &project], None).await;
    // Served again once the server has heard the resume (a hang guard well under the access
    // cache's 60-s lifetime, so a server that never hears still fails).
    crate::support::poll::until(Duration::from_secs(30), Duration::from_millis(100), || {
        let (base, admin, project) = (base.clone(), admin.clone(), project.clone());
        async move {
            match sql_call(&base, &admin, &project, "SELECT body FROM notes").await {
                (200, v) if v["result"]["rows"] == json!([{ "body": "kept" }]) => Ok(()),
                other => Err(format!("the resumed project is not served: {other:?}")),
            }
        }
    })
    .await;

    // keys create: a recovered admin key works against the running server.
    let key: Value = serde_json::from_str(
        &cli_ok(
            &dir,
            &[
                "keys",
                "create",
                "--project",
                &project,
                "--scope",
                "admin",
                "--json",
            ],
            None,
        )
        .await,
    )
    .unwrap();
    assert_eq!(key["scope"], "admin");
    let recovered = key["secret"].as_str().unwrap().to_string();
    assert!(recovered.starts_with("flx_live_"));
    let (status, v) = sql_call(
        &base,
        &recovered,
        &project,
        "INSERT INTO notes (body) VALUES ('x') RETURNING body",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true, "{v}");
    sql_call(
        &base,
        &recovered,
        &project,
        "DELETE FROM notes WHERE body = 'x'",
    )
    .await;
    let out = run_cli(
        &dir,
        &["keys", "create", "--project", &project, "--scope", "root"],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("read, readwrite, admin"));

    // user reset-password: old password and old sessions refused, the new password works.
    let (status, v) = login(&base, &email, &first_password).await;
    assert_eq!(status, 200, "{v}");
    let old_session = v["token"].as_str().unwrap().to_string();
    let me = |token: String| {
        let base = base.clone();
        async move {
            reqwest::Client::new()
                .get(format!("{base}/api/auth/me"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(me(old_session.clone()).await, 200);
    let text = cli_ok(
        &dir,
        &[
            "user",
            "reset-password",
            &email.to_uppercase(),
            "--password-stdin",
        ],
        Some("a brand new passphrase\n"),
    )
    .await;
    assert!(text.contains("1 session(s) revoked"), "{text}");
    assert_eq!(login(&base, &email, &first_password).await.0, 401);
    assert_eq!(me(old_session).await, 401, "the old session is revoked");
    let (status, v) = login(&base, &email, "a brand new passphrase").await;
    assert_eq!(status, 200, "{v}");
    // Without --password-stdin a password is generated and printed once.
    let reset: Value = serde_json::from_str(
        &cli_ok(&dir, &["user", "reset-password", &email, "--json"], None).await,
    )
    .unwrap();
    let generated = reset["password"].as_str().unwrap();
    assert!(generated.len() >= 16, "{reset}");
    assert_eq!(login(&base, &email, "a brand new passphrase").await.0, 401);
    assert_eq!(login(&base, &email, generated).await.0, 200);
    let out = run_cli(
        &dir,
        &["user", "reset-password", "nobody@example.com"],
        None,
    )
    .await;
    assert!(!out.status.success());

    // doctor checks the running server's cluster.
    let out = run_cli(&dir, &["doctor"], None).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok: the cluster is ready"), "{text}");

    // project delete: the other project is gone, this one is still served.
    cli_ok(&dir, &["project", "delete", &other], None).await;
    let (status, v) = sql_call(&base, &other_rw, &other, "SELECT 1").await;
    assert!(status == 401 || status == 404, "{status} {v}");
    still_serving(&base, &admin, &project, "project delete").await;

    assert_eq!(
        postmaster_pid(&dir),
        Some(postmaster),
        "a CLI command restarted the server's PostgreSQL"
    );
    assert!(server.try_wait().unwrap().is_none(), "the server died");
    interrupt(&mut server);
    assert!(postmaster_pid(&dir).is_none());

    // With no server, doctor starts the embedded cluster for the check and stops it after.
    let out = run_cli(&dir, &["doctor"], None).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok: the cluster is ready"), "{text}");
    assert!(
        postmaster_pid(&dir).is_none(),
        "doctor left PostgreSQL running"
    );
}

#[tokio::test]
async fn serve_waits_for_a_cli_command_that_holds_the_data_directory() {
    let dir = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("cliwait")
    ));
    // This test process plays a CLI command running the embedded cluster itself.
    let held = fluxbase::embedded::DataDirLock::try_acquire(&dir, "project")
        .unwrap()
        .unwrap_or_else(|holder| panic!("held by {holder:?}"));
    let addr_file = dir.join("fluxbase.addr");
    let mut server = ChildGuard(
        fluxbase(&dir)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The sentinel: the server blocks on the data directory's lock (a waiter of it in
    // /proc/locks). It takes the lock before anything else, so until it has it, it must not
    // have touched the cluster.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !waits_for_a_flock(server.id()) {
        assert!(server.try_wait().unwrap().is_none(), "serve gave up");
        assert!(
            Instant::now() < deadline,
            "serve never waited for the data directory's lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !dir.join("pg/data/postmaster.pid").exists(),
        "serve started PostgreSQL under a CLI command"
    );
    assert!(!addr_file.exists(), "serve listened under a CLI command");
    drop(held);
    let addr = bound_addr(&addr_file, &mut server)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_healthy(&format!("http://{addr}")).await;
    let holder = fluxbase::embedded::DataDirLock::holder(&dir).unwrap();
    assert_eq!(holder.role, "serve");
    assert_eq!(holder.pid, server.id());
    assert!(holder.pg_port.is_some());
    interrupt(&mut server);
}

/// Whether process `pid` waits for a `flock` (a blocked request in `/proc/locks`: `N: -> FLOCK
/// ADVISORY WRITE <pid> …`).
fn waits_for_a_flock(pid: u32) -> bool {
    let locks = std::fs::read_to_string("/proc/locks").expect("reading /proc/locks");
    locks.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 5 && f[1] == "->" && f[2] == "FLOCK" && f[5] == pid.to_string()
    })
}

/// `FLUXBASE_DATA_DIR` relative to the working directory (as the default `.fluxbase` is), the
/// server and the CLI each in another working directory: a CLI command beside the running
/// server finds its embedded PostgreSQL and MariaDB (whose pid file's server names the
/// absolute data directory) and acts through them: `project suspend` of a MySQL project locks
/// its accounts on the server's MariaDB (it failed with "has not started its embedded MariaDB
/// yet" when the relative path was compared with the absolute one), `resume` unlocks them;
/// Ctrl-C then stops the server with both databases.
#[tokio::test]
async fn cli_commands_with_a_relative_data_dir_reach_the_running_servers_mariadb() {
    let top = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("clirel")
    ));
    let dir = top.join("rel/path");
    std::fs::create_dir_all(&dir).unwrap();
    // The server runs in `top` on `rel/path`; the CLI in `top/rel` on `path`.
    let server_cmd = || {
        let mut cmd = fluxbase(&dir);
        cmd.env("FLUXBASE_DATA_DIR", "rel/path")
            .env_remove("FLUXBASE_MYSQL_URL")
            .current_dir(&top);
        cmd
    };
    let cli = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (dir, cwd) = (dir.clone(), top.join("rel"));
        async move {
            tokio::task::spawn_blocking(move || {
                fluxbase(&dir)
                    .env("FLUXBASE_DATA_DIR", "path")
                    .env_remove("FLUXBASE_MYSQL_URL")
                    .current_dir(cwd)
                    .args(&args)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let ok = |out: std::process::Output, what: &str| -> String {
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let init: Value = serde_json::from_str(&ok(cli(&["init", "--json"]).await, "init")).unwrap();
    assert!(
        dir.join("pg").is_dir(),
        "init did not use rel/path from top/rel"
    );
    let (mut server, base) = serve(server_cmd(), Stdio::null()).await;
    // A MySQL project: the server starts its embedded MariaDB under rel/path.
    let (project, admin) = mysql_project(&base, &init).await;
    let (status, v) = sql_call(&base, &admin, &project, "CREATE TABLE notes (body text)").await;
    assert_eq!(status, 200, "{v}");
    let mariadbd: u32 = std::fs::read_to_string(dir.join("mariadb/mariadbd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let postmaster = postmaster_pid(&dir).expect("the server's cluster runs");

    ok(
        cli(&["project", "suspend", &project]).await,
        "project suspend",
    );
    let (status, v) = sql_call(&base, &admin, &project, "SELECT 1").await;
    assert_eq!(status, 403, "{v}");
    // The project's accounts were locked on the server's MariaDB by the CLI itself.
    let db = dir.join("mariadb");
    let port = fluxbase::mysql::embedded::running_port(&db).expect("the server's MariaDB");
    let secrets = fluxbase::secrets::Secrets::load_or_create(&dir).unwrap();
    let url = fluxbase::mysql::embedded_admin_url(&secrets, port);
    // (user, locked) of the project's three accounts, as the server has them.
    let locked = || async {
        use mysql_async::prelude::Queryable;
        let mut conn = mysql_async::Conn::from_url(url.as_str()).await.unwrap();
        let rows: Vec<(String, String)> = conn
            .query(format!(
                "SELECT User, Priv FROM mysql.global_priv WHERE User LIKE 'fx\\_{project}\\_%'"
            ))
            .await
            .unwrap();
        let _ = conn.disconnect().await;
        assert_eq!(rows.len(), 3, "{rows:?}");
        rows.iter()
            .filter(|(_, p)| {
                let p: Value = serde_json::from_str(p).unwrap();
                p["account_locked"] == true
            })
            .count()
    };
    assert_eq!(
        locked().await,
        3,
        "the CLI did not lock the project's accounts"
    );
    ok(
        cli(&["project", "resume", &project]).await,
        "project resume",
    );
    assert_eq!(
        locked().await,
        0,
        "the CLI did not unlock the project's accounts"
    );
    crate::support::poll::until(Duration::from_secs(30), Duration::from_millis(100), || {
        let (base, admin, project) = (base.clone(), admin.clone(), project.clone());
        async move {
            match sql_call(&base, &admin, &project, "SELECT count(*) AS n FROM notes").await {
                (200, v) if v["result"]["rows"] == json!([{ "n": 0 }]) => Ok(()),
                other => Err(format!(
                    "the resumed MySQL project is not served: {other:?}"
                )),
            }
        }
    })
    .await;
    assert_eq!(
        postmaster_pid(&dir),
        Some(postmaster),
        "a CLI command restarted PostgreSQL"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{mariadbd}")).exists(),
        "a CLI command stopped the server's MariaDB"
    );

    // Ctrl-C: the server stops both.
    interrupt(&mut server);
    assert!(postmaster_pid(&dir).is_none());
    let deadline = Instant::now() + Duration::from_secs(60);
    while fluxbase::mysql::embedded::running_port(&db).is_some() {
        assert!(Instant::now() < deadline, "MariaDB outlived its server");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/metrics` of the server at `base` (loopback, no token configured): the value of `series`.
async fn metric(base: &str, series: &str) -> Option<f64> {
    let body = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Rows of `notes` (their `body`) the socket receives as `db_event`s until `last` arrives.
async fn bodies_until(ws: &mut crate::support::ws::Socket, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let m = crate::support::ws::next(ws).await;
        if m["type"] != "db_event" {
            continue; // `status` (degraded, live) while the stream reconnects
        }
        let body = m["payload"]["record"]["body"].as_str().unwrap().to_string();
        seen.push(body.clone());
        if body == last {
            return seen;
        }
    }
}

/// Runs `sql` on the project (its id and admin key), then a socket subscribed to its room.
async fn watched(
    base: &str,
    (project, admin): (&str, &str),
    sql: &str,
) -> crate::support::ws::Socket {
    let (status, v) = sql_call(base, admin, project, sql).await;
    assert_eq!(status, 200, "{v}");
    let mut ws = crate::support::ws::connect_to(base, "/").await;
    let ack = crate::support::ws::subscribe(&mut ws, project, Some(admin)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    ws
}

/// Polls `sql` on the project until it answers 200 (the database is back).
async fn served_again(base: &str, key: &str, project: &str, sql: &str, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, v) = sql_call(base, key, project, sql).await;
        if status == 200 && v["success"] == true {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} was not served again: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn serve_starts_its_embedded_databases_again_after_they_are_killed() {
    let (dir, init) = initialised("supervise").await;
    let project = init["project"]["id"].as_str().unwrap().to_string();
    let admin = init["apiKeys"]["admin"].as_str().unwrap().to_string();
    // The cluster is left running when `serve` starts (as after a CLI command ended by Ctrl-C,
    // or a server killed a moment ago): `serve` stops it and starts its own, which it must
    // still supervise.
    let leftover = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            let secrets = fluxbase::secrets::Secrets::load_or_create(&dir).unwrap();
            fluxbase::embedded::Cluster::start(&dir.join("pg"), &secrets.pg_password, &[]).unwrap()
        }
    })
    .await
    .unwrap();
    let leftover_pid = postmaster_pid(&dir).expect("the leftover cluster runs");
    let (mut server, base) = serve(
        {
            let mut cmd = fluxbase(&dir);
            cmd.env_remove("FLUXBASE_MYSQL_URL");
            cmd
        },
        Stdio::null(),
    )
    .await;
    drop(leftover);
    let mut ws = watched(
        &base,
        (&project, &admin),
        "CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('kept')",
    )
    .await;

    // PostgreSQL killed -9 right after a commit: started again on its port, the SQL API serves
    // again, and the room gets the change committed before the kill and one made after.
    let postmaster = postmaster_pid(&dir).expect("the server's cluster runs");
    assert_ne!(postmaster, leftover_pid, "serve kept the leftover cluster");
    let (status, v) = sql_call(
        &base,
        &admin,
        &project,
        "INSERT INTO notes (body) VALUES ('before the kill')",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let killed = Command::new("kill")
        .args(["-KILL", &postmaster.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    served_again(
        &base,
        &admin,
        &project,
        "INSERT INTO notes (body) VALUES ('after the restart')",
        "PostgreSQL",
    )
    .await;
    let again = postmaster_pid(&dir).expect("PostgreSQL runs again");
    assert_ne!(again, postmaster);
    let seen = bodies_until(&mut ws, "after the restart").await;
    assert!(
        seen.iter().any(|b| b == "before the kill"),
        "the change committed before the kill was lost: {seen:?}"
    );
    // Nothing committed was lost by the crash.
    let (status, v) = sql_call(
        &base,
        &admin,
        &project,
        "SELECT body FROM notes ORDER BY id",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["result"]["rows"],
        json!([{ "body": "kept" }, { "body": "before the kill" }, { "body": "after the restart" }])
    );
    assert_eq!(
        metric(
            &base,
            "fluxbase_embedded_restarts_total{engine=\"postgresql\"}"
        )
        .await,
        Some(1.0)
    );

    // MariaDB killed -9: the same for a MySQL project.
    let (my, my_admin) = mysql_project(&base, &init).await;
    let mut my_ws = watched(
        &base,
        (&my, &my_admin),
        "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'kept')",
    )
    .await;
    let db = dir.join("mariadb");
    let port = fluxbase::mysql::embedded::running_port(&db).expect("the server's MariaDB");
    let mariadbd = fluxbase::mysql::embedded::server_process(&db).expect("mariadbd runs");
    let (status, v) = sql_call(
        &base,
        &my_admin,
        &my,
        "INSERT INTO notes VALUES (2, 'before the kill')",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(mariadbd.signal(rustix::process::Signal::KILL));
    served_again(
        &base,
        &my_admin,
        &my,
        "INSERT INTO notes VALUES (3, 'after the restart')",
        "MariaDB",
    )
    .await;
    let again = fluxbase::mysql::embedded::server_process(&db).expect("MariaDB runs again");
    assert_ne!(again.pid, mariadbd.pid);
    assert_eq!(
        fluxbase::mysql::embedded::running_port(&db),
        Some(port),
        "MariaDB came back on another port"
    );
    let seen = bodies_until(&mut my_ws, "after the restart").await;
    assert!(
        seen.iter().any(|b| b == "before the kill"),
        "the change committed before the kill was lost: {seen:?}"
    );
    assert_eq!(
        metric(
            &base,
            "fluxbase_embedded_restarts_total{engine=\"mariadb\"}"
        )
        .await,
        Some(1.0)
    );

    // Ctrl-C: the server stops both, and its supervisors start neither again.
    interrupt(&mut server);
    assert!(
        postmaster_pid(&dir).is_none(),
        "PostgreSQL outlived its server"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while fluxbase::mysql::embedded::running_port(&db).is_some() {
        assert!(Instant::now() < deadline, "MariaDB outlived its server");
        std::thread::sleep(Duration::from_millis(100));
    }
}
