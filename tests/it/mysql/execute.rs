//! `/api/execute-sql` on a MySQL project: the guide's shapes and snippet, params, scripts,
//! errors, limits and timeouts.

use std::process::Command;

use serde_json::json;

use crate::support::mariadb::spawn_mysql_app;
use crate::support::spawn_app_with;

#[tokio::test]
async fn the_guides_query_snippet_works_unchanged_against_a_mysql_project() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE users (id int AUTO_INCREMENT PRIMARY KEY, name text, active boolean); \
         INSERT INTO users (name, active) VALUES ('Alice', true), ('Bob', false), ('Carol', true)",
    )
    .await;
    let dir = crate::support::scratch_dir(&crate::support::unique("node"));
    let script = dir.join("fluxbase.mjs");
    std::fs::write(
        &script,
        crate::operations::guide::GUIDE_SNIPPET.replace("__BASE_URL__", &app.base),
    )
    .unwrap();
    let (key, project) = (f.read.clone(), f.project.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .env("FLUXBASE_API_KEY", key)
            .env("FLUXBASE_PROJECT_ID", project)
            .output()
            .expect("node is installed (make test installs it)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("{ id: 1, name: 'Alice' }"), "{stdout}");
    assert!(stdout.contains("{ id: 3, name: 'Carol' }"), "{stdout}");
    assert!(!stdout.contains("Bob"), "{stdout}");
}

#[tokio::test]
async fn answers_have_the_guides_shapes() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let body = app
        .sql(&f.admin, &f.project, "CREATE TABLE todos (id bigint AUTO_INCREMENT PRIMARY KEY, title varchar(100) NOT NULL, done bool NOT NULL DEFAULT false)")
        .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["result"]["message"], "CREATE TABLE");
    assert_eq!(body["executionInfo"]["operation"], "CREATE TABLE");
    assert_eq!(body["result"]["rowCount"], 0);

    let body = app
        .sql_params(
            &f.readwrite,
            &f.project,
            "INSERT INTO todos (title) VALUES ($1), ($2)",
            json!(["a", "b"]),
        )
        .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["result"]["message"], "INSERT 0 2");
    assert_eq!(body["result"]["rowCount"], 2);
    assert_eq!(body["executionInfo"]["operation"], "INSERT");

    // UPDATE counts the rows it matched (as PostgreSQL), also those it left as they were.
    let body = app
        .sql(&f.readwrite, &f.project, "UPDATE todos SET done = false")
        .await;
    assert_eq!(body["result"]["message"], "UPDATE 2", "{body}");
    assert_eq!(body["executionInfo"]["rowCount"], 2);

    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT id, title, done FROM todos ORDER BY id",
        )
        .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(
        body["result"]["rows"],
        json!([{ "id": 1, "title": "a", "done": 0 }, { "id": 2, "title": "b", "done": 0 }])
    );
    assert_eq!(body["result"]["columns"], json!(["id", "title", "done"]));
    assert_eq!(
        body["result"]["columnTypes"],
        json!(["bigint", "varchar", "tinyint"])
    );
    assert_eq!(body["result"]["rowCount"], 2);
    assert_eq!(body["result"]["message"], json!(null));
    assert_eq!(body["result"]["truncated"], false);
    assert_eq!(body["executionInfo"]["operation"], "SELECT");
    assert_eq!(body["executionInfo"]["rowCount"], 2);
    assert!(body["executionInfo"]["time"]
        .as_str()
        .unwrap()
        .ends_with("ms"));
}

