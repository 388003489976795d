//! The matrix product of the image kernels ([`super::conv`],
//! [`super::attention`]): `gemm`'s AVX-512 kernel where the CPU has one,
//! its AVX2 kernel (what candle's matmul runs) elsewhere.
//!
//! `gemm` chooses its kernel once per process, for every caller: its
//! `x86-v4` feature would move candle's matmul too, and that slowed the
//! text models' small products (docs/decisions.md). The image kernels'
//! products are large (hundreds of rows and columns), where the AVX-512
//! kernel's 64x6 tile pays, so they reach it here and nowhere else.
//! `gemm-common` exports the pieces `gemm-f32` builds its kernels from; the
//! [`avx512`] module instantiates them as `gemm-f32` 0.19 does under
//! `x86-v4` (MIT licensed, same authors as `gemm`).

/// `dst = alpha·dst + beta·lhs·rhs`, with `gemm::gemm`'s arguments and
/// meaning for `f32` (strides in elements, `read_dst` false ignores `dst`).
///
/// # Safety
/// As `gemm::gemm`: each operand is valid for its shape and strides, and
/// `dst` is written by no one else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return avx512::gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta, parallelism);
    }
    gemm::gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta, false, false, false, parallelism)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use gemm_common::simd::{MixedSimd, V4};

    /// Whether this CPU runs the AVX-512 kernel; `MORA_GEMM=avx2` keeps
    /// the image products on the AVX2 kernel (to compare the two).
    pub(super) fn available() -> bool {
        static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *YES.get_or_init(|| V4::try_new().is_some() && std::env::var("MORA_GEMM").map_or(true, |v| v != "avx2"))
    }

    /// `gemm::gemm`'s normalisation (a column-major destination, positive
    /// strides), then `gemm_basic_generic` with the AVX-512 kernels.
    ///
    /// # Safety
    /// As [`super::gemm`], and [`available`] is true.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        mut dst: *mut f32,
        dst_cs: isize,
        dst_rs: isize,
        read_dst: bool,
        lhs: *const f32,
        lhs_cs: isize,
        lhs_rs: isize,
        rhs: *const f32,
        rhs_cs: isize,
        rhs_rs: isize,
        alpha: f32,
        beta: f32,
        parallelism: gemm::Parallelism,
    ) {
        // The kernel prefers a column-major destination: transpose the
        // product when the destination is row-major (dstᵀ = rhsᵀ·lhsᵀ).
        let (m, n, mut dst_cs, mut dst_rs, mut lhs, mut lhs_cs, mut lhs_rs, mut rhs, mut rhs_cs, mut rhs_rs) = if dst_cs.abs() < dst_rs.abs() {
            (n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs)
        } else {
            (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs)
        };
        if dst_rs < 0 && m > 0 {
            dst = dst.wrapping_offset((m - 1) as isize * dst_rs);
            dst_rs = -dst_rs;
            lhs = lhs.wrapping_offset((m - 1) as isize * lhs_rs);
            lhs_rs = -lhs_rs;
        }
        if dst_cs < 0 && n > 0 {
            dst = dst.wrapping_offset((n - 1) as isize * dst_cs);
            dst_cs = -dst_cs;
            rhs = rhs.wrapping_offset((n - 1) as isize * rhs_cs);
            rhs_cs = -rhs_cs;
        }
        if lhs_cs < 0 && k > 0 {
            lhs = lhs.wrapping_offset((k - 1) as isize * lhs_cs);
            lhs_cs = -lhs_cs;
            rhs = rhs.wrapping_offset((k - 1) as isize * rhs_rs);
            rhs_rs = -rhs_rs;
        }
        use kernels::{H_M, H_N, H_UKR, MR_DIV_N, NR, UKR};
        const N: usize = 16;
        let simd = <V4 as MixedSimd<f32, f32, f32, f32>>::try_new().expect("checked by available()");
        gemm_common::gemm::gemm_basic_generic::<_, f32, N, { MR_DIV_N * N }, NR, MR_DIV_N, H_M, H_N>(
            simd,
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            false,
            false,
            false,
            |a, b, c| a * b + c,
            &UKR,
            &H_UKR,
            false,
            parallelism,
        );
    }

    /// `gemm-f32` 0.19's `microkernel::avx512f::f32`, as it is: the
    /// operations the `microkernel!` and `horizontal_kernel!` macros expect
    /// in scope, then the kernels for every tile up to 4x16 rows by 6 columns.
    #[allow(clippy::missing_safety_doc, clippy::missing_transmute_annotations, clippy::too_many_arguments, clippy::needless_range_loop, unused_unsafe, unused_mut, unused_assignments)]
    mod kernels {
        use core::arch::x86_64::*;
        use core::mem::transmute;
        use gemm_common::{hmicrokernel_fn_array, horizontal_kernel, microkernel, microkernel_fn_array};

        type T = f32;
        const N: usize = 16;
        type Pack = [T; N];

        #[inline(always)]
        unsafe fn splat(value: T) -> Pack {
            transmute(_mm512_set1_ps(value))
        }

        #[inline(always)]
        unsafe fn mul(lhs: Pack, rhs: Pack) -> Pack {
            transmute(_mm512_mul_ps(transmute(lhs), transmute(rhs)))
        }

        #[inline(always)]
        unsafe fn add(lhs: Pack, rhs: Pack) -> Pack {
            transmute(_mm512_add_ps(transmute(lhs), transmute(rhs)))
        }

        #[inline(always)]
        unsafe fn mul_add(a: Pack, b: Pack, c: Pack) -> Pack {
            transmute(_mm512_fmadd_ps(transmute(a), transmute(b), transmute(c)))
        }

        #[inline(always)]
        pub unsafe fn scalar_mul(lhs: T, rhs: T) -> T {
            lhs * rhs
        }

        #[inline(always)]
        pub unsafe fn scalar_add(lhs: T, rhs: T) -> T {
            lhs + rhs
        }

        #[inline(always)]
        pub unsafe fn scalar_mul_add(a: T, b: T, c: T) -> T {
            gemm_common::simd::v3_fmaf(a, b, c)
        }

        /// Lane masks for a load of the first `len` of 16 floats.
        static U32_MASKS: [u16; 17] = {
            let mut masks = [0u16; 17];
            let mut i = 1;
            while i < 17 {
                masks[i] = ((1u32 << i) - 1) as u16;
                i += 1;
            }
            masks
        };

        #[inline(always)]
        pub unsafe fn partial_load(ptr: *const T, len: usize) -> [T; N] {
            transmute(_mm512_maskz_loadu_ps(*U32_MASKS.as_ptr().add(len), ptr))
        }

        #[inline(always)]
        pub unsafe fn reduce_sum(x: [T; N]) -> T {
            let x = transmute(x);
            let x = _mm256_add_ps(_mm512_castps512_ps256(x), transmute(_mm512_extractf64x4_pd::<1>(transmute(x))));
            let x = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let hi = _mm_movehl_ps(x, x);
            let r0 = _mm_add_ps(x, hi);
            let r0_shuffled = _mm_shuffle_ps::<0b0001>(r0, r0);
            let r = _mm_add_ss(r0, r0_shuffled);
            _mm_cvtss_f32(r)
        }

        microkernel!(["avx512f"], 4, x1x1, 1, 1);
        microkernel!(["avx512f"], 4, x1x2, 1, 2);
        microkernel!(["avx512f"], 4, x1x3, 1, 3);
        microkernel!(["avx512f"], 4, x1x4, 1, 4);
        microkernel!(["avx512f"], 4, x1x5, 1, 5);
        microkernel!(["avx512f"], 4, x1x6, 1, 6);
        microkernel!(["avx512f"], 4, x2x1, 2, 1);
        microkernel!(["avx512f"], 4, x2x2, 2, 2);
        microkernel!(["avx512f"], 4, x2x3, 2, 3);
        microkernel!(["avx512f"], 4, x2x4, 2, 4);
        microkernel!(["avx512f"], 4, x2x5, 2, 5);
        microkernel!(["avx512f"], 4, x2x6, 2, 6);
        microkernel!(["avx512f"], 4, x3x1, 3, 1);
        microkernel!(["avx512f"], 4, x3x2, 3, 2);
        microkernel!(["avx512f"], 4, x3x3, 3, 3);
        microkernel!(["avx512f"], 4, x3x4, 3, 4);
        microkernel!(["avx512f"], 4, x3x5, 3, 5);
        microkernel!(["avx512f"], 4, x3x6, 3, 6);
        microkernel!(["avx512f"], 4, x4x1, 4, 1);
        microkernel!(["avx512f"], 4, x4x2, 4, 2);
        microkernel!(["avx512f"], 4, x4x3, 4, 3);
        microkernel!(["avx512f"], 4, x4x4, 4, 4);
        microkernel!(["avx512f"], 4, x4x5, 4, 5);
        microkernel!(["avx512f"], 4, x4x6, 4, 6);

        microkernel_fn_array! {
            [x1x1, x1x2, x1x3, x1x4, x1x5, x1x6,],
            [x2x1, x2x2, x2x3, x2x4, x2x5, x2x6,],
            [x3x1, x3x2, x3x3, x3x4, x3x5, x3x6,],
            [x4x1, x4x2, x4x3, x4x4, x4x5, x4x6,],
        }

        horizontal_kernel!(["avx512f"], hx1x1, 1, 1);
        horizontal_kernel!(["avx512f"], hx1x2, 1, 2);
        horizontal_kernel!(["avx512f"], hx1x3, 1, 3);
        horizontal_kernel!(["avx512f"], hx1x4, 1, 4);
        horizontal_kernel!(["avx512f"], hx2x1, 2, 1);
        horizontal_kernel!(["avx512f"], hx2x2, 2, 2);
        horizontal_kernel!(["avx512f"], hx2x3, 2, 3);
        horizontal_kernel!(["avx512f"], hx2x4, 2, 4);
        horizontal_kernel!(["avx512f"], hx3x1, 3, 1);
        horizontal_kernel!(["avx512f"], hx3x2, 3, 2);
        horizontal_kernel!(["avx512f"], hx3x3, 3, 3);
        horizontal_kernel!(["avx512f"], hx3x4, 3, 4);
        horizontal_kernel!(["avx512f"], hx4x1, 4, 1);
        horizontal_kernel!(["avx512f"], hx4x2, 4, 2);
        horizontal_kernel!(["avx512f"], hx4x3, 4, 3);
        horizontal_kernel!(["avx512f"], hx4x4, 4, 4);

        hmicrokernel_fn_array! {
            [hx1x1, hx1x2, hx1x3, hx1x4,],
            [hx2x1, hx2x2, hx2x3, hx2x4,],
            [hx3x1, hx3x2, hx3x3, hx3x4,],
            [hx4x1, hx4x2, hx4x3, hx4x4,],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gemm;

    /// The reference: a plain triple loop over row-major operands.
    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn equals_the_plain_product_on_every_tile_edge_and_layout() {
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (64, 6, 16), (65, 7, 17), (130, 50, 33), (300, 97, 128)] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let want = naive(m, n, k, &a, &b);
            for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
                // Row-major destination (the image kernels' layout).
                let mut c = vec![0f32; m * n];
                unsafe { gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), 1, n as isize, 0.0, 1.0, par) };
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{n}x{k}: {x} != {y}");
                }
                // Column-major destination, accumulating onto what is there.
                let mut ct = vec![1f32; m * n];
                unsafe { gemm(m, n, k, ct.as_mut_ptr(), m as isize, 1, true, a.as_ptr(), 1, k as isize, b.as_ptr(), 1, n as isize, 1.0, 2.0, par) };
                for i in 0..m {
                    for j in 0..n {
                        let (x, y) = (ct[j * m + i], 1.0 + 2.0 * want[i * n + j]);
                        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{n}x{k} col-major: {x} != {y}");
                    }
                }
            }
        }
    }
}
