//! Reaching the cache daemon, starting one when none answers.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mora_common::connection::{ConnectError, Connection};
use mora_common::paths::log_path;

use crate::ExecError;

pub const CLIENT: &str = concat!("mora-exec ", env!("CARGO_PKG_VERSION"));

/// How long to wait for an auto-started daemon to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `mora-cache` binary: beside this executable, else on `PATH`.
pub(crate) fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("mora-cache")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mora-cache"))
}

/// Connects to the daemon at `socket`. When none listens and `autostart` is
/// set, starts `mora-cache serve` in the background (its own process group,
/// log beside the socket), says so in one line on stderr, and waits for it.
pub fn connect(socket: &Path, autostart: bool) -> Result<Connection, ExecError> {
    match Connection::connect(socket, CLIENT) {
        Ok(c) => return Ok(c),
        Err(ConnectError::NotRunning(_)) if autostart => {}
        Err(ConnectError::NotRunning(p)) => {
            return Err(ExecError::Connect(format!(
                "no cache daemon is listening at {}: start one with `mora-cache serve`, or drop --no-autostart",
                p.display()
            )))
        }
        Err(e) => return Err(ExecError::Connect(e.to_string())),
    }
    let dir = socket.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ExecError::Connect(format!("cannot create socket directory {}: {e}", dir.display())))?;
    }
    let log = log_path(socket);
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| ExecError::Connect(format!("cannot open daemon log {}: {e}", log.display())))?;
    let binary = daemon_binary();
    let mut child = Command::new(&binary)
        .arg("serve")
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        // Its own process group: Ctrl-C on this run must not stop the daemon.
        .process_group(0)
        .spawn()
        .map_err(|e| ExecError::Connect(format!("cannot start {}: {e}", binary.display())))?;
    eprintln!(
        "mora-exec: no cache daemon at {}; started one (pid {}, log {})",
        socket.display(),
        child.id(),
        log.display()
    );
    let mut give_up_at = Instant::now() + START_TIMEOUT;
    loop {
        match Connection::connect(socket, CLIENT) {
            Ok(c) => return Ok(c),
            Err(ConnectError::NotRunning(_)) => {}
            Err(e) => return Err(ExecError::Connect(e.to_string())),
        }
        // A daemon that exits at once may have lost a race to another one
        // that is about to answer: give that one a moment, not the full wait.
        if let Ok(Some(_)) = child.try_wait() {
            give_up_at = give_up_at.min(Instant::now() + Duration::from_secs(2));
        }
        if Instant::now() > give_up_at {
            let last = fs::read_to_string(&log)
                .ok()
                .and_then(|l| l.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string))
                .unwrap_or_default();
            return Err(ExecError::Connect(format!(
                "the cache daemon started for {} did not answer: {}",
                socket.display(),
                if last.is_empty() { format!("see {}", log.display()) } else { last }
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
