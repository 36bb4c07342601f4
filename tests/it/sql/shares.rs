//! The SQL connections of one account's projects together (`sql_account_connections`), beside
//! each project's share: one account cannot hold the connections other accounts need (red team
//! rt5: `sql_project_connections` × `max_projects_per_user` = 80 connections for one account,
//! more than a small cluster's budget).

use serde_json::{json, Value};

use crate::support::{spawn_app_with, Fixture, TestApp};

/// A project of the account of `token`: (project id, read key).
pub async fn another_project(app: &TestApp, token: &str, engine: &str) -> (String, String) {
    let (status, body) = app
        .call(
            "POST",
            "/api/projects",
            Some(token),
            Some(json!({ "name": "another", "engine": engine })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let keys = crate::support::fixtures::keys_of(&body);
    (keys.project, keys.read)
}

/// Statements of `projects` running `pg_sleep` now.
async fn sleeping(pg: &tokio_postgres::Client, projects: &[&str]) -> i64 {
    let patterns: Vec<String> = projects.iter().map(|p| format!("fx\\_{p}\\_%")).collect();
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE state = 'active' AND query LIKE '%pg_sleep%' AND usename LIKE ANY($1)",
        &[&patterns],
    )
    .await
    .unwrap()
    .get(0)
}

/// Every task's (status, body), checking that a refusal is the guide's 429 `RATE_LIMIT`.
async fn outcomes(tasks: Vec<tokio::task::JoinHandle<(u16, String)>>) -> Vec<(u16, Value)> {
    let mut out = Vec::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        match status {
            200 => assert_eq!(body["success"], true, "{body}"),
            429 => {
                assert_eq!(body["success"], false, "{body}");
                assert_eq!(body["error"]["code"], "RATE_LIMIT", "{body}");
            }
            other => panic!("{other}: {body}"),
        }
        out.push((status, body));
    }
    out
}

/// Statements ended by their project's deletion (how depends on when: an error either way)
/// are never answered "unreachable, retry" (503) for a project that is gone (red team rt6 L2):
/// 404 `PROJECT_NOT_FOUND`, or 200 `SQL_EXEC_ERROR` when the drop's error came first.
async fn assert_ended_by_deletion(tasks: Vec<tokio::task::JoinHandle<(u16, String)>>) {
    for task in tasks {
        let (status, body) = task.await.unwrap();
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["success"], false, "{status} {body}");
        assert!(
            (status, body["error"]["code"].as_str()) == (404, Some("PROJECT_NOT_FOUND"))
                || (status, body["error"]["code"].as_str()) == (200, Some("SQL_EXEC_ERROR")),
            "{status} {body}"
        );
    }
}

