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
pub const PROTOCOL_VERSION: u32 = 5;

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

/// A GPU's UUID as the CUDA driver reports it (`cuDeviceGetUuid`). GPUs are
/// named by UUID on the wire, never by ordinal: an ordinal depends on each
/// process's `CUDA_VISIBLE_DEVICES`, so daemon and client may number the
/// same GPU differently.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuUuid(pub [u8; 16]);

impl fmt::Display for GpuUuid {
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as `nvidia-smi -L` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GPU-")?;
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for GpuUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for GpuUuid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)");
        let hex: String = s.strip_prefix("GPU-").unwrap_or(s).chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(GpuUuid(out))
    }
}

/// Where a model's weights live, as the wire carries it: resolved by the
/// requesting process (see [`DeviceSpec`]) before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Device {
    /// Sealed shared memory, mapped read-only by clients.
    Cpu,
    /// Memory of the GPU with this UUID, lent as a CUDA IPC handle.
    Cuda(GpuUuid),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(uuid) => write!(f, "cuda {uuid}"),
        }
    }
}

/// A device as a user names it: in a workflow's model table or on the
/// command line. Resolved to a [`Device`] in the process that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    Cpu,
    /// `cuda:N`: the Nth GPU this process sees (`cuda` alone is `cuda:0`).
    Cuda(u32),
    /// The first GPU when this build has CUDA and the machine a GPU, else the CPU.
    #[default]
    Auto,
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device `{other}`: expected cpu, cuda:N or auto")),
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
    /// file descriptors (SCM_RIGHTS): the segment's when `segment` says so,
    /// then the prepared tokenizer's when `tokenizer` says so.
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
    /// Bytes of the sealed memfd holding the model's `tokenizer.json` as the
    /// daemon prepared it (`mora_tokenizers::vocab::Prepared`), when it did.
    pub tokenizer: Option<u64>,
}

impl Acquired {
    /// Splits the descriptors that came with this reply into the segment's
    /// (for a memfd segment) and the prepared tokenizer's (when there is
    /// one), in that order; an error when there are more or fewer.
    pub fn descriptors(&self, fds: Vec<std::os::fd::OwnedFd>) -> Result<(Option<std::os::fd::OwnedFd>, Option<std::os::fd::OwnedFd>), String> {
        let segment = matches!(self.segment, SegmentDescriptor::Memfd { .. });
        let tokenizer = self.tokenizer.is_some();
        let expected = segment as usize + tokenizer as usize;
        if fds.len() != expected {
            return Err(format!(
                "the daemon lent {} with {} file descriptors where its reply announces {expected}",
                self.name,
                fds.len()
            ));
        }
        let mut fds = fds.into_iter();
        let segment = if segment { fds.next() } else { None };
        Ok((segment, fds.next()))
    }
}

/// The handle `cuIpcGetMemHandle` fills in: opaque bytes that let another
/// process on the same machine map the allocation (`cuIpcOpenMemHandle`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle(pub [u8; 64]);

