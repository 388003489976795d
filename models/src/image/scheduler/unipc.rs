//! `UniPCMultistepScheduler`: the UniP predictor and UniC corrector
//! (unified predictor-corrector), bh1 or bh2, orders 1 to 3, on data (x0)
//! or noise prediction. A multistep solver: each step corrects the previous
//! one with the new model output, then predicts from the outputs of up to
//! `solver_order` steps.

use std::collections::BTreeSet;

use candle_core::{Shape, Tensor};

use super::numerics::{
    div, f32_tensor, interp, mul, np_linspace, predicted_noise, predicted_original, sigma_to_t, trailing, Bound, Mix,
    Prediction,
};
use super::{Scheduler, SchedulerSpec, SigmaSchedule, Spacing};

pub(super) struct UniPc {
    timesteps: Vec<f64>,
    bound: Bound,
    sigmas: Vec<f32>,
    prediction: Prediction,
    order: usize,
    bh2: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: BTreeSet<usize>,
    model_outputs: Vec<Option<Tensor>>,
    last_sample: Option<Tensor>,
    lower_order_nums: usize,
    this_order: usize,
}

/// `(alpha_t, sigma_t)` of a sigma: `1 / sqrt(sigma^2 + 1)`, `sigma * alpha_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// Solves `m x = b` (Gaussian elimination with partial pivoting, in float64).
fn solve(mut m: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs())).unwrap_or(c);
        m.swap(c, p);
        b.swap(c, p);
        let pivot = m[c].clone();
        for r in c + 1..n {
            let f = m[r][c] / pivot[c];
            for (v, p) in m[r].iter_mut().zip(&pivot).skip(c) {
                *v -= f * p;
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| m[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / m[r][r];
    }
    x
}

/// The pieces the predictor and corrector share: `h`, `hh`, `h_phi_1`,
/// `B_h`, the `rks` and `b` vectors of order `order`.
struct Coeffs {
    h_phi_1: f32,
    b_h: f32,
    rks: Vec<f32>,
    b: Vec<f32>,
}

impl UniPc {
    pub(super) fn new(spec: &SchedulerSpec, steps: usize) -> UniPc {
        let n = spec.num_train;
        let ts: Vec<f64> = match spec.spacing {
            Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps + 1)
                .into_iter()
                .rev()
                .take(steps)
                .map(|t| t.round_ties_even())
                .collect(),
            Spacing::Leading => {
                let ratio = n / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio + spec.steps_offset) as f64).collect()
            }
            Spacing::Trailing => trailing(n, steps).into_iter().map(|t| t.round_ties_even() - 1.0).collect(),
        };
        let train = spec.train_sigmas();
        let (ts, sigmas) = if spec.sigma_schedule == SigmaSchedule::Default {
            let mut sigmas: Vec<f32> = ts.iter().map(|&t| interp(t, &train) as f32).collect();
            sigmas.push(if spec.final_sigma_min { train[0] } else { 0.0 });
            (ts, sigmas)
        } else {
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let converted = spec.convert_sigmas(train[n - 1] as f64, train[0] as f64, steps);
            // Karras timesteps are rounded, exponential ones truncated (`.to(torch.int64)`).
            let ts: Vec<f64> = converted
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if spec.sigma_schedule == SigmaSchedule::Karras { t.round_ties_even() } else { t.trunc() }
                })
                .collect();
            let last = if spec.final_sigma_min { converted[steps - 1] } else { 0.0 };
            let sigmas: Vec<f32> = converted.iter().chain([&last]).map(|&s| s as f32).collect();
            (ts, sigmas)
        };
        UniPc {
            timesteps: ts,
            bound: Bound { threshold: spec.threshold, clip: None },
            sigmas,
            prediction: spec.prediction,
            order: spec.solver_order,
            bh2: spec.bh2,
            predict_x0: spec.predict_x0,
            lower_order_final: spec.lower_order_final,
            disable_corrector: spec.disable_corrector.iter().copied().collect(),
            model_outputs: vec![None; spec.solver_order],
            last_sample: None,
            lower_order_nums: 0,
            this_order: 0,
        }
    }

    /// `t`: index of the target sigma, `s0`: index of the base sigma, the
    /// earlier sigmas at `s0 - 1`, `s0 - 2`, ... (the predictor passes
    /// `(i + 1, i)`, the corrector `(i, i - 1)`).
    fn coeffs(&self, t: usize, s0: usize, order: usize) -> Coeffs {
        let lambda_t = lambda(self.sigmas[t]);
        let lambda_s0 = lambda(self.sigmas[s0]);
        let h = lambda_t - lambda_s0;
        let mut rks: Vec<f32> = (1..order).map(|k| (lambda(self.sigmas[s0 - k]) - lambda_s0) / h).collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1f32;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coeffs { h_phi_1, b_h, rks, b }
    }

    /// `R`: row i (0-based) holds `rks ^ i`, float32 like `torch.pow`.
    fn r_matrix(rks: &[f32], n: usize) -> Vec<Vec<f64>> {
        (0..n).map(|i| (0..n).map(|k| rks[k].powi(i as i32) as f64).collect()).collect()
    }

    /// diffusers' `convert_model_output`: the predicted clean sample (data
    /// prediction, thresholded) or the predicted noise.
    fn convert(&self, mo: &Tensor, x: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        if self.predict_x0 {
            predicted_original(self.prediction, mo, x, Mix::Scaled { alpha: a, sigma: s }, self.bound)
        } else {
            predicted_noise(self.prediction, mo, x, a, s)
        }
    }

    /// `x_t_` of both updates: `sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0`
    /// (data prediction) or `alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0`,
    /// with the factor the residual is multiplied by.
    fn base(&self, t: usize, s0: usize, x: &Tensor, m0: &Tensor, c: &Coeffs) -> candle_core::Result<(Tensor, f32)> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        if self.predict_x0 {
            Ok(((mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * c.h_phi_1)?)?, alpha_t * c.b_h))
        } else {
            Ok(((mul(x, alpha_t / alpha_s0)? - mul(m0, sigma_t * c.h_phi_1)?)?, sigma_t * c.b_h))
        }
    }

    fn output(&self, back: usize) -> &Tensor {
        self.model_outputs[self.model_outputs.len() - back].as_ref().expect("UniPC history filled by the warm-up")
    }

    fn predictor(&self, x: &Tensor, i: usize, order: usize) -> candle_core::Result<Tensor> {
        let c = self.coeffs(i + 1, i, order);
        let m0 = self.output(1);
        let (base, factor) = self.base(i + 1, i, x, m0, &c)?;
        if order == 1 {
            return Ok(base);
        }
        let rhos: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            let r = Self::r_matrix(&c.rks, order - 1);
            solve(r, c.b[..order - 1].iter().map(|&v| v as f64).collect()).into_iter().map(|v| v as f32).collect()
        };
        let mut res: Option<Tensor> = None;
        for k in 1..order {
            let d = div(&(self.output(k + 1) - m0)?, c.rks[k - 1])?;
            let term = mul(&d, rhos[k - 1])?;
            res = Some(match res {
                None => term,
                Some(r) => (r + term)?,
            });
        }
        let res = res.expect("order >= 2");
        base - mul(&res, factor)?
    }

    fn corrector(&self, model_t: &Tensor, last: &Tensor, i: usize, order: usize) -> candle_core::Result<Tensor> {
        let c = self.coeffs(i, i - 1, order);
        let m0 = self.output(1);
        let (base, factor) = self.base(i, i - 1, last, m0, &c)?;
        let rhos: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            let r = Self::r_matrix(&c.rks, order);
            solve(r, c.b.iter().map(|&v| v as f64).collect()).into_iter().map(|v| v as f32).collect()
        };
        let d1_t = (model_t - m0)?;
        let mut res = mul(&d1_t, rhos[order - 1])?;
        if order > 1 {
            let mut corr: Option<Tensor> = None;
            for k in 1..order {
                let d = div(&(self.output(k + 1) - m0)?, c.rks[k - 1])?;
                let term = mul(&d, rhos[k - 1])?;
                corr = Some(match corr {
                    None => term,
                    Some(r) => (r + term)?,
                });
            }
            res = (corr.expect("order >= 2") + res)?;
        }
        base - mul(&res, factor)?
    }
}

