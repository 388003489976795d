//! Model weights for candle: lent by the daemon (a sealed segment mapped
//! read-only, or GPU memory opened through a CUDA IPC handle) or, with
//! `--no-cache`, read in-process from the files.
//!
//! CPU tensors view the daemon's segment in place through a copy-on-write
//! mapping ([`crate::lent`]), or, where that is not possible, are copied out
//! of a read-only mapping once (timed and reported as "model built"). GPU
//! tensors view the daemon's allocation in place (see [`crate::cuda`]). Lent
//! memory is never written and never freed by candle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use mora_common::connection::Connection;
use mora_common::manifest::{TensorDType, WeightDType};
use mora_common::acquired::LentMemory;
use mora_common::protocol::{self, LeaseId, Request, Response};
use mora_common::segment::{Mapping, Segment};
use mora_common::units::KeepAlive;
use mora_tokenizers::vocab::{Prepared, WordBytes};
use mora_common::{Manifest, ModelSource, TensorEntry};

use crate::{ExecError, ProtocolError, WeightsError};

/// Where a model's weights came from, for the run report.
#[derive(Debug, Clone, PartialEq)]
pub enum Provenance {
    /// Lent by the daemon; `loaded_now` when this request made it read the files.
    Daemon { lease: LeaseId, loaded_now: bool, load_ms: u64, bytes: u64 },
    /// Read in-process (`--no-cache`).
    InProcess { load_ms: u64, bytes: u64 },
}

/// A model's weights, ready to build candle modules from.
pub struct Weights {
    pub name: String,
    /// Directory with the model's small files (config, tokenizer, pooling).
    pub dir: PathBuf,
    pub dtype: WeightDType,
    pub provenance: Provenance,
    /// Where the weights are, and where a model built on them computes.
    pub device: Device,
    /// Opening `device` (for a GPU: creating its CUDA context).
    pub device_open: Duration,
    /// Making lent weights usable once the daemon answered: mapping the
    /// memfd, or opening the CUDA IPC handle and wrapping the tensors.
    pub map: Duration,
    /// The model's `tokenizer.json` as the daemon prepared it, when it lent one.
    pub tokenizer: Option<Prepared>,
    store: Store,
}

enum Store {
    Mapped(MappedWeights),
    Loaded(HashMap<String, Tensor>),
    /// Views into a daemon's GPU allocation; the mapping (dropped after the
    /// tensors, in field order) closes the IPC handle.
    #[cfg(feature = "cuda")]
    Gpu { tensors: HashMap<String, Tensor>, _mapping: crate::cuda::IpcMapping },
}

/// The candle device that holds weights lent on `device`.
pub fn candle_device(device: protocol::Device) -> Result<Device, ExecError> {
    match device {
        protocol::Device::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        protocol::Device::Cuda(uuid) => crate::cuda::candle_device(uuid).map_err(|e| ExecError::Weights(WeightsError::OpenGpu(e))),
        #[cfg(not(feature = "cuda"))]
        protocol::Device::Cuda(uuid) => Err(ExecError::Weights(WeightsError::NoCuda(uuid))),
    }
}

/// A [`SimpleBackend`] over a daemon segment. Cloning shares it.
#[derive(Clone)]
pub struct MappedWeights {
    bytes: Bytes,
    index: Arc<HashMap<String, TensorEntry>>,
}

#[derive(Clone)]
enum Bytes {
    /// CPU tensors view the segment in place ([`crate::lent`]): the address
    /// of a copy-on-write mapping kept until exit, and the tensors made so
    /// far, since each tensor's bytes are lent once and shared after.
    Lent { base: usize, made: Arc<Mutex<HashMap<String, Tensor>>> },
    /// A read-only mapping that tensors are copied out of (where the global
    /// allocator is not [`crate::lent::LentAware`]).
    Copied(Arc<Mapping>),
}

