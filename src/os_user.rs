//! What an embedded server (PostgreSQL, [`crate::embedded`]; MariaDB,
//! [`crate::mysql::embedded`]) needs of the operating system: the unprivileged user it runs as
//! when Fluxbase runs as root (neither server runs as root), that user's way down to its data
//! directory, and a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The unprivileged user a server runs as.
pub struct ServerUser {
    /// The server's name in messages (`PostgreSQL`, `MariaDB`).
    pub product: &'static str,
    /// The variable naming another user (`FLUXBASE_PG_USER`).
    pub env_var: &'static str,
    /// The user Debian's package creates (`postgres`), and that package.
    pub default_user: &'static str,
    pub package: &'static str,
}

impl ServerUser {
    /// `Some((uid, gid))` of the user to run the server as when this process is root; `None`
    /// otherwise (the server runs as this process's user).
    pub fn run_as(&self) -> Result<Option<(u32, u32)>> {
        if id(&["-u"], None)? != 0 {
            return Ok(None);
        }
        let name = std::env::var(self.env_var).unwrap_or_else(|_| self.default_user.into());
        let uid = id(&["-u"], Some(&name)).with_context(|| {
            format!(
                "{} does not run as root and there is no user `{name}` to run it as: install \
                 Debian's {} package (it creates `{}`), create one with `useradd --system \
                 {name}`, or set {}",
                self.product, self.package, self.default_user, self.env_var
            )
        })?;
        let gid = id(&["-g"], Some(&name))?;
        Ok(Some((uid, gid)))
    }

    /// Prepares a server's root directory: created if missing, made canonical, and, when this
    /// process is root, given to the run-as user, who must be able to walk down to it. Returns
    /// the canonical root and the run-as `(uid, gid)` ([`ServerUser::run_as`]). `what` names
    /// the user in messages ("the cluster user", "the MariaDB user").
    pub fn prepare_root(&self, root: &Path, what: &str) -> Result<(PathBuf, Option<(u32, u32)>)> {
        let run_as = self.run_as()?;
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let root = root.canonicalize()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to {what}", root.display()))?;
            self.check_reachable(&root, uid)?;
        }
        Ok((root, run_as))
    }

    /// The user (`uid`) must be able to walk down to `dir`: every ancestor searchable by
    /// others or its own.
    pub fn check_reachable(&self, dir: &Path, uid: u32) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        for ancestor in dir.ancestors().skip(1) {
            let meta = std::fs::metadata(ancestor)?;
            if meta.mode() & 0o001 == 0 && meta.uid() != uid {
                bail!(
                    "the {} user (uid {uid}) cannot enter {}: run `chmod o+x {}` or choose \
                     another FLUXBASE_DATA_DIR",
                    self.product,
                    ancestor.display(),
                    ancestor.display()
                );
            }
        }
        Ok(())
    }
}

/// Files this process (root, when the server runs as another user) makes inside a server's
/// root directory, which belongs to the server's user: that user (or whoever runs as it, such
/// as another server of Debian's packages, or the server itself if a client took it over) may
/// put a link in the place of any of them, so none is ever followed. A link, or a file where a
/// directory belongs, is removed first; the new file or directory is then opened without
/// following links (`O_NOFOLLOW`: a link put back meanwhile makes the call fail, never
/// redirects it) and given its owner and mode through that handle (`fchown`, `fchmod`), never
/// by name. (Before: `chown`, `chmod` and writes by name, as root, followed such links: a link
/// `tmp -> /etc/cron.d` left by the server's user was given to that user at the next start.)
pub mod inside {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::path::Path;

    use anyhow::{Context, Result};

