//! [`GpuMemory`] over the CUDA driver API (feature `cuda`).
//!
//! Each model is one `cuMemAlloc` allocation (not the stream-ordered pool,
//! whose allocations `cuIpcGetMemHandle` refuses), exported once. Uploads go
//! through pinned host buffers of [`STAGING_BYTES`] bytes, one more than the
//! threads that fill them, on a stream of their own: while one buffer is
//! copied to the device, the loading threads read the next chunks from disk
//! into the others. The pinned buffers are kept between loads.
//!
//! The daemon retains each GPU's primary context when it starts and keeps it
//! for its lifetime: allocations live in it, and it is what clients' IPC
//! mappings refer to.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::sync::{Arc, Condvar, Mutex};

use cudarc::driver::result::{self, stream::StreamKind};
use cudarc::driver::{sys, CudaContext, DriverError};

use mora_common::gpu::{self, GpuInfo};
use mora_common::protocol::{GpuUuid, IpcHandle};

use crate::gpu::{DeviceBuffer, GpuDevice, GpuError, GpuMemory, Staged, Upload, STAGING_BYTES};

/// Share of a GPU's memory left out of the budget by default, for the
/// clients' own CUDA contexts and activations...
pub const DEFAULT_RESERVE_FRACTION: f64 = 0.10;
/// ...and never less than this.
pub const MIN_RESERVE: u64 = 2 << 30;

/// Pinned staging buffers kept for the next load, per GPU (64 MiB).
const KEPT_STAGING_BUFFERS: usize = 16;

/// The GPUs this daemon holds weights on.
pub struct CudaGpus {
    devices: Vec<GpuDevice>,
    /// Per GPU, in the order of `devices`: its context and its kept
    /// staging buffers.
    staging: Vec<Arc<StagingPool>>,
}

/// A failed driver call, named.
fn driver(call: &'static str, source: DriverError) -> GpuError {
    GpuError::Driver { call, source }
}

impl CudaGpus {
    /// Opens every GPU this process sees. Each one's budget is the memory
    /// free now minus `reserve` (default: 10% of the GPU, at least 2 GiB),
    /// capped at `max` when given.
    pub fn open(reserve: Option<u64>, max: Option<u64>) -> Result<Self, GpuError> {
        let infos: Vec<GpuInfo> = gpu::visible().map_err(|e| GpuError::Enumerate(e.to_string()))?;
        if infos.is_empty() {
            return Err(GpuError::NoGpu);
        }
        let (mut devices, mut staging) = (Vec::new(), Vec::new());
        for info in infos {
            let ctx = CudaContext::new(info.ordinal as usize).map_err(|e| driver("creating a CUDA context", e))?;
            let (free, _total) = result::mem_get_info().map_err(|e| driver("cuMemGetInfo", e))?;
            let reserve = reserve.unwrap_or(((info.total as f64 * DEFAULT_RESERVE_FRACTION) as u64).max(MIN_RESERVE));
            let mut budget = (free as u64).saturating_sub(reserve);
            if let Some(max) = max {
                budget = budget.min(max);
            }
            devices.push(GpuDevice { info, budget });
            staging.push(Arc::new(StagingPool { ctx, kept: Mutex::new(Vec::new()) }));
        }
        Ok(CudaGpus { devices, staging })
    }

    fn index(&self, uuid: GpuUuid) -> Result<usize, GpuError> {
        self.devices.iter().position(|d| d.info.uuid == uuid).ok_or(GpuError::UnknownGpu(uuid))
    }
}

impl GpuMemory for CudaGpus {
    fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    fn allocate(&self, gpu: GpuUuid, len: u64, label: &str) -> Result<Box<dyn DeviceBuffer>, GpuError> {
        let staging = self.staging[self.index(gpu)?].clone();
        staging.ctx.bind_to_thread().map_err(|e| driver("binding the CUDA context", e))?;
        // SAFETY: a plain allocation in the context bound just above.
        let ptr = unsafe { result::malloc_sync(len as usize) }
            .map_err(|source| GpuError::Allocate { len, gpu, label: label.to_string(), source })?;
        let mut raw = MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is the base of a live cuMemAlloc allocation; the
        // handle is written in full on success.
        let exported = unsafe { sys::cuIpcGetMemHandle(raw.as_mut_ptr(), ptr).result() };
        if let Err(e) = exported {
            // SAFETY: allocated above, never exported, freed once.
            let _ = unsafe { result::free_sync(ptr) };
            return Err(driver("cuIpcGetMemHandle", e));
        }
        // SAFETY: initialised by the successful call above.
        let handle = IpcHandle(unsafe { raw.assume_init() }.reserved.map(|c| c as u8));
        tracing::debug!(%gpu, bytes = len, model = label, "allocated and exported");
        Ok(Box::new(CudaBuffer { staging, ptr, len, gpu, handle, label: label.to_string() }))
    }
}

