//! Claiming the daemon's socket path.
//!
//! A daemon serves a path only while it holds an exclusive `flock` on
//! `PATH.lock`; the lock dies with the process, however it dies. Holding the
//! lock, a daemon may replace a socket file left behind by a dead one, and a
//! second daemon started on the same path is refused instead of stealing it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use mora_common::paths::lock_path;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another daemon is serving {}{}", path.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AnotherDaemon { path: PathBuf, pid: Option<u32> },
    #[error("{} exists and is not a socket: remove it or choose another --socket", .0.display())]
    NotASocket(PathBuf),
    #[error("socket directory {} belongs to uid {owner}, not to you (uid {uid}): choose another --socket", dir.display())]
    ForeignDir { dir: PathBuf, owner: u32, uid: u32 },
    #[error(
        "socket directory {} is writable by every user (mode {mode:o}): another user could replace the socket; \
         use a private directory (the default is $XDG_RUNTIME_DIR/mora, else /tmp/mora-$UID) or chmod o-w it",
        dir.display()
    )]
    SharedDir { dir: PathBuf, mode: u32 },
    #[error("cannot set up the socket at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// A bound, listening socket and the lock that makes it ours. Dropping it
/// removes the socket file, unless it was handed over by a service manager,
/// which owns it.
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    _lock: File,
    /// Adopted from a service manager (`LISTEN_FDS`): not ours to remove.
    pub adopted: bool,
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if !self.adopted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds `path`: creates its directory (0700) if missing, takes the lock,
/// clears a stale socket file, binds and restricts the socket to 0600.
pub fn bind(path: &Path) -> Result<BoundSocket, BindError> {
    let io_err = |source| BindError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    let lock = lock_and_check(path)?;

    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                // Someone answers without holding the lock: not ours to take.
                return Err(BindError::AnotherDaemon { path: path.to_path_buf(), pid: None });
            }
            tracing::info!(socket = %path.display(), "removing stale socket left by a daemon that is gone");
            fs::remove_file(path).map_err(io_err)?;
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }

    let listener = UnixListener::bind(path).map_err(io_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(BoundSocket { listener, path: path.to_path_buf(), _lock: lock, adopted: false })
}

/// The listening socket a service manager handed over, as systemd's socket
/// activation does (`LISTEN_PID` = this process, `LISTEN_FDS` >= 1, the
/// socket on descriptor 3), under the same lock and directory rules as
/// [`bind`]; None when there is none. The variables are removed so that no
/// child process takes them for its own.
pub fn adopt() -> Result<Option<BoundSocket>, BindError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let for_us = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<u32>().ok()).unwrap_or(0);
    // SAFETY: called first thing in `serve`, before any other thread exists.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !for_us || count == 0 {
        return Ok(None);
    }
    if count > 1 {
        tracing::warn!(count, "the service manager passed several sockets; serving the first (fd 3)");
    }
    let inherited = Path::new("the inherited socket (fd 3)");
    let io_err = |source| BindError::Io { path: inherited.to_path_buf(), source };
    // SAFETY: the socket-activation protocol hands descriptor 3 to this
    // process, which owns it from here on; nothing else here uses it.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let stream = rustix::net::sockopt::socket_type(&fd).map_err(|e| io_err(e.into()))? == rustix::net::SocketType::STREAM;
    if !stream || !rustix::net::sockopt::socket_acceptconn(&fd).map_err(|e| io_err(e.into()))? {
        return Err(io_err(io::Error::other("not a listening stream socket: use ListenStream= in the .socket unit")));
    }
    let listener = UnixListener::from(fd);
    let addr = listener.local_addr().map_err(io_err)?;
    let path = addr
        .as_pathname()
        .ok_or_else(|| io_err(io::Error::other("not a Unix socket with a path: use ListenStream=%t/mora/cache.sock")))?
        .to_path_buf();
    let lock = lock_and_check(&path)?;
    Ok(Some(BoundSocket { listener, path, _lock: lock, adopted: true }))
}

/// Checks the socket's directory (ours, not writable by others) and takes
/// the exclusive lock beside the socket, writing our pid in it; or says who
/// holds it.
fn lock_and_check(path: &Path) -> Result<File, BindError> {
    let io_err = |source| BindError::Io { path: path.to_path_buf(), source };
    let uid = rustix::process::getuid().as_raw();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let meta = fs::metadata(dir).map_err(io_err)?;
    if meta.uid() != uid && uid != 0 {
        return Err(BindError::ForeignDir { dir: dir.to_path_buf(), owner: meta.uid(), uid });
    }
    // Even with the sticky bit (/tmp), a world-writable directory lets
    // another user plant a socket or lock file at our path before we start.
    if meta.mode() & 0o002 != 0 {
        return Err(BindError::SharedDir { dir: dir.to_path_buf(), mode: meta.mode() & 0o7777 });
    }
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path(path))
        .map_err(io_err)?;
    if let Err(e) = flock(&lock, FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let mut s = String::new();
            let _ = lock.read_to_string(&mut s);
            return Err(BindError::AnotherDaemon { path: path.to_path_buf(), pid: s.trim().parse().ok() });
        }
        return Err(io_err(e.into()));
    }
    lock.set_len(0).map_err(io_err)?;
    lock.rewind().map_err(io_err)?;
    writeln!(lock, "{}", std::process::id()).map_err(io_err)?;
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> mora_test_support::Scratch {
        mora_test_support::Scratch::new(tag)
    }

    #[test]
    fn creates_a_private_directory_and_socket() {
        let scratch = dir("perm");
        let d = scratch.join("nested");
        let sock = d.join("cache.sock");
        let bound = bind(&sock).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
        drop(bound);
        assert!(!sock.exists(), "socket file is removed on drop");
    }

    #[test]
    fn a_world_writable_directory_is_refused() {
        let d = dir("shared");
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
        let err = bind(&d.join("cache.sock")).err().expect("refused").to_string();
        assert!(err.contains("is writable by every user (mode 1777)") && err.contains(&d.display().to_string()), "{err}");
        assert!(!d.join("cache.sock").exists() && !d.join("cache.sock.lock").exists(), "nothing created");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(bind(&d.join("cache.sock")).is_ok());
    }

    #[test]
    fn live_socket_is_not_stolen() {
        let d = dir("live");
        let sock = d.join("cache.sock");
        let _first = bind(&sock).unwrap();
        let err = bind(&sock).err().expect("second bind must fail");
        let msg = err.to_string();
        assert!(msg.starts_with("another daemon is serving"), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
    }

    #[test]
    fn stale_socket_from_a_dead_daemon_is_replaced() {
        let d = dir("stale");
        fs::create_dir_all(&d).unwrap();
        let sock = d.join("cache.sock");
        // A socket file nobody listens on, as a killed daemon leaves behind.
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let bound = bind(&sock).unwrap();
        assert!(UnixStream::connect(bound.path()).is_ok());
    }

    #[test]
    fn a_regular_file_in_the_way_is_refused() {
        let d = dir("file");
        fs::create_dir_all(&d).unwrap();
        let sock = d.join("cache.sock");
        fs::write(&sock, "not a socket").unwrap();
        assert!(matches!(bind(&sock), Err(BindError::NotASocket(_))));
    }
}