    /// Removes what stands at `path` unless it is a real directory (a link is removed itself,
    /// never followed).
    fn clear_unless_dir(path: &Path) -> Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_dir() => Ok(()),
            Ok(_) => std::fs::remove_file(path)
                .with_context(|| format!("removing {} (not a directory)", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("looking at {}", path.display())),
        }
    }

    /// The directory `path`, made if missing (its parent must exist), owned by `owner` (else
    /// this process's user) with `mode`.
    pub fn dir(path: &Path, owner: Option<(u32, u32)>, mode: u32) -> Result<()> {
        clear_unless_dir(path)?;
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
        let handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(path)
            .with_context(|| format!("opening {} (a link is refused)", path.display()))?;
        give(&handle, path, owner, mode)
    }

    /// Gives an open file or directory its owner and mode, through its handle.
    fn give(
        handle: &std::fs::File,
        path: &Path,
        owner: Option<(u32, u32)>,
        mode: u32,
    ) -> Result<()> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(handle, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to the server's user", path.display()))?;
        }
        handle.set_permissions(std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// A directory emptied and made again (`path` may hold anything the server's user put
    /// there; nothing in it is followed).
    pub fn fresh_dir(path: &Path, owner: Option<(u32, u32)>, mode: u32) -> Result<()> {
        clear_unless_dir(path)?;
        if path.exists() {
            // std's remove_dir_all opens each level without following links.
            std::fs::remove_dir_all(path)
                .with_context(|| format!("emptying {}", path.display()))?;
        }
        dir(path, owner, mode)
    }

    /// A new file `path` holding `contents`, owned by `owner` with `mode` (whatever stood at
    /// `path` is removed first, a link itself).
    pub fn file(path: &Path, contents: &[u8], owner: Option<(u32, u32)>, mode: u32) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        give(&file, path, owner, mode)?;
        file.write_all(contents)?;
        Ok(())
    }

    /// Up to `limit` bytes of the file `path` from `offset`, not through a link, and only a
    /// regular file (never a device or a pipe put in its place).
    pub fn read(path: &Path, offset: u64, limit: u64) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        // A second name for the file may be a hard link the directory's owner made to a file
        // it could not read itself (hosts with fs.protected_hardlinks=0).
        if std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
            return Err(std::io::Error::other(
                "a file with other names (hard links)",
            ));
        }
        file.seek(std::io::SeekFrom::Start(offset))?;
        let mut out = Vec::new();
        file.take(limit).read_to_end(&mut out)?;
        Ok(out)
    }
}

