//! Partial and conditional downloads (RFC 9110 §8.8, §13, §14): what a file's URL answers to a
//! `Range`, `If-Range`, `If-Match`, `If-Unmodified-Since`, `If-None-Match` or
//! `If-Modified-Since` header.
//!
//! - Every served file has a strong `ETag` (a digest of which file it is: on the local disk its
//!   device, inode, size and times, so a replaced file never keeps its tag; on S3 the object's
//!   own ETag and size, the same on every node) and a `Last-Modified` (its modification time,
//!   never later than now).
//! - `If-Match` (`*` or entity tags, compared strongly) and, without it, `If-Unmodified-Since`:
//!   412 `PRECONDITION_FAILED` when the file is not that version any more (a client fetching a
//!   file in parts does not splice parts of two versions).
//! - `If-None-Match` (`*` or entity tags, compared weakly) and, without it,
//!   `If-Modified-Since`: 304 Not Modified, no body, when the file has not changed.
//! - `Range: bytes=<first>-<last>`, `bytes=<first>-` or `bytes=-<suffix length>` on a `GET`:
//!   206 with those bytes and `Content-Range`; a range that starts at or past the end of the
//!   file (or a suffix of 0 bytes, or a first byte of an empty file) is 416
//!   `RANGE_NOT_SATISFIABLE` with `Content-Range: bytes */<size>`; a suffix of an empty file is
//!   the whole (empty) file, 200. A last byte past the end means the end. Anything else in
//!   `Range` (another unit, several ranges, several `Range` lines, a last byte before the first,
//!   anything not a number) is ignored, as RFC 9110 allows: the whole file, 200. `HEAD` ignores
//!   `Range` (range handling is defined for `GET` only).
//! - `If-Range` with an entity tag (compared strongly): the range applies only while the file
//!   is that version; otherwise the whole file, 200. An `If-Range` date always gives the whole
//!   file: a file replaced within the same second has the same `Last-Modified`, so a date is not
//!   a strong validator here (RFC 9110 §13.1.5 allows only strong ones).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One range of bytes asked for, before the file's size is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// From the first byte to the last one asked for (`None`: to the end).
    From { first: u64, last: Option<u64> },
    /// The last `n` bytes.
    Suffix(u64),
}

impl ByteRange {
    /// A `Range` header's value if it asks for exactly one range of bytes; `None` (the header
    /// is ignored) for anything else.
    pub fn parse(value: &str) -> Option<ByteRange> {
        let value = value.trim();
        let (unit, set) = value.split_once('=')?;
        if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
            return None;
        }
        let (first, last) = set.trim().split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        let number = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // More digits than a u64 holds: past any file's end.
            Some(s.parse().unwrap_or(u64::MAX))
        };
        if first.is_empty() {
            return Some(ByteRange::Suffix(number(last)?));
        }
        let first = number(first)?;
        if last.is_empty() {
            return Some(ByteRange::From { first, last: None });
        }
        let last = number(last)?;
        (last >= first).then_some(ByteRange::From {
            first,
            last: Some(last),
        })
    }

    /// The first byte and the length of this range in a file of `size` bytes; `None` when no
    /// byte of it is in the file.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::From { first, last } => {
                if first >= size {
                    return None;
                }
                let last = last.unwrap_or(u64::MAX).min(size - 1);
                Some((first, last - first + 1))
            }
            ByteRange::Suffix(n) => {
                if n == 0 || size == 0 {
                    return None;
                }
                let len = n.min(size);
                Some((size - len, len))
            }
        }
    }
}

/// What tells a version of a file from another: its strong entity tag (quoted) and when it
/// last changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validators {
    pub etag: String,
    pub modified: Option<SystemTime>,
}

impl Validators {
    /// A strong tag from what identifies the stored bytes (never the bytes themselves: nothing
    /// is read to make it), and the modification time (a future one, from a clock that ran
    /// ahead, is now: RFC 9110 §8.8.2.1).
    pub fn new(identity: &[&[u8]], modified: Option<SystemTime>) -> Validators {
        let modified = modified.map(|m| m.min(SystemTime::now()));
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in identity {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        let digest = ctx.finish();
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Validators {
            etag: format!("\"{hex}\""),
            modified,
        }
    }

    /// `Last-Modified`'s value.
    pub fn last_modified(&self) -> Option<String> {
        self.modified.map(httpdate::fmt_http_date)
    }

    /// The modification time as an HTTP date carries it: whole seconds.
    fn modified_seconds(&self) -> Option<u64> {
        self.modified
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }
}

/// A download's range and preconditions, from its request's headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    range: Option<ByteRange>,
    if_range: Option<String>,
    if_match: Option<String>,
    if_unmodified_since: Option<SystemTime>,
    if_none_match: Option<String>,
    if_modified_since: Option<SystemTime>,
}

