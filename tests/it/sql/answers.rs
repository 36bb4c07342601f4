//! SQL answers held for slow clients: the server's budget of answer bytes in flight, the cap of
//! one client address, and the send deadline (`api::answers`), through the real listener with
//! raw TCP clients that send a request and read nothing.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{spawn_app_with, TestApp};

const MIB: u64 = 1024 * 1024;
/// Six rows of a million characters: an answer of ~6 MB, more than loopback's socket buffers
/// take from a client that reads nothing (its receive buffer is made small).
const LARGE: &str = "select repeat('x', 1000000) as x from generate_series(1, 6)";

pub(crate) fn server(t: &TestApp) -> SocketAddr {
    t.base
        .trim_start_matches("http://")
        .parse()
        .expect("base is ip:port")
}

/// A client socket from `from` (any 127/8 address is this machine) that takes little into its
/// receive buffer, so what it does not read stays with the server.
pub(crate) async fn connect(t: &TestApp, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(server(t)).await.unwrap()
}

/// Sends `POST /api/execute-sql` and reads nothing.
pub(crate) async fn send_sql(
    t: &TestApp,
    from: &str,
    key: &str,
    project: &str,
    query: &str,
) -> TcpStream {
    let mut stream = connect(t, from).await;
    let body = json!({ "projectId": project, "query": query }).to_string();
    let request = format!(
        "POST /api/execute-sql HTTP/1.1\r\nhost: fluxbase\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// The whole answer to `query` from `from`: status, `Retry-After`, and the body as JSON.
pub(crate) async fn sql_from(
    t: &TestApp,
    from: &str,
    key: &str,
    project: &str,
    query: &str,
) -> (u16, Option<String>, Value) {
    let mut stream = send_sql(t, from, key, project, query).await;
    // Read to the end: ask the server to close after this answer.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .expect("a content-length");
                if got.len() >= end + 4 + length {
                    return;
                }
            }
        }
    });
    read.await.expect("the answer came in time");
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let retry = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .map(|v| v.trim().to_string());
    let body = serde_json::from_slice(&got[end + 4..]).expect("a JSON body");
    (status, retry, body)
}

