//! Float conversions between the dtypes weights are stored and held in,
//! rounding as candle's `to_dtype` does, so that a segment the daemon
//! converted and a tensor a client widens match an in-process conversion bit
//! for bit. Split over threads for large tensors.

use crate::manifest::TensorDType;
use half::slice::HalfFloatSliceExt;
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
        // The common loads (bf16 and f16 checkpoints held as f32 for the
        // CPU, f32 ones held as f16 for a GPU) convert in blocks the
        // compiler vectorises (docs/decisions.md, "Conversions run in
        // blocks the compiler vectorises"), the last few one at a time.
        //
        // Widening to f32 is exact: bf16 is the top half of an f32, its NaNs
        // quietened (the top mantissa bit set, as `half` and so candle do).
        (BF16, F32) => in_blocks::<2, 4>(src, dst, |s, d| {
            let b = u16::from_le_bytes([s[0], s[1]]);
            let q = if b & 0x7fff > 0x7f80 { b | 0x0040 } else { b };
            d.copy_from_slice(&(u32::from(q) << 16).to_le_bytes());
        }),
        // Every f16 is an f32; `half`'s slice conversions use the CPU's
        // F16C instructions where it has them, as its `to_f32` does.
        (F16, F32) => in_blocks_of_arrays::<2, 4>(
            src,
            dst,
            |s, d| {
                let mut h = [f16::ZERO; BLOCK];
                let mut f = [0f32; BLOCK];
                for (h, s) in h.iter_mut().zip(s.chunks_exact(2)) {
                    *h = f16::from_le_bytes([s[0], s[1]]);
                }
                h.convert_to_f32_slice(&mut f);
                for (f, d) in f.iter().zip(d.chunks_exact_mut(4)) {
                    d.copy_from_slice(&f.to_le_bytes());
                }
            },
            |s, d| d.copy_from_slice(&f16::from_le_bytes([s[0], s[1]]).to_f32().to_le_bytes()),
        ),
        (F32, F16) => in_blocks_of_arrays::<4, 2>(
            src,
            dst,
            |s, d| {
                let mut f = [0f32; BLOCK];
                let mut h = [f16::ZERO; BLOCK];
                for (f, s) in f.iter_mut().zip(s.chunks_exact(4)) {
                    *f = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
                h.convert_from_f32_slice(&f);
                for (h, d) in h.iter().zip(d.chunks_exact_mut(2)) {
                    d.copy_from_slice(&h.to_le_bytes());
                }
            },
            |s, d| d.copy_from_slice(&f16::from_f32(f32::from_le_bytes([s[0], s[1], s[2], s[3]])).to_le_bytes()),
        ),
        // Rounding to bf16 one element at a time already vectorises (a
        // block form measured slower).
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

/// Elements converted together by [`in_blocks`] and [`in_blocks_of_arrays`].
const BLOCK: usize = 16;

/// Converts elements of `S` bytes in `src` to elements of `D` bytes in
/// `dst` with `one`, a block of [`BLOCK`] at a time: within a block the
/// bounds are known, so the compiler vectorises the loop (2.5 to 3 times as
/// fast as one element at a time for bf16 to f32).
#[inline(always)]
fn in_blocks<const S: usize, const D: usize>(src: &[u8], dst: &mut [u8], one: impl Fn(&[u8], &mut [u8])) {
    in_blocks_of_arrays::<S, D>(
        src,
        dst,
        |s, d| {
            for (s, d) in s.chunks_exact(S).zip(d.chunks_exact_mut(D)) {
                one(s, d);
            }
        },
        &one,
    );
}

/// Converts [`BLOCK`] elements at a time with `block` (which gets exactly
/// `BLOCK * S` and `BLOCK * D` bytes), and the last few with `one`; as many
/// elements as both slices hold, the rest of the longer one untouched.
#[inline(always)]
fn in_blocks_of_arrays<const S: usize, const D: usize>(
    src: &[u8],
    dst: &mut [u8],
    block: impl Fn(&[u8], &mut [u8]),
    one: impl Fn(&[u8], &mut [u8]),
) {
    let n = (src.len() / S).min(dst.len() / D);
    let (src, dst) = (&src[..n * S], &mut dst[..n * D]);
    let mut s = src.chunks_exact(S * BLOCK);
    let mut d = dst.chunks_exact_mut(D * BLOCK);
    for (s, d) in (&mut s).zip(&mut d) {
        block(s, d);
    }
    for (s, d) in s.remainder().chunks_exact(S).zip(d.into_remainder().chunks_exact_mut(D)) {
        one(s, d);
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
            // A longer destination gets as many elements as the source has,
            // in place, and the rest of it is left alone.
            let cut = 37;
            let mut longer = vec![0xAAu8; 3 * cut * to.size_in_bytes()];
            convert(&src[..cut * 2], from, &mut longer, to);
            let (head, tail) = longer.split_at(cut * to.size_in_bytes());
            assert_eq!(head, &serial[..head.len()], "{from:?} to {to:?} into a longer destination");
            assert!(tail.iter().all(|&b| b == 0xAA), "{from:?} to {to:?} wrote past the source's elements");
        }
    }

    #[test]
    fn half_floats_widen_to_f32_as_half_does_for_every_bit_pattern() {
        // Every pattern, then a few more, so the count is no multiple of a
        // block and the last elements take the one-at-a-time path too.
        let bits: Vec<u16> = (0..=u16::MAX).chain(0x7f7d..0x7f84).collect();
        let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut dst = vec![0u8; src.len() * 2];
        convert(&src, TensorDType::BF16, &mut dst, TensorDType::F32);
        for (&b, o) in bits.iter().zip(dst.chunks_exact(4)) {
            assert_eq!(u32::from_le_bytes(o.try_into().unwrap()), bf16::from_bits(b).to_f32().to_bits(), "bf16 {b:#06x}");
        }
        convert(&src, TensorDType::F16, &mut dst, TensorDType::F32);
        for (&b, o) in bits.iter().zip(dst.chunks_exact(4)) {
            assert_eq!(u32::from_le_bytes(o.try_into().unwrap()), f16::from_bits(b).to_f32().to_bits(), "f16 {b:#06x}");
        }
    }

    #[test]
    fn f32_narrows_to_half_floats_as_half_does() {
        // A spread of every f32 pattern (a stride prime to 2^32), and each
        // upper half with the lower halves where rounding changes, signs
        // included: ties, just below and above them, NaNs, infinities,
        // subnormals and overflow; an odd count.
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(65_537).collect();
        for hi in (0..=u16::MAX).step_by(3) {
            for lo in [0u32, 1, 0x0fff, 0x1000, 0x1001, 0x7fff, 0x8000, 0x8001, 0xffff] {
                bits.push(u32::from(hi) << 16 | lo);
            }
        }
        bits.push(0x3f80_0001);
        let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut dst = vec![0u8; src.len() / 2];
        convert(&src, TensorDType::F32, &mut dst, TensorDType::F16);
        for (&b, o) in bits.iter().zip(dst.chunks_exact(2)) {
            assert_eq!(u16::from_le_bytes([o[0], o[1]]), f16::from_f32(f32::from_bits(b)).to_bits(), "f32 {b:#010x} to f16");
        }
        convert(&src, TensorDType::F32, &mut dst, TensorDType::BF16);
        for (&b, o) in bits.iter().zip(dst.chunks_exact(2)) {
            assert_eq!(u16::from_le_bytes([o[0], o[1]]), bf16::from_f32(f32::from_bits(b)).to_bits(), "f32 {b:#010x} to bf16");
        }
    }
}
