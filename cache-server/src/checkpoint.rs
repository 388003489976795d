//! Reading safetensors checkpoints into a sealed segment or GPU memory.
//!
//! Headers are parsed and checked in full before a byte of tensor data is
//! read, so a truncated or corrupt file is refused with a reason instead of
//! being half-loaded. Data is read with `pread` in chunks (no mmap of the
//! source file: a file truncated under a mapping would kill the daemon with
//! SIGBUS), converting floating-point tensors to the requested dtype. A host
//! segment is filled by every core at once, each thread reading and
//! converting chunks of its own ([`fill_host`]); a GPU load the same way
//! into pinned staging buffers, each copied to the device while its thread
//! reads the next chunk ([`fill_device`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mora_common::convert::{convert_parallel, MIN_PARALLEL_ELEMENTS};
use mora_common::manifest::{tensor_bytes, Manifest, TensorDType, WeightDType, DEVICE_TENSOR_ALIGN, TENSOR_ALIGN};
use mora_common::protocol::{Device, SegmentDescriptor};
use mora_common::segment::{shared_memory_huge_pages, Segment, SegmentError, SegmentFile, SegmentWriter};
use mora_common::ResolvedModel;
use mora_tokenizers::vocab::Prepared;

use crate::gpu::{DeviceBuffer, GpuError, GpuMemory, STAGING_BYTES};

/// Safetensors headers above this size are refused before they are read:
/// a header of a model with 100 000 tensors is about 10 MiB (docs/decisions.md).
pub const MAX_HEADER_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not a valid safetensors file: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("tensor `{name}` appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor { name: String, first: PathBuf, second: PathBuf },
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("GPU: {0}")]
    Gpu(#[from] GpuError),
    #[error("cannot write the shared-memory segment: {0}")]
    Write(io::Error),
}

/// One tensor as a checkpoint file stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: TensorDType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub file_offset: u64,
    pub len: u64,
}

/// The tensors of one safetensors file, sorted by their position in it.
pub fn read_header(path: &Path) -> Result<Vec<StoredTensor>, CheckpointError> {
    let io_err = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let invalid = |reason: String| CheckpointError::Invalid { path: path.to_path_buf(), reason };
    let mut file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    if file_len < 8 {
        return Err(invalid(format!("{file_len} bytes, shorter than the 8-byte header length")));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(io_err)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(format!("header claims {header_len} bytes, above the {MAX_HEADER_BYTES}-byte limit")));
    }
    if 8 + header_len > file_len {
        return Err(invalid(format!(
            "header claims {header_len} bytes but the file has only {} after the length (truncated?)",
            file_len - 8
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io_err)?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("header is not JSON: {e}")))?;
    let map = json.as_object().ok_or_else(|| invalid("header is not a JSON object".into()))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| invalid(format!("tensor `{name}`: {what}"));
        let dtype_name = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?;
        let dtype = TensorDType::from_safetensors(dtype_name)
            .ok_or_else(|| bad(&format!("unsupported dtype {dtype_name}")))?;
        let shape = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offsets = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets is not [begin, end]"))?;
        let (begin, end) = offsets;
        if begin > end {
            return Err(bad(&format!("data_offsets [{begin}, {end}] run backwards")));
        }
        if end > data_len {
            return Err(bad(&format!(
                "data ends at byte {end} but the file holds {data_len} bytes of data (truncated?)"
            )));
        }
        let expected = tensor_bytes(dtype, &shape).ok_or_else(|| bad("size overflows"))?;
        if end - begin != expected {
            return Err(bad(&format!(
                "shape {shape:?} of {dtype_name} needs {expected} bytes but data_offsets span {}",
                end - begin
            )));
        }
        tensors.push(StoredTensor { name: name.clone(), dtype, shape, file_offset: data_start + begin, len: expected });
    }
    tensors.sort_by_key(|t| t.file_offset);
    // Each tensor owns its bytes: two views of the same bytes are a corrupt
    // or crafted file, not a checkpoint.
    for pair in tensors.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.file_offset < a.file_offset + a.len {
            let range = |t: &StoredTensor| format!("{}..{}", t.file_offset - data_start, t.file_offset - data_start + t.len);
            return Err(invalid(format!(
                "tensors `{}` (bytes {}) and `{}` (bytes {}) overlap",
                a.name,
                range(a),
                b.name,
                range(b)
            )));
        }
    }
    Ok(tensors)
}

/// The type a stored tensor is held in when `requested` is asked for: floats
/// convert, everything else keeps its type.
pub fn held_dtype(stored: TensorDType, requested: WeightDType) -> TensorDType {
    if stored.is_float() {
        requested.tensor_dtype()
    } else {
        stored
    }
}

/// Where a resident model's bytes are.
pub enum Storage {
    /// A sealed memfd, lent as a descriptor.
    Host(Segment),
    /// One device allocation, lent as a CUDA IPC handle. Freed when dropped.
    Gpu(Box<dyn DeviceBuffer>),
}

