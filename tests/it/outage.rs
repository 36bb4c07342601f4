//! The database goes away and comes back: API calls answer the guide's 503
//! `DATABASE_CONNECTION_ERROR` (not 500) while it is away, and the server recovers by itself.
//!
//! The server reaches PostgreSQL through a loopback TCP proxy the test controls: it can cut
//! (close every open connection and refuse new ones) the connections to the project databases
//! only, or all of them, and restore them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{pg, spawn_app_with, unique, TestApp};

/// Which connections are cut, by the database named in their startup message.
type Cut = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Default)]
struct ProxyState {
    cut: Option<Cut>,
    next: u64,
    /// Open connections: their database and the task copying their bytes.
    open: HashMap<u64, (String, tokio::task::AbortHandle)>,
}

struct PgProxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

/// Reads one startup-phase message (length-prefixed, no type byte).
async fn read_startup(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = client.read_u32().await? as usize;
    if !(8..=10_000).contains(&len) {
        return Err(std::io::Error::other("bad startup length"));
    }
    let mut msg = vec![0u8; len];
    msg[..4].copy_from_slice(&(len as u32).to_be_bytes());
    client.read_exact(&mut msg[4..]).await?;
    Ok(msg)
}

/// The `database` parameter of a startup message ("" for cancel requests).
fn database_of(msg: &[u8]) -> String {
    let mut fields = msg[8..].split(|b| *b == 0);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if k == b"database" {
            return String::from_utf8_lossy(v).into_owned();
        }
        if k.is_empty() {
            break;
        }
    }
    String::new()
}

