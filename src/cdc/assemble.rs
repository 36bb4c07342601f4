//! Transaction assembly: changes are held per transaction until its commit, then released
//! together in commit order; an aborted transaction (or subtransaction) releases nothing.
//!
//! PostgreSQL sends a small transaction whole between Begin and Commit. One larger than
//! `logical_decoding_work_mem` arrives streamed: chunks between Stream Start and Stream Stop,
//! interleaved with other transactions, each change tagged with its (sub)transaction id, and
//! finally Stream Commit or Stream Abort. Each open transaction has a [`TxBuffer`] that keeps
//! changes in memory up to a bound and spills the rest to a file, so a transaction of any size
//! passes through in bounded memory. The spill file is written in [`super::blocking`]: a
//! tenant's large transaction must not keep the worker other projects' streams run on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Lines, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fluxbase_replication::pgoutput::{
    LogicalReplicationMessage as M, Lsn, PgTimestamp, Relation, Xid,
};
use fluxbase_replication::values::TypeRegistry;

use super::events::{self, Pending};

/// A change held in memory, with the subtransaction that made it.
type Entry = (Option<Xid>, Pending);

/// Lists of changes kept for the next transactions, by every stream of the process together:
/// at most this many (about 3 MiB).
const SPARE_LISTS: usize = 4;
/// A list is kept only while it has room for at most this many changes (about 0.7 MiB of
/// entries): a transaction's list grew to its size change by change, and a stream that made a
/// new one per transaction spent ≈ 9 % of its thread growing it and faulting in fresh pages
/// (the allocator had returned the last one's); one past this size goes back to the allocator.
const SPARE_MAX_ENTRIES: usize = 4096;

/// Emptied change lists, kept with their room for the next transactions of any stream
/// ([`SPARE_LISTS`]): process-wide, so that idle projects' streams keep none of their own.
static SPARES: Mutex<Vec<VecDeque<Entry>>> = Mutex::new(Vec::new());

/// What the transaction buffers of one stream share.
pub(crate) struct Shared {
    /// Bytes (as counted against the bound) spilled to disk, by every buffer of the stream.
    spilled_bytes: AtomicU64,
    /// Where emptied lists are kept: [`SPARES`] (a test gives its own).
    spares: &'static Mutex<Vec<VecDeque<Entry>>>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            spilled_bytes: AtomicU64::new(0),
            spares: &SPARES,
        }
    }
}

impl Shared {
    fn take_list(&self) -> VecDeque<Entry> {
        self.spares
            .lock()
            .expect("poisoned")
            .pop()
            .unwrap_or_default()
    }

    fn give_list(&self, mut list: VecDeque<Entry>) {
        if list.capacity() == 0 || list.capacity() > SPARE_MAX_ENTRIES {
            return;
        }
        list.clear();
        let mut spares = self.spares.lock().expect("poisoned");
        if spares.len() < SPARE_LISTS {
            spares.push(list);
        }
    }

    /// Bytes (as counted against the bound) spilled to disk so far.
    pub(crate) fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes.load(Ordering::Relaxed)
    }
}

/// The changes of one open transaction.
pub struct TxBuffer {
    mem: VecDeque<Entry>,
    mem_bytes: usize,
    bound: usize,
    spill_dir: PathBuf,
    spill: Option<(PathBuf, BufWriter<File>)>,
    spilled: usize,
    shared: Arc<Shared>,
    aborted: HashSet<Xid>,
}

impl TxBuffer {
    pub(crate) fn new(bound: usize, spill_dir: &Path, shared: &Arc<Shared>) -> TxBuffer {
        TxBuffer {
            mem: shared.take_list(),
            mem_bytes: 0,
            bound,
            spill_dir: spill_dir.to_path_buf(),
            spill: None,
            spilled: 0,
            shared: shared.clone(),
            aborted: HashSet::new(),
        }
    }

    pub(crate) fn push(&mut self, subxid: Option<Xid>, p: Pending) -> std::io::Result<()> {
        self.mem_bytes += p.size();
        self.mem.push_back((subxid, p));
        if self.mem_bytes > self.bound {
            // Up to the bound's worth of JSON written at once: file I/O off the streams' worker.
            super::blocking(|| self.spill_mem())?;
        }
        Ok(())
    }

    /// True when part of the transaction is on disk.
    pub fn is_spilled(&self) -> bool {
        self.spill.is_some()
    }

