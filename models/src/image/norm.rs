//! Group normalisation for the image networks, with Mora's own CPU kernel,
//! and the SiLU that follows it in every residual block fused in.
//!
//! candle-nn's `GroupNorm` is a composition of about ten tensor ops (sum,
//! divide, subtract, square, sum, divide, add, square root, divide,
//! multiply, add), each a pass over the activations into a new buffer; the
//! SiLU after it is another. [`GroupNorm`] does the same arithmetic in two
//! passes per group: its mean and variance (accumulated in f64), then the
//! normalised, scaled and shifted values, through SiLU where asked, written
//! once; groups run in parallel over the cores.
//!
//! Contract: f32 on the CPU, input `[batch, channels, ...]` (any trailing
//! dims), channels a multiple of the groups. Results equal candle's
//! `GroupNorm` (then `silu`) within float rounding (f64 sums where candle
//! sums in f32: checked at 1e-5 of the largest value in the tests below).
//! Anything else runs candle's ops, so the GPU path is unchanged.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::own_kernels;

/// candle-nn's `GroupNorm` (weight and bias per channel), on Mora's kernel.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Reads `weight` and `bias` under `vb` as candle-nn's `group_norm` does.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { inner, weight, bias, groups, eps })
}

impl GroupNorm {
    fn ours(&self, x: &Tensor) -> bool {
        own_kernels() && x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 && x.rank() >= 3
    }

    /// The normalised `x`, then SiLU: `silu(group_norm(x))` in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if !self.ours(x) {
            return candle_nn::ops::silu(&self.inner.forward(x)?);
        }
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let op = GroupNormOp { groups: self.groups, eps: self.eps, silu };
        x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.ours(x) {
            return self.inner.forward(x);
        }
        self.run(x, false)
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// `v * sigmoid(v)`, as candle's `silu` computes it.
#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "mora-group-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let channels = dims[1];
        if !channels.is_multiple_of(self.groups) {
            candle_core::bail!("mora-group-norm: {channels} channels do not split into {} groups", self.groups);
        }
        let spatial: usize = dims[2..].iter().product();
        let (Some((xa, xb)), Some((wa, wb)), Some((ba, bb))) = (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets()) else {
            candle_core::bail!("mora-group-norm: the input, the weight and the bias must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[xa..xb];
        let weight = &s2.as_slice::<f32>()?[wa..wb];
        let bias = &s3.as_slice::<f32>()?[ba..bb];
        if weight.len() != channels || bias.len() != channels {
            candle_core::bail!("mora-group-norm: {channels} channels, {} weights, {} biases", weight.len(), bias.len());
        }
        let per_group = channels / self.groups;
        let group_len = per_group * spatial;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (dst, src))| {
            let g = i % self.groups;
            let (mut sum, mut sq) = (0f64, 0f64);
            for &v in src {
                sum += v as f64;
            }
            let mean = sum / group_len as f64;
            for &v in src {
                let d = v as f64 - mean;
                sq += d * d;
            }
            let inv = 1.0 / (sq / group_len as f64 + self.eps).sqrt();
            for c in 0..per_group {
                let ch = g * per_group + c;
                // y = (v - mean) * inv * w + b = v * scale + shift
                let scale = (inv * weight[ch] as f64) as f32;
                let shift = (bias[ch] as f64 - mean * inv * weight[ch] as f64) as f32;
                let (s, d) = (&src[c * spatial..(c + 1) * spatial], &mut dst[c * spatial..(c + 1) * spatial]);
                if self.silu {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = silu(v * scale + shift);
                    }
                } else {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = v * scale + shift;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testing::{assert_close, values};
    use candle_core::Device;

    fn layer(groups: usize, channels: usize, seed: u64) -> GroupNorm {
        let weight = Tensor::from_vec(values(channels, seed), channels, &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(values(channels, seed + 1), channels, &Device::Cpu).unwrap();
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, 1e-6).unwrap();
        GroupNorm { inner, weight, bias, groups, eps: 1e-6 }
    }

    #[test]
    fn equals_candles_group_norm_and_silu() {
        for (i, &(b, c, g, h, w)) in [(2, 8, 4, 5, 3), (1, 32, 32, 4, 4), (1, 6, 1, 7, 2), (3, 12, 3, 1, 9)].iter().enumerate() {
            let l = layer(g, c, i as u64);
            // An offset mean, so a sum in f32 would lose digits.
            let x = (Tensor::from_vec(values(b * c * h * w, 50 + i as u64), (b, c, h, w), &Device::Cpu).unwrap() + 3.0).unwrap();
            let want = l.inner.forward(&x).unwrap();
            assert_close(&format!("case {i}: group norm"), &l.forward(&x).unwrap(), &want, 1e-5);
            assert_close(&format!("case {i}: group norm + silu"), &l.forward_silu(&x).unwrap(), &candle_nn::ops::silu(&want).unwrap(), 1e-5);
        }
    }

    #[test]
    fn a_rank_three_input_and_a_strided_one_are_normalised_too() {
        let l = layer(2, 4, 3);
        let x = Tensor::from_vec(values(2 * 4 * 6, 4), (2, 4, 6), &Device::Cpu).unwrap();
        assert_close("rank 3", &l.forward(&x).unwrap(), &l.inner.forward(&x).unwrap(), 1e-5);
        let t = Tensor::from_vec(values(2 * 6 * 4, 5), (2, 6, 4), &Device::Cpu).unwrap().transpose(1, 2).unwrap();
        assert!(!t.is_contiguous());
        assert_close("strided", &l.forward(&t).unwrap(), &l.inner.forward(&t).unwrap(), 1e-5);
    }

    #[test]
    fn half_precision_runs_candles_ops() {
        let l = layer(2, 4, 6);
        let l16 = GroupNorm {
            inner: candle_nn::GroupNorm::new(l.weight.to_dtype(DType::F16).unwrap(), l.bias.to_dtype(DType::F16).unwrap(), 4, 2, 1e-6).unwrap(),
            weight: l.weight.to_dtype(DType::F16).unwrap(),
            bias: l.bias.to_dtype(DType::F16).unwrap(),
            groups: 2,
            eps: 1e-6,
        };
        let x = Tensor::from_vec(values(4 * 9, 7), (1, 4, 3, 3), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        assert!(!l16.ours(&x));
        assert_eq!(l16.forward_silu(&x).unwrap().dtype(), DType::F16);
    }
}
