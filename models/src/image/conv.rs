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

/// Output pixels (over the batch) from which a 3x3 convolution runs as
/// Winograd's F(2x2, 3x3): a 32x32 latent's UNet level and every VAE
/// decoder level do; the UNet's deep 8x8 and 16x16 levels run as im2col.
const WINOGRAD_MIN_PIXELS: usize = 1024;

/// Bytes of transformed input and product one Winograd block may use: both
/// stay in a core's L2 cache (1 MiB measured fastest here against 0.5 and 2
/// on 64x64 to 512x512 planes of 128 to 512 channels).
const WINOGRAD_BLOCK_BYTES: usize = 1 << 20;

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

    /// Whether [`winograd`] runs this convolution: 3x3, stride 1, no
    /// dilation, and enough output pixels that transforming the kernel (once
    /// per call, 16/9 of its size) is small beside the products it saves.
    fn winograd_pays(&self, batch: usize) -> bool {
        self.k_h == 3 && self.k_w == 3 && self.stride == 1 && self.dilation == 1 && batch * self.out_h * self.out_w >= WINOGRAD_MIN_PIXELS
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
    crate::image::product::gemm(
        g.c_out, n, k,
        ptr, 1, row_stride as isize, true,
        w.as_ptr(), 1, k as isize,
        col.as_ptr(), 1, n as isize,
        1.0, 1.0, parallelism,
    );
}

/// The convolution of `x` (`[batch, c_in, h, w]`, contiguous) into a new
/// `[batch, c_out, out_h, out_w]` buffer.
fn run(g: &Geometry, batch: usize, x: &[f32], w: &[f32], bias: &[f32], tile_bytes: usize) -> Vec<f32> {
    if g.winograd_pays(batch) {
        winograd::run(g, batch, x, w, bias, WINOGRAD_BLOCK_BYTES)
    } else {
        run_direct(g, batch, x, w, bias, tile_bytes)
    }
}