/// What to answer, the file's validators known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All of it (200).
    Whole,
    /// `len` bytes from `start` (206).
    Part { start: u64, len: u64 },
    /// Nothing changed since the client's copy (304).
    NotModified,
    /// No byte of the range is in the file (416).
    Unsatisfiable,
    /// `If-Match` or `If-Unmodified-Since` named another version (412).
    PreconditionFailed,
}

impl Conditions {
    /// From a request's headers (`header`: a header's values by its lowercase name, several
    /// lines joined with `", "` as RFC 9110 §5.3 allows); `get`: a `GET` (only it has ranges).
    pub fn from_headers(get: bool, header: impl Fn(&str) -> Option<String>) -> Conditions {
        let text = header;
        let date = |name| text(name).and_then(|v| httpdate::parse_http_date(v.trim()).ok());
        Conditions {
            range: if get {
                text("range").and_then(|v| ByteRange::parse(&v))
            } else {
                None
            },
            if_range: text("if-range"),
            if_match: text("if-match"),
            if_unmodified_since: date("if-unmodified-since"),
            if_none_match: text("if-none-match"),
            if_modified_since: date("if-modified-since"),
        }
    }

    /// No range and no precondition: the whole file, whatever it is.
    pub fn is_empty(&self) -> bool {
        *self == Conditions::default()
    }

    /// What to answer for a file of `size` bytes with these validators.
    pub fn judge(&self, v: &Validators, size: u64) -> Outcome {
        let seconds = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs()
        };
        // RFC 9110 §13.2.2's order: If-Match, If-Unmodified-Since, If-None-Match,
        // If-Modified-Since, If-Range.
        if let Some(tags) = &self.if_match {
            if !matches_any(tags, &v.etag, true) {
                return Outcome::PreconditionFailed;
            }
        } else if let (Some(date), Some(modified)) =
            (self.if_unmodified_since, v.modified_seconds())
        {
            if modified > seconds(date) {
                return Outcome::PreconditionFailed;
            }
        }
        if let Some(tags) = &self.if_none_match {
            if matches_any(tags, &v.etag, false) {
                return Outcome::NotModified;
            }
        } else if let (Some(since), Some(modified)) = (self.if_modified_since, v.modified_seconds())
        {
            if modified <= seconds(since) {
                return Outcome::NotModified;
            }
        }
        let Some(range) = self.range else {
            return Outcome::Whole;
        };
        // Only the file's own strong tag keeps the range (a weak tag or a date never does).
        if let Some(validator) = &self.if_range {
            if validator.trim() != v.etag {
                return Outcome::Whole;
            }
        }
        match range.resolve(size) {
            Some((start, len)) => Outcome::Part { start, len },
            // A suffix of an empty file: all of it is the empty file (RFC 9110 §14.1.1).
            None if size == 0 && matches!(range, ByteRange::Suffix(n) if n > 0) => Outcome::Whole,
            None => Outcome::Unsatisfiable,
        }
    }
}

