//! `fluxbase_replication::client` against the real test cluster: a role with `REPLICATION` logs
//! in with SCRAM on a `replication=database` connection, and each test has its own database,
//! table, publication and slot. Positions are checked where the server keeps them:
//! `pg_replication_slots.confirmed_flush_lsn` and `pg_stat_replication`.

use std::future::Future;
use std::time::{Duration, Instant};

use fluxbase_replication::client::{
    PgOutputOptions, ReplicationClient, ReplicationError, ReplicationEvent, ReplicationStream,
};
use fluxbase_replication::pgoutput::{
    decode, Column, DecodeContext, LogicalReplicationMessage as M, Lsn,
};
use fluxbase_replication::wire::ConnectConfig;

use crate::support;

const WAIT: Duration = Duration::from_secs(60);
/// No periodic status updates: tests send them explicitly.
const NO_STATUS: Duration = Duration::ZERO;

/// A fresh database with a table `items` in publication `items_pub`, a login role with
/// `REPLICATION` (SCRAM password) and a superuser client.
struct Env {
    admin: tokio_postgres::Client,
    cfg: ConnectConfig,
}

async fn env() -> Env {
    let pg = support::pg().await;
    let database = pg.create_database().await;
    let admin = pg.client(&database).await;
    let role = support::unique("repl");
    let password = fluxbase::secrets::random_base62(20);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}';
             CREATE TABLE items (id int PRIMARY KEY, name text);
             CREATE PUBLICATION items_pub FOR TABLE items;"
        ))
        .await
        .unwrap();
    let cfg = ConnectConfig {
        host: pg.host.clone(),
        port: pg.port,
        user: role,
        password: Some(password),
        database,
        application_name: Some("fluxbase-it".into()),
        ..ConnectConfig::default()
    };
    Env { admin, cfg }
}

impl Env {
    async fn client(&self) -> ReplicationClient {
        ReplicationClient::connect(&self.cfg)
            .await
            .expect("connecting for replication")
    }

    /// A permanent slot, created on a session of its own.
    async fn slot(&self) -> (String, Lsn) {
        let name = support::unique("slot");
        let mut client = self.client().await;
        let slot = client.create_logical_slot(&name, false).await.unwrap();
        client.close().await;
        (name, slot.consistent_point)
    }

    async fn start(&self, slot: &str, from: Lsn, options: &PgOutputOptions) -> ReplicationStream {
        self.client()
            .await
            .start(slot, from, options, NO_STATUS)
            .await
            .expect("starting replication")
    }

