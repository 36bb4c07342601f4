//! Configuration: defaults in code, then an optional `fluxbase.toml`, then `FLUXBASE_*`
//! environment variables (highest precedence). Unknown keys in the file are refused.
//! Secrets (the database URL's password) are never logged: `Debug` redacts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Every setting of the server. The same names work in `fluxbase.toml` (lowercase) and in the
/// environment (`FLUXBASE_` + uppercase).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP and WebSocket server listens on.
    pub listen: SocketAddr,
    /// A bearer token `/metrics` requires (`Authorization: Bearer <token>`). Unset: `/metrics`
    /// answers only requests from a loopback address that carry no proxy headers (or only on
    /// `metrics_addr`, when set).
    pub metrics_token: Option<String>,
    /// A separate address `/metrics` is served on (e.g. `127.0.0.1:9464`); the main listener
    /// then answers `/metrics` with 404. Unset: `/metrics` is on the main listener.
    pub metrics_addr: Option<SocketAddr>,
    /// Directory for the embedded cluster, local storage and generated secrets.
    pub data_dir: PathBuf,
    /// An existing PostgreSQL cluster (its database is the control database). Unset: embedded.
    pub database_url: Option<String>,
    /// The URL clients use to reach this server (printed by `init`, used in links).
    pub public_url: Option<String>,
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
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// Largest accepted file upload, in bytes (then 413 `PAYLOAD_TOO_LARGE`).
    pub max_upload_bytes: u64,
    /// Let webhooks reach loopback and private addresses (development and tests only).
    pub webhook_allow_private: bool,
    /// Server-side statement timeout for `/api/execute-sql`, in milliseconds.
    pub statement_timeout_ms: u64,
    /// Rows returned by `/api/execute-sql` before `truncated: true`.
    pub max_rows: usize,
    /// Largest `/api/execute-sql` answer, in bytes: rows past it are dropped as they arrive
    /// (never held in memory) and the answer says `truncated: true`.
    pub max_response_bytes: usize,
    /// Largest accepted request body, in bytes (then 413).
    pub max_body_bytes: usize,
    /// Requests allowed per key or session in each rate window (0 disables the limit).
    pub rate_limit_requests: u32,
    /// Length of the rate window, in seconds.
    pub rate_limit_window_secs: u64,
    /// Lifetime of a login session, in seconds.
    pub session_ttl_secs: u64,
    /// Connections per project and scope in the SQL pool.
    pub pool_size: usize,
    /// Bytes of one open transaction's changes the change stream keeps in memory before
    /// spilling the rest to disk.
    pub cdc_buffer_bytes: usize,
    /// `logical_decoding_work_mem` for the change streams' walsenders, in kB: transactions
    /// larger than this arrive streamed. Unset: the cluster's setting.
    pub cdc_decoding_work_mem_kb: Option<u64>,
    /// `temp_file_limit` of every project role, in kB: the temporary file space (sorts, hashes,
    /// materialized results spilled to disk) one session may hold at once. Set on the roles by
    /// the server (the roles cannot change it).
    pub temp_file_limit_kb: u64,
    /// Multiplies the webhook retry schedule (tests shorten it; 1.0 in production).
    pub webhook_backoff_scale: f64,
    /// How often, in ms, the webhook worker looks for deliveries that have come due (retries,
    /// and what a restart left pending). New deliveries go out at once, whatever this is.
    pub webhook_scan_ms: u64,
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
    /// Connections the SQL pools may hold across all projects. 0: three quarters of the
    /// cluster's `max_connections` minus its reserved ones (read at start-up); a larger value
    /// is lowered to that.
    pub sql_max_connections: usize,
    /// Requests of one project running SQL at once (all its keys and members together); the
    /// next ones wait up to `sql_queue_timeout_ms`, then get 429.
    pub sql_project_connections: usize,
    /// How long a request waits for its project's share (and a connection), in milliseconds.
    pub sql_queue_timeout_ms: u64,
    /// Seconds a pooled SQL connection may sit idle before it is closed.
    pub sql_idle_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            metrics_token: None,
            metrics_addr: None,
            data_dir: PathBuf::from(".fluxbase"),
            database_url: None,
            public_url: None,
            storage: "local".into(),
            s3_bucket: None,
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            max_upload_bytes: 50 * 1024 * 1024,
            webhook_allow_private: false,
            statement_timeout_ms: 30_000,
            max_rows: 10_000,
            max_response_bytes: 32 * 1024 * 1024,
            max_body_bytes: 1024 * 1024,
            rate_limit_requests: 50,
            rate_limit_window_secs: 10,
            session_ttl_secs: 24 * 3600,
            pool_size: 16,
            cdc_buffer_bytes: 16 * 1024 * 1024,
            cdc_decoding_work_mem_kb: None,
            temp_file_limit_kb: 256 * 1024,
            webhook_backoff_scale: 1.0,
            webhook_scan_ms: 500,
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
            max_connections_per_address: 512,
            trust_forwarded_for: false,
            auth_attempts_per_address: 30,
            auth_failures_per_account: 10,
            auth_failures_per_account_total: 100,
            auth_rate_window_secs: 60,
            max_concurrent_password_hashes: 4,
            max_projects_per_user: 10,
            sql_max_connections: 0,
            sql_project_connections: 8,
            sql_queue_timeout_ms: 5_000,
            sql_idle_timeout_secs: 60,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("metrics_token", &self.metrics_token.as_ref().map(|_| "***"))
            .field("metrics_addr", &self.metrics_addr)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("public_url", &self.public_url)
            .field("storage", &self.storage)
            .field("s3_bucket", &self.s3_bucket)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("max_rows", &self.max_rows)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("rate_limit_requests", &self.rate_limit_requests)
            .field("rate_limit_window_secs", &self.rate_limit_window_secs)
            .finish_non_exhaustive()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
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

