//! Configuration: defaults in code, then an optional `fluxbase.toml`, then `FLUXBASE_*`
//! environment variables (highest precedence). Every variable is the file key of the same name
//! (`FLUXBASE_` + uppercase): the two are laid over each other and deserialized once into the
//! typed [`Config`], so a setting is added in one place (its field) and read the same way from
//! both. An unknown file key or `FLUXBASE_*` variable (a typo) is refused at start-up, naming
//! the nearest known one, rather than silently ignored.
//! Credentials are [`Secret`]s, so `Debug` (derived) prints them as `[redacted]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::secrets::Secret;

/// The default budget of SQL answer bytes in flight (`sql_answer_budget_bytes`): 256 MiB.
pub const DEFAULT_SQL_ANSWER_BUDGET: u64 = 256 * 1024 * 1024;
/// The default cap of one client address (`sql_answer_budget_per_address_bytes`): 64 MiB (two
/// answers of the default `max_response_bytes`; a quarter of the budget, so at least four
/// addresses are needed to spend it).
pub const DEFAULT_SQL_ANSWER_PER_ADDRESS: u64 = 64 * 1024 * 1024;
/// The default cap of one project (`sql_answer_budget_per_project_bytes`): 64 MiB, a quarter of
/// the budget.
pub const DEFAULT_SQL_ANSWER_PER_PROJECT: u64 = 64 * 1024 * 1024;
/// The default cap of one account's projects together (`sql_answer_budget_per_account_bytes`):
/// 64 MiB, a quarter of the budget, whatever the number of projects the account has (up to
/// `max_projects_per_user`, 10 by default: ten projects' caps would be 640 MiB).
pub const DEFAULT_SQL_ANSWER_PER_ACCOUNT: u64 = 64 * 1024 * 1024;
/// The default share of SQL connections of one account's projects together
/// (`sql_account_connections`): two projects' full shares (`sql_project_connections`, 8), so
/// an account with a second busy project is not slowed, while ten projects no longer hold 80.
/// A quarter of the ~65 connections a PostgreSQL of default `max_connections` (100) leaves the
/// budget: four accounts at full tilt leave room for the others.
pub const DEFAULT_SQL_ACCOUNT_CONNECTIONS: usize = 16;
/// The default time a client has to take an answer (`sql_answer_send_timeout_secs`): 60 s.
pub const DEFAULT_SQL_ANSWER_SEND_TIMEOUT_SECS: u64 = 60;

