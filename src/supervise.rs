//! Keeps the server's embedded databases running: an embedded PostgreSQL or MariaDB that ends
//! while the server still needs it (killed by an operator, by the kernel's OOM killer, a crash)
//! is started again, on the same port, for as long as the server runs.
//!
//! Without this a `kill -9` of the postmaster (or of `mariadbd`) left a running server that
//! answered every request 503 until someone restarted it by hand. A supervisor is one thread
//! per embedded database. It holds the database's main process by a pidfd and sleeps in
//! `poll()` until that process ends; then, unless the server is stopping it, it starts the
//! database again: PostgreSQL and InnoDB recover from their logs at that start, the SQL pools
//! replace their broken connections, and the change streams reconnect and resume from their
//! stored positions (rooms say `degraded`, then `live`; nothing committed is lost). A start
//! that fails (the old processes still hold the shared memory or the port for a moment, the
//! disk is full) is tried again, after 0.5 s and then up to every 10 s, each failure logged
//! with its cause.
//!
//! Only a server supervises: a CLI command that started a database for its own run stops it
//! when it ends. What is supervised is started again only by its supervisor or by its own
//! `restart` (tests), never by both: they share [`Supervised::start_again`]'s lock.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::os_user::process::Held;

/// An embedded database a supervisor keeps running.
pub trait Supervised: Send + Sync + 'static {
    /// "PostgreSQL", "MariaDB": for the logs.
    fn name(&self) -> &'static str;
    /// The database's main process as it runs now (`None`: none runs, or it cannot be held).
    fn process(&self) -> Option<Held>;
    /// Its main process ended (before it is started again).
    fn ended(&self, _process: &Held) {}
    /// Whether the server is stopping it (then it is not started again).
    fn stopping(&self) -> bool;
    /// Starts it again, on the port it had, after its main process ended, unless another start
    /// got there first (under the lock every start of it takes). `Ok(false)`: one runs.
    fn start_again(&self) -> Result<bool>;
}

/// How often a supervisor looks at `stopping` while its database runs, and how often it looks
/// for a running database it cannot hold by a pidfd (Linux < 5.3, a seccomp filter).
const CHECK: Duration = Duration::from_secs(1);
/// The first wait before a failed start is tried again, and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(10);
/// A database that ends sooner than this after its supervisor started it waits the backoff
/// before the next start (and makes it longer), as a failed start does: one that dies in its
/// recovery is not started over and over as fast as it can start.
const STABLE: Duration = Duration::from_secs(60);

/// Starts the supervisor thread of `target`; `on_restart` runs after each start it made (the
/// server counts them in `/metrics`). The thread ends once `target` is stopping or dropped.
pub fn supervise<S: Supervised>(
    target: &Arc<S>,
    on_restart: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    let weak = Arc::downgrade(target);
    let name = target.name();
    std::thread::Builder::new()
        .name(format!("supervise-{}", name.to_lowercase()))
        .spawn(move || run(weak, on_restart))?;
    Ok(())
}

