//! The session reset between two requests on a pooled connection, attacked from the caller's
//! SQL: it must run whatever the previous request did to the connection's prepared statements
//! (the reset itself is sent through the unnamed statement, which no SQL can replace), and the
//! statements the server keeps prepared under names of its own must answer as what they were
//! prepared for, whoever asks next.
//!
//! And the reset's skip (sql/project/0014_session_reset_epoch.sql): after one plain statement
//! (judged from PostgreSQL's CommandComplete tags), while the project has no routine of its own,
//! the pipelined reset leaves out its checks for LISTEN, SQL-level prepared statements and held
//! cursors. Each test below fails when the skip is taken where it must not be: a routine made
//! after the proof, routines reached through a view or a policy, a script that only looks plain,
//! and the state plain built-ins make, which the skip must still reset.

use serde_json::{json, Value};

use crate::support::{pg, spawn_app_with, Fixture, TestApp};

/// `POST /api/execute-sql` with `params` (and `authUid` when given); asserts HTTP 200.
async fn request(
    app: &TestApp,
    key: &str,
    f: &Fixture,
    uid: Option<&str>,
    query: &str,
    params: Value,
) -> Value {
    let mut body = json!({ "projectId": f.project, "query": query, "params": params });
    if let Some(uid) = uid {
        body["authUid"] = json!(uid);
    }
    let (status, body) = app
        .call("POST", "/api/execute-sql", Some(key), Some(body))
        .await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

/// Runs `query` with `[1]`; asserts success and returns the rows.
async fn rows_as(app: &TestApp, key: &str, f: &Fixture, uid: Option<&str>, query: &str) -> Value {
    let body = request(app, key, f, uid, query, json!([1])).await;
    assert_eq!(body["success"], true, "{query}: {body}");
    body["result"]["rows"].clone()
}

/// What a session carries that the reset must clear, as one row.
const PROBE: &str = "SELECT current_setting('statement_timeout') AS timeout,
    current_setting('search_path') AS path,
    to_regclass('pg_temp.shadow') IS NOT NULL AS tmp,
    (SELECT count(*) FROM pg_listening_channels()) AS listening,
    (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS sql_prepared
    WHERE $1::int = 1";

/// Replaces the statement named `fx_reset` (if the connection has one) with `fake`, then
/// leaves state behind: a disabled statement timeout, another search_path, a temporary table
/// and a LISTEN.
fn replace_reset_script(fake: &str) -> String {
    format!(
        "DO $$ BEGIN
             IF EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'fx_reset') THEN
                 EXECUTE 'DEALLOCATE fx_reset';
             END IF;
         END $$;
         PREPARE fx_reset {fake};
         SET statement_timeout = 0;
         SET search_path = pg_temp, public;
         CREATE TEMP TABLE shadow (x int);
         LISTEN leaked"
    )
}

/// The probe twice (the second run goes through the connection's kept statement and the
/// pipelined reset), then its answer on a fresh session.
async fn fresh_probe(app: &TestApp, key: &str, f: &Fixture) -> Value {
    rows_as(app, key, f, None, PROBE).await;
    let fresh = rows_as(app, key, f, None, PROBE).await;
    assert_eq!(fresh[0]["tmp"], false, "{fresh}");
    assert_eq!(fresh[0]["listening"], 0, "{fresh}");
    fresh
}

/// A script that deallocates the statement the pipelined reset used to be bound from and
/// prepares a fake under its name (with no parameter, and with one as the reset's epoch took),
/// then disables the statement timeout, moves search_path, shadows a table with a temporary one
/// and listens: the next request with parameters (a kept statement, the pipelined reset) finds
/// all of it reset. On the named reset statement this failed: the next Bind ran the fake.
#[tokio::test]
async fn a_script_that_replaces_the_reset_statement_is_still_reset() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let fresh = fresh_probe(&app, &f.admin, &f).await;
    for fake in ["AS SELECT 1", "(int8) AS SELECT $1::int8"] {
        for round in 0..2 {
            app.rows(&f.admin, &f.project, &replace_reset_script(fake))
                .await;
            assert_eq!(
                rows_as(&app, &f.admin, &f, None, PROBE).await,
                fresh,
                "{fake}, round {round}"
            );
        }
    }
}

/// The same from a PL/pgSQL function called by a plain SELECT with parameters (its statements
/// run through SPI: no command tag of the request shows them).
#[tokio::test]
async fn a_routine_that_replaces_the_reset_statement_is_still_reset() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION public.replace_reset() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'fx_reset') THEN
                 EXECUTE 'DEALLOCATE fx_reset';
             END IF;
             EXECUTE 'PREPARE fx_reset AS SELECT 1';
             PERFORM set_config('statement_timeout', '0', false);
             PERFORM set_config('search_path', 'pg_temp, public', false);
             EXECUTE 'CREATE TEMP TABLE shadow (x int)';
             RETURN 1;
         END $$;
         GRANT EXECUTE ON FUNCTION public.replace_reset() TO PUBLIC",
    )
    .await;
    let fresh = fresh_probe(&app, &f.admin, &f).await;
    const REPLACE: &str = "SELECT public.replace_reset() AS x WHERE $1::int = 1";
    for round in 0..3 {
        assert_eq!(
            rows_as(&app, &f.admin, &f, None, REPLACE).await,
            json!([{ "x": 1 }])
        );
        assert_eq!(
            rows_as(&app, &f.admin, &f, None, PROBE).await,
            fresh,
            "round {round}"
        );
    }
}

/// Notes of two end users behind a row-level security policy on `auth.uid()`.
async fn notes(app: &TestApp, f: &Fixture) {
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE public.notes (owner text NOT NULL, body text NOT NULL);
         INSERT INTO public.notes VALUES ('alice', 'alice''s note'), ('bob', 'bob''s note');
         ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON public.notes USING (owner = auth.uid());
         GRANT SELECT ON public.notes TO PUBLIC",
    )
    .await;
}

const NOTES: &str = "SELECT body FROM public.notes WHERE $1::int = 1 ORDER BY body";

/// Replaces the connection's statement prepared for [`NOTES`] (found by its text) with one
/// answering a forged row, and the reset statement with a fake (so that no reset runs if the
/// server binds it).
const FORGE_NOTES: &str = "DO $$
    DECLARE stmt text;
    BEGIN
        SELECT name INTO STRICT stmt FROM pg_prepared_statements
         WHERE statement = 'SELECT body FROM public.notes WHERE $1::int = 1 ORDER BY body';
        EXECUTE format('DEALLOCATE %I', stmt);
        EXECUTE format('PREPARE %I(int) AS SELECT ''forged''::text AS body WHERE $1 = 1', stmt);
        IF EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'fx_reset') THEN
            EXECUTE 'DEALLOCATE fx_reset';
        END IF;
        EXECUTE 'PREPARE fx_reset AS SELECT 1';
    END $$";

