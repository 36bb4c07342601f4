//! `fluxbase.storage_files`: the index of the objects in the storage backend, one row per file
//! (how a row and its object stay in agreement: [`crate::storage`]). A row is *listed* once its
//! upload finished (`size IS NOT NULL`) and as long as no delete marked it (`deleting_at IS
//! NULL`); only listed rows are shown, signed or served.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::{Error, Row};

/// A file row, with its bucket's visibility.
#[derive(Clone, Debug)]
pub struct StoredFile {
    /// A UUID.
    pub id: String,
    /// The name inside its bucket (`/`-separated).
    pub name: String,
    /// `<projectId>/<bucketId>/<name>`: the object's key in the backend.
    pub s3_key: String,
    /// Bytes; `None` while the upload is unfinished (never for a listed file).
    pub size: Option<i64>,
    pub content_type: String,
    pub bucket_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Whether its bucket is public (the file then has a public URL).
    pub bucket_is_public: bool,
}

const COLUMNS: &str = "f.id::text, f.name, f.s3_key, f.size, f.content_type, \
     f.bucket_id::text, f.created_at, f.updated_at, b.is_public";

impl StoredFile {
    fn from_row(r: &Row) -> StoredFile {
        StoredFile {
            id: r.get(0),
            name: r.get(1),
            s3_key: r.get(2),
            size: r.get(3),
            content_type: r.get(4),
            bucket_id: r.get(5),
            created_at: r.get(6),
            updated_at: r.get(7),
            bucket_is_public: r.get(8),
        }
    }
}

/// The listed files of a bucket, by name.
/// A page of the bucket's listed files by name: those starting with `prefix`, after the name
/// `after`, at most `limit` (one more is read to tell whether the page is the last).
pub async fn list_in_bucket(
    client: &impl GenericClient,
    bucket_id: &str,
    prefix: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<StoredFile>, Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM fluxbase.storage_files f
                 JOIN fluxbase.storage_buckets b ON b.id = f.bucket_id
                 WHERE f.bucket_id = $1::text::uuid AND f.size IS NOT NULL
                   AND f.deleting_at IS NULL
                   AND left(f.name, length($2)) = $2
                   AND ($3::text IS NULL OR f.name > $3::text COLLATE \"C\")
                 ORDER BY f.name COLLATE \"C\"
                 LIMIT $4"
            ),
            &[&bucket_id, &prefix, &after, &(limit + 1)],
        )
        .await?;
    Ok(rows.iter().map(StoredFile::from_row).collect())
}

/// The project's listed file stored under `s3_key`.
pub async fn find_listed(
    client: &impl GenericClient,
    project_id: &str,
    s3_key: &str,
) -> Result<Option<StoredFile>, Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM fluxbase.storage_files f
             JOIN fluxbase.storage_buckets b ON b.id = f.bucket_id
             WHERE f.project_id = $1 AND f.s3_key = $2 AND f.size IS NOT NULL
               AND f.deleting_at IS NULL"
        ))
        .await?;
    let row = client
        .query_opt(&statement, &[&project_id, &s3_key])
        .await?;
    Ok(row.as_ref().map(StoredFile::from_row))
}

/// Every row of the bucket, listed or not (reservations and marked deletes count too).
pub async fn count_in_bucket(client: &impl GenericClient, bucket_id: &str) -> Result<i64, Error> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM fluxbase.storage_files WHERE bucket_id = $1::text::uuid",
            &[&bucket_id],
        )
        .await?
        .get(0))
}

/// How a delete names its file.
#[derive(Clone, Debug)]
pub enum FileRef {
    /// The file's UUID (lowercase).
    Id(String),
    /// Its `s3_key`.
    Key(String),
}

impl FileRef {
    fn column(&self) -> &'static str {
        match self {
            FileRef::Id(_) => "id::text",
            FileRef::Key(_) => "s3_key",
        }
    }

    /// The id or key as given.
    pub fn value(&self) -> &str {
        match self {
            FileRef::Id(v) | FileRef::Key(v) => v,
        }
    }
}

/// A file marked for deletion.
#[derive(Clone, Debug)]
pub struct Marked {
    pub id: String,
    pub s3_key: String,
    pub name: String,
}

