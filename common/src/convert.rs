//! Float conversions between the dtypes weights are stored and held in,
//! rounding as candle's `to_dtype` does, so that a segment the daemon
//! converted and a tensor a client widens match an in-process conversion bit
//! for bit. Split over threads for large tensors.

use crate::manifest::TensorDType;
use half::{bf16, f16};

/// The cores this process may run on, asked once (`available_parallelism`
/// reads the cgroup's quota files on every call).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Below this many elements a conversion runs on the calling thread alone.
pub const MIN_PARALLEL_ELEMENTS: usize = 1 << 18;

/// [`convert`], split at element boundaries over up to `threads` threads.
/// Each element converts on its own, so the bytes are the same however the
/// work is split.
pub fn convert_parallel(src: &[u8], from: TensorDType, dst: &mut [u8], to: TensorDType, threads: usize) {
    let (src_size, dst_size) = (from.size_in_bytes(), to.size_in_bytes());
    let elems = src.len() / src_size;
    let threads = threads.min(elems).max(1);
    if threads == 1 {
        return convert(src, from, dst, to);
    }
    let per = elems.div_ceil(threads);
    std::thread::scope(|scope| {
        let pieces = src.chunks(per * src_size).zip(dst.chunks_mut(per * dst_size));
        let mut pieces: Vec<_> = pieces.collect();
        let last = pieces.pop().expect("at least one piece");
        for (s, d) in pieces {
            scope.spawn(move || convert(s, from, d, to));
        }
        convert(last.0, from, last.1, to);
    });
}

/// Converts little-endian floats between types, rounding as candle's
/// `to_dtype` does, so a converted segment matches an in-process conversion
/// bit for bit.
pub fn convert(src: &[u8], from: TensorDType, dst: &mut [u8], to: TensorDType) {
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
        // Widening to f32 is exact: bf16 is the top half of an f32 (NaNs are
        // quietened, as `half` and so candle do), and every f16 is an f32.
        // Tight loops the compiler vectorises; these are the common loads
        // (bf16 and f16 checkpoints held as f32 for the CPU).
        (BF16, F32) => {
            for (c, o) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                let b = u16::from_le_bytes([c[0], c[1]]);
                let bits = if b & 0x7fff > 0x7f80 { bf16::from_bits(b).to_f32().to_bits() } else { u32::from(b) << 16 };
                o.copy_from_slice(&bits.to_le_bytes());
            }
        }
        (F16, F32) => {
            for (c, o) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes());
            }
        }
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

    #[test]
    fn a_conversion_split_over_threads_gives_the_same_bytes_at_odd_sizes() {
        let src: Vec<u8> = (0..10_007u32).flat_map(|i| ((i.wrapping_mul(2_654_435_761) >> 16) as u16).to_le_bytes()).collect();
        for (from, to) in [(TensorDType::BF16, TensorDType::F32), (TensorDType::F16, TensorDType::F32), (TensorDType::BF16, TensorDType::F16)] {
            let elems = src.len() / 2;
            let mut serial = vec![0u8; elems * to.size_in_bytes()];
            convert(&src, from, &mut serial, to);
            for threads in [1, 2, 3, 7, 64] {
                for cut in [elems, elems - 1, 5, 1, 0] {
                    let s = &src[..cut * 2];
                    let mut split = vec![0xAAu8; cut * to.size_in_bytes()];
                    convert_parallel(s, from, &mut split, to, threads);
                    assert_eq!(split[..], serial[..split.len()], "{from:?} to {to:?}, {cut} elements over {threads} threads");
                }
            }
        }
    }

    #[test]
    fn half_floats_widen_to_f32_as_half_does_for_every_bit_pattern() {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let mut dst = vec![0u8; src.len() * 2];
        convert(&src, TensorDType::BF16, &mut dst, TensorDType::F32);
        for (b, o) in (0..=u16::MAX).zip(dst.chunks_exact(4)) {
            assert_eq!(u32::from_le_bytes(o.try_into().unwrap()), bf16::from_bits(b).to_f32().to_bits(), "bf16 {b:#06x}");
        }
        convert(&src, TensorDType::F16, &mut dst, TensorDType::F32);
        for (b, o) in (0..=u16::MAX).zip(dst.chunks_exact(4)) {
            assert_eq!(u32::from_le_bytes(o.try_into().unwrap()), f16::from_bits(b).to_f32().to_bits(), "f16 {b:#06x}");
        }
    }
}