/// A caller replaces a statement the server keeps prepared on the connection (its `fx_s<n>`
/// name is in pg_prepared_statements) with one that answers a forged row. The next request
/// with that text, by the same end user or by another one (an identity change: the reset runs
/// on its own), runs the real statement under its own identity.
#[tokio::test]
async fn a_replaced_kept_statement_never_answers_the_next_request() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    notes(&app, &f).await;
    let key = &f.readwrite;
    for next in [Some("alice"), Some("bob"), None] {
        for _ in 0..2 {
            assert_eq!(
                rows_as(&app, key, &f, Some("alice"), NOTES).await,
                json!([{ "body": "alice's note" }])
            );
        }
        let body = app
            .call(
                "POST",
                "/api/execute-sql",
                Some(key),
                Some(json!({ "projectId": f.project, "query": FORGE_NOTES, "authUid": "alice" })),
            )
            .await
            .1;
        assert_eq!(body["success"], true, "{body}");
        let expected = match next {
            Some("alice") => json!([{ "body": "alice's note" }]),
            Some(_) => json!([{ "body": "bob's note" }]),
            None => json!([]),
        };
        assert_eq!(
            rows_as(&app, key, &f, next, NOTES).await,
            expected,
            "next: {next:?}"
        );
    }
}

/// Runs `query` with `[1]` and no end user; asserts success and returns the first row.
async fn one(app: &TestApp, key: &str, f: &Fixture, query: &str) -> Value {
    rows_as(app, key, f, None, query).await[0].clone()
}

/// The epoch and its proof, read by the superuser.
async fn epoch(client: &tokio_postgres::Client) -> (i64, bool) {
    let row = client
        .query_one("SELECT n, safe FROM auth.routine_epoch", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

const STATE: &str = "SELECT (SELECT count(*) FROM pg_cursors WHERE is_holdable) AS cursors,
    (SELECT count(*) FROM pg_listening_channels()) AS listening,
    (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS sql_prepared
    WHERE $1::int = 1";

async fn listening(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap()
        .get(0)
}

/// `auth.reset_session(alone, known)` in the superuser's session: what it returns, or the
/// SQLSTATE it raised.
async fn reset(
    db: &tokio_postgres::Client,
    alone: bool,
    known: Option<i64>,
) -> Result<Option<i64>, String> {
    db.query_one("SELECT auth.reset_session($1, $2)", &[&alone, &known])
        .await
        .map(|row| row.get(0))
        .map_err(|e| e.code().map(|c| c.code().to_owned()).unwrap_or_default())
}

fn clean() -> Value {
    json!({ "cursors": 0, "listening": 0, "sql_prepared": 0 })
}

/// The function's contract, in a superuser session of the project's database: given the epoch
/// it returned while the project has no routine of its own, it leaves a LISTEN alone (the skip
/// is real); given another epoch or none it clears it. Routine DDL moves the epoch and the proof,
/// also in a transaction that then drops what it made; a range type (built-in constructors) and
/// plain tables do not. Project roles can read the epoch but neither write it nor bump it.
#[tokio::test]
async fn the_reset_skips_its_checks_only_for_the_epoch_it_proved() {
    let app = spawn_app_with(|_| {}).await;
    let f = app.fixture().await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    let (n0, safe) = epoch(&db).await;
    assert!(safe, "a fresh project has no routines of its own");
    db.batch_execute("LISTEN skipped").await.unwrap();
    assert_eq!(reset(&db, false, Some(n0)).await, Ok(Some(n0)));
    assert_eq!(listening(&db).await, 1, "the known epoch skips the checks");
    // The checks run (and find the LISTEN, which only the reset on its own can end).
    assert_eq!(reset(&db, false, Some(n0 - 1)).await, Err("FX002".into()));
    assert_eq!(reset(&db, false, None).await, Err("FX002".into()));
    assert_eq!(listening(&db).await, 1);
    assert_eq!(reset(&db, true, Some(n0)).await, Ok(Some(n0)));
    assert_eq!(listening(&db).await, 0, "on its own it never skips");
    db.batch_execute("LISTEN skipped").await.unwrap();
    assert_eq!(reset(&db, true, None).await, Ok(Some(n0)));
    assert_eq!(listening(&db).await, 0, "no epoch runs them");

    // Tables, a range type (internal constructors) and an aggregate over built-ins: no routine
    // of the project's own.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int); CREATE TYPE floatrange AS RANGE (subtype = float8);
         CREATE AGGREGATE my_sum(int) (sfunc = int4pl, stype = int)",
    )
    .await;
    let (n1, safe) = epoch(&db).await;
    assert!(safe, "built-in code only");
    // A SQL function: the proof is gone and the known epoch no longer skips anything.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    .await;
    let (n2, safe) = epoch(&db).await;
    assert!(n2 > n1 && !safe, "{n1} {n2} {safe}");
    db.batch_execute("LISTEN skipped").await.unwrap();
    assert_eq!(reset(&db, false, Some(n2)).await, Err("FX002".into()));
    assert_eq!(reset(&db, true, Some(n2)).await, Ok(None));
    assert_eq!(listening(&db).await, 0);
    // Dropped again: a new epoch with the proof back.
    app.rows(&f.admin, &f.project, "DROP FUNCTION public.f()")
        .await;
    let (n3, safe) = epoch(&db).await;
    assert!(n3 > n2 && safe, "{n2} {n3} {safe}");
    // Made and dropped in one transaction: still a new epoch (a session that called it in
    // between must not match the old one).
    app.rows(
        &f.admin,
        &f.project,
        "BEGIN; CREATE PROCEDURE public.p() LANGUAGE sql AS 'SELECT 1'; DROP PROCEDURE public.p(); COMMIT",
    )
    .await;
    let (n4, safe) = epoch(&db).await;
    assert!(n4 > n3 && safe, "{n3} {n4} {safe}");
    // Moved into a schema of its own and out of sight: still the project's.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE SCHEMA hidden; CREATE FUNCTION hidden.g() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'",
    )
    .await;
    assert!(!epoch(&db).await.1);

    // What the project roles may do with it: read, nothing else.
    for key in [&f.admin, &f.readwrite, &f.read] {
        let rows = app
            .rows(key, &f.project, "SELECT n FROM auth.routine_epoch")
            .await;
        assert_eq!(rows.len(), 1);
        for attack in [
            "UPDATE auth.routine_epoch SET safe = true",
            "DELETE FROM auth.routine_epoch",
            "SELECT auth.bump_routine_epoch()",
            "SELECT auth.only_our_routines()",
        ] {
            assert_eq!(
                app.sql_error(key, &f.project, attack).await,
                "42501",
                "{attack}"
            );
        }
    }
    assert!(!epoch(&db).await.1);
}

/// A routine made after a connection's reset proved there were none, by another connection, and
/// used at once by the next plain statement of the first: what it leaves (LISTEN, a held
/// cursor, a SQL-level PREPARE) is gone before the request after it. Without the epoch's bump
/// the reset before that request would skip its checks and hand the state on.
#[tokio::test]
async fn a_routine_made_after_the_proof_is_reset_after_its_first_use() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    const LEAVE: &str = "SELECT public.leave() AS x WHERE $1::int = 1";
    const PLAIN: &str = "SELECT $1::int AS x";
    // The statements are the connection's own before the routine exists in its harmful form
    // (each request then goes through the pipelined reset, the one that may skip).
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION public.leave() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    .await;
    for _ in 0..2 {
        for q in [LEAVE, STATE, PLAIN] {
            one(&app, &f.readwrite, &f, q).await;
        }
    }
    for round in 0..3 {
        app.rows(&f.admin, &f.project, "DROP FUNCTION public.leave()")
            .await;
        assert!(epoch(&db).await.1);
        // Two plain statements: the second one's reset proves the epoch.
        one(&app, &f.readwrite, &f, PLAIN).await;
        one(&app, &f.readwrite, &f, PLAIN).await;
        // Another connection (the admin key's pool) makes it; the next request uses it.
        app.rows(
            &f.admin,
            &f.project,
            "CREATE FUNCTION public.leave() RETURNS int LANGUAGE sql AS $$
                 DECLARE held CURSOR WITH HOLD FOR SELECT 1;
                 LISTEN leaked;
                 PREPARE leaked_stmt AS SELECT 1;
                 SELECT 1
             $$",
        )
        .await;
        // Even rounds with parameters (the pipelined reset), odd ones as Queries (the reset
        // on its own before each, which never skips).
        if round % 2 == 0 {
            assert_eq!(one(&app, &f.readwrite, &f, LEAVE).await, json!({ "x": 1 }));
            assert_eq!(
                one(&app, &f.readwrite, &f, STATE).await,
                clean(),
                "round {round}"
            );
        } else {
            let rows = app
                .rows(&f.readwrite, &f.project, "SELECT public.leave() AS x")
                .await;
            assert_eq!(rows, [json!({ "x": 1 })]);
            assert_eq!(probe_simple(&app, &f).await, clean(), "round {round}");
        }
    }
    // Queries only: the proof, the routine, its use, the look.
    app.rows(&f.admin, &f.project, "DROP FUNCTION public.leave()")
        .await;
    for _ in 0..3 {
        app.rows(&f.readwrite, &f.project, "SELECT 1 AS x").await;
    }
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION public.leave() RETURNS int LANGUAGE sql AS $$
             LISTEN leaked; SELECT 1
         $$",
    )
    .await;
    app.rows(&f.readwrite, &f.project, "SELECT public.leave() AS x")
        .await;
    assert_eq!(probe_simple(&app, &f).await, clean());
}