/// Waits (≤ 20 s) until the answer bytes in flight satisfy `ok`, checking on the way that the
/// gauge never passes the budget.
pub(crate) async fn wait_in_flight(
    t: &TestApp,
    budget: u64,
    ok: impl Fn(u64) -> bool,
    what: &str,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = t
            .app
            .metrics
            .sql_answer_bytes_in_flight
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(held <= budget, "{held} bytes in flight, over the budget");
        assert_eq!(held, t.app.answers.in_flight());
        if ok(held) {
            return held;
        }
        assert!(Instant::now() < deadline, "{what}: {held} bytes in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Slow readers from one address hold answers up to that address's cap: the next large
/// answer to that address is refused with 429 `RATE_LIMIT` and `Retry-After`, while another
/// address still gets small and large answers; slow readers of several addresses together
/// reach the server's budget, past which a large answer to anyone is refused; and once the
/// slow clients go away the budget comes back whole. The gauge never passes the budget.
#[tokio::test]
async fn slow_readers_are_held_within_the_address_cap_and_the_server_budget() {
    // Room for two held answers of ~6 MB and one being built (~7 MiB: its rows and its text
    // overlap while it is built) in what large answers may use (7/8 of the budget).
    const BUDGET: u64 = 24 * MIB;
    let t = spawn_app_with(|c| {
        c.max_response_bytes = 8 * MIB as usize;
        c.sql_answer_budget_per_address_bytes = 16 * MIB;
        c.sql_answer_budget_per_project_bytes = BUDGET;
        c.sql_answer_budget_bytes = BUDGET;
    })
    .await;
    let f = t.fixture().await;
    let (a, b) = ("127.0.0.1", "127.0.0.2");

    // Two slow readers at address a: ~12 MB held (the kernel takes a few MB of each).
    let mut slow = Vec::new();
    for i in 1..=2u64 {
        slow.push(send_sql(&t, a, &f.read, &f.project, LARGE).await);
        wait_in_flight(
            &t,
            BUDGET,
            |h| h >= i * 6_000_000,
            "slow reader's answer held",
        )
        .await;
    }
    assert_eq!(t.app.answers.addresses(), 1);

    // A third large answer to a would pass a's cap.
    let (status, retry, body) = sql_from(&t, a, &f.read, &f.project, LARGE).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "RATE_LIMIT");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("sql_answer_budget_per_address_bytes"),
        "{message}"
    );

    // Address b is not held back by a's slow readers: a small and a large answer.
    let (status, _, body) = sql_from(&t, b, &f.read, &f.project, "select 1 as one").await;
    assert_eq!(
        (status, &body["result"]["rows"]),
        (200, &json!([{ "one": 1 }]))
    );
    let (status, _, body) = sql_from(&t, b, &f.read, &f.project, LARGE).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["rows"].as_array().unwrap().len(), 6);

    // One slow reader at b, of another project: ~18 MB held; a further large answer (b's and
    // that project's caps have room) would pass what large answers may use of the budget.
    let g = t.fixture().await;
    slow.push(send_sql(&t, b, &g.read, &g.project, LARGE).await);
    wait_in_flight(&t, BUDGET, |h| h >= 18_000_000, "b's slow reader held").await;
    let (status, _, body) = sql_from(&t, b, &g.read, &g.project, LARGE).await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("sql_answer_budget_bytes"), "{message}");
    assert!(
        message.contains("less the eighth kept for small answers"),
        "{message}"
    );
    // A small answer still fits.
    let (status, _, _) = sql_from(&t, "127.0.0.3", &f.read, &f.project, "select 1").await;
    assert_eq!(status, 200);
    let metrics = t.metrics_text().await;
    assert!(
        metrics.contains("fluxbase_sql_answers_refused_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fluxbase_sql_answer_bytes_in_flight "),
        "{metrics}"
    );

    // The slow clients go away: their answers are dropped and the budget is whole again.
    drop(slow);
    wait_in_flight(&t, BUDGET, |h| h == 0, "the budget came back").await;
    assert_eq!(t.app.answers.addresses(), 0);
    let (status, _, _) = sql_from(&t, a, &f.read, &f.project, LARGE).await;
    assert_eq!(status, 200);
    t.stop().await;
}

