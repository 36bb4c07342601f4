//! The local backend's file buffers: a budget of bytes that downloads' read buffers share, and
//! the buffers themselves, kept for reuse.
//!
//! **The budget.** A download of a file of at most [`super::backend::WHOLE_READ`] bytes is read
//! whole into one buffer, and a larger one streams in [`BIG_CHUNK`]s with up to
//! [`STREAM_HOLD`] bytes of them between the disk and the socket: either way its buffers are
//! taken from one budget shared by every download (`storage_read_budget_bytes`, default
//! [`DEFAULT_READ_BUDGET`]) and given back when the response body is dropped (sent, or the
//! client gone). A download that finds the budget spent does not wait: it streams in
//! [`SMALL_CHUNK`]s, holding at most about [`SMALL_HOLD`] bytes. So the bytes that downloads'
//! buffers hold are at most the budget plus [`SMALL_HOLD`] per download in flight (which the
//! listener's connection limit bounds), however many there are and however slowly their
//! clients read.
//!
//! **Per client.** A share is held until its response is sent or dropped, so a client that
//! stops reading keeps its shares until its connection ends: a few such clients of a public
//! bucket could take the whole budget and push every other download onto small chunks. The
//! shares held by downloads to one client address are capped (`storage_read_shares_per_client`,
//! default [`DEFAULT_SHARES_PER_CLIENT`]; IPv6 addresses count by their /64, which one client
//! typically has whole): past it, that address's downloads stream in small chunks, and it can
//! hold at most `cap × STREAM_HOLD` (48 MiB by default) of the budget. Taking the whole
//! default budget then needs six addresses that read nothing; the listener's per-address
//! connection limit bounds what each holds besides.
//!
//! **Reuse.** A freshly allocated megabyte is fresh memory: the kernel faults and zeroes its
//! pages on first touch (a transparent huge page: 2 MiB zeroed), which a profile of 1 MiB
//! uploads and downloads found to be ~30 % of the server's CPU, half of it the downloads' reads
//! (see docs/benchmarks.md, 2026-12-06 session 23). Read buffers given back are kept (at most
//! [`IDLE_MAX`] bytes of them, none under [`KEEP_MIN`]) and handed out again, only for a read
//! they fit closely (a whole read: up to half as big again as the file, and its share of the
//! budget is the buffer's capacity; a stream's chunk: exactly [`BIG_CHUNK`]), so that what the
//! budget counts is what the buffers hold. (Uploads do not copy the received chunks
//! into such buffers: the copy cost more than the fresh pages of the parser's buffers it saved.)

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::ratelimit::{address_key, AddressLedger, Hold};
use crate::metrics::Metrics;

/// The default read budget: 256 MiB.
pub const DEFAULT_READ_BUDGET: u64 = 256 * 1024 * 1024;
/// The default cap of budget shares that one client address's downloads may hold at once: a
/// browser opens six connections to a host, and a page's files load well in parallel.
pub const DEFAULT_SHARES_PER_CLIENT: u32 = 8;
/// Bytes per read of a large file's stream while it holds budget.
pub const BIG_CHUNK: usize = 1024 * 1024;
/// What a large file's stream may hold at once: the chunk being read, four queued for the
/// socket (`api::storage::response_body`) and the one being written.
pub const STREAM_HOLD: u64 = 6 * BIG_CHUNK as u64;
/// Bytes per read of a download that found the budget spent.
pub const SMALL_CHUNK: usize = 64 * 1024;
/// What such a download holds at most: six small chunks.
pub const SMALL_HOLD: u64 = 6 * SMALL_CHUNK as u64;
/// Idle buffers kept for reuse, in bytes.
pub const IDLE_MAX: usize = 16 * 1024 * 1024;
/// Smaller buffers are not kept (small allocations cost little; the idle list stays short:
/// at most `IDLE_MAX / KEEP_MIN` buffers).
pub const KEEP_MIN: usize = 64 * 1024;
/// The budget is counted in KiB (a semaphore takes at most `u32::MAX` permits at once).
const UNIT: u64 = 1024;

pub struct Buffers {
    budget: Arc<Semaphore>,
    budget_bytes: u64,
    /// Given-back buffers (empty, with their capacity) and their total capacity.
    idle: Mutex<(Vec<Vec<u8>>, usize)>,
    /// Counts downloads by the way their bytes were read (`storage_downloads_budgeted`,
    /// `storage_downloads_small`, `storage_downloads_client_capped`).
    metrics: Arc<Metrics>,
    /// Most shares per client address (0: no cap).
    per_client: u32,
    /// The shares held per client address (only addresses holding one: at most as many entries
    /// as shares are out, the budget over the smallest share).
    holders: Arc<AddressLedger>,
}

/// A share of the read budget, given back (with its client's count) when dropped.
pub struct Share {
    _permit: OwnedSemaphorePermit,
    _holder: Option<Hold<Option<IpAddr>>>,
}