/// [`STATE`] as a Query (no parameters).
async fn probe_simple(app: &TestApp, f: &Fixture) -> Value {
    app.rows(
        &f.readwrite,
        &f.project,
        &STATE.replace("WHERE $1::int = 1", ""),
    )
    .await[0]
        .clone()
}

/// Routines reached without naming them: a view over one and a row-level security policy
/// calling one. They exist the whole time, so no reset may skip; each request after one that
/// went through them finds nothing of theirs.
#[tokio::test]
async fn routines_behind_a_view_or_a_policy_keep_every_check() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION public.leave() RETURNS int LANGUAGE sql AS $$
             DECLARE held CURSOR WITH HOLD FOR SELECT 1;
             LISTEN leaked;
             SELECT 1
         $$;
         CREATE VIEW public.v AS SELECT public.leave() AS x;
         CREATE TABLE public.guarded (id int);
         INSERT INTO public.guarded VALUES (1);
         ALTER TABLE public.guarded ENABLE ROW LEVEL SECURITY;
         CREATE POLICY p ON public.guarded USING (public.leave() = 1);
         GRANT SELECT ON public.v, public.guarded TO PUBLIC",
    )
    .await;
    for round in 0..3 {
        for via in [
            "SELECT x FROM public.v WHERE $1::int = 1",
            "SELECT id AS x FROM public.guarded WHERE id = $1",
        ] {
            assert_eq!(one(&app, &f.readwrite, &f, via).await, json!({ "x": 1 }));
            assert_eq!(
                one(&app, &f.readwrite, &f, STATE).await,
                clean(),
                "round {round}: {via}"
            );
        }
    }
}

/// With no routine of the project's own (the skip is taken), plain built-ins called from one
/// SELECT still make session state: settings (set_config), a session advisory lock, sequence
/// state (nextval) and a temporary table (SELECT … INTO TEMP). The cheap part of the reset runs
/// every time and leaves none of it to the next request.
#[tokio::test]
async fn state_made_by_built_ins_in_a_plain_select_is_reset_when_the_checks_are_skipped() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE SEQUENCE public.seq; GRANT USAGE ON SEQUENCE public.seq TO PUBLIC",
    )
    .await;
    assert!(epoch(&db).await.1, "the skip must be possible here");
    const LEAVE: &str = "SELECT set_config('work_mem', '7MB', false) AS w,
        set_config('search_path', 'nowhere', false) AS s,
        nextval('public.seq') > 0 AS n
        WHERE $1::int = 1";
    const TEMP: &str = "SELECT $1::int AS a INTO TEMP leak_tmp";
    const LOOK: &str = "SELECT current_setting('work_mem') = '7MB' AS work_mem,
        current_setting('search_path') AS path,
        to_regclass('pg_temp.leak_tmp') IS NOT NULL AS tmp
        WHERE $1::int = 1";
    for round in 0..3 {
        one(&app, &f.readwrite, &f, LEAVE).await;
        let look = one(&app, &f.readwrite, &f, LOOK).await;
        assert_eq!(
            look,
            json!({ "work_mem": false, "path": "\"$user\", public", "tmp": false }),
            "round {round}"
        );
        let body = app
            .sql_params(
                &f.readwrite,
                &f.project,
                "SELECT currval('public.seq') AS v WHERE $1::int = 1",
                json!([1]),
            )
            .await;
        assert_eq!(
            body["error"]["details"], "ERROR:  55000",
            "round {round}: {body}"
        );
        let body = app.sql_params(&f.admin, &f.project, TEMP, json!([1])).await;
        assert_eq!(body["success"], true, "{body}");
        let look = one(&app, &f.admin, &f, LOOK).await;
        assert_eq!(look["tmp"], false, "round {round}: {look}");
    }
    assert!(epoch(&db).await.1);
}

