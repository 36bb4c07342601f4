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
    let prepared: i64 = setting("max_prepared_transactions").await?.parse()?;
    if prepared > 0 {
        findings.push(Finding {
            problem: format!(
                "max_prepared_transactions is {prepared}: any tenant can PREPARE TRANSACTION and \
                 hold its locks forever (the session reset's routine-epoch lock included, which \
                 then blocks that project's requests and the server's own migrations at start-up)"
            ),
            fix: "ALTER SYSTEM SET max_prepared_transactions = 0; then restart PostgreSQL \
                  (Fluxbase uses no prepared transactions)"
                .into(),
        });
    }
    if let Err(why) = crate::sql::memory::visible_postmaster(&client, target).await {
        findings.push(Finding {
            problem: format!(
                "the tenants' backends' memory cannot be watched from this host ({why}): any \
                 role may SET work_mem, and nothing ends a backend that grows to gigabytes"
            ),
            fix: "run Fluxbase on the cluster's host (same PID namespace, update_process_title = \
                  on), or bound the cluster's memory by its own means (a cgroup, systemd's \
                  MemoryMax) so that the OOM killer never picks the postmaster"
                .into(),
        });
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
    findings.extend(unowned_project_databases(&client).await?);
    Ok(findings)
}

/// Databases and roles named as this deployment names a project's (`fx_<16 hex>`,
/// `fx_<id>_owner|readwrite|read|auth`) that no project row of the control database stands
/// for and no teardown record names (those the server's sweep drops by itself): what a crash
/// or a failed drop left before control migration 27 recorded teardowns. Only reported: the
/// cluster may hold another deployment's projects (another control database), which the
/// operator alone can tell apart. Nothing when `client` is not on a control database.
async fn unowned_project_databases(
    client: &tokio_postgres::Client,
) -> anyhow::Result<Vec<Finding>> {
    let row = client
        .query_one(
            "SELECT pg_catalog.to_regclass('fluxbase.projects') IS NOT NULL,
                    pg_catalog.to_regclass('fluxbase.project_teardowns') IS NOT NULL",
            &[],
        )
        .await?;
    let (projects, teardowns): (bool, bool) = (row.get(0), row.get(1));
    if !projects {
        return Ok(Vec::new());
    }
    let recorded = if teardowns {
        "OR EXISTS (SELECT FROM fluxbase.project_teardowns t WHERE t.project_id = x.id)"
    } else {
        ""
    };
    let rows = client
        .query(
            &format!(
                "SELECT x.id, pg_catalog.bool_or(x.db), pg_catalog.array_agg(x.name ORDER BY x.name)
                 FROM (
                     SELECT pg_catalog.substr(datname, 4) AS id, true AS db, datname::text AS name
                     FROM pg_catalog.pg_database WHERE datname ~ '^fx_[0-9a-f]{{16}}$'
                     UNION ALL
                     SELECT pg_catalog.substr(rolname, 4, 16), false, rolname::text
                     FROM pg_catalog.pg_roles
                     WHERE rolname ~ '^fx_[0-9a-f]{{16}}_(owner|readwrite|read|auth)$'
                 ) x
                 WHERE NOT (EXISTS (SELECT FROM fluxbase.projects p WHERE p.id = x.id) {recorded})
                 GROUP BY x.id ORDER BY x.id"
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (id, has_db, names): (String, bool, Vec<String>) = (r.get(0), r.get(1), r.get(2));
            let quoted = |n: &String| format!("\"{n}\"");
            let db = format!("fx_{id}");
            let roles: Vec<String> = names.iter().filter(|n| **n != db).map(quoted).collect();
            let mut fix = String::from(
                "if no other Fluxbase deployment uses this cluster (another control database), \
                 they are leftovers of a deleted or failed project: ",
            );
            if has_db {
                fix.push_str(&format!("DROP DATABASE \"{db}\" WITH (FORCE); "));
            }
            if !roles.is_empty() {
                fix.push_str(&format!("DROP ROLE IF EXISTS {};", roles.join(", ")));
            }
            Finding {
                problem: format!(
                    "{} of project {id}, which this control database does not know: {}",
                    if has_db {
                        "the database and roles"
                    } else {
                        "roles"
                    },
                    names.join(", ")
                ),
                fix,
            }
        })
        .collect())
}