    fn spill_mem(&mut self) -> std::io::Result<()> {
        if self.spill.is_none() {
            // Row data: only the server's user may read it (directory 0700, file 0600).
            crate::secrets::create_private_dir(&self.spill_dir)?;
            let path = self
                .spill_dir
                .join(format!("tx-{}.jsonl", crate::secrets::random_hex::<8>()));
            use std::os::unix::fs::OpenOptionsExt;
            let file = File::options()
                .create_new(true)
                .write(true)
                .read(true)
                .mode(0o600)
                .open(&path)?;
            tracing::debug!(path = %path.display(), "spilling a large transaction to disk");
            self.spill = Some((path, BufWriter::with_capacity(1 << 20, file)));
        }
        let (_, writer) = self.spill.as_mut().expect("just opened");
        for entry in self.mem.drain(..) {
            serde_json::to_writer(&mut *writer, &entry)?;
            writer.write_all(b"\n")?;
            self.spilled += 1;
        }
        self.shared
            .spilled_bytes
            .fetch_add(self.mem_bytes as u64, Ordering::Relaxed);
        self.mem_bytes = 0;
        Ok(())
    }

    fn abort_subtransaction(&mut self, subxid: Xid) {
        self.aborted.insert(subxid);
        self.mem.retain(|(x, _)| *x != Some(subxid));
    }

    /// Bytes held in memory now.
    pub fn memory(&self) -> usize {
        self.mem_bytes
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty() && self.spilled == 0
    }

    /// The transaction's changes in order, read back from disk first when it spilled.
    pub fn drain(mut self) -> std::io::Result<Drain> {
        let disk = match self.spill.take() {
            Some((path, mut writer)) => {
                writer.flush()?;
                drop(writer);
                let reader = BufReader::with_capacity(1 << 20, File::open(&path)?);
                // The file stays readable through the open handle; the name goes now.
                let _ = std::fs::remove_file(&path);
                Some(reader.lines())
            }
            None => None,
        };
        Ok(Drain {
            disk,
            mem: std::mem::take(&mut self.mem),
            aborted: std::mem::take(&mut self.aborted),
            shared: self.shared.clone(),
        })
    }
}

/// A committed transaction's changes in order ([`TxBuffer::drain`]); its list goes back to the
/// stream's spares when dropped.
pub struct Drain {
    disk: Option<Lines<BufReader<File>>>,
    mem: VecDeque<Entry>,
    aborted: HashSet<Xid>,
    shared: Arc<Shared>,
}

impl Drain {
    fn aborted(&self, subxid: Option<Xid>) -> bool {
        subxid.is_some_and(|x| self.aborted.contains(&x))
    }
}

impl Iterator for Drain {
    type Item = std::io::Result<Pending>;

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(lines) = &mut self.disk {
            match lines.next() {
                Some(Ok(line)) => match serde_json::from_str::<Entry>(&line) {
                    Ok((x, p)) if !self.aborted(x) => return Some(Ok(p)),
                    Ok(_) => {}
                    Err(e) => return Some(Err(std::io::Error::other(e))),
                },
                Some(Err(e)) => return Some(Err(e)),
                None => self.disk = None,
            }
        }
        while let Some((x, p)) = self.mem.pop_front() {
            if !self.aborted(x) {
                return Some(Ok(p));
            }
        }
        None
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.shared.give_list(std::mem::take(&mut self.mem));
    }
}