/// LISTEN, DECLARE … WITH HOLD and PREPARE as statements of their own (a script, also one that
/// starts with a SELECT, or one statement with parameters), while the project has no routine of
/// its own: such a request is no plain statement, so the reset after it runs every check.
#[tokio::test]
async fn utility_statements_of_a_request_keep_every_check() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    const PLAIN: &str = "SELECT $1::int AS x";
    for _ in 0..2 {
        one(&app, &f.readwrite, &f, PLAIN).await;
        one(&app, &f.readwrite, &f, STATE).await;
    }
    for round in 0..3 {
        assert!(epoch(&db).await.1);
        one(&app, &f.readwrite, &f, PLAIN).await;
        app.rows(
            &f.readwrite,
            &f.project,
            "LISTEN leaked; DECLARE held CURSOR WITH HOLD FOR SELECT 1; PREPARE leaked_stmt AS SELECT 1",
        )
        .await;
        assert_eq!(
            one(&app, &f.readwrite, &f, STATE).await,
            clean(),
            "round {round}: a script"
        );
        // A script that starts with a plain SELECT.
        app.rows(&f.readwrite, &f.project, "SELECT 1 AS x").await;
        app.rows(
            &f.readwrite,
            &f.project,
            "SELECT 1 AS x; LISTEN leaked; DECLARE held CURSOR WITH HOLD FOR SELECT 1",
        )
        .await;
        assert_eq!(
            probe_simple(&app, &f).await,
            clean(),
            "round {round}: a script after a SELECT"
        );
        one(&app, &f.readwrite, &f, PLAIN).await;
        let body = app
            .sql_params(
                &f.readwrite,
                &f.project,
                "DECLARE held2 CURSOR WITH HOLD FOR SELECT $1::int",
                json!([1]),
            )
            .await;
        assert_eq!(body["success"], true, "{body}");
        assert_eq!(
            one(&app, &f.readwrite, &f, STATE).await,
            clean(),
            "round {round}: one statement with parameters"
        );
    }
}

/// The name of the statement the connection keeps prepared for [`NOTES`].
async fn notes_statement(app: &TestApp, key: &str, f: &Fixture) -> String {
    let body = request(
        app,
        key,
        f,
        Some("alice"),
        "SELECT name FROM pg_prepared_statements WHERE statement = $1",
        json!([NOTES]),
    )
    .await;
    body["result"]["rows"][0]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned()
}

fn notes_of(uid: &str) -> Value {
    json!([{ "body": format!("{uid}'s note") }])
}

/// The review's attack on a skip judged from the request's text: a script PostgreSQL reads as
/// one PREPARE (a `--` comment ends at `\r`) but whose text after the first `\n` starts with
/// SELECT takes the name of a statement the server keeps prepared (deallocated by an earlier
/// script) while the skip is possible. It completes with the tag PREPARE, so the reset after it
/// runs every check: the next request with that text, of the same end user or another one, runs
/// the real statement. (Fails when `plain` is judged from the text as the reverted skip did.)
#[tokio::test]
async fn a_script_that_only_looks_plain_cannot_keep_a_replaced_statement() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    notes(&app, &f).await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    assert!(epoch(&db).await.1, "the skip must be possible here");
    let key = &f.readwrite;
    const PLAIN: &str = "SELECT $1::int AS x";
    for next in ["alice", "bob", "alice"] {
        for _ in 0..2 {
            assert_eq!(
                rows_as(&app, key, &f, Some("alice"), NOTES).await,
                notes_of("alice")
            );
        }
        let name = notes_statement(&app, key, &f).await;
        let body = app
            .sql_as(
                key,
                &f.project,
                Some("alice"),
                &format!("DEALLOCATE {name}"),
            )
            .await;
        assert_eq!(body["success"], true, "{body}");
        // Plain statements: the epoch is proved and the next reset may skip.
        for _ in 0..2 {
            rows_as(&app, key, &f, Some("alice"), PLAIN).await;
        }
        let attack = format!(
            "--\rPREPARE {name}(int) AS SELECT 'forged'::text AS body WHERE $1 = 1 /*\nSELECT*/"
        );
        let body = app.sql_as(key, &f.project, Some("alice"), &attack).await;
        assert_eq!(body["success"], true, "{body}");
        assert_eq!(
            rows_as(&app, key, &f, Some(next), NOTES).await,
            notes_of(next),
            "next: {next}"
        );
    }
    assert!(epoch(&db).await.1);
}

/// A routine made by another connection after this one's reset proved there were none, called
/// at once by a plain SELECT with parameters, replaces the statement the connection keeps
/// prepared for another text. The reset after it finds the epoch moved and runs every check: the
/// next request with that text, of the same end user or another one, runs the real statement.
/// (Fails when routine DDL does not move the epoch.)
#[tokio::test]
async fn a_routine_made_after_the_proof_cannot_replace_a_kept_statement() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    notes(&app, &f).await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    let key = &f.readwrite;
    const PLAIN: &str = "SELECT $1::int AS x";
    const FORGE: &str = "SELECT public.forge() AS x WHERE $1::int = 1";
    for next in ["alice", "bob"] {
        assert!(epoch(&db).await.1, "the skip must be possible here");
        for q in [NOTES, NOTES, PLAIN, PLAIN] {
            rows_as(&app, key, &f, Some("alice"), q).await;
        }
        app.rows(
            &f.admin,
            &f.project,
            "CREATE FUNCTION public.forge() RETURNS int LANGUAGE plpgsql AS $$
             DECLARE stmt text;
             BEGIN
                 SELECT name INTO STRICT stmt FROM pg_prepared_statements
                  WHERE statement = 'SELECT body FROM public.notes WHERE $1::int = 1 ORDER BY body';
                 EXECUTE format('DEALLOCATE %I', stmt);
                 EXECUTE format('PREPARE %I(int) AS SELECT ''forged''::text AS body WHERE $1 = 1', stmt);
                 RETURN 1;
             END $$;
             GRANT EXECUTE ON FUNCTION public.forge() TO PUBLIC",
        )
        .await;
        assert_eq!(
            rows_as(&app, key, &f, Some("alice"), FORGE).await,
            json!([{ "x": 1 }])
        );
        assert_eq!(
            rows_as(&app, key, &f, Some(next), NOTES).await,
            notes_of(next),
            "next: {next}"
        );
        app.rows(&f.admin, &f.project, "DROP FUNCTION public.forge()")
            .await;
    }
}

