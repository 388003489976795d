//! The numerics the schedulers share, each computed as torch or numpy
//! computes it in diffusers (same precision, same order of float
//! operations), so that a scheduler's outputs match diffusers' to the last
//! float32 rounding or two: linspaces and spacings, beta schedules,
//! `alphas_cumprod` and its zero-SNR rescale, interpolation and sigma
//! schedules, the predicted clean sample and its thresholding, and the
//! float32 tensor arithmetic every step is written in.

use candle_core::{DType, Tensor};

/// What the model predicts (`prediction_type`): the noise, v (a mix of
/// noise and clean sample) or the clean sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prediction {
    Epsilon,
    V,
    Sample,
}

// ---- Linspaces and spacings

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU
/// kernel computes it element by element (its vectorized path can differ by
/// one unit in the last place on some entries).
pub(super) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { s + step * i as f32 } else { e - step * (steps - i - 1) as f32 }).collect()
}

/// `np.linspace(start, stop, n)` (float64).
pub(super) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(n, 0, -n / steps)` (float64), as numpy computes its length and values.
pub(super) fn trailing(n: usize, steps: usize) -> Vec<f64> {
    let start = n as f64;
    let step = -(n as f64 / steps as f64);
    let len = ((0.0 - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64.
pub(super) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

// ---- Betas and alphas_cumprod

/// `beta_schedule` linear: `torch.linspace(beta_start, beta_end, n)`.
pub(super) fn linear_betas(beta_start: f64, beta_end: f64, n: usize) -> Vec<f32> {
    torch_linspace_f32(beta_start, beta_end, n)
}

/// `beta_schedule` scaled_linear: `torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n) ** 2`.
pub(super) fn scaled_linear_betas(beta_start: f64, beta_end: f64, n: usize) -> Vec<f32> {
    torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
}

/// DDPM's `beta_schedule` sigmoid: `torch.sigmoid(torch.linspace(-6, 6, n))`
/// scaled to `[beta_start, beta_end]`.
pub(super) fn sigmoid_betas(beta_start: f64, beta_end: f64, n: usize) -> Vec<f32> {
    torch_linspace_f32(-6.0, 6.0, n)
        .into_iter()
        .map(|x| 1.0 / (1.0 + (-x).exp()) * (beta_end - beta_start) as f32 + beta_start as f32)
        .collect()
}

/// diffusers' cosine `alpha_bar_fn`.
pub(super) fn cosine_alpha_bar(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2)
}

/// diffusers' laplace `alpha_bar_fn`.
pub(super) fn laplace_alpha_bar(t: f64) -> f64 {
    let lmb = -0.5 * 1f64.copysign(0.5 - t) * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
    let snr = lmb.exp();
    (snr / (1.0 + snr)).sqrt()
}

/// diffusers' `betas_for_alpha_bar`, max_beta 0.999, in float64 then float32.
pub(super) fn betas_for_alpha_bar(n: usize, f: fn(f64) -> f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - f(t2) / f(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(1 - betas)` in float32 (the CPU kernel accumulates in float64).
pub(super) fn cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in float32.
pub(super) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod(betas);
    let mut s: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    let k = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v -= st;
        *v *= k;
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut alphas = vec![bar[0]];
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

// ---- Sigma schedules