impl Drop for TxBuffer {
    fn drop(&mut self) {
        if let Some((path, _)) = self.spill.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A transaction that committed, ready to be released.
pub struct Committed {
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_timestamp: PgTimestamp,
    pub changes: TxBuffer,
}

struct OpenTx {
    commit_timestamp: PgTimestamp,
    buf: TxBuffer,
}

/// Follows the pgoutput message sequence of one replication connection.
pub struct Assembler {
    relations: HashMap<u32, events::Table>,
    current: Option<OpenTx>,
    streams: HashMap<Xid, TxBuffer>,
    stream_xid: Option<Xid>,
    bound: usize,
    spill_dir: PathBuf,
    /// Most bytes ever held in memory at once by open transactions.
    peak: usize,
    /// What the transaction buffers share: bytes spilled to disk so far, spare lists.
    shared: Arc<Shared>,
    /// The key of the tags the server's own `fluxbase.*` messages carry (see
    /// [`super::message_key`]); without one, every such message is dropped.
    message_key: Option<ring::hmac::Key>,
    /// `fluxbase.*` messages dropped: no valid tag (not emitted by the server), not
    /// transactional, or unreadable.
    rejected: u64,
    /// Bytes of one row image an event carries (`cdc_max_row_bytes`; 0: no bound).
    max_row_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("{0} for relation {1} that was never described")]
    UnknownRelation(&'static str, u32),
    #[error("{0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("spilling a transaction: {0}")]
    Spill(#[from] std::io::Error),
}

impl Assembler {
    pub fn new(bound: usize, spill_dir: &Path) -> Assembler {
        Assembler {
            relations: HashMap::new(),
            current: None,
            streams: HashMap::new(),
            stream_xid: None,
            bound,
            spill_dir: spill_dir.to_path_buf(),
            peak: 0,
            shared: Arc::default(),
            message_key: None,
            rejected: 0,
            max_row_bytes: 0,
        }
    }

    /// Leaves the largest values out of row images past `bytes` (0: no bound; see
    /// [`events::largest_until_within`]).
    pub fn with_max_row_bytes(mut self, bytes: usize) -> Assembler {
        self.max_row_bytes = bytes;
        self
    }

    /// Accepts `fluxbase.*` messages tagged under `key` (and only those).
    pub fn with_message_key(mut self, key: &[u8]) -> Assembler {
        self.message_key = Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key));
        self
    }

    /// `fluxbase.*` messages dropped so far.
    pub fn rejected_messages(&self) -> u64 {
        self.rejected
    }

    /// The body of a message the server emitted: `hex(HMAC(key, prefix || "\n" || body))`
    /// followed by the body; `None` for anything else.
    fn authentic<'a>(&self, prefix: &str, content: &'a [u8]) -> Option<&'a [u8]> {
        let key = self.message_key.as_ref()?;
        if content.len() < 64 {
            return None;
        }
        let (tag_hex, body) = content.split_at(64);
        let tag = hex::decode(tag_hex).ok()?;
        let mut signed = Vec::with_capacity(prefix.len() + 1 + body.len());
        signed.extend_from_slice(prefix.as_bytes());
        signed.push(b'\n');
        signed.extend_from_slice(body);
        ring::hmac::verify(key, &signed, &tag).ok()?;
        Some(body)
    }

    /// Most bytes held in memory at once so far.
    pub fn peak_memory(&self) -> usize {
        self.peak
    }

    /// Bytes of changes (as counted against the bound) spilled to disk so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.shared.spilled_bytes()
    }

    /// True when no transaction is open: everything received has been released.
    pub fn idle(&self) -> bool {
        self.current.is_none() && self.streams.is_empty()
    }

    /// Bytes of changes held in memory across open transactions.
    pub fn memory(&self) -> usize {
        self.current.as_ref().map_or(0, |t| t.buf.memory())
            + self.streams.values().map(TxBuffer::memory).sum::<usize>()
    }

    pub fn relation(&self, id: u32) -> Option<&Relation> {
        self.relations.get(&id).map(|t| &t.rel)
    }

    fn buffer(&mut self, what: &'static str) -> Result<&mut TxBuffer, AssembleError> {
        match self.stream_xid {
            Some(xid) => Ok(self
                .streams
                .entry(xid)
                .or_insert_with(|| TxBuffer::new(self.bound, &self.spill_dir, &self.shared))),
            None => self
                .current
                .as_mut()
                .map(|t| &mut t.buf)
                .ok_or(AssembleError::OutsideTransaction(what)),
        }
    }

    fn rel(&self, id: u32, what: &'static str) -> Result<&events::Table, AssembleError> {
        self.relations
            .get(&id)
            .ok_or(AssembleError::UnknownRelation(what, id))
    }

    /// Feeds one message; returns a transaction when this message committed one.
    pub fn handle(
        &mut self,
        msg: M,
        reg: &TypeRegistry,
    ) -> Result<Option<Committed>, AssembleError> {
        let committed = self.apply(msg, reg)?;
        self.peak = self.peak.max(self.memory());
        Ok(committed)
    }

    fn apply(&mut self, msg: M, reg: &TypeRegistry) -> Result<Option<Committed>, AssembleError> {
        match msg {
            M::Begin(b) => {
                self.current = Some(OpenTx {
                    commit_timestamp: b.commit_timestamp,
                    buf: TxBuffer::new(self.bound, &self.spill_dir, &self.shared),
                });
            }
            M::Commit(c) => {
                let tx = self
                    .current
                    .take()
                    .ok_or(AssembleError::OutsideTransaction("Commit"))?;
                return Ok(Some(Committed {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_timestamp: tx.commit_timestamp,
                    changes: tx.buf,
                }));
            }
            M::Relation(r) => {
                self.relations.insert(r.id, events::Table::new(r, reg));
            }
            M::Insert(i) => {
                let cap = self.max_row_bytes;
                let p = events::insert(self.rel(i.relation_id, "Insert")?, &i.new, reg, cap);
                self.buffer("Insert")?.push(i.xid, p)?;
            }
            M::Update(u) => {
                let p = events::update(
                    self.rel(u.relation_id, "Update")?,
                    u.old.as_ref(),
                    &u.new,
                    reg,
                    self.max_row_bytes,
                );
                self.buffer("Update")?.push(u.xid, p)?;
            }
            M::Delete(d) => {
                let cap = self.max_row_bytes;
                let p = events::delete(self.rel(d.relation_id, "Delete")?, &d.old, reg, cap);
                self.buffer("Delete")?.push(d.xid, p)?;
            }
            M::Truncate(t) => {
                let mut pending = Vec::new();
                for id in &t.relation_ids {
                    pending.push(events::truncate(&self.rel(*id, "Truncate")?.rel));
                }
                let buf = self.buffer("Truncate")?;
                for p in pending {
                    buf.push(t.xid, p)?;
                }
            }
            // Only the server's own emitters may speak for Fluxbase: anything else with the
            // prefix (pg_logical_emit_message from a session that still may call it) is dropped.
            M::Message(m) if m.prefix.starts_with("fluxbase.") => {
                let body = if m.transactional {
                    self.authentic(&m.prefix, &m.content)
                } else {
                    None
                };
                let pending = match (m.prefix.as_str(), body) {
                    ("fluxbase.ddl", Some(body)) => events::ddl(body),
                    ("fluxbase.broadcast", Some(body)) => events::broadcast(body),
                    ("fluxbase.truncate", Some(body)) => events::partition_truncate(body),
                    _ => None,
                };
                match pending {
                    Some(p) => self.buffer("Message")?.push(m.xid, p)?,
                    None => {
                        self.rejected += 1;
                        tracing::debug!(prefix = %m.prefix, lsn = %m.lsn, "dropped a message the server did not emit");
                    }
                }
            }
            M::StreamStart(s) => self.stream_xid = Some(s.xid),
            M::StreamStop => self.stream_xid = None,
            M::StreamCommit(c) => {
                let buf = self
                    .streams
                    .remove(&c.xid)
                    .unwrap_or_else(|| TxBuffer::new(self.bound, &self.spill_dir, &self.shared));
                return Ok(Some(Committed {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_timestamp: c.commit_timestamp,
                    changes: buf,
                }));
            }
            M::StreamAbort(a) => {
                if a.xid == a.subtransaction_xid {
                    self.streams.remove(&a.xid);
                } else if let Some(buf) = self.streams.get_mut(&a.xid) {
                    buf.abort_subtransaction(a.subtransaction_xid);
                }
            }
            // Origins, types (the catalog is read directly), other messages, two-phase.
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(n: usize) -> Pending {
        Pending::Broadcast {
            event: format!("e{n}"),
            payload: "{}".to_string(),
        }
    }

    fn names(drain: Drain) -> Vec<String> {
        drain
            .map(|p| match p.expect("read back") {
                Pending::Broadcast { event, .. } => event,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// A released transaction's list of changes is kept, emptied, for the next transaction (no
    /// growing and no fresh pages per transaction), at most [`SPARE_LISTS`] of them (by every
    /// stream together) and none
    /// past [`SPARE_MAX_ENTRIES`]; what a buffer gives back never leaks into the next one's
    /// changes, spilled, aborted or dropped half-read.
    #[test]
    fn released_change_lists_are_kept_for_the_next_transactions_within_bounds() {
        let dir =
            std::env::temp_dir().join(format!("fx-assemble-{}", crate::secrets::random_hex::<8>()));
        // A pool of its own: other tests' streams use the process's.
        let pool: &'static Mutex<Vec<VecDeque<Entry>>> = Box::leak(Box::default());
        let shared = Arc::new(Shared {
            spilled_bytes: AtomicU64::new(0),
            spares: pool,
        });
        let mut first = TxBuffer::new(usize::MAX, &dir, &shared);
        for n in 0..100 {
            first.push(None, change(n)).expect("push");
        }
        let room = first.mem.capacity();
        assert!(room >= 100);
        let expected: Vec<String> = (0..100).map(|n| format!("e{n}")).collect();
        assert_eq!(names(first.drain().expect("drain")), expected);

        let mut second = TxBuffer::new(usize::MAX, &dir, &shared);
        assert!(second.mem.is_empty());
        assert_eq!(second.mem.capacity(), room, "the first one's list, kept");
        assert!(pool.lock().unwrap().is_empty());
        // Aborted subtransaction, then read only in part: the rest is dropped with the list.
        second.push(Some(7), change(1)).unwrap();
        second.push(None, change(2)).unwrap();
        second.push(None, change(3)).unwrap();
        second.abort_subtransaction(7);
        let mut drain = second.drain().unwrap();
        assert_eq!(names_one(&mut drain), "e2");
        drop(drain);
        let third = TxBuffer::new(usize::MAX, &dir, &shared);
        assert!(third.mem.is_empty(), "nothing of the half-read one left");
        assert_eq!(third.mem.capacity(), room);

        // Spilled: the disk's part first, then memory's, and the list still comes back.
        let mut spilled = TxBuffer::new(200, &dir, &shared);
        for n in 0..10 {
            spilled.push(None, change(n)).unwrap();
        }
        assert!(spilled.is_spilled());
        assert_eq!(
            names(spilled.drain().unwrap()),
            (0..10).map(|n| format!("e{n}")).collect::<Vec<_>>()
        );
        assert!(shared.spilled_bytes() > 0);

        // A list past the bound goes back to the allocator; at most SPARE_LISTS are kept.
        let mut large = TxBuffer::new(usize::MAX, &dir, &shared);
        for n in 0..=SPARE_MAX_ENTRIES {
            large.push(None, change(n)).unwrap();
        }
        let kept_before = pool.lock().unwrap().len();
        drop(large.drain().unwrap());
        assert_eq!(pool.lock().unwrap().len(), kept_before);
        let lists: Vec<TxBuffer> = (0..4)
            .map(|_| {
                let mut b = TxBuffer::new(usize::MAX, &dir, &shared);
                b.push(None, change(0)).unwrap();
                b
            })
            .collect();
        for b in lists {
            drop(b.drain().unwrap());
        }
        assert_eq!(pool.lock().unwrap().len(), SPARE_LISTS);
        drop(third);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn names_one(drain: &mut Drain) -> String {
        match drain.next().expect("one").expect("read") {
            Pending::Broadcast { event, .. } => event,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn tagged(key: &[u8], prefix: &str, body: &str) -> Vec<u8> {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let tag = ring::hmac::sign(&k, format!("{prefix}\n{body}").as_bytes());
        [
            hex::encode(tag.as_ref()).into_bytes(),
            body.as_bytes().to_vec(),
        ]
        .concat()
    }

    #[test]
    fn only_messages_tagged_under_the_key_for_their_prefix_are_authentic() {
        let key = [7u8; 32];
        let dir = std::env::temp_dir();
        let asm = Assembler::new(1024, &dir).with_message_key(&key);
        let body = r#"{"event":"e","payload":{}}"#;
        let good = tagged(&key, "fluxbase.broadcast", body);
        assert_eq!(
            asm.authentic("fluxbase.broadcast", &good),
            Some(body.as_bytes())
        );
        // The same tag does not carry over to another prefix, another body or another key.
        assert_eq!(asm.authentic("fluxbase.ddl", &good), None);
        let mut altered = good.clone();
        *altered.last_mut().unwrap() = b']';
        assert_eq!(asm.authentic("fluxbase.broadcast", &altered), None);
        let other = tagged(&[8u8; 32], "fluxbase.broadcast", body);
        assert_eq!(asm.authentic("fluxbase.broadcast", &other), None);
        // Untagged, short, or no key at all.
        assert_eq!(asm.authentic("fluxbase.broadcast", body.as_bytes()), None);
        assert_eq!(asm.authentic("fluxbase.broadcast", b"abc"), None);
        let keyless = Assembler::new(1024, &dir);
        assert_eq!(keyless.authentic("fluxbase.broadcast", &good), None);
    }
}