#[tokio::test]
async fn params_bind_dollar_placeholders_and_question_marks() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int PRIMARY KEY, name text, price decimal(10,2), `c$1` int)",
    )
    .await;
    // `$n` outside strings, comments and backticks; a `$n` used twice; a `$` inside a name.
    let body = app
        .sql_params(
            &f.readwrite,
            &f.project,
            "INSERT INTO t (id, name, price, `c$1`) VALUES ($1, CONCAT($2, '$1', $2), $3, $1) -- $9",
            json!([1, "x", "12.50"]),
        )
        .await;
    assert_eq!(body["success"], true, "{body}");
    let rows = app.rows(&f.read, &f.project, "SELECT * FROM t").await;
    assert_eq!(
        rows,
        vec![json!({ "id": 1, "name": "x$1x", "price": 12.50, "c$1": 1 })]
    );
    // `?` as MySQL writes them, bound in order; JSON types kept (true is 1, null is NULL).
    let body = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT ? AS a, ? AS b, ? AS c, ? AS d, ? AS e",
            json!([9007199254740993u64, true, null, "s'q", 1.5]),
        )
        .await;
    assert_eq!(body["success"], true, "{body}");
    let text = serde_json::to_string(&body["result"]["rows"][0]).unwrap();
    assert!(text.contains("9007199254740993"), "{text}");
    assert_eq!(body["result"]["rows"][0]["b"], 1);
    assert_eq!(body["result"]["rows"][0]["c"], json!(null));
    assert_eq!(body["result"]["rows"][0]["d"], "s'q");
    assert_eq!(body["result"]["rows"][0]["e"], 1.5);
    // Injection through a value stays a value.
    let rows = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT count(*) AS n FROM t WHERE name = $1",
            json!(["x' OR '1'='1"]),
        )
        .await;
    assert_eq!(rows["result"]["rows"][0]["n"], 0, "{rows}");
    // A placeholder without a value is the caller's error.
    let body = app
        .sql_params(&f.read, &f.project, "SELECT $2", json!([1]))
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("$2"),
        "{body}"
    );
    let body = app
        .sql_params(&f.read, &f.project, "SELECT ?, ?", json!([1]))
        .await;
    assert_eq!(body["success"], false, "{body}");
}

#[tokio::test]
async fn errors_carry_mysqls_message_code_and_sqlstate() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let body = app.sql(&f.read, &f.project, "SELECT * FROM usrs").await;
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("usrs") && message.contains("doesn't exist"),
        "{body}"
    );
    assert_eq!(body["error"]["details"], "ERROR:  1146 (42S02)");
    let body = app.sql(&f.read, &f.project, "SELEC 1").await;
    assert_eq!(body["error"]["details"], "ERROR:  1064 (42000)", "{body}");
    // The connection serves the next request as if nothing happened.
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 1 AS one").await,
        vec![json!({"one": 1})]
    );
}

#[tokio::test]
async fn scripts_answer_with_their_last_statement_and_stop_at_an_error() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let body = app
        .sql(
            &f.admin,
            &f.project,
            "CREATE TABLE s (n int); INSERT INTO s VALUES (1), (2); SELECT n FROM s ORDER BY n; ",
        )
        .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["result"]["rows"], json!([{ "n": 1 }, { "n": 2 }]));
    assert_eq!(body["executionInfo"]["operation"], "SELECT");
    // Ending with a statement that answers no rows: its result, not an earlier one's (red
    // team rt14: the first statement's was answered).
    for (script, message, operation) in [
        (
            "CREATE TABLE s2 (n int); INSERT INTO s2 VALUES (1), (2)",
            "INSERT 0 2",
            "INSERT",
        ),
        (
            "INSERT INTO s2 VALUES (3); INSERT INTO s2 VALUES (4), (5)",
            "INSERT 0 2",
            "INSERT",
        ),
        ("SELECT 1; DELETE FROM s2 WHERE n > 3", "DELETE 2", "DELETE"),
    ] {
        let body = app.sql(&f.admin, &f.project, script).await;
        assert_eq!(body["success"], true, "{script}: {body}");
        assert_eq!(body["result"]["message"], message, "{script}: {body}");
        assert_eq!(
            body["executionInfo"]["operation"], operation,
            "{script}: {body}"
        );
        assert_eq!(body["result"]["rows"], json!([]), "{script}: {body}");
    }
    let body = app
        .sql(
            &f.admin,
            &f.project,
            "INSERT INTO s VALUES (3); INSERT INTO nope VALUES (1); INSERT INTO s VALUES (4)",
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["details"], "ERROR:  1146 (42S02)");
    // MySQL commits each statement: the one before the error stays, the one after never ran.
    let rows = app
        .rows(&f.read, &f.project, "SELECT n FROM s ORDER BY n")
        .await;
    assert_eq!(
        rows,
        vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]
    );
    // A session's state never reaches the next request (COM_RESET_CONNECTION).
    app.rows(
        &f.admin,
        &f.project,
        "SET @secret = 42; CREATE TEMPORARY TABLE tmp (x int); BEGIN; INSERT INTO s VALUES (99)",
    )
    .await;
    for _ in 0..3 {
        let rows = app
            .rows(
                &f.admin,
                &f.project,
                "SELECT @secret AS v, (SELECT count(*) FROM s WHERE n = 99) AS open",
            )
            .await;
        assert_eq!(rows, vec![json!({"v": null, "open": 0})]);
        let body = app.sql(&f.admin, &f.project, "SELECT * FROM tmp").await;
        assert_eq!(body["success"], false, "{body}");
    }
}