impl Storage {
    pub fn len(&self) -> u64 {
        match self {
            Storage::Host(s) => s.len(),
            Storage::Gpu(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a client is told about this storage.
    pub fn descriptor(&self) -> SegmentDescriptor {
        match self {
            Storage::Host(s) => SegmentDescriptor::Memfd { len: s.len() },
            Storage::Gpu(b) => SegmentDescriptor::CudaIpc { handle: b.ipc_handle(), gpu: b.gpu(), len: b.len() },
        }
    }
}

/// The model's `dir/tokenizer.json` prepared for clients
/// (`mora_tokenizers::vocab::Prepared`: its vocabulary ready to read in place)
/// in a sealed segment, lent with the weights; `None` where there is no
/// such file or it is not one Mora prepares (a client then reads the file
/// itself, as it always may). Never fails a load.
pub fn prepare_tokenizer(name: &str, dir: &Path) -> Option<Segment> {
    let file = dir.join("tokenizer.json");
    if !file.is_file() {
        return None;
    }
    let start = Instant::now();
    let words = match Prepared::build(&file) {
        Ok(Some(words)) => words,
        Ok(None) => {
            tracing::debug!(model = %name, "tokenizer.json left to clients: not a WordPiece, BPE or Unigram vocabulary Mora prepares");
            return None;
        }
        Err(e) => {
            tracing::warn!(model = %name, error = %e, "cannot read tokenizer.json; clients read it themselves");
            return None;
        }
    };
    let sealed = SegmentWriter::create("mora-tokenizer", Prepared::bytes(&words).len() as u64).and_then(|mut segment| {
        segment.as_mut_slice().copy_from_slice(Prepared::bytes(&words));
        segment.seal()
    });
    match sealed {
        Ok(segment) => {
            tracing::info!(model = %name, kib = segment.len() / 1024, ms = start.elapsed().as_millis() as u64, "tokenizer prepared");
            Some(segment)
        }
        Err(e) => {
            tracing::warn!(model = %name, error = %e, "cannot seal the prepared tokenizer; clients read tokenizer.json themselves");
            None
        }
    }
}

/// A model read into its storage.
pub struct Loaded {
    pub manifest: Manifest,
    pub storage: Storage,
    /// Bytes read from the checkpoint files.
    pub bytes_read: u64,
    pub elapsed: Duration,
    /// The model's `tokenizer.json` prepared for clients ([`prepare_tokenizer`]).
    pub tokenizer: Option<Segment>,
}

/// What a load will produce, known from the headers alone.
pub struct Plan {
    pub manifest: Manifest,
    stored: Vec<(PathBuf, StoredTensor)>,
    /// The model's directory, where its `tokenizer.json` is prepared from.
    dir: PathBuf,
}

impl Plan {
    /// Bytes the resident copy will occupy.
    pub fn bytes(&self) -> u64 {
        self.manifest.segment_len
    }
}

/// How tensors are aligned in a segment on `device`.
pub fn alignment(device: Device) -> u64 {
    match device {
        Device::Cpu => TENSOR_ALIGN,
        Device::Cuda(_) => DEVICE_TENSOR_ALIGN,
    }
}

/// Plans the segment of `model` held in `dtype` on `device` from the headers
/// alone (no tensor data is read): the fit check before a load uses this.
pub fn plan(model: &ResolvedModel, dtype: WeightDType, device: Device) -> Result<Plan, CheckpointError> {
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut stored = Vec::new();
    for file in &model.weights {
        for t in read_header(file)? {
            if let Some(first) = seen.insert(t.name.clone(), file.clone()) {
                return Err(CheckpointError::DuplicateTensor { name: t.name, first, second: file.clone() });
            }
            stored.push((file.clone(), t));
        }
    }
    let manifest = Manifest::layout_aligned(
        stored.iter().map(|(_, t)| (t.name.clone(), held_dtype(t.dtype, dtype), t.shape.clone())),
        alignment(device),
    );
    Ok(Plan { manifest, stored, dir: model.dir.clone() })
}

/// Bytes past the current chunk that the kernel is asked to read ahead,
/// where one thread loads alone.
const READ_AHEAD: u64 = 32 << 20;

/// Bytes per chunk when a host segment or a GPU allocation is filled, and
/// how often progress moves: small enough that a converted chunk is still
/// in the CPU's cache when it is copied on, and that the chunks spread
/// evenly over the workers. A GPU upload's staging buffers hold one chunk.
pub const WRITE_CHUNK: usize = 4 << 20;
const _: () = assert!(WRITE_CHUNK <= STAGING_BYTES, "a chunk must fit a GPU staging buffer");

/// At most this many threads fill one segment or GPU allocation. Page
/// allocation in the kernel is what they share on the host; more than two
/// were not measured.
const MAX_FILL_THREADS: usize = 8;

/// A piece of one tensor: `elems` elements from element `first` of
/// `plan.stored[tensor]`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    tensor: usize,
    first: u64,
    elems: u64,
}

impl Plan {
    /// Every tensor cut into chunks of at most `bytes` in the file and in
    /// the segment (at least one element), in the order of the files and of
    /// the segment.
    fn chunks(&self, bytes: usize) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        for (tensor, ((_, t), entry)) in self.stored.iter().zip(&self.manifest.tensors).enumerate() {
            let size = t.dtype.size_in_bytes().max(entry.dtype.size_in_bytes()) as u64;
            let per_chunk = (bytes as u64 / size).max(1);
            let elems = entry.len / entry.dtype.size_in_bytes() as u64;
            let mut first = 0;
            while first < elems {
                let n = per_chunk.min(elems - first);
                chunks.push(Chunk { tensor, first, elems: n });
                first += n;
            }
        }
        chunks
    }

    /// Where `chunk` goes in the segment, and its length there.
    fn place(&self, chunk: Chunk) -> (u64, usize) {
        let entry = &self.manifest.tensors[chunk.tensor];
        let size = entry.dtype.size_in_bytes() as u64;
        (entry.offset + chunk.first * size, (chunk.elems * size) as usize)
    }

    /// Bytes the load reads from the checkpoint files.
    fn bytes_stored(&self) -> u64 {
        self.stored.iter().map(|(_, t)| t.len).sum()
    }

    /// Reads `chunk` into `out` (its bytes in the segment), converting
    /// through `scratch` on up to `threads` threads where the stored dtype is
    /// not the held one. Where `files` say so, asks the kernel first to read
    /// on past the chunk, so that the disk works while this one chunk is
    /// converted and uploaded ([`Files::open`]).
    fn read_chunk(&self, chunk: Chunk, files: &Files, out: &mut [u8], scratch: &mut Vec<u8>, threads: usize) -> Result<(), CheckpointError> {
        let (path, t) = &self.stored[chunk.tensor];
        let held = self.manifest.tensors[chunk.tensor].dtype;
        let file = files.get(path);
        let io_err = |source: io::Error| CheckpointError::Io { path: path.clone(), source };
        let src_size = t.dtype.size_in_bytes() as u64;
        let at = t.file_offset + chunk.first * src_size;
        let len = chunk.elems * src_size;
        if let Some(ahead) = std::num::NonZeroU64::new(READ_AHEAD).filter(|_| files.read_ahead) {
            let _ = rustix::fs::fadvise(file, at + len, Some(ahead), rustix::fs::Advice::WillNeed);
        }
        if t.dtype == held {
            file.read_exact_at(out, at).map_err(io_err)
        } else {
            scratch.resize(len as usize, 0);
            file.read_exact_at(scratch, at).map_err(io_err)?;
            convert_parallel(scratch, t.dtype, out, held, threads.min(chunk.elems as usize / MIN_PARALLEL_ELEMENTS));
            Ok(())
        }
    }
}

/// The plan's checkpoint files, each opened once and shared by every
/// loading thread, so that the kernel's read-ahead sees one reader going
/// through the file rather than several each skipping the others' chunks.
struct Files {
    files: Vec<(PathBuf, File)>,
    /// Whether each chunk's read first asks for the next [`READ_AHEAD`]
    /// bytes (`POSIX_FADV_WILLNEED`).
    read_ahead: bool,
}

impl Files {
    /// Opens every file of `plan`, each advised as read in order
    /// (`POSIX_FADV_SEQUENTIAL`: the kernel's own read-ahead, doubled). A
    /// fill from several threads leaves the rest to the kernel, since its
    /// threads keep reads in flight while others convert and write; explicit
    /// read-ahead made host loads slower when cold (docs/decisions.md). A GPU
    /// load from one thread, which reads, converts and copies in turn, still
    /// asks (`read_ahead`).
    fn open(plan: &Plan, read_ahead: bool) -> Result<Files, CheckpointError> {
        let mut files: Vec<(PathBuf, File)> = Vec::new();
        for (path, _) in &plan.stored {
            if !files.iter().any(|(p, _)| p == path) {
                let f = File::open(path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Sequential);
                files.push((path.clone(), f));
            }
        }
        Ok(Files { files, read_ahead })
    }

