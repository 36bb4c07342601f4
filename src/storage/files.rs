//! The files of a bucket: listed, given a download URL, deleted. A file is its row in the
//! control database (`crate::control::files`) and its object in the backend, under the key
//! `<projectId>/<bucketUuid>/<name>`; the API calls that key `s3_key` whatever the backend.

use chrono::{DateTime, Utc};

use super::{Bucket, Storage, StorageError, URL_TTL};
use crate::control;

pub use control::files::{FileRef, StoredFile};

/// A download URL of a file.
#[derive(Clone, Debug)]
pub struct SignedUrl {
    /// S3: a SigV4 pre-signed URL; local: `/api/storage/object?key&expires&signature`.
    pub url: String,
    pub expires_at: DateTime<Utc>,
    pub file: StoredFile,
}

/// A deleted file.
#[derive(Clone, Debug)]
pub struct DeletedFile {
    pub id: String,
    pub name: String,
    pub s3_key: String,
}

/// `<base>/api/storage/public/<key>`, each segment percent-encoded: stable for the object's
/// lifetime (the key holds the bucket's UUID, which a rename does not change).
pub fn public_url(base: &str, key: &str) -> String {
    let path: Vec<String> = key
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, super::names::PATH_SEGMENT).to_string())
        .collect();
    format!(
        "{}/api/storage/public/{}",
        base.trim_end_matches('/'),
        path.join("/")
    )
}

/// The project a key belongs to: its first segment.
pub fn project_of_key(key: &str) -> &str {
    key.split('/').next().unwrap_or_default()
}

pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The most files one listing answers (`limit` is clamped to it).
pub const MAX_LIST: usize = 10_000;

/// Which files a listing answers: names starting with `prefix`, after `after` (the last name of
/// the page before), at most `limit`.
pub struct FilePage {
    pub prefix: String,
    pub after: Option<String>,
    pub limit: usize,
}

impl Storage {
    /// The bucket named `id_or_name` and its listed files, by name.
    /// A page of a bucket's files in name order (see [`FilePage`]): the whole list of a large
    /// bucket is never held at once.
    pub async fn list_files(
        &self,
        project_id: &str,
        id_or_name: &str,
        page: &FilePage,
    ) -> Result<(Bucket, Vec<StoredFile>, bool), StorageError> {
        let bucket = self.find_bucket(project_id, id_or_name).await?;
        let client = self.control.get().await?;
        let limit = page.limit.clamp(1, MAX_LIST) as i64;
        let mut files = control::files::list_in_bucket(
            &client,
            &bucket.id,
            &page.prefix,
            page.after.as_deref(),
            limit,
        )
        .await?;
        let more = files.len() as i64 > limit;
        files.truncate(limit as usize);
        Ok((bucket, files, more))
    }

    /// A stored (listed) file of the project by its key.
    pub(super) async fn stored_file(
        &self,
        project_id: &str,
        s3_key: &str,
    ) -> Result<StoredFile, StorageError> {
        let client = self.control.get().await?;
        control::files::find_listed(&client, project_id, s3_key)
            .await?
            .ok_or_else(|| StorageError::NoSuchKey(s3_key.to_string()))
    }

    /// A download URL valid for [`URL_TTL`] (the guide's 15 minutes). The local backend's URLs
    /// point at `base` (this server as its caller reaches it).
    pub async fn signed_url(
        &self,
        project_id: &str,
        s3_key: &str,
        base: &str,
        grant: &super::signing::Grant,
    ) -> Result<SignedUrl, StorageError> {
        let file = self.stored_file(project_id, s3_key).await?;
        let now = self.clock.now();
        let expires_at = now + chrono::Duration::from_std(URL_TTL).expect("15 minutes");
        let url = match self.backend.presign_get(s3_key, URL_TTL).await {
            Some(url) => url?.to_string(),
            None => {
                let expires = expires_at.timestamp();
                let grant = grant.encode();
                let signature = self.signer.sign("GET", s3_key, expires, Some(&grant));
                let query = serde_urlencoded::to_string([
                    ("key", s3_key),
                    ("expires", &expires.to_string()),
                    ("grant", &grant),
                    ("signature", &signature),
                ])
                .map_err(anyhow::Error::from)?;
                format!("{base}/api/storage/object?{query}")
            }
        };
        Ok(SignedUrl {
            url,
            expires_at,
            file,
        })
    }

    /// Deletes a file named by its id (which wins) or its key: object and metadata, both or
    /// neither (see the module docs).
    pub async fn delete_file(
        &self,
        project_id: &str,
        file_id: Option<&str>,
        s3_key: Option<&str>,
    ) -> Result<DeletedFile, StorageError> {
        let file = match (file_id, s3_key) {
            (Some(id), _) => {
                if !is_uuid(id) {
                    return Err(StorageError::InvalidFileId);
                }
                FileRef::Id(id.to_ascii_lowercase())
            }
            (None, Some(key)) => FileRef::Key(key.to_string()),
            (None, None) => return Err(StorageError::NoFileNamed),
        };
        let client = self.control.get().await?;
        let Some(marked) = control::files::mark_deleting(&client, project_id, &file).await? else {
            return Err(
                if control::files::is_listed(&client, project_id, &file).await? {
                    StorageError::UploadInProgress
                } else {
                    StorageError::NoSuchFile(file.value().to_string())
                },
            );
        };
        // Hidden from now on: downloads read the row again (and find it marked).
        self.served.forget(&marked.s3_key);
        if let Err(e) = self.backend.delete(&marked.s3_key).await {
            // Both stay: lift the mark so the file is listed again.
            control::files::unmark_deleting(&client, &marked.id).await?;
            return Err(e);
        }
        control::files::delete(&client, &marked.id).await?;
        tracing::info!(project_id, file = %marked.id, key = %marked.s3_key, "file deleted");
        Ok(DeletedFile {
            id: marked.id,
            name: marked.name,
            s3_key: marked.s3_key,
        })
    }
}