/// Marks the project's listed file for deletion (it is hidden from then on), unless an upload
/// holds it; the marked file, or `None` when no such file is free to mark.
pub async fn mark_deleting(
    client: &impl GenericClient,
    project_id: &str,
    file: &FileRef,
) -> Result<Option<Marked>, Error> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE fluxbase.storage_files SET deleting_at = now()
                 WHERE project_id = $1 AND {} = $2 AND size IS NOT NULL
                   AND deleting_at IS NULL AND upload_token IS NULL
                 RETURNING id::text, s3_key, name",
                file.column()
            ),
            &[&project_id, &file.value()],
        )
        .await?;
    Ok(row.map(|r| Marked {
        id: r.get(0),
        s3_key: r.get(1),
        name: r.get(2),
    }))
}

/// Whether the project has the file listed (an upload may hold it).
pub async fn is_listed(
    client: &impl GenericClient,
    project_id: &str,
    file: &FileRef,
) -> Result<bool, Error> {
    let row = client
        .query_opt(
            &format!(
                "SELECT 1 FROM fluxbase.storage_files
                 WHERE project_id = $1 AND {} = $2 AND size IS NOT NULL
                   AND deleting_at IS NULL",
                file.column()
            ),
            &[&project_id, &file.value()],
        )
        .await?;
    Ok(row.is_some())
}

/// Lifts a deletion mark: the file is listed again.
pub async fn unmark_deleting(client: &impl GenericClient, id: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE fluxbase.storage_files SET deleting_at = NULL WHERE id = $1::text::uuid",
            &[&id],
        )
        .await?;
    Ok(())
}

pub async fn delete(client: &impl GenericClient, id: &str) -> Result<(), Error> {
    client
        .execute(
            "DELETE FROM fluxbase.storage_files WHERE id = $1::text::uuid",
            &[&id],
        )
        .await?;
    Ok(())
}

/// A reserved row.
#[derive(Clone, Debug)]
pub struct Reserved {
    pub id: String,
    /// The row is new (not an existing file an upsert replaces).
    pub new: bool,
}

/// An upload's reservation made by the bucket's id or name ([`reserve_in_bucket`]).
#[derive(Clone, Debug)]
pub struct BucketReservation<'a> {
    pub project_id: &'a str,
    /// The bucket's UUID or name (lowercase); a UUID wins.
    pub bucket: &'a str,
    pub name: &'a str,
    /// The stored type (lowercase, as `storage::names::normalize_content_type` makes it).
    pub content_type: &'a str,
    pub size: i64,
    pub staged: &'a str,
    pub token: &'a str,
}

/// What [`reserve_in_bucket`] found.
#[derive(Debug)]
pub enum BucketReserved {
    /// No such bucket in the project.
    NoBucket,
    /// The bucket refuses the file: its size (`size_ok` false) or its type.
    Refused {
        bucket: crate::control::buckets::Bucket,
        size_ok: bool,
    },
    /// The name is taken: without `upsert` by any file, with it by another upload or a
    /// delete holding the file.
    Taken(crate::control::buckets::Bucket),
    /// The name would be a file and a folder at once: `existing` (a file, reserved, listed or
    /// being deleted) is one of its folders, or is inside it.
    Conflict {
        bucket: crate::control::buckets::Bucket,
        existing: String,
    },
    /// Reserved; the file's key is `<projectId>/<bucketUuid>/<name>`.
    Reserved {
        bucket: crate::control::buckets::Bucket,
        reserved: Reserved,
        s3_key: String,
    },
}

