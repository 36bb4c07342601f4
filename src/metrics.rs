//! Prometheus text metrics at `GET /metrics`: request counts by route and status, SQL latency
//! histogram and outcome counts, pooled connections.
//!
//! This module counts and renders text; who may read it, and where it is served, is the API's
//! concern ([`crate::api::metrics`]): the metrics name every project, so they are not public.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS_MS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 30000.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    sql_ok: AtomicU64,
    sql_failed: AtomicU64,
    sql_buckets: [AtomicU64; BUCKETS_MS.len()],
    sql_sum_us: AtomicU64,
    identity_changes: AtomicU64,
    /// Bytes of files stored by uploads, and served by Fluxbase's own download routes.
    pub storage_uploaded_bytes: AtomicU64,
    pub storage_served_bytes: AtomicU64,
    /// Operations the storage backend failed (answered 503 `STORAGE_UNAVAILABLE`).
    pub storage_backend_errors: AtomicU64,
    /// Uploads made durable on the local disk before their metadata was committed, and the
    /// time their fsyncs took (µs).
    pub storage_fsyncs: AtomicU64,
    pub storage_fsync_micros: AtomicU64,
    /// Local downloads whose read buffers came from the read budget, and those that found it
    /// spent and streamed in small chunks (`storage::buffers`).
    pub storage_downloads_budgeted: AtomicU64,
    pub storage_downloads_small: AtomicU64,
    /// Of those, the downloads that streamed small because their client address held its cap
    /// of shares (`storage_read_shares_per_client`), not because the budget was spent.
    pub storage_downloads_client_capped: AtomicU64,
    /// Bytes of SQL answers being built or built and not yet taken by their clients (a gauge),
    /// answers refused because the budget or a cap was spent, connections cut at their send
    /// deadline, answers of writers sent without rows, builds whose next step the budget or a
    /// cap refused (`api::answers`).
    pub sql_answer_bytes_in_flight: AtomicU64,
    pub sql_answers_refused: AtomicU64,
    pub sql_answers_cut: AtomicU64,
    pub sql_answers_shortened: AtomicU64,
    pub sql_answer_builds_stopped: AtomicU64,
    /// Tenant backends the server ended for their memory (`sql::memory`).
    pub sql_backends_ended_for_memory: AtomicU64,
    /// Tenant backends the server ended for the locks they held (`sql::memory`).
    pub sql_backends_ended_for_locks: AtomicU64,
    /// Project databases and roles the teardown sweep dropped, and those its last pass left to
    /// drop (a gauge; `projects::teardown`).
    pub project_teardowns_swept: AtomicU64,
    pub project_teardowns_pending: AtomicU64,
    pub connections_stalled: AtomicU64,
    /// Broadcasts from SQL or the REST API over their project's budget (dropped, or 429).
    pub realtime_broadcasts_dropped: AtomicU64,
    /// Row-level security evaluations of realtime events that failed or timed out (the events
    /// were hidden from the identities they were evaluated for).
    pub realtime_rls_failures: AtomicU64,
    /// Starts of the embedded PostgreSQL and MariaDB by their supervisors after their main
    /// process ended unexpectedly (`crate::supervise`).
    pub embedded_postgres_restarts: AtomicU64,
    pub embedded_mariadb_restarts: AtomicU64,
    /// The dedicated `/metrics` listener (`metrics_addr`): its bound address and task.
    listener: Mutex<Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>>,
}