/// One exported allocation; freed on drop (which the registry does only
/// once no lease holds it).
struct CudaBuffer {
    /// Its GPU's context, which the allocation lives in, and staging buffers.
    staging: Arc<StagingPool>,
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

    fn upload(&mut self, threads: usize) -> Result<Box<dyn Upload + '_>, GpuError> {
        Ok(Box::new(CudaUpload::new(self, threads.max(1) + 1)?))
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        let freed = self.staging.ctx.bind_to_thread().and_then(|_| {
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

/// A page-locked host buffer of [`STAGING_BYTES`] bytes.
struct Pinned(*mut u8);

// SAFETY: a plain allocation, used by one thread at a time (the pool's lock,
// then an upload's slot rules hand it on).
unsafe impl Send for Pinned {}

/// Pinned staging buffers kept between loads on one GPU, as PyTorch's
/// caching host allocator keeps its own, so that a load does not page-lock
/// new memory every time.
struct StagingPool {
    /// The GPU's primary context, held for as long as the daemon or an
    /// allocation on this GPU holds the pool.
    ctx: Arc<CudaContext>,
    kept: Mutex<Vec<Pinned>>,
}

impl StagingPool {
    /// A kept buffer, or a new one. The caller has bound the context.
    fn take(&self) -> Result<Pinned, GpuError> {
        if let Some(p) = self.kept.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        // SAFETY: a fresh pinned allocation, freed by `give_back` or Drop.
        let host = unsafe { result::malloc_host(STAGING_BYTES, 0) }.map_err(|e| driver("cuMemHostAlloc", e))?;
        Ok(Pinned(host.cast()))
    }

    /// Keeps `p` for the next load, or frees it if enough are kept. No copy
    /// may still read it.
    fn give_back(&self, p: Pinned) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_STAGING_BUFFERS {
            kept.push(p);
        } else {
            drop(kept);
            // SAFETY: allocated by `take`, no longer used, freed once.
            let _ = self.ctx.bind_to_thread().and_then(|_| unsafe { result::free_host(p.0.cast()) });
        }
    }
}

impl Drop for StagingPool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for p in self.kept.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            // SAFETY: kept buffers are used by no upload; each freed once.
            let _ = unsafe { result::free_host(p.0.cast()) };
        }
    }
}

/// A pinned staging buffer and the event that says when its last copy is done.
struct Slot {
    host: Pinned,
    event: sys::CUevent,
}

/// Which slots are free and which are being copied, in the order their
/// copies were queued on the stream (so the first is done first).
#[derive(Default)]
struct Slots {
    free: Vec<usize>,
    in_flight: VecDeque<usize>,
    /// A copy could not be queued or waited for: its buffer may still be
    /// read, and the load fails.
    broken: bool,
}

/// An upload from several threads at once. A slot is in exactly one place:
/// the free list, the in-flight queue (its copy queued and its event
/// recorded after it), or the hands of one [`CudaStaged`], which took it
/// from one of those under the lock, waited for its event if it was in
/// flight, and gives it back (queued, or free when dropped unsent) only
/// under the lock.
struct CudaUpload<'a> {
    buf: &'a CudaBuffer,
    stream: sys::CUstream,
    slots: Vec<Slot>,
    state: Mutex<Slots>,
    changed: Condvar,
}

// SAFETY: the stream and events are driver handles, usable from any thread
// with the context bound (every method binds it first); the slots' buffers
// are handed to one thread at a time under `state` (see the type's doc).
unsafe impl Sync for CudaUpload<'_> {}

impl<'a> CudaUpload<'a> {
    fn new(buf: &'a CudaBuffer, buffers: usize) -> Result<Self, GpuError> {
        buf.staging.ctx.bind_to_thread().map_err(|e| driver("binding the CUDA context", e))?;
        let stream = result::stream::create(StreamKind::NonBlocking).map_err(|e| driver("cuStreamCreate", e))?;
        let mut up = CudaUpload { buf, stream, slots: Vec::new(), state: Mutex::default(), changed: Condvar::new() };
        for i in 0..buffers {
            let host = buf.staging.take()?;
            let event = match result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING) {
                Ok(ev) => ev,
                Err(e) => {
                    buf.staging.give_back(host);
                    return Err(driver("cuEventCreate", e));
                }
            };
            up.slots.push(Slot { host, event });
            up.state.get_mut().unwrap_or_else(|e| e.into_inner()).free.push(i);
        }
        Ok(up)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the upload failed and wakes every waiting `stage`.
    fn break_off(&self) {
        self.lock().broken = true;
        self.changed.notify_all();
    }

