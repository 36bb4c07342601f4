//! Binary log positions, the bus's [`Lsn`] they map to, and where they are stored.
//!
//! A position in a MySQL/MariaDB server's binary log is a file (`binlog.000042`) and a byte
//! offset in it. The bus, the realtime history and the webhook outbox order and acknowledge
//! events by a `u64` [`Lsn`]; a binlog position maps to one as
//!
//! ```text
//!   lsn = file sequence number (the file name's numeric suffix, 42) << 32 | byte offset
//! ```
//!
//! which sorts as the binlog does: files are numbered in the order the server writes them, and
//! an offset is below 4 GiB because the server starts a new file past `max_binlog_size`
//! (at most 1 GiB on both MySQL and MariaDB; a single transaction larger than that may overrun
//! it, up to the 4 GiB the event header's 32-bit `log_pos` can say). A transaction's commit
//! LSN and end LSN are both the position just after its terminating event (XID, `COMMIT`, or
//! the DDL statement itself): the position a restart resumes at once it is acknowledged.
//! Displayed the way PostgreSQL shows an LSN, `2A/1F3` reads "file 42, offset 0x1F3".

use fluxbase_replication::pgoutput::Lsn;

/// A position in the binary log: the next event to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinlogPosition {
    pub file: String,
    pub offset: u64,
}

impl std::fmt::Display for BinlogPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.offset)
    }
}

/// The numeric suffix of a binary log file name (`binlog.000042` → 42): the order in which
/// the server wrote the files. `None` for a name without one.
pub fn file_sequence(file: &str) -> Option<u32> {
    let (_, digits) = file.rsplit_once('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The file name of sequence `seq` in the naming of `like` (same base name, the same zero
/// padding, at least): `name_for_sequence("binlog.000042", 43)` is `binlog.000043`.
pub fn name_for_sequence(like: &str, seq: u32) -> Option<String> {
    let (base, digits) = like.rsplit_once('.')?;
    Some(format!("{base}.{seq:0width$}", width = digits.len()))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    #[error("binary log file name {0:?} has no numeric suffix")]
    NoSequence(String),
    #[error("binary log offset {0} is not below 4 GiB")]
    OffsetTooLarge(u64),
}

/// The LSN of a position (see the module docs).
pub fn to_lsn(file: &str, offset: u64) -> Result<Lsn, PositionError> {
    let seq = file_sequence(file).ok_or_else(|| PositionError::NoSequence(file.to_string()))?;
    lsn_of(seq, offset)
}

/// The LSN of offset `offset` in the file numbered `seq`.
pub fn lsn_of(seq: u32, offset: u64) -> Result<Lsn, PositionError> {
    if offset > u64::from(u32::MAX) {
        return Err(PositionError::OffsetTooLarge(offset));
    }
    Ok(Lsn((u64::from(seq) << 32) | offset))
}

/// The position an LSN names, given any file name of the same log (for its base name).
pub fn from_lsn(lsn: Lsn, like: &str) -> Option<BinlogPosition> {
    let seq = (lsn.0 >> 32) as u32;
    Some(BinlogPosition {
        file: name_for_sequence(like, seq)?,
        offset: lsn.0 & 0xFFFF_FFFF,
    })
}

/// What the control database holds for a project (`fluxbase.binlog_positions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub position: BinlogPosition,
    pub gtid: Option<String>,
}

/// The project's stored position, if it has one.
pub async fn load(
    db: &impl tokio_postgres::GenericClient,
    project_id: &str,
) -> Result<Option<Stored>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "SELECT binlog_file, binlog_offset, gtid FROM fluxbase.binlog_positions
             WHERE project_id = $1",
            &[&project_id],
        )
        .await?;
    Ok(row.map(|r| Stored {
        position: BinlogPosition {
            file: r.get(0),
            offset: r.get::<_, i64>(1) as u64,
        },
        gtid: r.get(2),
    }))
}

/// The dump the project's stream opened last, by any process or node: (connection id, start
/// time of the MySQL server run that gave it), control migration 0019.
pub async fn load_dump(
    db: &impl tokio_postgres::GenericClient,
    project_id: &str,
) -> Result<Option<(u32, i64)>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "SELECT dump_connection, dump_server_start FROM fluxbase.binlog_positions
             WHERE project_id = $1",
            &[&project_id],
        )
        .await?;
    Ok(row.and_then(|r| {
        let id: Option<i64> = r.get(0);
        let start: Option<i64> = r.get(1);
        Some((u32::try_from(id?).ok()?, start?))
    }))
}

/// Records the dump the project's stream just opened (see [`load_dump`]).
pub async fn save_dump(
    db: &impl tokio_postgres::GenericClient,
    project_id: &str,
    connection: u32,
    server_start: i64,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "UPDATE fluxbase.binlog_positions SET dump_connection = $2, dump_server_start = $3
         WHERE project_id = $1",
        &[&project_id, &i64::from(connection), &server_start],
    )
    .await?;
    Ok(())
}

