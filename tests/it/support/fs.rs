//! Files as the server left them on disk.

use std::path::Path;

/// The permission bits of `path` (`0o700`, `0o600`, …).
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}