    /// A slot for one `stage`: a free one, else the one whose copy was queued
    /// first, once that copy is done, else (every slot being filled) the
    /// next one given back.
    fn take(&self) -> Result<usize, GpuError> {
        let mut s = self.lock();
        loop {
            if s.broken {
                return Err(GpuError::EarlierCopyFailed);
            }
            if let Some(i) = s.free.pop() {
                return Ok(i);
            }
            if let Some(i) = s.in_flight.pop_front() {
                drop(s);
                // SAFETY: an event created in `new` and recorded on our
                // stream after the last copy out of slot `i`.
                return match unsafe { result::event::synchronize(self.slots[i].event) } {
                    Ok(()) => Ok(i),
                    Err(e) => {
                        self.break_off();
                        Err(driver("waiting for a host-to-device copy", e))
                    }
                };
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Upload for CudaUpload<'_> {
    fn stage(&self, offset: u64, len: usize) -> Result<Box<dyn Staged + '_>, GpuError> {
        if len > STAGING_BYTES || offset + len as u64 > self.buf.len {
            return Err(GpuError::ChunkOutOfBounds { offset, len });
        }
        self.buf.staging.ctx.bind_to_thread().map_err(|e| driver("binding the CUDA context", e))?;
        let slot = self.take()?;
        Ok(Box::new(CudaStaged { upload: self, slot, offset, len, queued: false }))
    }

    fn finish(self: Box<Self>) -> Result<(), GpuError> {
        self.buf.staging.ctx.bind_to_thread().map_err(|e| driver("binding the CUDA context", e))?;
        // SAFETY: our own stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(|e| driver("waiting for the upload", e))
    }
}

/// Slot `slot` of an upload, in the hands of one caller (see
/// [`CudaUpload`]): filled through [`bytes`](Staged::bytes), then queued by
/// [`send`](Staged::send); dropped before its copy was queued, it goes back
/// to the free list.
struct CudaStaged<'s, 'a> {
    upload: &'s CudaUpload<'a>,
    slot: usize,
    offset: u64,
    len: usize,
    /// Its copy may have been queued: the slot is the in-flight queue's (or,
    /// the upload being broken, out of use), not the free list's.
    queued: bool,
}

impl Staged for CudaStaged<'_, '_> {
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the slot is this guard's alone until it is given back (see
        // `CudaUpload`), and no copy reads it any more; its buffer is a live
        // pinned allocation of STAGING_BYTES bytes, and `len` is at most that
        // (checked in `stage`).
        unsafe { std::slice::from_raw_parts_mut(self.upload.slots[self.slot].host.0, self.len) }
    }

    fn send(mut self: Box<Self>) -> Result<(), GpuError> {
        let up = self.upload;
        up.buf.staging.ctx.bind_to_thread().map_err(|e| driver("binding the CUDA context", e))?;
        let i = self.slot;
        // SAFETY: as in `bytes`; read only from here on.
        let bytes = unsafe { std::slice::from_raw_parts(up.slots[i].host.0, self.len) };
        let mut s = up.lock();
        self.queued = true;
        // SAFETY: source: `len` bytes of slot `i`, which no one writes until
        // its event completes; destination: inside the allocation (checked
        // in `stage`). The copy and its event are queued under the lock, so
        // the in-flight queue keeps the stream's order.
        let sent = unsafe {
            result::memcpy_htod_async(up.buf.ptr + self.offset, bytes, up.stream)
                .and_then(|()| result::event::record(up.slots[i].event, up.stream))
        };
        match sent {
            Ok(()) => s.in_flight.push_back(i),
            // The copy may have been queued: slot `i` stays out of use.
            Err(_) => s.broken = true,
        }
        drop(s);
        up.changed.notify_all();
        sent.map_err(|e| driver("cuMemcpyHtoDAsync", e))
    }
}

impl Drop for CudaStaged<'_, '_> {
    fn drop(&mut self) {
        if !self.queued {
            self.upload.lock().free.push(self.slot);
            self.upload.changed.notify_all();
        }
    }
}

impl Drop for CudaUpload<'_> {
    fn drop(&mut self) {
        // Nothing may still read the pinned buffers when they are reused.
        // SAFETY: our own stream and events, each destroyed once.
        unsafe {
            let _ = self.buf.staging.ctx.bind_to_thread();
            let done = result::stream::synchronize(self.stream).is_ok();
            for s in self.slots.drain(..) {
                let _ = result::event::destroy(s.event);
                if done {
                    self.buf.staging.give_back(s.host);
                } else {
                    // A copy may still read it: never reused or freed.
                    tracing::error!(model = %self.buf.label, "a host-to-device copy did not finish; its staging buffer is leaked");
                }
            }
            let _ = result::stream::destroy(self.stream);
        }
    }
}
