//! 2-D convolution for the image networks, with Mora's own CPU kernel.
//!
//! candle 0.11's CPU conv2d (`conv2d_tiled`) copies the whole input to
//! NHWC on one thread, reorders the kernel on every call, builds each
//! im2col tile one element at a time with the tile's width as stride, and
//! scatters the product back to NCHW element by element; then the bias is
//! a broadcast add over the whole output, one more pass and allocation. A
//! `perf record` of a warm SD-1.5-sized run had a quarter of its samples in
//! those copies (docs/benchmarks.md, "Image compute").
//!
//! [`Conv2d`] runs the same convolution as one `gemm` per tile of output
//! rows, straight from the NCHW input: the im2col rows of a tile are runs
//! of input rows copied whole (`copy_from_slice`, vectorised), the kernel
//! is used as stored (`[c_out, c_in * k_h * k_w]`, row-major), the product
//! lands in the output's own rows with the bias as its starting value, and
//! tiles run in parallel over the cores (each `gemm` on one), or one after
//! the other with `gemm` itself parallel when there are few.
//!
//! Contract: f32, contiguous kernel `[c_out, c_in, k_h, k_w]`, any input
//! layout (a non-contiguous input is gathered first), groups of 1; the result
//! equals candle's `conv2d` (plus bias) within float rounding (a different
//! summation order: checked at 1e-5 of the largest value in the tests
//! below). Anything else (another dtype, another device, groups) runs
//! candle's own op, so the GPU path is unchanged.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use super::own_kernels;

/// Bytes of im2col buffer one tile may use: a tile's columns stay in the
/// last-level cache while `gemm` reads them.
const TILE_BYTES: usize = 4 << 20;

/// A convolution layer: candle-nn's `Conv2d`, on Mora's CPU kernel.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

/// Reads `weight` (and `bias`) under `vb` as candle-nn's `conv2d` does.
pub fn conv2d(cin: usize, cout: usize, k: usize, config: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let inner = candle_nn::conv2d(cin, cout, k, config, vb)?;
    Ok(Conv2d { weight: inner.weight().clone(), bias: inner.bias().cloned(), config })
}

impl Conv2d {
    /// Whether Mora's kernel runs this convolution on `x` (else candle's).
    fn ours(&self, x: &Tensor) -> bool {
        own_kernels()
            && x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 && self.config.groups == 1 && self.weight.is_contiguous()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.ours(x) {
            let c = &self.config;
            let y = x.conv2d(&self.weight, c.padding, c.stride, c.dilation, c.groups)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.reshape((1, b.dims1()?, 1, 1))?),
                None => Ok(y),
            };
        }
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(self.weight.dim(0)?, DType::F32, x.device())?,
        };
        let op = Conv2dOp { padding: self.config.padding, stride: self.config.stride, dilation: self.config.dilation };
        // A strided input is gathered in order first (no copy when it is not).
        x.contiguous()?.apply_op3_no_bwd(&self.weight, &bias, &op)
    }
}

