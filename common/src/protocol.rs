//! The messages exchanged over the daemon's socket, and nothing else.
//!
//! A connection starts with a [`Hello`] from the client and a [`HelloReply`]
//! from the daemon. Those two types are frozen: every protocol version must be
//! able to decode them, so that a client and a daemon of different versions
//! can at least tell each other so. After an accepted handshake the client
//! sends [`Request`]s and reads one [`Response`] for each.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

use crate::manifest::{Manifest, WeightDType};
use crate::model::ModelSource;
use crate::units::KeepAlive;

/// Bumped whenever [`Request`] or [`Response`] change shape.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame either side accepts (16 MiB). A manifest of a model with
/// 100 000 tensors fits comfortably; a length above this is a corrupt or
/// hostile peer, and the connection is closed without allocating.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// First frame of every connection. Frozen: never change its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`HELLO_MAGIC`]; tells a Mora peer from a stray writer.
    pub magic: u32,
    pub version: u32,
    /// What the peer is, for the daemon's log ("mora-exec 0.1.0").
    pub client: String,
}

/// "MORA" in ASCII.
pub const HELLO_MAGIC: u32 = 0x4d4f_5241;

/// The daemon's answer to [`Hello`]. Frozen: never change its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u32,
    pub accepted: bool,
    /// Why the handshake was refused, ready to show to a user.
    pub message: String,
    pub daemon_pid: u32,
}

impl HelloReply {
    /// The refusal a daemon speaking `ours` gives a client speaking `theirs`.
    pub fn version_mismatch(ours: u32, theirs: u32, daemon_pid: u32) -> Self {
        HelloReply {
            version: ours,
            accepted: false,
            message: format!(
                "daemon speaks protocol {ours}, client speaks {theirs}: restart the daemon \
                 (mora-cache stop) so that the one matching this client starts"
            ),
            daemon_pid,
        }
    }
}

/// Where a model's weights should live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Device {
    /// Sealed shared memory, mapped read-only by clients.
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            other => Err(format!("unknown device `{other}`: this build supports `cpu`")),
        }
    }
}

/// Identifies one lease within the daemon's lifetime.
pub type LeaseId = u64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Make the model resident (loading it if needed) and lend it: the
    /// response carries the manifest and the segment, and a lease that holds
    /// the model resident until released or until this connection closes.
    /// `keep_alive`, when given, becomes the model's keep-alive.
    Acquire {
        source: ModelSource,
        dtype: WeightDType,
        device: Device,
        keep_alive: Option<KeepAlive>,
    },
    /// End a lease early. Closing the connection ends all of its leases.
    Release { lease: LeaseId },
    /// Describe the daemon and every model it holds or is loading.
    List,
    /// Make a model resident without lending it (`mora-cache load`).
    Load {
        source: ModelSource,
        dtype: WeightDType,
        device: Device,
        pin: bool,
        keep_alive: Option<KeepAlive>,
    },
    /// Evict the models the selector names; refused for leased or pinned ones.
    Evict { target: Selector },
    /// Protect the named models from eviction (budget and keep-alive alike).
    Pin { target: Selector },
    Unpin { target: Selector },
    /// Evict every model with no lease and no pin.
    Clear,
    /// Shut the daemon down. Clients holding leases keep their mappings.
    Stop,
}

/// Names resident models for the admin requests: every entry one of whose
/// names is `name` (and whose dtype is `dtype`, when given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    pub name: String,
    pub dtype: Option<WeightDType>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Acquire`]. The frame that carries it also carries
    /// the segment's file descriptor (SCM_RIGHTS) when `segment` says so.
    Acquired(Acquired),
    /// Sent, zero or more times, before the answer to an acquire or load
    /// that waits on a load taking longer than a moment: bytes of `name`
    /// loaded so far, of `total`.
    Progress { name: String, done: u64, total: u64 },
    Released { lease: LeaseId },
    Status(DaemonStatus),
    /// Answer to [`Request::Load`]: the model as it now stands.
    Loaded(ModelStatus),
    /// Answer to evict, pin, unpin and clear: the models acted on and the
    /// bytes freed (zero for pin and unpin).
    Changed { models: Vec<String>, bytes: u64 },
    Stopping,
    Error(ErrorReply),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acquired {
    pub lease: LeaseId,
    /// Display name ("sentence-transformers/all-MiniLM-L6-v2").
    pub name: String,
    /// The directory the daemon loaded from, where the client finds the
    /// small files (config, tokenizer, pooling) that are not weights.
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub segment: SegmentDescriptor,
    /// True when this request made the daemon read the files (a cold start).
    pub loaded_now: bool,
    /// How long the load took, when `loaded_now`.
    pub load_ms: u64,
}

/// How the bytes described by a manifest reach the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentDescriptor {
    /// A sealed memfd of `len` bytes travels with the response frame.
    Memfd { len: u64 },
}

/// The daemon as a whole, as `mora-cache ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    /// Most bytes the daemon will hold resident (or reserve for loads) at once.
    pub budget: u64,
    /// Bytes resident or reserved for loads in progress now.
    pub used: u64,
    pub default_keep_alive: KeepAlive,
    pub models: Vec<ModelStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelState {
    Loading,
    Resident,
}

/// One model the daemon holds or is loading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The first name it was requested by.
    pub name: String,
    /// Every name that resolved to these same bytes, first one first.
    pub names: Vec<String>,
    pub state: ModelState,
    pub dir: PathBuf,
    pub dtype: WeightDType,
    pub device: Device,
    /// Bytes of the resident copy (reserved bytes while loading).
    pub bytes: u64,
    pub tensors: u64,
    /// Leases open now, and the pids that hold them.
    pub leases: u64,
    pub lease_pids: Vec<i32>,
    pub pinned: bool,
    pub keep_alive: KeepAlive,
    /// When an idle model will be evicted, if nothing uses it before.
    pub expires_unix_ms: Option<u64>,
    /// Times the weights were read from disk into this entry.
    pub loads: u64,
    /// Leases granted on this entry, the one that loaded it included.
    pub hits: u64,
    /// Milliseconds since the Unix epoch of the last acquire or release.
    pub last_used_unix_ms: u64,
    pub load_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    /// One line, ready to show to a user: what, where, what to do.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The model reference does not resolve to files on disk.
    NotFound,
    /// The files exist but are not a loadable checkpoint.
    InvalidModel,
    /// The request names something the daemon cannot do.
    BadRequest,
    /// The daemon failed for a reason of its own (out of memory, I/O).
    Internal,
    /// The model does not fit in the budget even after every possible eviction.
    NoRoom,
    /// The request is valid but the model's state forbids it (leased, pinned).
    Refused,
}