impl Scheduler for UniPc {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut(&Shape) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let dtype = sample.dtype();
        let mo = f32_tensor(model_output)?;
        let mut x = f32_tensor(sample)?;
        let converted = self.convert(&mo, &x, i)?;
        if i > 0 && !self.disable_corrector.contains(&(i - 1)) {
            if let Some(last) = self.last_sample.take() {
                x = self.corrector(&converted, &last, i, self.this_order)?;
            }
        }
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let order = if self.lower_order_final { self.order.min(self.timesteps.len() - i) } else { self.order };
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(x.clone());
        let out = self.predictor(&x, i, self.this_order)?;
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        out.to_dtype(dtype)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        let out = (mul(&f32_tensor(original)?, a)? + mul(&f32_tensor(noise)?, s)?)?;
        out.to_dtype(original.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{matches_diffusers_fixtures, sigmas_match_diffusers_fixtures};
    use super::super::Class;
    use super::*;

    #[test]
    fn matches_diffusers() {
        matches_diffusers_fixtures(&[Class::UniPc]);
    }

    #[test]
    fn sigmas_match_diffusers() {
        sigmas_match_diffusers_fixtures(
            &["sd15-unipc", "unipc-noise-pred", "unipc-karras", "unipc-exponential", "unipc-beta"],
            &[Class::UniPc],
            |spec, steps| UniPc::new(spec, steps).sigmas,
        );
    }
}
