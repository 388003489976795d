//! The daemon's accept loop and per-connection protocol handling.
//!
//! Each connection runs in its own task. Whatever a peer sends (garbage, an
//! oversized length, a foreign protocol version, a request that fails), the
//! damage is limited to that connection: it gets an error or is closed, and
//! the leases it held are released when its task ends.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use mora_common::frame::{self, FrameError};
use mora_common::protocol::{
    Acquired, DaemonStatus, Device, ErrorKind, ErrorReply, Hello, HelloReply, Request, Response, HELLO_MAGIC,
    PROTOCOL_VERSION,
};

use crate::checkpoint::Storage;
use crate::gpu::GpuMemory;
use crate::metrics::Refusal;

use crate::registry::{Grant, Lease, Limits, ProgressSlot, Registry, Wants};
use crate::socket::BoundSocket;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping daemon waits for requests in progress (a load a
/// client waits on, say) to be answered.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Daemon {
    registry: Arc<Registry>,
    shutdown: watch::Sender<bool>,
    /// Requests being handled now.
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

/// Why a connection got no further than its hello.
struct HandshakeFailed {
    reason: String,
    /// The peer closed before sending anything.
    silent: bool,
}

impl From<String> for HandshakeFailed {
    fn from(reason: String) -> Self {
        HandshakeFailed { reason, silent: false }
    }
}

/// Counts a request as in progress while it lives.
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Busy {
    fn new(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Busy {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(counter.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Daemon {
    pub fn new(limits: Limits) -> Self {
        Self::with_gpus(limits, None)
    }

    /// A daemon that also holds weights on the GPUs `gpus` offers.
    pub fn with_gpus(limits: Limits, gpus: Option<Arc<dyn GpuMemory>>) -> Self {
        Daemon {
            registry: Arc::new(Registry::with_gpus(limits, gpus)),
            shutdown: watch::channel(false).0,
            busy: Arc::default(),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Asks [`Daemon::serve`] to return.
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Serves `socket` until a client sends `Stop`, or SIGINT or SIGTERM
    /// arrives, and metrics on `metrics` (from [`crate::scrape::bind`]) if
    /// given. The socket file is removed on return.
    pub async fn serve(self: Arc<Self>, socket: BoundSocket, metrics: Option<std::net::TcpListener>) -> std::io::Result<()> {
        socket.listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(socket.listener.try_clone()?)?;
        let metrics = metrics.map(tokio::net::TcpListener::from_std).transpose()?;
        let mut shutdown = self.shutdown.subscribe();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let uid = rustix::process::getuid().as_raw();
        let limits = self.registry.limits();
        tracing::info!(
            socket = %socket.path().display(),
            pid = std::process::id(),
            protocol = PROTOCOL_VERSION,
            budget = %mora_common::units::human_bytes(limits.budget),
            keep_alive = %limits.default_keep_alive,
            "serving"
        );
        for g in self.registry.gpu_status() {
            tracing::info!(gpu = %g.uuid, ordinal = g.ordinal, name = %g.name, budget = %mora_common::units::human_bytes(g.budget), "serving GPU");
        }
        let reaper = tokio::spawn(reap(self.registry.clone()));
        let scraped = match metrics {
            Some(l) => {
                let url = format!("http://{}{}", l.local_addr()?, crate::scrape::PATH);
                tracing::info!(%url, "serving metrics");
                let exposition = Arc::new(crate::metrics::exposition(self.registry.metrics(), self.registry.clone()));
                Some(tokio::spawn(crate::scrape::serve(l, exposition, crate::scrape::Bounds::default())))
            }
            None => None,
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let daemon = self.clone();
                        tokio::spawn(async move { daemon.connection(stream, uid).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        tracing::info!(socket = %socket.path().display(), "shutting down");
        self.request_shutdown();
        drop(listener);
        drop(socket);
        // The port goes with the socket, so that a daemon started now (by a
        // service manager, say) can take both while this one drains.
        if let Some(task) = scraped {
            task.abort();
        }
        // Requests in progress are answered (idle connections close at
        // once); a second signal, or the drain timeout, cuts this short.
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let busy = || self.busy.load(std::sync::atomic::Ordering::SeqCst);
        if busy() > 0 {
            tracing::info!(requests = busy(), "answering the requests in progress before exiting");
        }
        while busy() > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tokio::time::sleep_until(deadline) => { tracing::warn!(requests = busy(), "drain timeout: exiting with requests unanswered"); break }
                _ = sigterm.recv() => { tracing::warn!(requests = busy(), "second signal: exiting with requests unanswered"); break }
                _ = sigint.recv() => { tracing::warn!(requests = busy(), "second signal: exiting with requests unanswered"); break }
            }
        }
        reaper.abort();
        // GPU memory vanishes with the process that allocated it: wait for
        // the clients that map some to finish (a second signal stops at once).
        let mut waited = false;
        while self.registry.gpu_leases() > 0 {
            if !waited {
                tracing::info!(leases = self.registry.gpu_leases(), "waiting for clients that map GPU memory to finish");
                waited = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = sigterm.recv() => { tracing::warn!("stopping with GPU memory still mapped by clients"); break }
                _ = sigint.recv() => { tracing::warn!("stopping with GPU memory still mapped by clients"); break }
            }
        }
        Ok(())
    }

    async fn connection(self: Arc<Self>, mut stream: UnixStream, uid: u32) {
        let peer = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; closing");
                return;
            }
        };
        let pid = peer.pid().unwrap_or(0);
        if peer.uid() != uid {
            tracing::warn!(peer_uid = peer.uid(), pid, "refusing a peer of another uid");
            self.registry.metrics().refused(Refusal::Handshake);
            // Say why, if the peer says hello in time; then close.
            let refuse = async {
                read_frame(&mut stream).await.ok()?;
                let reply = HelloReply {
                    version: PROTOCOL_VERSION,
                    accepted: false,
                    message: format!("this daemon serves uid {uid} only, and you are uid {}", peer.uid()),
                    daemon_pid: std::process::id(),
                };
                write_response(&mut stream, &reply, &[]).await.ok()
            };
            let _ = tokio::time::timeout(HELLO_TIMEOUT, refuse).await;
            return;
        }
        match tokio::time::timeout(HELLO_TIMEOUT, self.handshake(&mut stream)).await {
            Ok(Ok(client)) => tracing::debug!(pid, %client, "client connected"),
            Ok(Err(failed)) => {
                tracing::warn!(pid, reason = %failed.reason, "handshake failed; closing");
                // A peer that closes without a word only checked that the
                // daemon listens (as a client does before starting one).
                if !failed.silent {
                    self.registry.metrics().refused(Refusal::Handshake);
                }
                return;
            }
            Err(_) => {
                tracing::warn!(pid, "no hello within {HELLO_TIMEOUT:?}; closing");
                self.registry.metrics().refused(Refusal::Handshake);
                return;
            }
        }
        let _connected = self.registry.metrics().connected();
        let mut leases: HashMap<u64, Lease> = HashMap::new();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            // Idle, a connection closes as soon as the daemon stops, unless
            // it holds GPU memory (which the daemon must keep until the
            // client lets go); a request that has begun is answered first.
            let holds_gpu = leases.values().any(|l| matches!(l.device(), Device::Cuda(_)));
            let payload = tokio::select! {
                frame = read_frame(&mut stream) => match frame {
                    Ok(p) => p,
                    Err(FrameError::Closed) => break,
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "unreadable frame; closing");
                        break;
                    }
                },
                _ = shutdown.wait_for(|stop| *stop), if !holds_gpu => break,
            };
            let _busy = Busy::new(&self.busy);
            let request: Request = match frame::decode(&payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(pid, error = %e, "malformed request");
                    self.registry.metrics().refused(Refusal::BadRequest);
                    let reply = Response::Error(ErrorReply {
                        kind: ErrorKind::BadRequest,
                        message: format!("malformed request: {e}"),
                    });
                    if write_response(&mut stream, &reply, &[]).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            let stop = matches!(request, Request::Stop);
            if let Err(e) = self.handle(&mut stream, request, &mut leases, pid).await {
                tracing::debug!(pid, error = %e, "client went away mid-reply");
                break;
            }
            if stop {
                self.request_shutdown();
            }
        }
        if !leases.is_empty() {
            tracing::info!(pid, leases = leases.len(), "connection closed; releasing its leases");
        }
    }

    async fn handshake(&self, stream: &mut UnixStream) -> Result<String, HandshakeFailed> {
        let payload = read_frame(stream)
            .await
            .map_err(|e| HandshakeFailed { silent: matches!(e, FrameError::Closed), reason: e.to_string() })?;
        let hello: Hello = frame::decode(&payload).map_err(|e| HandshakeFailed::from(format!("not a Mora hello: {e}")))?;
        if hello.magic != HELLO_MAGIC {
            return Err(format!("bad magic {:#x}", hello.magic).into());
        }
        let pid = std::process::id();
        if hello.version != PROTOCOL_VERSION {
            let reply = HelloReply::version_mismatch(PROTOCOL_VERSION, hello.version, pid);
            let _ = write_response(stream, &reply, &[]).await;
            return Err(reply.message.into());
        }
        let reply = HelloReply { version: PROTOCOL_VERSION, accepted: true, message: String::new(), daemon_pid: pid };
        write_response(stream, &reply, &[]).await.map_err(|e| HandshakeFailed::from(e.to_string()))?;
        Ok(hello.client)
    }

    async fn handle(
        &self,
        stream: &mut UnixStream,
        request: Request,
        leases: &mut HashMap<u64, Lease>,
        pid: i32,
    ) -> Result<(), FrameError> {
        match request {
            Request::Acquire { source, dtype, device, keep_alive } => {
                let name = source.display_name();
                let wants = Wants { keep_alive, pin: false };
                match self.acquire_reporting(stream, &name, source, dtype, device, wants, pid).await? {
                    Ok(grant) => {
                        let r = &grant.resident;
                        let reply = Response::Acquired(Acquired {
                            lease: grant.lease.id(),
                            name: grant.name.clone(),
                            dir: grant.dir.clone(),
                            manifest: r.manifest.clone(),
                            segment: r.storage.descriptor(),
                            loaded_now: grant.loaded_now,
                            load_ms: if grant.loaded_now { r.load_ms } else { 0 },
                            tokenizer: r.tokenizer.as_ref().map(|t| t.len()),
                        });
                        tracing::info!(pid, model = %name, lease = grant.lease.id(), warm = !grant.loaded_now, "lease granted");
                        // The segment's descriptor (host memory), then the
                        // prepared tokenizer's, in the order `Acquired::descriptors` takes them.
                        let mut fds = Vec::new();
                        if let Storage::Host(segment) = &r.storage {
                            fds.push(segment.fd().try_clone_to_owned().map_err(FrameError::Io)?);
                        }
                        if let Some(t) = &r.tokenizer {
                            fds.push(t.fd().try_clone_to_owned().map_err(FrameError::Io)?);
                        }
                        // The lease is recorded before the reply goes out, so
                        // a client that dies while reading it still releases it.
                        leases.insert(grant.lease.id(), grant.lease);
                        let fds: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
                        write_response(stream, &reply, &fds).await
                    }
                    Err(e) => {
                        tracing::info!(pid, model = %name, error = %e.message, "acquire refused");
                        write_response(stream, &Response::Error(e), &[]).await
                    }
                }
            }
            Request::Load { source, dtype, device, pin, keep_alive } => {
                let wants = Wants { keep_alive, pin };
                let name = source.display_name();
                let reply = match self.acquire_reporting(stream, &name, source, dtype, device, wants, pid).await? {
                    Ok(grant) => {
                        let key_name = grant.name.clone();
                        drop(grant.lease);
                        let status = self
                            .registry
                            .list()
                            .into_iter()
                            .find(|m| m.names.contains(&key_name) && m.dtype == dtype && m.device == device);
                        match status {
                            Some(s) => Response::Loaded(s),
                            // keep-alive 0 and no pin: loaded and let go at once.
                            None => Response::Changed { models: vec![key_name], bytes: 0 },
                        }
                    }
                    Err(e) => Response::Error(e),
                };
                write_response(stream, &reply, &[]).await
            }
            Request::Evict { target } => {
                let reply = match self.registry.evict(&target) {
                    Ok((models, bytes)) => Response::Changed { models, bytes },
                    Err(e) => Response::Error(e),
                };
                write_response(stream, &reply, &[]).await
            }
            Request::Pin { target } => {
                let reply = match self.registry.set_pinned(&target, true) {
                    Ok(models) => Response::Changed { models, bytes: 0 },
                    Err(e) => Response::Error(e),
                };
                write_response(stream, &reply, &[]).await
            }
            Request::Unpin { target } => {
                let reply = match self.registry.set_pinned(&target, false) {
                    Ok(models) => Response::Changed { models, bytes: 0 },
                    Err(e) => Response::Error(e),
                };
                write_response(stream, &reply, &[]).await
            }
            Request::Clear => {
                let (models, bytes) = self.registry.clear();
                write_response(stream, &Response::Changed { models, bytes }, &[]).await
            }
            Request::Release { lease } => {
                let reply = match leases.remove(&lease) {
                    Some(_) => Response::Released { lease },
                    None => {
                        self.registry.metrics().refused(Refusal::BadRequest);
                        Response::Error(ErrorReply {
                            kind: ErrorKind::BadRequest,
                            message: format!("lease {lease} is not held by this connection"),
                        })
                    }
                };
                write_response(stream, &reply, &[]).await
            }
            Request::List => {
                let limits = self.registry.limits();
                let status = DaemonStatus {
                    pid: std::process::id(),
                    budget: limits.budget,
                    used: self.registry.used(Device::Cpu),
                    default_keep_alive: limits.default_keep_alive,
                    gpus: self.registry.gpu_status(),
                    models: self.registry.list(),
                };
                write_response(stream, &Response::Status(status), &[]).await
            }
            Request::Stop => {
                tracing::info!(pid, "stop requested");
                write_response(stream, &Response::Stopping, &[]).await
            }
        }
    }
}

impl Daemon {
    /// Acquires, sending the client a progress report every 250 ms while
    /// the acquire waits on a load (none for a quick one).
    #[allow(clippy::too_many_arguments)]
    async fn acquire_reporting(
        &self,
        stream: &mut UnixStream,
        name: &str,
        source: mora_common::ModelSource,
        dtype: mora_common::manifest::WeightDType,
        device: Device,
        wants: Wants,
        pid: i32,
    ) -> Result<Result<Grant, ErrorReply>, FrameError> {
        let slot = ProgressSlot::default();
        let acquire = self.registry.acquire(source, dtype, device, wants, pid, &slot);
        tokio::pin!(acquire);
        let period = Duration::from_millis(250);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut last = None;
        loop {
            tokio::select! {
                granted = &mut acquire => return Ok(granted),
                _ = tick.tick() => {
                    if let Some((done, total)) = slot.get() {
                        if last != Some(done) {
                            last = Some(done);
                            let report = Response::Progress { name: name.to_string(), done, total };
                            write_response(stream, &report, &[]).await?;
                        }
                    }
                }
            }
        }
    }
}

/// Evicts idle models whose keep-alive has run out, waking when the next
/// one is due (and at least every 100 ms, since a release can start a clock).
async fn reap(registry: Arc<Registry>) {
    loop {
        let next = registry.reap().unwrap_or(Duration::from_millis(100));
        tokio::time::sleep(next.clamp(Duration::from_millis(1), Duration::from_millis(100))).await;
    }
}

async fn read_frame(stream: &mut UnixStream) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let mut payload = vec![0u8; frame::payload_len(prefix)?];
    stream.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(payload)
}

async fn write_response<T: serde::Serialize>(
    stream: &mut UnixStream,
    msg: &T,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), FrameError> {
    let bytes = frame::encode(msg)?;
    let mut sent = 0;
    if !fds.is_empty() {
        sent = stream.async_io(Interest::WRITABLE, || frame::send_with_fds(&*stream, &bytes, fds)).await?;
    }
    stream.write_all(&bytes[sent..]).await?;
    Ok(())
}
