//! What a bucket or an object may be called, and how a stored file is served to a browser.
//!
//! Object names become paths on disk (local backend) and keys in S3, so a name must never leave
//! its bucket: `..` segments, their percent-encoded forms, absolute paths, backslashes, NUL and
//! other control characters are refused before any storage call. The checks run on the name as
//! given *and* on its percent-decoded form, so a later layer that decodes cannot turn a harmless
//! looking name into a traversal.

use super::StorageError;

/// Longest object name, in bytes (S3's key limit is 1,024 bytes for the whole key).
pub const MAX_OBJECT_NAME: usize = 900;

/// Longest segment of an object name (between `/`), in bytes: segments become directory and
/// file names on the local disk, where a name is at most 255 bytes (`NAME_MAX`).
pub const MAX_SEGMENT: usize = 255;

/// The guide's rule: lowercase alphanumeric, hyphens, underscores, 1–63 characters.
pub fn validate_bucket_name(name: &str) -> Result<(), StorageError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidBucketName(name.to_string()))
    }
}

/// An object name inside a bucket: `/`-separated segments, none empty, `.` or `..`.
pub fn validate_object_name(name: &str) -> Result<(), StorageError> {
    let refuse = |why: &str| {
        Err(StorageError::InvalidObjectName {
            name: name.to_string(),
            why: why.to_string(),
        })
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_OBJECT_NAME {
        return refuse(&format!("it is longer than {MAX_OBJECT_NAME} bytes"));
    }
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    for candidate in [name, decoded.as_ref()] {
        if candidate.chars().any(|c| c.is_control()) {
            return refuse("control characters (including NUL) are not allowed");
        }
        if crate::text::has_deceptive(candidate) {
            return refuse(
                "text-direction (such as U+202E) and invisible (such as U+200B) characters are not allowed",
            );
        }
        if candidate.contains('\\') {
            return refuse("backslashes are not allowed");
        }
        if candidate.starts_with('/') || candidate.starts_with('~') || has_drive_prefix(candidate) {
            return refuse("absolute paths are not allowed");
        }
        if candidate.contains('#') {
            return refuse("`#` is not allowed");
        }
        for segment in candidate.split('/') {
            match segment {
                "" => {
                    return refuse("empty path segments (`//` or a trailing `/`) are not allowed")
                }
                "." | ".." => return refuse("`.` and `..` segments are not allowed"),
                s if s.len() > MAX_SEGMENT => {
                    return refuse(&format!(
                        "a path segment (between `/`) is longer than {MAX_SEGMENT} bytes"
                    ))
                }
                _ => {}
            }
        }
    }
    if decoded != name && (decoded.contains("..") || decoded.contains('/')) {
        return refuse("percent-encoded `.` or `/` is not allowed");
    }
    Ok(())
}

/// Folders deeper than this share one name lock: an upload takes at most this many
/// ([`name_locks`]), however deep its name.
pub const NAME_LOCK_DEPTH: usize = 16;

/// The folders a name is in, outermost first: `a/b/c.txt` is in `a` and `a/b`.
pub fn folders_of(name: &str) -> Vec<&str> {
    name.match_indices('/').map(|(i, _)| &name[..i]).collect()
}

/// The name locks an upload of `name` takes before it checks that no file is one of its folders
/// and no file is under it as a folder (`a` and `a/b.txt` cannot both be in a bucket: a file
/// system refuses the pair, and an object store would keep a pair that no folder listing or
/// local copy can show). `(path, exclusive)`: its folders shared, itself exclusive, so two
/// uploads whose names could clash always want the same path, one of them exclusively, and
/// the second one's check sees the first one's row (uploads into one folder still run side by
/// side). Past [`NAME_LOCK_DEPTH`] segments, the folder at that depth stands for everything
/// below it (taken exclusively): a name of 400 segments takes 16 locks, not 400, and deep
/// names that share those 16 segments take turns. Each path once, in its strongest mode.
pub fn name_locks(name: &str) -> Vec<(&str, bool)> {
    let folders = folders_of(name);
    if folders.len() < NAME_LOCK_DEPTH {
        let mut locks: Vec<(&str, bool)> = folders.into_iter().map(|f| (f, false)).collect();
        locks.push((name, true));
        return locks;
    }
    let (above, at) = folders.split_at(NAME_LOCK_DEPTH - 1);
    let mut locks: Vec<(&str, bool)> = above.iter().map(|f| (*f, false)).collect();
    locks.push((at[0], true));
    locks
}

fn has_drive_prefix(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

/// The object name for an upload: `path` when given (a trailing `/` names a folder that the
/// uploaded file's own name goes into), else the uploaded file's name.
pub fn object_name(path: Option<&str>, filename: Option<&str>) -> Result<String, StorageError> {
    let filename = filename.filter(|f| !f.is_empty());
    let name = match (path.filter(|p| !p.is_empty()), filename) {
        (Some(p), Some(f)) if p.ends_with('/') => format!("{p}{f}"),
        (Some(p), None) if p.ends_with('/') => return Err(StorageError::FolderWithoutFilename),
        (Some(p), _) => p.to_string(),
        (None, Some(f)) => f.to_string(),
        (None, None) => return Err(StorageError::NoFilename),
    };
    validate_object_name(&name)?;
    Ok(name)
}

/// Content types a browser displays without running anything; every other type is served as
/// an attachment (HTML, SVG, XML, JavaScript and unknown types are downloaded, never rendered
/// on Fluxbase's origin).
fn renders_inline_safely(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "image/png"
            | "image/jpeg"
            | "image/gif"
            | "image/webp"
            | "image/avif"
            | "image/bmp"
            | "text/plain"
            | "application/pdf"
            | "application/json"
    ) || essence.starts_with("audio/")
        || essence.starts_with("video/")
}

/// A `Content-Disposition` for serving `name` stored as `content_type`.
pub fn content_disposition(name: &str, content_type: &str) -> String {
    let kind = if renders_inline_safely(content_type) {
        "inline"
    } else {
        "attachment"
    };
    let base = name.rsplit('/').next().unwrap_or(name);
    let ascii: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' && c != ';' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(base, RFC5987);
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// RFC 5987 `attr-char`: everything else is percent-encoded.
const RFC5987: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// Characters kept as they are in a URL path segment.
pub const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A content type as stored: a valid MIME type, or `application/octet-stream` when none is
/// given.
pub fn normalize_content_type(given: Option<&str>, name: &str) -> Result<String, StorageError> {
    let given = given.map(str::trim).filter(|s| !s.is_empty());
    let mime: mime_guess::mime::Mime = match given {
        Some(ct) if ct != "application/octet-stream" => ct
            .parse()
            .map_err(|_| StorageError::InvalidContentType(ct.to_string()))?,
        _ => mime_guess::from_path(name).first_or_octet_stream(),
    };
    Ok(mime.to_string().to_ascii_lowercase())
}

/// Whether `content_type` matches one of a bucket's allowed patterns (`image/png`, `image/*`).
pub fn mime_allowed(content_type: &str, allowed: &[String]) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    allowed.iter().any(|pattern| {
        let pattern = pattern.trim().to_ascii_lowercase();
        if pattern == "*/*" {
            return true;
        }
        match pattern.strip_suffix("/*") {
            Some(top) => essence
                .split_once('/')
                .is_some_and(|(t, _)| t.eq_ignore_ascii_case(top)),
            None => essence.eq_ignore_ascii_case(&pattern),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_the_guide() {
        for ok in ["profile-photos", "a", "x_1", &"a".repeat(63)] {
            assert!(validate_bucket_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Photos", "a b", "a.b", "ü", &"a".repeat(64), "a/b"] {
            assert!(validate_bucket_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_name_segments_fit_a_file_name() {
        let long = "b".repeat(MAX_SEGMENT + 1);
        assert!(validate_object_name(&format!("a/{long}")).is_err());
        assert!(validate_object_name(&format!("{long}/a")).is_err());
        assert!(validate_object_name(&format!("a/{}", "b".repeat(MAX_SEGMENT))).is_ok());
    }

    #[test]
    fn object_names_cannot_escape_their_bucket() {
        for ok in [
            "avatar.jpg",
            "users/1/avatar.jpg",
            "a..b.txt",
            "100%.txt",
            "ünï code.png",
        ] {
            assert!(validate_object_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../x",
            "a/../../x",
            "./x",
            "%2e%2e/x",
            "%2E%2E",
            "a%2fb",
            "..%2fx",
            "/etc/passwd",
            "C:/x",
            "a\\b",
            "..\\x",
            "a\0b",
            "a%00b",
            "a\nb",
            "a//b",
            "dir/",
            "x#1",
        ] {
            assert!(validate_object_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_that_could_clash_want_the_same_lock() {
        assert_eq!(folders_of("a/b/c.txt"), ["a", "a/b"]);
        assert!(folders_of("a").is_empty());
        assert_eq!(name_locks("a"), [("a", true)]);
        assert_eq!(
            name_locks("a/b/c.txt"),
            [("a", false), ("a/b", false), ("a/b/c.txt", true)]
        );
        // A file and any name under it: the file's lock, exclusive on one side.
        let clash = |file: &str, under: &str| {
            let (f, u) = (name_locks(file), name_locks(under));
            f.iter()
                .any(|(p, x)| u.iter().any(|(q, y)| p == q && (*x || *y)))
        };
        assert!(clash("a", "a/b.txt"));
        assert!(clash("a/b", "a/b/c/d/e.txt"));
        // Siblings and look-alikes share only shared locks.
        assert!(!clash("a/b.txt", "a/c.txt"));
        assert!(!clash("ab", "a/b"));
        assert!(!clash("a/bc", "a/b/c"));
        // Deep names: bounded, and still clashing with their folders at any depth.
        let deep: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let deep = deep.join("/");
        assert_eq!(name_locks(&deep).len(), NAME_LOCK_DEPTH);
        for cut in 1..40 {
            let folder: Vec<&str> = deep.split('/').take(cut).collect();
            assert!(clash(&folder.join("/"), &deep), "{cut}");
        }
    }

    #[test]
    fn path_names_the_object_or_its_folder() {
        assert_eq!(object_name(None, Some("a.jpg")).unwrap(), "a.jpg");
        assert_eq!(
            object_name(Some("x/b.jpg"), Some("a.jpg")).unwrap(),
            "x/b.jpg"
        );
        assert_eq!(object_name(Some("x/"), Some("a.jpg")).unwrap(), "x/a.jpg");
        assert!(object_name(None, None).is_err());
        assert!(object_name(Some("../"), Some("a.jpg")).is_err());
    }

    #[test]
    fn active_content_is_served_as_an_attachment() {
        assert!(content_disposition("a.html", "text/html").starts_with("attachment;"));
        assert!(content_disposition("a.svg", "image/svg+xml").starts_with("attachment;"));
        assert!(content_disposition("a.bin", "application/x-unknown").starts_with("attachment;"));
        assert!(content_disposition("a.png", "image/png").starts_with("inline;"));
        let d = content_disposition("dir/ré\"sumé.pdf", "application/pdf");
        assert_eq!(
            d,
            "inline; filename=\"r__sum_.pdf\"; filename*=UTF-8''r%C3%A9%22sum%C3%A9.pdf"
        );
    }

    #[test]
    fn mime_patterns_match_types_and_families() {
        let allowed = vec!["image/*".to_string(), "application/pdf".to_string()];
        assert!(mime_allowed("image/png", &allowed));
        assert!(mime_allowed("application/pdf", &allowed));
        assert!(!mime_allowed("text/html", &allowed));
        assert!(!mime_allowed("imagex/png", &allowed));
        // `*/*` allows any type (it is a valid pattern at bucket creation).
        assert!(mime_allowed("text/html", &["*/*".to_string()]));
        assert!(mime_allowed("Image/PNG; q=1", &[" IMAGE/* ".to_string()]));
    }

    #[test]
    fn content_types_are_validated_or_guessed() {
        assert_eq!(normalize_content_type(None, "a.jpg").unwrap(), "image/jpeg");
        assert_eq!(
            normalize_content_type(Some("application/octet-stream"), "a.png").unwrap(),
            "image/png"
        );
        assert_eq!(
            normalize_content_type(Some("Text/Plain"), "a").unwrap(),
            "text/plain"
        );
        assert!(normalize_content_type(Some("not a type"), "a").is_err());
    }
}