/// The convolution as im2col and one `gemm` per tile of output rows.
fn run_direct(g: &Geometry, batch: usize, x: &[f32], w: &[f32], bias: &[f32], tile_bytes: usize) -> Vec<f32> {
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

/// 3x3 convolutions as Winograd's minimal filtering F(2x2, 3x3) (Lavin and
/// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each
/// 2x2 block of output is computed from a 4x4 block of input with 16
/// multiplications per channel pair instead of 36, as 16 matrix products
/// `M[ξ] = U[ξ] × V[ξ]` of the transformed kernel `U = G g Gᵀ`
/// (`[c_out, c_in]` per ξ) and the transformed input `V = Bᵀ d B` (`[c_in,
/// tiles]` per ξ), then `Y = Aᵀ M A` plus the bias. The transforms' entries
/// are 0, ±1 and ±½, so they add no rounding beyond float32's sums: results
/// agree with the direct convolution to about 1e-6 of the largest value.
mod winograd {
    use super::{Geometry, Out};
    use rayon::prelude::*;

    thread_local! {
        /// The transformed kernels' buffer, kept between convolutions: a
        /// fresh one of 16/9 the kernel's size would be faulted in page by
        /// page on every call (a third of the time of a 512-channel
        /// convolution at 32x32 went there).
        static KERNELS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// `U = G g Gᵀ` of every kernel, `[16][c_out][c_in]` (ξ = 4 row + column),
    /// into `u`.
    fn kernels(g: &Geometry, w: &[f32], u: &mut Vec<f32>) {
        let (co, ci) = (g.c_out, g.c_in);
        u.resize(16 * co * ci, 0.0);
        let dst = Out(u.as_mut_ptr());
        (0..co).into_par_iter().for_each(|o| {
            let u_ptr = dst;
            for c in 0..ci {
                let k = &w[(o * ci + c) * 9..(o * ci + c) * 9 + 9];
                // G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2.
                let mut gg = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (a, b, c) = (k[j], k[3 + j], k[6 + j]);
                    gg[0][j] = a;
                    gg[1][j] = 0.5 * (a + b + c);
                    gg[2][j] = 0.5 * (a - b + c);
                    gg[3][j] = c;
                }
                for (i, r) in gg.iter().enumerate() {
                    let row = [r[0], 0.5 * (r[0] + r[1] + r[2]), 0.5 * (r[0] - r[1] + r[2]), r[2]];
                    for (j, v) in row.into_iter().enumerate() {
                        // SAFETY: kernel o writes only its own row of each ξ.
                        unsafe { *u_ptr.0.add(((4 * i + j) * co + o) * ci + c) = v };
                    }
                }
            }
        });
    }

    /// Tiles (2x2 output blocks) of one image: rows and columns.
    fn tiles(g: &Geometry) -> (usize, usize) {
        (g.out_h.div_ceil(2), g.out_w.div_ceil(2))
    }

    /// `V = Bᵀ d B` of tile rows `first..first + rows` of one image
    /// (`[c_in, h, w]`) into `v` (`[16][c_in][rows * tiles_w]`).
    fn inputs(g: &Geometry, x: &[f32], first: usize, rows: usize, v: &mut [f32], pad: &mut Vec<f32>) {
        let (_, tw) = tiles(g);
        let n = rows * tw;
        // A padded input row: index j is input column j - padding.
        let width = 2 * tw + 2;
        pad.resize(8 * width, 0.0);
        let (d, t) = pad.split_at_mut(4 * width);
        for c in 0..g.c_in {
            let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
            for r in 0..rows {
                let oy = 2 * (first + r);
                for (i, row) in d.chunks_exact_mut(width).enumerate() {
                    let iy = (oy + i) as isize - g.padding as isize;
                    row.fill(0.0);
                    if iy >= 0 && (iy as usize) < g.h {
                        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        let lo = g.padding.min(width);
                        let len = g.w.min(width - lo);
                        row[lo..lo + len].copy_from_slice(&src[..len]);
                    }
                }
                // Bᵀ d over whole rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
                let (d0, rest) = d.split_at(width);
                let (d1, rest) = rest.split_at(width);
                let (d2, d3) = rest.split_at(width);
                let (t0, rest) = t.split_at_mut(width);
                let (t1, rest) = rest.split_at_mut(width);
                let (t2, t3) = rest.split_at_mut(width);
                for j in 0..width {
                    t0[j] = d0[j] - d2[j];
                    t1[j] = d1[j] + d2[j];
                    t2[j] = d2[j] - d1[j];
                    t3[j] = d1[j] - d3[j];
                }
                // Then B on each tile's four columns.
                for (i, ti) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                    let base = |j: usize| ((4 * i + j) * g.c_in + c) * n + r * tw;
                    let (b0, b1, b2, b3) = (base(0), base(1), base(2), base(3));
                    for tx in 0..tw {
                        let q = &ti[2 * tx..2 * tx + 4];
                        v[b0 + tx] = q[0] - q[2];
                        v[b1 + tx] = q[1] + q[2];
                        v[b2 + tx] = q[2] - q[1];
                        v[b3 + tx] = q[1] - q[3];
                    }
                }
            }
        }
    }

    /// `Y = Aᵀ M A` plus the bias, for the tiles of `m` (`[16][c_out][n]`),
    /// into output rows `2 first..` of one image's `out` (`[c_out, out_h, out_w]`).
    ///
    /// # Safety
    /// `out` must be valid for this image and these output rows must be
    /// written by no other thread.
    unsafe fn outputs(g: &Geometry, m: &[f32], first: usize, rows: usize, bias: &[f32], out: *mut f32) {
        let (_, tw) = tiles(g);
        let n = rows * tw;
        let plane = g.out_h * g.out_w;
        let mut y0 = vec![0f32; 2 * tw];
        let mut y1 = vec![0f32; 2 * tw];
        for (o, &b) in bias.iter().enumerate() {
            let at = |xi: usize| &m[(xi * g.c_out + o) * n..(xi * g.c_out + o + 1) * n];
            let mm: [&[f32]; 16] = std::array::from_fn(at);
            for r in 0..rows {
                for tx in 0..tw {
                    let k = r * tw + tx;
                    let v = |xi: usize| mm[xi][k];
                    // Aᵀ over rows: s = m0 + m1 + m2, d = m1 - m2 - m3 (per column).
                    let s: [f32; 4] = std::array::from_fn(|j| v(j) + v(4 + j) + v(8 + j));
                    let d: [f32; 4] = std::array::from_fn(|j| v(4 + j) - v(8 + j) - v(12 + j));
                    y0[2 * tx] = b + s[0] + s[1] + s[2];
                    y0[2 * tx + 1] = b + s[1] - s[2] - s[3];
                    y1[2 * tx] = b + d[0] + d[1] + d[2];
                    y1[2 * tx + 1] = b + d[1] - d[2] - d[3];
                }
                let oy = 2 * (first + r);
                for (a, y) in [&y0, &y1].into_iter().enumerate() {
                    if oy + a < g.out_h {
                        let dst = std::slice::from_raw_parts_mut(out.add(o * plane + (oy + a) * g.out_w), g.out_w);
                        dst.copy_from_slice(&y[..g.out_w]);
                    }
                }
            }
        }
    }

    /// The convolution as F(2x2, 3x3); tile rows go in blocks whose
    /// transformed input and products fit `block_bytes`, in parallel over
    /// the cores.
    pub(super) fn run(g: &Geometry, batch: usize, x: &[f32], w: &[f32], bias: &[f32], block_bytes: usize) -> Vec<f32> {
        let threads = rayon::current_num_threads().max(1);
        let (th, tw) = tiles(g);
        let mut u = KERNELS.with_borrow_mut(std::mem::take);
        kernels(g, w, &mut u);
        let mut out = vec![0f32; batch * g.c_out * g.out_h * g.out_w];
        let out_ptr = Out(out.as_mut_ptr());
        let rows = (block_bytes / (16 * 4 * (g.c_in + g.c_out) * tw).max(1)).clamp(1, th);
        let per_image = th.div_ceil(rows);
        let blocks = batch * per_image;
        let block = |i: usize, par: gemm::Parallelism, bufs: &mut (Vec<f32>, Vec<f32>, Vec<f32>)| {
            let (img, first) = (i / per_image, (i % per_image) * rows);
            let r = rows.min(th - first);
            let n = r * tw;
            let (v, m, pad) = bufs;
            v.resize(16 * g.c_in * n, 0.0);
            m.resize(16 * g.c_out * n, 0.0);
            let xi = &x[img * g.c_in * g.h * g.w..(img + 1) * g.c_in * g.h * g.w];
            inputs(g, xi, first, r, v, pad);
            for xi in 0..16 {
                let (uk, vk) = (&u[xi * g.c_out * g.c_in..], &v[xi * g.c_in * n..]);
                // SAFETY: `m` holds 16 × c_out × n floats; the operands are
                // read within their lengths.
                unsafe {
                    crate::image::product::gemm(
                        g.c_out, n, g.c_in,
                        m.as_mut_ptr().add(xi * g.c_out * n), 1, n as isize, false,
                        uk.as_ptr(), 1, g.c_in as isize,
                        vk.as_ptr(), 1, n as isize,
                        0.0, 1.0, par,
                    );
                }
            }
            let out = out_ptr;
            // SAFETY: block i writes output rows 2 first .. 2 (first + r) of
            // image img, which no other block writes.
            unsafe { outputs(g, m, first, r, bias, out.0.add(img * g.c_out * g.out_h * g.out_w)) };
        };
        if blocks >= 2 * threads {
            (0..blocks).into_par_iter().for_each_init(|| (Vec::new(), Vec::new(), Vec::new()), |bufs, i| block(i, gemm::Parallelism::None, bufs));
        } else {
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            let mut bufs = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..blocks {
                block(i, par, &mut bufs);
            }
        }
        KERNELS.with_borrow_mut(|kept| *kept = u);
        out
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
    fn winograd_equals_the_direct_convolution_at_every_edge() {
        // (batch, c_in, h, w, c_out, padding): odd and even output sides (a
        // last tile half outside), no padding, a tile budget of one tile row
        // and of the whole image, a batch.
        let cases = [(1, 3, 7, 9, 4, 1), (2, 5, 8, 8, 3, 1), (1, 4, 9, 6, 2, 0), (1, 2, 4, 5, 3, 2), (1, 16, 12, 10, 8, 1)];
        for (i, &(b, cin, h, w, cout, padding)) in cases.iter().enumerate() {
            let out_side = |s: usize| s + 2 * padding - 2;
            let g = Geometry { c_in: cin, h, w, c_out: cout, k_h: 3, k_w: 3, out_h: out_side(h), out_w: out_side(w), padding, stride: 1, dilation: 1 };
            let x = values(b * cin * h * w, 30 + i as u64);
            let k = values(cout * cin * 9, 40 + i as u64);
            let bias = values(cout, 50 + i as u64);
            let shape = (b, cout, g.out_h, g.out_w);
            let direct = Tensor::from_vec(run_direct(&g, b, &x, &k, &bias, TILE_BYTES), shape, &Device::Cpu).unwrap();
            for budget in [1, WINOGRAD_BLOCK_BYTES] {
                let wino = Tensor::from_vec(winograd::run(&g, b, &x, &k, &bias, budget), shape, &Device::Cpu).unwrap();
                assert_close(&format!("case {i}, budget {budget}"), &wino, &direct, 1e-6);
            }
        }
    }

    #[test]
    fn large_images_run_as_winograd_and_still_equal_candles_conv2d() {
        let l = layer(8, 6, 3, Conv2dConfig { padding: 1, ..Default::default() }, true, 9);
        let x = Tensor::from_vec(values(2 * 8 * 24 * 23, 10), (2, 8, 24, 23), &Device::Cpu).unwrap();
        let g = Geometry { c_in: 8, h: 24, w: 23, c_out: 6, k_h: 3, k_w: 3, out_h: 24, out_w: 23, padding: 1, stride: 1, dilation: 1 };
        assert!(g.winograd_pays(2));
        assert_close("winograd through the layer", &l.forward(&x).unwrap(), &reference(&l, &x), 1e-5);
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
        let whole = run_direct(&g, 1, &x, &w, &bias, 1);
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