/// A caller's type named like a built-in, reached through the caller's search_path when the
/// reset's PL/pgSQL compiles (its first call in a session, before its RESET ALL): a domain
/// `ev.text` whose CHECK sets the search_path and disables the statement timeout, run when the
/// reset assigns a prepared statement's name to its `text` variable, after RESET ALL. The next
/// request must still find the session's own settings. Failed with `name text` in the reset.
#[tokio::test]
async fn a_callers_type_named_like_a_built_in_cannot_outlive_the_reset() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    // The first use of the project's only connection: the reset has not compiled there yet.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE SCHEMA ev;
         CREATE DOMAIN ev.text AS pg_catalog.text CHECK (VALUE IS NULL OR (
             pg_catalog.set_config('search_path', 'ev, public', false) IS NOT NULL
             AND pg_catalog.set_config('statement_timeout', '0', false) IS NOT NULL));
         GRANT USAGE ON SCHEMA ev TO PUBLIC;
         SET search_path = ev, pg_catalog;
         PREPARE q AS SELECT 1",
    )
    .await;
    for round in 0..2 {
        let probe = rows_as(&app, &f.admin, &f, None, PROBE).await;
        assert_ne!(probe[0]["timeout"], "0", "round {round}: {probe}");
        assert!(
            !probe[0]["path"].as_str().unwrap().contains("ev"),
            "round {round}: {probe}"
        );
        assert_eq!(probe[0]["sql_prepared"], 0, "round {round}: {probe}");
    }
}

/// A temporary type named `int8`: pg_temp comes first in a type lookup, so the reset's own
/// casts must name `pg_catalog.int8`. Without it the next request's reset failed (a 503), or
/// with a domain over a function, ran the caller's code before the reset.
#[tokio::test]
async fn a_temporary_type_named_int8_does_not_break_the_reset() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let fresh = fresh_probe(&app, &f.admin, &f).await;
    for round in 0..2 {
        // Once through the pipelined reset (with parameters), once through the one on its own.
        app.rows(
            &f.admin,
            &f.project,
            "CREATE TYPE pg_temp.int8 AS ENUM ('x'); SET search_path = pg_temp, public",
        )
        .await;
        assert_eq!(
            rows_as(&app, &f.admin, &f, None, PROBE).await,
            fresh,
            "round {round}"
        );
        app.rows(
            &f.admin,
            &f.project,
            "CREATE TYPE pg_temp.int8 AS ENUM ('x')",
        )
        .await;
        assert_eq!(
            app.rows(
                &f.admin,
                &f.project,
                "SELECT to_regtype('pg_temp.int8')::text AS t"
            )
            .await,
            vec![json!({ "t": null })],
            "round {round}"
        );
    }
}

/// A reset on its own that fails (here: the caller's 1 ms statement timeout, still in force when
/// the reset starts, against a thousand temporary tables to drop) must keep the next request's
/// SQL from running at all: it was sent in the same write as a Query after the reset's Query,
/// and PostgreSQL ran it on the session the reset had not cleared (the client answered 503).
#[tokio::test]
async fn the_next_request_never_runs_after_a_failed_reset() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE SEQUENCE public.hits")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "DO $$ BEGIN
             FOR i IN 1..1000 LOOP EXECUTE format('CREATE TEMP TABLE t%s ()', i); END LOOP;
         END $$;
         SET statement_timeout = 1",
    )
    .await;
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT nextval('public.hits')" })),
        )
        .await;
    assert_eq!(status, 503, "the reset failed: {body}");
    assert_eq!(
        app.rows(&f.admin, &f.project, "SELECT is_called FROM public.hits")
            .await,
        vec![json!({ "is_called": false })],
        "the request after the failed reset ran"
    );
}

/// `safe` of the routine epoch after a transaction that made a routine without firing the
/// event triggers (as one that ran CREATE FUNCTION before migration 0014 committed, here by
/// `session_replication_role = replica`) and commits later: no recompute may count on a
/// snapshot that cannot see it. Until every older transaction ended, the epoch stays unsealed
/// and `safe` false, whatever routine DDL fires a trigger meanwhile (the bump once set `safe`
/// from a snapshot without the routine); the server seals it after a start-up once they ended.
#[tokio::test]
async fn a_routine_made_without_the_triggers_keeps_the_epoch_unsafe_until_it_ended() {
    use crate::support::fixtures::project;
    use crate::support::http::sql;
    use crate::support::process::ServerProcess;

    let mut server = ServerProcess::start(&[]).await;
    let p = project(&server.base).await;
    let db = pg().await.client(&format!("fx_{}", p.project)).await;
    assert_eq!(state(&db).await, (true, true), "sealed at creation");
    // The state right after the migration committed, with an older transaction still running.
    db.batch_execute("UPDATE auth.routine_epoch SET sealed = false, safe = false")
        .await
        .unwrap();
    let older = pg().await.client(&format!("fx_{}", p.project)).await;
    older
        .batch_execute(
            "BEGIN; SET LOCAL session_replication_role = replica;
             CREATE FUNCTION public.sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        )
        .await
        .unwrap();
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'; DROP FUNCTION public.f()",
    )
    .await;
    assert_eq!(
        state(&db).await,
        (false, false),
        "a trigger's bump while unsealed"
    );
    // A start-up while the older transaction runs: the seal (after the start-up, off its path)
    // waits up to 5 s, gives up, stays unsealed.
    server.restart().await;
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    assert_eq!(
        state(&db).await,
        (false, false),
        "sealed with an older transaction open"
    );
    older.batch_execute("COMMIT").await.unwrap();
    server.restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while state(&db).await != (false, true) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        state(&db).await,
        (false, true),
        "sealed after the start-up, and the routine counted"
    );
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "DROP FUNCTION public.sneaky()",
    )
    .await;
    assert_eq!(state(&db).await, (true, true));
}

/// (safe, sealed) of the project's routine epoch.
async fn state(db: &tokio_postgres::Client) -> (bool, bool) {
    let row = db
        .query_one("SELECT safe, sealed FROM auth.routine_epoch", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The server's lookup of a result's unknown types runs in the request's session, after its
/// SQL: an operator `ev.=` on `oid` first in the caller's search_path must not change what it
/// learns for the whole project (every `=`, `<>`, `>` in it is `OPERATOR(pg_catalog.…)`).
#[tokio::test]
async fn a_callers_operator_cannot_corrupt_the_type_registry() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let first = app
        .rows(
            &f.admin,
            &f.project,
            "CREATE SCHEMA ev;
             CREATE FUNCTION ev.eq(oid, oid) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
             CREATE FUNCTION ev.ne(oid, oid) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT false';
             CREATE OPERATOR ev.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = ev.eq);
             CREATE OPERATOR ev.<> (LEFTARG = oid, RIGHTARG = oid, FUNCTION = ev.ne);
             CREATE TYPE public.pair AS (a int, b text);
             SET search_path = ev, pg_catalog, public;
             SELECT ROW(1, 'x')::public.pair AS p",
        )
        .await;
    let next = app
        .rows(&f.admin, &f.project, "SELECT ROW(2, 'y')::public.pair AS p")
        .await;
    assert_eq!(first, vec![json!({ "p": { "a": 1, "b": "x" } })]);
    assert_eq!(next, vec![json!({ "p": { "a": 2, "b": "y" } })]);
}