/// `id <flag> [user]` as a number.
fn id(flag: &[&str], user: Option<&str>) -> Result<u32> {
    let out = Command::new("id").args(flag).args(user).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// A loopback port free now for an embedded server (a server started on it may still find it
/// taken: callers retry). Chosen below the kernel's ephemeral range (`ip_local_port_range`)
/// when there is room for it: a port of that range, what binding port 0 gives, can go to any
/// process's outgoing connection or `bind(0)` while the server is down, and a server its
/// supervisor starts again must come back on the same port ([`crate::supervise`]).
pub fn free_port() -> Result<u16> {
    /// The lowest port chosen: above the well-known and most registered services' ports.
    const FLOOR: u16 = 10_000;
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > FLOOR + 1_000);
    if let Some(low) = below {
        for _ in 0..64 {
            let [a, b] = crate::secrets::random_bytes::<2>();
            let port = FLOOR + u16::from_le_bytes([a, b]) % (low - FLOOR);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Signalling an embedded server's process without ever signalling another one that took its
/// pid meanwhile.
///
/// * A server this process checks and then stops (a leftover `mariadbd` named by its pid
///   file): [`process::Held`], a pidfd opened *before* the check, so the signal goes to the process
///   whose command line was read, or fails (`ESRCH`) if that one is gone; its end is waited
///   for on the same handle.
/// * A watchdog that must outlive this process (a shell: it cannot hold a pidfd) checks the
///   process's start time (`/proc/<pid>/stat`, field 22, in clock ticks since boot) before it
///   signals: a pid reused by another process has another start time
///   ([`process::watchdog_script`]).
pub mod process {
    use std::os::fd::OwnedFd;
    use std::time::{Duration, Instant};

    use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

    /// A process held by a pidfd.
    #[derive(Debug)]
    pub struct Held {
        pub pid: u32,
        fd: OwnedFd,
    }

    impl Held {
        /// A handle on the process `pid` now is (`None`: no such process, or the kernel has
        /// no `pidfd_open`, Linux < 5.3).
        pub fn open(pid: u32) -> Option<Held> {
            let raw = Pid::from_raw(i32::try_from(pid).ok()?)?;
            match pidfd_open(raw, PidfdFlags::empty()) {
                Ok(fd) => Some(Held { pid, fd }),
                Err(e) => {
                    if e != rustix::io::Errno::SRCH {
                        tracing::warn!(pid, error = %e, "pidfd_open");
                    }
                    None
                }
            }
        }

        /// Sends `sig` to the held process; `false` when it is gone (never another process).
        pub fn signal(&self, sig: Signal) -> bool {
            pidfd_send_signal(&self.fd, sig).is_ok()
        }

        /// Reaps the held process if it ended and this process is its parent (a server run as
        /// PID 1 inherits the postmaster `pg_ctl` started: unreaped, its pid would stay taken
        /// and PostgreSQL would refuse to start again beside its lock file). Nothing otherwise.
        pub fn reap(&self) {
            use rustix::process::{waitid, WaitId, WaitIdOptions};
            use std::os::fd::AsFd;
            let _ = waitid(
                WaitId::PidFd(self.fd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            );
        }

        /// Waits until the held process has ended, `limit` at most; whether it ended.
        pub fn wait_gone(&self, limit: Duration) -> bool {
            use rustix::event::{poll, PollFd, PollFlags, Timespec};
            let deadline = Instant::now() + limit;
            loop {
                // Readable once the process has exited.
                let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = Timespec {
                    tv_sec: left.as_secs().min(1) as _,
                    tv_nsec: if left.as_secs() >= 1 {
                        0
                    } else {
                        left.subsec_nanos() as _
                    },
                };
                match poll(&mut fds, Some(&wait)) {
                    Ok(n) if n > 0 => return true,
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(_) => return false,
                }
                if Instant::now() >= deadline {
                    return false;
                }
            }
        }
    }

    /// Waits for `child` (a watchdog) on a thread of its own, so that it is reaped when it
    /// exits instead of staying a zombie for the server's life (each start of an embedded
    /// server has one; its supervisor may start it many times).
    pub fn reap_in_background(mut child: std::process::Child) {
        let spawned = std::thread::Builder::new()
            .name("reap-watchdog".into())
            .spawn(move || {
                let _ = child.wait();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "a thread to reap a watchdog");
        }
    }

    /// The start time of `pid` (clock ticks since boot; `None`: no such process).
    pub fn start_time(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split after the
        // last `)`; starttime is field 22, the 20th after it.
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(19)?.parse().ok()
    }

    /// A `sh` script that waits while `owner` lives and `target` is still the process it was
    /// (same pid, same start time), then sends `target` `signal` (`TERM`, `INT`) if it still
    /// is; it checks once a second. Each `(pid, start time)` as [`start_time`] read it.
    pub fn watchdog_script(owner: (u32, u64), target: (u32, u64), signal: &str) -> String {
        let check = |(pid, start): (u32, u64)| {
            format!(
                "{{ read -r s 2>/dev/null < /proc/{pid}/stat && set -- ${{s##*) }} && [ \"${{20}}\" = {start} ]; }}"
            )
        };
        format!(
            "while {owner} && {target}; do sleep 1; done; {target} && kill -{signal} {pid}; exit 0",
            owner = check(owner),
            target = check(target),
            pid = target.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_its_user_cannot_enter_is_named_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("os-user-{}", std::process::id()));
        let closed = dir.join("closed");
        let inner = closed.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let user = ServerUser {
            product: "MariaDB",
            env_var: "FLUXBASE_MYSQL_USER",
            default_user: "mysql",
            package: "mariadb-server",
        };
        // A uid that owns nothing here.
        let err = user
            .check_reachable(&inner.join("data"), 4_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MariaDB user (uid 4000000) cannot enter")
                && err.contains(&format!("chmod o+x {}", closed.display())),
            "{err}"
        );
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        user.check_reachable(&inner.join("data"), 4_000_000)
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_root_is_created_made_canonical_and_given_to_the_run_as_user() {
        use std::os::unix::fs::MetadataExt;
        let base = std::env::temp_dir().join(format!("os-user-root-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let user = ServerUser {
            product: "PostgreSQL",
            env_var: "FLUXBASE_PG_USER",
            default_user: "postgres",
            package: "postgresql",
        };
        let (root, run_as) = user
            .prepare_root(&base.join("x/../server"), "the cluster user")
            .unwrap();
        assert_eq!(root, base.canonicalize().unwrap().join("server"));
        assert!(root.is_dir());
        let owner = std::fs::metadata(&root).unwrap().uid();
        match run_as {
            Some((uid, _)) => assert_eq!(owner, uid, "given to the run-as user"),
            None => assert_eq!(owner, id(&["-u"], None).unwrap()),
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn free_ports_are_loopback_ports_nobody_holds() {
        let port = free_port().unwrap();
        assert!(port > 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn links_in_a_servers_root_are_replaced_never_followed() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let base = std::env::temp_dir().join(format!(
            "os-user-links-{}",
            crate::secrets::random_hex::<6>()
        ));
        let (victim_dir, victim_file) = (base.join("victim-dir"), base.join("victim-file"));
        std::fs::create_dir_all(&victim_dir).unwrap();
        std::fs::set_permissions(&victim_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&victim_file, "precious").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let (dir, file) = (base.join("tmp"), base.join("port"));
        symlink(&victim_dir, &dir).unwrap();
        symlink(&victim_file, &file).unwrap();
        inside::dir(&dir, None, 0o700).unwrap();
        inside::file(&file, b"5432\n", None, 0o644).unwrap();
        assert_eq!(mode(&victim_dir), 0o755);
        assert_eq!(std::fs::read_to_string(&victim_file).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.file_type().is_dir());
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "5432\n");
        // A directory emptied and made again: a link inside it is removed, not followed.
        let fresh = base.join("no-files");
        std::fs::create_dir(&fresh).unwrap();
        symlink(&victim_file, fresh.join("inner")).unwrap();
        inside::fresh_dir(&fresh, None, 0o555).unwrap();
        assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 0);
        assert_eq!(mode(&fresh), 0o555);
        assert!(victim_file.exists());
        // Reads: not through a link, not a device, bounded.
        symlink("/dev/zero", base.join("log")).unwrap();
        assert!(inside::read(&base.join("log"), 0, 10).is_err());
        assert_eq!(inside::read(&file, 1, 2).unwrap(), b"43");
        // Not a fifo (its open would block without O_NONBLOCK; it is not a regular file).
        let fifo = base.join("fifo");
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert!(inside::read(&fifo, 0, 10).is_err());
        // Not a hard link to a file elsewhere.
        let hard = base.join("hard");
        std::fs::hard_link(&victim_file, &hard).unwrap();
        assert!(
            inside::read(&hard, 0, 10).is_err(),
            "read through a hard link"
        );
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}

#[cfg(test)]
mod process_tests {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::process::{start_time, watchdog_script, Held};

    fn sleeper(secs: u32) -> Child {
        Command::new("sleep")
            .arg(secs.to_string())
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Waits (`limit` at most) for `child` to end; whether it did.
    fn ends_within(child: &mut Child, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn the_start_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let me = start_time(std::process::id()).unwrap();
        assert!(me > 0);
        let dir = std::env::temp_dir().join(format!("start-time-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let odd = dir.join("a) b (c");
        let _ = std::fs::remove_file(&odd);
        std::os::unix::fs::symlink(which_sleep(), &odd).unwrap();
        let mut child = Command::new(&odd).arg("30").spawn().unwrap();
        let t = start_time(child.id()).unwrap();
        assert!(t >= me, "{t} < {me}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(start_time(child.id()), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn which_sleep() -> std::path::PathBuf {
        ["/usr/bin/sleep", "/bin/sleep"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .unwrap()
    }

    #[test]
    fn a_held_process_gets_the_signal_and_once_gone_nothing_does() {
        let mut child = sleeper(60);
        let held = Held::open(child.id()).unwrap();
        assert!(!held.wait_gone(Duration::from_millis(50)));
        assert!(held.signal(rustix::process::Signal::TERM));
        assert!(held.wait_gone(Duration::from_secs(20)));
        child.wait().unwrap();
        assert!(!held.signal(rustix::process::Signal::TERM));
    }

    /// The watchdog signals its target once the owner is gone, and never a process that merely
    /// has the target's pid (here: the right pid with another start time, as a pid reused
    /// after the target ended would have).
    #[test]
    fn a_watchdog_signals_only_the_process_it_was_given() {
        for reused in [false, true] {
            let mut owner = sleeper(60);
            let mut target = sleeper(60);
            let owner_at = (owner.id(), start_time(owner.id()).unwrap());
            let start = start_time(target.id()).unwrap();
            let target_at = (target.id(), if reused { start + 1 } else { start });
            let mut watchdog = Command::new("sh")
                .args(["-c", &watchdog_script(owner_at, target_at, "TERM")])
                .spawn()
                .unwrap();
            if reused {
                // It does not wait for a process that is not its target.
                assert!(ends_within(&mut watchdog, Duration::from_secs(10)));
                assert!(
                    target.try_wait().unwrap().is_none(),
                    "a stranger was signalled"
                );
            } else {
                // Waits while the owner lives ...
                std::thread::sleep(Duration::from_millis(1500));
                assert!(watchdog.try_wait().unwrap().is_none());
                assert!(target.try_wait().unwrap().is_none());
                // ... and stops the target once the owner is gone.
                owner.kill().unwrap();
                owner.wait().unwrap();
                assert!(
                    ends_within(&mut target, Duration::from_secs(10)),
                    "not signalled"
                );
                assert!(ends_within(&mut watchdog, Duration::from_secs(10)));
            }
            let _ = owner.kill();
            let _ = owner.wait();
            let _ = target.kill();
            let _ = target.wait();
        }
    }
}