    fn get(&self, path: &Path) -> &File {
        &self.files.iter().find(|(p, _)| p == path).expect("every file of the plan is open").1
    }
}

/// Where [`fill_host`] puts a host segment's bytes.
enum HostSink<'a> {
    /// The segment's own writable mapping: each thread reads its chunks
    /// straight into it.
    Mapping(&'a mut [u8]),
    /// The segment's memfd: chunks are read (and converted) into buffers by
    /// every thread but one, which writes them with `pwrite`.
    Written(&'a SegmentFile),
}

/// Fills a host segment from `threads` threads (at least one), each taking
/// the next chunk in file order, so that reads, conversions and the
/// kernel's page allocation run on every core at once. Into a mapping each
/// thread reads and converts its chunks in place (page faults on one file
/// run in parallel); with `pwrite` one thread writes what the others read
/// and convert, since the kernel takes the file's lock for each write and
/// a second writer would only wait on it (docs/decisions.md). The first
/// error stops every thread and is returned. Returns the bytes read.
fn fill_host(plan: &Plan, sink: HostSink<'_>, threads: usize, progress: &AtomicU64) -> Result<u64, CheckpointError> {
    use std::sync::mpsc::sync_channel;
    let files = Files::open(plan, false)?;
    let chunks = plan.chunks(WRITE_CHUNK);
    let chunk_count = chunks.len().max(1);
    let failure = Failure::default();
    match sink {
        HostSink::Mapping(mut rest) => {
            // Chunks follow one another in the segment, so the mapping
            // splits into disjoint pieces, one per chunk.
            let mut jobs = Vec::with_capacity(chunks.len());
            let mut at = 0u64;
            for c in chunks {
                let (offset, len) = plan.place(c);
                let (_, tail) = std::mem::take(&mut rest).split_at_mut((offset - at) as usize);
                let (piece, tail) = tail.split_at_mut(len);
                rest = tail;
                at = offset + len as u64;
                jobs.push((c, piece));
            }
            let jobs = Mutex::new(jobs.into_iter());
            failure.run(threads.clamp(1, chunk_count), &|| {
                let mut scratch = Vec::new();
                failure.each(&jobs, |(chunk, out)| {
                    plan.read_chunk(chunk, &files, out, &mut scratch, 1)?;
                    progress.fetch_add(out.len() as u64, Ordering::Relaxed);
                    Ok(())
                });
            });
        }
        HostSink::Written(segment) => {
            let readers = threads.saturating_sub(1).clamp(1, chunk_count);
            // Two buffers a reader, so that each can fill one while the
            // writer writes the other, and one more for the writer to take
            // up as soon as it is done.
            let buffers = 2 * readers + 1;
            let (to_writer, written) = sync_channel::<(u64, Vec<u8>)>(buffers);
            let (give_back, free) = sync_channel::<Vec<u8>>(buffers);
            for _ in 0..buffers {
                give_back.send(Vec::with_capacity(WRITE_CHUNK)).expect("room for every buffer");
            }
            let (free, jobs) = (Mutex::new(free), Mutex::new(chunks.into_iter()));
            let read = |to_writer: std::sync::mpsc::SyncSender<(u64, Vec<u8>)>| {
                let mut scratch = Vec::new();
                while !failure.is_set() {
                    let Some(chunk) = jobs.lock().unwrap_or_else(|e| e.into_inner()).next() else { break };
                    // The writer gives every buffer back, even after an error.
                    let Ok(mut buf) = free.lock().unwrap_or_else(|e| e.into_inner()).recv() else { break };
                    let (offset, len) = plan.place(chunk);
                    buf.resize(len, 0);
                    if let Err(e) = plan.read_chunk(chunk, &files, &mut buf, &mut scratch, 1) {
                        return failure.set(e);
                    }
                    if to_writer.send((offset, buf)).is_err() {
                        break;
                    }
                }
            };
            std::thread::scope(|scope| {
                // The readers run on threads of their own; their channel
                // closes when the last of them is done.
                let failure = &failure;
                let reading = scope.spawn(move || failure.run(readers, &|| read(to_writer.clone())));
                for (offset, buf) in written {
                    if !failure.is_set() {
                        match segment.write_all_at(&buf, offset) {
                            Ok(()) => {
                                progress.fetch_add(buf.len() as u64, Ordering::Relaxed);
                            }
                            Err(e) => failure.set(CheckpointError::Write(e)),
                        }
                    }
                    let _ = give_back.send(buf);
                }
                if reading.join().is_err() {
                    failure.set(CheckpointError::Write(io::Error::other("a loading thread panicked")));
                }
            });
        }
    }
    failure.result(plan.bytes_stored())
}

/// Fills a GPU allocation in chunks of [`WRITE_CHUNK`] bytes (the upload's
/// staging buffers) from `threads` threads (at least one, and no more than
/// chunks, since each holds a pinned buffer), each taking the next chunk in
/// file order and reading (and converting) it into one of the upload's
/// pinned staging buffers, which is copied to the device while the thread
/// goes on to its next chunk. One thread alone converts each chunk over
/// every other core and asks the kernel to read ahead, as the upload did
/// before it had several threads. The first error stops every thread and is
/// returned. Returns the bytes read, once every chunk is on the device.
fn fill_device(plan: &Plan, buffer: &mut dyn DeviceBuffer, threads: usize, progress: &AtomicU64) -> Result<u64, CheckpointError> {
    let chunks = plan.chunks(WRITE_CHUNK);
    let threads = threads.clamp(1, chunks.len().max(1));
    let upload = buffer.upload(threads)?;
    let files = Files::open(plan, threads == 1)?;
    let convert_threads = if threads == 1 { mora_common::convert::cores().saturating_sub(1).max(1) } else { 1 };
    let failure = Failure::default();
    let jobs = Mutex::new(chunks.into_iter());
    failure.run(threads, &|| {
        let mut scratch = Vec::new();
        failure.each(&jobs, |chunk| {
            let (offset, len) = plan.place(chunk);
            // On a failed read the buffer is dropped unsent: it goes back unused.
            let mut staged = upload.stage(offset, len)?;
            plan.read_chunk(chunk, &files, staged.bytes(), &mut scratch, convert_threads)?;
            staged.send()?;
            progress.fetch_add(len as u64, Ordering::Relaxed);
            Ok(())
        });
    });
    let bytes_read = failure.result(plan.bytes_stored())?;
    upload.finish()?;
    Ok(bytes_read)
}

/// The first error of the threads filling one segment or allocation; once
/// there is one, the others stop before their next chunk.
#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<CheckpointError>>,
}

impl Failure {
    fn set(&self, e: CheckpointError) {
        self.failed.store(true, Ordering::Relaxed);
        self.first.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
    }

