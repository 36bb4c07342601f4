//! What a file's URLs serve: a signed URL of the local backend (`/api/storage/object`: the
//! signature is the grant, no credential) and the public URL of a file in a public bucket
//! (`/api/storage/public/<key>`). S3's pre-signed URLs are served by S3 itself.
//!
//! Both answer "File not found." alike for a file that is missing, unlisted or private, so a
//! public URL reveals nothing about private files. The object streams from the backend; the
//! API layer turns a [`Download`] into the response (headers from its metadata, no body for
//! `HEAD`).

use bytes::Bytes;
use futures_util::stream::BoxStream;

use super::files::project_of_key;
use super::{names, Storage, StorageError};

/// A file to serve: what the response says about it, and its bytes as they are read.
pub struct Download {
    /// The file's name in its bucket.
    pub name: String,
    pub content_type: String,
    /// Bytes; the body is exactly this long (a shorter object cuts the stream off with an
    /// error).
    pub size: u64,
    /// The file's bucket is public (the response may then be cached by anyone).
    pub public: bool,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

impl Download {
    /// How a browser is to treat it: inline only for types that run nothing
    /// ([`names::content_disposition`]).
    pub fn content_disposition(&self) -> String {
        names::content_disposition(&self.name, &self.content_type)
    }
}

impl Storage {
    /// Checks a local signed URL: its signature, then its expiry ([`super::signing`]).
    pub fn verify_signed(
        &self,
        key: &str,
        expires: &str,
        signature: &str,
    ) -> Result<(), StorageError> {
        self.signer
            .verify("GET", key, expires, signature, self.clock.now())
    }

    /// The listed file stored under `key` (in a public bucket, with `public_only`), ready to
    /// stream. The caller has checked the grant (a signature, or none for public files) and that
    /// the key's project exists and is not suspended.
    pub async fn download(&self, key: &str, public_only: bool) -> Result<Download, StorageError> {
        // The row and the object at once: nothing is served unless the row lists the file
        // (an object opened for nothing is dropped unread).
        let (file, object) = tokio::join!(
            self.stored_file(project_of_key(key), key),
            self.backend.read(key)
        );
        let file = file.map_err(|_| StorageError::NotServed)?;
        if public_only && !file.bucket_is_public {
            return Err(StorageError::NotServed);
        }
        let (size, body) = object?;
        Ok(Download {
            name: file.name,
            content_type: file.content_type,
            size,
            public: file.bucket_is_public,
            body,
        })
    }
}
