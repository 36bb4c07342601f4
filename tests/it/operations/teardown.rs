//! Databases and roles no project stands for: a deletion whose drop fails, and what a crash in
//! the middle of a creation leaves, are recorded (`fluxbase.project_teardowns`) and dropped by
//! the sweep once they can be; nothing unrecorded, nothing of a live project, and no young
//! creation is touched.

use std::time::Duration;

use crate::support::{pg, spawn_app, unique};

/// Whether a role and a database of these names exist.
async fn exists(c: &tokio_postgres::Client, role: &str, db: &str) -> (bool, bool) {
    let role = c
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .is_some();
    let db = c
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await
        .unwrap()
        .is_some();
    (role, db)
}

/// The record of `project`: (creating, attempts), if any.
async fn record(control: &tokio_postgres::Client, project: &str) -> Option<(bool, i32)> {
    control
        .query_opt(
            "SELECT creating, attempts FROM fluxbase.project_teardowns WHERE project_id = $1",
            &[&project],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_deletion_whose_drop_fails_is_finished_by_the_sweep() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let pg = pg().await;
    let postgres = pg.client("postgres").await;
    let control = pg.client(&t.app.cluster.control_db).await;
    let read_role = format!("fx_{}_read", f.project);
    let db = format!("fx_{}", f.project);
    // A database the project's read role owns (only the operator could make one): its DROP
    // ROLE fails, and DROP OWNED does not drop databases.
    let blocker = unique("teardown_blocker");
    postgres
        .batch_execute(&format!("CREATE DATABASE {blocker} OWNER \"{read_role}\""))
        .await
        .unwrap();
    t.delete_project(&f.project, &f.admin).await;
    assert_eq!(exists(&postgres, &read_role, &db).await, (true, false));
    assert_eq!(record(&control, &f.project).await, Some((false, 0)));

    let sweep = || {
        t.app
            .projects
            .sweep_teardowns(Duration::from_secs(600), &t.app.metrics)
    };
    assert_eq!(sweep().await.unwrap(), 0);
    assert_eq!(record(&control, &f.project).await, Some((false, 1)));
    let text = t.metrics_text().await;
    assert!(
        metric(&text, "fluxbase_project_teardowns_pending") >= 1,
        "{text}"
    );

    postgres
        .batch_execute(&format!("DROP DATABASE {blocker}"))
        .await
        .unwrap();
    // A record whose drop failed waits a minute per failure before it is tried again.
    assert_eq!(sweep().await.unwrap(), 0);
    assert_eq!(exists(&postgres, &read_role, &db).await, (true, false));
    control
        .execute(
            "UPDATE fluxbase.project_teardowns SET since = now() - interval '61 seconds'
             WHERE project_id = $1",
            &[&f.project],
        )
        .await
        .unwrap();
    assert!(sweep().await.unwrap() >= 1);
    assert_eq!(exists(&postgres, &read_role, &db).await, (false, false));
    assert_eq!(record(&control, &f.project).await, None);
    let text = t.metrics_text().await;
    assert!(
        metric(&text, "fluxbase_project_teardowns_swept_total") >= 1,
        "{text}"
    );
    t.stop().await;
}

/// Red team rt17 and its review: another project's owner (or a role it gave GRANT OPTION to)
/// grants privileges on its objects to a project's roles, names them in a policy or in default
/// privileges. Each form is refused through the API (bootstrap 21's event trigger); such
/// grants made before it (here by the superuser acting as the owner) are revoked when that
/// project is deleted, which drops every one of its roles at once and leaves no record.
#[tokio::test]
async fn grants_from_another_project_do_not_keep_a_deleted_projects_roles() {
    let t = spawn_app().await;
    let attacker = t.fixture().await;
    let victim = t.fixture().await;
    let v = &victim.project;
    let a = &attacker.project;
    let sql = |key: String, query: String| {
        let (t, a) = (&t, a.clone());
        async move {
            t.call(
                "POST",
                "/api/execute-sql",
                Some(&key),
                Some(serde_json::json!({ "projectId": a, "query": query })),
            )
            .await
        }
    };
    let (status, body) = sql(
        attacker.admin.clone(),
        format!(
            "CREATE TABLE g (x int); ALTER TABLE g ENABLE ROW LEVEL SECURITY;
             GRANT SELECT ON g TO fx_{a}_readwrite WITH GRANT OPTION"
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true, "{body}");
    for (key, attack) in [
        (&attacker.admin, format!("GRANT SELECT ON g TO fx_{v}_read")),
        (
            &attacker.admin,
            format!("GRANT UPDATE (x) ON g TO fx_{v}_owner"),
        ),
        (
            &attacker.readwrite,
            format!("GRANT SELECT ON g TO fx_{v}_read"),
        ),
        (
            &attacker.admin,
            format!("CREATE POLICY pv ON g TO fx_{v}_auth USING (true)"),
        ),
        (
            &attacker.admin,
            format!("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO fx_{v}_readwrite"),
        ),
    ] {
        let (status, body) = sql(key.clone(), attack.clone()).await;
        assert_eq!(status, 200, "{attack}: {body}");
        assert_eq!(body["success"], false, "{attack}: {body}");
        assert!(
            body["error"]["details"]
                .as_str()
                .unwrap_or("")
                .contains("42501"),
            "{attack}: {body}"
        );
    }
    // Its own roles it may still name.
    let (_, body) = sql(
        attacker.admin.clone(),
        format!(
            "GRANT SELECT ON g TO fx_{a}_read; CREATE POLICY own ON g TO fx_{a}_auth USING (true)"
        ),
    )
    .await;
    assert_eq!(body["success"], true, "{body}");

    // Made before the guard existed: the superuser acting as the attacker's owner.
    let pg = pg().await;
    let attacker_db = pg.client(&format!("fx_{a}")).await;
    attacker_db
        .batch_execute(&format!(
            "SET ROLE fx_{a}_owner;
             GRANT SELECT ON g TO fx_{v}_read;
             GRANT ALL ON g TO fx_{v}_owner;
             CREATE POLICY pv ON g TO fx_{v}_auth USING (true);
             ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO fx_{v}_readwrite;
             RESET ROLE"
        ))
        .await
        .unwrap();
    let postgres = pg.client("postgres").await;
    let control = pg.client(&t.app.cluster.control_db).await;
    let named: i64 = postgres
        .query_one(
            "SELECT count(*) FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid
             WHERE r.rolname LIKE $1",
            &[&format!("fx_{v}_%")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(named >= 4, "the grants name the victim's roles ({named})");
    t.delete_project(v, &victim.admin).await;
    let left: Vec<String> = postgres
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
            &[&format!("fx_{v}_%")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(left.is_empty(), "roles left: {left:?}");
    assert_eq!(record(&control, v).await, None);
    // The attacker's own table and policy are still there.
    let rows = t
        .rows(
            &attacker.admin,
            &attacker.project,
            "SELECT count(*) AS n FROM g",
        )
        .await;
    assert_eq!(rows[0]["n"], 0);
    t.stop().await;
}

/// Red team rt17: a server killed between a deletion's drops and its row's delete left a
/// project row that said `active` over a dropped database. Its record (older than the
/// deletion grace, its row still there) makes the sweep's task delete it again; a younger one
/// (a deletion under way, maybe on another node) is left alone.
#[tokio::test]
async fn a_deletion_a_crash_stopped_half_way_is_finished() {
    let t = spawn_app().await;
    let (stopped, running) = (t.fixture().await, t.fixture().await);
    let pg = pg().await;
    let postgres = pg.client("postgres").await;
    let control = pg.client(&t.app.cluster.control_db).await;
    for (f, age) in [(&stopped, 120.0), (&running, 0.0)] {
        control
            .execute(
                "INSERT INTO fluxbase.project_teardowns (project_id, db_name, engine, creating, since)
                 VALUES ($1, 'fx_' || $1, 'postgresql', false, now() - make_interval(secs => $2))",
                &[&f.project, &age],
            )
            .await
            .unwrap();
    }
    // (What the crash left is the record and the row; whether the drops had run before it
    // does not matter: a deletion drops only what is there.)
    t.app.resume_deletions().await.unwrap();
    let (role, db) = exists(
        &postgres,
        &format!("fx_{}_owner", stopped.project),
        &format!("fx_{}", stopped.project),
    )
    .await;
    assert_eq!((role, db), (false, false));
    assert_eq!(record(&control, &stopped.project).await, None);
    let (status, _) = t
        .call(
            "POST",
            "/api/execute-sql",
            Some(&stopped.admin),
            Some(serde_json::json!({ "projectId": stopped.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 401, "the project and its keys are gone");
    let rows = t
        .rows(&running.admin, &running.project, "SELECT 1 AS one")
        .await;
    assert_eq!(rows[0]["one"], 1, "a deletion under way is not taken over");
    assert_eq!(record(&control, &running.project).await, Some((false, 0)));
    // Claimed once: a second sweep (another node's) does not take the same deletion over.
    control
        .execute(
            "UPDATE fluxbase.project_teardowns SET since = now() - interval '2 minutes'
             WHERE project_id = $1",
            &[&running.project],
        )
        .await
        .unwrap();
    let pool = t.app.control.get().await.unwrap();
    let first = fluxbase::control::teardowns::interrupted_deletions(&pool, 60.0, 100)
        .await
        .unwrap();
    assert_eq!(first, vec![running.project.clone()]);
    let second = fluxbase::control::teardowns::interrupted_deletions(&pool, 60.0, 100)
        .await
        .unwrap();
    assert!(second.is_empty(), "{second:?}");
    control
        .execute(
            "DELETE FROM fluxbase.project_teardowns WHERE project_id = $1",
            &[&running.project],
        )
        .await
        .unwrap();
    t.stop().await;
}

#[tokio::test]
async fn what_a_crash_mid_creation_left_is_dropped_and_nothing_else() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let pg = pg().await;
    let postgres = pg.client("postgres").await;
    let control = pg.client(&t.app.cluster.control_db).await;
    // Three half-made projects, as a creation stopped by a crash leaves them: an old one, one
    // younger than the grace (another node may still be creating it), and one that nothing
    // recorded (another deployment's, or anyone's).
    let made = |id: String| {
        let postgres = &postgres;
        async move {
            let (role, db) = (format!("fx_{id}_owner"), format!("fx_{id}"));
            // One statement each: CREATE DATABASE runs outside a transaction block.
            for sql in [
                format!("CREATE ROLE \"{role}\" NOLOGIN"),
                format!("CREATE DATABASE \"{db}\""),
            ] {
                postgres.batch_execute(&sql).await.unwrap();
            }
            (id, role, db)
        }
    };
    let hex = || format!("{:016x}", rand_u64());
    let (old, old_role, old_db) = made(hex()).await;
    let (young, young_role, young_db) = made(hex()).await;
    let (_, stray_role, stray_db) = made(hex()).await;
    for (id, age) in [(&old, 3600), (&young, 5)] {
        control
            .execute(
                "INSERT INTO fluxbase.project_teardowns (project_id, db_name, engine, creating, since)
                 VALUES ($1, 'fx_' || $1, 'postgresql', true, now() - make_interval(secs => $2))",
                &[id, &(age as f64)],
            )
            .await
            .unwrap();
    }
    // A live project's record (a deletion under way, not dropped yet) is not swept either.
    control
        .execute(
            "INSERT INTO fluxbase.project_teardowns (project_id, db_name, engine, creating)
             VALUES ($1, 'fx_' || $1, 'postgresql', false)",
            &[&f.project],
        )
        .await
        .unwrap();

    t.app
        .projects
        .sweep_teardowns(Duration::from_secs(600), &t.app.metrics)
        .await
        .unwrap();
    assert_eq!(exists(&postgres, &old_role, &old_db).await, (false, false));
    assert_eq!(record(&control, &old).await, None);
    assert_eq!(
        exists(&postgres, &young_role, &young_db).await,
        (true, true)
    );
    assert_eq!(record(&control, &young).await, Some((true, 0)));
    assert_eq!(
        exists(&postgres, &stray_role, &stray_db).await,
        (true, true)
    );
    let live = (
        format!("fx_{}_owner", f.project),
        format!("fx_{}", f.project),
    );
    assert_eq!(exists(&postgres, &live.0, &live.1).await, (true, true));
    assert_eq!(record(&control, &f.project).await, Some((false, 0)));
    let rows = t.rows(&f.admin, &f.project, "SELECT 1 AS one").await;
    assert_eq!(rows[0]["one"], 1, "the live project still answers");

    // Once the young one is old enough it goes too; the stray one never.
    t.app
        .projects
        .sweep_teardowns(Duration::ZERO, &t.app.metrics)
        .await
        .unwrap();
    assert_eq!(
        exists(&postgres, &young_role, &young_db).await,
        (false, false)
    );
    assert_eq!(
        exists(&postgres, &stray_role, &stray_db).await,
        (true, true)
    );
    for sql in [
        format!("DROP DATABASE \"{stray_db}\""),
        format!("DROP ROLE \"{stray_role}\""),
    ] {
        postgres.batch_execute(&sql).await.unwrap();
    }
    control
        .execute(
            "DELETE FROM fluxbase.project_teardowns WHERE project_id = $1",
            &[&f.project],
        )
        .await
        .unwrap();
    t.stop().await;
}

#[tokio::test]
async fn a_created_project_leaves_no_record_and_a_swept_creation_fails() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let pg = pg().await;
    let control = pg.client(&t.app.cluster.control_db).await;
    assert_eq!(record(&control, &f.project).await, None);
    // A creation the sweep took for abandoned cannot make its row: the record is not a
    // creation's any more.
    let mut client = t.app.control.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let id = format!("{:016x}", rand_u64());
    fluxbase::control::teardowns::record(&tx, &id, "fx_none", Default::default(), false)
        .await
        .unwrap();
    assert!(!fluxbase::control::teardowns::created(&tx, &id)
        .await
        .unwrap());
    fluxbase::control::teardowns::record(&tx, &id, "fx_none", Default::default(), true)
        .await
        .unwrap();
    assert!(fluxbase::control::teardowns::created(&tx, &id)
        .await
        .unwrap());
    tx.rollback().await.unwrap();

    // A creation finishing while a sweep holds its record waits for the sweep, then fails.
    control
        .execute(
            "INSERT INTO fluxbase.project_teardowns (project_id, db_name, engine, creating, since)
             VALUES ($1, 'fx_' || $1, 'postgresql', true, now() - interval '1 hour')",
            &[&id],
        )
        .await
        .unwrap();
    let mut sweeper = t.app.control.get().await.unwrap();
    let sweep = sweeper.transaction().await.unwrap();
    let claimed = fluxbase::control::teardowns::claim(&sweep, 600.0, &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.0, id);
    let app = t.app.clone();
    let creator = tokio::spawn({
        let id = id.clone();
        async move {
            let mut client = app.control.get().await.unwrap();
            let tx = client.transaction().await.unwrap();
            let created = fluxbase::control::teardowns::created(&tx, &id)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            created
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !creator.is_finished(),
        "the creation waits for the sweep's lock"
    );
    // A second sweep (another node) skips the locked record.
    let mut other = t.app.control.get().await.unwrap();
    let other_tx = other.transaction().await.unwrap();
    assert!(fluxbase::control::teardowns::claim(&other_tx, 600.0, &[])
        .await
        .unwrap()
        .is_none());
    other_tx.rollback().await.unwrap();
    fluxbase::control::teardowns::done(&sweep, &id)
        .await
        .unwrap();
    sweep.commit().await.unwrap();
    assert!(
        !creator.await.unwrap(),
        "the swept creation cannot make its row"
    );
    t.stop().await;
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// `fluxbase doctor` names the databases and roles of projects its control database does not
/// know (leftovers from before teardowns were recorded), with the statements that drop them,
/// and not those of a live project or of a recorded teardown.
#[tokio::test]
async fn the_doctor_names_databases_and_roles_no_project_stands_for() {
    let t = spawn_app().await;
    let f = t.fixture().await;
    let pg = pg().await;
    let postgres = pg.client("postgres").await;
    let control = pg.client(&t.app.cluster.control_db).await;
    let (stray, recorded, roles_only) = (
        format!("{:016x}", rand_u64()),
        format!("{:016x}", rand_u64()),
        format!("{:016x}", rand_u64()),
    );
    for sql in [
        format!("CREATE ROLE \"fx_{stray}_owner\" NOLOGIN"),
        format!("CREATE DATABASE \"fx_{stray}\""),
        format!("CREATE DATABASE \"fx_{recorded}\""),
        format!("CREATE ROLE \"fx_{roles_only}_read\" NOLOGIN"),
    ] {
        postgres.batch_execute(&sql).await.unwrap();
    }
    control
        .execute(
            "INSERT INTO fluxbase.project_teardowns (project_id, db_name, engine, creating)
             VALUES ($1, 'fx_' || $1, 'postgresql', true)",
            &[&recorded],
        )
        .await
        .unwrap();
    let dir = crate::support::scratch_dir(&unique("doctor-leftovers"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = pg.url(&t.app.cluster.control_db);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fluxbase"))
            .env("FLUXBASE_DATA_DIR", &dir)
            .env("FLUXBASE_DATABASE_URL", url)
            .env("FLUXBASE_LOG", "warn")
            .current_dir(&dir)
            .arg("doctor")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "the database and roles of project {stray}, which this control database does not know: fx_{stray}, fx_{stray}_owner"
        )) && text.contains(&format!(
            "DROP DATABASE \"fx_{stray}\" WITH (FORCE); DROP ROLE IF EXISTS \"fx_{stray}_owner\";"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("roles of project {roles_only}"))
            && text.contains(&format!("DROP ROLE IF EXISTS \"fx_{roles_only}_read\";")),
        "{text}"
    );
    assert!(
        !text.contains(&recorded),
        "a recorded teardown is the sweep's: {text}"
    );
    assert!(
        !text.contains(&f.project),
        "a live project is no leftover: {text}"
    );
    for sql in [
        format!("DROP DATABASE \"fx_{stray}\""),
        format!("DROP ROLE \"fx_{stray}_owner\""),
        format!("DROP DATABASE \"fx_{recorded}\""),
        format!("DROP ROLE \"fx_{roles_only}_read\""),
    ] {
        postgres.batch_execute(&sql).await.unwrap();
    }
    t.stop().await;
}