impl Metrics {
    pub fn observe_request(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .expect("poisoned")
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    pub fn observe_sql(&self, elapsed: Duration, ok: bool) {
        if ok { &self.sql_ok } else { &self.sql_failed }.fetch_add(1, Ordering::Relaxed);
        let ms = elapsed.as_secs_f64() * 1000.0;
        for (i, le) in BUCKETS_MS.iter().enumerate() {
            if ms <= *le {
                self.sql_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sql_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// A pooled connection's `auth.uid()` identity was (re)set before a request (RLS).
    pub fn observe_identity_change(&self) {
        self.identity_changes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(
        &self,
        pooled_connections: usize,
        connection_budget: usize,
        streams: &[(String, crate::cdc::StreamStatus)],
    ) -> String {
        let mut out = String::new();
        out.push_str("# HELP fluxbase_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE fluxbase_http_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("poisoned").iter() {
            let _ = writeln!(
                out,
                "fluxbase_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let ok = self.sql_ok.load(Ordering::Relaxed);
        let failed = self.sql_failed.load(Ordering::Relaxed);
        out.push_str("# HELP fluxbase_sql_queries_total Queries run by /api/execute-sql.\n");
        out.push_str("# TYPE fluxbase_sql_queries_total counter\n");
        let _ = writeln!(out, "fluxbase_sql_queries_total{{outcome=\"ok\"}} {ok}");
        let _ = writeln!(
            out,
            "fluxbase_sql_queries_total{{outcome=\"error\"}} {failed}"
        );
        out.push_str(
            "# HELP fluxbase_sql_duration_seconds Time to run a query, pool wait included.\n",
        );
        out.push_str("# TYPE fluxbase_sql_duration_seconds histogram\n");
        for (i, le) in BUCKETS_MS.iter().enumerate() {
            let n = self.sql_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "fluxbase_sql_duration_seconds_bucket{{le=\"{}\"}} {n}",
                le / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "fluxbase_sql_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            ok + failed
        );
        let _ = writeln!(
            out,
            "fluxbase_sql_duration_seconds_sum {}",
            self.sql_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "fluxbase_sql_duration_seconds_count {}", ok + failed);
        out.push_str("# HELP fluxbase_sql_pooled_connections Open project database connections.\n");
        out.push_str("# TYPE fluxbase_sql_pooled_connections gauge\n");
        let _ = writeln!(out, "fluxbase_sql_pooled_connections {pooled_connections}");
        out.push_str(
            "# HELP fluxbase_sql_connection_budget Connections all PostgreSQL projects' pools may \
             hold together (sql_max_connections as sized from the cluster at the first SQL \
             request; 0 before it).\n",
        );
        out.push_str("# TYPE fluxbase_sql_connection_budget gauge\n");
        let _ = writeln!(out, "fluxbase_sql_connection_budget {connection_budget}");
        out.push_str(
            "# HELP fluxbase_rls_identity_changes_total Pooled connections whose auth.uid() identity was set before a request (one round trip each).\n",
        );
        out.push_str("# TYPE fluxbase_rls_identity_changes_total counter\n");
        let _ = writeln!(
            out,
            "fluxbase_rls_identity_changes_total {}",
            self.identity_changes.load(Ordering::Relaxed)
        );
        for (name, kind, help, value) in [
            (
                "fluxbase_storage_uploaded_bytes_total",
                "counter",
                "Bytes of files stored by uploads.",
                &self.storage_uploaded_bytes,
            ),
            (
                "fluxbase_storage_served_bytes_total",
                "counter",
                "Bytes of files served by signed local and public URLs.",
                &self.storage_served_bytes,
            ),
            (
                "fluxbase_storage_backend_errors_total",
                "counter",
                "Storage backend operations that failed (503 STORAGE_UNAVAILABLE).",
                &self.storage_backend_errors,
            ),
            (
                "fluxbase_storage_fsyncs_total",
                "counter",
                "Uploads made durable on the local disk (fsync of the file and its directories) before their metadata was committed.",
                &self.storage_fsyncs,
            ),
            (
                "fluxbase_storage_downloads_budgeted_total",
                "counter",
                "Local downloads read into buffers taken from the read budget (storage_read_budget_bytes).",
                &self.storage_downloads_budgeted,
            ),
            (
                "fluxbase_storage_downloads_small_total",
                "counter",
                "Local downloads that found the read budget spent and streamed in 64 KiB chunks.",
                &self.storage_downloads_small,
            ),
            (
                "fluxbase_storage_downloads_client_capped_total",
                "counter",
                "Local downloads that streamed in 64 KiB chunks because their client address already held storage_read_shares_per_client shares of the read budget (counted in fluxbase_storage_downloads_small_total too).",
                &self.storage_downloads_client_capped,
            ),
            (
                "fluxbase_sql_answer_bytes_in_flight",
                "gauge",
                "Bytes of /api/execute-sql answers being built, or built and not yet taken by their clients (at most sql_answer_budget_bytes).",
                &self.sql_answer_bytes_in_flight,
            ),
            (
                "fluxbase_sql_answers_refused_total",
                "counter",
                "SQL answers refused with 429 because sql_answer_budget_bytes or its share per address, project or account was spent (while the answer was built or once it was).",
                &self.sql_answers_refused,
            ),
            (
                "fluxbase_sql_answer_builds_stopped_total",
                "counter",
                "SQL answers whose next step of memory was refused while they were built (the budget or a share of it spent): the rest of their rows read past and dropped, then the answer refused with 429 (read scope) or sent without rows (a role that may write).",
                &self.sql_answer_builds_stopped,
            ),
            (
                "fluxbase_sql_answers_cut_total",
                "counter",
                "Connections closed because the client did not take a response within sql_answer_send_timeout_secs.",
                &self.sql_answers_cut,
            ),
            (
                "fluxbase_sql_answers_shortened_total",
                "counter",
                "SQL answers of a role that may write sent without their rows (truncated) because a budget was spent: such a request ran and is never answered 429.",
                &self.sql_answers_shortened,
            ),
            (
                "fluxbase_sql_backends_ended_for_memory_total",
                "counter",
                "Tenant PostgreSQL backends ended because their private memory passed sql_backend_memory_limit_mb, or they were the largest while all together passed sql_backends_memory_total_mb.",
                &self.sql_backends_ended_for_memory,
            ),
            (
                "fluxbase_sql_backends_ended_for_locks_total",
                "counter",
                "Tenant PostgreSQL backends ended because they held more than sql_backend_locks_limit entries of the cluster's shared lock table, or the most while tenants together held half of it.",
                &self.sql_backends_ended_for_locks,
            ),
            (
                "fluxbase_project_teardowns_swept_total",
                "counter",
                "Databases and roles of projects that were not (or no longer) projects, left by a crash or a failed drop, that the teardown sweep dropped.",
                &self.project_teardowns_swept,
            ),
            (
                "fluxbase_project_teardowns_pending",
                "gauge",
                "Databases and roles of deleted or abandoned projects still to drop after the teardown sweep's last pass (their drop failed; retried every sweep).",
                &self.project_teardowns_pending,
            ),
            (
                "fluxbase_connections_stalled_total",
                "counter",
                "Connections closed because their client took none of a response's bytes for send_stall_timeout_secs (downloads, answers, any response).",
                &self.connections_stalled,
            ),
            (
                "fluxbase_realtime_broadcasts_dropped_total",
                "counter",
                "Broadcasts from SQL or POST /api/realtime/broadcast over their project's budget (realtime_project_broadcasts_per_sec, realtime_project_broadcast_bytes_per_sec): SQL ones dropped, REST ones answered 429.",
                &self.realtime_broadcasts_dropped,
            ),
            (
                "fluxbase_realtime_rls_failures_total",
                "counter",
                "Row-level security evaluations of realtime events that failed, timed out or lacked a column a policy reads (the events were not sent to those subscribers: fail closed).",
                &self.realtime_rls_failures,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        {
            let name = "fluxbase_embedded_restarts_total";
            let _ = writeln!(
                out,
                "# HELP {name} Times the server started its embedded database again after its main process ended unexpectedly (killed, crashed).\n# TYPE {name} counter"
            );
            for (engine, n) in [
                ("postgresql", &self.embedded_postgres_restarts),
                ("mariadb", &self.embedded_mariadb_restarts),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{engine=\"{engine}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        {
            let name = "fluxbase_storage_fsync_seconds_total";
            let _ = writeln!(
                out,
                "# HELP {name} Time spent making uploads durable on the local disk.\n# TYPE {name} counter"
            );
            let micros = self.storage_fsync_micros.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name} {}", micros as f64 / 1e6);
        }
        render_streams(&mut out, streams);
        out
    }
}

fn render_streams(out: &mut String, streams: &[(String, crate::cdc::StreamStatus)]) {
    type Getter = fn(&crate::cdc::StreamStatus) -> Option<f64>;
    let series: [(&str, &str, &str, Getter); 10] = [
        (
            "fluxbase_cdc_up",
            "gauge",
            "1 while the project's change stream is streaming.",
            |s| Some(if s.state == crate::cdc::StreamState::Streaming { 1.0 } else { 0.0 }),
        ),
        (
            "fluxbase_cdc_failed",
            "gauge",
            "1 when the project's change stream stopped on an error retrying cannot fix (state failed or slot_lost).",
            |s| Some(if s.state.is_failed() { 1.0 } else { 0.0 }),
        ),
        (
            "fluxbase_cdc_events_total",
            "counter",
            "Events published by the change stream.",
            |s| Some(s.events as f64),
        ),
        (
            "fluxbase_cdc_transactions_total",
            "counter",
            "Transactions released by the change stream.",
            |s| Some(s.transactions as f64),
        ),
        (
            "fluxbase_cdc_lag_bytes",
            "gauge",
            "WAL bytes between the server's position and the slot's confirmed position.",
            |s| s.lag_bytes.map(|b| b as f64),
        ),
        (
            "fluxbase_cdc_lag_seconds",
            "gauge",
            "Commit-to-publish delay of the last transaction.",
            |s| s.lag_seconds,
        ),
        (
            "fluxbase_cdc_buffered_bytes",
            "gauge",
            "Bytes of open transactions held in memory.",
            |s| Some(s.buffered_bytes as f64),
        ),
        (
            "fluxbase_cdc_spilled_bytes_total",
            "counter",
            "Bytes of open transactions' changes spilled to disk past cdc_buffer_bytes.",
            |s| Some(s.spilled_bytes as f64),
        ),
        (
            "fluxbase_cdc_reconnects_total",
            "counter",
            "Times the change stream reconnected.",
            |s| Some(s.reconnects as f64),
        ),
        (
            "fluxbase_cdc_rejected_messages_total",
            "counter",
            "fluxbase.* messages in the WAL the server did not emit (dropped).",
            |s| Some(s.rejected_messages as f64),
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (project, status) in streams {
            if let Some(v) = get(status) {
                let _ = writeln!(out, "{name}{{project=\"{project}\"}} {v}");
            }
        }
    }
}

impl Metrics {
    /// The dedicated listener's address, once started.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener
            .lock()
            .expect("poisoned")
            .as_ref()
            .map(|(a, _)| *a)
    }

    /// Keeps the dedicated listener's address and task (started by the API layer).
    pub fn set_listener(&self, addr: std::net::SocketAddr, task: tokio::task::JoinHandle<()>) {
        *self.listener.lock().expect("poisoned") = Some((addr, task));
    }

    /// Stops the dedicated listener, if any.
    pub fn stop_listener(&self) {
        if let Some((_, task)) = self.listener.lock().expect("poisoned").take() {
            task.abort();
        }
    }
}
