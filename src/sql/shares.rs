//! The share of SQL connections one account's projects hold together (both engines), taken
//! beside each project's own share (`sql_project_connections`).
//!
//! ```text
//!  request ─► project share (sql_project_connections)  ┐ one wait: sql_queue_timeout_ms,
//!           ─► account share (sql_account_connections) ┘ then 429 naming the one that refused
//!           ─► a connection (the engine's pool and budget)
//! ```
//! Without it an account's projects together held `sql_project_connections ×
//! max_projects_per_user` (80) connections, more than a small cluster's whole budget, and other
//! tenants got 429 while that account's statements ran (red team rt5). The account is the one
//! the SQL answer budget counts by ([`crate::projects::Project::account`]: the project's first
//! admin). The project share is taken first: requests waiting on the account then hold at most
//! their own project's share, never places another project of the same account could use.
//! An account holds at most half of its engine's connection budget, never less than one
//! project's share ([`AccountShares::size_on_node`]). Every checkout counts, the server's own
//! for a project too (realtime RLS evaluations, the policy API): they hold the same connections.
//!
//! Project and account shares alike are [`KeyedShares`]: a share lives while a request holds or
//! waits on it: the map keeps only a weak reference, so projects and accounts that ran SQL once
//! cost nothing afterwards (dead entries are swept as the map grows; a deleted project's goes
//! with its last request). A share whose size changed (cluster mode: the node count) is
//! replaced for later requests; those holding the old one finish on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::SqlError;
use crate::auth::Project;

/// Semaphores by key (a project, an account), each kept while a request holds or waits on it.
#[derive(Default)]
pub struct KeyedShares {
    map: Mutex<KeyedMap>,
}

#[derive(Default)]
struct KeyedMap {
    shares: HashMap<String, (usize, Weak<Semaphore>)>,
    /// The map's size at which dead entries are swept next.
    sweep_at: usize,
}

impl KeyedShares {
    /// The share of `key` with `size` places: the one in use, or a new one when none is held or
    /// its size differs (those holding the old one finish on it).
    pub fn share(&self, key: &str, size: usize) -> Arc<Semaphore> {
        let mut map = self.map.lock().expect("poisoned");
        if let Some((n, weak)) = map.shares.get(key) {
            if *n == size {
                if let Some(share) = weak.upgrade() {
                    return share;
                }
            }
        }
        let share = Arc::new(Semaphore::new(size));
        map.shares
            .insert(key.to_string(), (size, Arc::downgrade(&share)));
        if map.shares.len() >= map.sweep_at {
            map.shares.retain(|_, (_, weak)| weak.strong_count() > 0);
            map.sweep_at = (map.shares.len() * 2).max(SWEEP_FLOOR);
        }
        share
    }

    /// A place in `key`'s share of `size` places, waiting until `deadline`; `Err(())`: none
    /// came free in time.
    pub async fn acquire(
        &self,
        key: &str,
        size: usize,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, ()> {
        let share = self.share(key, size);
        match tokio::time::timeout_at(deadline, share.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(()),
        }
    }

    /// Keys with a request holding or waiting on their share now.
    pub fn active(&self) -> usize {
        self.map
            .lock()
            .expect("poisoned")
            .shares
            .values()
            .filter(|(_, weak)| weak.strong_count() > 0)
            .count()
    }
}

/// Accounts' shares of SQL connections on this server.
pub struct AccountShares {
    /// `sql_account_connections` as it applies (never below the project share); 0: off.
    size: usize,
    /// `sql_project_connections`.
    project: usize,
    shares: KeyedShares,
}

/// What a request holds while its statement runs: its place in the project's share and, when
/// account shares are on, in its account's.
pub struct SharePlaces {
    pub project: OwnedSemaphorePermit,
    pub account: Option<OwnedSemaphorePermit>,
}

/// Entries kept at least before dead ones are swept.
const SWEEP_FLOOR: usize = 64;

impl AccountShares {
    /// `account` (`sql_account_connections`, 0: off) never below `project`
    /// (`sql_project_connections`): a lower value would leave a project less than its own
    /// share.
    pub fn new(account: usize, project: usize) -> AccountShares {
        let size = match account {
            0 => 0,
            n if n < project => {
                tracing::warn!(
                    sql_account_connections = n,
                    sql_project_connections = project,
                    "sql_account_connections is below sql_project_connections: raised to it"
                );
                project
            }
            n => n,
        };
        AccountShares {
            size,
            project,
            shares: KeyedShares::default(),
        }
    }

    /// The share of one account on a single node; 0: no account shares.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The places of one account on this node: `sql_account_connections` split between the
    /// `nodes` ([`crate::cluster::per_node`]; 1: a single node), and at most half of this
    /// node's connection budget (`budget`, 0: not sized yet) but never below the node's project
    /// share: on a small cluster the setting alone would let one account hold the whole budget
    /// (16 of `sql_max_connections = 16`, the red team's measurement), so at least half of it
    /// stays for the other accounts.
    pub fn size_on_node(&self, nodes: usize, budget: usize) -> usize {
        let size = crate::cluster::per_node(self.size, nodes);
        match budget {
            0 => size,
            budget => size.min((budget / 2).max(crate::cluster::per_node(self.project, nodes))),
        }
    }