/// `If-Match` (`strong`) or `If-None-Match`: `*`, or a list of entity tags one of which is
/// `etag`. The strong comparison never matches a weak tag; the weak one ignores `W/`.
fn matches_any(tags: &str, etag: &str, strong: bool) -> bool {
    tags.split(',').map(str::trim).any(|t| {
        t == "*"
            || if strong {
                t == etag
            } else {
                t.strip_prefix("W/").unwrap_or(t) == etag
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(pairs: &[(&str, &str)], get: bool) -> Conditions {
        Conditions::from_headers(get, |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn one_range_of_bytes_is_read_and_anything_else_is_ignored() {
        use ByteRange::*;
        assert_eq!(
            ByteRange::parse("bytes=0-99"),
            Some(From {
                first: 0,
                last: Some(99)
            })
        );
        assert_eq!(
            ByteRange::parse(" Bytes = 5- "),
            Some(From {
                first: 5,
                last: None
            })
        );
        assert_eq!(ByteRange::parse("bytes=-500"), Some(Suffix(500)));
        assert_eq!(
            ByteRange::parse("bytes=7-99999999999999999999999"),
            Some(From {
                first: 7,
                last: Some(u64::MAX)
            })
        );
        for ignored in [
            "bytes=0-1,5-9",
            "items=0-9",
            "bytes=9-3",
            "bytes=-",
            "bytes=a-9",
            "bytes=+1-9",
            "bytes 0-9",
            "bytes=0x10-",
            "",
        ] {
            assert_eq!(ByteRange::parse(ignored), None, "{ignored}");
        }
    }

    #[test]
    fn a_range_is_cut_to_the_file_and_one_past_its_end_is_unsatisfiable() {
        let from = |first, last| ByteRange::From { first, last };
        assert_eq!(from(0, Some(99)).resolve(1000), Some((0, 100)));
        assert_eq!(from(990, Some(5000)).resolve(1000), Some((990, 10)));
        assert_eq!(from(999, None).resolve(1000), Some((999, 1)));
        assert_eq!(from(1000, None).resolve(1000), None);
        assert_eq!(from(0, None).resolve(0), None);
        assert_eq!(ByteRange::Suffix(10).resolve(1000), Some((990, 10)));
        assert_eq!(ByteRange::Suffix(5000).resolve(1000), Some((0, 1000)));
        assert_eq!(ByteRange::Suffix(0).resolve(1000), None);
        assert_eq!(ByteRange::Suffix(3).resolve(0), None);
    }

    #[test]
    fn preconditions_decide_between_the_part_the_whole_and_not_modified() {
        let modified = UNIX_EPOCH + Duration::from_millis(1_700_000_000_500);
        let v = Validators::new(&[b"file", b"1"], Some(modified));
        let other = Validators::new(&[b"file", b"2"], Some(modified));
        assert_ne!(v.etag, other.etag);
        let date = v.last_modified().unwrap();
        let judge =
            |pairs: &[(&'static str, &str)], get: bool| conditions(pairs, get).judge(&v, 1000);
        let part = Outcome::Part { start: 10, len: 10 };
        assert_eq!(judge(&[("range", "bytes=10-19")], true), part);
        assert_eq!(judge(&[("range", "bytes=10-19")], false), Outcome::Whole);
        assert_eq!(
            judge(&[("range", "bytes=2000-")], true),
            Outcome::Unsatisfiable
        );
        assert_eq!(judge(&[], true), Outcome::Whole);
        // If-Range: the same tag keeps the range; another, a weak one or a date (even the
        // file's own) gives the whole file.
        for (validator, outcome) in [
            (v.etag.as_str(), part),
            (other.etag.as_str(), Outcome::Whole),
            (&*format!("W/{}", v.etag), Outcome::Whole),
            (date.as_str(), Outcome::Whole),
            ("Thu, 01 Jan 2015 00:00:00 GMT", Outcome::Whole),
            ("garbage", Outcome::Whole),
        ] {
            let got = judge(&[("range", "bytes=10-19"), ("if-range", validator)], true);
            assert_eq!(got, outcome, "{validator}");
        }
        // If-None-Match compares weakly, and wins over If-Modified-Since.
        for tags in [v.etag.clone(), format!("\"x\", W/{}", v.etag), "*".into()] {
            assert_eq!(
                judge(&[("if-none-match", &tags)], true),
                Outcome::NotModified
            );
        }
        assert_eq!(
            judge(
                &[("if-none-match", &other.etag), ("if-modified-since", &date)],
                true
            ),
            Outcome::Whole
        );
        // If-Modified-Since: whole seconds (the file's 0.5 s do not count as later).
        assert_eq!(
            judge(&[("if-modified-since", &date)], false),
            Outcome::NotModified
        );
        assert_eq!(
            judge(
                &[("if-modified-since", "Thu, 01 Jan 2015 00:00:00 GMT")],
                true
            ),
            Outcome::Whole
        );
        assert!(conditions(&[("range", "bytes=1-0")], true).is_empty());
        // If-Match (strong) and If-Unmodified-Since: 412 for another version, before all else.
        for (tags, outcome) in [
            (v.etag.clone(), part),
            ("*".to_string(), part),
            (format!("\"x\", {}", v.etag), part),
            (other.etag.clone(), Outcome::PreconditionFailed),
            (format!("W/{}", v.etag), Outcome::PreconditionFailed),
        ] {
            let got = judge(&[("if-match", &tags), ("range", "bytes=10-19")], true);
            assert_eq!(got, outcome, "{tags}");
        }
        assert_eq!(
            judge(
                &[("if-match", &other.etag), ("if-none-match", &v.etag)],
                true
            ),
            Outcome::PreconditionFailed
        );
        assert_eq!(
            judge(&[("if-unmodified-since", &date)], true),
            Outcome::Whole
        );
        assert_eq!(
            judge(
                &[("if-unmodified-since", "Thu, 01 Jan 2015 00:00:00 GMT")],
                true
            ),
            Outcome::PreconditionFailed
        );
        // If-Match wins over If-Unmodified-Since.
        assert_eq!(
            judge(
                &[
                    ("if-match", &v.etag),
                    ("if-unmodified-since", "Thu, 01 Jan 2015 00:00:00 GMT")
                ],
                true
            ),
            Outcome::Whole
        );
        // A suffix of an empty file is the empty file; a first byte of it is unsatisfiable.
        let empty = |range: &str| conditions(&[("range", range)], true).judge(&v, 0);
        assert_eq!(empty("bytes=-5"), Outcome::Whole);
        assert_eq!(empty("bytes=-0"), Outcome::Unsatisfiable);
        assert_eq!(empty("bytes=0-"), Outcome::Unsatisfiable);
        // A modification time in the future is now.
        let future = Validators::new(&[b"f"], Some(SystemTime::now() + Duration::from_secs(3600)));
        assert!(future.modified.unwrap() <= SystemTime::now());
    }
}
