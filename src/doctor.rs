//! `fluxbase doctor`: checks that a cluster can host Fluxbase and says how to fix what is not.

use crate::db::ClusterTarget;

pub struct Finding {
    pub problem: String,
    pub fix: String,
}

/// Checks wal_level, slots, WAL senders, version and the admin role's privileges.
pub async fn check(target: &ClusterTarget) -> anyhow::Result<Vec<Finding>> {
    check_cluster(target, true).await
}

/// [`check`]; `slots_should_be_read` is false for an embedded cluster started for the check
/// alone (no server runs, so nobody reads the slots yet: only slots losing WAL are reported).
pub async fn check_cluster(
    target: &ClusterTarget,
    slots_should_be_read: bool,
) -> anyhow::Result<Vec<Finding>> {
    let client = match target.connect(&target.control_db).await {
        Ok(c) => c,
        Err(_) => target.connect("postgres").await?,
    };
    let mut findings = Vec::new();
    let setting = |name: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT current_setting($1)", &[&name])
                .await
                .map(|r| r.get::<_, String>(0))
        }
    };
    let version: i32 = setting("server_version_num").await?.parse()?;
    if version < 140000 {
        findings.push(Finding {
            problem: format!("PostgreSQL {version} is too old"),
            fix: "use PostgreSQL 14 or newer (logical decoding messages and streaming need it)"
                .into(),
        });
    }
    let wal_level = setting("wal_level").await?;
    if wal_level != "logical" {
        findings.push(Finding {
            problem: format!("wal_level is {wal_level}, change data capture needs logical"),
            fix: "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into(),
        });
    }
    for (name, min) in [("max_replication_slots", 16), ("max_wal_senders", 16)] {
        let v: i64 = setting(name).await?.parse()?;
        if v < min {
            findings.push(Finding {
                problem: format!("{name} is {v}; each project uses one"),
                fix: format!("ALTER SYSTEM SET {name} = 256; then restart PostgreSQL"),
            });
        }
    }
    let row = client
        .query_one(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication FROM pg_roles
             WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (sup, createdb, createrole, replication): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let user = &target.admin_user;
    for (ok, attr) in [
        (createdb, "CREATEDB"),
        (createrole, "CREATEROLE"),
        (replication, "REPLICATION"),
    ] {
        if !sup && !ok {
            findings.push(Finding {
                problem: format!("role {user} lacks {attr}"),
                fix: format!("ALTER ROLE \"{user}\" {attr};"),
            });
        }
    }
    let keep: String = setting("max_slot_wal_keep_size").await?;
    if keep == "-1" {
        findings.push(Finding {
            problem: "max_slot_wal_keep_size is unlimited: a stalled replication slot can fill the disk".into(),
            fix: "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); (a slot past it is lost and reported, not silently skipped)".into(),
        });
    }
    let stalled = client
        .query(
            "SELECT slot_name, database, active, wal_status,
                    pg_size_pretty(pg_current_wal_lsn() - restart_lsn)
             FROM pg_replication_slots
             WHERE slot_name LIKE 'fluxbase\\_%'
               AND (($1 AND NOT active) OR wal_status IN ('extended', 'unreserved', 'lost'))",
            &[&slots_should_be_read],
        )
        .await?;
    for r in stalled {
        let (slot, db, active, status, retained): (
            String,
            Option<String>,
            bool,
            Option<String>,
            Option<String>,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        findings.push(Finding {
            problem: format!(
                "replication slot {slot} (database {}) is {}{}, holding {} of WAL",
                db.unwrap_or_default(),
                if active { "active" } else { "not being read" },
                status.map(|s| format!(", wal_status {s}")).unwrap_or_default(),
                retained.unwrap_or_else(|| "?".into()),
            ),
            fix: "start the Fluxbase server that owns it, or drop the project (fluxbase project delete <id>) if it is gone".into(),
        });
    }
    Ok(findings)
}