    async fn sql(&self, sql: &str) {
        self.admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn lsn(&self, sql: &str) -> Option<Lsn> {
        let row = self.admin.query_one(sql, &[]).await.unwrap();
        row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
    }

    async fn confirmed_flush(&self, slot: &str) -> Option<Lsn> {
        self.lsn(&format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
    }

    /// `pg_stat_replication.reply_time` of the walsender `pid`: the client clock of the last
    /// status update it processed (a new value for each update).
    async fn reply_time(&self, pid: i32) -> Option<String> {
        self.admin
            .query_one(
                "SELECT reply_time::text FROM pg_stat_replication WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Drives `stream` (whose `next` sends status updates while it waits, and answers reply
    /// requests) until the walsender has processed `updates` more status updates than the one
    /// it showed at the start, seen as new `reply_time` values; fails on anything but a
    /// keepalive.
    async fn until_status_updates(&self, stream: &mut ReplicationStream, updates: usize) {
        let pid = stream.backend_pid();
        let mut seen = vec![self.reply_time(pid).await];
        let deadline = Instant::now() + WAIT;
        while seen.len() <= updates {
            assert!(
                Instant::now() < deadline,
                "the walsender processed only {} status updates: {seen:?}",
                seen.len() - 1
            );
            // A slice of waiting, for `next` to do its work in; then look at the server.
            if let Ok(event) = tokio::time::timeout(Duration::from_millis(50), stream.next()).await
            {
                match event.expect("the stream stays up") {
                    Some(ReplicationEvent::Keepalive { .. }) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            let now = self.reply_time(pid).await;
            if now.is_some() && seen.last() != Some(&now) {
                seen.push(now);
            }
        }
    }

    async fn slot_exists(&self, slot: &str) -> bool {
        self.admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    }
}

fn proto2(messages: bool, streaming: bool) -> PgOutputOptions {
    PgOutputOptions {
        proto_version: 2,
        messages,
        streaming,
        ..PgOutputOptions::new(["items_pub"])
    }
}

/// Polls `probe` until it returns true or the time runs out.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A decoded pgoutput message with the tag byte its XLogData started with.
struct Received {
    tag: u8,
    message: M,
}

/// Reads and decodes XLogData (skipping keepalives) until `last` matches, and returns it all.
async fn receive_until(
    stream: &mut ReplicationStream,
    ctx: &mut DecodeContext,
    last: impl Fn(&M) -> bool,
) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut received = Vec::new();
    loop {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("timed out waiting for replication events")
            .expect("receiving")
            .expect("the stream ended early");
        let ReplicationEvent::XLogData { data, .. } = event else {
            continue;
        };
        let tag = data[0];
        let message = decode(data, *ctx).expect("decoding pgoutput");
        ctx.observe(&message);
        let done = last(&message);
        received.push(Received { tag, message });
        if done {
            return received;
        }
    }
}

fn tags(received: &[Received]) -> String {
    received.iter().map(|r| char::from(r.tag)).collect()
}

fn text(column: &Column) -> Option<&str> {
    match column {
        Column::Text(bytes) => Some(std::str::from_utf8(bytes).unwrap()),
        _ => None,
    }
}

fn is_commit(m: &M) -> bool {
    matches!(m, M::Commit(_))
}

fn commit_end(received: &[Received]) -> Lsn {
    match &received.last().unwrap().message {
        M::Commit(c) => c.end_lsn,
        other => panic!("expected a Commit, got {other:?}"),
    }
}

fn inserted_ids(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .filter_map(|r| match &r.message {
            M::Insert(i) => text(&i.new.0[0]).map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_replication_role_logs_in_with_scram_and_identifies_the_system() {
    let env = env().await;
    let mut client = env.client().await;
    let id = client.identify_system().await.unwrap();

    let row = env
        .admin
        .query_one(
            "SELECT system_identifier::text, timeline_id::text FROM pg_control_system(), pg_control_checkpoint()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(id.systemid.to_string(), row.get::<_, String>(0));
    assert_eq!(id.timeline.to_string(), row.get::<_, String>(1));
    assert_eq!(id.dbname.as_deref(), Some(env.cfg.database.as_str()));
    let now = env
        .lsn("SELECT pg_current_wal_flush_lsn()::text")
        .await
        .unwrap();
    assert!(
        Lsn(0) < id.xlogpos && id.xlogpos <= now,
        "{} vs {now}",
        id.xlogpos
    );
    client.close().await;
}

#[tokio::test]
async fn a_role_without_replication_is_refused_and_not_worth_retrying() {
    let env = env().await;
    let role = support::unique("norepl");
    env.sql(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw-1234'"))
        .await;
    let cfg = ConnectConfig {
        user: role,
        password: Some("pw-1234".into()),
        ..env.cfg.clone()
    };
    let err = ReplicationClient::connect(&cfg).await.unwrap_err();
    assert_eq!(
        err.db_error().map(|e| e.code.as_str()),
        Some("42501"),
        "{err}"
    );
    assert!(!err.is_retryable() && !err.is_slot_gone());
}

#[tokio::test]
async fn a_created_slot_starts_at_its_consistent_point_and_a_dropped_one_is_gone() {
    let env = env().await;
    let name = support::unique("slot");
    let mut client = env.client().await;
    let slot = client.create_logical_slot(&name, false).await.unwrap();
    assert_eq!(slot.name, name);
    assert_eq!(
        env.confirmed_flush(&name).await,
        Some(slot.consistent_point)
    );
    let plugin = env
        .admin
        .query_one(
            "SELECT plugin, temporary FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap();
    assert_eq!(plugin.get::<_, String>(0), "pgoutput");
    assert!(!plugin.get::<_, bool>(1));

    client.drop_slot(&name, false).await.unwrap();
    assert!(!env.slot_exists(&name).await);
    let again = client.drop_slot(&name, true).await.unwrap_err();
    assert!(again.is_slot_gone(), "{again}");
    // A refused command leaves the session usable.
    client.identify_system().await.unwrap();
    client.close().await;
}

#[tokio::test]
async fn a_temporary_slot_lives_only_as_long_as_its_session() {
    let env = env().await;
    let name = support::unique("tmp");
    let mut client = env.client().await;
    client.create_logical_slot(&name, true).await.unwrap();
    let temporary: bool = env
        .admin
        .query_one(
            "SELECT temporary FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(temporary);
    client.close().await;
    eventually("the temporary slot is gone", || async {
        !env.slot_exists(&name).await
    })
    .await;
}

#[tokio::test]
async fn every_kind_of_change_arrives_as_xlogdata_tagged_with_its_pgoutput_message() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    let mut stream = env.start(&slot, Lsn(0), &proto2(true, false)).await;
    env.sql(
        "INSERT INTO items VALUES (1, 'one');
         UPDATE items SET name = 'uno' WHERE id = 1;
         DELETE FROM items WHERE id = 1;
         TRUNCATE items;
         SELECT pg_logical_emit_message(true, 'p', 'x');",
    )
    .await;
    // One simple query with several statements runs as one transaction.
    let mut ctx = DecodeContext::new(2);
    let seen = receive_until(&mut stream, &mut ctx, is_commit).await;

    let without_relations: Vec<Received> = seen.into_iter().filter(|r| r.tag != b'R').collect();
    assert_eq!(tags(&without_relations), "BIUDTMC");
    for r in &without_relations {
        let expected = match &r.message {
            M::Begin(_) => b'B',
            M::Commit(_) => b'C',
            M::Insert(_) => b'I',
            M::Update(_) => b'U',
            M::Delete(_) => b'D',
            M::Truncate(_) => b'T',
            M::Message(_) => b'M',
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(r.tag, expected);
    }
    let values = |m: &M| -> Vec<Option<String>> {
        let tuple = match m {
            M::Insert(i) => &i.new,
            M::Update(u) => &u.new,
            M::Delete(d) => match &d.old {
                fluxbase_replication::pgoutput::OldTuple::Key(t)
                | fluxbase_replication::pgoutput::OldTuple::Row(t) => t,
            },
            other => panic!("{other:?} has no tuple"),
        };
        tuple.0.iter().map(|c| text(c).map(str::to_owned)).collect()
    };
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        values(&without_relations[1].message),
        [some("1"), some("one")]
    );
    assert_eq!(
        values(&without_relations[2].message),
        [some("1"), some("uno")]
    );
    assert_eq!(values(&without_relations[3].message), [some("1"), None]);
    match &without_relations[5].message {
        M::Message(m) => {
            assert!(m.transactional);
            assert_eq!((m.prefix.as_str(), &m.content[..]), ("p", &b"x"[..]));
        }
        other => panic!("{other:?}"),
    }
    stream.stop().await.unwrap();
}

#[tokio::test]
async fn a_confirmed_position_becomes_the_slots_confirmed_flush_exactly_and_never_goes_back() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    let mut stream = env.start(&slot, Lsn(0), &proto2(false, false)).await;
    let pid = stream.backend_pid();
    env.sql("INSERT INTO items VALUES (1, 'one')").await;
    let mut ctx = DecodeContext::new(2);
    let end = commit_end(&receive_until(&mut stream, &mut ctx, is_commit).await);

    stream.confirm(end);
    stream.send_status(false).await.unwrap();
    eventually("confirmed_flush_lsn reaches the confirmed LSN", || async {
        env.confirmed_flush(&slot).await == Some(end)
    })
    .await;
    let row = env
        .admin
        .query_one(
            "SELECT flush_lsn::text, write_lsn::text, replay_lsn::text, reply_time IS NOT NULL
             FROM pg_stat_replication WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap();
    let end_text = end.to_string();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some(end_text.as_str())
    );
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some(end_text.as_str())
    );
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some(end_text.as_str())
    );
    assert!(row.get::<_, bool>(3));

    stream.confirm(Lsn(end.0 - 1));
    assert_eq!(stream.confirmed(), end);
    stream.send_status(true).await.unwrap();
    // The reply to reply_requested is a keepalive, after our status has been processed.
    loop {
        let event = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap();
        if matches!(event, Some(ReplicationEvent::Keepalive { .. })) {
            break;
        }
    }
    assert_eq!(env.confirmed_flush(&slot).await, Some(end));
    stream.stop().await.unwrap();
    assert_eq!(env.confirmed_flush(&slot).await, Some(end));
}

#[tokio::test]
async fn positions_the_caller_never_confirmed_are_never_reported() {
    let env = env().await;
    let (slot, consistent_point) = env.slot().await;
    let mut stream = env
        .client()
        .await
        .start(
            &slot,
            Lsn(0),
            &proto2(false, false),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    let pid = stream.backend_pid();
    env.sql("INSERT INTO items VALUES (1, 'one')").await;
    env.sql("INSERT INTO items VALUES (2, 'two')").await;
    let mut ctx = DecodeContext::new(2);
    receive_until(&mut stream, &mut ctx, is_commit).await;
    receive_until(&mut stream, &mut ctx, is_commit).await;
    stream.send_status(true).await.unwrap();
    // That one and a few periodic status updates (every 50 ms) reach the walsender.
    env.until_status_updates(&mut stream, 3).await;
    let row = env
        .admin
        .query_one(
            "SELECT flush_lsn::text, reply_time IS NOT NULL FROM pg_stat_replication WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0),
        None,
        "0/0 is reported as NULL"
    );
    assert!(row.get::<_, bool>(1), "status updates did arrive");
    stream.stop().await.unwrap();
    assert_eq!(env.confirmed_flush(&slot).await, Some(consistent_point));
}

#[tokio::test]
async fn reply_requests_are_answered_so_a_short_wal_sender_timeout_does_not_end_the_stream() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    // wal_sender_timeout is settable per session: the walsender asks for a reply after half of
    // it without one, and ends the stream after all of it.
    let cfg = ConnectConfig {
        options: vec![("wal_sender_timeout".into(), "1s".into())],
        ..env.cfg.clone()
    };
    let mut stream = ReplicationClient::connect(&cfg)
        .await
        .unwrap()
        .start(&slot, Lsn(0), &proto2(false, false), NO_STATUS)
        .await
        .unwrap();
    // No periodic status updates: every update the walsender gets is a reply to its request,
    // which it sends after half the timeout without one. A walsender whose request went
    // unanswered ends the stream at the full timeout, before it would ask again: four
    // processed replies are four requests answered in time, over more than the timeout.
    env.until_status_updates(&mut stream, 4).await;
    env.sql("INSERT INTO items VALUES (1, 'still here')").await;
    let mut ctx = DecodeContext::new(2);
    let received = receive_until(&mut stream, &mut ctx, is_commit).await;
    assert_eq!(inserted_ids(&received), ["1"]);
    stream.stop().await.unwrap();
}

#[tokio::test]
async fn a_large_transaction_is_streamed_in_chunks_before_it_commits() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    let cfg = ConnectConfig {
        options: vec![("logical_decoding_work_mem".into(), "64kB".into())],
        ..env.cfg.clone()
    };
    let mut stream = ReplicationClient::connect(&cfg)
        .await
        .unwrap()
        .start(&slot, Lsn(0), &proto2(false, true), NO_STATUS)
        .await
        .unwrap();
    env.sql("INSERT INTO items SELECT g, repeat('x', 1000) FROM generate_series(1, 5000) g")
        .await;
    let mut ctx = DecodeContext::new(2);
    let received = receive_until(&mut stream, &mut ctx, |m| {
        matches!(m, M::StreamCommit(_) | M::Commit(_))
    })
    .await;
    let count = |tag: u8| received.iter().filter(|r| r.tag == tag).count();
    assert!(count(b'S') >= 2, "{} Stream Start messages", count(b'S'));
    assert_eq!(
        count(b'S'),
        count(b'E'),
        "every Stream Start has its Stream Stop"
    );
    assert_eq!(
        received.last().unwrap().tag,
        b'c',
        "ends with Stream Commit"
    );
    assert_eq!(count(b'B'), 0, "no Begin: the transaction was streamed");
    let ids = inserted_ids(&received);
    assert_eq!(ids.len(), 5000);
    assert!(received
        .iter()
        .all(|r| !matches!(&r.message, M::Insert(i) if i.xid.is_none())));
    let end = match &received.last().unwrap().message {
        M::StreamCommit(c) => c.end_lsn,
        other => panic!("{other:?}"),
    };
    stream.confirm(end);
    stream.stop().await.unwrap();
    assert_eq!(env.confirmed_flush(&slot).await, Some(end));
}

#[tokio::test]
async fn after_a_clean_stop_a_restart_from_the_confirmed_position_gets_only_later_changes() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    let mut stream = env.start(&slot, Lsn(0), &proto2(false, false)).await;
    env.sql("INSERT INTO items VALUES (1, 'before')").await;
    let mut ctx = DecodeContext::new(2);
    let first = receive_until(&mut stream, &mut ctx, is_commit).await;
    assert_eq!(inserted_ids(&first), ["1"]);
    let end = commit_end(&first);
    stream.confirm(end);
    // stop() itself reports the confirmed position before its CopyDone.
    stream.stop().await.unwrap();
    assert_eq!(env.confirmed_flush(&slot).await, Some(end));

    env.sql("INSERT INTO items VALUES (2, 'after')").await;
    env.sql("INSERT INTO items VALUES (3, 'after')").await;
    for from in [end, Lsn(0)] {
        let mut stream = env.start(&slot, from, &proto2(false, false)).await;
        let mut ctx = DecodeContext::new(2);
        let mut received = receive_until(&mut stream, &mut ctx, is_commit).await;
        received.extend(receive_until(&mut stream, &mut ctx, is_commit).await);
        assert_eq!(
            inserted_ids(&received),
            ["2", "3"],
            "restarting from {from}"
        );
        stream.stop().await.unwrap();
        // Nothing was confirmed: the slot stays where it was.
        assert_eq!(env.confirmed_flush(&slot).await, Some(end));
    }
}

#[tokio::test]
async fn a_missing_slot_is_reported_as_gone() {
    let env = env().await;
    let err = env
        .client()
        .await
        .start("no_such_slot", Lsn(0), &proto2(false, false), NO_STATUS)
        .await
        .unwrap_err();
    assert!(err.is_slot_gone(), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(err.db_error().unwrap().code, "42704");
}

#[tokio::test]
async fn a_slot_streaming_to_another_session_is_reported_as_in_use() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    let stream = env.start(&slot, Lsn(0), &proto2(false, false)).await;
    let err = env
        .client()
        .await
        .start(&slot, Lsn(0), &proto2(false, false), NO_STATUS)
        .await
        .unwrap_err();
    assert!(err.is_slot_in_use(), "{err}");
    assert!(!err.is_slot_gone() && !err.is_retryable());
    stream.stop().await.unwrap();
}

#[tokio::test]
async fn a_terminated_walsender_is_a_retryable_error() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    let mut stream = env.start(&slot, Lsn(0), &proto2(false, false)).await;
    let pid = stream.backend_pid();
    env.admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err: ReplicationError = loop {
        match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(
        stream.next().await,
        Err(ReplicationError::Wire(
            fluxbase_replication::wire::WireError::Closed
        ))
    ));
}

#[tokio::test]
async fn publication_names_keep_their_case_commas_and_quotes() {
    let env = env().await;
    env.sql(r#"CREATE PUBLICATION "Odd, ""pub""" FOR TABLE items"#)
        .await;
    let (slot, _) = env.slot().await;
    let options = PgOutputOptions::new([r#"Odd, "pub""#]);
    let mut stream = env.start(&slot, Lsn(0), &options).await;
    env.sql("INSERT INTO items VALUES (7, 'odd')").await;
    let mut ctx = DecodeContext::new(1);
    let received = receive_until(&mut stream, &mut ctx, is_commit).await;
    assert_eq!(inserted_ids(&received), ["7"]);
    stream.stop().await.unwrap();
}

#[tokio::test]
async fn next_can_lose_a_select_race_without_losing_events() {
    let env = env().await;
    let (slot, _) = env.slot().await;
    let mut stream = env
        .client()
        .await
        .start(
            &slot,
            Lsn(0),
            &proto2(false, false),
            Duration::from_millis(5),
        )
        .await
        .unwrap();
    let writer = {
        let admin = support::pg().await.client(&env.cfg.database).await;
        tokio::spawn(async move {
            for id in 1..=200 {
                admin
                    .execute("INSERT INTO items VALUES ($1, 'x')", &[&id])
                    .await
                    .unwrap();
            }
        })
    };
    let mut ctx = DecodeContext::new(2);
    let mut ids = Vec::new();
    let mut lost_races = 0;
    let mut tick = tokio::time::interval(Duration::from_micros(300));
    let deadline = tokio::time::Instant::now() + WAIT;
    while ids.len() < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {} of 200",
            ids.len()
        );
        tokio::select! {
            event = stream.next() => {
                if let Some(ReplicationEvent::XLogData { data, .. }) = event.unwrap() {
                    let message = decode(data, ctx).unwrap();
                    ctx.observe(&message);
                    if let M::Insert(i) = message {
                        ids.push(text(&i.new.0[0]).unwrap().parse::<i32>().unwrap());
                    }
                }
            }
            _ = tick.tick() => lost_races += 1,
        }
    }
    writer.await.unwrap();
    assert_eq!(ids, (1..=200).collect::<Vec<_>>());
    assert!(lost_races > 0);
    stream.stop().await.unwrap();
}