impl Config {
    /// Loads `fluxbase.toml` (or the file named by `FLUXBASE_CONFIG`) and the environment.
    pub fn load() -> Result<Config> {
        let explicit = std::env::var_os("FLUXBASE_CONFIG").map(PathBuf::from);
        let path = explicit
            .clone()
            .unwrap_or_else(|| PathBuf::from("fluxbase.toml"));
        let mut config = if path.exists() {
            Self::from_file(&path)?
        } else if explicit.is_some() {
            bail!("configuration file {} does not exist", path.display());
        } else {
            Config::default()
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Applies `FLUXBASE_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: std::str::FromStr>(key: &str, v: &str) -> Result<T>
        where
            T::Err: std::fmt::Display,
        {
            v.parse()
                .map_err(|e| anyhow::anyhow!("{key}={v:?} is not valid: {e}"))
        }
        fn flag(key: &str, v: &str) -> Result<bool> {
            match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" | "" => Ok(false),
                _ => bail!("{key}={v:?} is not a boolean (true/false)"),
            }
        }
        let opt = |v: String| if v.is_empty() { None } else { Some(v) };
        macro_rules! env {
            ($name:literal, $apply:expr) => {
                if let Some(v) = get($name) {
                    #[allow(clippy::redundant_closure_call)]
                    ($apply)($name, v)?;
                }
            };
        }
        env!("FLUXBASE_LISTEN", |k, v: String| -> Result<()> {
            self.listen = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_METRICS_TOKEN", |_, v| -> Result<()> {
            self.metrics_token = opt(v);
            Ok(())
        });
        env!("FLUXBASE_METRICS_ADDR", |k, v: String| -> Result<()> {
            self.metrics_addr = if v.is_empty() {
                None
            } else {
                Some(parse(k, &v)?)
            };
            Ok(())
        });
        env!("FLUXBASE_DATA_DIR", |_, v: String| -> Result<()> {
            self.data_dir = PathBuf::from(v);
            Ok(())
        });
        env!("FLUXBASE_DATABASE_URL", |_, v| -> Result<()> {
            self.database_url = opt(v);
            Ok(())
        });
        env!("FLUXBASE_PUBLIC_URL", |_, v| -> Result<()> {
            self.public_url = opt(v);
            Ok(())
        });
        env!("FLUXBASE_STORAGE", |_, v: String| -> Result<()> {
            self.storage = v;
            Ok(())
        });
        env!("FLUXBASE_S3_BUCKET", |_, v| -> Result<()> {
            self.s3_bucket = opt(v);
            Ok(())
        });
        env!("FLUXBASE_S3_ENDPOINT", |_, v| -> Result<()> {
            self.s3_endpoint = opt(v);
            Ok(())
        });
        env!("FLUXBASE_S3_REGION", |_, v| -> Result<()> {
            self.s3_region = opt(v);
            Ok(())
        });
        env!("FLUXBASE_S3_ACCESS_KEY_ID", |_, v| -> Result<()> {
            self.s3_access_key_id = opt(v);
            Ok(())
        });
        env!("FLUXBASE_S3_SECRET_ACCESS_KEY", |_, v| -> Result<()> {
            self.s3_secret_access_key = opt(v);
            Ok(())
        });
        env!("FLUXBASE_MAX_UPLOAD_BYTES", |k, v: String| -> Result<()> {
            self.max_upload_bytes = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", |k,
                                                v: String|
         -> Result<()> {
            self.webhook_allow_private = flag(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_STATEMENT_TIMEOUT_MS", |k,
                                               v: String|
         -> Result<()> {
            self.statement_timeout_ms = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_MAX_ROWS", |k, v: String| -> Result<()> {
            self.max_rows = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_MAX_RESPONSE_BYTES", |k,
                                             v: String|
         -> Result<()> {
            self.max_response_bytes = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_MAX_BODY_BYTES", |k, v: String| -> Result<()> {
            self.max_body_bytes = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_RATE_LIMIT_REQUESTS", |k,
                                              v: String|
         -> Result<()> {
            self.rate_limit_requests = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_RATE_LIMIT_WINDOW_SECS", |k,
                                                 v: String|
         -> Result<()> {
            self.rate_limit_window_secs = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_SESSION_TTL_SECS", |k, v: String| -> Result<()> {
            self.session_ttl_secs = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_POOL_SIZE", |k, v: String| -> Result<()> {
            self.pool_size = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_WEBHOOK_BACKOFF_SCALE", |k,
                                                v: String|
         -> Result<()> {
            self.webhook_backoff_scale = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_WEBHOOK_SCAN_MS", |k, v: String| -> Result<()> {
            self.webhook_scan_ms = parse(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_REALTIME_RETENTION_EVENTS",
            |k, v: String| -> Result<()> {
                self.realtime_retention_events = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_REALTIME_RETENTION_SECS", |k,
                                                  v: String|
         -> Result<()> {
            self.realtime_retention_secs = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_REALTIME_RETENTION_BYTES", |k,
                                                   v: String|
         -> Result<()> {
            self.realtime_retention_bytes = parse(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_REALTIME_MAX_BROADCAST_BYTES",
            |k, v: String| -> Result<()> {
                self.realtime_max_broadcast_bytes = parse(k, &v)?;
                Ok(())
            }
        );
        env!(
            "FLUXBASE_REALTIME_BROADCASTS_PER_SEC",
            |k, v: String| -> Result<()> {
                self.realtime_broadcasts_per_sec = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_REALTIME_BROADCAST_BYTES_PER_SEC", |k,
                                                           v: String|
         -> Result<
            (),
        > {
            self.realtime_broadcast_bytes_per_sec = parse(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_REALTIME_SUBSCRIBES_PER_SEC",
            |k, v: String| -> Result<()> {
                self.realtime_subscribes_per_sec = parse(k, &v)?;
                Ok(())
            }
        );
        env!(
            "FLUXBASE_REALTIME_UNSUBSCRIBED_TIMEOUT_SECS",
            |k, v: String| -> Result<()> {
                self.realtime_unsubscribed_timeout_secs = parse(k, &v)?;
                Ok(())
            }
        );
        env!(
            "FLUXBASE_REALTIME_SEND_QUEUE_BYTES",
            |k, v: String| -> Result<()> {
                self.realtime_send_queue_bytes = parse(k, &v)?;
                Ok(())
            }
        );
        env!(
            "FLUXBASE_REALTIME_CLIENT_STALL_SECS",
            |k, v: String| -> Result<()> {
                self.realtime_client_stall_secs = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_REALTIME_CATCH_UP_READS", |k,
                                                  v: String|
         -> Result<()> {
            self.realtime_catch_up_reads = parse(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_REALTIME_RLS_MAX_IDENTITIES",
            |k, v: String| -> Result<()> {
                self.realtime_rls_max_identities = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_REALTIME_RLS_BATCH_ROWS", |k,
                                                  v: String|
         -> Result<()> {
            self.realtime_rls_batch_rows = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_REALTIME_RLS_TIMEOUT_MS", |k,
                                                  v: String|
         -> Result<()> {
            self.realtime_rls_timeout_ms = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_REALTIME_RLS_CONNECTIONS", |k,
                                                   v: String|
         -> Result<()> {
            self.realtime_rls_connections = parse(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_REALTIME_PROJECT_BROADCASTS_PER_SEC",
            |k, v: String| -> Result<()> {
                self.realtime_project_broadcasts_per_sec = parse(k, &v)?;
                Ok(())
            }
        );
        env!(
            "FLUXBASE_REALTIME_PROJECT_BROADCAST_BYTES_PER_SEC",
            |k, v: String| -> Result<()> {
                self.realtime_project_broadcast_bytes_per_sec = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_CDC_BUFFER_BYTES", |k, v: String| -> Result<()> {
            self.cdc_buffer_bytes = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_CDC_DECODING_WORK_MEM_KB", |k,
                                                   v: String|
         -> Result<()> {
            self.cdc_decoding_work_mem_kb = if v.is_empty() {
                None
            } else {
                Some(parse(k, &v)?)
            };
            Ok(())
        });
        env!("FLUXBASE_TEMP_FILE_LIMIT_KB", |k,
                                             v: String|
         -> Result<()> {
            self.temp_file_limit_kb = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_HEADER_READ_TIMEOUT_SECS", |k,
                                                   v: String|
         -> Result<()> {
            self.header_read_timeout_secs = parse(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_MAX_CONNECTIONS_PER_ADDRESS",
            |k, v: String| -> Result<()> {
                self.max_connections_per_address = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_TRUST_FORWARDED_FOR", |k,
                                              v: String|
         -> Result<()> {
            self.trust_forwarded_for = flag(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_AUTH_ATTEMPTS_PER_ADDRESS",
            |k, v: String| -> Result<()> {
                self.auth_attempts_per_address = parse(k, &v)?;
                Ok(())
            }
        );
        env!(
            "FLUXBASE_AUTH_FAILURES_PER_ACCOUNT",
            |k, v: String| -> Result<()> {
                self.auth_failures_per_account = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_AUTH_FAILURES_PER_ACCOUNT_TOTAL", |k,
                                                          v: String|
         -> Result<
            (),
        > {
            self.auth_failures_per_account_total = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_AUTH_RATE_WINDOW_SECS", |k,
                                                v: String|
         -> Result<()> {
            self.auth_rate_window_secs = parse(k, &v)?;
            Ok(())
        });
        env!(
            "FLUXBASE_MAX_CONCURRENT_PASSWORD_HASHES",
            |k, v: String| -> Result<()> {
                self.max_concurrent_password_hashes = parse(k, &v)?;
                Ok(())
            }
        );
        env!("FLUXBASE_MAX_PROJECTS_PER_USER", |k,
                                                v: String|
         -> Result<()> {
            self.max_projects_per_user = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_SQL_MAX_CONNECTIONS", |k,
                                              v: String|
         -> Result<()> {
            self.sql_max_connections = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_SQL_PROJECT_CONNECTIONS", |k,
                                                  v: String|
         -> Result<()> {
            self.sql_project_connections = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_SQL_QUEUE_TIMEOUT_MS", |k,
                                               v: String|
         -> Result<()> {
            self.sql_queue_timeout_ms = parse(k, &v)?;
            Ok(())
        });
        env!("FLUXBASE_SQL_IDLE_TIMEOUT_SECS", |k,
                                                v: String|
         -> Result<()> {
            self.sql_idle_timeout_secs = parse(k, &v)?;
            Ok(())
        });
        self.validate()
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
        if self.realtime_rls_max_identities == 0
            || self.realtime_rls_batch_rows == 0
            || self.realtime_rls_timeout_ms == 0
            || self.realtime_rls_connections == 0
        {
            bail!("realtime_rls_max_identities, realtime_rls_batch_rows, realtime_rls_timeout_ms and realtime_rls_connections must be positive");
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.metrics_token.as_deref(), Some("t0ken"));
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
