//! `DDPMScheduler`: denoising diffusion probabilistic models. Each step
//! predicts the clean sample (clipped or thresholded), takes the posterior
//! mean between it and the sample, and adds noise of the configured
//! variance at every timestep above 0.

use candle_core::{Shape, Tensor};

use super::numerics::{add_noise_alphas, f32_tensor, mul, predicted_original, Bound, Mix, Prediction};
use super::{Scheduler, SchedulerSpec, Variance};

pub(super) struct Ddpm {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    bound: Bound,
    variance: Variance,
}

impl Ddpm {
    pub(super) fn new(spec: &SchedulerSpec, steps: usize) -> Ddpm {
        Ddpm {
            timesteps: spec.integer_timesteps(steps),
            alphas_cumprod: spec.alphas_cumprod.clone(),
            prediction: spec.prediction,
            bound: Bound { threshold: spec.threshold, clip: spec.clip },
            variance: spec.variance,
        }
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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
        let t = self.timesteps[i] as i64;
        let prev = self.timesteps.get(i + 1).map(|&p| p as i64).unwrap_or(-1);
        let a = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { 1.0 };
        let b = 1.0 - a;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let mix = Mix::Scaled { alpha: a.sqrt(), sigma: b.sqrt() };
        let x0 = predicted_original(self.prediction, &mo, &x, mix, self.bound)?;
        let x0_coeff = (a_prev.sqrt() * cur_beta) / b;
        let cur_coeff = cur_alpha.sqrt() * b_prev / b;
        let mut out = (mul(&x0, x0_coeff)? + mul(&x, cur_coeff)?)?;
        if t > 0 {
            let z = f32_tensor(&noise(mo.shape())?)?;
            let var = ((1.0 - a_prev) / (1.0 - a) * cur_beta).max(1e-20);
            let scale = match self.variance {
                Variance::Small => var.sqrt(),
                Variance::SmallLog => (0.5 * var.ln()).exp(),
                Variance::Large => cur_beta.sqrt(),
            };
            out = (out + mul(&z, scale)?)?;
        }
        out.to_dtype(dtype)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        add_noise_alphas(&self.alphas_cumprod, self.timesteps[i], original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::matches_diffusers_fixtures;
    use super::super::Class;

    #[test]
    fn matches_diffusers() {
        matches_diffusers_fixtures(&[Class::Ddpm]);
    }
}