/// Reserves the row of an upload (`size IS NULL` for a new file; an existing file keeps its
/// row, listed, with the token set), with what the file will be (`upload_size`,
/// `upload_content_type`) and where it is staged (`upload_staged`); the bucket is looked up
/// and its limits checked in the same statement: one round trip from a finished form to a
/// durable reservation, and nothing reserved when the bucket refuses the file.
///
/// The reservation is committed durably (its WAL flushed) before it returns, and the object
/// is moved into place only after that: so the listing ([`Listing`]) need not wait for its own WAL flush (a
/// crash that loses it leaves a reservation the start-up sweep finishes, [`pending`]). The
/// transaction is pipelined (one round trip): the three requests are sent before any answer
/// is read, and a failed statement turns the COMMIT into a rollback.
/// A name is a file or a folder, not both: the reservation is refused ([`BucketReserved::Conflict`])
/// when a row of the bucket, in any state, is one of its folders (index lookups of the
/// folders' names) or lies inside it (the first name of the range `<name>/`…`<name>0` in byte
/// order, on the index of control migration 0020: one index probe, 0.3–0.4 ms measured in a
/// bucket of 300,000 names all inside the name, where a scan of the bucket took 200–300 ms).
/// The bucket is a scalar subquery there, so that the planner reads the range in index order
/// and stops at its first row. The check
/// is race-free across processes: the statement before it takes the name's advisory locks
/// ([`lock_names`]), so of two uploads whose names clash the second one's check (a statement
/// of its own, so its snapshot is taken once the first has committed) sees the first one's row.
/// The bucket's type patterns are
/// matched as `storage::names::mime_allowed` does (`*/*`, `type/*` or the exact type, without
/// parameters, case-insensitive); `essence` is the stored type without parameters, `top` its
/// first half. A deleted bucket (deleted meanwhile) fails with `foreign_key_violation`.
pub async fn reserve_in_bucket(
    client: &deadpool_postgres::Client,
    r: &BucketReservation<'_>,
    upsert: bool,
) -> Result<BucketReserved, Error> {
    let on_conflict = if upsert {
        "ON CONFLICT (bucket_id, name) DO UPDATE
           SET upload_token = EXCLUDED.upload_token, upload_started_at = now(),
               upload_size = EXCLUDED.upload_size,
               upload_content_type = EXCLUDED.upload_content_type,
               upload_staged = EXCLUDED.upload_staged
           WHERE storage_files.upload_token IS NULL AND storage_files.deleting_at IS NULL"
    } else {
        "ON CONFLICT (bucket_id, name) DO NOTHING"
    };
    let lock = client.prepare_cached(LOCK_NAMES).await?;
    let insert = client
        .prepare_cached(&format!(
            "WITH b AS (
               SELECT id, name, is_public, max_file_size, allowed_mime_types, created_at,
                 (max_file_size IS NULL OR $6 <= max_file_size) AS size_ok,
                 (allowed_mime_types IS NULL OR EXISTS (
                    SELECT 1 FROM unnest(allowed_mime_types) AS a(p)
                    WHERE lower(btrim(p)) IN ('*/*', $8, $9 || '/*'))) AS type_ok
               FROM fluxbase.storage_buckets
               WHERE project_id = $1 AND (id::text = $2 OR name = $2)
               ORDER BY (id::text = $2) DESC LIMIT 1
             ), c AS (
               (SELECT x.name FROM fluxbase.storage_files x
                WHERE x.bucket_id = (SELECT id FROM b) AND x.name = ANY($10::text[]) LIMIT 1)
               UNION ALL
               (SELECT x.name FROM fluxbase.storage_files x
                WHERE x.bucket_id = (SELECT id FROM b) AND x.name COLLATE \"C\" >= $3 || '/'
                  AND x.name COLLATE \"C\" < $3 || '0'
                ORDER BY x.name COLLATE \"C\" LIMIT 1)
               LIMIT 1
             ), f AS (
               INSERT INTO fluxbase.storage_files
                 (project_id, bucket_id, name, s3_key, content_type, upload_token,
                  upload_started_at, upload_size, upload_content_type, upload_staged)
               SELECT $1, b.id, $3, $1 || '/' || b.id::text || '/' || $3, $4, $5, now(), $6, $4,
                      $7
               FROM b WHERE b.size_ok AND b.type_ok AND NOT EXISTS (SELECT 1 FROM c)
               {on_conflict}
               RETURNING id::text AS id, size IS NULL AS new, s3_key
             )
             SELECT b.id::text, b.name, b.is_public, b.max_file_size, b.allowed_mime_types,
                    b.created_at, b.size_ok, b.type_ok, f.id, f.new, f.s3_key,
                    (SELECT name FROM c)
             FROM b LEFT JOIN f ON true"
        ))
        .await?;
    let essence = r
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let top = essence.split('/').next().unwrap_or_default().to_string();
    let folders = crate::storage::names::folders_of(r.name);
    let (paths, exclusive) = lock_arguments(r.name);
    let pg: &tokio_postgres::Client = client;
    let (begun, locked, found, committed) = futures_util::future::join4(
        pg.batch_execute("BEGIN"),
        pg.execute(&lock, &[&r.project_id, &r.bucket, &paths, &exclusive]),
        pg.query_opt(
            &insert,
            &[
                &r.project_id,
                &r.bucket,
                &r.name,
                &r.content_type,
                &r.token,
                &r.size,
                &r.staged,
                &essence,
                &top,
                &folders,
            ],
        ),
        pg.batch_execute("COMMIT"),
    )
    .await;
    begun?;
    locked?;
    let row = found?;
    committed?;
    let Some(row) = row else {
        return Ok(BucketReserved::NoBucket);
    };
    let bucket = crate::control::buckets::Bucket::from_row(&row);
    let (size_ok, type_ok): (bool, bool) = (row.get(6), row.get(7));
    let id: Option<String> = row.get(8);
    let conflict: Option<String> = row.get(11);
    Ok(match (id, conflict) {
        _ if !size_ok || !type_ok => BucketReserved::Refused { bucket, size_ok },
        (None, Some(existing)) => BucketReserved::Conflict { bucket, existing },
        (None, None) => BucketReserved::Taken(bucket),
        (Some(id), _) => BucketReserved::Reserved {
            bucket,
            reserved: Reserved {
                id,
                new: row.get(9),
            },
            s3_key: row.get(10),
        },
    })
}

