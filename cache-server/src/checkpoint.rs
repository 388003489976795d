//! Reading safetensors checkpoints into a sealed segment.
//!
//! Headers are parsed and checked in full before a byte of tensor data is
//! read, so a truncated or corrupt file is refused with a reason instead of
//! being half-loaded. Data is read with `pread` into the segment (no mmap of
//! the source file: a file truncated under a mapping would kill the daemon
//! with SIGBUS), converting floating-point tensors to the requested dtype.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use half::{bf16, f16};
use mora_common::manifest::{tensor_bytes, Manifest, TensorDType, WeightDType};
use mora_common::segment::{Segment, SegmentError, SegmentWriter};
use mora_common::ResolvedModel;

/// Safetensors headers above this size are refused (the format's own
/// reference implementation uses the same limit).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

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

/// A model read into a sealed segment.
pub struct Loaded {
    pub manifest: Manifest,
    pub segment: Segment,
    /// Bytes read from the checkpoint files.
    pub bytes_read: u64,
    pub elapsed: Duration,
}

/// What a load will produce, known from the headers alone.
pub struct Plan {
    pub manifest: Manifest,
    stored: Vec<(PathBuf, StoredTensor)>,
}

impl Plan {
    /// Bytes the resident copy will occupy.
    pub fn bytes(&self) -> u64 {
        self.manifest.segment_len
    }
}

/// Plans the segment of `model` held in `dtype` from the headers alone
/// (no tensor data is read): the fit check before a load uses this.
pub fn plan(model: &ResolvedModel, dtype: WeightDType) -> Result<Plan, CheckpointError> {
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
    let manifest =
        Manifest::layout(stored.iter().map(|(_, t)| (t.name.clone(), held_dtype(t.dtype, dtype), t.shape.clone())));
    Ok(Plan { manifest, stored })
}

/// Bytes read per `pread`, and how often progress moves.
const READ_CHUNK: usize = 16 << 20;

/// Carries out a plan: reads every tensor into a new sealed segment,
/// adding the bytes of each chunk read to `progress` (for waiting clients).
pub fn load_plan(name: &str, plan: Plan, progress: &AtomicU64) -> Result<Loaded, CheckpointError> {
    let start = Instant::now();
    let Plan { manifest, stored } = plan;
    let mut writer = SegmentWriter::create(&format!("mora:{name}"), manifest.segment_len)?;
    let dst = writer.as_mut_slice();
    let mut bytes_read = 0u64;
    let mut open: Option<(PathBuf, File)> = None;
    let mut scratch = Vec::new();
    for ((path, t), entry) in stored.iter().zip(&manifest.tensors) {
        if open.as_ref().map(|(p, _)| p != path).unwrap_or(true) {
            let f = File::open(path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
            open = Some((path.clone(), f));
        }
        let file = &open.as_ref().expect("opened above").1;
        let io_err = |source: io::Error| CheckpointError::Io { path: path.clone(), source };
        let out = &mut dst[entry.offset as usize..(entry.offset + entry.len) as usize];
        if t.dtype == entry.dtype {
            for (i, chunk) in out.chunks_mut(READ_CHUNK).enumerate() {
                file.read_exact_at(chunk, t.file_offset + (i * READ_CHUNK) as u64).map_err(io_err)?;
                progress.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        } else {
            scratch.resize(t.len as usize, 0);
            file.read_exact_at(&mut scratch, t.file_offset).map_err(io_err)?;
            convert(&scratch, t.dtype, out, entry.dtype);
            progress.fetch_add(entry.len, Ordering::Relaxed);
        }
        bytes_read += t.len;
    }
    let segment = writer.seal()?;
    Ok(Loaded { manifest, segment, bytes_read, elapsed: start.elapsed() })
}

/// Converts little-endian floats between types, rounding as candle's
/// `to_dtype` does, so a converted segment matches an in-process conversion
/// bit for bit.
fn convert(src: &[u8], from: TensorDType, dst: &mut [u8], to: TensorDType) {
    use TensorDType::*;
    let values: Box<dyn Iterator<Item = f64>> = match from {
        F32 => Box::new(src.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)),
        F64 => Box::new(src.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()))),
        F16 => Box::new(src.chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64())),
        BF16 => Box::new(src.chunks_exact(2).map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f64())),
        other => unreachable!("only floats convert, not {other:?}"),
    };
    // f32 sources round straight from f32 (not through f64) for f16/bf16,
    // which is what `half::f16::from_f32` and candle do.
    match (from, to) {
        (F32, F16) => {
            for (c, o) in src.chunks_exact(4).zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes());
            }
        }
        (F32, BF16) => {
            for (c, o) in src.chunks_exact(4).zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes());
            }
        }
        (_, F32) => {
            for (v, o) in values.zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&(v as f32).to_le_bytes());
            }
        }
        (_, F16) => {
            for (v, o) in values.zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f64(v).to_le_bytes());
            }
        }
        (_, BF16) => {
            for (v, o) in values.zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16::from_f64(v).to_le_bytes());
            }
        }
        (_, other) => unreachable!("weights are held as f32, f16 or bf16, not {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn model_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mora-ckpt-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Plans and loads in one go, as the registry does in two steps.
    fn load(model: &ResolvedModel, dtype: WeightDType) -> Result<Loaded, CheckpointError> {
        load_plan(&model.name, plan(model, dtype)?, &AtomicU64::new(0))
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
        let map = loaded.segment.map().unwrap();
        let w = loaded.manifest.get("w").unwrap();
        assert_eq!(&map.as_slice()[w.offset as usize..][..16], &f32_bytes(&[1.0, 2.0, 3.0, 4.0])[..]);
        let i = loaded.manifest.get("ids").unwrap();
        assert_eq!(i.dtype, TensorDType::I64);
        assert_eq!(&map.as_slice()[i.offset as usize..][..24], &ids[..]);
        assert_eq!(loaded.bytes_read, 16 + 24);
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
        let map = loaded.segment.map().unwrap();
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
        let model = mora_common::ModelSource::Dir { path: d.clone() }.resolve().unwrap();
        assert_eq!(model.weights.len(), 2);
        let loaded = load(&model, WeightDType::F32).unwrap();
        let map = loaded.segment.map().unwrap();
        let b = loaded.manifest.get("b").unwrap();
        assert_eq!(&map.as_slice()[b.offset as usize..][..4], &3.0f32.to_le_bytes());
        assert_eq!(loaded.manifest.tensors.len(), 2);
    }

    #[test]
    fn a_tensor_in_two_shards_is_refused() {
        let d = model_dir("dup-shards");
        write_safetensors(&d.join("s1.safetensors"), &[("a", "F32", vec![1], f32_bytes(&[1.0]))]);
        write_safetensors(&d.join("s2.safetensors"), &[("a", "F32", vec![1], f32_bytes(&[2.0]))]);
        let model = ResolvedModel { name: "t".into(), dir: d.clone(), weights: vec![d.join("s1.safetensors"), d.join("s2.safetensors")] };
        assert!(matches!(plan(&model, WeightDType::F32), Err(CheckpointError::DuplicateTensor { .. })));
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
    fn shape_that_disagrees_with_offsets_is_refused() {
        let d = model_dir("shape");
        let p = d.join("model.safetensors");
        write_safetensors(&p, &[("w", "F32", vec![3], f32_bytes(&[1.0, 2.0]))]);
        let err = read_header(&p).unwrap_err().to_string();
        assert!(err.contains("needs 12 bytes"), "{err}");
    }
}