/// Records where the project's stream resumes. Never moves it backwards (a stale writer, e.g.
/// an earlier stream of the project still finishing, loses): names of one log compare by length
/// first (`binlog.1000000` follows `binlog.999999`), then as text, then by offset.
pub async fn save(
    db: &impl tokio_postgres::GenericClient,
    project_id: &str,
    stored: &Stored,
) -> Result<(), tokio_postgres::Error> {
    let offset = stored.position.offset as i64;
    db.execute(
        "INSERT INTO fluxbase.binlog_positions AS p (project_id, binlog_file, binlog_offset, gtid)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (project_id) DO UPDATE
            SET binlog_file = EXCLUDED.binlog_file, binlog_offset = EXCLUDED.binlog_offset,
                gtid = COALESCE(EXCLUDED.gtid, p.gtid), updated_at = now()
          WHERE (length(p.binlog_file), p.binlog_file, p.binlog_offset)
              < (length(EXCLUDED.binlog_file), EXCLUDED.binlog_file, EXCLUDED.binlog_offset)",
        &[&project_id, &stored.position.file, &offset, &stored.gtid],
    )
    .await?;
    Ok(())
}

/// Records a first position for a project that has none (the server's current end of log, read
/// when the project is created, so that nothing after its creation is missed). An existing one
/// is kept.
pub async fn init(
    db: &impl tokio_postgres::GenericClient,
    project_id: &str,
    position: &BinlogPosition,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "INSERT INTO fluxbase.binlog_positions (project_id, binlog_file, binlog_offset)
         VALUES ($1, $2, $3) ON CONFLICT (project_id) DO NOTHING",
        &[&project_id, &position.file, &(position.offset as i64)],
    )
    .await?;
    Ok(())
}

/// The control database's advisory lock (transaction level, across processes) between
/// recording a first position and a binlog purge ([`crate::mysql::retention::purge`]): a first
/// position is read from the server and stored under it, and a purge lists the server's files
/// and the stored positions under it, so a purge either sees the new position or ran before it
/// was read. Without it, a rotation and a purge between the read and the store could remove
/// the file the new project starts in.
pub const POSITIONS_LOCK: i64 = 7_245_003;

/// Takes [`POSITIONS_LOCK`] until the end of `tx`'s transaction.
pub async fn lock(tx: &impl tokio_postgres::GenericClient) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&POSITIONS_LOCK])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sequences_are_the_numeric_suffix() {
        assert_eq!(file_sequence("binlog.000042"), Some(42));
        assert_eq!(file_sequence("mysql-bin.1000000"), Some(1_000_000));
        assert_eq!(file_sequence("/var/log/mysql/host-bin.000001"), Some(1));
        assert_eq!(file_sequence("binlog"), None);
        assert_eq!(file_sequence("binlog."), None);
        assert_eq!(file_sequence("binlog.00a1"), None);
        assert_eq!(file_sequence("binlog.99999999999"), None);
    }

    #[test]
    fn positions_map_to_lsns_that_sort_as_the_log_does() {
        let a = to_lsn("binlog.000001", 4).unwrap();
        let b = to_lsn("binlog.000001", 0xFFFF_FFFF).unwrap();
        let c = to_lsn("binlog.000002", 4).unwrap();
        let d = to_lsn("binlog.1000000", 4).unwrap();
        assert!(a < b && b < c && c < d);
        assert_eq!(a, Lsn((1 << 32) | 4));
        assert_eq!(c.to_string(), "2/4");
        assert_eq!(
            to_lsn("binlog.000001", 1 << 32),
            Err(PositionError::OffsetTooLarge(1 << 32))
        );
        assert!(matches!(
            to_lsn("binlog", 4),
            Err(PositionError::NoSequence(_))
        ));
    }

    #[test]
    fn lsns_map_back_to_positions_in_the_same_naming() {
        for (file, offset) in [
            ("binlog.000007", 4u64),
            ("binlog.000007", 123_456),
            ("mysql-bin.999999", 0xFFFF_FFFF),
            ("mysql-bin.1000000", 99),
        ] {
            let lsn = to_lsn(file, offset).unwrap();
            let back = from_lsn(lsn, "binlog.000001").unwrap();
            assert_eq!(back.offset, offset);
            assert_eq!(file_sequence(&back.file), file_sequence(file));
        }
        assert_eq!(
            from_lsn(to_lsn("binlog.000012", 9).unwrap(), "binlog.000003").unwrap(),
            BinlogPosition {
                file: "binlog.000012".into(),
                offset: 9
            }
        );
        assert_eq!(
            name_for_sequence("binlog.000999", 1000).unwrap(),
            "binlog.001000"
        );
        assert_eq!(
            name_for_sequence("binlog.999999", 1_000_000).unwrap(),
            "binlog.1000000"
        );
    }
}