/// Every setting of the server. The same names work in `fluxbase.toml` (lowercase) and in the
/// environment (`FLUXBASE_` + uppercase).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP and WebSocket server listens on (port 0: any free port; `serve` prints
    /// the bound address and writes it to `addr_file` when set).
    pub listen: SocketAddr,
    /// A file `serve` writes its bound address to (`127.0.0.1:43125` and a newline) once it
    /// accepts connections: how a supervisor or script finds the port of `listen = ...:0`.
    /// Replaced atomically (written beside it, then renamed), so a reader never sees half.
    pub addr_file: Option<PathBuf>,
    /// A bearer token `/metrics` requires (`Authorization: Bearer <token>`). Unset: `/metrics`
    /// answers only requests from a loopback address that carry no proxy headers (or only on
    /// `metrics_addr`, when set).
    pub metrics_token: Option<Secret>,
    /// A separate address `/metrics` is served on (e.g. `127.0.0.1:9464`); the main listener
    /// then answers `/metrics` with 404. Unset: `/metrics` is on the main listener.
    pub metrics_addr: Option<SocketAddr>,
    /// Directory for the embedded cluster, local storage and generated secrets.
    pub data_dir: PathBuf,
    /// An existing PostgreSQL cluster (its database is the control database). Unset: embedded.
    pub database_url: Option<Secret>,
    /// An existing MySQL or MariaDB server for MySQL projects, as an admin account's URL
    /// (`mysql://user:password@host:3306/`): it creates each project's database and accounts
    /// and the replication account. Unset: the embedded MariaDB under `<data_dir>/mariadb`,
    /// started at the first MySQL project (docs/mysql.md).
    pub mysql_url: Option<Secret>,
    /// The embedded MariaDB's binary logs: Fluxbase purges them (the server's own expiry is
    /// off) up to the oldest position a MySQL project's change stream still needs, but keeps
    /// at most this many bytes of them (like PostgreSQL's `max_slot_wal_keep_size`: 8 GB as the
    /// embedded cluster's): past it the oldest files go anyway and a stream that needed them
    /// reports `slot_lost` (docs/mysql.md).
    pub mysql_binlog_retain_bytes: u64,
    /// … and no file older than this (seconds; a week: the expiry the server had before).
    pub mysql_binlog_retain_secs: u64,
    /// How often the embedded MariaDB's binary logs are purged (seconds).
    pub mysql_binlog_purge_interval_secs: u64,
    /// Not a setting: a CLI command attached to a running server whose embedded MariaDB is not
    /// running must not start one of its own on the server's files.
    #[serde(skip)]
    pub mysql_embedded_off: bool,
    /// The URL clients use to reach this server (printed by `init`, used in links).
    pub public_url: Option<String>,
    /// Serve the dashboard's files from this directory instead of the copy built into the
    /// binary: for working on the dashboard without rebuilding. Unset: the built-in copy.
    pub dashboard_dir: Option<PathBuf>,
    /// Storage backend: `local` (files under `<data_dir>/storage`) or `s3`.
    pub storage: String,
    /// The S3 bucket all projects' objects go to (required with `storage = "s3"`).
    pub s3_bucket: Option<String>,
    /// An S3-compatible endpoint (MinIO, R2, …); unset: AWS, or `AWS_ENDPOINT_URL`.
    pub s3_endpoint: Option<String>,
    /// The S3 region; unset: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub s3_region: Option<String>,
    /// S3 credentials; unset: the usual `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN` variables (or the instance's role). Never logged.
    pub s3_access_key_id: Option<Secret>,
    pub s3_secret_access_key: Option<Secret>,
    /// Largest accepted file upload, in bytes (then 413 `PAYLOAD_TOO_LARGE`).
    pub max_upload_bytes: u64,
    /// Bytes that downloads' read buffers may hold at once across all downloads from the local
    /// backend (a whole small file, or the chunks a large one has in flight); a download that
    /// finds it spent streams in 64 KiB chunks instead (`storage::buffers`). 0: always stream
    /// in small chunks.
    pub storage_read_budget_bytes: u64,
    /// Most shares of that budget that downloads to one client address may hold at once
    /// (IPv6: one /64); its further downloads stream in 64 KiB chunks, so a few clients that
    /// stop reading cannot take the whole budget (`storage::buffers`). 0: no cap per address.
    pub storage_read_shares_per_client: u32,
    /// Seconds between sweeps of staged uploads nobody writes any more (a crash's, a killed
    /// process's): a staged object untouched for an hour is removed (`storage::sweep`).
    pub storage_staged_sweep_secs: u64,
    /// Let webhooks reach loopback and private addresses (development and tests only).
    pub webhook_allow_private: bool,
    /// Server-side statement timeout for `/api/execute-sql`, in milliseconds.
    pub statement_timeout_ms: u64,
    /// Rows returned by `/api/execute-sql` before `truncated: true`.
    pub max_rows: usize,
    /// Largest `/api/execute-sql` answer, in bytes: rows past it are dropped as they arrive
    /// (never held in memory) and the answer says `truncated: true`.
    pub max_response_bytes: usize,
    /// Bytes of built `/api/execute-sql` answers the server holds at once until their clients
    /// have taken them (all answers together); an answer that finds it spent is refused with
    /// 429 `RATE_LIMIT` (`api::answers`).
    pub sql_answer_budget_bytes: u64,
    /// The share of `sql_answer_budget_bytes` one client address may hold (IPv6 by /64; the
    /// `X-Forwarded-For` address with `trust_forwarded_for`).
    pub sql_answer_budget_per_address_bytes: u64,
    /// The share of `sql_answer_budget_bytes` one project's answers may hold.
    pub sql_answer_budget_per_project_bytes: u64,
    /// The share of `sql_answer_budget_bytes` the answers of all the projects of one account
    /// (each project's first admin) may hold together.
    pub sql_answer_budget_per_account_bytes: u64,
    /// Seconds a client has to take an `/api/execute-sql` answer once it is built; then the
    /// connection is closed and the answer dropped.
    pub sql_answer_send_timeout_secs: u64,
    /// Largest accepted request body, in bytes (then 413).
    pub max_body_bytes: usize,
    /// Requests allowed per API key in each rate window (0 disables the limit).
    pub rate_limit_requests: u32,
    /// Requests allowed per member's session in each rate window (0 disables the limit): the
    /// dashboard makes several requests per view, an upload per file.
    pub session_rate_limit_requests: u32,
    /// Length of the rate window, in seconds.
    pub rate_limit_window_secs: u64,
    /// Lifetime of a login session, in seconds.
    pub session_ttl_secs: u64,
    /// Lifetime of a team invitation, in seconds (1 to 2^31 − 1): answering it later is 409.
    pub invite_ttl_secs: u32,
    /// Connections per project and scope in the SQL pool.
    pub pool_size: usize,
    /// Bytes of one open transaction's changes the change stream keeps in memory before
    /// spilling the rest to disk.
    pub cdc_buffer_bytes: usize,
    /// Bytes of one row image (`record`, or `old`) a change event carries: past it the row's
    /// largest values are left out (the event names them in `tooLarge`) until the rest fits;
    /// 0: no bound. Bounds what one huge row costs every consumer (realtime history and
    /// sockets, webhook bodies and outbox, the cluster's stream).
    pub cdc_max_row_bytes: usize,
    /// `logical_decoding_work_mem` for the change streams' walsenders, in kB: transactions
    /// larger than this arrive streamed. Unset: the cluster's setting.
    pub cdc_decoding_work_mem_kb: Option<u64>,
    /// `temp_file_limit` of every project role, in kB: the temporary file space (sorts, hashes,
    /// materialized results spilled to disk) one session may hold at once. Set on the roles by
    /// the server (the roles cannot change it).
    pub temp_file_limit_kb: u64,
    /// Private memory one tenant backend (with its parallel workers) may hold before the
    /// server ends it, MiB (0: no such limit; `sql::memory`).
    pub sql_backend_memory_limit_mb: u64,
    /// Private memory all tenant backends together may hold before the server ends the largest
    /// backend of the project holding the most, MiB (0: half of the machine's memory).
    pub sql_backends_memory_total_mb: u64,
    /// Entries of the cluster's shared lock table one tenant backend may hold before the
    /// server ends it (0: no such limit; `sql::memory`). Past half the table's size, tenants'
    /// backends together, the largest holder of the account holding the most is ended.
    pub sql_backend_locks_limit: u64,
    /// Multiplies the webhook retry schedule (tests shorten it; 1.0 in production).
    pub webhook_backoff_scale: f64,
    /// How often, in ms, the webhook worker looks for deliveries that have come due (retries,
    /// and what a restart left pending). New deliveries go out at once, whatever this is.
    pub webhook_scan_ms: u64,
    /// Most deliveries of one webhook in flight at once under the `row` ordering (`strict`
    /// webhooks have one); see docs/configuration.md for why 64.
    pub webhook_max_in_flight: usize,
    /// Control-database connections of the webhook machinery (outbox writers, delivery worker),
    /// a pool of its own: a flood of deliveries waits for these, never for the API's.
    pub webhook_control_connections: usize,
    /// Most webhooks draining at once (each up to `webhook_max_in_flight` requests).
    pub webhook_max_drains: usize,
    /// MiB of delivery bodies over 8 KiB that the drains hold at once: such a body is read from
    /// the outbox when its attempt starts and held until it ends; attempts wait for room.
    pub webhook_large_body_memory_mb: u64,
    /// Most webhooks of one project draining at once: one project's backlog cannot take every
    /// drain, and others' deliveries go out beside it.
    pub webhook_max_drains_per_project: usize,
    /// Webhooks one project may register.
    pub webhook_max_per_project: u32,
    /// Events a realtime room keeps for `since` resumes.
    pub realtime_retention_events: usize,
    /// Seconds a realtime room keeps events for `since` resumes.
    pub realtime_retention_secs: u64,
    /// Bytes of events a realtime room keeps for `since` resumes (the oldest go first).
    pub realtime_retention_bytes: usize,
    /// Largest broadcast payload (serialized JSON bytes) from a client, `POST
    /// /api/realtime/broadcast` or SQL (`realtime.broadcast`); larger ones are refused.
    pub realtime_max_broadcast_bytes: usize,
    /// Broadcasts one socket may send per second (burst: one second's worth; 0: no limit).
    pub realtime_broadcasts_per_sec: u32,
    /// Broadcast payload bytes one socket may send per second (burst: one second's worth;
    /// 0: no limit).
    pub realtime_broadcast_bytes_per_sec: usize,
    /// Subscribes one socket may send per second (burst: one second's worth; 0: no limit).
    pub realtime_subscribes_per_sec: u32,
    /// Seconds a WebSocket may stay open without being subscribed to any room (from its
    /// upgrade, or from its last unsubscribe); then it is closed (0: no limit).
    pub realtime_unsubscribed_timeout_secs: u64,
    /// Bytes queued for one WebSocket past which the room stops pushing live events to it: it
    /// then catches up from the room's durable history at the pace it reads. Other messages
    /// (answers, errors) are queued up to four times this; beyond that the socket is closed
    /// with 1008. Memory per socket stays within about four times this.
    pub realtime_send_queue_bytes: usize,
    /// Seconds a WebSocket may make no progress sending what is queued for it (the client stopped
    /// reading) before it is closed with 1008.
    pub realtime_client_stall_secs: u64,
    /// Catch-up reads (a chunk of a room's history read from disk and decoded) one room runs at
    /// once; the members catching up at the same place share each decoded chunk.
    pub realtime_catch_up_reads: usize,
    /// Distinct identities (role and `auth.uid()`) whose row-level security one project's room
    /// evaluates; a subscribe with a new identity past it is refused with `LIMIT_EXCEEDED`.
    pub realtime_rls_max_identities: usize,
    /// Rows one RLS evaluation query checks at most (larger batches are split).
    pub realtime_rls_batch_rows: usize,
    /// `statement_timeout` (ms) of an RLS evaluation; an evaluation that times out or fails
    /// hides the events it was deciding from that identity (fail closed).
    pub realtime_rls_timeout_ms: u64,
    /// Connections one room's RLS evaluation uses at once, taken from the project's SQL share
    /// (`sql_project_connections`).
    pub realtime_rls_connections: usize,
    /// Broadcasts entering one project's room from SQL (`realtime.broadcast`) and `POST
    /// /api/realtime/broadcast` per second, all callers together (burst: one second's worth;
    /// 0: no limit). Beyond it SQL broadcasts are dropped and counted, REST ones answered 429.
    pub realtime_project_broadcasts_per_sec: u32,
    /// Payload bytes of those broadcasts per second and project (burst: one second's worth;
    /// 0: no limit).
    pub realtime_project_broadcast_bytes_per_sec: usize,
    /// Seconds a client has to send a complete request head (an idle keep-alive connection
    /// included) before it is disconnected.
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may have bytes to send that its client does not take (its socket
    /// accepts nothing) before it is closed with the response and what it holds: any response,
    /// a file download as much as a SQL answer.
    pub send_stall_timeout_secs: u64,
    /// Seconds a request body may go without a byte arriving (any body: JSON, an upload)
    /// before the request is answered 408 `REQUEST_TIMEOUT` and its connection closed: a client
    /// that trickles a body holds no connection, upload or share for longer.
    pub body_idle_timeout_secs: u64,
    /// Open connections (WebSockets included) one client address may hold; more are answered
    /// 429 and closed. IPv6 clients count by /64. 0: no cap. Not applied with
    /// `trust_forwarded_for` (the proxy is then the only address; it bounds its clients).
    pub max_connections_per_address: usize,
    /// Take the client address from the last `X-Forwarded-For` entry (only behind a proxy that
    /// sets it); otherwise the socket's peer address is used and the header is ignored.
    pub trust_forwarded_for: bool,
    /// Login and sign-up attempts per client address in each `auth_rate_window_secs`
    /// (0 disables the limit).
    pub auth_attempts_per_address: u32,
    /// Requests with a bearer token that is no live key or session (a guess, a revoked or
    /// expired one) per client address in each `auth_rate_window_secs`; past it that address's
    /// bearer requests get 429 before any lookup (0 disables the limit).
    pub auth_failures_per_address: u32,
    /// Failed logins per account (normalised email) from one client network (IPv4 /24, IPv6
    /// /64) in each `auth_rate_window_secs`; past it that network's logins to that account get
    /// 429 whatever the password, while the owner elsewhere still logs in (0 disables the limit).
    pub auth_failures_per_account: u32,
    /// Failed logins per account from all addresses together in each `auth_rate_window_secs`:
    /// the backstop against guessing spread over many networks; past it every login to that
    /// account gets 429 (0 disables the limit).
    pub auth_failures_per_account_total: u32,
    /// Length of the login and sign-up rate windows, in seconds.
    pub auth_rate_window_secs: u64,
    /// Password hashes (Argon2, ~20 MB each) computed at once; more requests wait their turn.
    pub max_concurrent_password_hashes: usize,
    /// Projects a user may administer before `POST /api/projects` refuses (0: no quota).
    pub max_projects_per_user: u32,
    /// Live API keys a project may have before `POST /api/keys` refuses (the CLI is exempt).
    pub max_api_keys_per_project: u32,
    /// Projects this deployment holds, all engines and owners together, before creating one
    /// more is refused (0: no own cap; the database servers' capacity still bounds each engine:
    /// a free replication slot and walsender per PostgreSQL project, a fifth of the MySQL
    /// server's `max_connections` for MySQL projects' binlog dumps; see `App::room_for_project`).
    pub max_projects: u32,
    /// Connections the SQL pools may hold across all projects. 0: three quarters of the
    /// cluster's `max_connections` minus its reserved ones (read at start-up); a larger value
    /// is lowered to that.
    pub sql_max_connections: usize,
    /// Requests of one project running SQL at once (all its keys and members together); the
    /// next ones wait up to `sql_queue_timeout_ms`, then get 429.
    pub sql_project_connections: usize,
    /// Requests of all the projects of one account (each project's first admin, as for
    /// `sql_answer_budget_per_account_bytes`) running SQL at once, taken beside each project's
    /// share; the next ones wait up to `sql_queue_timeout_ms`, then get 429. 0: off; a value
    /// below `sql_project_connections` is raised to it.
    pub sql_account_connections: usize,
    /// How long a request waits for its project's share (and a connection), in milliseconds.
    pub sql_queue_timeout_ms: u64,
    /// Seconds a pooled SQL connection may sit idle before it is closed.
    pub sql_idle_timeout_secs: u64,
    /// Cluster mode (docs/cluster.md): a NATS server with JetStream (`nats://host:4222`) that
    /// several nodes on one PostgreSQL share. Unset: a single node, everything in process.
    pub nats_url: Option<Secret>,
    /// This node's name in cluster mode (leadership, `/api/cdc/status`, metrics): letters,
    /// digits, `-` and `_`, 1 to 64. Unset: a random one made once and kept in
    /// `<data_dir>/node-id`.
    pub node_id: Option<String>,
    /// How long each project's JetStream stream keeps events for `since` resumes, in seconds.
    pub nats_retention_secs: u64,
    /// Bytes each project's JetStream stream keeps (oldest dropped first).
    pub nats_retention_bytes: u64,
    /// Copies JetStream keeps of each stream (1 for a single NATS server; 3 for a NATS cluster).
    pub nats_replicas: usize,
    /// How long the leader's publisher waits, after JetStream acknowledged an event, before it
    /// lets the replication slot move past it, in milliseconds: a nats-server killed in that
    /// window may have lost what it acknowledged (NATS 2.9 writes its store asynchronously), and
    /// the events are then published again from the slot. 0 disables the wait.
    pub nats_publish_settle_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            addr_file: None,
            metrics_token: None,
            metrics_addr: None,
            data_dir: PathBuf::from(".fluxbase"),
            database_url: None,
            mysql_url: None,
            mysql_binlog_retain_bytes: 8 << 30,
            mysql_binlog_retain_secs: 7 * 24 * 3600,
            mysql_binlog_purge_interval_secs: 60,
            mysql_embedded_off: false,
            public_url: None,
            dashboard_dir: None,
            storage: "local".into(),
            s3_bucket: None,
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            max_upload_bytes: 50 * 1024 * 1024,
            storage_read_budget_bytes: crate::storage::buffers::DEFAULT_READ_BUDGET,
            storage_read_shares_per_client: crate::storage::buffers::DEFAULT_SHARES_PER_CLIENT,
            storage_staged_sweep_secs: 600,
            webhook_allow_private: false,
            statement_timeout_ms: 30_000,
            max_rows: 10_000,
            max_response_bytes: 32 * 1024 * 1024,
            sql_answer_budget_bytes: DEFAULT_SQL_ANSWER_BUDGET,
            sql_answer_budget_per_address_bytes: DEFAULT_SQL_ANSWER_PER_ADDRESS,
            sql_answer_budget_per_project_bytes: DEFAULT_SQL_ANSWER_PER_PROJECT,
            sql_answer_budget_per_account_bytes: DEFAULT_SQL_ANSWER_PER_ACCOUNT,
            sql_answer_send_timeout_secs: DEFAULT_SQL_ANSWER_SEND_TIMEOUT_SECS,
            max_body_bytes: 1024 * 1024,
            rate_limit_requests: 50,
            session_rate_limit_requests: 300,
            rate_limit_window_secs: 10,
            session_ttl_secs: 24 * 3600,
            invite_ttl_secs: 7 * 24 * 3600,
            pool_size: 16,
            cdc_buffer_bytes: 16 * 1024 * 1024,
            cdc_max_row_bytes: 16 * 1024 * 1024,
            cdc_decoding_work_mem_kb: None,
            temp_file_limit_kb: 256 * 1024,
            sql_backend_memory_limit_mb: 512,
            sql_backends_memory_total_mb: 0,
            sql_backend_locks_limit: 8192,
            webhook_backoff_scale: 1.0,
            webhook_scan_ms: 500,
            webhook_max_in_flight: 64,
            webhook_control_connections: 4,
            webhook_max_drains: 16,
            webhook_large_body_memory_mb: 64,
            webhook_max_drains_per_project: 4,
            webhook_max_per_project: 25,
            realtime_retention_events: 100_000,
            realtime_retention_secs: 600,
            realtime_retention_bytes: 64 * 1024 * 1024,
            realtime_max_broadcast_bytes: 256 * 1024,
            realtime_broadcasts_per_sec: 25,
            realtime_broadcast_bytes_per_sec: 256 * 1024,
            realtime_subscribes_per_sec: 10,
            realtime_unsubscribed_timeout_secs: 30,
            realtime_send_queue_bytes: 1024 * 1024,
            realtime_client_stall_secs: 30,
            realtime_catch_up_reads: 4,
            realtime_rls_max_identities: 5_000,
            realtime_rls_batch_rows: 1_000,
            realtime_rls_timeout_ms: 2_000,
            realtime_rls_connections: 2,
            realtime_project_broadcasts_per_sec: 100,
            realtime_project_broadcast_bytes_per_sec: 1024 * 1024,
            header_read_timeout_secs: 20,
            send_stall_timeout_secs: 60,
            body_idle_timeout_secs: 30,
            max_connections_per_address: 512,
            trust_forwarded_for: false,
            auth_attempts_per_address: 30,
            auth_failures_per_address: 60,
            auth_failures_per_account: 10,
            auth_failures_per_account_total: 100,
            auth_rate_window_secs: 60,
            max_concurrent_password_hashes: 4,
            max_projects_per_user: 10,
            max_api_keys_per_project: 25,
            max_projects: 0,
            sql_max_connections: 0,
            sql_project_connections: 8,
            sql_account_connections: DEFAULT_SQL_ACCOUNT_CONNECTIONS,
            sql_queue_timeout_ms: 5_000,
            sql_idle_timeout_secs: 60,
            nats_url: None,
            node_id: None,
            nats_retention_secs: 24 * 3600,
            nats_retention_bytes: 256 * 1024 * 1024,
            nats_replicas: 1,
            nats_publish_settle_ms: 2000,
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`: where the server says
/// which cluster it uses.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The prefix of every setting's environment variable.
const PREFIX: &str = "FLUXBASE_";

/// `FLUXBASE_*` variables that are not settings of [`Config`] but are read elsewhere, so they
/// are not refused as typos:
/// * `FLUXBASE_CONFIG`: the file to read ([`Config::load`]).
/// * `FLUXBASE_LOG`: the `tracing` filter (main.rs).
/// * `FLUXBASE_PG_BINDIR`, `FLUXBASE_PG_USER`: the embedded cluster's binaries and OS user
///   (embedded.rs, scripts/deps.sh).
/// * `FLUXBASE_MYSQL_USER`, `FLUXBASE_MARIADB_BINDIR`: the embedded MariaDB's OS user and
///   binaries (mysql/embedded.rs, scripts/deps.sh).
/// * `FLUXBASE_BIN`: the binary the benchmarks start (bench/).
/// * `FLUXBASE_API_KEY`, `FLUXBASE_ADMIN_KEY`, `FLUXBASE_READ_KEY`, `FLUXBASE_PROJECT_ID`,
///   `FLUXBASE_WS_URL`: a client's values in the README's examples and the guide test; a shell
///   that exported them may also start the server.
const OTHER_VARIABLES: &[&str] = &[
    "FLUXBASE_CONFIG",
    "FLUXBASE_LOG",
    "FLUXBASE_LOG_FORMAT",
    "FLUXBASE_PG_BINDIR",
    "FLUXBASE_PG_USER",
    "FLUXBASE_MYSQL_USER",
    "FLUXBASE_MARIADB_BINDIR",
    "FLUXBASE_BIN",
    "FLUXBASE_API_KEY",
    "FLUXBASE_ADMIN_KEY",
    "FLUXBASE_READ_KEY",
    "FLUXBASE_PROJECT_ID",
    "FLUXBASE_WS_URL",
    // The guide's webhook receiver (`process.env.FLUXBASE_WEBHOOK_SECRET`), often in the same
    // `.env` file as the server's settings.
    "FLUXBASE_WEBHOOK_SECRET",
];

impl Config {
    /// Loads `fluxbase.toml` (or the file named by `FLUXBASE_CONFIG`) and the environment.
    pub fn load() -> Result<Config> {
        let explicit = std::env::var_os("FLUXBASE_CONFIG").map(PathBuf::from);
        let path = explicit
            .clone()
            .unwrap_or_else(|| PathBuf::from("fluxbase.toml"));
        let file = if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some((path, text))
        } else if explicit.is_some() {
            bail!("configuration file {} does not exist", path.display());
        } else {
            None
        };
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|n| n.starts_with(PREFIX)) else {
                continue;
            };
            // Not a setting: the variable's owner reads it (a path may be any bytes).
            if OTHER_VARIABLES.contains(&name) {
                continue;
            }
            let value = value
                .into_string()
                .map_err(|_| anyhow::anyhow!("{name} is not valid UTF-8"))?;
            env.push((name.to_string(), value));
        }
        Config::from_sources(file.as_ref().map(|(p, t)| (p.as_path(), t.as_str())), env)
    }

    /// The configuration from defaults, then `file` (its path and text), then the `FLUXBASE_*`
    /// variables of `env` (other names are ignored). The file's keys and the variables are
    /// laid over each other by name and deserialized once, so every setting is read the same
    /// way from both; an unknown key or variable is refused, with the nearest known name.
    pub fn from_sources(
        file: Option<(&Path, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let fields = overlay::field_names::<Config>();
        let mut settings = std::collections::BTreeMap::new();
        if let Some((path, text)) = file {
            let table: toml::Table =
                toml::from_str(text).with_context(|| format!("in {}", path.display()))?;
            for (key, value) in table {
                if !fields.contains(&key.as_str()) {
                    bail!(
                        "unknown key `{key}` in {}{}",
                        path.display(),
                        overlay::did_you_mean(&key, fields.iter().copied())
                    );
                }
                let origin = format!("`{key}` in {}", path.display());
                settings.insert(key, overlay::Setting::File { origin, value });
            }
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            if OTHER_VARIABLES.contains(&name.as_str()) {
                continue;
            }
            let key = rest.to_ascii_lowercase();
            if rest != key.to_ascii_uppercase() || !fields.contains(&key.as_str()) {
                let known = fields
                    .iter()
                    .map(|f| format!("{PREFIX}{}", f.to_ascii_uppercase()))
                    .chain(OTHER_VARIABLES.iter().map(|v| v.to_string()));
                bail!(
                    "unknown environment variable {name}{}",
                    overlay::did_you_mean(&name, known)
                );
            }
            settings.insert(key, overlay::Setting::Env { name, value });
        }
        let config =
            Config::deserialize(serde::de::value::MapDeserializer::new(settings.into_iter()))?;
        config.validate()?;
        Ok(config)
    }
    fn validate(&self) -> Result<()> {
        if !matches!(self.storage.as_str(), "local" | "s3") {
            bail!("storage must be `local` or `s3`, not {:?}", self.storage);
        }
        if self.storage == "s3" && self.s3_bucket.is_none() {
            bail!("storage = s3 needs FLUXBASE_S3_BUCKET (s3_bucket)");
        }
        if self.max_upload_bytes == 0 {
            bail!("max_upload_bytes must be positive");
        }
        if self.header_read_timeout_secs == 0
            || self.auth_rate_window_secs == 0
            || self.max_concurrent_password_hashes == 0
            || self.sql_project_connections == 0
            || self.sql_idle_timeout_secs == 0
        {
            bail!("header_read_timeout_secs, auth_rate_window_secs, max_concurrent_password_hashes, sql_project_connections and sql_idle_timeout_secs must be positive");
        }
        if self.max_response_bytes < 1024 {
            bail!("max_response_bytes must be at least 1024");
        }
        // An answer of max_response_bytes must fit while it is built: the rows read and the
        // text rendered from them overlap (the text grows by a quarter at a time as the rows
        // are dropped), with the envelope and the row that crosses the bound.
        let largest = self.max_response_bytes as u64 + self.max_response_bytes as u64 / 2;
        let caps = [
            self.sql_answer_budget_per_address_bytes,
            self.sql_answer_budget_per_project_bytes,
            self.sql_answer_budget_per_account_bytes,
        ];
        // A cap above the budget is the budget (the budget refuses first).
        if self.sql_answer_budget_bytes < largest || caps.iter().any(|&cap| cap < largest) {
            bail!(
                "sql_answer_budget_bytes, sql_answer_budget_per_address_bytes, \
                 sql_answer_budget_per_project_bytes and sql_answer_budget_per_account_bytes \
                 must each be at least 1.5 × max_response_bytes ({largest}): an answer of the \
                 largest size must fit while it is built"
            );
        }
        if self.invite_ttl_secs == 0 || self.invite_ttl_secs > i32::MAX as u32 {
            bail!("invite_ttl_secs must be between 1 and 2147483647");
        }
        if self.sql_answer_send_timeout_secs == 0 {
            bail!("sql_answer_send_timeout_secs must be positive");
        }
        if self.send_stall_timeout_secs == 0 || self.body_idle_timeout_secs == 0 {
            bail!("send_stall_timeout_secs and body_idle_timeout_secs must be positive");
        }
        if self.realtime_rls_max_identities == 0
            || self.realtime_rls_batch_rows == 0
            || self.realtime_rls_timeout_ms == 0
            || self.realtime_rls_connections == 0
        {
            bail!("realtime_rls_max_identities, realtime_rls_batch_rows, realtime_rls_timeout_ms and realtime_rls_connections must be positive");
        }
        if let Some(id) = &self.node_id {
            if !crate::cluster::valid_node_id(id) {
                bail!("node_id: 1 to 64 letters, digits, `-` or `_`, not {id:?}");
            }
        }
        if self.mysql_binlog_retain_bytes == 0
            || self.mysql_binlog_retain_secs == 0
            || self.mysql_binlog_purge_interval_secs == 0
        {
            bail!("mysql_binlog_retain_bytes, mysql_binlog_retain_secs and mysql_binlog_purge_interval_secs must be positive");
        }
        if self.nats_url.is_some() && self.database_url.is_none() {
            bail!("nats_url (cluster mode) needs database_url: the nodes share one PostgreSQL");
        }
        if self.nats_replicas == 0
            || self.nats_retention_secs == 0
            || self.nats_retention_bytes == 0
        {
            bail!("nats_replicas, nats_retention_secs and nats_retention_bytes must be positive");
        }
        if self.storage_staged_sweep_secs == 0 {
            bail!("storage_staged_sweep_secs must be positive");
        }
        if self.max_api_keys_per_project < 3 {
            bail!("max_api_keys_per_project must be at least 3 (a project starts with one key of each scope)");
        }
        if self.webhook_control_connections == 0
            || self.webhook_max_drains == 0
            || self.webhook_max_drains_per_project == 0
            || self.webhook_max_per_project == 0
            || self.webhook_large_body_memory_mb == 0
        {
            bail!("webhook_control_connections, webhook_max_drains, webhook_max_drains_per_project, webhook_max_per_project and webhook_large_body_memory_mb must be positive");
        }
        if self.max_rows == 0 || self.pool_size == 0 || self.rate_limit_window_secs == 0 {
            bail!("max_rows, pool_size and rate_limit_window_secs must be positive");
        }
        Ok(())
    }

    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms)
    }

    /// The base URL printed to users.
    pub fn base_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

/// The generic half of the environment overlay: a setting's value from the file or from a
/// variable, each a serde `Deserializer`, so the typed [`Config`] is deserialized once from
/// both. A variable's text is parsed as the field's type asks: numbers with `FromStr`, booleans
/// as `true/false/1/0/yes/no/on/off` (empty: false), an empty text as an unset `Option`.
mod overlay {
    use serde::de::{self, Deserializer, IntoDeserializer, Visitor};

    /// An error of the overlay: says which variable or file key held the bad value.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct Error(String);

    impl de::Error for Error {
        fn custom<T: std::fmt::Display>(msg: T) -> Self {
            Error(msg.to_string())
        }
    }

    /// The field names of a struct that derives `Deserialize`, as serde's derive lists them.
    pub fn field_names<'de, T: de::Deserialize<'de>>() -> &'static [&'static str] {
        struct Names<'a>(&'a mut &'static [&'static str]);
        impl<'de> Deserializer<'de> for Names<'_> {
            type Error = Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Error> {
                *self.0 = fields;
                Err(de::Error::custom("fields read"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Names(&mut fields));
        fields
    }

    /// `" (did you mean X?)"` when a known name is within a few edits of `name`, else nothing.
    pub fn did_you_mean(name: &str, known: impl Iterator<Item = impl AsRef<str>>) -> String {
        let best = known
            .map(|k| (edit_distance(name, k.as_ref()), k.as_ref().to_string()))
            .min_by_key(|(d, _)| *d);
        match best {
            Some((d, k)) if d <= 3.max(name.len() / 5) => format!(" (did you mean {k}?)"),
            _ => String::new(),
        }
    }

    /// Levenshtein distance, case-insensitive.
    fn edit_distance(a: &str, b: &str) -> usize {
        let a: Vec<char> = a.to_ascii_lowercase().chars().collect();
        let b: Vec<char> = b.to_ascii_lowercase().chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.iter().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let next = (diagonal + usize::from(ca != cb))
                    .min(row[j] + 1)
                    .min(row[j + 1] + 1);
                diagonal = row[j + 1];
                row[j + 1] = next;
            }
        }
        row[b.len()]
    }

    /// One setting's value, from the file or from the environment.
    pub enum Setting {
        File { origin: String, value: toml::Value },
        Env { name: String, value: String },
    }

    impl Setting {
        fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, Error>
        where
            T::Err: std::fmt::Display,
        {
            value
                .parse()
                .map_err(|e| Error(format!("{name}={value:?} is not valid: {e}")))
        }

        fn flag(name: &str, value: &str) -> Result<bool, Error> {
            match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" | "" => Ok(false),
                _ => Err(Error(format!(
                    "{name}={value:?} is not a boolean (true/false)"
                ))),
            }
        }
    }

    impl<'de> IntoDeserializer<'de, Error> for Setting {
        type Deserializer = Setting;
        fn into_deserializer(self) -> Setting {
            self
        }
    }

    /// Methods that hand a file value to toml's deserializer and parse a variable's text as
    /// `$ty` before visiting it.
    macro_rules! parsed {
        ($($method:ident => $visit:ident($ty:ty),)*) => {$(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                match self {
                    Setting::File { origin, value } => value
                        .$method(visitor)
                        .map_err(|e| Error(format!("{origin}: {e}"))),
                    Setting::Env { name, value } => visitor.$visit(Setting::parse::<$ty>(&name, &value)?),
                }
            }
        )*};
    }

    impl<'de> Deserializer<'de> for Setting {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self {
                Setting::File { origin, value } => value
                    .deserialize_any(visitor)
                    .map_err(|e| Error(format!("{origin}: {e}"))),
                Setting::Env { name, value } => visitor
                    .visit_str(&value)
                    .map_err(|e: Error| Error(format!("{name}={value:?} is not valid: {e}"))),
            }
        }

        fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self {
                Setting::File { origin, value } => value
                    .deserialize_bool(visitor)
                    .map_err(|e| Error(format!("{origin}: {e}"))),
                Setting::Env { name, value } => visitor.visit_bool(Setting::flag(&name, &value)?),
            }
        }

        /// An empty variable unsets an optional setting.
        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self {
                Setting::File { origin, value } => value
                    .deserialize_option(visitor)
                    .map_err(|e| Error(format!("{origin}: {e}"))),
                Setting::Env { value, .. } if value.is_empty() => visitor.visit_none(),
                env => visitor.visit_some(env),
            }
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        parsed! {
            deserialize_i8 => visit_i8(i8),
            deserialize_i16 => visit_i16(i16),
            deserialize_i32 => visit_i32(i32),
            deserialize_i64 => visit_i64(i64),
            deserialize_u8 => visit_u8(u8),
            deserialize_u16 => visit_u16(u16),
            deserialize_u32 => visit_u32(u32),
            deserialize_u64 => visit_u64(u64),
            deserialize_f32 => visit_f32(f32),
            deserialize_f64 => visit_f64(f64),
        }

        serde::forward_to_deserialize_any! {
            i128 u128 char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map
            struct enum identifier ignored_any
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' way to set variables: every `FLUXBASE_*` name `get` answers, laid over the
    /// defaults as [`Config::load`] lays the process environment.
    trait ApplyEnv {
        fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()>;
    }

    impl ApplyEnv for Config {
        fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
            let env = overlay::field_names::<Config>().iter().filter_map(|f| {
                let name = format!("{PREFIX}{}", f.to_ascii_uppercase());
                get(&name).map(|v| (name, v))
            });
            *self = Config::from_sources(None, env)?;
            Ok(())
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_unknown_variable_is_refused_with_the_nearest_name() {
        let err = Config::from_sources(None, vars(&[("FLUXBASE_MAX_ROW", "5")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown environment variable FLUXBASE_MAX_ROW (did you mean FLUXBASE_MAX_ROWS?)"
        );
        let err = Config::from_sources(None, vars(&[("FLUXBASE_max_rows", "5")])).unwrap_err();
        assert!(err.to_string().contains("FLUXBASE_MAX_ROWS"), "{err}");
        let err = Config::from_sources(None, vars(&[("FLUXBASE_NOTHING_LIKE_IT_AT_ALL", "1")]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown environment variable FLUXBASE_NOTHING_LIKE_IT_AT_ALL"
        );
        // Variables read elsewhere, and other programs' variables, are not settings.
        let c = Config::from_sources(
            None,
            vars(&[
                ("FLUXBASE_LOG", "debug"),
                ("FLUXBASE_CONFIG", "x.toml"),
                ("FLUXBASE_PG_BINDIR", "/usr/lib/postgresql/16/bin"),
                ("FLUXBASE_API_KEY", "fx_..."),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.max_rows, Config::default().max_rows);
    }

    #[test]
    fn an_unknown_file_key_is_refused_with_the_nearest_name() {
        let file = Some((Path::new("fluxbase.toml"), "max_rowz = 3"));
        let err = Config::from_sources(file, vars(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown key `max_rowz` in fluxbase.toml (did you mean max_rows?)"
        );
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_the_defaults() {
        let file = Some((
            Path::new("fluxbase.toml"),
            "max_rows = 7\npool_size = 3\ndatabase_url = \"postgres://f:filepw@h/d\"",
        ));
        let c = Config::from_sources(file, vars(&[("FLUXBASE_POOL_SIZE", "9")])).unwrap();
        assert_eq!((c.max_rows, c.pool_size), (7, 9));
        assert_eq!(
            c.statement_timeout_ms,
            Config::default().statement_timeout_ms
        );
        assert_eq!(
            c.database_url.as_ref().map(Secret::expose),
            Some("postgres://f:filepw@h/d")
        );
        // An empty variable unsets an optional setting the file set.
        let c = Config::from_sources(file, vars(&[("FLUXBASE_DATABASE_URL", "")])).unwrap();
        assert_eq!(c.database_url, None);
        // A bad value in the file names its key and the file.
        let bad = Some((Path::new("fluxbase.toml"), "max_rows = \"many\""));
        let err = Config::from_sources(bad, vars(&[])).unwrap_err();
        assert!(
            err.to_string().contains("`max_rows` in fluxbase.toml"),
            "{err}"
        );
    }

    #[test]
    fn every_kind_of_setting_is_parsed_from_its_variable() {
        let c = Config::from_sources(
            None,
            vars(&[
                ("FLUXBASE_LISTEN", "0.0.0.0:9000"),
                ("FLUXBASE_METRICS_ADDR", "127.0.0.1:9464"),
                ("FLUXBASE_DATA_DIR", "/var/lib/fx"),
                ("FLUXBASE_PUBLIC_URL", "https://fx.example"),
                ("FLUXBASE_MAX_UPLOAD_BYTES", "123"),
                ("FLUXBASE_STORAGE_READ_BUDGET_BYTES", "0"),
                ("FLUXBASE_STORAGE_READ_SHARES_PER_CLIENT", "3"),
                ("FLUXBASE_RATE_LIMIT_REQUESTS", "4"),
                ("FLUXBASE_MAX_ROWS", "6"),
                ("FLUXBASE_WEBHOOK_BACKOFF_SCALE", "0.25"),
                ("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "yes"),
                ("FLUXBASE_TRUST_FORWARDED_FOR", "0"),
                ("FLUXBASE_CDC_DECODING_WORK_MEM_KB", "64"),
                ("FLUXBASE_S3_SECRET_ACCESS_KEY", "sk"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/fx"));
        assert_eq!(c.public_url.as_deref(), Some("https://fx.example"));
        assert_eq!(
            (c.max_upload_bytes, c.rate_limit_requests, c.max_rows),
            (123, 4, 6)
        );
        assert_eq!(c.storage_read_budget_bytes, 0);
        assert_eq!(c.storage_read_shares_per_client, 3);
        assert_eq!(c.webhook_backoff_scale, 0.25);
        assert!(c.webhook_allow_private && !c.trust_forwarded_for);
        assert_eq!(c.cdc_decoding_work_mem_kb, Some(64));
        assert_eq!(
            c.s3_secret_access_key.as_ref().map(Secret::expose),
            Some("sk")
        );
        for (name, value) in [
            ("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "maybe"),
            ("FLUXBASE_WEBHOOK_BACKOFF_SCALE", "fast"),
            ("FLUXBASE_RATE_LIMIT_REQUESTS", "-1"),
            ("FLUXBASE_LISTEN", "nowhere"),
            ("FLUXBASE_CDC_DECODING_WORK_MEM_KB", "lots"),
        ] {
            let err = Config::from_sources(None, vars(&[(name, value)])).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn debug_output_shows_every_setting_but_no_secret() {
        let c = Config::from_sources(
            None,
            vars(&[
                ("FLUXBASE_DATABASE_URL", "postgres://fx:dbpass@h/d"),
                ("FLUXBASE_METRICS_TOKEN", "mtoken"),
                ("FLUXBASE_S3_SECRET_ACCESS_KEY", "s3key"),
                ("FLUXBASE_SQL_IDLE_TIMEOUT_SECS", "61"),
            ]),
        )
        .unwrap();
        let debug = format!("{c:?}");
        for secret in ["dbpass", "mtoken", "s3key"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("database_url: Some([redacted])"), "{debug}");
        assert!(debug.contains("sql_idle_timeout_secs: 61"), "{debug}");
    }

    #[test]
    fn metrics_access_and_realtime_limits_come_from_the_environment() {
        let mut c = Config::default();
        assert_eq!(c.metrics_token, None);
        assert_eq!(c.metrics_addr, None);
        c.apply_env(|k| match k {
            "FLUXBASE_METRICS_TOKEN" => Some("t0ken".into()),
            "FLUXBASE_METRICS_ADDR" => Some("127.0.0.1:9464".into()),
            "FLUXBASE_REALTIME_MAX_BROADCAST_BYTES" => Some("1000".into()),
            "FLUXBASE_REALTIME_BROADCASTS_PER_SEC" => Some("3".into()),
            "FLUXBASE_REALTIME_BROADCAST_BYTES_PER_SEC" => Some("4000".into()),
            "FLUXBASE_REALTIME_SUBSCRIBES_PER_SEC" => Some("2".into()),
            "FLUXBASE_REALTIME_RETENTION_BYTES" => Some("5000".into()),
            "FLUXBASE_REALTIME_PROJECT_BROADCASTS_PER_SEC" => Some("7".into()),
            "FLUXBASE_REALTIME_PROJECT_BROADCAST_BYTES_PER_SEC" => Some("8000".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.metrics_token.as_ref().map(Secret::expose), Some("t0ken"));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(
            (
                c.realtime_max_broadcast_bytes,
                c.realtime_broadcasts_per_sec,
                c.realtime_broadcast_bytes_per_sec,
                c.realtime_subscribes_per_sec,
                c.realtime_retention_bytes
            ),
            (1000, 3, 4000, 2, 5000)
        );
        assert_eq!(
            (
                c.realtime_project_broadcasts_per_sec,
                c.realtime_project_broadcast_bytes_per_sec
            ),
            (7, 8000)
        );
        assert!(
            !format!("{c:?}").contains("t0ken"),
            "the token is never logged"
        );
        assert!(Config::default()
            .apply_env(|k| (k == "FLUXBASE_METRICS_ADDR").then(|| "nowhere".into()))
            .is_err());
    }

    #[test]
    fn realtime_catch_up_reads_come_from_the_environment() {
        let mut c = Config::default();
        assert_eq!(c.realtime_catch_up_reads, 4);
        c.apply_env(|k| (k == "FLUXBASE_REALTIME_CATCH_UP_READS").then(|| "16".into()))
            .unwrap();
        assert_eq!(c.realtime_catch_up_reads, 16);
        assert!(Config::default()
            .apply_env(|k| (k == "FLUXBASE_REALTIME_CATCH_UP_READS").then(|| "many".into()))
            .is_err());
    }

    #[test]
    fn realtime_queue_bytes_and_stall_come_from_the_environment() {
        let mut c = Config::default();
        assert_eq!(
            (c.realtime_send_queue_bytes, c.realtime_client_stall_secs),
            (1024 * 1024, 30)
        );
        c.apply_env(|k| match k {
            "FLUXBASE_REALTIME_SEND_QUEUE_BYTES" => Some("65536".into()),
            "FLUXBASE_REALTIME_CLIENT_STALL_SECS" => Some("5".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            (c.realtime_send_queue_bytes, c.realtime_client_stall_secs),
            (65536, 5)
        );
    }

    #[test]
    fn environment_overrides_defaults() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "FLUXBASE_LISTEN" => Some("127.0.0.1:9999".into()),
            "FLUXBASE_MAX_ROWS" => Some("5".into()),
            "FLUXBASE_WEBHOOK_ALLOW_PRIVATE" => Some("true".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.max_rows, 5);
        assert!(c.webhook_allow_private);
    }

    #[test]
    fn storage_settings_come_from_the_environment() {
        let mut c = Config::default();
        assert_eq!(c.max_upload_bytes, 50 * 1024 * 1024);
        c.apply_env(|k| match k {
            "FLUXBASE_STORAGE" => Some("s3".into()),
            "FLUXBASE_S3_BUCKET" => Some("files".into()),
            "FLUXBASE_S3_ENDPOINT" => Some("http://127.0.0.1:9000".into()),
            "FLUXBASE_MAX_UPLOAD_BYTES" => Some("1024".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.storage, "s3");
        assert_eq!(c.s3_bucket.as_deref(), Some("files"));
        assert_eq!(c.max_upload_bytes, 1024);
        let mut c = Config::default();
        let err = c
            .apply_env(|k| (k == "FLUXBASE_STORAGE").then(|| "s3".into()))
            .unwrap_err();
        assert!(err.to_string().contains("FLUXBASE_S3_BUCKET"), "{err}");
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused() {
        let mut c = Config::default();
        let err = c
            .apply_env(|k| (k == "FLUXBASE_MAX_ROWS").then(|| "many".into()))
            .unwrap_err();
        assert!(err.to_string().contains("FLUXBASE_MAX_ROWS"));
        assert!(toml::from_str::<Config>("listen = \"127.0.0.1:1\"\nbogus = 1").is_err());
        let ok: Config = toml::from_str("max_rows = 7").unwrap();
        assert_eq!(ok.max_rows, 7);
    }

    #[test]
    fn urls_are_redacted_in_debug_output() {
        assert_eq!(
            redact_url("postgres://fx:s3cret@host:5/db"),
            "postgres://fx:***@host:5/db"
        );
        let c = Config {
            database_url: Some("postgres://a:pw@h/d".into()),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("pw@"));
        let c = Config {
            s3_secret_access_key: Some("very-secret".into()),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