/// A client that takes an answer too slowly is cut at the send deadline: the connection is
/// closed, its answer's bytes are given back, the cut is counted; a client that reads keeps
/// its keep-alive connection across the deadline.
#[tokio::test]
async fn an_answer_not_taken_within_the_send_deadline_is_cut() {
    const BUDGET: u64 = 64 * MIB;
    let t = spawn_app_with(|c| c.sql_answer_send_timeout_secs = 2).await;
    let f = t.fixture().await;
    let mut slow = send_sql(&t, "127.0.0.1", &f.read, &f.project, LARGE).await;
    let started = Instant::now();
    wait_in_flight(&t, BUDGET, |h| h >= 6_000_000, "the answer held").await;
    wait_in_flight(&t, BUDGET, |h| h == 0, "the answer dropped at the deadline").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    assert_eq!(
        t.app
            .metrics
            .sql_answers_cut
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // What the kernel already had arrives, then the connection ends short of the answer.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut got))
        .await
        .expect("the server closed the connection");
    assert!(got.len() < 6_000_000, "{} bytes", got.len());

    // A keep-alive client that reads is not cut: two answers on one connection, with more than
    // the deadline between them.
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let resp = client
            .post(t.url("/api/execute-sql"))
            .bearer_auth(&f.read)
            .json(&json!({ "projectId": f.project, "query": LARGE }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap().len() > 6_000_000);
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    assert_eq!(
        t.app
            .metrics
            .sql_answers_cut
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    t.stop().await;
}

/// One project's slow readers from many addresses hold at most the project's share: its next
/// large answer is refused naming `sql_answer_budget_per_project_bytes` while another project
/// still gets large answers (red team, session 25: nine addresses of one read key spent the
/// whole budget and every tenant got 429). And a request whose role may write is never
/// answered 429 after it ran: its answer comes without rows, `truncated: true`, and the rows
/// it wrote are there once (a client retrying a 429 would have written them twice).
#[tokio::test]
async fn one_project_holds_its_share_and_a_write_is_never_answered_429() {
    const BUDGET: u64 = 40 * MIB;
    let t = spawn_app_with(|c| {
        c.max_response_bytes = 8 * MIB as usize;
        c.sql_answer_budget_per_address_bytes = 16 * MIB;
        // Two held answers of ~6 MB, not two and one being built.
        c.sql_answer_budget_per_project_bytes = 14 * MIB;
        c.sql_answer_budget_bytes = BUDGET;
    })
    .await;
    let hog = t.fixture().await;
    let other = t.fixture().await;
    let mut slow = Vec::new();
    for (i, from) in ["127.0.0.2", "127.0.0.3"].into_iter().enumerate() {
        slow.push(send_sql(&t, from, &hog.read, &hog.project, LARGE).await);
        let want = (i as u64 + 1) * 6_000_000;
        wait_in_flight(&t, BUDGET, |h| h >= want, "a slow reader's answer held").await;
    }
    let (status, _, body) = sql_from(&t, "127.0.0.4", &hog.read, &hog.project, LARGE).await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("sql_answer_budget_per_project_bytes"),
        "{message}"
    );
    let (status, _, body) = sql_from(&t, "127.0.0.4", &other.read, &other.project, LARGE).await;
    assert_eq!(status, 200, "another project is not held back");
    assert_eq!(body["result"]["rows"].as_array().unwrap().len(), 6);

    // The hog's project at its share: a write that returns a large answer still answers 200.
    let (status, _, body) = sql_from(
        &t,
        "127.0.0.5",
        &hog.admin,
        &hog.project,
        "create table big (v text)",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = sql_from(
        &t,
        "127.0.0.5",
        &hog.readwrite,
        &hog.project,
        "insert into big select repeat('x', 1000000) from generate_series(1, 6) returning v",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["result"]["rows"], json!([]));
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rowCount"], 6);
    assert_eq!(body["executionInfo"]["operation"], "INSERT");
    assert_eq!(
        t.app
            .metrics
            .sql_answers_shortened
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(slow);
    wait_in_flight(&t, BUDGET, |h| h == 0, "the budget came back").await;
    assert_eq!(t.app.answers.projects(), 0);
    let (status, _, body) = sql_from(
        &t,
        "127.0.0.5",
        &hog.read,
        &hog.project,
        "select count(*) as n from big",
    )
    .await;
    assert_eq!(
        (status, &body["result"]["rows"]),
        (200, &json!([{ "n": 6 }]))
    );
    t.stop().await;
}

/// The status of an answer on `stream` and, when at most `small` bytes, its body; a larger
/// body is left unread (held by the server for this client).
pub(crate) async fn status_of(stream: &mut TcpStream, small: usize) -> (u16, Option<Value>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            got.extend_from_slice(&buf[..n]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a content-length");
            if length > small {
                return (status, None);
            }
            if got.len() >= end + 4 + length {
                let body = serde_json::from_slice(&got[end + 4..end + 4 + length]).unwrap();
                return (status, Some(body));
            }
        }
    });
    answered.await.expect("the answer came in time")
}

/// The most answer bytes held at once while it runs (the gauge, checked against the budget's
/// own count at each look).
pub(crate) struct Peak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Peak {
    pub(crate) fn watch(t: &TestApp) -> Peak {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (app, until) = (t.app.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !until.load(std::sync::atomic::Ordering::Relaxed) {
                let held = app
                    .metrics
                    .sql_answer_bytes_in_flight
                    .load(std::sync::atomic::Ordering::Relaxed);
                peak = peak.max(held);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            peak
        });
        Peak { stop, task }
    }

    pub(crate) async fn end(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

fn stopped_builds(t: &TestApp) -> u64 {
    t.app
        .metrics
        .sql_answer_builds_stopped
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Eight rows of a million characters, a tenth of a second apart: an answer of ~8 MB that
/// takes a while to build.
const SLOW_LARGE: &str = "select repeat('x', 1000000) as x from generate_series(1, 8) g \
                          where pg_sleep(0.1) is not null";

/// An answer is reserved while it is built, a step at a time (the gauge shows it growing, not
/// jumping to the built answer's size), and builds together never take more than what large
/// answers may use of the budget: with one built answer held for a slow client, a reader's and
/// a writer's builds running at once are both stopped when their next step does not fit —
/// the reader answered 429 `RATE_LIMIT` naming the limit, the writer's script run to its end
/// and answered without rows (its INSERT there once) — and what they held comes back (red
/// team rt4 #7: 40 answers of ~33 MB built at once took the server to 907 MB).
#[tokio::test]
async fn answers_are_reserved_while_they_are_built_and_builds_stay_within_the_budget() {
    builds_stay_within_the_budget(None, SLOW_LARGE).await;
}

/// The scenario above on a project of PostgreSQL (`mysql_url` `None`) or of the MySQL server
/// at `mysql_url`, building `slow_large` (eight rows of a million characters, a tenth of a
/// second apart, in the engine's SQL).
pub async fn builds_stay_within_the_budget(mysql_url: Option<String>, slow_large: &str) {
    const BUDGET: u64 = 16 * MIB;
    const USABLE: u64 = BUDGET - BUDGET / 8;
    let mysql = mysql_url.is_some();
    let t = spawn_app_with(|c| {
        c.mysql_url = mysql_url.map(Into::into);
        c.max_response_bytes = 8 * MIB as usize;
        c.sql_answer_budget_bytes = BUDGET;
        c.sql_answer_budget_per_address_bytes = BUDGET;
        c.sql_answer_budget_per_project_bytes = BUDGET;
        c.sql_answer_budget_per_account_bytes = BUDGET;
    })
    .await;
    let f = match mysql {
        true => t.mysql_fixture().await,
        false => t.fixture().await,
    };
    let body = t
        .sql(&f.admin, &f.project, "create table log (v text)")
        .await;
    assert_eq!(body["success"], true, "{body}");

    // One answer built for a client that reads nothing: the gauge passes through the sizes
    // of its build (whole MiB steps short of the answer), then holds the built answer.
    let peak = Peak::watch(&t);
    let mut held = send_sql(&t, "127.0.0.2", &f.read, &f.project, slow_large).await;
    wait_in_flight(
        &t,
        BUDGET,
        |h| (2 * MIB..=5 * MIB).contains(&h),
        "the answer reserved while it is built",
    )
    .await;
    let (status, body) = status_of(&mut held, 4096).await;
    assert_eq!((status, body), (200, None));
    wait_in_flight(&t, BUDGET, |h| h > 8_000_000, "the built answer held").await;
    assert!(peak.end().await <= USABLE);

    // Two more builds at once, a reader's and a writer's (a script that writes, then reads
    // rows): neither fits beside the held answer.
    let peak = Peak::watch(&t);
    let mut reader = send_sql(&t, "127.0.0.3", &f.read, &f.project, slow_large).await;
    let script = format!("insert into log values ('w'); {slow_large}");
    let mut writer = send_sql(&t, "127.0.0.4", &f.readwrite, &f.project, &script).await;
    let (status, body) = status_of(&mut reader, 1 << 20).await;
    let body = body.unwrap();
    assert_eq!(
        (status, &body["error"]["code"]),
        (429, &json!("RATE_LIMIT"))
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("sql_answer_budget_bytes"), "{message}");
    let (status, body) = status_of(&mut writer, 1 << 20).await;
    let body = body.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["result"]["rows"], json!([]));
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rowCount"], 8);
    let peak = peak.end().await;
    assert!(peak <= USABLE, "{peak} bytes held at once");
    assert_eq!(stopped_builds(&t), 2);
    let metrics = t.metrics_text().await;
    assert!(
        metrics.contains("fluxbase_sql_answer_builds_stopped_total 2"),
        "{metrics}"
    );
    // Only the held answer is left.
    wait_in_flight(
        &t,
        BUDGET,
        |h| h < 8_100_000,
        "the stopped builds gave back",
    )
    .await;
    drop(held);
    wait_in_flight(&t, BUDGET, |h| h == 0, "the budget came back").await;
    let (status, _, body) = sql_from(
        &t,
        "127.0.0.5",
        &f.read,
        &f.project,
        "select count(*) as n from log",
    )
    .await;
    assert_eq!(
        (status, &body["result"]["rows"]),
        (200, &json!([{ "n": 1 }]))
    );
    t.stop().await;
}

/// The projects of one account hold at most the account's share together, whatever the
/// number of its projects: its next large answer is refused naming
/// `sql_answer_budget_per_account_bytes` while another account's answer is served (red team
/// rt4 #6: one user's four projects held 231 MB of the 256 MiB budget, and other tenants got
/// 429).
#[tokio::test]
async fn one_accounts_projects_together_hold_at_most_its_share() {
    const BUDGET: u64 = 40 * MIB;
    const ACCOUNT: u64 = 16 * MIB;
    let t = spawn_app_with(|c| {
        c.max_response_bytes = 8 * MIB as usize;
        c.sql_answer_budget_bytes = BUDGET;
        c.sql_answer_budget_per_address_bytes = BUDGET;
        c.sql_answer_budget_per_project_bytes = BUDGET;
        c.sql_answer_budget_per_account_bytes = ACCOUNT;
    })
    .await;
    let owner = t.fixture().await;
    // Two more projects of the same account.
    let mut projects = vec![(owner.project.clone(), owner.read.clone())];
    for _ in 0..2 {
        let (status, body) = t
            .call(
                "POST",
                "/api/projects",
                Some(&owner.token),
                Some(json!({ "name": "another" })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let keys = crate::support::fixtures::keys_of(&body);
        projects.push((keys.project, keys.read));
    }
    let mut slow = Vec::new();
    for (i, (project, read)) in projects[..2].iter().enumerate() {
        let from = format!("127.0.1.{}", i + 1);
        slow.push(send_sql(&t, &from, read, project, LARGE).await);
        let want = (i as u64 + 1) * 6_000_000;
        wait_in_flight(&t, BUDGET, |h| h >= want, "a slow reader's answer held").await;
    }
    let account = t.app.answers.held_by_account(&owner.user_id);
    assert!((12_000_000..=ACCOUNT).contains(&account), "{account}");
    let (project, read) = &projects[2];
    let (status, _, body) = sql_from(&t, "127.0.1.9", read, project, LARGE).await;
    assert_eq!(status, 429, "{:.300}", body.to_string());
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("sql_answer_budget_per_account_bytes"),
        "{message}"
    );
    assert!(t.app.answers.held_by_account(&owner.user_id) <= ACCOUNT);
    // Another account's large answer is served meanwhile.
    let other = t.fixture().await;
    let (status, _, body) = sql_from(&t, "127.0.1.9", &other.read, &other.project, LARGE).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["rows"].as_array().unwrap().len(), 6);
    drop(slow);
    wait_in_flight(&t, BUDGET, |h| h == 0, "the budget came back").await;
    assert_eq!(t.app.answers.accounts(), 0);
    let (status, _, _) = sql_from(&t, "127.0.1.9", read, project, LARGE).await;
    assert_eq!(status, 200);
    t.stop().await;
}