/// What `fluxbase doctor` learned of the NATS server of a cluster (`nats_url`).
#[derive(Debug)]
pub struct NatsFacts {
    /// The server's version (`2.9.25`).
    pub version: String,
    /// The server is part of a NATS cluster (needed for `nats_replicas` > 1).
    pub clustered: bool,
    /// The account's JetStream limits and storage in use, or why JetStream did not answer.
    pub jetstream: Result<(JetStreamLimits, u64), String>,
    /// Active projects: one stream each.
    pub projects: usize,
    /// Nodes connected to the control database now (at least 1): one consumer per project each.
    pub nodes: usize,
}

/// An account's JetStream limits (`None`: unlimited), as `$JS.API.INFO` reports them. Read here
/// rather than with async-nats' `query_account`, which expects fields nats-server 2.9 does not
/// send (`reserved_memory`, `api.level`) and fails on Debian's server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JetStreamLimits {
    pub max_memory: Option<i64>,
    pub max_storage: Option<i64>,
    pub max_streams: Option<i64>,
    pub max_consumers: Option<i64>,
    pub storage_max_stream_bytes: Option<i64>,
}

/// `$JS.API.INFO`'s answer: the account's limits and the file storage it uses, or the error
/// the server gave (JetStream off for the account).
pub fn parse_account_info(body: &[u8]) -> Result<(JetStreamLimits, u64), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("unreadable account info: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(e["description"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string()));
    }
    let l = &v["limits"];
    let limit = |name: &str| l[name].as_i64().filter(|n| *n >= 0);
    Ok((
        JetStreamLimits {
            max_memory: limit("max_memory"),
            max_storage: limit("max_storage"),
            max_streams: limit("max_streams"),
            max_consumers: limit("max_consumers"),
            storage_max_stream_bytes: limit("storage_max_stream_bytes"),
        },
        v["storage"].as_u64().unwrap_or(0),
    ))
}

/// The oldest NATS server cluster mode runs on (Debian's package).
const NATS_MIN: (u64, u64) = (2, 9);

/// `2.10.3-beta` → (2, 10); `None` for what is not a version.
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// What is wrong with a NATS server for cluster mode, and how to fix it (pure: see
/// [`check_nats`] for where the facts come from).
pub fn nats_findings(facts: &NatsFacts, retention_bytes: u64, replicas: usize) -> Vec<Finding> {
    let mut findings = Vec::new();
    match major_minor(&facts.version) {
        Some(v) if v >= NATS_MIN => {}
        None => findings.push(Finding {
            problem: format!(
                "the NATS server's version {:?} is unreadable: it is too old or not nats-server",
                facts.version
            ),
            fix: "use nats-server 2.9 or newer (Debian 12's package or a release from nats.io)"
                .into(),
        }),
        Some(_) => findings.push(Finding {
            problem: format!("nats-server {} is too old", facts.version),
            fix: "use nats-server 2.9 or newer (Debian 12's package or a release from nats.io)"
                .into(),
        }),
    }
    if replicas > 1 && !facts.clustered {
        findings.push(Finding {
            problem: format!(
                "nats_replicas is {replicas} but the NATS server is not part of a cluster"
            ),
            fix: "set FLUXBASE_NATS_REPLICAS=1, or run a NATS cluster of at least that many servers with JetStream".into(),
        });
    }
    let (limits, used) = match &facts.jetstream {
        Ok(j) => j,
        Err(e) => {
            findings.push(Finding {
                problem: format!("JetStream is not available: {e}"),
                fix: "start nats-server with JetStream: `nats-server -js -sd <dir>` (or `jetstream { store_dir: <dir> }` in its configuration, and JetStream enabled for the account)".into(),
            });
            return findings;
        }
    };
    let projects = facts.projects as i64;
    if let Some(max) = limits.max_streams {
        // Room for the projects there are and some to come.
        if max < projects + 10 {
            findings.push(Finding {
                problem: format!(
                    "the NATS account allows {max} JetStream streams; this cluster has {projects} project(s), one stream each"
                ),
                fix: format!("raise the account's max_streams (jetstream {{ max_streams: {} }} in the account, or -1 for no limit)", (projects + 10).max(1000)),
            });
        }
    }
    if let Some(max) = limits.max_consumers {
        let needed = projects * facts.nodes.max(1) as i64;
        if max < needed + 10 {
            findings.push(Finding {
                problem: format!(
                    "the NATS account allows {max} JetStream consumers; {projects} project(s) on {} node(s) use {needed} (one per project per node)",
                    facts.nodes.max(1)
                ),
                fix: "raise the account's max_consumers (or -1 for no limit)".into(),
            });
        }
    }
    let retention = i64::try_from(retention_bytes).unwrap_or(i64::MAX);
    if let Some(max) = limits.storage_max_stream_bytes {
        if max < retention {
            findings.push(Finding {
                problem: format!(
                    "the NATS account caps a stream at {max} bytes; nats_retention_bytes is {retention}"
                ),
                fix: format!("lower FLUXBASE_NATS_RETENTION_BYTES to {max} or less, or raise the account's max_bytes"),
            });
        }
    }
    if let Some(max) = limits.max_storage {
        // Each stream reserves its max_bytes (times its replicas) from the account's storage.
        let needed = retention
            .saturating_mul(projects.max(1))
            .saturating_mul(replicas as i64);
        if max < needed {
            findings.push(Finding {
                problem: format!(
                    "the NATS account has {max} bytes of JetStream file storage; {projects} project stream(s) of nats_retention_bytes = {retention} (× {replicas} replica(s)) reserve {needed}"
                ),
                fix: "raise the account's JetStream max_file (max_storage), or lower FLUXBASE_NATS_RETENTION_BYTES".into(),
            });
        } else if (*used as i64) > max / 10 * 9 {
            findings.push(Finding {
                problem: format!("JetStream file storage is {used} of {max} bytes used"),
                fix: "raise the account's JetStream max_file, or lower FLUXBASE_NATS_RETENTION_BYTES / FLUXBASE_NATS_RETENTION_SECS".into(),
            });
        }
    }
    if limits.max_memory == Some(0) && limits.max_storage == Some(0) {
        findings.push(Finding {
            problem: "the NATS account has no JetStream storage at all".into(),
            fix: "give the account JetStream file storage (max_file)".into(),
        });
    }
    findings
}

