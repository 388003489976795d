//! Where the daemon's socket lives.
//!
//! `--socket PATH`, else `$MORA_SOCKET`, else `$XDG_RUNTIME_DIR/mora/cache.sock`,
//! else `/tmp/mora-$UID/cache.sock`. The daemon creates the directory 0700
//! and the socket 0600, and holds `SOCKET.lock` while it serves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub const SOCKET_ENV: &str = "MORA_SOCKET";

/// Resolves the socket path from an explicit flag and the environment.
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    socket_path_from(explicit, |k| std::env::var_os(k).filter(|v| !v.is_empty()), rustix::process::getuid().as_raw())
}

fn socket_path_from(explicit: Option<&Path>, env: impl Fn(&str) -> Option<OsString>, uid: u32) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = env(SOCKET_ENV) {
        return PathBuf::from(p);
    }
    if let Some(run) = env("XDG_RUNTIME_DIR") {
        return PathBuf::from(run).join("mora").join("cache.sock");
    }
    PathBuf::from(format!("/tmp/mora-{uid}")).join("cache.sock")
}

/// The lock file a serving daemon holds next to its socket.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The log file an auto-started daemon writes next to its socket.
pub fn log_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".log");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn explicit_flag_wins_over_everything() {
        let p = socket_path_from(Some(Path::new("/x/s")), env(&[("MORA_SOCKET", "/y"), ("XDG_RUNTIME_DIR", "/r")]), 7);
        assert_eq!(p, PathBuf::from("/x/s"));
    }

    #[test]
    fn env_then_runtime_dir_then_tmp() {
        assert_eq!(socket_path_from(None, env(&[("MORA_SOCKET", "/y"), ("XDG_RUNTIME_DIR", "/r")]), 7), PathBuf::from("/y"));
        assert_eq!(socket_path_from(None, env(&[("XDG_RUNTIME_DIR", "/r")]), 7), PathBuf::from("/r/mora/cache.sock"));
        assert_eq!(socket_path_from(None, env(&[]), 7), PathBuf::from("/tmp/mora-7/cache.sock"));
    }

    #[test]
    fn lock_and_log_sit_beside_the_socket() {
        assert_eq!(lock_path(Path::new("/r/mora/cache.sock")), PathBuf::from("/r/mora/cache.sock.lock"));
        assert_eq!(log_path(Path::new("/r/mora/cache.sock")), PathBuf::from("/r/mora/cache.sock.log"));
    }
}