    fn is_set(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Does `step` on each job taken from `jobs` until none is left or a
    /// thread has failed; an error of `step` is this thread's failure.
    fn each<T>(&self, jobs: &Mutex<impl Iterator<Item = T>>, mut step: impl FnMut(T) -> Result<(), CheckpointError>) {
        while !self.is_set() {
            let Some(job) = jobs.lock().unwrap_or_else(|e| e.into_inner()).next() else { break };
            if let Err(e) = step(job) {
                return self.set(e);
            }
        }
    }

    /// Runs `work` on `n` threads, this one among them; a panic is an error.
    fn run(&self, n: usize, work: &(dyn Fn() + Sync)) {
        std::thread::scope(|scope| {
            let others: Vec<_> = (1..n).map(|_| scope.spawn(work)).collect();
            work();
            for t in others {
                if t.join().is_err() {
                    self.set(CheckpointError::Write(io::Error::other("a loading thread panicked")));
                }
            }
        })
    }

    /// The first error, or `ok`.
    fn result<T>(self, ok: T) -> Result<T, CheckpointError> {
        match self.first.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(ok),
        }
    }
}

/// Threads that fill a segment or a GPU allocation: one per core, up to
/// [`MAX_FILL_THREADS`], unless `MORA_LOAD_THREADS` in the daemon's
/// environment gives a count (at most 64), which the benchmarks and the GPU
/// check use to compare one thread with several on one machine.
fn fill_threads() -> usize {
    load_threads(std::env::var("MORA_LOAD_THREADS").ok().as_deref())
}

/// The thread count `MORA_LOAD_THREADS` asks for, or the default where it
/// is unset or not a positive number.
fn load_threads(asked: Option<&str>) -> usize {
    match asked.and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(n) if n > 0 => n.min(64),
        _ => mora_common::convert::cores().min(MAX_FILL_THREADS),
    }
}

/// Where a load puts the model.
pub enum Target<'a> {
    Host,
    Gpu(&'a dyn GpuMemory, mora_common::protocol::GpuUuid),
}

