//! The session reset's skip (sql/project/0014_session_reset_epoch.sql): after one plain
//! statement, while the project has no routine of its own, the reset leaves out its checks for
//! LISTEN, SQL-level prepared statements and held cursors. Each test here fails when the skip is
//! taken where it must not be: a routine made after the proof, routines reached through a view
//! or a policy, and the state plain built-ins make, which the skip must still reset.

use serde_json::{json, Value};

use crate::support::{pg, spawn_app_with, Fixture, TestApp};

/// Runs `query` with `[1]` as `key`; asserts success and returns the first row.
async fn one(app: &TestApp, key: &str, f: &Fixture, query: &str) -> Value {
    let body = app.sql_params(key, &f.project, query, json!([1])).await;
    assert_eq!(body["success"], true, "{query}: {body}");
    body["result"]["rows"][0].clone()
}

/// The epoch and its proof, read by the superuser.
async fn epoch(client: &tokio_postgres::Client) -> (i64, bool) {
    let row = client
        .query_one("SELECT n, safe FROM auth.routine_epoch", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

const PROBE: &str = "SELECT (SELECT count(*) FROM pg_cursors WHERE is_holdable) AS cursors,
    (SELECT count(*) FROM pg_listening_channels()) AS listening,
    (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS sql_prepared
    WHERE $1::int = 1";

async fn listening(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap()
        .get(0)
}

/// `auth.reset_session(true, known)` in the superuser's session: what it returns.
async fn reset(db: &tokio_postgres::Client, known: Option<i64>) -> Option<i64> {
    db.query_one("SELECT auth.reset_session(true, $1)", &[&known])
        .await
        .unwrap()
        .get(0)
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
    assert_eq!(reset(&db, Some(n0)).await, Some(n0));
    assert_eq!(listening(&db).await, 1, "the known epoch skips the checks");
    assert_eq!(reset(&db, Some(n0 - 1)).await, Some(n0));
    assert_eq!(listening(&db).await, 0, "another epoch runs them");
    db.batch_execute("LISTEN skipped").await.unwrap();
    assert_eq!(reset(&db, None).await, Some(n0));
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
    assert_eq!(reset(&db, Some(n2)).await, None);
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
        for q in [LEAVE, PROBE, PLAIN] {
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
        // on its own before each, given the epoch as a literal).
        if round % 2 == 0 {
            assert_eq!(one(&app, &f.readwrite, &f, LEAVE).await, json!({ "x": 1 }));
            assert_eq!(
                one(&app, &f.readwrite, &f, PROBE).await,
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

/// [`PROBE`] as a Query (no parameters).
async fn probe_simple(app: &TestApp, f: &Fixture) -> Value {
    app.rows(
        &f.readwrite,
        &f.project,
        &PROBE.replace("WHERE $1::int = 1", ""),
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
                one(&app, &f.readwrite, &f, PROBE).await,
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
        pg_advisory_lock(4714)::text AS l, nextval('public.seq') > 0 AS n
        WHERE $1::int = 1";
    const TEMP: &str = "SELECT $1::int AS a INTO TEMP leak_tmp";
    const LOOK: &str = "SELECT current_setting('work_mem') = '7MB' AS work_mem,
        current_setting('search_path') AS path,
        pg_advisory_unlock(4714) AS held,
        to_regclass('pg_temp.leak_tmp') IS NOT NULL AS tmp
        WHERE $1::int = 1";
    for round in 0..3 {
        one(&app, &f.readwrite, &f, LEAVE).await;
        let look = one(&app, &f.readwrite, &f, LOOK).await;
        assert_eq!(
            look,
            json!({ "work_mem": false, "path": "\"$user\", public", "held": false, "tmp": false }),
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
        one(&app, &f.readwrite, &f, PROBE).await;
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
            one(&app, &f.readwrite, &f, PROBE).await,
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
            one(&app, &f.readwrite, &f, PROBE).await,
            clean(),
            "round {round}: one statement with parameters"
        );
    }
}
