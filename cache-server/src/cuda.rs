//! [`GpuMemory`] over the CUDA driver API (feature `cuda`).
//!
//! Each model is one `cuMemAlloc` allocation (not the stream-ordered pool,
//! whose allocations `cuIpcGetMemHandle` refuses), exported once. Uploads go
//! through two pinned host buffers of [`READ_CHUNK`] bytes on a stream of
//! their own: while one buffer is copied to the device, the loader reads the
//! next chunk from disk into the other.
//!
//! The daemon retains each GPU's primary context when it starts and keeps it
//! for its lifetime: allocations live in it, and it is what clients' IPC
//! mappings refer to.

use std::mem::MaybeUninit;
use std::sync::Arc;

use cudarc::driver::result::{self, stream::StreamKind};
use cudarc::driver::{sys, CudaContext, DriverError};

use mora_common::gpu::{self, GpuInfo};
use mora_common::protocol::{GpuUuid, IpcHandle};

use crate::checkpoint::READ_CHUNK;
use crate::gpu::{DeviceBuffer, GpuDevice, GpuMemory, Upload};

/// Share of a GPU's memory left out of the budget by default, for the
/// clients' own CUDA contexts and activations...
pub const DEFAULT_RESERVE_FRACTION: f64 = 0.10;
/// ...and never less than this.
pub const MIN_RESERVE: u64 = 2 << 30;

/// The GPUs this daemon holds weights on.
pub struct CudaGpus {
    devices: Vec<GpuDevice>,
    contexts: Vec<Arc<CudaContext>>,
}

fn err(what: &str, e: DriverError) -> String {
    format!("{what} failed: {e}")
}

impl CudaGpus {
    /// Opens every GPU this process sees. Each one's budget is the memory
    /// free now minus `reserve` (default: 10% of the GPU, at least 2 GiB),
    /// capped at `max` when given.
    pub fn open(reserve: Option<u64>, max: Option<u64>) -> Result<Self, String> {
        let infos: Vec<GpuInfo> = gpu::visible()?;
        if infos.is_empty() {
            return Err("the CUDA driver reports no GPU".into());
        }
        let mut devices = Vec::new();
        let mut contexts = Vec::new();
        for info in infos {
            let ctx = CudaContext::new(info.ordinal as usize).map_err(|e| err("creating a CUDA context", e))?;
            let (free, _total) = result::mem_get_info().map_err(|e| err("cuMemGetInfo", e))?;
            let reserve = reserve.unwrap_or(((info.total as f64 * DEFAULT_RESERVE_FRACTION) as u64).max(MIN_RESERVE));
            let mut budget = (free as u64).saturating_sub(reserve);
            if let Some(max) = max {
                budget = budget.min(max);
            }
            devices.push(GpuDevice { info, budget });
            contexts.push(ctx);
        }
        Ok(CudaGpus { devices, contexts })
    }

    fn context(&self, uuid: GpuUuid) -> Result<&Arc<CudaContext>, String> {
        self.devices
            .iter()
            .position(|d| d.info.uuid == uuid)
            .map(|i| &self.contexts[i])
            .ok_or_else(|| format!("no GPU {uuid} in this daemon"))
    }
}

impl GpuMemory for CudaGpus {
    fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    fn allocate(&self, gpu: GpuUuid, len: u64, label: &str) -> Result<Box<dyn DeviceBuffer>, String> {
        let ctx = self.context(gpu)?.clone();
        ctx.bind_to_thread().map_err(|e| err("binding the CUDA context", e))?;
        // SAFETY: a plain allocation in the context bound just above.
        let ptr = unsafe { result::malloc_sync(len as usize) }
            .map_err(|e| format!("cannot allocate {len} bytes on GPU {gpu} for {label}: {e}"))?;
        let mut raw = MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is the base of a live cuMemAlloc allocation; the
        // handle is written in full on success.
        let exported = unsafe { sys::cuIpcGetMemHandle(raw.as_mut_ptr(), ptr).result() };
        if let Err(e) = exported {
            // SAFETY: allocated above, never exported, freed once.
            let _ = unsafe { result::free_sync(ptr) };
            return Err(err("cuIpcGetMemHandle", e));
        }
        // SAFETY: initialised by the successful call above.
        let handle = IpcHandle(unsafe { raw.assume_init() }.reserved.map(|c| c as u8));
        tracing::debug!(%gpu, bytes = len, model = label, "allocated and exported");
        Ok(Box::new(CudaBuffer { ctx, ptr, len, gpu, handle, label: label.to_string() }))
    }
}

/// One exported allocation; freed on drop (which the registry does only
/// once no lease holds it).
struct CudaBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    len: u64,
    gpu: GpuUuid,
    handle: IpcHandle,
    label: String,
}