/// diffusers' `_convert_to_karras`: `n` sigmas from `hi` down to `lo`, rho = 7.
pub(super) fn karras_sigmas(hi: f64, lo: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let (min_inv, max_inv) = (lo.powf(1.0 / rho), hi.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// diffusers' `_convert_to_exponential`: `n` sigmas log-linear from `hi` down to `lo`.
pub(super) fn exponential_sigmas(hi: f64, lo: f64, n: usize) -> Vec<f64> {
    np_linspace(hi.ln(), lo.ln(), n).into_iter().map(f64::exp).collect()
}

/// diffusers' `_convert_to_beta`: `lo + ppf * (hi - lo)` for
/// `ppf = scipy.stats.beta.ppf(1 - linspace(0, 1, n), 0.6, 0.6)`.
pub(super) fn beta_sigmas(hi: f64, lo: f64, n: usize) -> Vec<f64> {
    np_linspace(0.0, 1.0, n).into_iter().map(|t| lo + beta_ppf(1.0 - t, 0.6, 0.6) * (hi - lo)).collect()
}

/// `ln Γ(x)` for x > 0 (Lanczos, g = 7, 9 terms; about 1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized incomplete beta function `I_x(a, b)` (continued fraction,
/// modified Lentz).
fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    let cf = |a: f64, b: f64, x: f64| {
        let tiny = 1e-300;
        let mut c = 1.0;
        let mut d = 1.0 - (a + b) * x / (a + 1.0);
        d = 1.0 / if d.abs() < tiny { tiny } else { d };
        let mut h = d;
        for m in 1..500 {
            let m = m as f64;
            for num in [
                m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
                -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
            ] {
                d = 1.0 + num * d;
                d = 1.0 / if d.abs() < tiny { tiny } else { d };
                c = 1.0 + num / c;
                if c.abs() < tiny {
                    c = tiny;
                }
                h *= d * c;
            }
            if (d * c - 1.0).abs() < 1e-16 {
                break;
            }
        }
        h
    };
    if x < (a + 1.0) / (a + b + 2.0) {
        front * cf(a, b, x) / a
    } else {
        1.0 - front * cf(b, a, 1.0 - x) / b
    }
}

/// The Beta(a, b) quantile function (`scipy.stats.beta.ppf`), by bisection.
fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_inc(a, b, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of a sigma,
/// interpolated in log-sigma (`log_sigmas` float32, ascending).
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    // `cumsum(dists >= 0).argmax()`: the last index at or below, else 0.
    let low = log_sigmas.iter().rposition(|&l| ls - l as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - ls) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

// ---- Tensor arithmetic in float32

pub(super) fn f32_tensor(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// `t * c` with a float32 scalar.
pub(super) fn mul(t: &Tensor, c: f32) -> candle_core::Result<Tensor> {
    t.affine(c as f64, 0.0)
}

/// `t / c` as torch divides by a float32 scalar (not by its reciprocal).
pub(super) fn div(t: &Tensor, c: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(c, t.device())?)
}

/// `sqrt(ac[t]) * original + sqrt(1 - ac[t]) * noise`: diffusers'
/// `add_noise` of the schedulers that index `alphas_cumprod` by timestep
/// (PNDM, DDIM, DDPM), in float32, returned in `original`'s dtype.
pub(super) fn add_noise_alphas(ac: &[f32], t: f64, original: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
    let a = ac[t as usize];
    let out = (mul(&f32_tensor(original)?, a.sqrt())? + mul(&f32_tensor(noise)?, (1.0 - a).sqrt())?)?;
    out.to_dtype(original.dtype())
}

// ---- The predicted clean sample

/// How a step's sample mixes the clean sample `x0` and the noise `eps`, as
/// the formulas for the predicted clean sample read it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mix {
    /// `x = alpha * x0 + sigma * eps`: DDIM and DDPM (`alpha = sqrt(alphas_cumprod[t])`,
    /// `sigma = sqrt(1 - alphas_cumprod[t])`), UniPC (`alpha_t`, `sigma_t`).
    Scaled { alpha: f32, sigma: f32 },
    /// `x = x0 + sigma * eps`: the Euler schedulers' unscaled sample.
    Sigma(f32),
}

/// What bounds a predicted clean sample: dynamic `thresholding`
/// (`dynamic_thresholding_ratio`, `sample_max_value`), which wins, else
/// `clip_sample` (the `clip_sample_range`), else nothing.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Bound {
    pub(super) threshold: Option<(f32, f32)>,
    pub(super) clip: Option<f32>,
}