    /// A place in `project`'s account's share on this node ([`AccountShares::size_on_node`]),
    /// waiting until `deadline`, then 429 naming `sql_account_connections`. `None`: account
    /// shares are off.
    pub async fn place(
        &self,
        project: &Project,
        nodes: usize,
        budget: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, SqlError> {
        let size = self.size_on_node(nodes, budget);
        let account = project.account();
        self.acquire(&account, size, deadline).await.map_err(|()| {
            tracing::debug!(project_id = %project.id, %account,
                "SQL request refused: its account's share is in use");
            let per_node = crate::cluster::per_node(self.size, nodes);
            let whose = match (nodes > 1, size < per_node) {
                (false, false) => "sql_account_connections".to_string(),
                (true, false) => format!(
                    "this node's share of sql_account_connections = {} across {nodes} nodes",
                    self.size
                ),
                (_, true) => format!(
                    "sql_account_connections = {}, here half of the server's {budget} SQL \
                     connections (sql_max_connections)",
                    self.size
                ),
            };
            SqlError::Busy(format!(
                "The projects of this project's account already run {size} SQL requests at once \
                 ({whose}); retry when one has finished."
            ))
        })
    }

    /// A place in `account`'s share of `size` places, waiting until `deadline`; `Ok(None)`:
    /// account shares are off. `Err(())`: none came free in time.
    async fn acquire(
        &self,
        account: &str,
        size: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, ()> {
        if self.size == 0 {
            return Ok(None);
        }
        self.shares.acquire(account, size, deadline).await.map(Some)
    }

    /// Accounts with a request holding or waiting on their share now.
    pub fn active(&self) -> usize {
        self.shares.active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn an_accounts_places_are_bounded_across_its_requests_and_others_are_not_held_back() {
        let shares = AccountShares::new(3, 2);
        let held: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| shares.acquire("a", 3, soon())))
                .await
                .into_iter()
                .map(|p| p.unwrap().unwrap())
                .collect();
        assert!(
            shares.acquire("a", 3, soon()).await.is_err(),
            "a fourth place"
        );
        // Another account is served meanwhile.
        let other = shares.acquire("b", 3, soon()).await.unwrap();
        assert!(other.is_some());
        drop(held);
        assert!(shares.acquire("a", 3, soon()).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_share_nobody_holds_is_forgotten_and_the_map_stays_small() {
        let shares = AccountShares::new(16, 8);
        for i in 0..1_000 {
            let _p = shares
                .acquire(&format!("usr_{i}"), 16, soon())
                .await
                .unwrap();
        }
        assert_eq!(shares.active(), 0);
        let len = shares.shares.map.lock().unwrap().shares.len();
        assert!(len <= 2 * SWEEP_FLOOR, "{len} entries kept");
    }

    #[tokio::test]
    async fn a_share_resized_serves_later_requests_while_the_old_places_finish() {
        let shares = AccountShares::new(4, 2);
        let old: Vec<_> =
            futures_util::future::join_all((0..4).map(|_| shares.acquire("a", 4, soon()))).await;
        assert!(shares.acquire("a", 4, soon()).await.is_err());
        // A node joined: 2 places per node now, on a new share.
        let new = shares.acquire("a", 2, soon()).await.unwrap();
        assert!(new.is_some());
        drop(old);
    }

    #[test]
    fn an_account_holds_at_most_half_of_the_budget_but_never_less_than_a_project() {
        let shares = AccountShares::new(16, 8);
        // A budget not sized yet, or a large one: the setting.
        assert_eq!(shares.size_on_node(1, 0), 16);
        assert_eq!(shares.size_on_node(1, 65), 16);
        // The red team's 16: half of it.
        assert_eq!(shares.size_on_node(1, 16), 8);
        // Never below a project's own share.
        assert_eq!(shares.size_on_node(1, 10), 8);
        // Three nodes: 6 of 16 and 3 of 8 each, within half of each node's budget.
        assert_eq!(shares.size_on_node(3, 65), 6);
        assert_eq!(shares.size_on_node(3, 8), 4);
        assert_eq!(shares.size_on_node(3, 4), 3);
    }

    #[tokio::test]
    async fn off_takes_nothing_and_a_setting_below_the_project_share_is_raised_to_it() {
        let off = AccountShares::new(0, 8);
        assert_eq!(off.size(), 0);
        assert!(off.acquire("a", 0, soon()).await.unwrap().is_none());
        assert_eq!(AccountShares::new(4, 8).size(), 8);
        assert_eq!(AccountShares::new(16, 8).size(), 16);
    }
}