/// Cluster mode: connects to `nats_url` and checks the server (version ≥ 2.9, JetStream on,
/// its limits against the projects of `target`'s control database).
pub async fn check_nats(
    config: &crate::config::Config,
    target: &ClusterTarget,
) -> anyhow::Result<Vec<Finding>> {
    let Some(url) = &config.nats_url else {
        return Ok(Vec::new());
    };
    let shown = crate::config::redact_url(url.expose());
    let client = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        crate::cluster::connect_options(url.expose())
            .name("fluxbase-doctor")
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(url.expose()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Ok(vec![Finding {
                problem: format!("cannot connect to NATS at {shown}: {e}"),
                fix: "start nats-server with JetStream (`nats-server -js -sd <dir>`), and check FLUXBASE_NATS_URL (host, port, credentials in the URL)".into(),
            }])
        }
        Err(_) => {
            return Ok(vec![Finding {
                problem: format!("NATS at {shown} did not answer within 10 s"),
                fix: "check that nats-server runs and that this host can reach it (firewall, port 4222)".into(),
            }])
        }
    };
    let info = client.server_info();
    let jetstream = if !info.jetstream {
        Err("the server runs without JetStream".to_string())
    } else {
        match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.request("$JS.API.INFO", bytes::Bytes::new()),
        )
        .await
        {
            Ok(Ok(answer)) => parse_account_info(&answer.payload),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer to $JS.API.INFO within 5 s".into()),
        }
    };
    let control = target.connect(&target.control_db).await?;
    let projects: i64 = control
        .query_one(
            "SELECT count(*) FROM fluxbase.projects WHERE status = 'active'",
            &[],
        )
        .await?
        .get(0);
    let nodes: i64 = control
        .query_one(
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity
             WHERE application_name LIKE 'fluxbase-node:%'",
            &[],
        )
        .await?
        .get(0);
    let facts = NatsFacts {
        version: info.version.clone(),
        clustered: info.cluster.is_some(),
        jetstream,
        projects: projects as usize,
        nodes: nodes.max(1) as usize,
    };
    Ok(nats_findings(
        &facts,
        config.nats_retention_bytes,
        config.nats_replicas,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    type Limits = JetStreamLimits;

    fn facts(limits: Limits, used: u64) -> NatsFacts {
        NatsFacts {
            version: "2.9.25".into(),
            clustered: false,
            jetstream: Ok((limits, used)),
            projects: 20,
            nodes: 3,
        }
    }

    fn problems(f: &NatsFacts, retention: u64, replicas: usize) -> Vec<String> {
        nats_findings(f, retention, replicas)
            .into_iter()
            .map(|f| {
                assert!(!f.fix.is_empty());
                f.problem
            })
            .collect()
    }

    #[test]
    fn account_info_of_nats_server_2_9_reads() {
        // What nats-server 2.9.10 -js answers (no reserved_memory, no api.level).
        let body = br#"{"type":"io.nats.jetstream.api.v1.account_info_response","memory":0,"storage":172414,"streams":1,"consumers":3,"limits":{"max_memory":-1,"max_storage":-1,"max_streams":-1,"max_consumers":-1,"max_ack_pending":-1,"memory_max_stream_bytes":-1,"storage_max_stream_bytes":-1,"max_bytes_required":false},"api":{"total":38,"errors":3}}"#;
        assert_eq!(
            parse_account_info(body).unwrap(),
            (JetStreamLimits::default(), 172414)
        );
        let limited = br#"{"storage":5,"limits":{"max_memory":0,"max_storage":1000,"max_streams":10,"max_consumers":20,"storage_max_stream_bytes":100}}"#;
        assert_eq!(
            parse_account_info(limited).unwrap(),
            (
                JetStreamLimits {
                    max_memory: Some(0),
                    max_storage: Some(1000),
                    max_streams: Some(10),
                    max_consumers: Some(20),
                    storage_max_stream_bytes: Some(100),
                },
                5
            )
        );
        let off = br#"{"type":"io.nats.jetstream.api.v1.account_info_response","error":{"code":503,"err_code":10039,"description":"jetstream not enabled for account"}}"#;
        assert_eq!(
            parse_account_info(off).unwrap_err(),
            "jetstream not enabled for account"
        );
        assert!(parse_account_info(b"<html>").is_err());
    }

    #[test]
    fn a_recent_server_with_jetstream_and_no_limits_is_fine() {
        assert!(problems(&facts(Limits::default(), 0), 1 << 28, 1).is_empty());
        for v in ["2.9.0", "2.10.18", "3.0.0-beta.1", "v2.11.1"] {
            let mut f = facts(Limits::default(), 0);
            f.version = v.into();
            assert!(problems(&f, 1 << 28, 1).is_empty(), "{v}");
        }
    }

    #[test]
    fn old_servers_and_missing_jetstream_are_named() {
        for v in ["2.8.4", "1.4.0", "", "x.y"] {
            let mut f = facts(Limits::default(), 0);
            f.version = v.into();
            let p = problems(&f, 1 << 28, 1);
            assert_eq!(p.len(), 1, "{v}: {p:?}");
            assert!(p[0].contains("too old"), "{p:?}");
            assert!(v.starts_with(char::is_numeric) == p[0].starts_with("nats-server"));
        }
        let mut f = facts(Limits::default(), 0);
        f.jetstream = Err("the server runs without JetStream".into());
        let found = nats_findings(&f, 1 << 28, 1);
        assert_eq!(found.len(), 1);
        assert!(found[0].problem.contains("JetStream is not available"));
        assert!(found[0].fix.contains("-js"));
        // Replicas need a NATS cluster.
        let p = problems(&facts(Limits::default(), 0), 1 << 28, 3);
        assert!(p[0].contains("not part of a cluster"), "{p:?}");
        let mut f = facts(Limits::default(), 0);
        f.clustered = true;
        assert!(problems(&f, 1 << 28, 3).is_empty());
    }

    #[test]
    fn account_limits_are_weighed_against_the_projects() {
        let mb = 1 << 20;
        // 20 projects: 30 streams leave room for 10 more; 25 do not.
        let ok = Limits {
            max_streams: Some(30),
            max_consumers: Some(100),
            max_storage: Some(20 * 256 * mb),
            storage_max_stream_bytes: Some(256 * mb),
            ..Default::default()
        };
        assert!(problems(&facts(ok, 0), 256 * mb as u64, 1).is_empty());
        let p = problems(
            &facts(
                Limits {
                    max_streams: Some(25),
                    ..ok
                },
                0,
            ),
            256 * mb as u64,
            1,
        );
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("25 JetStream streams"), "{p:?}");
        // 20 projects × 3 nodes = 60 consumers.
        let p = problems(
            &facts(
                Limits {
                    max_consumers: Some(60),
                    ..ok
                },
                0,
            ),
            256 * mb as u64,
            1,
        );
        assert!(p[0].contains("use 60"), "{p:?}");
        // Storage: what the streams reserve, a stream's cap, and nearly full.
        let p = problems(&facts(ok, 0), 512 * mb as u64, 1);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|p| p.contains("caps a stream")));
        assert!(p.iter().any(|p| p.contains("reserve")));
        let p = problems(&facts(ok, 19 * 256 * mb as u64), 256 * mb as u64, 1);
        assert!(p[0].contains("used"), "{p:?}");
        let none = Limits {
            max_memory: Some(0),
            max_storage: Some(0),
            ..Default::default()
        };
        assert!(problems(&facts(none, 0), 1, 1)
            .iter()
            .any(|p| p.contains("no JetStream storage")));
    }
}