/// The CPU op: `x` (`[b, c_in, h, w]`), `weight`, `bias` (`[c_out]`).
struct Conv2dOp {
    padding: usize,
    stride: usize,
    dilation: usize,
}

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    out_h: usize,
    out_w: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl Geometry {
    /// Rows of the im2col matrix: one per (input channel, kernel row, kernel column).
    fn k(&self) -> usize {
        self.c_in * self.k_h * self.k_w
    }

    /// Whether the convolution is a plain product (1x1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.k_h == 1 && self.k_w == 1 && self.stride == 1 && self.padding == 0
    }

    /// Fills `col` (`[k, rows * out_w]`, row-major) with the im2col columns of
    /// output rows `first..first + rows` of `x` (one image, `[c_in, h, w]`).
    fn im2col(&self, x: &[f32], first: usize, rows: usize, col: &mut [f32]) {
        let n = rows * self.out_w;
        let mut r = 0;
        for c in 0..self.c_in {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ki in 0..self.k_h {
                for kj in 0..self.k_w {
                    let dst_row = &mut col[r * n..(r + 1) * n];
                    r += 1;
                    // Output columns whose input column lies inside the image:
                    // ox * stride + kj * dilation - padding in 0..w.
                    let shift = (kj * self.dilation) as isize - self.padding as isize;
                    let lo = if shift >= 0 { 0 } else { ((-shift) as usize).div_ceil(self.stride) };
                    let hi = if (self.w as isize) <= shift {
                        0
                    } else {
                        (((self.w as isize - shift) as usize).div_ceil(self.stride)).min(self.out_w)
                    };
                    for (t, dst) in dst_row.chunks_exact_mut(self.out_w).enumerate() {
                        let iy = ((first + t) * self.stride + ki * self.dilation) as isize - self.padding as isize;
                        if iy < 0 || iy >= self.h as isize || lo >= hi {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let start = (lo * self.stride) as isize + shift;
                        if self.stride == 1 {
                            let start = start as usize;
                            dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                        } else {
                            for (o, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[start as usize + o * self.stride];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A pointer to the output that tiles write through, each to its own columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tiles write disjoint columns of the output (see `run`), and the
// buffer outlives every tile (they are joined before it is returned).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Where a product goes: `c_out` rows of `n` floats, `row_stride` apart.
struct Dst {
    ptr: *mut f32,
    n: usize,
    row_stride: usize,
}

/// One `gemm`: `dst[c_out, n] = bias + w[c_out, k] × col[k, n]`.
///
/// # Safety
/// `dst` must be valid for writes of its rows, which no other thread
/// touches during the call.
unsafe fn product(g: &Geometry, w: &[f32], col: &[f32], dst: Dst, bias: &[f32], parallelism: gemm::Parallelism) {
    let Dst { ptr, n, row_stride } = dst;
    for (o, b) in bias.iter().enumerate() {
        std::slice::from_raw_parts_mut(ptr.add(o * row_stride), n).fill(*b);
    }
    let k = g.k();
    gemm::gemm(
        g.c_out, n, k,
        ptr, 1, row_stride as isize, true,
        w.as_ptr(), 1, k as isize,
        col.as_ptr(), 1, n as isize,
        1.0, 1.0, false, false, false, parallelism,
    );
}

/// The convolution of `x` (`[batch, c_in, h, w]`, contiguous) into a new
/// `[batch, c_out, out_h, out_w]` buffer.
fn run(g: &Geometry, batch: usize, x: &[f32], w: &[f32], bias: &[f32], tile_bytes: usize) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    let n_all = g.out_h * g.out_w;
    let mut out = vec![0f32; batch * g.c_out * n_all];
    let k = g.k();
    // Output rows per tile: as many as the im2col budget holds, at least one.
    let rows = (tile_bytes / (4 * k * g.out_w).max(1)).clamp(1, g.out_h);
    let tiles_per_image = g.out_h.div_ceil(rows);
    let out_ptr = Out(out.as_mut_ptr());
    for img in 0..batch {
        let xi = &x[img * g.c_in * g.h * g.w..(img + 1) * g.c_in * g.h * g.w];
        let base = img * g.c_out * n_all;
        if g.pointwise() {
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            // SAFETY: this image's rows of `out`, written by this call alone.
            unsafe { product(g, w, xi, Dst { ptr: out_ptr.0.add(base), n: n_all, row_stride: n_all }, bias, par) };
            continue;
        }
        let tile = |t: usize, par: gemm::Parallelism, col: &mut Vec<f32>| {
            let first = t * rows;
            let r = rows.min(g.out_h - first);
            let n = r * g.out_w;
            col.resize(k * n, 0.0);
            g.im2col(xi, first, r, &mut col[..k * n]);
            let out = out_ptr;
            // SAFETY: tile t writes columns first*out_w .. (first+r)*out_w of
            // each output row of this image, which no other tile writes.
            unsafe { product(g, w, &col[..k * n], Dst { ptr: out.0.add(base + first * g.out_w), n, row_stride: n_all }, bias, par) };
        };
        if tiles_per_image >= 2 * threads {
            (0..tiles_per_image).into_par_iter().for_each_init(Vec::new, |col, t| tile(t, gemm::Parallelism::None, col));
        } else {
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            let mut col = Vec::new();
            for t in 0..tiles_per_image {
                tile(t, par, &mut col);
            }
        }
    }
    out
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "mora-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, c_in, h, w) = l1.shape().dims4()?;
        let (c_out, c_in_k, k_h, k_w) = l2.shape().dims4()?;
        if c_in != c_in_k {
            candle_core::bail!("mora-conv2d: input has {c_in} channels, the kernel expects {c_in_k}");
        }
        let out_size = |size: usize, k: usize| (size + 2 * self.padding).checked_sub(self.dilation * (k - 1) + 1).map(|s| s / self.stride + 1);
        let (Some(out_h), Some(out_w)) = (out_size(h, k_h), out_size(w, k_w)) else {
            candle_core::bail!("mora-conv2d: a {k_h}x{k_w} kernel does not fit a {h}x{w} input padded by {}", self.padding);
        };
        let g = Geometry { c_in, h, w, c_out, k_h, k_w, out_h, out_w, padding: self.padding, stride: self.stride, dilation: self.dilation };
        let (Some((xa, xb)), Some((wa, wb)), Some((ba, bb))) = (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets()) else {
            candle_core::bail!("mora-conv2d: the input, the kernel and the bias must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[xa..xb];
        let weight = &s2.as_slice::<f32>()?[wa..wb];
        let bias = &s3.as_slice::<f32>()?[ba..bb];
        let out = run(&g, batch, x, weight, bias, TILE_BYTES);
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, out_h, out_w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testing::{assert_close, values};
    use candle_core::Device;

    fn layer(cin: usize, cout: usize, k: usize, config: Conv2dConfig, bias: bool, seed: u64) -> Conv2d {
        let weight = Tensor::from_vec(values(cout * cin * k * k, seed), (cout, cin, k, k), &Device::Cpu).unwrap();
        let bias = bias.then(|| Tensor::from_vec(values(cout, seed + 1), cout, &Device::Cpu).unwrap());
        Conv2d { weight, bias, config }
    }

    /// candle's own convolution plus bias: the reference.
    fn reference(l: &Conv2d, x: &Tensor) -> Tensor {
        let c = &l.config;
        let y = x.conv2d(&l.weight, c.padding, c.stride, c.dilation, 1).unwrap();
        match &l.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dims1().unwrap(), 1, 1)).unwrap()).unwrap(),
            None => y,
        }
    }

    #[test]
    fn equals_candles_conv2d_on_the_shapes_the_networks_use() {
        // (batch, c_in, h, w, c_out, k, stride, padding, dilation, bias)
        let cases = [
            (2, 4, 9, 7, 5, 3, 1, 1, 1, true),   // the common 3x3, padding 1
            (1, 3, 8, 8, 6, 3, 2, 1, 1, true),   // downsampling, stride 2
            (1, 3, 9, 9, 6, 3, 2, 0, 1, false),  // stride 2, no padding (the VAE encoder pads itself)
            (2, 6, 5, 6, 4, 1, 1, 0, 1, true),   // pointwise: a plain product
            (1, 2, 6, 6, 3, 1, 2, 0, 1, true),   // 1x1 with a stride
            (1, 2, 7, 7, 3, 3, 1, 2, 2, true),   // dilation
            (1, 2, 3, 3, 2, 5, 1, 2, 1, true),   // a kernel wider than the image is deep
            (1, 64, 12, 12, 32, 3, 1, 1, 1, true), // enough rows for several tiles
        ];
        for (i, &(b, cin, h, w, cout, k, stride, padding, dilation, bias)) in cases.iter().enumerate() {
            let l = layer(cin, cout, k, Conv2dConfig { padding, stride, dilation, groups: 1, cudnn_fwd_algo: None }, bias, i as u64);
            let x = Tensor::from_vec(values(b * cin * h * w, 100 + i as u64), (b, cin, h, w), &Device::Cpu).unwrap();
            let ours = l.forward(&x).unwrap();
            let want = reference(&l, &x);
            assert_close(&format!("case {i}"), &ours, &want, 1e-5);
        }
    }

    #[test]
    fn a_strided_input_is_read_in_its_own_order() {
        let l = layer(3, 4, 3, Conv2dConfig { padding: 1, ..Default::default() }, true, 7);
        let x = Tensor::from_vec(values(2 * 3 * 6 * 5, 8), (2, 5, 6, 3), &Device::Cpu).unwrap().permute((0, 3, 2, 1)).unwrap();
        assert!(!x.is_contiguous());
        assert_close("a strided input", &l.forward(&x).unwrap(), &reference(&l, &x), 1e-5);
    }

    #[test]
    fn a_tile_budget_of_one_row_still_covers_every_row() {
        // A kernel so deep that one output row fills the tile budget.
        let g = Geometry { c_in: 3, h: 5, w: 4, c_out: 2, k_h: 3, k_w: 3, out_h: 5, out_w: 4, padding: 1, stride: 1, dilation: 1 };
        let x = values(3 * 5 * 4, 3);
        let w = values(2 * g.k(), 4);
        let bias = [0.5, -0.5];
        let whole = run(&g, 1, &x, &w, &bias, 1);
        // Row by row, the same numbers.
        let mut col = vec![0.0; g.k() * g.out_w];
        for row in 0..g.out_h {
            g.im2col(&x, row, 1, &mut col);
            for o in 0..2 {
                for ox in 0..g.out_w {
                    let v: f32 = bias[o] + (0..g.k()).map(|r| w[o * g.k() + r] * col[r * g.out_w + ox]).sum::<f32>();
                    let got = whole[o * g.out_h * g.out_w + row * g.out_w + ox];
                    assert!((got - v).abs() <= 1e-5 * v.abs().max(1.0), "row {row} out {o} col {ox}: {got} vs {v}");
                }
            }
        }
    }

    #[test]
    fn tiles_run_in_parallel_give_the_one_tile_result() {
        // 2 rows a tile: many tiles, run in parallel, against one tile.
        let g = Geometry { c_in: 8, h: 24, w: 10, c_out: 6, k_h: 3, k_w: 3, out_h: 24, out_w: 10, padding: 1, stride: 1, dilation: 1 };
        let x = values(2 * 8 * 24 * 10, 5);
        let w = values(6 * g.k(), 6);
        let bias = values(6, 7);
        let one = run(&g, 2, &x, &w, &bias, usize::MAX);
        let tiled = run(&g, 2, &x, &w, &bias, 2 * 4 * g.k() * g.out_w);
        assert_eq!(one, tiled, "the same columns, the same sums, whatever the tiling");
    }

    #[test]
    fn other_dtypes_run_candles_op() {
        let l = layer(2, 3, 3, Conv2dConfig { padding: 1, ..Default::default() }, true, 9);
        let l16 = Conv2d { weight: l.weight.to_dtype(DType::F16).unwrap(), bias: l.bias.as_ref().map(|b| b.to_dtype(DType::F16).unwrap()), config: l.config };
        let x = Tensor::from_vec(values(2 * 5 * 5, 10), (1, 2, 5, 5), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        assert!(!l16.ours(&x));
        let y = l16.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        assert_eq!(y.dims(), &[1, 3, 5, 5]);
    }
}