pub fn candle_dtype(d: TensorDType) -> Option<DType> {
    Some(match d {
        TensorDType::U8 => DType::U8,
        TensorDType::U32 => DType::U32,
        TensorDType::I16 => DType::I16,
        TensorDType::I32 => DType::I32,
        TensorDType::I64 => DType::I64,
        TensorDType::F16 => DType::F16,
        TensorDType::BF16 => DType::BF16,
        TensorDType::F32 => DType::F32,
        TensorDType::F64 => DType::F64,
        TensorDType::Bool | TensorDType::I8 | TensorDType::U16 | TensorDType::U64 => return None,
    })
}

pub fn weight_dtype(d: WeightDType) -> DType {
    match d {
        WeightDType::F32 => DType::F32,
        WeightDType::F16 => DType::F16,
        WeightDType::BF16 => DType::BF16,
    }
}

impl MappedWeights {
    /// Maps `segment`, whose manifest the caller has validated against it:
    /// in place where this process can lend it to candle, else to copy from.
    pub fn map(segment: &Segment, manifest: Manifest) -> Result<Self, mora_common::segment::SegmentError> {
        let index = Arc::new(manifest.tensors.into_iter().map(|t| (t.name.clone(), t)).collect());
        if crate::lent::available() {
            let (base, len) = segment.map_copy_on_write()?.leak();
            if crate::lent::register(base, len) {
                return Ok(MappedWeights { bytes: Bytes::Lent { base: base as usize, made: Arc::default() }, index });
            }
        }
        Ok(MappedWeights { bytes: Bytes::Copied(Arc::new(segment.map()?)), index })
    }

    /// True when tensors view the segment in place rather than copy it.
    pub fn in_place(&self) -> bool {
        matches!(self.bytes, Bytes::Lent { .. })
    }

