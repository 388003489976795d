//! Tensor manifests: where each tensor of a model lives inside its segment.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Every tensor starts at a multiple of this many bytes inside a segment, so
/// that a mapping (page-aligned) can be viewed as any element type and SIMD
/// loads never straddle a cache line at the start of a tensor.
pub const TENSOR_ALIGN: u64 = 64;

/// Every tensor in a GPU segment starts at a multiple of this many bytes:
/// the alignment `cudaMalloc` gives each allocation, which candle's kernels
/// and cuBLAS assume of a tensor they did not allocate (vector loads of up
/// to 16 bytes, 128-byte transactions).
pub const DEVICE_TENSOR_ALIGN: u64 = 256;

/// Element type of one stored tensor (the safetensors dtypes Mora carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TensorDType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
}

impl TensorDType {
    pub fn size_in_bytes(self) -> usize {
        use TensorDType::*;
        match self {
            Bool | U8 | I8 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            I64 | U64 | F64 => 8,
        }
    }

    /// The name safetensors headers use ("F32", "BF16", ...).
    pub fn from_safetensors(name: &str) -> Option<Self> {
        use TensorDType::*;
        Some(match name {
            "BOOL" => Bool,
            "U8" => U8,
            "I8" => I8,
            "I16" => I16,
            "U16" => U16,
            "I32" => I32,
            "U32" => U32,
            "I64" => I64,
            "U64" => U64,
            "F16" => F16,
            "BF16" => BF16,
            "F32" => F32,
            "F64" => F64,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, TensorDType::F16 | TensorDType::BF16 | TensorDType::F32 | TensorDType::F64)
    }
}

/// The floating-point type a client asks the weights to be held in. Integer
/// tensors (position ids, say) are kept in their stored type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum WeightDType {
    #[default]
    F32,
    F16,
    BF16,
}

impl WeightDType {
    pub fn tensor_dtype(self) -> TensorDType {
        match self {
            WeightDType::F32 => TensorDType::F32,
            WeightDType::F16 => TensorDType::F16,
            WeightDType::BF16 => TensorDType::BF16,
        }
    }
}

impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::BF16 => "bf16",
        })
    }
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WeightDType::F32),
            "f16" => Ok(WeightDType::F16),
            "bf16" => Ok(WeightDType::BF16),
            other => Err(format!("unknown dtype `{other}`: expected f32, f16 or bf16")),
        }
    }
}

/// One tensor inside a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: TensorDType,
    pub shape: Vec<usize>,
    /// Byte offset from the start of the segment; a multiple of [`TENSOR_ALIGN`].
    pub offset: u64,
    /// Length in bytes: product of `shape` times the element size.
    pub len: u64,
}

/// The tensors of one model and the size of the segment that holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Manifest {
    pub tensors: Vec<TensorEntry>,
    /// Total segment length in bytes (at least the end of the last tensor).
    pub segment_len: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("tensor `{name}` lies at offset {offset}, not a multiple of {align}")]
    Misaligned { name: String, offset: u64, align: u64 },
    #[error("tensor `{name}` ends at byte {end}, past the segment's {segment_len} bytes")]
    OutOfBounds { name: String, end: u64, segment_len: u64 },
    #[error("tensor `{name}` claims {len} bytes but its shape {shape:?} of {dtype:?} needs {expected}")]
    LengthMismatch { name: String, len: u64, shape: Vec<usize>, dtype: TensorDType, expected: u64 },
    #[error("tensor `{name}` appears twice in the manifest")]
    Duplicate { name: String },
}

fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// Byte length of a tensor of `shape` and `dtype`, or `None` on overflow.
pub fn tensor_bytes(dtype: TensorDType, shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size_in_bytes() as u64, |acc, &d| acc.checked_mul(d as u64))
}

impl Manifest {
    /// Lays tensors out back to back, each at the next offset aligned to
    /// [`TENSOR_ALIGN`], in the order given, for a host segment.
    pub fn layout(tensors: impl IntoIterator<Item = (String, TensorDType, Vec<usize>)>) -> Manifest {
        Self::layout_aligned(tensors, TENSOR_ALIGN)
    }

    /// Lays tensors out back to back, each at the next multiple of `align`
    /// (a power of two), in the order given. Panics only if a length
    /// overflows u64 (a header that large is rejected long before here).
    pub fn layout_aligned(tensors: impl IntoIterator<Item = (String, TensorDType, Vec<usize>)>, align: u64) -> Manifest {
        assert!(align.is_power_of_two(), "alignment {align} is not a power of two");
        let mut offset = 0u64;
        let mut entries = Vec::new();
        for (name, dtype, shape) in tensors {
            let len = tensor_bytes(dtype, &shape).expect("tensor size overflows u64");
            offset = align_up(offset, align);
            entries.push(TensorEntry { name, dtype, shape, offset, len });
            offset += len;
        }
        Manifest { tensors: entries, segment_len: align_up(offset, align).max(align) }
    }

