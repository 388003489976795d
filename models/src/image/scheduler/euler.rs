//! `EulerDiscreteScheduler` (SDXL's and SD-Turbo's default; `s_churn` 0, as
//! the pipelines call it) and `EulerAncestralDiscreteScheduler`
//! (SDXL-Turbo's): Euler steps in sigma space on the unscaled sample, the
//! ancestral one splitting each step into a deterministic part and fresh
//! noise. Sigmas come from the training schedule (interpolated, log-linear,
//! Karras, exponential or beta), timesteps are fractional where the
//! schedule puts them between training timesteps.

use candle_core::{Shape, Tensor};

use super::numerics::{
    div, f32_tensor, interp, mul, np_linspace, predicted_original, sigma_to_t, torch_linspace_f32, trailing, Bound, Mix,
    Prediction,
};
use super::{Class, Scheduler, SchedulerSpec, SigmaSchedule, Spacing};

pub(super) struct Euler {
    ancestral: bool,
    timesteps: Vec<f64>,
    /// One more than the timesteps: the last is the final sigma.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: Prediction,
}

impl Euler {
    pub(super) fn new(spec: &SchedulerSpec, steps: usize) -> Euler {
        let n = spec.num_train;
        let ts: Vec<f32> = match spec.spacing {
            Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t as f32).collect(),
            Spacing::Leading => (0..steps).rev().map(|i| (i * (n / steps)) as f32 + spec.steps_offset as f32).collect(),
            Spacing::Trailing => trailing(n, steps).into_iter().map(|t| t.round_ties_even() as f32 - 1.0).collect(),
        };
        let train = spec.train_sigmas();
        let interpolated: Vec<f64> = if spec.log_linear && spec.class == Class::Euler {
            // `torch.linspace(log(sigmas[-1]), log(sigmas[0]), steps + 1).exp()`:
            // one sigma more than timesteps (diffusers' schedule ends on the
            // last of them, then the final sigma is appended after it).
            torch_linspace_f32(train[n - 1].ln() as f64, train[0].ln() as f64, steps + 1)
                .into_iter()
                .map(|l| l.exp() as f64)
                .collect()
        } else {
            ts.iter().map(|&t| interp(t as f64, &train)).collect()
        };
        let (ts, mut sigmas): (Vec<f32>, Vec<f32>) = if spec.sigma_schedule == SigmaSchedule::Default {
            (ts, interpolated.iter().map(|&s| s as f32).collect())
        } else {
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let last = interpolated[interpolated.len() - 1];
            let converted = spec.convert_sigmas(interpolated[0], last, steps);
            (
                converted.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect(),
                converted.iter().map(|&s| s as f32).collect(),
            )
        };
        let ancestral = spec.class == Class::EulerAncestral;
        sigmas.push(if !ancestral && spec.final_sigma_min { train[0] } else { 0.0 });
        let timesteps = if !ancestral && spec.continuous_timesteps {
            // `0.25 * log(sigma)` for every sigma but the final one.
            sigmas[..sigmas.len() - 1].iter().map(|s| (0.25 * s.ln()) as f64).collect()
        } else {
            ts.iter().map(|&t| t as f64).collect()
        };
        let max = sigmas.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spec.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        Euler { ancestral, timesteps, sigmas, init_noise_sigma, prediction: spec.prediction }
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let s = self.sigmas[i];
        div(&f32_tensor(sample)?, (s * s + 1.0).sqrt())?.to_dtype(sample.dtype())
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(&Shape) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let dtype = sample.dtype();
        let mo = f32_tensor(model_output)?;
        let x = f32_tensor(sample)?;
        let sigma = self.sigmas[i];
        let x0 = predicted_original(self.prediction, &mo, &x, Mix::Sigma(sigma), Bound::default())?;
        let derivative = div(&(&x - x0)?, sigma)?;
        let next = self.sigmas[i + 1];
        let out = if self.ancestral {
            let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            let down = (next * next - up * up).sqrt();
            let out = (&x + mul(&derivative, down - sigma)?)?;
            let z = f32_tensor(&noise(mo.shape())?)?;
            (out + mul(&z, up)?)?
        } else {
            (&x + mul(&derivative, next - sigma)?)?
        };
        out.to_dtype(dtype)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let out = (f32_tensor(original)? + mul(&f32_tensor(noise)?, self.sigmas[i])?)?;
        out.to_dtype(original.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{matches_diffusers_fixtures, sigmas_match_diffusers_fixtures};
    use super::*;

    #[test]
    fn matches_diffusers() {
        matches_diffusers_fixtures(&[Class::Euler, Class::EulerAncestral]);
    }

    #[test]
    fn sigmas_match_diffusers() {
        sigmas_match_diffusers_fixtures(
            &[
                "sdxl-euler", "sd-turbo-euler", "linspace-euler", "zsnr-euler-trailing", "sdxl-euler-karras",
                "euler-exponential", "euler-log_linear", "euler-log_linear-karras", "euler-beta",
            ],
            &[Class::Euler, Class::EulerAncestral],
            |spec, steps| Euler::new(spec, steps).sigmas,
        );
    }
}
