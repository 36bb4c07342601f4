//! The session reset between two requests on a pooled connection, attacked from the caller's
//! SQL: it must run whatever the previous request did to the connection's prepared statements
//! (the reset itself is sent through the unnamed statement, which no SQL can replace), and the
//! statements the server keeps prepared under names of its own must answer as what they were
//! prepared for, whoever asks next.

use serde_json::{json, Value};

use crate::support::{spawn_app_with, Fixture, TestApp};

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