/// Two projects of a new account each send `per_project` × `pg_sleep(8)`: at most `held` run
/// at once, those past it get 429 with `refusal` in the message, and another account's request
/// is served while they run.
async fn flood_two_projects(app: &TestApp, per_project: usize, held: i64, refusal: &str) {
    let noisy = app.fixture().await;
    let (second, second_read) = another_project(app, &noisy.token, "postgresql").await;
    let quiet = app.fixture().await;
    let watcher = crate::support::cluster::pg().await.client("postgres").await;
    let projects = [noisy.project.as_str(), second.as_str()];

    let attack: Vec<_> = (0..2 * per_project)
        .map(|i| {
            let (key, project) = if i % 2 == 0 {
                (&noisy.read, &noisy.project)
            } else {
                (&second_read, &second)
            };
            app.spawn_sql(key, project, "SELECT pg_sleep(8)")
        })
        .collect();
    until_sleeping(&watcher, &projects, held, &attack).await;

    // Meanwhile another account is answered, correctly.
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&quiet.read),
            Some(json!({ "projectId": quiet.project, "query": "SELECT 41 + 1 AS answer" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["rows"], json!([{ "answer": 42 }]), "{body}");
    let running = sleeping(&watcher, &projects).await;
    assert!(
        running <= held,
        "{running} statements of the account run at once"
    );

    let all = outcomes(attack).await;
    let answered = all.iter().filter(|(s, _)| *s == 200).count();
    let by_account = all
        .iter()
        .filter(|(s, b)| *s == 429 && b["error"]["message"].as_str().unwrap().contains(refusal))
        .count();
    assert!(
        answered >= held as usize && by_account > 0,
        "{answered} answered, {by_account} refused naming {refusal:?}: {all:?}"
    );
    // Nothing is held once it is over: the account's projects are served again.
    assert_eq!(
        app.rows(&second_read, &second, "SELECT 1 AS one").await,
        vec![json!({ "one": 1 })]
    );
    assert_eq!(app.app.sql.account_shares_in_use(), 0);
}

/// Red team rt5, measured in session 27 with the defaults and `sql_max_connections = 16`: one
/// account's two projects with 8 × `pg_sleep` each held all 16 connections and another
/// tenant's `SELECT 1` got 429 naming `sql_max_connections`. Now the account holds at most half
/// of that budget (8: its `sql_account_connections`, 16, is more than half), its requests past
/// it get 429 naming `sql_account_connections`, and the other tenant is served.
#[tokio::test]
async fn one_accounts_projects_cannot_hold_the_connections_another_account_needs() {
    let app = spawn_app_with(|c| {
        c.sql_max_connections = 16;
        c.sql_queue_timeout_ms = 2_000;
    })
    .await;
    flood_two_projects(
        &app,
        8,
        8,
        "(sql_account_connections = 16, here half of the server's 16 SQL connections",
    )
    .await;
    app.stop().await;
}

/// With room in the budget, `sql_account_connections` itself bounds one account's projects
/// together (6 here, each project's share 4).
#[tokio::test]
async fn one_accounts_projects_hold_at_most_its_share_together() {
    let app = spawn_app_with(|c| {
        c.sql_project_connections = 4;
        c.sql_account_connections = 6;
        c.sql_queue_timeout_ms = 2_000;
    })
    .await;
    flood_two_projects(&app, 6, 6, "(sql_account_connections)").await;
    app.stop().await;
}

/// `member` joins `project` as `role` on the invitation of the admin session `by`.
async fn join(app: &TestApp, by: &str, project: &str, member: &Fixture, role: &str) {
    let (status, body) = app
        .call(
            "POST",
            "/api/team",
            Some(by),
            Some(json!({ "projectId": project, "email": member.email, "role": role })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let invite = body["invite"]["id"].as_str().unwrap();
    let (status, body) = app
        .call(
            "POST",
            "/api/team/invites/accept",
            Some(&member.token),
            Some(json!({ "inviteId": invite, "status": "accepted" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// `member` is removed from `project` by the admin credential `by`.
async fn leave(app: &TestApp, by: &str, project: &str, member: &Fixture) {
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/api/team?projectId={project}&userId={}", member.user_id),
            Some(by),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// `SELECT 1` with `key` on `project` is refused with the guide's 429 `RATE_LIMIT` naming
/// `sql_account_connections`: the account's share is full.
async fn refused_by_the_account_share(app: &TestApp, key: &str, project: &str) {
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(key),
            Some(json!({ "projectId": project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "RATE_LIMIT", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("sql_account_connections"), "{message}");
}

/// Waits until `n` statements of `projects` run `pg_sleep`.
async fn until_sleeping(
    pg: &tokio_postgres::Client,
    projects: &[&str],
    n: i64,
    tasks: &[tokio::task::JoinHandle<(u16, String)>],
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sleeping(pg, projects).await < n {
        assert!(
            !tasks.iter().all(|t| t.is_finished()),
            "the requests were answered before {n} of them ran"
        );
        assert!(std::time::Instant::now() < deadline, "never {n} at once");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A project whose first admin leaves counts for the account of the next admin from then on
/// (the same account the answer budget counts by): its requests are no longer held back by
/// the account that created it, and they take the places of the account that now carries it.
#[tokio::test]
async fn a_project_whose_first_admin_leaves_counts_for_the_next_admins_account() {
    let app = spawn_app_with(|c| {
        c.sql_project_connections = 2;
        c.sql_account_connections = 2;
        c.sql_queue_timeout_ms = 1_500;
    })
    .await;
    let a = app.fixture().await;
    let (handed, handed_read) = another_project(&app, &a.token, "postgresql").await;
    let b = app.fixture().await;
    // B joins the second project as admin, and A leaves it.
    join(&app, &a.token, &handed, &b, "admin").await;
    leave(&app, &b.token, &handed, &a).await;
    let watcher = crate::support::cluster::pg().await.client("postgres").await;

    // A's account is full with its first project's statements …
    let a_sleeps: Vec<_> = (0..2)
        .map(|_| app.spawn_sql(&a.read, &a.project, "SELECT pg_sleep(10)"))
        .collect();
    until_sleeping(&watcher, &[&a.project], 2, &a_sleeps).await;
    // … and the project it handed over is served: it counts for B now.
    assert_eq!(
        app.rows(&handed_read, &handed, "SELECT 1 AS one").await,
        vec![json!({ "one": 1 })]
    );
    // B's own project and the handed one fill B's account together.
    let b_sleeps = vec![
        app.spawn_sql(&b.read, &b.project, "SELECT pg_sleep(10)"),
        app.spawn_sql(&handed_read, &handed, "SELECT pg_sleep(10)"),
    ];
    until_sleeping(&watcher, &[&b.project, &handed], 2, &b_sleeps).await;
    refused_by_the_account_share(&app, &b.read, &b.project).await;
    for (status, _) in outcomes(a_sleeps.into_iter().chain(b_sleeps).collect()).await {
        assert_eq!(status, 200);
    }
    app.stop().await;
}

/// Deleting a project while its statements run gives its account's places back once they
/// end (the deletion ends them): the account's other project, refused while they ran, is
/// served after.
#[tokio::test]
async fn deleting_a_project_while_its_statements_run_gives_its_accounts_places_back() {
    let app = spawn_app_with(|c| {
        c.sql_project_connections = 2;
        c.sql_account_connections = 2;
        c.sql_queue_timeout_ms = 1_500;
    })
    .await;
    let a = app.fixture().await;
    let (doomed, doomed_read) = another_project(&app, &a.token, "postgresql").await;
    let watcher = crate::support::cluster::pg().await.client("postgres").await;
    let sleeps: Vec<_> = (0..2)
        .map(|_| app.spawn_sql(&doomed_read, &doomed, "SELECT pg_sleep(60)"))
        .collect();
    until_sleeping(&watcher, &[&doomed], 2, &sleeps).await;
    refused_by_the_account_share(&app, &a.read, &a.project).await;
    app.delete_project(&doomed, &a.token).await;
    assert_eq!(
        app.rows(&a.read, &a.project, "SELECT 1 AS one").await,
        vec![json!({ "one": 1 })]
    );
    assert_ended_by_deletion(sleeps).await;
    assert_eq!(app.app.sql.account_shares_in_use(), 0);
    app.stop().await;
}

/// A deletion by another process (`fluxbase project delete`, as another node of a cluster
/// would): the statements its drop ends here are answered as the project being gone, never
/// "unreachable, retry" (503), since the deleting process announces the deletion to every
/// server before it drops the database.
#[tokio::test]
async fn statements_ended_by_a_deletion_through_the_cli_are_not_answered_503() {
    let app = crate::support::spawn_app().await;
    let f = app.fixture().await;
    let watcher = crate::support::cluster::pg().await.client("postgres").await;
    let sleeps: Vec<_> = (0..2)
        .map(|_| app.spawn_sql(&f.read, &f.project, "SELECT pg_sleep(60)"))
        .collect();
    until_sleeping(&watcher, &[&f.project], 2, &sleeps).await;
    let config = &app.app.config;
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_fluxbase"))
        .args(["project", "delete", &f.project])
        .env("FLUXBASE_DATA_DIR", &config.data_dir)
        .env(
            "FLUXBASE_DATABASE_URL",
            config.database_url.as_ref().unwrap().expose(),
        )
        .env("FLUXBASE_LOG", "warn")
        .output();
    let out = tokio::task::spawn_blocking(move || cli.unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ended_by_deletion(sleeps).await;
    app.stop().await;
}

/// A client that hangs up leaves its statement holding its account's place until the statement
/// ends (the request runs to its end in a task of its own): hanging up never frees room the
/// database has not freed, for the account as for the project.
#[tokio::test]
async fn a_client_hanging_up_leaves_its_statement_holding_its_accounts_place() {
    let app = spawn_app_with(|c| {
        c.sql_project_connections = 2;
        c.sql_account_connections = 2;
        c.sql_queue_timeout_ms = 1_000;
    })
    .await;
    let a = app.fixture().await;
    let (second, second_read) = another_project(&app, &a.token, "postgresql").await;
    let watcher = crate::support::cluster::pg().await.client("postgres").await;
    let sleeps: Vec<_> = (0..2)
        .map(|_| app.spawn_sql(&a.read, &a.project, "SELECT pg_sleep(20)"))
        .collect();
    until_sleeping(&watcher, &[&a.project], 2, &sleeps).await;
    // The clients hang up; their statements still run.
    for task in &sleeps {
        task.abort();
    }
    for task in sleeps {
        assert!(task.await.unwrap_err().is_cancelled());
    }
    assert_eq!(sleeping(&watcher, &[&a.project]).await, 2);
    refused_by_the_account_share(&app, &second_read, &second).await;
    assert_eq!(sleeping(&watcher, &[&a.project]).await, 2);
    app.stop().await;
}

/// An admin made by another admin's role change never agreed to carry the project (red team
/// rt6 H1): A invites V as a viewer and makes V admin. The project stays A's: A, its last
/// owner, cannot leave (red team rt7 H1), and it counts neither against V's connections (V's
/// own project is served while it runs its share full) nor against V's project quota.
#[tokio::test]
async fn an_admin_made_by_a_role_change_is_not_charged_for_the_project() {
    let app = spawn_app_with(|c| {
        c.sql_project_connections = 2;
        c.sql_account_connections = 2;
        c.sql_queue_timeout_ms = 1_500;
        c.max_projects_per_user = 2;
    })
    .await;
    let a = app.fixture().await;
    let (pushed, pushed_read) = another_project(&app, &a.token, "postgresql").await;
    let v = app.fixture().await;
    join(&app, &a.token, &pushed, &v, "viewer").await;
    let (status, body) = app
        .call(
            "PATCH",
            "/api/team",
            Some(&a.token),
            Some(json!({ "projectId": pushed, "userId": v.user_id, "role": "admin" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Nor can A leave V with it: A is the project's last owner (red team rt7 H1: a project with
    // no owner counted for no account).
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/api/team?projectId={pushed}&userId={}", a.user_id),
            Some(&a.token),
            None,
        )
        .await;
    crate::support::http::assert_last_owner(status, &body);

    let watcher = crate::support::cluster::pg().await.client("postgres").await;
    let sleeps: Vec<_> = (0..2)
        .map(|_| app.spawn_sql(&pushed_read, &pushed, "SELECT pg_sleep(8)"))
        .collect();
    until_sleeping(&watcher, &[&pushed], 2, &sleeps).await;
    assert_eq!(
        app.rows(&v.read, &v.project, "SELECT 1 AS one").await,
        vec![json!({ "one": 1 })]
    );
    // V's quota of 2: its own project and a second one; the pushed project is not V's.
    another_project(&app, &v.token, "postgresql").await;
    for (status, _) in outcomes(sleeps).await {
        assert_eq!(status, 200);
    }
    app.stop().await;
}