/// The clean sample the model's output predicts (diffusers'
/// `pred_original_sample`, UniPC's data prediction), thresholded or clipped
/// as `bound` says. Every scheduler that steps from the clean sample (DDIM,
/// DDPM, Euler, Euler ancestral, UniPC) computes it here, with diffusers'
/// order of float32 operations for its mix.
pub(super) fn predicted_original(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    mix: Mix,
    bound: Bound,
) -> candle_core::Result<Tensor> {
    let (mo, x) = (model_output, sample);
    let x0 = match (prediction, mix) {
        (Prediction::Sample, _) => mo.clone(),
        (Prediction::Epsilon, Mix::Scaled { alpha, sigma }) => div(&(x - mul(mo, sigma)?)?, alpha)?,
        (Prediction::V, Mix::Scaled { alpha, sigma }) => (mul(x, alpha)? - mul(mo, sigma)?)?,
        (Prediction::Epsilon, Mix::Sigma(sigma)) => (x - mul(mo, sigma)?)?,
        (Prediction::V, Mix::Sigma(sigma)) => {
            (mul(mo, -sigma / (sigma * sigma + 1.0).sqrt())? + div(x, sigma * sigma + 1.0)?)?
        }
    };
    match (bound.threshold, bound.clip) {
        (Some((ratio, max)), _) => threshold(&x0, ratio, max),
        (None, Some(r)) => x0.clamp(-r, r),
        (None, None) => Ok(x0),
    }
}

/// The noise the model's output predicts, for `x = alpha * x0 + sigma * eps`
/// (DDIM's `pred_epsilon`, UniPC's noise prediction, PNDM's v to epsilon).
pub(super) fn predicted_noise(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f32,
    sigma: f32,
) -> candle_core::Result<Tensor> {
    let (mo, x) = (model_output, sample);
    match prediction {
        Prediction::Epsilon => Ok(mo.clone()),
        Prediction::Sample => div(&(x - mul(mo, alpha)?)?, sigma),
        Prediction::V => mul(mo, alpha)? + mul(x, sigma)?,
    }
}

/// diffusers' `_threshold_sample` (dynamic thresholding): per batch item,
/// `s` is the `ratio` quantile of the absolute values (torch's linear
/// quantile), clamped to `[1, max]`; the sample is clamped to `[-s, s]` and
/// divided by `s`.
fn threshold(x: &Tensor, ratio: f32, max: f32) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let flat = x.reshape((dims[0], ()))?;
    let s: Vec<f32> = flat
        .abs()?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|mut row| {
            row.sort_by(f32::total_cmp);
            // torch.quantile: rank in float32, then lerp between neighbours.
            let rank = ratio * (row.len() - 1) as f32;
            let (below, above) = (row[rank as usize], row[rank.ceil() as usize]);
            let w = rank - rank.floor();
            let q = if w < 0.5 { below + w * (above - below) } else { above - (above - below) * (1.0 - w) };
            // torch.clamp(min=1, max=max): the upper bound wins when max < 1.
            q.max(1.0).min(max)
        })
        .collect();
    let s = Tensor::from_vec(s, (dims[0], 1), x.device())?;
    flat.broadcast_maximum(&s.neg()?)?.broadcast_minimum(&s)?.broadcast_div(&s)?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_quantiles_match_scipy() {
        // scipy.stats.beta.ppf(p, 0.6, 0.6) and the symmetric identity.
        for (p, want) in [(0.5, 0.5), (0.1, 0.039_584_405_588_780_85), (0.9, 0.960_415_594_411_219_2)] {
            let got = beta_ppf(p, 0.6, 0.6);
            assert!((got - want).abs() < 1e-9, "ppf({p}) = {got}, scipy {want}");
        }
        for p in [0.01, 0.2, 0.37, 0.73] {
            assert!((beta_ppf(p, 0.6, 0.6) + beta_ppf(1.0 - p, 0.6, 0.6) - 1.0).abs() < 1e-12);
        }
        assert!((ln_gamma(0.6) - 0.398_233_858_069_234_9).abs() < 1e-13);
    }
}