    fn tensor(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .index
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let dtype = candle_dtype(t.dtype)
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` is {:?}, which candle cannot hold", t.dtype)))?;
        match &self.bytes {
            Bytes::Copied(mapping) => {
                let bytes = &mapping.as_slice()[t.offset as usize..(t.offset + t.len) as usize];
                Tensor::from_raw_buffer(bytes, dtype, &t.shape, dev)
            }
            Bytes::Lent { base, made } => {
                let mut made = made.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(done) = made.get(name) {
                    return Ok(done.clone());
                }
                let ptr = (*base + t.offset as usize) as *mut u8;
                let len = t.len as usize;
                // SAFETY: the manifest was validated against the segment, so
                // the range lies inside the registered mapping; every bit
                // pattern is a valid f32, f16, bf16 or integer; `made` keeps
                // the tensor so this range is lent once, and every later
                // request shares that tensor's storage.
                unsafe fn lend<T: candle_core::WithDType>(ptr: *mut u8, len: usize, shape: &[usize]) -> Option<candle_core::Result<Tensor>> {
                    crate::lent::lend::<T>(ptr, len).map(|v| Tensor::from_vec(v, shape, &Device::Cpu))
                }
                let lent = unsafe {
                    match dtype {
                        DType::F32 => lend::<f32>(ptr, len, &t.shape),
                        DType::F16 => lend::<half::f16>(ptr, len, &t.shape),
                        DType::BF16 => lend::<half::bf16>(ptr, len, &t.shape),
                        _ => None,
                    }
                };
                let tensor = match lent {
                    Some(t) => t?,
                    // Misaligned or a dtype lent as bytes: copy this one.
                    // SAFETY: as above; the slice is only read, and no Vec of it exists.
                    None => Tensor::from_raw_buffer(unsafe { std::slice::from_raw_parts(ptr, len) }, dtype, &t.shape, &Device::Cpu)?,
                };
                made.insert(name.to_string(), tensor.clone());
                match dev {
                    Device::Cpu => Ok(tensor),
                    other => tensor.to_device(other),
                }
            }
        }
    }

    /// `name` in `dtype` on `dev`. A large f16 or bf16 tensor widened to f32
    /// for the CPU (weights held in half precision, computed in f32) is
    /// converted straight from the segment over every core, bit for bit what
    /// candle's single-threaded `to_dtype` gives; anything else is `to_dtype`.
    fn in_dtype(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        use mora_common::convert::{convert_parallel, cores, MIN_PARALLEL_ELEMENTS};
        if let (Device::Cpu, DType::F32, Some(t)) = (dev, dtype, self.index.get(name)) {
            let elems = t.len as usize / 2;
            if matches!(t.dtype, TensorDType::F16 | TensorDType::BF16) && elems >= MIN_PARALLEL_ELEMENTS {
                let src = match &self.bytes {
                    Bytes::Copied(mapping) => &mapping.as_slice()[t.offset as usize..(t.offset + t.len) as usize],
                    // SAFETY: the manifest was validated against the segment,
                    // whose mapping is kept until exit; the range is only read.
                    Bytes::Lent { base, .. } => unsafe { std::slice::from_raw_parts((*base + t.offset as usize) as *const u8, t.len as usize) },
                };
                let mut out = vec![0f32; elems];
                // SAFETY: the byte view covers exactly `out`, and every bit
                // pattern written is a valid f32.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), elems * 4) };
                convert_parallel(src, t.dtype, dst, TensorDType::F32, cores());
                return Tensor::from_vec(out, t.shape.as_slice(), &Device::Cpu);
            }
        }
        self.tensor(name, dev)?.to_dtype(dtype)
    }
}

impl SimpleBackend for MappedWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.in_dtype(name, dtype, dev)?;
        if tensor.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt())?
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.in_dtype(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

impl Weights {
    /// Asks the daemon for `source` in `dtype` on `device` and maps what it
    /// lends. The lease lasts as long as `conn` stays open.
    pub fn from_daemon(
        conn: &Connection,
        source: ModelSource,
        dtype: WeightDType,
        device: protocol::Device,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Weights, ExecError> {
        let name = source.display_name();
        // Opened before asking, so a GPU this process cannot use fails here
        // rather than after the daemon loaded gigabytes onto it.
        let opening = Instant::now();
        let candle_dev = candle_device(device)?;
        let device_open = opening.elapsed();
        let request = Request::Acquire { source, dtype, device, keep_alive };
        let (response, fds) = conn.call_showing_load(&request, "mora-exec").map_err(|e| {
            use mora_common::connection::CallError;
            use mora_common::frame::FrameError;
            match e {
                CallError::Frame(FrameError::Closed | FrameError::Io(_)) => ExecError::DaemonExited { model: name.clone() },
                other => other.into(),
            }
        })?;
        crate::phases::mark("acquire");
        let mapping_start = Instant::now();
        let acquired = match response {
            Response::Acquired(a) => a,
            Response::Error(e) => return Err(ExecError::Daemon(e)),
            other => return Err(ProtocolError::UnexpectedReply(Box::new(other)).into()),
        };
        let lent = mora_common::acquired::check(acquired, device, fds).map_err(ProtocolError::Lent)?;
        let (acquired, len) = (lent.reply, lent.len);
        let store = match lent.memory {
            LentMemory::Host(segment) => Store::Mapped(
                MappedWeights::map(&segment, acquired.manifest)
                    .map_err(|source| ProtocolError::Map { model: name.clone(), source })?,
            ),
            #[cfg(feature = "cuda")]
            LentMemory::Gpu { handle, .. } => {
                let (tensors, mapping) = crate::cuda::import(handle, len, &acquired.manifest, &candle_dev)
                    .map_err(|message| ExecError::Weights(WeightsError::ImportGpu { model: name.clone(), message }))?;
                Store::Gpu { tensors, _mapping: mapping }
            }
            #[cfg(not(feature = "cuda"))]
            LentMemory::Gpu { .. } => {
                return Err(ProtocolError::GpuWithoutCuda { model: name.clone() }.into())
            }
        };
        // A prepared tokenizer that cannot be read is not an error: the
        // tokenizer is then read from the file, as without one.
        let tokenizer = lent.tokenizer.and_then(|(fd, len)| {
            Segment::from_received(fd, len).and_then(|s| s.map()).ok().and_then(|m| Prepared::read(Arc::new(WordBytes(m))))
        });
        crate::phases::mark("map");
        Ok(Weights {
            name: acquired.name,
            tokenizer,
            dir: acquired.dir,
            dtype,
            provenance: Provenance::Daemon {
                lease: acquired.lease,
                loaded_now: acquired.loaded_now,
                load_ms: acquired.load_ms,
                bytes: len,
            },
            device: candle_dev,
            device_open,
            map: mapping_start.elapsed(),
            store,
        })
    }

    /// Reads `source` in-process onto `device` with candle's own safetensors
    /// loader: the baseline a run without Mora pays on every start.
    pub fn in_process(source: &ModelSource, dtype: WeightDType, device: protocol::Device) -> Result<Weights, ExecError> {
        let opening = Instant::now();
        let dev = candle_device(device)?;
        let device_open = opening.elapsed();
        let start = Instant::now();
        let resolved = source.resolve().map_err(WeightsError::Resolve)?;
        let mut tensors = HashMap::new();
        let mut bytes = 0u64;
        for file in &resolved.weights {
            bytes += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            let loaded = candle_core::safetensors::load(file, &dev)
                .map_err(|source| WeightsError::Load { file: file.clone(), source })?;
            tensors.extend(loaded);
        }
        // Hold floats in the requested dtype, as the daemon would, so that a
        // run computes on the same values with or without the cache.
        let held = weight_dtype(dtype);
        for t in tensors.values_mut() {
            if t.dtype().is_float() && t.dtype() != held {
                *t = t.to_dtype(held).map_err(|source| WeightsError::Convert { model: resolved.name.clone(), source })?;
            }
        }
        crate::phases::mark("read weights");
        Ok(Weights {
            name: resolved.name,
            dir: resolved.dir,
            dtype,
            provenance: Provenance::InProcess { load_ms: start.elapsed().as_millis() as u64, bytes },
            device: dev,
            device_open,
            map: Duration::ZERO,
            tokenizer: None,
            store: Store::Loaded(tensors),
        })
    }

    /// A VarBuilder over these weights, on their device, handing out tensors
    /// in `compute` (converted from the dtype the weights are held in).
    /// True when lent weights are used where they lie: a CPU segment viewed
    /// through a copy-on-write mapping, or GPU memory opened by IPC.
    pub fn in_place(&self) -> bool {
        match &self.store {
            Store::Mapped(m) => m.in_place(),
            Store::Loaded(_) => false,
            #[cfg(feature = "cuda")]
            Store::Gpu { .. } => true,
        }
    }

    /// Every tensor's name and shape (what a LoRA is matched against).
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        match &self.store {
            Store::Mapped(m) => m.index.iter().map(|(n, e)| (n.clone(), e.shape.clone())).collect(),
            Store::Loaded(t) => t.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect(),
            #[cfg(feature = "cuda")]
            Store::Gpu { tensors, .. } => tensors.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect(),
        }
    }

    pub fn var_builder(&self, compute: DType) -> VarBuilder<'static> {
        match &self.store {
            Store::Mapped(m) => VarBuilder::from_backend(Box::new(m.clone()), compute, self.device.clone()),
            Store::Loaded(t) => VarBuilder::from_tensors(t.clone(), compute, &self.device),
            #[cfg(feature = "cuda")]
            Store::Gpu { tensors, .. } => VarBuilder::from_tensors(tensors.clone(), compute, &self.device),
        }
    }
}

/// An image pipeline builds each component on its lent (or loaded) weights.
impl mora_models::image::pipeline::ComponentWeights for Weights {
    fn device(&self) -> &Device {
        &self.device
    }

    fn held_dtype(&self) -> DType {
        weight_dtype(self.dtype)
    }

    fn var_builder(&self, compute: DType) -> VarBuilder<'static> {
        Weights::var_builder(self, compute)
    }
}
