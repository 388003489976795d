//! GPU memory as the daemon uses it, behind a trait: the rules that govern it
//! (a budget per GPU, nothing freed while a client maps it) are the
//! registry's, and are tested with a fake (`fake`, in test builds only) on
//! machines without a GPU. The CUDA implementation is the `cuda` module, in
//! builds with the `cuda` feature.
//!
//! This module is a leaf of the crate: it names nothing of the loader that
//! fills the memory or of the registry that budgets it, so both can depend
//! on it without a loop.

use mora_common::gpu::GpuInfo;
use mora_common::protocol::{GpuUuid, IpcHandle};

/// Bytes in each staging buffer of an [`Upload`]: the most one
/// [`Upload::stage`] takes. The loader's chunks are at most this long.
pub const STAGING_BYTES: usize = 4 << 20;

/// What can go wrong with GPU memory. Each message names the driver call,
/// the GPU or the chunk concerned.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The GPUs could not be listed (`mora_common::gpu::visible`'s reason).
    #[error("{0}")]
    Enumerate(String),
    #[error("the CUDA driver reports no GPU")]
    NoGpu,
    /// A GPU this daemon does not hold weights on.
    #[error("no GPU {0} in this daemon")]
    UnknownGpu(GpuUuid),
    /// The device allocation itself failed (out of memory, most often).
    #[cfg(feature = "cuda")]
    #[error("cannot allocate {len} bytes on GPU {gpu} for {label}: {source}")]
    Allocate { len: u64, gpu: GpuUuid, label: String, source: cudarc::driver::DriverError },
    /// Any other CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("{call} failed: {source}")]
    Driver { call: &'static str, source: cudarc::driver::DriverError },
    /// A chunk longer than a staging buffer, or past the allocation's end.
    #[error("chunk of {len} bytes at {offset} does not fit the staging buffer or the allocation")]
    ChunkOutOfBounds { offset: u64, len: usize },
    /// A copy could not be queued or waited for: the whole upload fails.
    #[error("an earlier host-to-device copy failed")]
    EarlierCopyFailed,
}

/// One GPU the daemon may hold weights on.
#[derive(Debug, Clone)]
pub struct GpuDevice {
    pub info: GpuInfo,
    /// Most bytes of weights held on it: free memory when the daemon started,
    /// minus the reserve left for the clients' contexts and activations.
    pub budget: u64,
}

/// Allocates device memory that other processes can map.
pub trait GpuMemory: Send + Sync {
    /// The GPUs on offer, in the daemon's ordinal order.
    fn devices(&self) -> &[GpuDevice];

    /// One allocation of `len` bytes on `gpu`, exported for IPC, not yet
    /// written. `label` names it in errors and logs.
    fn allocate(&self, gpu: GpuUuid, len: u64, label: &str) -> Result<Box<dyn DeviceBuffer>, GpuError>;
}

/// One exported device allocation. Dropping it frees the memory, so the
/// registry drops it only when no lease on it is open (every lease holds it).
pub trait DeviceBuffer: Send + Sync {
    fn gpu(&self) -> GpuUuid;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What a client opens to map this allocation.
    fn ipc_handle(&self) -> IpcHandle;
    /// Starts filling the allocation from host memory, from up to
    /// `threads` threads at once.
    fn upload(&mut self, threads: usize) -> Result<Box<dyn Upload + '_>, GpuError>;
}

/// Fills device memory from host staging buffers, from several threads at
/// once: each [`stage`](Upload::stage) hands its caller a free buffer (or
/// the one whose copy was sent first, once that copy is done) to fill with
/// the bytes that belong at an offset; [`Staged::send`] copies it to the
/// device while the caller goes on to its next chunk.
pub trait Upload: Sync {
    /// A staging buffer for the `len` bytes (at most [`STAGING_BYTES`]) that
    /// belong at `offset` of the allocation; waits while every buffer is
    /// taken or still being copied.
    fn stage(&self, offset: u64, len: usize) -> Result<Box<dyn Staged + '_>, GpuError>;
    /// Waits until every chunk sent is on the device.
    fn finish(self: Box<Self>) -> Result<(), GpuError>;
}

/// One staging buffer, its caller's alone until it is sent or dropped.
/// Dropped unsent (the caller failed to fill it), it goes back to the upload
/// unused and nothing is copied.
pub trait Staged {
    /// The buffer: exactly the length asked for, holding whatever it held
    /// before; the caller writes every byte.
    fn bytes(&mut self) -> &mut [u8];
    /// Queues the copy of the buffer to its offset on the device. The
    /// buffer is handed out again only once that copy is done.
    fn send(self: Box<Self>) -> Result<(), GpuError>;
}

