//! The dashboard in a real browser: each test starts `fluxbase serve` (a child process on the
//! shared cluster) and runs one spec of `tests/browser/specs/` (Node.js + puppeteer-core driving
//! Debian's headless Chromium) against it. A spec exits non-zero when an assertion fails, the
//! page throws, or it breaks the Content-Security-Policy; its output is shown on failure.
//! Screenshots of every view land in `target/browser-artifacts/` (`<spec>-<name>.png`).
//!
//! `scripts/deps.sh test` installs Chromium (Debian's `chromium`) and the spec's npm packages
//! (`tests/browser/package-lock.json`, `npm ci`).

mod headers;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::support::process::ServerProcess;

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// At most this many specs at once: each holds a server (with its connections to the shared
/// cluster) and a Chromium, heavy beside the rest of the suite on a small machine.
static SPECS_AT_ONCE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Runs `tests/browser/specs/<name>.mjs` against a fresh server started with `env`.
async fn run_spec(name: &str, env: &[(&str, &str)]) {
    let _turn = SPECS_AT_ONCE.acquire().await.expect("never closed");
    // The request limits a user meets (the guide's 50 per key, 300 per session, per 10 s): a
    // view that needs more than that is a bug (sign-ups from this one address stay unlimited).
    let mut env = env.to_vec();
    env.extend([
        ("FLUXBASE_RATE_LIMIT_REQUESTS", "50"),
        ("FLUXBASE_SESSION_RATE_LIMIT_REQUESTS", "300"),
    ]);
    let server = ServerProcess::start(&env).await;
    let dir = browser_dir();
    assert!(
        dir.join("node_modules/puppeteer-core").exists(),
        "the browser tests' packages are missing: run `scripts/deps.sh test` (or `npm ci` in {})",
        dir.display()
    );
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    let child = tokio::process::Command::new("node")
        .arg(dir.join("specs").join(format!("{name}.mjs")))
        .current_dir(&dir)
        .env("FLUXBASE_URL", &server.base)
        .env("ARTIFACTS_DIR", &artifacts)
        // The operator's CLI on the server's control database (suspending a project).
        .env("OPERATOR_CLI", env!("CARGO_BIN_EXE_fluxbase"))
        .env(
            "OPERATOR_DATABASE_URL",
            crate::support::cluster::pg().await.url(server.control_db()),
        )
        .env("OPERATOR_DATA_DIR", &server.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node (scripts/deps.sh test installs Node.js)");
    // A hang guard for a loaded machine, not a timing claim: each step of a spec waits at most
    // 30 s for what it expects.
    let out = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("spec {name} hung for 10 minutes"))
        .expect("running the spec");
    assert!(
        out.status.success(),
        "spec {name} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
}

#[tokio::test]
async fn projects_sign_up_create_switch_sign_out() {
    run_spec("projects", &[]).await;
}

#[tokio::test]
async fn settings_and_api_keys() {
    run_spec("settings_keys", &[]).await;
}

#[tokio::test]
async fn team_invite_accept_change_role_remove() {
    run_spec("team", &[]).await;
}

#[tokio::test]
async fn sql_editor_runs_shows_types_history_errors_and_end_users() {
    run_spec("sql_editor", &[]).await;
}

#[tokio::test]
async fn table_editor_creates_inserts_edits_deletes() {
    run_spec("table_editor", &[]).await;
}

#[tokio::test]
async fn rls_policy_created_and_toggled_changes_what_an_end_user_sees() {
    run_spec("rls", &[]).await;
}

#[tokio::test]
async fn storage_buckets_upload_download_signed_urls() {
    run_spec("storage", &[]).await;
}

#[tokio::test]
async fn webhooks_created_and_their_deliveries_shown() {
    run_spec("webhooks", &[("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "true")]).await;
}

#[tokio::test]
async fn realtime_inspector_shows_live_events_and_sends_broadcasts() {
    run_spec("realtime_inspector", &[]).await;
}

#[tokio::test]
async fn health_shows_change_capture_and_storage() {
    run_spec("health", &[]).await;
}

#[tokio::test]
async fn security_no_key_in_the_page_csp_enforced_cross_site_posts_and_framing_refused() {
    run_spec("security", &[]).await;
}

#[tokio::test]
async fn accessibility_every_page_light_and_dark_and_keyboard_sign_in() {
    run_spec("accessibility", &[]).await;
}
