//! What a file's URLs serve: a signed URL of the local backend (`/api/storage/object`: the
//! signature is the grant, no credential) and the public URL of a file in a public bucket
//! (`/api/storage/public/<key>`). S3's pre-signed URLs are served by S3 itself.
//!
//! Both answer "File not found." alike for a file that is missing, unlisted or private, so a
//! public URL reveals nothing about private files. The object streams from the backend; the
//! API layer turns a [`Download`] into the response (headers from its metadata, no body for
//! `HEAD`).

use super::backend::ObjectBody;
use super::files::project_of_key;
use super::served::Served;
use super::signing::Grant;
use super::{names, Storage, StorageError};

/// A file to serve: what the response says about it, and its bytes.
pub struct Download {
    /// The file's name in its bucket.
    pub name: String,
    pub content_type: String,
    /// The body's bytes (all of the file, its range, or none); the body is exactly this long
    /// (a shorter object cuts the stream off with an error).
    pub size: u64,
    /// The file's bytes.
    pub total: u64,
    /// Whole, a part, not modified or an unsatisfiable range ([`super::ranges`]).
    pub outcome: super::ranges::Outcome,
    pub validators: super::ranges::Validators,
    /// The file's bucket is public (the response may then be cached by anyone).
    pub public: bool,
    /// All of a small local file, else a stream.
    pub body: ObjectBody,
}

impl Download {
    /// How a browser is to treat it: inline only for types that run nothing
    /// ([`names::content_disposition`]).
    pub fn content_disposition(&self) -> String {
        names::content_disposition(&self.name, &self.content_type)
    }
}

impl Storage {
    /// Checks a local signed URL: its signature, then its expiry ([`super::signing`]). Returns
    /// whom it was signed for (none: a URL signed before grants existed, or a grant this
    /// version cannot read), for the caller to check that they still have access.
    pub fn verify_signed(
        &self,
        key: &str,
        expires: &str,
        grant: Option<&str>,
        signature: &str,
    ) -> Result<Option<Grant>, StorageError> {
        self.signer
            .verify("GET", key, expires, grant, signature, self.clock.now())?;
        Ok(grant.and_then(Grant::decode))
    }

    /// The grant of a URL signed for an API key whose secret hashes to `key_hash`.
    pub fn key_grant(&self, key_id: &str, key_hash: &[u8]) -> Grant {
        Grant::Key {
            key_id: key_id.to_string(),
            fingerprint: self.signer.key_fingerprint(key_hash),
        }
    }

    /// Whether `fingerprint` is that of the secret hashing to `key_hash` (constant time).
    pub fn fingerprint_matches(&self, fingerprint: &str, key_hash: &[u8]) -> bool {
        let current = self.signer.key_fingerprint(key_hash);
        current.len() == fingerprint.len()
            && current
                .bytes()
                .zip(fingerprint.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The listed file stored under `key` (in a public bucket, with `public_only`), ready to
    /// serve. The caller has checked the grant (a signature, or none for public files) and that
    /// the key's project exists and is not suspended. Without `body` (a `HEAD`) a local file's
    /// bytes are not read (its body is empty); `conditions` (a range, preconditions) decide
    /// which of them are.
    ///
    /// The row comes from [`super::served`] when it holds one made for the very file opened
    /// (the local backend: a file this server stored or served since), else from the control
    /// database, read at the same time as the object is opened.
    pub async fn download(
        &self,
        key: &str,
        public_only: bool,
        body: bool,
        conditions: &super::ranges::Conditions,
        client: Option<std::net::IpAddr>,
    ) -> Result<Download, StorageError> {
        let make = |served: Served, object: super::backend::Object| Download {
            name: served.name,
            content_type: served.content_type,
            size: object.size,
            total: object.total,
            outcome: object.outcome,
            validators: object.validators,
            public: served.public,
            body: object.body,
        };
        if self.served.holds(key) {
            let object = self.backend.read(key, body, conditions, client).await?;
            if let Some(served) = object
                .identity
                .and_then(|id| self.served.get(key, &id))
                .filter(|s| s.public || !public_only)
            {
                return Ok(make(served, object));
            }
            // Another file, or a private one asked for publicly: the database decides.
            let generation = self.served.generation();
            let file = self.stored_file(project_of_key(key), key).await;
            return self
                .decide(key, public_only, file, object, generation)
                .map(|(s, o)| make(s, o));
        }
        let generation = self.served.generation();
        // The row and the object at once: nothing is served unless the row lists the file
        // (an object opened for nothing is dropped unread).
        let (file, object) = tokio::join!(
            self.stored_file(project_of_key(key), key),
            self.backend.read(key, body, conditions, client)
        );
        self.decide(key, public_only, file, object?, generation)
            .map(|(s, o)| make(s, o))
    }

    /// Whether the row read from the database lets `object` be served; if so, the entry is
    /// offered to [`super::served`].
    fn decide(
        &self,
        key: &str,
        public_only: bool,
        file: Result<super::StoredFile, StorageError>,
        object: super::backend::Object,
        generation: u64,
    ) -> Result<(Served, super::backend::Object), StorageError> {
        let file = file.map_err(|_| StorageError::NotServed)?;
        let served = Served {
            name: file.name,
            content_type: file.content_type,
            public: file.bucket_is_public,
        };
        if let Some(id) = object.identity {
            self.served.offer(key, id, served.clone(), generation);
        }
        if public_only && !served.public {
            return Err(StorageError::NotServed);
        }
        Ok((served, object))
    }
}
