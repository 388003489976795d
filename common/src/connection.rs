//! A blocking connection to the daemon, for short-lived clients
//! (`mora-exec`, `mora-cache ps`/`stop`, the Python package), and starting a
//! daemon when none answers.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::frame::{self, FrameError};
use crate::protocol::{Hello, HelloReply, Request, Response, HELLO_MAGIC, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no cache daemon is listening at {}", .0.display())]
    NotRunning(PathBuf),
    #[error("cannot connect to the cache daemon at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the cache daemon at {} refused this client: {message}", path.display())]
    Refused { path: PathBuf, message: String },
    #[error("the cache daemon at {} broke the handshake: {source}", path.display())]
    Handshake { path: PathBuf, source: FrameError },
    /// Starting a daemon (see [`connect_or_start`]) failed; one line, with the cause.
    #[error("{0}")]
    Start(String),
}

/// How long to wait for an auto-started daemon to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the daemon at `socket`. When none listens and `start` names a
/// `mora-cache` binary, starts `BINARY serve --socket SOCKET` in the
/// background (its own process group, so a Ctrl-C on the client does not
/// stop it; its log beside the socket), says so in one line on stderr
/// prefixed with the client's first word, and waits for it to answer.
/// Without `start`, a missing daemon is [`ConnectError::NotRunning`].
pub fn connect_or_start(socket: &Path, client: &str, start: Option<&Path>) -> Result<Connection, ConnectError> {
    let binary = match Connection::connect(socket, client) {
        Ok(c) => return Ok(c),
        Err(ConnectError::NotRunning(p)) => match start {
            Some(b) => b,
            None => return Err(ConnectError::NotRunning(p)),
        },
        Err(e) => return Err(e),
    };
    let dir = socket.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ConnectError::Start(format!("cannot create socket directory {}: {e}", dir.display())))?;
    }
    let log = crate::paths::log_path(socket);
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| ConnectError::Start(format!("cannot open daemon log {}: {e}", log.display())))?;
    let mut child = Command::new(binary)
        .arg("serve")
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .map_err(|e| ConnectError::Start(format!("cannot start {}: {e}", binary.display())))?;
    eprintln!(
        "{}: no cache daemon at {}; started one (pid {}, log {})",
        client.split_whitespace().next().unwrap_or(client),
        socket.display(),
        child.id(),
        log.display()
    );
    let mut give_up_at = Instant::now() + START_TIMEOUT;
    loop {
        match Connection::connect(socket, client) {
            Ok(c) => return Ok(c),
            Err(ConnectError::NotRunning(_)) => {}
            Err(e) => return Err(e),
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
            return Err(ConnectError::Start(format!(
                "the cache daemon started for {} did not answer: {}",
                socket.display(),
                if last.is_empty() { format!("see {}", log.display()) } else { last }
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("lost the connection to the cache daemon: {0}")]
    Frame(#[from] FrameError),
}

pub struct Connection {
    stream: UnixStream,
    path: PathBuf,
    daemon_pid: u32,
}

impl Connection {
    /// Connects and performs the version handshake. `client` names this
    /// program in the daemon's log.
    pub fn connect(path: &Path, client: &str) -> Result<Connection, ConnectError> {
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Err(ConnectError::NotRunning(path.to_path_buf()))
            }
            Err(e) => return Err(ConnectError::Io { path: path.to_path_buf(), source: e }),
        };
        let handshake = |source| ConnectError::Handshake { path: path.to_path_buf(), source };
        let hello = Hello { magic: HELLO_MAGIC, version: PROTOCOL_VERSION, client: client.to_string() };
        frame::write_message(&stream, &hello).map_err(handshake)?;
        let reply: HelloReply = frame::read_message(&stream, &mut Vec::new()).map_err(handshake)?;
        if !reply.accepted {
            return Err(ConnectError::Refused { path: path.to_path_buf(), message: reply.message });
        }
        Ok(Connection { stream, path: path.to_path_buf(), daemon_pid: reply.daemon_pid })
    }

    pub fn daemon_pid(&self) -> u32 {
        self.daemon_pid
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and waits for its response, with any descriptors
    /// that came with it. Progress reports on the way are skipped.
    pub fn call(&self, request: &Request) -> Result<(Response, Vec<OwnedFd>), CallError> {
        self.call_with_progress(request, |_, _, _| {})
    }

    /// Like [`Connection::call`], showing the load a slow answer waits on
    /// as `program`'s progress bar on stderr ([`LoadProgress`]), cleared
    /// before this returns.
    ///
    /// [`LoadProgress`]: crate::progress::LoadProgress
    pub fn call_showing_load(
        &self,
        request: &Request,
        program: &'static str,
    ) -> Result<(Response, Vec<OwnedFd>), CallError> {
        let mut bar = crate::progress::LoadProgress::new(program);
        self.call_with_progress(request, |n, done, total| bar.update(n, done, total))
    }

    /// Like [`Connection::call`], handing each progress report to `progress`
    /// as (model name, bytes done, bytes total).
    pub fn call_with_progress(
        &self,
        request: &Request,
        mut progress: impl FnMut(&str, u64, u64),
    ) -> Result<(Response, Vec<OwnedFd>), CallError> {
        frame::write_message(&self.stream, request)?;
        let mut fds = Vec::new();
        loop {
            match frame::read_message(&self.stream, &mut fds)? {
                Response::Progress { name, done, total } => progress(&name, done, total),
                response => return Ok((response, fds)),
            }
        }
    }
}
