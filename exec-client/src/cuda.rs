//! Weights lent as GPU memory (feature `cuda`): the daemon's allocation is
//! opened once per process with `cuIpcOpenMemHandle` and every tensor is a
//! view into it, made without copying a byte.
//!
//! Lifetime rules (docs/cuda.md has the whole story): candle must never free
//! these views, because the memory is the daemon's. Each view is a
//! `CudaSlice` built with `upgrade_device_ptr`, whose drop would call
//! `cuMemFree`; the [`IpcMapping`] keeps one clone of every tensor and never
//! drops them, so no view is ever freed. When the mapping is dropped (after
//! the run) it waits for the stream and closes the handle; the lease that kept
//! the allocation alive ends when the connection closes, after that.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Device, Storage, Tensor};
use cudarc::driver::{sys, CudaContext, CudaStream};

use mora_common::manifest::{Manifest, TensorDType};
use mora_common::protocol::{GpuUuid, IpcHandle};

/// The candle device for the GPU `uuid`, found by UUID among those this
/// process sees (its ordinal may differ from the daemon's).
pub fn candle_device(uuid: GpuUuid) -> Result<Device, String> {
    let ordinal = mora_common::gpu::ordinal_of(uuid).map_err(|e| e.to_string())?;
    Device::new_cuda(ordinal as usize).map_err(|e| format!("cannot open cuda:{ordinal} ({uuid}): {e}"))
}

/// An opened IPC handle and the tensors that view it.
pub struct IpcMapping {
    base: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Never dropped: dropping the last clone of a view would free memory
    /// that belongs to the daemon.
    views: ManuallyDrop<Vec<Tensor>>,
}

/// Opens `handle` (an allocation of `len` bytes on `gpu`) on `device` and
/// returns a tensor per manifest entry, viewing the allocation in place.
/// `manifest` has been checked against the allocation
/// (`mora_common::acquired::check`).
pub fn import(
    handle: IpcHandle,
    len: u64,
    manifest: &Manifest,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, IpcMapping), String> {
    let cuda = device.as_cuda_device().map_err(|e| e.to_string())?;
    let stream = cuda.cuda_stream();
    let ctx = stream.context().clone();
    ctx.bind_to_thread().map_err(|e| format!("binding the CUDA context failed: {e}"))?;
    let raw = sys::CUipcMemHandle { reserved: handle.0.map(|b| b as std::ffi::c_char) };
    let mut base: sys::CUdeviceptr = 0;
    // SAFETY: `raw` is a handle the daemon made with cuIpcGetMemHandle;
    // `base` is written on success. Opened once per allocation per process.
    unsafe {
        sys::cuIpcOpenMemHandle_v2(&mut base, raw, sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32)
    }
    .result()
    .map_err(|e| format!("cuIpcOpenMemHandle failed: {e} (is the daemon on the same machine, and its GPU visible here?)"))?;
    let mut mapping = IpcMapping { base, ctx, stream, views: ManuallyDrop::new(Vec::new()) };
    // The mapping must be at least as large as the manifest says.
    let (mut range_base, mut range_len): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: `base` is a live mapping; both outputs are written on success.
    unsafe { sys::cuMemGetAddressRange_v2(&mut range_base, &mut range_len, base) }
        .result()
        .map_err(|e| format!("cuMemGetAddressRange failed: {e}"))?;
    if range_base != base || (range_len as u64) < len {
        return Err(format!("the mapped allocation has {range_len} bytes, the manifest needs {len}"));
    }
    let mut tensors = HashMap::with_capacity(manifest.tensors.len());
    for t in &manifest.tensors {
        let ptr = base + t.offset;
        let elems = (t.len / t.dtype.size_in_bytes() as u64) as usize;
        // SAFETY: [ptr, ptr + t.len) lies inside the mapped allocation
        // (validated manifest, checked range), aligned for the element type;
        // the slice is never freed (see IpcMapping::views).
        let storage = unsafe {
            match t.dtype {
                TensorDType::F32 => wrap::<f32>(&mapping.stream, ptr, elems, cuda),
                TensorDType::F16 => wrap::<half::f16>(&mapping.stream, ptr, elems, cuda),
                TensorDType::BF16 => wrap::<half::bf16>(&mapping.stream, ptr, elems, cuda),
                TensorDType::F64 => wrap::<f64>(&mapping.stream, ptr, elems, cuda),
                TensorDType::U8 => wrap::<u8>(&mapping.stream, ptr, elems, cuda),
                TensorDType::U32 => wrap::<u32>(&mapping.stream, ptr, elems, cuda),
                TensorDType::I16 => wrap::<i16>(&mapping.stream, ptr, elems, cuda),
                TensorDType::I32 => wrap::<i32>(&mapping.stream, ptr, elems, cuda),
                TensorDType::I64 => wrap::<i64>(&mapping.stream, ptr, elems, cuda),
                other => return Err(format!("tensor `{}` is {other:?}, which candle cannot hold", t.name)),
            }
        };
        let tensor = Tensor::from_storage(Storage::Cuda(storage), t.shape.clone(), BackpropOp::none(), false);
        mapping.views.push(tensor.clone());
        tensors.insert(t.name.clone(), tensor);
    }
    Ok((tensors, mapping))
}

/// A candle storage viewing `elems` values of `T` at `ptr`.
///
/// # Safety
/// `ptr` must point at `elems` values of `T` of live device memory in the
/// stream's context, and the returned storage must never be dropped.
unsafe fn wrap<T: candle_core::cuda::CudaDType>(
    stream: &Arc<CudaStream>,
    ptr: sys::CUdeviceptr,
    elems: usize,
    device: &candle_core::CudaDevice,
) -> CudaStorage {
    let slice = stream.upgrade_device_ptr::<T>(ptr, elems);
    CudaStorage::wrap_cuda_slice(slice, device.clone())
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        // Every kernel that reads the weights has finished before the
        // mapping goes; the views themselves are leaked on purpose.
        let _ = self.stream.synchronize();
        let _ = self.ctx.bind_to_thread();
        // SAFETY: opened once in `import`, closed once here; the views that
        // point into it are never used after this (the run is over).
        let _ = unsafe { sys::cuIpcCloseMemHandle(self.base) };
    }
}
