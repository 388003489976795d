//! A blocking connection to the daemon, for short-lived clients
//! (`mora-exec`, and `mora-cache ps`/`stop`).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