/// Statements the server kept prepared on the connection (`fx_s<n>`) besides one a caller's
/// `DEALLOCATE` took: when the Bind finds its statement gone (26000) the cache forgets them all
/// and prepares afresh, so it must Close the others (they stayed on the server, under names the
/// cache no longer knows: each such request left up to 64 behind, until the connection closed).
#[tokio::test]
async fn statements_forgotten_after_a_deallocate_are_closed_on_the_server() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let key = &f.readwrite;
    let kept = |i: usize| format!("SELECT {i} AS v WHERE $1::int = 1");
    // The kept statements, not the reset's own (`fx_reset`).
    const COUNT: &str = "SELECT count(*)::int AS n FROM pg_prepared_statements
        WHERE NOT from_sql AND name <> 'fx_reset'";
    let server_side = || async {
        app.rows(key, &f.project, COUNT).await[0]["n"]
            .as_i64()
            .unwrap()
    };
    for i in 0..3 {
        // Twice: the first run prepares (and learns the types), the second keeps it.
        for _ in 0..2 {
            rows_as(&app, key, &f, None, &kept(i)).await;
        }
    }
    assert_eq!(server_side().await, 3);
    for round in 0..3 {
        let names: Vec<String> = app
            .rows(
                key,
                &f.project,
                "SELECT name FROM pg_prepared_statements
                 WHERE NOT from_sql AND name <> 'fx_reset' ORDER BY name",
            )
            .await
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect();
        app.rows(key, &f.project, &format!("DEALLOCATE {}", names[0]))
            .await;
        for i in 0..3 {
            assert_eq!(
                rows_as(&app, key, &f, None, &kept(i)).await,
                json!([{ "v": i }])
            );
        }
        assert_eq!(
            server_side().await,
            3,
            "round {round}: statements left behind"
        );
    }
}

/// 0015: the one-argument reset (kept for servers of the previous version during an upgrade)
/// runs the two-argument one with every check, so the two cannot drift apart.
#[tokio::test]
async fn the_one_argument_reset_is_the_full_reset() {
    let app = spawn_app_with(|_| {}).await;
    let f = app.fixture().await;
    let db = pg().await.client(&format!("fx_{}", f.project)).await;
    db.batch_execute(
        "SET search_path = public; SET statement_timeout = 1234; LISTEN ch;
         PREPARE p AS SELECT 1; BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT;
         CREATE TEMP TABLE shadow ()",
    )
    .await
    .unwrap();
    db.execute("SELECT auth.reset_session(true)", &[])
        .await
        .unwrap();
    let row = db
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('search_path'),
                    (SELECT count(*) FROM pg_listening_channels()),
                    (SELECT count(*) FROM pg_prepared_statements WHERE from_sql),
                    (SELECT count(*) FROM pg_cursors WHERE is_holdable),
                    to_regclass('pg_temp.shadow') IS NULL",
            &[],
        )
        .await
        .unwrap();
    let state: (String, String, i64, i64, i64, bool) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    assert_eq!(
        state,
        ("0".into(), "\"$user\", public".into(), 0, 0, 0, true)
    );
    let body: String = db
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE oid = 'auth.reset_session(boolean)'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        body.contains("auth.reset_session(alone, NULL::pg_catalog.int8)"),
        "{body}"
    );
}

/// The routine epoch's seal with prepared transactions (a cluster of its own with
/// `max_prepared_transactions`; the shared one has none): (1) a transaction older than the
/// seal that is prepared while the seal waits is the same transaction (keyed by xid, not by
/// backend: it once looked ended, and the seal counted on a snapshot without its routine);
/// (2) after a crash empties the unlogged table, the first reset refills it unsealed while a
/// prepared transaction of the database survives (emulated by emptying it by hand).
#[tokio::test]
async fn prepared_transactions_keep_the_routine_epoch_unsealed() {
    use crate::support::cluster::DedicatedCluster;
    let cluster = DedicatedCluster::start(&[("max_prepared_transactions", "4")]).await;
    let control = crate::support::unique("ctl");
    let app = spawn_app_with(|c| c.database_url = Some(cluster.cluster.url(&control).into())).await;
    let f = app.fixture().await;
    let project_db = format!("fx_{}", f.project);
    let db = cluster.client(&project_db).await;
    assert_eq!(state(&db).await, (true, true), "sealed at creation");

    // (1) The state right after the migration committed, an older transaction still running.
    db.batch_execute("UPDATE auth.routine_epoch SET sealed = false, safe = false")
        .await
        .unwrap();
    let older = cluster.client(&project_db).await;
    older
        .batch_execute(
            "BEGIN; SET LOCAL session_replication_role = replica;
             CREATE FUNCTION public.sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        )
        .await
        .unwrap();
    let sealer = cluster.client(&project_db).await;
    let project = f.project.clone();
    let seal = tokio::spawn(async move {
        fluxbase::projects::seal_routine_epoch(&sealer, &project)
            .await
            .unwrap();
    });
    // The seal has listed the older transaction by now (it polls every 50 ms for 5 s).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    older
        .batch_execute("PREPARE TRANSACTION 'older'")
        .await
        .unwrap();
    seal.await.unwrap();
    assert_eq!(
        state(&db).await,
        (false, false),
        "sealed while the older transaction, prepared, could still commit its routine"
    );
    db.batch_execute("COMMIT PREPARED 'older'").await.unwrap();
    fluxbase::projects::seal_routine_epoch(&db, &f.project)
        .await
        .unwrap();
    assert_eq!(
        state(&db).await,
        (false, true),
        "sealed, the routine counted"
    );
    db.batch_execute("DROP FUNCTION public.sneaky()")
        .await
        .unwrap();
    assert_eq!(state(&db).await, (true, true));

    // (2) A crash empties the table; a prepared transaction of this database survives it.
    db.batch_execute("BEGIN; SELECT pg_current_xact_id(); PREPARE TRANSACTION 'survivor'")
        .await
        .unwrap();
    // The first request opens the connection; the reset before the second refills the table.
    let two_requests = || async {
        for _ in 0..2 {
            one(&app, &f.readwrite, &f, "SELECT $1::int AS one").await;
        }
    };
    db.batch_execute("DELETE FROM auth.routine_epoch")
        .await
        .unwrap();
    two_requests().await;
    assert_eq!(
        state(&db).await,
        (false, false),
        "refilled sealed with a prepared transaction alive"
    );
    db.batch_execute("ROLLBACK PREPARED 'survivor'")
        .await
        .unwrap();
    db.batch_execute("DELETE FROM auth.routine_epoch")
        .await
        .unwrap();
    two_requests().await;
    assert_eq!(state(&db).await, (true, true), "refilled sealed");
}

