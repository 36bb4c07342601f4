//! MariaDB for the suite: one server per test binary (started with the server's own embedded
//! MariaDB code, durability relaxed), shared by every test that needs MySQL projects, beside
//! the shared PostgreSQL cluster. A test app reaches it as its `mysql_url` (its admin account),
//! so each app creates its projects' databases and accounts there, as with an operator's
//! server; project ids are random, so apps never meet.
//!
//! Like the PostgreSQL cluster it lives in a static: its watchdog stops it when this process
//! ends, and the next run sweeps its directory.

use fluxbase::mysql::embedded::Server;
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use super::app::{spawn_app_with, TestApp};
use super::cluster::scratch_dir;
use super::fixtures::Fixture;

pub struct MariaDb {
    pub server: Server,
    /// `mysql://fluxbase:…@127.0.0.1:<port>/`: the server account.
    pub admin_url: String,
}

static MARIADB: OnceCell<MariaDb> = OnceCell::const_new();

/// Durability off: a crashed test server loses nothing a test reads.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("innodb-flush-log-at-trx-commit", "2"),
    ("sync-binlog", "0"),
    ("innodb-buffer-pool-size", "67108864"),
    ("innodb-log-file-size", "33554432"),
    // An operator's server (the suite's apps reach it as `mysql_url`) expires its binary logs
    // itself; the embedded server leaves that to Fluxbase (crate::mysql::retention).
    ("binlog-expire-logs-seconds", "604800"),
];

/// The MariaDB shared by every test of this binary.
pub async fn mariadb() -> &'static MariaDb {
    MARIADB
        .get_or_init(|| async {
            let root = scratch_dir(&format!("it-{}-mariadb", std::process::id()));
            let password = fluxbase::secrets::random_base62(24);
            let server =
                tokio::task::spawn_blocking(move || Server::start(&root, &password, TEST_SETTINGS))
                    .await
                    .unwrap()
                    .expect("starting the test MariaDB");
            MariaDb {
                admin_url: server.admin_url(),
                server,
            }
        })
        .await
}

impl MariaDb {
    /// A connection as the server account (what a test checks behind the API's back).
    pub async fn admin(&self) -> mysql_async::Conn {
        mysql_async::Conn::from_url(&self.admin_url)
            .await
            .expect("connecting to the test MariaDB")
    }

    /// Rows of `sql` as the server account, each as a JSON array of text (or null).
    pub async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut conn = self.admin().await;
        let rows: Vec<mysql_async::Row> = conn.query(sql).await.expect(sql);
        let _ = conn.disconnect().await;
        rows.into_iter()
            .map(|r| {
                r.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        mysql_async::Value::NULL => None,
                        mysql_async::Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into()),
                        other => Some(other.as_sql(true)),
                    })
                    .collect()
            })
            .collect()
    }
}

/// The MySQL error number of an `/api/execute-sql` answer (`details: "ERROR:  1142 (42000)"`
/// → 1142), or 0 on success; any other failure fails the test.
pub fn mysql_error_code(body: &Value) -> u64 {
    if body["success"] == true {
        return 0;
    }
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR", "{body}");
    body["error"]["details"]
        .as_str()
        .unwrap()
        .trim_start_matches("ERROR:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A connection to a project's database (`fx_<id>`) on the shared MariaDB as the server
/// account: real transactions and rollbacks behind the API's back.
pub async fn project_conn(project: &str) -> mysql_async::Conn {
    let mut conn = mariadb().await.admin().await;
    conn.query_drop(format!("USE fx_{project}")).await.unwrap();
    conn
}

/// A server whose MySQL projects live on the shared MariaDB.
pub async fn spawn_mysql_app() -> TestApp {
    let url = mariadb().await.admin_url.clone();
    spawn_app_with(|c| c.mysql_url = Some(url.into())).await
}

impl TestApp {
    /// A new user and a MySQL project of theirs with one key of each scope (through
    /// `POST /api/projects {engine: "mysql"}`).
    pub async fn mysql_fixture(&self) -> Fixture {
        let (token, user_id, email) = self.signup().await;
        let (status, body) = self
            .call(
                "POST",
                "/api/projects",
                Some(&token),
                Some(json!({ "name": "mysql test", "engine": "mysql" })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["project"]["engine"], "mysql", "{body}");
        let key = |s: &str| body["apiKeys"][s].as_str().unwrap().to_string();
        Fixture {
            token,
            user_id,
            email,
            project: body["project"]["id"].as_str().unwrap().to_string(),
            read: key("read"),
            readwrite: key("readwrite"),
            admin: key("admin"),
        }
    }

    /// `POST /api/execute-sql` with params; asserts HTTP 200, returns the body.
    pub async fn sql_with(&self, key: &str, project: &str, query: &str, params: Value) -> Value {
        self.sql_params(key, project, query, params).await
    }
}
