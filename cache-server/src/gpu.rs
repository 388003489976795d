//! GPU memory as the daemon uses it, behind a trait: the rules that govern it
//! (a budget per GPU, nothing freed while a client maps it) are the
//! registry's, and are tested with a fake (`fake`, in test builds only) on
//! machines without a GPU. The CUDA implementation is [`crate::cuda`], in
//! builds with the `cuda` feature.

use mora_common::gpu::GpuInfo;

use crate::checkpoint::CheckpointError;
use mora_common::protocol::{GpuUuid, IpcHandle};

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
    fn allocate(&self, gpu: GpuUuid, len: u64, label: &str) -> Result<Box<dyn DeviceBuffer>, String>;
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
    fn upload(&mut self, threads: usize) -> Result<Box<dyn Upload + '_>, String>;
}

/// Fills device memory from host staging buffers, from several threads at
/// once: each [`put`](Upload::put) takes a free buffer (or the one whose copy
/// was sent first, once that copy is done), has the caller fill it with the
/// bytes that belong at an offset, and sends it to the device while the
/// caller goes on to its next chunk.
pub trait Upload: Sync {
    /// Has `fill` write the `len` bytes that belong at `offset` into a
    /// staging buffer of [`WRITE_CHUNK`](crate::checkpoint::WRITE_CHUNK)
    /// bytes, then copies them there. An error from `fill` is returned as it
    /// is, and the buffer goes back unused.
    fn put(&self, offset: u64, len: usize, fill: &mut dyn FnMut(&mut [u8]) -> Result<(), CheckpointError>) -> Result<(), CheckpointError>;
    /// Waits until every chunk is on the device.
    fn finish(self: Box<Self>) -> Result<(), String>;
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

        fn allocate(&self, gpu: GpuUuid, len: u64, label: &str) -> Result<Box<dyn DeviceBuffer>, String> {
            if !self.devices.iter().any(|d| d.info.uuid == gpu) {
                return Err(format!("no fake GPU {gpu}"));
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
        fn upload(&mut self, threads: usize) -> Result<Box<dyn Upload + '_>, String> {
            // One staging buffer more than threads, as the real one has.
            let staging = (0..threads.max(1) + 1).map(|_| Mutex::new(Vec::new())).collect();
            let free = Mutex::new((0..threads.max(1) + 1).collect());
            let FakeBuffer { bytes, log, label, .. } = self;
            Ok(Box::new(FakeUpload { bytes: Mutex::new(bytes), log, label, staging, free, freed: Condvar::new() }))
        }
    }

    impl Drop for FakeBuffer {
        fn drop(&mut self) {
            self.log.contents.lock().unwrap().insert(self.label.clone(), std::mem::take(&mut self.bytes));
            self.log.events.lock().unwrap().push(Event::Freed { label: self.label.clone() });
        }
    }

    /// Stages through host buffers, as the real one does through pinned
    /// memory, and copies each into the fake device memory as it is put.
    struct FakeUpload<'a> {
        bytes: Mutex<&'a mut Vec<u8>>,
        log: &'a Arc<Log>,
        label: &'a str,
        staging: Vec<Mutex<Vec<u8>>>,
        free: Mutex<Vec<usize>>,
        freed: Condvar,
    }

    impl Upload for FakeUpload<'_> {
        fn put(&self, offset: u64, len: usize, fill: &mut dyn FnMut(&mut [u8]) -> Result<(), CheckpointError>) -> Result<(), CheckpointError> {
            if len > crate::checkpoint::WRITE_CHUNK || offset + len as u64 > self.bytes.lock().unwrap().len() as u64 {
                return Err(CheckpointError::Gpu(format!("chunk at {offset} of {len} bytes does not fit the staging buffer or the allocation")));
            }
            let i = {
                let mut free = self.free.lock().unwrap();
                loop {
                    match free.pop() {
                        Some(i) => break i,
                        None => free = self.freed.wait(free).unwrap(),
                    }
                }
            };
            let result = {
                let mut buf = self.staging[i].lock().unwrap();
                buf.resize(len, 0);
                fill(&mut buf).map(|()| self.bytes.lock().unwrap()[offset as usize..][..len].copy_from_slice(&buf))
            };
            self.free.lock().unwrap().push(i);
            self.freed.notify_one();
            result
        }
        fn finish(self: Box<Self>) -> Result<(), String> {
            let bytes = self.bytes.lock().unwrap().clone();
            self.log.contents.lock().unwrap().insert(self.label.to_string(), bytes);
            Ok(())
        }
    }
}