/// A row is read whole by the driver: the largest one a request's session reads is bounded
/// (twice `max_response_bytes`, at least 64 MiB), so one request cannot hold a row of up to
/// the server's 1 GiB packet in the server's memory (red team rt5: 1.2 GB RSS for one 400 MB
/// row). Past it a clear SQL_EXEC_ERROR; the project's next request is served as usual.
#[tokio::test]
async fn a_row_past_the_read_bound_is_a_clear_error_not_held_in_memory() {
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    let app = spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.max_response_bytes = 4096;
    })
    .await;
    let f = app.mysql_fixture().await;
    // Six values of 12 MB (each under the server's 16 MiB max_allowed_packet): a 72 MB row.
    let columns: Vec<String> = (0..6)
        .map(|i| format!("REPEAT('x', 12000000) AS c{i}"))
        .collect();
    let body = app
        .sql(
            &f.read,
            &f.project,
            &format!("SELECT {}", columns.join(", ")),
        )
        .await;
    assert_eq!(
        body["success"],
        false,
        "{}",
        &body.to_string()[..300.min(body.to_string().len())]
    );
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("larger than 67108864 bytes"), "{message}");
    // A row under the bound is read and dropped past max_response_bytes, as before.
    let body = app
        .sql(&f.read, &f.project, "SELECT REPEAT('x', 12000000) AS c")
        .await;
    assert_eq!(
        body["success"],
        true,
        "{}",
        &body.to_string()[..300.min(body.to_string().len())]
    );
    assert_eq!(body["result"]["truncated"], true);
    let body = app.sql(&f.read, &f.project, "SELECT 1 AS one").await;
    assert_eq!(body["result"]["rows"], json!([{ "one": 1 }]), "{body}");
    app.stop().await;
}

#[tokio::test]
async fn rows_and_bytes_are_bounded_and_slow_statements_end() {
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    let app = spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.max_rows = 5;
        c.max_response_bytes = 4096;
        c.statement_timeout_ms = 1000;
    })
    .await;
    let f = app.mysql_fixture().await;
    let body = app
        .sql(&f.read, &f.project, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) SELECT i FROM n")
        .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["result"]["rows"].as_array().unwrap().len(), 5);
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rowCount"], 100);
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT REPEAT('x', 3000) AS a UNION ALL SELECT REPEAT('y', 3000)",
        )
        .await;
    assert_eq!(body["result"]["truncated"], true, "{body}");
    assert!(serde_json::to_string(&body).unwrap().len() < 4096 + 512);
    // max_statement_time ends a slow statement ...
    let started = std::time::Instant::now();
    let body = app.sql(&f.read, &f.project, "SELECT SLEEP(30) AS s, (SELECT count(*) FROM information_schema.COLUMNS a, information_schema.COLUMNS b) AS n").await;
    assert!(started.elapsed().as_secs() < 10, "{body}");
    // ... and one that turned its own limit off is killed by the server's guard.
    let started = std::time::Instant::now();
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SET SESSION max_statement_time = 0; SELECT SLEEP(30) AS s",
        )
        .await;
    let waited = started.elapsed().as_secs();
    assert!(waited < 10, "waited {waited} s: {body}");
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 1 AS ok").await,
        vec![json!({"ok": 1})]
    );
    // ... and one whose handler catches the timeout and the guard's KILL QUERY has its
    // connection killed: answered as a timeout, and its server thread gone (red team rt14:
    // it looped on, outside every bound, after its places were given back).
    let started = std::time::Instant::now();
    let body = app
        .sql(
            &f.read,
            &f.project,
            "BEGIN NOT ATOMIC DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END; \
             LOOP DO SLEEP(0.2); END LOOP; END",
        )
        .await;
    let waited = started.elapsed().as_secs();
    assert!(waited < 20, "waited {waited} s: {body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR", "{body}");
    assert!(
        body["error"]["details"].as_str().unwrap().contains("1969"),
        "{body}"
    );
    let left = crate::support::mariadb::mariadb()
        .await
        .query(&format!(
            "SELECT ID, INFO FROM information_schema.PROCESSLIST WHERE USER = 'fx_{}_read' \
             AND INFO LIKE '%SLEEP(0.2)%'",
            f.project
        ))
        .await;
    assert!(left.is_empty(), "the caught statement still runs: {left:?}");
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 1 AS ok").await,
        vec![json!({"ok": 1})]
    );
}