/// A fake for the kept reset statement `fx_reset`: it answers the epoch it is given, as the
/// reset does, and leaves a disabled statement timeout and another search_path behind (what the
/// next request's probe shows if it ever runs instead of the reset).
const FAKE_RESET: &str = "PREPARE fx_reset(int8) AS SELECT $1 + 0 * length(
    set_config('statement_timeout', '0', false) || set_config('search_path', 'pg_temp, public', false))";

/// Deallocates `fx_reset` if the connection has it (a DO block: no error when it has not).
const DROP_KEPT_RESET: &str = "DO $$ BEGIN
    IF EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'fx_reset') THEN
        EXECUTE 'DEALLOCATE fx_reset';
    END IF;
END $$";

/// Since session 25 the pipelined reset is kept under the name `fx_reset` and, after a plain
/// statement that ran in its transaction while the project had no routine of its own, bound
/// from that name without parsing it. Every other way SQL can replace that name — a script at
/// top level (DEALLOCATE, DEALLOCATE ALL, DISCARD ALL before the PREPARE), one that fails after
/// the PREPARE (prepared statements outlive the rollback), a DO block, and the built-ins that run
/// SQL text (refused) — leaves a use that is no plain statement, so the next reset closes the
/// name and parses it afresh: the next request finds a fresh session every time. (Fails when the
/// server binds the kept name after any use.)
#[tokio::test]
async fn the_kept_reset_replaced_in_any_way_is_parsed_afresh() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    assert!(epoch(&db).await.1, "the bound reset must be possible here");
    let key = &f.admin;
    let fresh = fresh_probe(&app, key, &f).await;
    let attacks: Vec<Vec<String>> = vec![
        vec![format!("{DROP_KEPT_RESET}; {FAKE_RESET}")],
        vec![format!("DEALLOCATE ALL; {FAKE_RESET}")],
        vec!["DISCARD ALL".into(), FAKE_RESET.into()],
        vec![format!("{DROP_KEPT_RESET}; {FAKE_RESET}; SELECT 1 / 0")],
        vec![format!(
            "DO $do$ BEGIN
                 EXECUTE 'DEALLOCATE ALL';
                 EXECUTE $p${FAKE_RESET}$p$;
             END $do$"
        )],
    ];
    for (i, attack) in attacks.iter().enumerate() {
        for round in 0..2 {
            for script in attack {
                app.sql(key, &f.project, script).await;
            }
            let body = request(&app, key, &f, None, PROBE, json!([1])).await;
            assert_eq!(
                body["result"]["rows"][0], fresh[0],
                "attack {i}, round {round}: {body}"
            );
        }
    }
    // The built-ins that run SQL text refuse utility statements (read-only SPI, or a cursor),
    // in a plain SELECT with parameters too.
    for text in [
        "SELECT query_to_xml('DEALLOCATE fx_reset', false, false, '') IS NULL AS x WHERE $1::int = 1",
        "SELECT query_to_xml('PREPARE fx_reset AS SELECT 1', false, false, '') IS NULL AS x WHERE $1::int = 1",
        "SELECT count(*) AS x FROM ts_stat('DEALLOCATE ALL') WHERE $1::int = 1",
    ] {
        let body = app.sql_params(key, &f.project, text, json!([1])).await;
        assert_eq!(body["success"], false, "{text}: {body}");
        assert_eq!(rows_as(&app, key, &f, None, PROBE).await, fresh, "{text}");
    }
    assert!(epoch(&db).await.1);
}

/// A routine made by another connection *while* a plain statement runs (after that request's
/// reset proved there was none) and called by it at once, through a built-in that runs SQL text
/// after a sleep: it replaces the kept reset with a fake that leaves settings behind. Routine
/// DDL waits for the request's transaction (sql/project/0017_routine_epoch_lock.sql), so the
/// statement cannot call it and the next request is reset. (Fails without 0017's lock: the
/// statement answers one plain SELECT, the server binds the kept name, the fake runs instead of
/// the reset and the next request inherits a disabled statement timeout.)
#[tokio::test]
async fn a_routine_made_while_a_plain_statement_runs_cannot_replace_the_kept_reset() {
    race_for_the_kept_reset(true).await;
}

/// The same race with the statement and the probe sent without `params`: one SELECT then runs
/// as the unnamed statement in the pipelined reset's transaction (`Connection::query_one`), so
/// the next reset may be bound from its kept name just the same. (Fails without 0017's lock,
/// as the `params` twin does: the routine is made and called while the statement sleeps, and
/// the next request inherits the fake's disabled statement timeout. Before session 26 such a
/// statement went as a Query after the reset's own transaction, never followed by a bound
/// reset.)
#[tokio::test]
async fn a_routine_made_while_a_statement_without_params_runs_cannot_replace_the_kept_reset() {
    race_for_the_kept_reset(false).await;
}

/// A request with `params` = [1] (`$1` in `query`), or without params (`$1` written as 1).
async fn either(app: &TestApp, key: &str, f: &Fixture, params: bool, query: &str) -> Value {
    if params {
        app.sql_params(key, &f.project, query, json!([1])).await
    } else {
        app.sql(key, &f.project, &query.replace("$1::int", "1"))
            .await
    }
}

/// [`either`] that must succeed: its rows.
async fn either_rows(app: &TestApp, key: &str, f: &Fixture, params: bool, query: &str) -> Value {
    let body = either(app, key, f, params, query).await;
    assert_eq!(body["success"], true, "{query}: {body}");
    body["result"]["rows"].clone()
}

