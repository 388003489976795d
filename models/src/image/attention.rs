//! Scaled dot-product attention for the image networks, with Mora's own
//! CPU kernel.
//!
//! Composed of candle ops, attention splits the heads out of the
//! projections (a transposed copy of Q, K and V), materialises every score
//! (`[batch, heads, queries, keys]`: 1 GiB at a 64x64 latent's first UNet
//! level), scales them (a pass), takes their softmax (a pass into a new
//! buffer), multiplies by V and copies the heads back. At 64x64 latents
//! that was half of a UNet step (docs/benchmarks.md, "Image compute").
//!
//! [`attention`] reads Q, K and V where the projections wrote them
//! (`[batch, tokens, heads × head_dim]`, each head a column block read with
//! its stride) and, per batch, head and block of queries, runs one `gemm`
//! for the block's scores (scaled on the way), the softmax in place, and
//! one `gemm` into the output's own columns. A block's scores stay in a
//! core's cache; blocks run in parallel over the cores.
//!
//! Contract: f32 on the CPU, contiguous `[b, n, h·d]` queries and `[b, m,
//! h·d]` keys and values; the result (`[b, n, h·d]`) equals the composed ops
//! within float rounding (checked at 1e-5 of the largest value in the tests
//! below). Anything else runs the composed ops (with the softmax in f32), so
//! the GPU path is unchanged.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::own_kernels;

/// Bytes of scores one block of queries may hold: they stay in L2 while
/// the second product reads them.
const SCORES_BYTES: usize = 512 << 10;

/// `softmax(q kᵀ · scale) v` per head, for `q` `[b, n, heads·d]` and `k`,
/// `v` `[b, m, heads·d]`; the result is `[b, n, heads·d]`, heads side by
/// side as the output projection reads them. `work` is the dtype the
/// composed ops compute the products in (the softmax is f32 whatever it is).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, work: DType) -> Result<Tensor> {
    if ours(&[q, k, v]) {
        let op = AttentionOp { heads, scale: scale as f32 };
        return q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    composed(q, k, v, heads, scale, work)
}

/// Whether Mora's kernel runs attention over these tensors (else candle's ops).
pub(crate) fn ours(ts: &[&Tensor]) -> bool {
    own_kernels() && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The same attention as candle ops (the reference, and the path off the CPU).
pub fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, work: DType) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let dtype = q.dtype();
    let split = |t: &Tensor, len: usize| -> Result<Tensor> { t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?.to_dtype(work) };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(work)?;
    let out = probs.matmul(&v)?.to_dtype(dtype)?;
    out.transpose(1, 2)?.reshape((b, n, inner))
}

struct AttentionOp {
    heads: usize,
    scale: f32,
}

