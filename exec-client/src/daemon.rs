//! Reaching the cache daemon, starting one when none answers.

use std::path::{Path, PathBuf};

use mora_common::connection::{connect_or_start, ConnectError, Connection};

use crate::ExecError;

pub const CLIENT: &str = concat!("mora-exec ", env!("CARGO_PKG_VERSION"));

/// The `mora-cache` binary: beside this executable, else on `PATH`.
pub(crate) fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("mora-cache")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mora-cache"))
}

/// Connects to the daemon at `socket`. When none listens and `autostart` is
/// set, starts `mora-cache serve` in the background and waits for it
/// ([`connect_or_start`]).
pub fn connect(socket: &Path, autostart: bool) -> Result<Connection, ExecError> {
    let binary = daemon_binary();
    connect_or_start(socket, CLIENT, autostart.then_some(binary.as_path())).map_err(|e| match e {
        ConnectError::NotRunning(socket) => ExecError::NoDaemon { socket },
        other => ExecError::Connect(other),
    })
}