async fn race_for_the_kept_reset(params: bool) {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    let key = &f.readwrite;
    either_rows(&app, key, &f, params, PROBE).await;
    let fresh = either_rows(&app, key, &f, params, PROBE).await;
    assert_ne!(fresh[0]["timeout"], "0", "{fresh}");
    // The admin key's pool logs in before the race, not during it. The built-in's query locks
    // a table the transaction has not locked yet: the backend then takes in the catalog's
    // changes (without a new lock a running statement keeps its catalog snapshot and would not
    // see the routine in any case).
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE public.race (x int); INSERT INTO public.race VALUES (1);
         GRANT SELECT ON public.race TO PUBLIC",
    )
    .await;
    const SLOW: &str = "SELECT pg_sleep(1.5) IS NULL AS slept,
        query_to_xml('SELECT public.replace_kept_reset() FROM public.race', false, false, '') IS NOT NULL AS x
        WHERE $1::int = 1";
    for round in 0..2 {
        assert!(
            epoch(&db).await.1,
            "round {round}: the bound reset must be possible here"
        );
        // The statements are the connection's own (the first run of a text prepares it apart
        // from the reset; this one fails, the routine is not there yet), so the slow one runs
        // in the pipelined reset's transaction.
        let body = either(&app, key, &f, params, SLOW).await;
        assert_eq!(body["success"], false, "{body}");
        for _ in 0..2 {
            either_rows(&app, key, &f, params, PROBE).await;
        }
        let make = format!(
            "CREATE FUNCTION public.replace_kept_reset() RETURNS int LANGUAGE plpgsql AS $f$
             BEGIN
                 EXECUTE 'DEALLOCATE fx_reset';
                 EXECUTE $p${FAKE_RESET}$p$;
                 RETURN 1;
             END $f$;
             GRANT EXECUTE ON FUNCTION public.replace_kept_reset() TO PUBLIC"
        );
        let (slow, _) = tokio::join!(either(&app, key, &f, params, SLOW), async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            app.rows(&f.admin, &f.project, &make).await;
        });
        // With the lock the routine is not there yet when the statement looks for it.
        assert_eq!(slow["success"], false, "round {round}: {slow}");
        assert!(
            slow["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("replace_kept_reset() does not exist")),
            "round {round}: {slow}"
        );
        assert_eq!(
            either_rows(&app, key, &f, params, PROBE).await,
            fresh,
            "round {round}"
        );
        app.rows(
            &f.admin,
            &f.project,
            "DROP FUNCTION public.replace_kept_reset()",
        )
        .await;
    }
}

/// Texts without `params` that start like one query but are no single statement PostgreSQL's
/// Parse takes — a script that starts with a SELECT, `$1` without a value, a syntax error — go
/// as a Query (`Connection::query_one`): answered as a Query answers them, and never counted as
/// one plain statement, so the next request (with or without params) runs every check of the
/// reset and finds a fresh session. (Fails when a refused text counts as one statement: the
/// next reset skips its checks and the script's LISTEN and prepared statement survive it.)
#[tokio::test]
async fn texts_that_are_no_single_statement_run_as_a_query() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let key = &f.admin;
    let db = pg().await.client(&app.project_db(&f.project).await).await;
    assert!(epoch(&db).await.1, "the skip must be possible here");
    either_rows(&app, key, &f, false, PROBE).await;
    let fresh = either_rows(&app, key, &f, false, PROBE).await;
    assert_eq!(fresh[0]["sql_prepared"], 0, "{fresh}");
    let body = app
        .sql(key, &f.project, "SELECT 1 AS a; SELECT 2 AS b")
        .await;
    assert_eq!(body["result"]["rows"], json!([{ "b": 2 }]), "{body}");
    let script = format!(
        "SELECT 1 AS a; {DROP_KEPT_RESET}; {FAKE_RESET}; PREPARE leaked AS SELECT 1;
         LISTEN leaked; SET statement_timeout = 0; CREATE TEMP TABLE shadow (x int);
         SELECT 2 AS b"
    );
    for round in 0..2 {
        for params in [false, true] {
            either_rows(&app, key, &f, false, PROBE).await;
            assert_eq!(
                app.rows(key, &f.project, &script).await,
                vec![json!({ "b": 2 })]
            );
            assert_eq!(
                either_rows(&app, key, &f, params, PROBE).await,
                fresh,
                "round {round}, params {params}"
            );
        }
    }
    let body = app.sql(key, &f.project, "SELECT $1::int AS x").await;
    assert_eq!(body["success"], false, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("there is no parameter $1")),
        "{body}"
    );
    assert_eq!(
        app.sql_error(key, &f.project, "SELECT FROM WHERE").await,
        "42601"
    );
    assert_eq!(either_rows(&app, key, &f, false, PROBE).await, fresh);
}

/// A plain SELECT can set the session's transaction defaults (`default_transaction_read_only`,
/// `_isolation`, `_deferrable`); the next request's transaction begins at its pipelined reset,
/// under those defaults, which RESET ALL cannot change for a running transaction. The reset
/// then runs on its own first (project migration 0018): the next request's writes are not
/// refused as read only, and it runs READ COMMITTED (0017's lock argument needs it), with
/// `params` and without (review of session 26).
#[tokio::test]
async fn transaction_defaults_a_request_sets_never_shape_the_next_requests_transaction() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE public.w (x int)")
        .await;
    app.rows(&f.admin, &f.project, "GRANT INSERT ON public.w TO PUBLIC")
        .await;
    const LOOK: &str = "SELECT current_setting('transaction_isolation') AS iso, \
        current_setting('transaction_read_only') AS ro, \
        current_setting('transaction_deferrable') AS def";
    let clean = json!({ "iso": "read committed", "ro": "off", "def": "off" });
    for (round, leave) in [
        "SELECT set_config('default_transaction_read_only', 'on', false) AS s",
        "SELECT set_config('default_transaction_isolation', 'repeatable read', false) AS s",
        "SELECT set_config('default_transaction_isolation', 'serializable', false) AS s, \
         set_config('default_transaction_read_only', 'on', false) AS r, \
         set_config('default_transaction_deferrable', 'on', false) AS d",
    ]
    .into_iter()
    .enumerate()
    {
        for with_params in [false, true] {
            let body = app.sql(&f.readwrite, &f.project, leave).await;
            assert_eq!(body["success"], true, "{body}");
            let body = if with_params {
                app.sql_params(
                    &f.readwrite,
                    &f.project,
                    "INSERT INTO public.w VALUES ($1)",
                    json!([round]),
                )
                .await
            } else {
                app.sql(
                    &f.readwrite,
                    &f.project,
                    &format!("INSERT INTO public.w VALUES ({round})"),
                )
                .await
            };
            assert_eq!(
                body["success"], true,
                "round {round}, params {with_params}: {body}"
            );
            app.sql(&f.readwrite, &f.project, leave).await;
            let look = if with_params {
                request(
                    &app,
                    &f.readwrite,
                    &f,
                    None,
                    &format!("{LOOK} WHERE $1::int = 1"),
                    json!([1]),
                )
                .await["result"]["rows"][0]
                    .clone()
            } else {
                app.sql(&f.readwrite, &f.project, LOOK).await["result"]["rows"][0].clone()
            };
            assert_eq!(look, clean, "round {round}, params {with_params}");
        }
    }
}