    /// [`Manifest::validate_aligned`] for a host segment.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_aligned(TENSOR_ALIGN)
    }

    /// Checks what a client must trust before viewing a segment through this
    /// manifest: every tensor at a multiple of `align`, inside the segment, of
    /// the length its shape says, and named once.
    pub fn validate_aligned(&self, align: u64) -> Result<(), ManifestError> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(ManifestError::Duplicate { name: t.name.clone() });
            }
            if t.offset % align != 0 {
                return Err(ManifestError::Misaligned { name: t.name.clone(), offset: t.offset, align });
            }
            let expected = tensor_bytes(t.dtype, &t.shape);
            if expected != Some(t.len) {
                return Err(ManifestError::LengthMismatch {
                    name: t.name.clone(),
                    len: t.len,
                    shape: t.shape.clone(),
                    dtype: t.dtype,
                    expected: expected.unwrap_or(u64::MAX),
                });
            }
            let end = t.offset.saturating_add(t.len);
            if end > self.segment_len {
                return Err(ManifestError::OutOfBounds {
                    name: t.name.clone(),
                    end,
                    segment_len: self.segment_len,
                });
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_every_tensor_and_validates() {
        let m = Manifest::layout(vec![
            ("a".into(), TensorDType::F32, vec![3]),
            ("b".into(), TensorDType::F16, vec![5, 7]),
            ("c".into(), TensorDType::I64, vec![1]),
        ]);
        assert_eq!(m.tensors[0].offset, 0);
        assert_eq!(m.tensors[0].len, 12);
        assert_eq!(m.tensors[1].offset, 64);
        assert_eq!(m.tensors[1].len, 70);
        assert_eq!(m.tensors[2].offset, 192);
        assert!(m.tensors.iter().all(|t| t.offset % TENSOR_ALIGN == 0));
        assert_eq!(m.segment_len, 256);
        m.validate().unwrap();
    }

    #[test]
    fn validate_rejects_a_tensor_past_the_segment_end() {
        let mut m = Manifest::layout(vec![("a".into(), TensorDType::F32, vec![16])]);
        m.segment_len = 32;
        assert!(matches!(m.validate(), Err(ManifestError::OutOfBounds { .. })));
    }

    #[test]
    fn validate_rejects_misaligned_and_mislengthed_tensors() {
        let mut m = Manifest::layout(vec![("a".into(), TensorDType::F32, vec![4])]);
        m.tensors[0].offset = 4;
        assert!(matches!(m.validate(), Err(ManifestError::Misaligned { .. })));
        let mut m = Manifest::layout(vec![("a".into(), TensorDType::F32, vec![4])]);
        m.tensors[0].len = 8;
        assert!(matches!(m.validate(), Err(ManifestError::LengthMismatch { .. })));
    }

    #[test]
    fn device_layout_puts_every_tensor_on_a_256_byte_boundary() {
        let m = Manifest::layout_aligned(
            vec![
                ("a".into(), TensorDType::F32, vec![3]),
                ("b".into(), TensorDType::BF16, vec![300]),
                ("c".into(), TensorDType::I64, vec![0]),
                ("d".into(), TensorDType::F16, vec![1]),
            ],
            DEVICE_TENSOR_ALIGN,
        );
        let offsets: Vec<u64> = m.tensors.iter().map(|t| t.offset).collect();
        // a: 12 bytes at 0; b: 600 bytes at 256, ends at 856; c: empty at 1024;
        // d at 1024 too (c takes no room).
        assert_eq!(offsets, vec![0, 256, 1024, 1024]);
        assert_eq!(m.segment_len, 1280);
        m.validate_aligned(DEVICE_TENSOR_ALIGN).unwrap();
        // A host layout is not good enough for a device segment.
        let host = Manifest::layout(vec![("a".into(), TensorDType::F32, vec![3]), ("b".into(), TensorDType::F32, vec![1])]);
        assert_eq!(host.tensors[1].offset, 64);
        assert_eq!(
            host.validate_aligned(DEVICE_TENSOR_ALIGN),
            Err(ManifestError::Misaligned { name: "b".into(), offset: 64, align: DEVICE_TENSOR_ALIGN })
        );
    }

    #[test]
    fn empty_model_still_gets_a_non_empty_segment() {
        let m = Manifest::layout(Vec::new());
        assert_eq!(m.segment_len, TENSOR_ALIGN);
    }
}