impl DeviceBuffer for CudaBuffer {
    fn gpu(&self) -> GpuUuid {
        self.gpu
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn ipc_handle(&self) -> IpcHandle {
        self.handle
    }

    fn upload(&mut self) -> Result<Box<dyn Upload + '_>, String> {
        Ok(Box::new(CudaUpload::new(self)?))
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        let freed = self.ctx.bind_to_thread().and_then(|_| {
            // SAFETY: allocated by malloc_sync in this context, freed once;
            // no lease holds it any more (see the registry's invariants).
            unsafe { result::free_sync(self.ptr) }
        });
        match freed {
            Ok(()) => tracing::debug!(gpu = %self.gpu, bytes = self.len, model = %self.label, "freed"),
            Err(e) => tracing::error!(gpu = %self.gpu, model = %self.label, error = %e, "cuMemFree failed"),
        }
    }
}

/// A pinned host buffer and the event that says when its last copy is done.
struct Slot {
    host: *mut u8,
    event: sys::CUevent,
    in_flight: bool,
}

struct CudaUpload<'a> {
    buf: &'a mut CudaBuffer,
    stream: sys::CUstream,
    slots: Vec<Slot>,
    current: usize,
    /// The chunk handed out by `buffer()` and not yet `filled()`.
    pending: Option<(u64, usize)>,
}

impl<'a> CudaUpload<'a> {
    fn new(buf: &'a mut CudaBuffer) -> Result<Self, String> {
        buf.ctx.bind_to_thread().map_err(|e| err("binding the CUDA context", e))?;
        let stream = result::stream::create(StreamKind::NonBlocking).map_err(|e| err("cuStreamCreate", e))?;
        let mut up = CudaUpload { buf, stream, slots: Vec::new(), current: 0, pending: None };
        for _ in 0..2 {
            // SAFETY: a fresh pinned allocation, freed in Drop.
            let host = unsafe { result::malloc_host(READ_CHUNK, 0) }.map_err(|e| err("cuMemHostAlloc", e))? as *mut u8;
            let event = match result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING) {
                Ok(ev) => ev,
                Err(e) => {
                    // SAFETY: allocated just above, not yet in `slots`.
                    let _ = unsafe { result::free_host(host.cast()) };
                    return Err(err("cuEventCreate", e));
                }
            };
            up.slots.push(Slot { host, event, in_flight: false });
        }
        Ok(up)
    }
}

impl Upload for CudaUpload<'_> {
    fn buffer(&mut self, offset: u64, len: usize) -> Result<&mut [u8], String> {
        if len > READ_CHUNK || offset + len as u64 > self.buf.len {
            return Err(format!("chunk of {len} bytes at {offset} does not fit the staging buffer or the allocation"));
        }
        let slot = &mut self.slots[self.current];
        if slot.in_flight {
            // SAFETY: an event created in `new` and recorded on our stream.
            unsafe { result::event::synchronize(slot.event) }.map_err(|e| err("waiting for a host-to-device copy", e))?;
            slot.in_flight = false;
        }
        self.pending = Some((offset, len));
        // SAFETY: `host` is a live pinned buffer of READ_CHUNK bytes that no
        // copy reads any more (its event has completed).
        Ok(unsafe { std::slice::from_raw_parts_mut(slot.host, len) })
    }

    fn filled(&mut self) -> Result<(), String> {
        let (offset, len) = self.pending.take().ok_or("filled() without buffer()")?;
        let slot = &mut self.slots[self.current];
        // SAFETY: source: `len` initialised bytes of a pinned buffer that is
        // not touched until its event completes; destination: inside the
        // allocation (checked in `buffer`).
        unsafe {
            let src = std::slice::from_raw_parts(slot.host, len);
            result::memcpy_htod_async(self.buf.ptr + offset, src, self.stream).map_err(|e| err("cuMemcpyHtoDAsync", e))?;
            result::event::record(slot.event, self.stream).map_err(|e| err("cuEventRecord", e))?;
        }
        slot.in_flight = true;
        self.current = (self.current + 1) % self.slots.len();
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), String> {
        // SAFETY: our own stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(|e| err("waiting for the upload", e))
    }
}

impl Drop for CudaUpload<'_> {
    fn drop(&mut self) {
        // Nothing may still read the pinned buffers when they are freed.
        // SAFETY: our own stream, events and pinned buffers, each freed once.
        unsafe {
            let _ = self.buf.ctx.bind_to_thread();
            let _ = result::stream::synchronize(self.stream);
            for s in &self.slots {
                let _ = result::event::destroy(s.event);
                let _ = result::free_host(s.host.cast());
            }
            let _ = result::stream::destroy(self.stream);
        }
    }
}