/// Carries out a plan: reads every tensor into new storage on `target`,
/// adding the bytes of each chunk to `progress` (for waiting clients).
pub fn load_plan(name: &str, plan: Plan, target: Target<'_>, progress: &AtomicU64) -> Result<Loaded, CheckpointError> {
    let start = Instant::now();
    let len = plan.manifest.segment_len;
    let (storage, bytes_read) = match target {
        // Where huge pages come only to mappings that ask for them, a
        // mapping is filled: its 2 MiB pages cost less than `pwrite`'s 4 KiB
        // ones. Everywhere else `pwrite` is faster, since the kernel does
        // not zero a page that a write fills (docs/decisions.md).
        Target::Host => load_host(name, &plan, fill_by_mapping(), fill_threads(), progress)?,
        Target::Gpu(gpus, uuid) => {
            let mut buffer = gpus.allocate(uuid, len, name)?;
            let bytes_read = fill_device(&plan, &mut *buffer, fill_threads(), progress)?;
            (Storage::Gpu(buffer), bytes_read)
        }
    };
    // The load's time is the weights'; the tokenizer logs its own.
    let elapsed = start.elapsed();
    let tokenizer = prepare_tokenizer(name, &plan.dir);
    Ok(Loaded { manifest: plan.manifest, storage, bytes_read, elapsed, tokenizer })
}

/// Whether host segments are filled through a mapping rather than with
/// `pwrite`: where huge pages come only to mappings that ask for them,
/// unless `MORA_SEGMENT_FILL` (`mapped` or `written`) says otherwise, which
/// the benchmarks use to compare the two on one machine.
fn fill_by_mapping() -> bool {
    match std::env::var("MORA_SEGMENT_FILL").as_deref() {
        Ok("mapped") => true,
        Ok("written") => false,
        _ => shared_memory_huge_pages(),
    }
}

