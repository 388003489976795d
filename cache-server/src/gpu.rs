//! GPU memory as the daemon uses it, behind a trait: the rules that govern it
//! (a budget per GPU, nothing freed while a client maps it) are the
//! registry's, and are tested with [`fake`] on machines without a GPU. The
//! CUDA implementation is [`crate::cuda`], in builds with the `cuda` feature.

use mora_common::gpu::GpuInfo;
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
    /// Starts filling the allocation from host memory.
    fn upload(&mut self) -> Result<Box<dyn Upload + '_>, String>;
}

/// Fills device memory chunk by chunk: the caller asks for a host buffer,
/// fills it with the bytes that belong at an offset, and says so; the
/// implementation copies it over while the caller fills the next one.
pub trait Upload {
    /// A host buffer of `len` bytes for the bytes at `offset`.
    fn buffer(&mut self, offset: u64, len: usize) -> Result<&mut [u8], String>;
    /// The buffer last returned is filled: send it on its way.
    fn filled(&mut self) -> Result<(), String>;
    /// Waits until every chunk is on the device.
    fn finish(self: Box<Self>) -> Result<(), String>;
}

/// A GPU made of host memory, for tests: records what is allocated and
/// freed, and keeps the bytes so tests can read back what was uploaded.
pub mod fake {
    use super::*;
    use std::sync::{Arc, Mutex};

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
        fn upload(&mut self) -> Result<Box<dyn Upload + '_>, String> {
            Ok(Box::new(FakeUpload { buf: self, staging: Vec::new(), at: None }))
        }
    }

    impl Drop for FakeBuffer {
        fn drop(&mut self) {
            self.log.contents.lock().unwrap().insert(self.label.clone(), std::mem::take(&mut self.bytes));
            self.log.events.lock().unwrap().push(Event::Freed { label: self.label.clone() });
        }
    }

    /// Stages through a host buffer, as the real one does through pinned memory.
    struct FakeUpload<'a> {
        buf: &'a mut FakeBuffer,
        staging: Vec<u8>,
        at: Option<u64>,
    }

    impl Upload for FakeUpload<'_> {
        fn buffer(&mut self, offset: u64, len: usize) -> Result<&mut [u8], String> {
            if offset + len as u64 > self.buf.len() {
                return Err(format!("chunk at {offset} of {len} bytes runs past the allocation"));
            }
            self.at = Some(offset);
            self.staging.resize(len, 0);
            Ok(&mut self.staging)
        }
        fn filled(&mut self) -> Result<(), String> {
            let at = self.at.take().ok_or("filled() without buffer()")? as usize;
            self.buf.bytes[at..at + self.staging.len()].copy_from_slice(&self.staging);
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<(), String> {
            self.buf.log.contents.lock().unwrap().insert(self.buf.label.clone(), self.buf.bytes.clone());
            Ok(())
        }
    }
}