impl fmt::Debug for IpcHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IpcHandle(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl Serialize for IpcHandle {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for IpcHandle {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IpcHandle;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 bytes of CUDA IPC handle")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<IpcHandle, E> {
                let bytes: [u8; 64] = v.try_into().map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(IpcHandle(bytes))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// How the bytes described by a manifest reach the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentDescriptor {
    /// A sealed memfd of `len` bytes travels with the response frame.
    Memfd { len: u64 },
    /// One `cuMemAlloc` allocation of `len` bytes on the GPU `gpu`, exported
    /// with `cuIpcGetMemHandle`. No descriptor travels with the frame.
    CudaIpc { handle: IpcHandle, gpu: GpuUuid, len: u64 },
}

impl SegmentDescriptor {
    pub fn len(&self) -> u64 {
        match self {
            SegmentDescriptor::Memfd { len } | SegmentDescriptor::CudaIpc { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device whose memory this segment is.
    pub fn device(&self) -> Device {
        match self {
            SegmentDescriptor::Memfd { .. } => Device::Cpu,
            SegmentDescriptor::CudaIpc { gpu, .. } => Device::Cuda(*gpu),
        }
    }

    /// Checks that the daemon lent what was asked for: a client that asked
    /// for `requested` must never view a segment of another device (a CUDA
    /// handle as host memory, or the reverse, or another GPU's memory).
    pub fn check_device(&self, requested: Device) -> Result<(), String> {
        let lent = self.device();
        if lent == requested {
            return Ok(());
        }
        let what = |d: Device| match d {
            Device::Cpu => "shared host memory".to_string(),
            Device::Cuda(u) => format!("memory of GPU {u}"),
        };
        Err(format!(
            "asked the daemon for weights in {} but it lent {}: the daemon and this client disagree on \
             devices (restart the daemon with `mora-cache stop`)",
            what(requested),
            what(lent)
        ))
    }
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
    /// The GPUs this daemon can hold weights on (none in a build without CUDA).
    pub gpus: Vec<GpuStatus>,
    pub models: Vec<ModelStatus>,
}

/// One GPU as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub uuid: GpuUuid,
    /// Its ordinal in the daemon's own numbering (its `CUDA_VISIBLE_DEVICES`).
    pub ordinal: u32,
    pub name: String,
    /// Most bytes of weights the daemon holds on it.
    pub budget: u64,
    pub used: u64,
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

impl ModelStatus {
    /// One model as `mora-cache ps --json` and Python's `Client.ps()` show it:
    /// times in seconds since the Unix epoch, the keep-alive as it is written.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "names": self.names,
            "state": match self.state { ModelState::Loading => "loading", ModelState::Resident => "resident" },
            "dir": self.dir,
            "dtype": self.dtype.to_string(),
            "device": self.device.to_string(),
            "bytes": self.bytes,
            "tensors": self.tensors,
            "leases": self.leases,
            "lease_pids": self.lease_pids,
            "pinned": self.pinned,
            "keep_alive": self.keep_alive.to_string(),
            "expires": self.expires_unix_ms.map(|ms| ms / 1000),
            "loads": self.loads,
            "hits": self.hits,
            "last_used": self.last_used_unix_ms / 1000,
            "load_ms": self.load_ms,
        })
    }
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
    /// The request names something the daemon cannot do (a device it does
    /// not have included).
    BadRequest,
    /// The daemon failed for a reason of its own (out of memory, I/O).
    Internal,
    /// The model does not fit in the budget even after every possible eviction.
    NoRoom,
    /// The request is valid but the model's state forbids it (leased, pinned).
    Refused,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + for<'de> Deserialize<'de>>(v: &T) -> T {
        postcard::from_bytes(&postcard::to_stdvec(v).unwrap()).unwrap()
    }

    const UUID: GpuUuid = GpuUuid([
        0x8c, 0x1f, 0x0a, 0x55, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x02, 0x03, 0x04,
    ]);

    #[test]
    fn segment_descriptors_round_trip_both_kinds() {
        let mut handle = [0u8; 64];
        for (i, b) in handle.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        for seg in [
            SegmentDescriptor::Memfd { len: 90_868_736 },
            SegmentDescriptor::CudaIpc { handle: IpcHandle(handle), gpu: UUID, len: 1 << 33 },
        ] {
            assert_eq!(round_trip(&seg), seg);
            let resp = Response::Acquired(Acquired {
                lease: 3,
                name: "m".into(),
                dir: "/m".into(),
                manifest: Manifest::default(),
                segment: seg.clone(),
                loaded_now: false,
                load_ms: 0,
                tokenizer: Some(1_200_000),
            });
            assert_eq!(round_trip(&resp), resp);
        }
        for d in [Device::Cpu, Device::Cuda(UUID)] {
            assert_eq!(round_trip(&d), d);
        }
    }

    #[test]
    fn an_acquired_reply_takes_exactly_the_descriptors_it_announces() {
        let fd = || std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let reply = |segment, tokenizer| Acquired {
            lease: 1,
            name: "m".into(),
            dir: "/m".into(),
            manifest: Manifest::default(),
            segment,
            loaded_now: false,
            load_ms: 0,
            tokenizer,
        };
        let host = SegmentDescriptor::Memfd { len: 8 };
        let gpu = SegmentDescriptor::CudaIpc { handle: IpcHandle([0; 64]), gpu: UUID, len: 8 };
        let got = |a: &Acquired, n: usize| a.descriptors((0..n).map(|_| fd()).collect()).map(|(s, t)| (s.is_some(), t.is_some()));
        assert_eq!(got(&reply(host.clone(), None), 1), Ok((true, false)));
        assert_eq!(got(&reply(host.clone(), Some(4)), 2), Ok((true, true)));
        assert_eq!(got(&reply(gpu.clone(), Some(4)), 1), Ok((false, true)));
        assert_eq!(got(&reply(gpu.clone(), None), 0), Ok((false, false)));
        for (a, n) in [(reply(host.clone(), None), 2), (reply(host, Some(4)), 1), (reply(gpu, None), 1)] {
            let e = got(&a, n).unwrap_err();
            assert!(e.contains("file descriptors where its reply announces"), "{e}");
        }
    }

    #[test]
    fn a_handle_of_the_wrong_length_is_refused() {
        // 63 bytes where 64 belong: a corrupt or foreign peer.
        let short = postcard::to_stdvec(&serde_bytes_of(&[1u8; 63])).unwrap();
        assert!(postcard::from_bytes::<IpcHandle>(&short).is_err());
        let right = postcard::to_stdvec(&serde_bytes_of(&[1u8; 64])).unwrap();
        assert_eq!(postcard::from_bytes::<IpcHandle>(&right).unwrap(), IpcHandle([1; 64]));
    }

    /// Serializes a byte string the way [`IpcHandle`] does.
    fn serde_bytes_of(b: &[u8]) -> impl Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl Serialize for B<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }

    #[test]
    fn gpu_uuids_print_and_parse_as_nvidia_smi_does() {
        let text = UUID.to_string();
        assert_eq!(text, "GPU-8c1f0a55-1234-5678-9abc-def001020304");
        assert_eq!(text.parse::<GpuUuid>(), Ok(UUID));
        assert!("GPU-8c1f".parse::<GpuUuid>().is_err());
        assert!("GPU-zz1f0a55-1234-5678-9abc-def001020304".parse::<GpuUuid>().is_err());
    }

    #[test]
    fn device_specs_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA:0"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda:N or auto"), "{e}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn a_segment_of_another_device_than_asked_is_an_error() {
        let other = GpuUuid([9; 16]);
        let host = SegmentDescriptor::Memfd { len: 64 };
        let gpu = SegmentDescriptor::CudaIpc { handle: IpcHandle([0; 64]), gpu: UUID, len: 64 };
        assert_eq!(host.check_device(Device::Cpu), Ok(()));
        assert_eq!(gpu.check_device(Device::Cuda(UUID)), Ok(()));
        let e = gpu.check_device(Device::Cpu).unwrap_err();
        assert!(e.contains("shared host memory") && e.contains(&UUID.to_string()), "{e}");
        let e = host.check_device(Device::Cuda(UUID)).unwrap_err();
        assert!(e.starts_with(&format!("asked the daemon for weights in memory of GPU {UUID} but it lent shared host memory")), "{e}");
        assert!(gpu.check_device(Device::Cuda(other)).is_err());
    }
}