/// A host segment filled through a mapping (`mapped`) or with `pwrite`,
/// from `threads` threads.
fn load_host(name: &str, plan: &Plan, mapped: bool, threads: usize, progress: &AtomicU64) -> Result<(Storage, u64), CheckpointError> {
    let len = plan.manifest.segment_len;
    if mapped {
        let mut writer = SegmentWriter::create(&format!("mora:{name}"), len)?;
        let bytes_read = fill_host(plan, HostSink::Mapping(writer.as_mut_slice()), threads, progress)?;
        Ok((Storage::Host(writer.seal()?), bytes_read))
    } else {
        let segment = SegmentFile::create(&format!("mora:{name}"), len)?;
        let bytes_read = fill_host(plan, HostSink::Written(&segment), threads, progress)?;
        Ok((Storage::Host(segment.seal()?), bytes_read))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::{bf16, f16};
    use std::io::Write;

    /// Writes a safetensors file of the given tensors (name, dtype, shape, bytes).
    pub(crate) fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, dtype, shape, data) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
            );
            offset += data.len();
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut f = File::create(path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&header).unwrap();
        for (_, _, _, data) in tensors {
            f.write_all(data).unwrap();
        }
    }

    pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub(crate) fn model_dir(tag: &str) -> mora_test_support::Scratch {
        mora_test_support::Scratch::new(tag)
    }

    fn host(loaded: &Loaded) -> &Segment {
        match &loaded.storage {
            Storage::Host(s) => s,
            Storage::Gpu(_) => panic!("loaded to a GPU, not the host"),
        }
    }

    #[test]
    fn a_gpu_load_uploads_the_same_bytes_at_device_alignment_in_chunks() {
        use crate::gpu::fake::{Event, FakeGpus};
        use mora_common::protocol::GpuUuid;
        // Over a few chunks (4 MiB each), so the upload takes several and a
        // conversion splits at element boundaries.
        let n = 3 * WRITE_CHUNK / 4 + 1000;
        let big: Vec<f32> = (0..n).map(|i| (i as f32 * 0.001).sin()).collect();
        let d = model_dir("gpu");
        write_safetensors(
            &d.join("model.safetensors"),
            &[
                ("small", "F32", vec![3], f32_bytes(&[1.0, 2.0, 3.0])),
                ("big", "F32", vec![n], f32_bytes(&big)),
                ("ids", "I64", vec![2], [5i64, 6].iter().flat_map(|v| v.to_le_bytes()).collect()),
            ],
        );
        let model = resolved(&d);
        let uuid = GpuUuid([3; 16]);
        let gpus = FakeGpus::one(uuid, 1 << 30);
        for dtype in [WeightDType::F32, WeightDType::F16] {
            let on_host = load(&model, dtype).unwrap();
            let p = plan(&model, dtype, Device::Cuda(uuid)).unwrap();
            p.manifest.validate_aligned(DEVICE_TENSOR_ALIGN).unwrap();
            let device_len = p.bytes();
            let progress = AtomicU64::new(0);
            let label = format!("gpu-{dtype}");
            let loaded = load_plan(&label, p, Target::Gpu(&gpus, uuid), &progress).unwrap();
            assert_eq!(progress.load(Ordering::Relaxed), loaded.manifest.tensors.iter().map(|t| t.len).sum::<u64>());
            assert!(matches!(loaded.storage.descriptor(), SegmentDescriptor::CudaIpc { gpu, len, .. } if gpu == uuid && len == loaded.manifest.segment_len));
            let device_bytes = gpus.log.contents.lock().unwrap()[&label].clone();
            let host_map = host(&on_host).map().unwrap();
            for t in &loaded.manifest.tensors {
                let h = on_host.manifest.get(&t.name).unwrap();
                assert_eq!((t.dtype, t.len), (h.dtype, h.len));
                assert_eq!(
                    &device_bytes[t.offset as usize..(t.offset + t.len) as usize],
                    &host_map.as_slice()[h.offset as usize..(h.offset + h.len) as usize],
                    "{} in {dtype}",
                    t.name
                );
            }
            assert!(!gpus.freed(&label));
            drop(loaded);
            assert!(gpus.freed(&label));
            assert!(gpus.events().contains(&Event::Allocated { label, len: device_len }));
        }
    }

    #[test]
    fn a_gpu_load_from_any_number_of_threads_uploads_the_same_bytes_and_fails_on_a_shrunk_file() {
        use crate::gpu::fake::FakeGpus;
        use mora_common::protocol::GpuUuid;
        // Several chunks in bf16, f32 and an integer type, at odd sizes.
        let n = 5 * WRITE_CHUNK / 8 + 4_099;
        let f: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let bf: Vec<u8> = f.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
        let d = model_dir("gpu-threads");
        let file = d.join("model.safetensors");
        write_safetensors(
            &file,
            &[("f", "F32", vec![n], f32_bytes(&f)), ("ids", "I64", vec![3], vec![7; 24]), ("bf", "BF16", vec![n], bf)],
        );
        let model = resolved(&d);
        let uuid = GpuUuid([4; 16]);
        let gpus = FakeGpus::one(uuid, 1 << 30);
        let upload_with = |p: Plan, threads: usize| {
            let label = format!("{:?}-{threads}", p.manifest.tensors[0].dtype);
            let mut buffer = gpus.allocate(uuid, p.bytes(), &label).unwrap();
            let progress = AtomicU64::new(0);
            let read = fill_device(&p, &mut *buffer, threads, &progress);
            if read.is_ok() {
                assert_eq!(progress.load(Ordering::Relaxed), p.manifest.tensors.iter().map(|t| t.len).sum::<u64>());
            }
            read.map(|_| gpus.log.contents.lock().unwrap()[&label].clone())
        };
        let on_gpu = |dtype| plan(&model, dtype, Device::Cuda(uuid)).unwrap();
        for dtype in [WeightDType::F32, WeightDType::BF16, WeightDType::F16] {
            let one = upload_with(on_gpu(dtype), 1).unwrap();
            for threads in [2, 3, 64] {
                assert!(upload_with(on_gpu(dtype), threads).unwrap() == one, "{dtype}, {threads} threads");
            }
        }
        // Planned, then cut short: the read of the last chunks fails.
        let full = std::fs::read(&file).unwrap();
        for threads in [1, 3] {
            let p = on_gpu(WeightDType::F32);
            std::fs::write(&file, &full[..full.len() - 2 * n]).unwrap();
            let err = upload_with(p, threads).expect_err("a shrunk file cannot load");
            assert!(matches!(&err, CheckpointError::Io { path, .. } if *path == file), "{err}");
            std::fs::write(&file, &full).unwrap();
        }
    }

    #[test]
    fn load_threads_takes_a_positive_count_up_to_64_else_the_default() {
        let default = mora_common::convert::cores().min(MAX_FILL_THREADS);
        assert_eq!(load_threads(None), default);
        for bad in ["", "0", "-2", "two", "1.5"] {
            assert_eq!(load_threads(Some(bad)), default, "{bad:?}");
        }
        assert_eq!(load_threads(Some("1")), 1);
        assert_eq!(load_threads(Some(" 12 ")), 12);
        assert_eq!(load_threads(Some("1000")), 64);
    }

    /// Plans and loads in one go, as the registry does in two steps.
    fn load(model: &ResolvedModel, dtype: WeightDType) -> Result<Loaded, CheckpointError> {
        load_plan(&model.name, plan(model, dtype, Device::Cpu)?, Target::Host, &AtomicU64::new(0))
    }

    fn resolved(dir: &Path) -> ResolvedModel {
        ResolvedModel { name: "test".into(), dir: dir.to_path_buf(), weights: vec![dir.join("model.safetensors")] }
    }

    #[test]
    fn load_copies_every_tensor_to_an_aligned_offset() {
        let d = model_dir("load");
        let ids: Vec<u8> = [1i64, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_safetensors(
            &d.join("model.safetensors"),
            &[("w", "F32", vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])), ("ids", "I64", vec![3], ids.clone())],
        );
        let loaded = load(&resolved(&d), WeightDType::F32).unwrap();
        loaded.manifest.validate().unwrap();
        let map = host(&loaded).map().unwrap();
        let w = loaded.manifest.get("w").unwrap();
        assert_eq!(&map.as_slice()[w.offset as usize..][..16], &f32_bytes(&[1.0, 2.0, 3.0, 4.0])[..]);
        let i = loaded.manifest.get("ids").unwrap();
        assert_eq!(i.dtype, TensorDType::I64);
        assert_eq!(&map.as_slice()[i.offset as usize..][..24], &ids[..]);
        assert_eq!(loaded.bytes_read, 16 + 24);
    }

    /// Every tensor of `loaded` as (name, dtype, bytes).
    fn contents(loaded: &Loaded) -> Vec<(String, TensorDType, Vec<u8>)> {
        let map = host(loaded).map().unwrap();
        loaded
            .manifest
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype, map.as_slice()[t.offset as usize..(t.offset + t.len) as usize].to_vec()))
            .collect()
    }

    #[test]
    fn written_and_mapped_segments_hold_the_same_bytes_across_chunks_and_dtypes() {
        // Odd sizes over several write chunks, in every stored float type,
        // with an integer tensor between them.
        let n = WRITE_CHUNK / 2 + 4_099;
        let f: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let bf: Vec<u8> = f.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
        let hf: Vec<u8> = f.iter().take(1_001).flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
        let ids: Vec<u8> = (0..13i64).flat_map(|x| x.to_le_bytes()).collect();
        let d = model_dir("written");
        write_safetensors(
            &d.join("model.safetensors"),
            &[
                ("f", "F32", vec![n], f32_bytes(&f)),
                ("ids", "I64", vec![13], ids.clone()),
                ("bf", "BF16", vec![n], bf.clone()),
                ("hf", "F16", vec![7, 143], hf.clone()),
                ("empty", "BF16", vec![0, 3], vec![]),
            ],
        );
        let model = resolved(&d);
        for dtype in [WeightDType::F32, WeightDType::BF16, WeightDType::F16] {
            let load_with = |mapped: bool, threads: usize| {
                let p = plan(&model, dtype, Device::Cpu).unwrap();
                let progress = AtomicU64::new(0);
                let (storage, bytes_read) = load_host("t", &p, mapped, threads, &progress).unwrap();
                assert_eq!(progress.load(Ordering::Relaxed), p.manifest.tensors.iter().map(|t| t.len).sum::<u64>());
                Loaded { manifest: p.manifest, storage, bytes_read, elapsed: Duration::ZERO, tokenizer: None }
            };
            // One thread, and more threads than chunks: every split of the
            // work gives the same bytes, through a mapping or with `pwrite`.
            let written = load_with(false, 1);
            for (mapped, threads) in [(true, 1), (true, 3), (false, 2), (false, 64)] {
                let other = load_with(mapped, threads);
                assert_eq!(contents(&other), contents(&written), "{dtype}, mapped {mapped}, {threads} threads");
                assert_eq!(other.bytes_read, written.bytes_read);
            }
            // A tensor stored in the dtype asked for is the file's bytes.
            let kept = contents(&written);
            let by_name = |name: &str| kept.iter().find(|t| t.0 == name).unwrap().2.clone();
            assert_eq!(by_name("ids"), ids);
            match dtype {
                WeightDType::F32 => assert_eq!(by_name("f"), f32_bytes(&f)),
                WeightDType::BF16 => assert_eq!(by_name("bf"), bf),
                WeightDType::F16 => assert_eq!(by_name("hf"), hf),
            }
        }
    }

    #[test]
    fn a_file_that_shrinks_after_planning_fails_the_load_on_every_path() {
        // Several chunks, so that threads are busy when one of them fails.
        let n = 3 * WRITE_CHUNK / 4;
        let d = model_dir("shrunk");
        let file = d.join("model.safetensors");
        write_safetensors(&file, &[("a", "BF16", vec![n], vec![1; 2 * n]), ("b", "F32", vec![n], vec![2; 4 * n])]);
        let model = resolved(&d);
        let full = std::fs::read(&file).unwrap();
        for dtype in [WeightDType::F32, WeightDType::BF16] {
            for (mapped, threads) in [(true, 1), (true, 3), (false, 1), (false, 3)] {
                let p = plan(&model, dtype, Device::Cpu).unwrap();
                std::fs::write(&file, &full[..full.len() - 4 * n]).unwrap();
                let err = load_host("t", &p, mapped, threads, &AtomicU64::new(0)).err().expect("a shrunk file cannot load");
                assert!(matches!(&err, CheckpointError::Io { path, .. } if *path == file), "{err}");
                std::fs::write(&file, &full).unwrap();
            }
        }
    }

    #[test]
    fn floats_convert_to_the_requested_dtype_and_integers_do_not() {
        let d = model_dir("convert");
        let ids: Vec<u8> = [7i64].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_safetensors(
            &d.join("model.safetensors"),
            &[("w", "F32", vec![3], f32_bytes(&[1.5, -2.0, 0.1])), ("ids", "I64", vec![1], ids)],
        );
        let loaded = load(&resolved(&d), WeightDType::F16).unwrap();
        let w = loaded.manifest.get("w").unwrap();
        assert_eq!(w.dtype, TensorDType::F16);
        assert_eq!(w.len, 6);
        assert_eq!(loaded.manifest.get("ids").unwrap().dtype, TensorDType::I64);
        let map = host(&loaded).map().unwrap();
        let got: Vec<f16> = map.as_slice()[w.offset as usize..][..6]
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![f16::from_f32(1.5), f16::from_f32(-2.0), f16::from_f32(0.1)]);
    }

    #[test]
    fn sharded_model_loads_every_shard_into_one_segment() {
        let d = model_dir("shards");
        write_safetensors(&d.join("model-00001-of-00002.safetensors"), &[("a", "F32", vec![2], f32_bytes(&[1.0, 2.0]))]);
        write_safetensors(&d.join("model-00002-of-00002.safetensors"), &[("b", "F32", vec![1], f32_bytes(&[3.0]))]);
        std::fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let model = mora_common::ModelSource::Dir { path: d.to_path_buf(), variant: None }.resolve().unwrap();
        assert_eq!(model.weights.len(), 2);
        let loaded = load(&model, WeightDType::F32).unwrap();
        let map = host(&loaded).map().unwrap();
        let b = loaded.manifest.get("b").unwrap();
        assert_eq!(&map.as_slice()[b.offset as usize..][..4], &3.0f32.to_le_bytes());
        assert_eq!(loaded.manifest.tensors.len(), 2);
    }

    #[test]
    fn a_tensor_in_two_shards_is_refused() {
        let d = model_dir("dup-shards");
        write_safetensors(&d.join("s1.safetensors"), &[("a", "F32", vec![1], f32_bytes(&[1.0]))]);
        write_safetensors(&d.join("s2.safetensors"), &[("a", "F32", vec![1], f32_bytes(&[2.0]))]);
        let model = ResolvedModel { name: "t".into(), dir: d.to_path_buf(), weights: vec![d.join("s1.safetensors"), d.join("s2.safetensors")] };
        assert!(matches!(plan(&model, WeightDType::F32, Device::Cpu), Err(CheckpointError::DuplicateTensor { .. })));
    }

    /// A safetensors file with a header written by hand.
    fn raw_safetensors(path: &Path, header: &[u8], data: &[u8]) {
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header).unwrap();
        f.write_all(data).unwrap();
    }

    #[test]
    fn hostile_headers_are_refused_naming_the_file_and_the_problem() {
        let d = model_dir("hostile");
        let p = d.join("model.safetensors");
        let cases: [(&[u8], &str); 6] = [
            (br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#, "tensors `a` (bytes 0..16) and `b` (bytes 8..24) overlap"),
            (br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#, "run backwards"),
            (br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,4096]}}"#, "truncated"),
            (br#"{"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}"#, "unsupported dtype Q4"),
            (br#"{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#, "needs 20 bytes but data_offsets span 16"),
            (b"{\"a\xff\xfe\": 1}", "header is not JSON"),
        ];
        for (header, expected) in cases {
            raw_safetensors(&p, header, &[0u8; 32]);
            let err = read_header(&p).unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains(&p.display().to_string()), "{expected}: {err}");
            assert!(!err.contains('\n'));
        }
        // Zero-length tensors may share an offset: that is not an overlap.
        raw_safetensors(&p, br#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0u8; 16]);
        assert_eq!(read_header(&p).unwrap().len(), 2);
        // A header length beyond the limit is refused before anything is read.
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&(MAX_HEADER_BYTES + 1).to_le_bytes()).unwrap();
        f.set_len(MAX_HEADER_BYTES + 9).unwrap();
        let err = read_header(&p).unwrap_err().to_string();
        assert!(err.contains("above the 33554432-byte limit"), "{err}");
    }

    #[test]
    fn truncated_file_is_refused_before_any_data_is_read() {
        let d = model_dir("trunc");
        let p = d.join("model.safetensors");
        write_safetensors(&p, &[("w", "F32", vec![1024], f32_bytes(&[0.5; 1024]))]);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 100]).unwrap();
        let err = read_header(&p).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&p, &full[..20]).unwrap();
        let err = read_header(&p).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn corrupt_header_is_refused_with_the_file_named() {
        let d = model_dir("corrupt");
        let p = d.join("model.safetensors");
        let mut bytes = 12u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{not json!!}");
        std::fs::write(&p, &bytes).unwrap();
        let err = read_header(&p).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()) && err.contains("not JSON"), "{err}");
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        assert!(read_header(&p).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn a_wordpiece_or_bpe_tokenizer_is_prepared_sealed_and_anything_else_left_to_clients() {
        let d = model_dir("tokenizer");
        assert!(prepare_tokenizer("m", &d).is_none(), "no tokenizer.json");
        let file = d.join("tokenizer.json");
        let wordpiece = r#"{"version":"1.0","model":{"type":"WordPiece","unk_token":"[UNK]","vocab":{"[UNK]":0,"the":1}}}"#;
        std::fs::write(&file, wordpiece).unwrap();
        let segment = prepare_tokenizer("m", &d).expect("prepared");
        // Sealed as every lent segment is: a client adopts it only so.
        let received = Segment::from_received(segment.fd().try_clone_to_owned().unwrap(), segment.len()).unwrap();
        let p = mora_tokenizers::vocab::Prepared::read(std::sync::Arc::new(mora_tokenizers::vocab::WordBytes(received.map().unwrap()))).expect("reads back");
        assert!(p.is_of(&file));
        assert_eq!(p.vocabulary().id("the"), Some(1));
        for other in [wordpiece.replace("WordPiece", "Unigram"), "{not json".to_string()] {
            std::fs::write(&file, other).unwrap();
            assert!(prepare_tokenizer("m", &d).is_none());
        }
    }

    #[test]
    fn shape_that_disagrees_with_offsets_is_refused() {
        let d = model_dir("shape");
        let p = d.join("model.safetensors");
        write_safetensors(&p, &[("w", "F32", vec![3], f32_bytes(&[1.0, 2.0]))]);
        let err = read_header(&p).unwrap_err().to_string();
        assert!(err.contains("needs 12 bytes"), "{err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn file_of(header: &[u8], data_len: usize) -> PathBuf {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let d = model_dir(&format!("prop-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8));
            let p = d.join("model.safetensors");
            raw_safetensors(&p, header, &vec![0u8; data_len]);
            p
        }

        fn tensor() -> impl Strategy<Value = (String, &'static str, Vec<usize>, u64, u64)> {
            (
                "[a-c]{1,2}",
                prop::sample::select(vec!["F32", "F16", "BF16", "I64", "U8", "BOOL", "Q4", "f32"]),
                prop::collection::vec(0usize..6, 0..3),
                0u64..96,
                0u64..96,
            )
        }

        proptest! {
            /// Random bytes where a header belongs: an error, never a panic.
            #[test]
            fn arbitrary_header_bytes_never_panic(header in prop::collection::vec(any::<u8>(), 0..256), data in 0usize..64) {
                let _ = read_header(&file_of(&header, data));
            }

            /// Plausible but random headers: either refused, or every tensor
            /// it returns is one a loader can trust.
            #[test]
            fn accepted_headers_describe_disjoint_in_bounds_tensors(
                tensors in prop::collection::vec(tensor(), 0..5),
                data in 0usize..128,
            ) {
                let mut header = serde_json::Map::new();
                for (name, dtype, shape, begin, end) in &tensors {
                    header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}));
                }
                let bytes = serde_json::to_vec(&header).unwrap();
                let path = file_of(&bytes, data);
                if let Ok(read) = read_header(&path) {
                    let start = 8 + bytes.len() as u64;
                    let mut last_end = start;
                    for t in &read {
                        prop_assert!(t.file_offset >= last_end, "overlap at {}", t.name);
                        prop_assert_eq!(Some(t.len), tensor_bytes(t.dtype, &t.shape));
                        last_end = t.file_offset + t.len;
                        prop_assert!(last_end <= start + data as u64);
                    }
                }
            }
        }
    }
}