/// Takes the advisory locks of a reservation of `name` ([`crate::storage::names::name_locks`])
/// in the bucket `bucket` (UUID or name, as [`reserve_in_bucket`] finds it) of the project,
/// until the transaction ends. Keys are the bucket's UUID and the path hashed
/// (`hashtextextended`, single `bigint` keys as the other advisory locks of the control
/// database), taken in ascending order, each once, so two reservations never wait for each
/// other in a cycle. The bucket's row is locked `FOR KEY SHARE` (as the insert's foreign key
/// check does anyway), so the name that found it keeps meaning it until the transaction ends.
/// No bucket: nothing is locked.
const LOCK_NAMES: &str = "WITH b AS (
       SELECT id FROM fluxbase.storage_buckets
       WHERE project_id = $1 AND (id::text = $2 OR name = $2)
       ORDER BY (id::text = $2) DESC LIMIT 1
       FOR KEY SHARE)
     SELECT CASE WHEN l.x THEN pg_advisory_xact_lock(l.k)::text
                 ELSE pg_advisory_xact_lock_shared(l.k)::text END
     FROM (SELECT hashtextextended('fluxbase.storage_names:' || b.id::text || '/' || t.p, 0)
                    AS k,
                  bool_or(t.x) AS x
           FROM b, unnest($3::text[], $4::bool[]) AS t(p, x)
           GROUP BY 1 ORDER BY 1) l";

fn lock_arguments(name: &str) -> (Vec<&str>, Vec<bool>) {
    crate::storage::names::name_locks(name).into_iter().unzip()
}

/// Takes, in the transaction `tx`, the locks an upload of `name` takes before its
/// reservation's checks ([`LOCK_NAMES`]). Uploads take them themselves
/// ([`reserve_in_bucket`]); this is for tests and tools that write rows of their own.
pub async fn lock_names(
    tx: &impl GenericClient,
    project_id: &str,
    bucket: &str,
    name: &str,
) -> Result<(), Error> {
    let (paths, exclusive) = lock_arguments(name);
    tx.execute(LOCK_NAMES, &[&project_id, &bucket, &paths, &exclusive])
        .await?;
    Ok(())
}