impl PgProxy {
    async fn start(upstream: SocketAddr) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let task = tokio::spawn(Self::accept(listener, upstream, state.clone()));
        PgProxy { addr, state, task }
    }

    async fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<Mutex<ProxyState>>) {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _ = Self::relay(client, upstream, state).await;
            });
        }
    }

    async fn relay(
        mut client: TcpStream,
        upstream: SocketAddr,
        state: Arc<Mutex<ProxyState>>,
    ) -> std::io::Result<()> {
        let mut msg = read_startup(&mut client).await?;
        if msg[4..8] == 80877103u32.to_be_bytes() {
            // SSLRequest: no TLS here; the client then sends its real startup message.
            client.write_all(b"N").await?;
            msg = read_startup(&mut client).await?;
        }
        let db = database_of(&msg);
        let id = {
            let mut s = state.lock().unwrap();
            if s.cut.as_ref().is_some_and(|cut| cut(&db)) {
                return Ok(()); // dropped: the client sees the connection closed
            }
            s.next += 1;
            s.next
        };
        let mut server = TcpStream::connect(upstream).await?;
        server.write_all(&msg).await?;
        let copy = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        state
            .lock()
            .unwrap()
            .open
            .insert(id, (db, copy.abort_handle()));
        let _ = copy.await;
        state.lock().unwrap().open.remove(&id);
        Ok(())
    }

    /// Closes the open connections to the databases `cut` names and refuses new ones.
    fn cut(&self, cut: impl Fn(&str) -> bool + Send + Sync + 'static) {
        let mut s = self.state.lock().unwrap();
        for (db, copy) in s.open.values() {
            if cut(db) {
                copy.abort();
            }
        }
        s.cut = Some(Arc::new(cut));
    }

    fn restore(&self) {
        self.state.lock().unwrap().cut = None;
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asserts the guide's 503 shape.
fn assert_unavailable(what: &str, status: u16, body: &Value) {
    assert_eq!(status, 503, "{what}: {body}");
    assert_eq!(body["success"], false, "{what}: {body}");
    assert_eq!(
        body["error"]["code"], "DATABASE_CONNECTION_ERROR",
        "{what}: {body}"
    );
    assert!(
        body["error"]["message"].as_str().is_some(),
        "{what}: {body}"
    );
}

/// Polls `call` until it answers 200 (the server recovered by itself).
async fn until_ok(
    what: &str,
    call: impl Fn() -> futures_util::future::BoxFuture<'static, (u16, Value)>,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = call().await;
        if status == 200 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not recover: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn call(
    t: &TestApp,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    t.call(method, path, token, body).await
}

#[tokio::test]
async fn an_unreachable_database_is_a_503_and_the_server_recovers_by_itself() {
    let pg = pg().await;
    let proxy = PgProxy::start(format!("127.0.0.1:{}", pg.port).parse().unwrap()).await;
    let ctl = unique("ctl");
    let url = format!(
        "postgres://{}:{}@{}/{ctl}",
        pg.superuser, pg.password, proxy.addr
    );
    let t = Arc::new(spawn_app_with(move |c| c.database_url = Some(url.into())).await);
    let f = t.fixture().await;
    t.sql(
        &f.admin,
        &f.project,
        "CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')",
    )
    .await;
    let select = json!({ "projectId": f.project, "query": "SELECT body FROM notes" });
    let sql = {
        let t = t.clone();
        let key = f.read.clone();
        let select = select.clone();
        move || {
            let t = t.clone();
            let key = key.clone();
            let select = select.clone();
            Box::pin(
                async move { call(&t, "POST", "/api/execute-sql", Some(&key), Some(select)).await },
            ) as futures_util::future::BoxFuture<'static, (u16, Value)>
        }
    };
    let projects = {
        let t = t.clone();
        let token = f.token.clone();
        move || {
            let t = t.clone();
            let token = token.clone();
            Box::pin(async move { call(&t, "GET", "/api/projects", Some(&token), None).await })
                as futures_util::future::BoxFuture<'static, (u16, Value)>
        }
    };
    assert_eq!(sql().await.0, 200);
    assert_eq!(projects().await.0, 200);

    // The project's database is unreachable, the control database is not: the SQL path.
    proxy.cut(|db| db.starts_with("fx_"));
    for _ in 0..3 {
        let (status, body) = sql().await;
        assert_unavailable("execute-sql, project database cut", status, &body);
    }
    let (status, body) = projects().await;
    assert_eq!(status, 200, "the control database is still up: {body}");
    proxy.restore();
    let body = until_ok("execute-sql", &sql).await;
    assert_eq!(
        body["result"]["rows"],
        json!([{ "body": "kept" }]),
        "{body}"
    );

    // Everything is unreachable: the control pool's paths too.
    proxy.cut(|_| true);
    for _ in 0..3 {
        let (status, body) = sql().await;
        assert_unavailable("execute-sql, all cut", status, &body);
        let (status, body) = projects().await;
        assert_unavailable("GET /api/projects", status, &body);
        let (status, body) = call(
            &t,
            "POST",
            "/api/auth/login",
            None,
            Some(json!({ "email": f.email, "password": "correct horse battery" })),
        )
        .await;
        assert_unavailable("login", status, &body);
        let (status, body) = call(&t, "GET", "/ready", None, None).await;
        assert_unavailable("/ready", status, &body);
    }
    proxy.restore();
    until_ok("GET /api/projects", &projects).await;
    let body = until_ok("execute-sql", &sql).await;
    assert_eq!(
        body["result"]["rows"],
        json!([{ "body": "kept" }]),
        "{body}"
    );
    let (status, body) = call(
        &t,
        "POST",
        "/api/auth/login",
        None,
        Some(json!({ "email": f.email, "password": "correct horse battery" })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    drop((sql, projects));
    match Arc::try_unwrap(t) {
        Ok(t) => t.stop().await,
        Err(_) => panic!("the test app is still shared"),
    }
}

#[tokio::test]
async fn a_connection_sqlstate_raised_by_sql_is_the_statement_s_error_not_an_outage() {
    let app = crate::support::spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION fake_outage() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '08006'; END $$;
         CREATE TRIGGER fake BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION fake_outage()",
    )
    .await;
    for query in [
        "DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '08006'; END $$",
        "INSERT INTO t VALUES (1)",
    ] {
        let (status, body) = app
            .call(
                "POST",
                "/api/execute-sql",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "query": query })),
            )
            .await;
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR", "{body}");
    }
    app.stop().await;
}