/// A project's requests beyond its share wait, then get 429; none fails otherwise, and the
/// accounts never hold more connections than their bound.
#[tokio::test]
async fn concurrent_requests_stay_within_the_projects_share() {
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    let app = spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.sql_project_connections = 2;
        c.sql_queue_timeout_ms = 300;
    })
    .await;
    let f = app.mysql_fixture().await;
    let tasks: Vec<_> = (0..12)
        .map(|_| app.spawn_sql(&f.read, &f.project, "SELECT SLEEP(0.5) AS s"))
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status} {body}");
        if status == 429 {
            assert!(
                body.contains("RATE_LIMIT") && body.contains("sql_project_connections"),
                "{body}"
            );
        }
        statuses.push(status);
    }
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    let held = crate::support::mariadb::mariadb()
        .await
        .query(&format!(
            "SELECT count(*) FROM information_schema.PROCESSLIST WHERE USER = 'fx_{}_read'",
            f.project
        ))
        .await;
    assert!(
        held[0][0].as_deref().unwrap().parse::<u32>().unwrap() <= 2,
        "{held:?}"
    );
}

/// A client that hangs up does not end its request's hold on the project's share and the
/// connection budget while its statement still runs on the server: the statement runs to its
/// end in a task of its own (red team rt4: 8 × `SELECT SLEEP(25)` with `curl -m 1`, then 8
/// more requests: 6 answered 503 "max_user_connections (1226)" — the shares were free while the
/// sessions still ran, and the account's connection limit was full).
#[tokio::test]
async fn a_client_hanging_up_leaves_its_statement_holding_its_share_until_it_ends() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    let gone: Vec<_> = (0..8)
        .map(|_| {
            let r = impatient
                .post(app.url("/api/execute-sql"))
                .bearer_auth(&f.read)
                .json(&json!({ "projectId": f.project, "query": "SELECT SLEEP(3) AS s" }))
                .send();
            tokio::spawn(async move { r.await.is_err() })
        })
        .collect();
    for g in gone {
        assert!(g.await.unwrap(), "the impatient client got an answer");
    }
    // The eight statements still run: the next requests wait for the share (up to the queue
    // timeout, 5 s), then each is served on a connection of the account's eight.
    let next: Vec<_> = (0..8)
        .map(|_| app.spawn_sql(&f.read, &f.project, "SELECT 1 AS one"))
        .collect();
    for t in next {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"success\":true"), "{body}");
    }
    app.stop().await;
}

/// kill -9 of the MySQL server: requests answer 503 meanwhile, and work again once it is back
/// (the pool of dead connections is dropped, not served from).
#[tokio::test]
async fn a_crashed_mysql_server_is_503_then_recovers() {
    use crate::support::mariadb::TEST_SETTINGS;
    let root = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("mdb")
    ));
    let password = fluxbase::secrets::random_base62(24);
    let mut server = tokio::task::spawn_blocking(move || {
        fluxbase::mysql::embedded::Server::start(&root, &password, TEST_SETTINGS)
    })
    .await
    .unwrap()
    .unwrap();
    let url = server.admin_url();
    let app = spawn_app_with(|c| c.mysql_url = Some(url.into())).await;
    let f = app.mysql_fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (i int); INSERT INTO t VALUES (1)",
    )
    .await;
    server = tokio::task::spawn_blocking(move || {
        std::process::Command::new("kill")
            .args(["-9", &server.pid().to_string()])
            .status()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        server
    })
    .await
    .unwrap();
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.read),
            Some(json!({ "projectId": f.project, "query": "SELECT i FROM t" })),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "DATABASE_CONNECTION_ERROR");
    // The change stream's status still answers, without the server's binlog object.
    let body = app.cdc_status(&f.project, &f.read).await;
    assert!(body["binlog"].is_null(), "{body}");
    let port = server.port;
    let server = tokio::task::spawn_blocking(move || {
        server.crash_and_restart(TEST_SETTINGS).unwrap();
        server
    })
    .await
    .unwrap();
    assert_eq!(server.port, port, "restarted on another port");
    let mut last = serde_json::Value::Null;
    for _ in 0..3 {
        let (status, body) = app
            .call(
                "POST",
                "/api/execute-sql",
                Some(&f.read),
                Some(json!({ "projectId": f.project, "query": "SELECT i FROM t" })),
            )
            .await;
        last = body.clone();
        if status == 200 {
            break;
        }
    }
    assert_eq!(last["result"]["rows"], json!([{ "i": 1 }]), "{last}");
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}