/// A row of the bucket (in any state) in the way of a file named `name`: one of its folders,
/// or a name inside it (the reservation's own check, [`reserve_in_bucket`], read early and
/// without its locks: an upload whose name is taken as a folder is refused while its bytes
/// still arrive; the reservation's check stays the one that holds against concurrent uploads).
pub async fn in_the_way(
    client: &impl GenericClient,
    bucket_id: &str,
    name: &str,
) -> Result<Option<String>, Error> {
    let folders = crate::storage::names::folders_of(name);
    let row = client
        .query_opt(
            "(SELECT name FROM fluxbase.storage_files
              WHERE bucket_id = $1::text::uuid AND name = ANY($2::text[]) LIMIT 1)
             UNION ALL
             (SELECT name FROM fluxbase.storage_files
              WHERE bucket_id = $1::text::uuid AND name COLLATE \"C\" >= $3 || '/'
                AND name COLLATE \"C\" < $3 || '0'
              ORDER BY name COLLATE \"C\" LIMIT 1)
             LIMIT 1",
            &[&bucket_id, &folders, &name],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Gives a reservation up: a new row goes, an existing file keeps its row as it was.
pub async fn release(
    client: &impl GenericClient,
    reserved: &Reserved,
    token: &str,
) -> Result<(), Error> {
    let sql = if reserved.new {
        "DELETE FROM fluxbase.storage_files WHERE id = $1::text::uuid AND upload_token = $2"
    } else {
        "UPDATE fluxbase.storage_files SET upload_token = NULL, upload_started_at = NULL,
           upload_size = NULL, upload_content_type = NULL, upload_staged = NULL
         WHERE id = $1::text::uuid AND upload_token = $2"
    };
    client.execute(sql, &[&reserved.id, &token]).await?;
    Ok(())
}

/// Finishes a reservation: the reserved size and type are written and the file is listed, in
/// a transaction written while the object is moved into place ([`Listing::write`]) and
/// committed once the move is durable ([`Listing::end`]): only the COMMIT's round trip follows
/// the move (the update's own round trip and execution, ≈ 0.3 ms of a 1 MiB upload, ran after
/// it before). Nothing is listed before the object is durably in place, as before: readers do
/// not see the uncommitted row, and a concurrent reservation of the same name waits on its lock.
///
/// The commit does not wait for the WAL flush (`synchronous_commit = off`): the reservation,
/// durable already, carries everything it writes, and the object is durably in place before
/// the commit, so a crash that loses it leaves a reservation the start-up sweep finishes
/// ([`reserve_in_bucket`], [`pending`]).
///
/// Dropped with its transaction open (the upload's future dropped between the two), the
/// connection is closed rather than returned to the pool inside the transaction (PostgreSQL
/// rolls it back when it goes).
pub struct Listing {
    client: Option<deadpool_postgres::Client>,
    open: bool,
}

impl Listing {
    pub fn new(client: deadpool_postgres::Client) -> Self {
        Listing {
            client: Some(client),
            open: false,
        }
    }

    /// The pooled connection (not inside the listing's transaction unless [`Self::write`] ran
    /// and [`Self::end`] did not).
    pub fn client(&self) -> &deadpool_postgres::Client {
        self.client.as_ref().expect("held until dropped")
    }

    /// Begins the transaction and writes the listing, one round trip. `None` if the
    /// reservation is gone. A reservation the start-up sweep finished meanwhile ([`complete`];
    /// cluster mode: another node's restart) is recognised by its staging key and counts as
    /// finished. The transaction is open afterwards, whatever the outcome: [`Self::end`] it.
    pub async fn write(
        &mut self,
        id: &str,
        token: &str,
        staged: &str,
    ) -> Result<Option<StoredFile>, Error> {
        let client = self.client.as_ref().expect("held until dropped");
        let statement = client
            .prepare_cached(&format!(
                "WITH f AS (
                   UPDATE fluxbase.storage_files SET size = coalesce(upload_size, size),
                     content_type = coalesce(upload_content_type, content_type),
                     upload_token = NULL, upload_started_at = NULL, upload_size = NULL,
                     upload_content_type = NULL, upload_staged = NULL, updated_at = now()
                   WHERE id = $1::text::uuid AND upload_staged = $3
                     AND (upload_token = $2 OR upload_token IS NULL)
                   RETURNING *)
                 SELECT {COLUMNS} FROM f JOIN fluxbase.storage_buckets b ON b.id = f.bucket_id"
            ))
            .await?;
        let pg: &tokio_postgres::Client = client;
        self.open = true;
        let (begun, updated) = futures_util::future::join(
            pg.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
            pg.query_opt(&statement, &[&id, &token, &staged]),
        )
        .await;
        begun?;
        Ok(updated?.as_ref().map(StoredFile::from_row))
    }

    /// Commits (`commit`) or rolls back what [`Self::write`] wrote. A COMMIT after a failed
    /// statement rolls back: PostgreSQL says so without an error, so `commit` is only asked
    /// after a write that succeeded.
    pub async fn end(&mut self, commit: bool) -> Result<(), Error> {
        if !self.open {
            return Ok(());
        }
        let client = self.client.as_ref().expect("held until dropped");
        client
            .batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })
            .await?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        if self.open {
            if let Some(client) = self.client.take() {
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

/// A reservation whose upload had its object staged (see [`reserve_in_bucket`]): what the sweep needs
/// to tell whether its object was moved into place.
#[derive(Clone, Debug)]
pub struct Pending {
    pub id: String,
    pub s3_key: String,
    pub staged: String,
    pub size: i64,
}

/// Every held reservation with a staged object.
pub async fn pending(client: &impl GenericClient) -> Result<Vec<Pending>, Error> {
    let rows = client
        .query(
            "SELECT id::text, s3_key, upload_staged, upload_size FROM fluxbase.storage_files
             WHERE upload_token IS NOT NULL AND upload_staged IS NOT NULL
               AND upload_size IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Pending {
            id: r.get(0),
            s3_key: r.get(1),
            staged: r.get(2),
            size: r.get(3),
        })
        .collect())
}

/// Finishes a reservation whose object is in place (the sweep, after a crash lost its
/// listing, [`Listing`]): the reserved size and type are written and the file is listed. The staging key
/// stays, so that the upload's own listing (if it is still running, on another node) finds it
/// finished.
pub async fn complete(client: &impl GenericClient, id: &str, staged: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE fluxbase.storage_files SET size = upload_size,
               content_type = coalesce(upload_content_type, content_type),
               upload_token = NULL, upload_started_at = NULL, upload_size = NULL,
               upload_content_type = NULL, updated_at = now()
             WHERE id = $1::text::uuid AND upload_staged = $2 AND upload_token IS NOT NULL
               AND upload_size IS NOT NULL",
            &[&id, &staged],
        )
        .await?;
    Ok(())
}

/// Every file's key, whatever its state.
pub async fn all_keys(client: &impl GenericClient) -> Result<Vec<String>, Error> {
    let rows = client
        .query("SELECT s3_key FROM fluxbase.storage_files", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// (id, key) of the files marked for deletion.
pub async fn marked_for_deletion(
    client: &impl GenericClient,
) -> Result<Vec<(String, String)>, Error> {
    let rows = client
        .query(
            "SELECT id::text, s3_key FROM fluxbase.storage_files WHERE deleting_at IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// (id, key) of the new files whose upload started before `cutoff` and never finished.
pub async fn abandoned(
    client: &impl GenericClient,
    cutoff: DateTime<Utc>,
) -> Result<Vec<(String, String)>, Error> {
    let rows = client
        .query(
            "SELECT id::text, s3_key FROM fluxbase.storage_files
             WHERE size IS NULL AND upload_started_at < $1",
            &[&cutoff],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Removes an abandoned reservation (if it still is one).
pub async fn delete_abandoned(client: &impl GenericClient, id: &str) -> Result<(), Error> {
    client
        .execute(
            "DELETE FROM fluxbase.storage_files WHERE id = $1::text::uuid AND size IS NULL",
            &[&id],
        )
        .await?;
    Ok(())
}

/// Lifts the reservations of existing files that uploads took before `cutoff` and never
/// finished (the files stay as they were).
pub async fn release_abandoned(
    client: &impl GenericClient,
    cutoff: DateTime<Utc>,
) -> Result<(), Error> {
    client
        .execute(
            "UPDATE fluxbase.storage_files SET upload_token = NULL, upload_started_at = NULL
             WHERE upload_token IS NOT NULL AND upload_started_at < $1",
            &[&cutoff],
        )
        .await?;
    Ok(())
}