/// A GPU made of host memory, for tests: records what is allocated and
/// freed, and keeps the bytes so tests can read back what was uploaded.
/// Compiled into test builds only: the daemon never offers it.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};

    /// What happened to fake allocations, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Event {
        Allocated { label: String, len: u64 },
        Freed { label: String },
    }

    #[derive(Default)]
    pub struct Log {
        pub events: Mutex<Vec<Event>>,
        /// The bytes of each allocation as its upload finished, by label.
        pub contents: Mutex<std::collections::HashMap<String, Vec<u8>>>,
    }

    pub struct FakeGpus {
        devices: Vec<GpuDevice>,
        pub log: Arc<Log>,
    }

    impl FakeGpus {
        /// One fake GPU with this UUID and budget.
        pub fn one(uuid: GpuUuid, budget: u64) -> Self {
            let info = GpuInfo { ordinal: 0, uuid, name: "Fake GPU".into(), total: budget * 2 };
            FakeGpus { devices: vec![GpuDevice { info, budget }], log: Arc::default() }
        }

        pub fn events(&self) -> Vec<Event> {
            self.log.events.lock().unwrap().clone()
        }

        pub fn freed(&self, label: &str) -> bool {
            self.events().contains(&Event::Freed { label: label.to_string() })
        }
    }

    impl GpuMemory for FakeGpus {
        fn devices(&self) -> &[GpuDevice] {
            &self.devices
        }

        fn allocate(&self, gpu: GpuUuid, len: u64, label: &str) -> Result<Box<dyn DeviceBuffer>, GpuError> {
            if !self.devices.iter().any(|d| d.info.uuid == gpu) {
                return Err(GpuError::UnknownGpu(gpu));
            }
            self.log.events.lock().unwrap().push(Event::Allocated { label: label.into(), len });
            Ok(Box::new(FakeBuffer { gpu, label: label.into(), bytes: vec![0; len as usize], log: self.log.clone() }))
        }
    }

    struct FakeBuffer {
        gpu: GpuUuid,
        label: String,
        bytes: Vec<u8>,
        log: Arc<Log>,
    }

    impl DeviceBuffer for FakeBuffer {
        fn gpu(&self) -> GpuUuid {
            self.gpu
        }
        fn len(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn ipc_handle(&self) -> IpcHandle {
            IpcHandle([0xab; 64])
        }
        fn upload(&mut self, threads: usize) -> Result<Box<dyn Upload + '_>, GpuError> {
            // One staging buffer more than threads, as the real one has.
            let free = Mutex::new((0..threads.max(1) + 1).map(|_| Vec::new()).collect());
            let FakeBuffer { bytes, log, label, .. } = self;
            Ok(Box::new(FakeUpload { bytes: Mutex::new(bytes), log, label, free, freed: Condvar::new() }))
        }
    }

    impl Drop for FakeBuffer {
        fn drop(&mut self) {
            self.log.contents.lock().unwrap().insert(self.label.clone(), std::mem::take(&mut self.bytes));
            self.log.events.lock().unwrap().push(Event::Freed { label: self.label.clone() });
        }
    }

    /// Stages through host buffers, as the real one does through pinned
    /// memory, and copies each into the fake device memory as it is sent.
    struct FakeUpload<'a> {
        bytes: Mutex<&'a mut Vec<u8>>,
        log: &'a Arc<Log>,
        label: &'a str,
        /// The staging buffers not handed out.
        free: Mutex<Vec<Vec<u8>>>,
        freed: Condvar,
    }

    impl FakeUpload<'_> {
        fn give_back(&self, buf: Vec<u8>) {
            self.free.lock().unwrap().push(buf);
            self.freed.notify_one();
        }
    }

    impl Upload for FakeUpload<'_> {
        fn stage(&self, offset: u64, len: usize) -> Result<Box<dyn Staged + '_>, GpuError> {
            if len > STAGING_BYTES || offset + len as u64 > self.bytes.lock().unwrap().len() as u64 {
                return Err(GpuError::ChunkOutOfBounds { offset, len });
            }
            let mut buf = {
                let mut free = self.free.lock().unwrap();
                loop {
                    match free.pop() {
                        Some(b) => break b,
                        None => free = self.freed.wait(free).unwrap(),
                    }
                }
            };
            buf.resize(len, 0);
            Ok(Box::new(FakeStaged { upload: self, offset, buf: Some(buf) }))
        }
        fn finish(self: Box<Self>) -> Result<(), GpuError> {
            let bytes = self.bytes.lock().unwrap().clone();
            self.log.contents.lock().unwrap().insert(self.label.to_string(), bytes);
            Ok(())
        }
    }

    /// A staging buffer out of a [`FakeUpload`]; `None` once sent.
    struct FakeStaged<'s, 'a> {
        upload: &'s FakeUpload<'a>,
        offset: u64,
        buf: Option<Vec<u8>>,
    }

    impl Staged for FakeStaged<'_, '_> {
        fn bytes(&mut self) -> &mut [u8] {
            self.buf.as_mut().expect("not sent yet")
        }
        fn send(mut self: Box<Self>) -> Result<(), GpuError> {
            let buf = self.buf.take().expect("sent once");
            self.upload.bytes.lock().unwrap()[self.offset as usize..][..buf.len()].copy_from_slice(&buf);
            self.upload.give_back(buf);
            Ok(())
        }
    }

    impl Drop for FakeStaged<'_, '_> {
        fn drop(&mut self) {
            if let Some(buf) = self.buf.take() {
                self.upload.give_back(buf);
            }
        }
    }
}