/// MySQL projects share one connection budget (here 4 places, a share of 3 per project):
/// one project's busy connections leave the rest to another, its idle ones are closed to make
/// room for another's, and past the budget a request waits `sql_queue_timeout_ms` and gets
/// 429 naming `sql_max_connections`, never the server's own "Too many connections".
#[tokio::test]
async fn mysql_projects_share_one_connection_budget() {
    use std::time::{Duration, Instant};
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    let app = spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.sql_max_connections = 4;
        c.sql_project_connections = 3;
        c.sql_queue_timeout_ms = 1_500;
        c.sql_idle_timeout_secs = 600;
    })
    .await;
    let a = app.mysql_fixture().await;
    let b = app.mysql_fixture().await;
    let open = || async {
        let rows = crate::support::mariadb::mariadb()
            .await
            .query(&format!(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER LIKE 'fx\\_{}\\_%' \
                 OR USER LIKE 'fx\\_{}\\_%'",
                a.project, b.project
            ))
            .await;
        rows[0][0].as_deref().unwrap().parse::<usize>().unwrap()
    };
    // A holds three places.
    let sleeps: Vec<_> = (0..3)
        .map(|_| app.spawn_sql(&a.read, &a.project, "SELECT SLEEP(2) AS s"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while open().await < 3 {
        assert!(Instant::now() < deadline, "A's requests never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B gets the fourth at once.
    assert_eq!(
        app.rows(&b.read, &b.project, "SELECT 1 AS one").await,
        vec![json!({"one": 1})]
    );
    for task in sleeps {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // A's three are idle now: B's three at once close them to make room.
    let tasks: Vec<_> = (0..3)
        .map(|_| app.spawn_sql(&b.read, &b.project, "SELECT SLEEP(1) AS s"))
        .collect();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert!(open().await <= 4);
    // Six requests of 3 s for four places: two wait 1.5 s and are told to retry.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let f = if i % 2 == 0 { &a } else { &b };
            app.spawn_sql(&f.read, &f.project, "SELECT SLEEP(3) AS s")
        })
        .collect();
    let (mut answered, mut refused) = (0, 0);
    for task in tasks {
        let (status, body) = task.await.unwrap();
        match status {
            200 => answered += 1,
            429 => {
                assert!(body.contains("sql_max_connections"), "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!((answered, refused), (4, 2));
    assert!(open().await <= 4);
    app.stop().await;
}

/// Short requests back to back on a share of 2 are all answered (a login past the account's
/// `MAX_USER_CONNECTIONS` would be a 503) and the account never holds more than 2 sessions:
/// idle connections are reused, a connection being reset still counts against its project.
#[tokio::test]
async fn back_to_back_requests_never_log_in_past_the_accounts_limit() {
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    let app = spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.sql_project_connections = 2;
        c.sql_queue_timeout_ms = 20_000;
    })
    .await;
    let f = app.mysql_fixture().await;
    for _ in 0..3 {
        let tasks: Vec<_> = (0..40)
            .map(|i| app.spawn_sql(&f.read, &f.project, &format!("SELECT {i} AS i")))
            .collect();
        for t in tasks {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, 200, "{body}");
        }
    }
    let held = crate::support::mariadb::mariadb()
        .await
        .query(&format!(
            "SELECT count(*) FROM information_schema.PROCESSLIST WHERE USER = 'fx_{}_read'",
            f.project
        ))
        .await;
    assert!(
        held[0][0].as_deref().unwrap().parse::<u32>().unwrap() <= 2,
        "{held:?}"
    );
}