/// A pointer to the output that blocks write through, each to its own rows
/// of its own head's columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: blocks write disjoint (rows, head columns) of the output, and the
// buffer outlives them (they are joined before it is returned).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Softmax of each row of `s` (`rows` × `m`), in place: with AVX2 and FMA
/// where the CPU has them (chosen at run time), else with the baseline's.
fn softmax_rows(s: &mut [f32], m: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { softmax_rows_avx2(s, m) };
    }
    softmax_rows_any(s, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(s: &mut [f32], m: usize) {
    softmax_rows_any(s, m)
}

/// The softmax in loops the compiler vectorises: the row's maximum in
/// eight lanes, [`exp`] inlined, one scaling pass.
#[inline(always)]
fn softmax_rows_any(s: &mut [f32], m: usize) {
    for row in s.chunks_exact_mut(m) {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l = if x > *l { x } else { *l };
            }
        }
        let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (l, x) in sums.iter_mut().zip(c.iter_mut()) {
                *x = exp(*x - max);
                *l += *x;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `e^x` for the softmax's `x <= 0`, branch-free so that it vectorises:
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2` (Cody and Waite's two-part ln 2),
/// `e^r` by its Taylor series to `r^7` (relative error under 1e-8 there),
/// times `2^n` built in the exponent bits. Inputs below -87 give `e^-87`
/// (1.6e-38), where the true value is smaller still: nothing a softmax sums
/// notices.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, from t's low mantissa bits (no float-to-int
    // conversion, whose saturating form does not vectorise).
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(ni.wrapping_add(127) << 23)
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "mora-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, inner) = l1.shape().dims3()?;
        let (kb, m, k_inner) = l2.shape().dims3()?;
        if l3.shape().dims() != l2.shape().dims() || kb != b || k_inner != inner || inner % self.heads != 0 {
            candle_core::bail!("mora-attention: queries {:?}, keys {:?}, values {:?} for {} heads do not fit", l1.shape(), l2.shape(), l3.shape(), self.heads);
        }
        let (Some((qa, qb)), Some((ka, kb_)), Some((va, vb))) = (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets()) else {
            candle_core::bail!("mora-attention: the queries, keys and values must be contiguous");
        };
        let q = &s1.as_slice::<f32>()?[qa..qb];
        let k = &s2.as_slice::<f32>()?[ka..kb_];
        let v = &s3.as_slice::<f32>()?[va..vb];
        let (h, d) = (self.heads, inner / self.heads);
        let rows = (SCORES_BYTES / (4 * m).max(1)).clamp(1, n);
        let per_head = n.div_ceil(rows);
        let mut out = vec![0f32; b * n * inner];
        let dst = Out(out.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        let tasks = b * h * per_head;
        let block = |t: usize, par: gemm::Parallelism, scores: &mut Vec<f32>| {
            let (bh, blk) = (t / per_head, t % per_head);
            let (bi, hi) = (bh / h, bh % h);
            let first = blk * rows;
            let r = rows.min(n - first);
            scores.resize(r * m, 0.0);
            let qp = q[(bi * n + first) * inner + hi * d..].as_ptr();
            let kp = k[bi * m * inner + hi * d..].as_ptr();
            let vp = v[bi * m * inner + hi * d..].as_ptr();
            let out_ptr = dst;
            // SAFETY: the operands are read within their slices (row
            // strides of `inner`, `d` columns from the head's offset); the
            // block writes rows first..first + r of head hi's columns of
            // batch bi, which no other block writes.
            unsafe {
                // scores[r, m] = scale · q[r, d] × kᵀ[d, m]
                crate::image::product::gemm(r, m, d, scores.as_mut_ptr(), 1, m as isize, false, qp, 1, inner as isize, kp, inner as isize, 1, 0.0, self.scale, par);
                softmax_rows(scores, m);
                // out[r, d] = scores[r, m] × v[m, d]
                let op = out_ptr.0.add((bi * n + first) * inner + hi * d);
                crate::image::product::gemm(r, d, m, op, 1, inner as isize, false, scores.as_ptr(), 1, m as isize, vp, 1, inner as isize, 0.0, 1.0, par);
            }
        };
        if tasks >= 2 * threads {
            (0..tasks).into_par_iter().for_each_init(Vec::new, |s, t| block(t, gemm::Parallelism::None, s));
        } else {
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            let mut s = Vec::new();
            for t in 0..tasks {
                block(t, par, &mut s);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, n, inner))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testing::{assert_close, values};
    use candle_core::Device;

    fn tensor(shape: (usize, usize, usize), seed: u64) -> Tensor {
        Tensor::from_vec(values(shape.0 * shape.1 * shape.2, seed), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_the_composed_ops_for_self_and_cross_attention() {
        // (batch, queries, keys, heads, head_dim): the UNet's self- and
        // cross-attention, the VAE's single head, one query, more queries
        // than a block of scores holds.
        let cases = [(2, 64, 64, 8, 5), (2, 64, 77, 8, 5), (1, 48, 48, 1, 16), (1, 1, 9, 2, 3), (1, 3000, 70, 2, 4)];
        for (i, &(b, n, m, h, d)) in cases.iter().enumerate() {
            let seed = 10 * i as u64;
            let (q, k, v) = (tensor((b, n, h * d), seed), tensor((b, m, h * d), seed + 1), tensor((b, m, h * d), seed + 2));
            let scale = 1.0 / (d as f64).sqrt();
            let ours = attention(&q, &k, &v, h, scale, DType::F32).unwrap();
            let want = composed(&q, &k, &v, h, scale, DType::F32).unwrap();
            assert_close(&format!("case {i}"), &ours, &want, 1e-5);
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_the_standard_library_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "largest relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
    }

    #[test]
    fn large_scores_do_not_overflow_the_softmax() {
        let (q, k, v) = (tensor((1, 4, 8), 1), tensor((1, 6, 8), 2), tensor((1, 6, 8), 3));
        let q = (q * 1e3).unwrap();
        let ours = attention(&q, &k, &v, 2, 1.0, DType::F32).unwrap();
        let want = composed(&q, &k, &v, 2, 1.0, DType::F32).unwrap();
        assert_close("scores in the thousands", &ours, &want, 1e-5);
    }
}