impl Buffers {
    /// Buffers with a read budget of `budget_bytes` (rounded up to whole KiB; 0: every download
    /// streams in small chunks).
    pub fn new(budget_bytes: u64, per_client: u32, metrics: Arc<Metrics>) -> Arc<Buffers> {
        let units = budget_bytes
            .div_ceil(UNIT)
            .min(Semaphore::MAX_PERMITS as u64) as usize;
        Arc::new(Buffers {
            budget: Arc::new(Semaphore::new(units)),
            budget_bytes,
            idle: Mutex::new((Vec::new(), 0)),
            metrics,
            per_client,
            holders: Default::default(),
        })
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Bytes of the budget not taken now.
    pub fn budget_free(&self) -> u64 {
        self.budget.available_permits() as u64 * UNIT
    }

    /// `bytes` of the read budget for a download to `client`, if that much is free now and
    /// the client's address holds fewer than its cap of shares (never waits); counted. A share
    /// is taken for the capacity of the buffers it pays for (see [`Buffers::get`]).
    pub fn take(&self, client: Option<IpAddr>, bytes: u64) -> Option<Share> {
        // Counted first (so two downloads of one client cannot both pass the cap), given back
        // below if the budget is spent. Downloads with no known address are not capped.
        let holder = match client.filter(|_| self.per_client > 0) {
            None => None,
            Some(c) => match self
                .holders
                .hold(Some(address_key(c)), 1, self.per_client.into())
            {
                Ok(hold) => Some(hold),
                Err(_) => {
                    self.metrics.storage_downloads_small.fetch_add(1, Relaxed);
                    self.metrics
                        .storage_downloads_client_capped
                        .fetch_add(1, Relaxed);
                    return None;
                }
            },
        };
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).ok();
        let permit = units.and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok());
        match permit {
            Some(p) => {
                self.metrics
                    .storage_downloads_budgeted
                    .fetch_add(1, Relaxed);
                Some(Share {
                    _permit: p,
                    _holder: holder,
                })
            }
            None => {
                self.metrics.storage_downloads_small.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Shares held by downloads to `client` now (its address as counted: by
    /// [`address_key`], IPv6 by its /64).
    pub fn held_by(&self, client: IpAddr) -> u32 {
        self.holders.held_by(&Some(address_key(client))) as u32
    }

    /// An empty buffer of `min` to `max` bytes of capacity: an idle one if one fits, else a new
    /// one of `min` (so what a buffer holds is never more than its share said).
    pub fn get(&self, min: usize, max: usize) -> Vec<u8> {
        if min >= KEEP_MIN {
            let mut idle = self.idle();
            let fits = |b: &Vec<u8>| (min..=max).contains(&b.capacity());
            if let Some(i) = idle.0.iter().position(fits) {
                let buf = idle.0.swap_remove(i);
                idle.1 -= buf.capacity();
                return buf;
            }
        }
        Vec::with_capacity(min)
    }

    /// Keeps `buf` for reuse (emptied) unless it is smaller than [`KEEP_MIN`] or larger than
    /// [`IDLE_MAX`]; past [`IDLE_MAX`] idle bytes the oldest kept buffers make room, so a burst
    /// of one size cannot fill the list with buffers no later read fits.
    pub fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() < KEEP_MIN || buf.capacity() > IDLE_MAX {
            return;
        }
        buf.clear();
        let mut idle = self.idle();
        while idle.1 + buf.capacity() > IDLE_MAX && !idle.0.is_empty() {
            let old = idle.0.remove(0);
            idle.1 -= old.capacity();
        }
        idle.1 += buf.capacity();
        idle.0.push(buf);
    }

    /// The idle list (nothing under its lock can panic; a poisoned lock is still consistent).
    fn idle(&self) -> std::sync::MutexGuard<'_, (Vec<Vec<u8>>, usize)> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `buf` as `Bytes` that give it back (and `share`, if any) once the last of them is
    /// dropped.
    pub fn bytes(self: &Arc<Self>, buf: Vec<u8>, share: Option<Arc<Share>>) -> Bytes {
        Bytes::from_owner(Lent {
            buf,
            home: self.clone(),
            _share: share,
        })
    }
}

/// A buffer lent out as `Bytes`.
struct Lent {
    buf: Vec<u8>,
    home: Arc<Buffers>,
    _share: Option<Arc<Share>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back_with_the_last_bytes() {
        let buffers = Buffers::new(3 * 1024 * 1024, 0, Default::default());
        let a = buffers.take(None, 2 * 1024 * 1024).map(Arc::new);
        assert!(a.is_some());
        assert!(
            buffers.take(None, 2 * 1024 * 1024).is_none(),
            "over the budget"
        );
        let mut buf = buffers.get(KEEP_MIN, KEEP_MIN);
        buf.extend_from_slice(b"hello");
        let bytes = buffers.bytes(buf, a);
        let clone = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(buffers.budget_free(), 1024 * 1024, "a slice still holds it");
        assert_eq!(&clone[..], b"el");
        drop(clone);
        assert_eq!(buffers.budget_free(), 3 * 1024 * 1024);
        assert_eq!(buffers.metrics.storage_downloads_budgeted.load(Relaxed), 1);
        assert_eq!(buffers.metrics.storage_downloads_small.load(Relaxed), 1);
        // The buffer came back, empty, and is handed out again when it fits.
        assert_eq!(
            buffers.get(KEEP_MIN * 2, KEEP_MIN * 3).capacity(),
            KEEP_MIN * 2
        );
        let again = buffers.get(KEEP_MIN, KEEP_MIN * 2);
        assert!(again.is_empty() && again.capacity() == KEEP_MIN);
    }

    #[test]
    fn a_buffer_is_reused_only_within_the_capacity_asked_for() {
        let buffers = Buffers::new(0, 0, Default::default());
        buffers.give_back(Vec::with_capacity(4 << 20));
        let fresh = buffers.get(KEEP_MIN, 2 * KEEP_MIN);
        assert_eq!(
            fresh.capacity(),
            KEEP_MIN,
            "the idle one is too big to lend"
        );
        let reused = buffers.get(3 << 20, 5 << 20);
        assert_eq!(reused.capacity(), 4 << 20);
        assert!(buffers.idle.lock().unwrap().0.is_empty());
        buffers.give_back(Vec::with_capacity(KEEP_MIN - 1));
        assert!(
            buffers.idle.lock().unwrap().0.is_empty(),
            "small ones are not kept"
        );
    }

    #[test]
    fn buffers_of_a_new_size_push_out_the_oldest_idle_ones() {
        let buffers = Buffers::new(0, 0, Default::default());
        // A burst of 128 KiB downloads fills the idle list...
        for _ in 0..IDLE_MAX / (128 << 10) {
            buffers.give_back(Vec::with_capacity(128 << 10));
        }
        assert_eq!(buffers.idle().1, IDLE_MAX);
        // ...and a 1 MiB buffer given back afterwards is still kept for the next 1 MiB read.
        buffers.give_back(Vec::with_capacity(1 << 20));
        let idle_before = buffers.idle().0.len();
        let reused = buffers.get(1 << 20, 1 << 20);
        assert_eq!(reused.capacity(), 1 << 20);
        assert_eq!(
            buffers.idle().0.len(),
            idle_before - 1,
            "taken from the idle list"
        );
        assert!(buffers.idle().1 <= IDLE_MAX);
        // A buffer larger than the whole list is not kept.
        buffers.give_back(Vec::with_capacity(IDLE_MAX + 1));
        assert!(buffers.idle().0.iter().all(|b| b.capacity() <= IDLE_MAX));
    }

    #[test]
    fn one_client_address_holds_at_most_its_cap_of_shares() {
        let buffers = Buffers::new(64 * 1024 * 1024, 2, Default::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = buffers.take(Some(a), 1 << 20).expect("first");
        let a2 = buffers.take(Some(a), 1 << 20).expect("second");
        assert!(buffers.take(Some(a), 1 << 20).is_none(), "past the cap");
        assert_eq!(buffers.held_by(a), 2);
        // Another address, and downloads with no address, are not held back.
        let b1 = buffers.take(Some(b), 1 << 20).expect("another client");
        let none = buffers.take(None, 1 << 20).expect("no address");
        assert_eq!(buffers.budget_free(), 60 * 1024 * 1024);
        assert_eq!(
            buffers
                .metrics
                .storage_downloads_client_capped
                .load(Relaxed),
            1
        );
        drop(a1);
        assert_eq!(buffers.held_by(a), 1);
        let a3 = buffers.take(Some(a), 1 << 20).expect("a share came back");
        drop((a2, a3, b1, none));
        assert_eq!(buffers.held_by(a), 0);
        assert_eq!(buffers.holders.keys(), 0, "no entry is kept for nothing");
        assert_eq!(buffers.budget_free(), 64 * 1024 * 1024);
        // A spent budget does not count against the client.
        let small = Buffers::new(1 << 20, 2, Default::default());
        let held = small.take(Some(a), 1 << 20).expect("the whole budget");
        assert!(small.take(Some(a), 1 << 20).is_none());
        assert_eq!(small.held_by(a), 1);
        drop(held);
        assert_eq!(small.held_by(a), 0);
        // No cap.
        let uncapped = Buffers::new(8 << 20, 0, Default::default());
        let all: Vec<_> = (0..8).map(|_| uncapped.take(Some(a), 1 << 20)).collect();
        assert!(all.iter().all(Option::is_some));
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let buffers = Buffers::new(64 * 1024 * 1024, 1, Default::default());
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let _held = buffers.take(Some(a), 1 << 20).expect("first");
        assert!(buffers.take(Some(b), 1 << 20).is_none(), "the same /64");
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(buffers.take(Some(c), 1 << 20).is_some(), "another /64");
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let buffers = Buffers::new(0, 0, Default::default());
        assert!(
            buffers.take(None, 1).is_none(),
            "a zero budget lends nothing"
        );
        for _ in 0..(IDLE_MAX / (4 << 20)) + 3 {
            buffers.give_back(Vec::with_capacity(4 << 20));
        }
        let idle = buffers.idle.lock().unwrap();
        assert!(idle.1 <= IDLE_MAX && idle.1 == idle.0.iter().map(|b| b.capacity()).sum::<usize>());
    }
}