fn run<S: Supervised>(target: Weak<S>, on_restart: impl Fn()) {
    let mut wait = FIRST_RETRY;
    // When this supervisor last started it.
    let mut started: Option<Instant> = None;
    loop {
        // Wait for the running process to end (or find none running).
        let held = match target.upgrade() {
            Some(t) if !t.stopping() => t.process(),
            _ => return,
        };
        if let Some(held) = held {
            let pid = held.pid;
            loop {
                if held.wait_gone(CHECK) {
                    break;
                }
                match target.upgrade() {
                    Some(t) if !t.stopping() => {}
                    _ => return,
                }
            }
            let Some(t) = target.upgrade() else { return };
            t.ended(&held);
            if t.stopping() {
                return;
            }
            let soon = started.is_some_and(|s| s.elapsed() < STABLE);
            tracing::error!(
                database = t.name(),
                pid,
                "the embedded {} ended while the server needs it: starting it again{}",
                t.name(),
                if soon {
                    " (it ended soon after its last start: after a pause)"
                } else {
                    ""
                }
            );
            drop(t);
            if soon {
                std::thread::sleep(wait);
                wait = (wait * 2).min(LAST_RETRY);
            } else {
                wait = FIRST_RETRY;
            }
        }
        // Start it again, until that holds or the server stops it.
        let mut attempt = 1u32;
        loop {
            let Some(t) = target.upgrade() else { return };
            if t.stopping() {
                return;
            }
            match t.start_again() {
                Ok(true) => {
                    tracing::warn!(
                        database = t.name(),
                        attempt,
                        "the embedded {} is running again",
                        t.name()
                    );
                    on_restart();
                    started = Some(Instant::now());
                    break;
                }
                // One runs (another start got there first, or it cannot be held by a pidfd):
                // watch that one, looking again after a pause (never a busy loop).
                Ok(false) => {
                    drop(t);
                    std::thread::sleep(CHECK);
                    break;
                }
                Err(e) => {
                    tracing::error!(
                        database = t.name(),
                        attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %format!("{e:#}"),
                        "starting the embedded {} again failed",
                        t.name()
                    );
                }
            }
            drop(t);
            std::thread::sleep(wait);
            wait = (wait * 2).min(LAST_RETRY);
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A `sleep` standing in for a database: killed, it is started again; stopping, it is not.
    struct Sleeper {
        child: Mutex<Child>,
        stopping: AtomicBool,
        fail_next: AtomicUsize,
        /// `process()` cannot hold it (as without pidfds).
        hidden: AtomicBool,
        /// Calls of `start_again`.
        starts: AtomicUsize,
    }

    impl Sleeper {
        fn spawn() -> Child {
            Command::new("sleep").arg("600").spawn().unwrap()
        }
        fn pid(&self) -> u32 {
            self.child.lock().unwrap().id()
        }
        fn kill(&self) {
            let mut child = self.child.lock().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    impl Supervised for Sleeper {
        fn name(&self) -> &'static str {
            "sleeper"
        }
        fn process(&self) -> Option<Held> {
            if self.hidden.load(Ordering::SeqCst) {
                return None;
            }
            let mut child = self.child.lock().unwrap();
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            Held::open(child.id())
        }
        fn stopping(&self) -> bool {
            self.stopping.load(Ordering::SeqCst)
        }
        fn start_again(&self) -> Result<bool> {
            self.starts.fetch_add(1, Ordering::SeqCst);
            let mut child = self.child.lock().unwrap();
            if child.try_wait()?.is_none() {
                return Ok(false);
            }
            if self.fail_next.load(Ordering::SeqCst) > 0 {
                self.fail_next.fetch_sub(1, Ordering::SeqCst);
                anyhow::bail!("the port is still taken");
            }
            *child = Self::spawn();
            Ok(true)
        }
    }

    fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_killed_process_is_started_again_through_failed_starts_and_a_stopping_one_is_not() {
        let sleeper = Arc::new(Sleeper {
            child: Mutex::new(Sleeper::spawn()),
            stopping: AtomicBool::new(false),
            fail_next: AtomicUsize::new(2),
            hidden: AtomicBool::new(false),
            starts: AtomicUsize::new(0),
        });
        let restarts = Arc::new(AtomicUsize::new(0));
        let counted = restarts.clone();
        supervise(&sleeper, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();

        let first = sleeper.pid();
        sleeper.kill();
        // Two failed starts (0.5 s, 1 s apart), then a new process.
        wait_until("started again", || restarts.load(Ordering::SeqCst) == 1);
        let second = sleeper.pid();
        assert_ne!(first, second);
        assert_eq!(sleeper.fail_next.load(Ordering::SeqCst), 0);

        sleeper.kill();
        wait_until("started again once more", || {
            restarts.load(Ordering::SeqCst) == 2
        });
        assert_ne!(sleeper.pid(), second);

        // A running process it cannot hold: looked for once a second, not in a busy loop;
        // killed, it is still started again.
        sleeper.hidden.store(true, Ordering::SeqCst);
        let hidden = sleeper.pid();
        sleeper.kill();
        wait_until("started again while hidden", || {
            restarts.load(Ordering::SeqCst) == 3
        });
        assert_ne!(sleeper.pid(), hidden);
        let looked = sleeper.starts.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(3));
        let more = sleeper.starts.load(Ordering::SeqCst) - looked;
        assert!(
            (1..=4).contains(&more),
            "{more} looks in 3 s at a process it cannot hold"
        );
        assert_eq!(restarts.load(Ordering::SeqCst), 3);
        sleeper.hidden.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1500));

        // Stopping: ended, and left ended.
        sleeper.stopping.store(true, Ordering::SeqCst);
        let last = sleeper.pid();
        sleeper.kill();
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(restarts.load(Ordering::SeqCst), 3);
        assert_eq!(sleeper.pid(), last, "a stopping process was started again");
    }
}
