//! `DDIMScheduler`: denoising diffusion implicit models, SD 2.1's default.
//! Each step predicts the clean sample (clipped or thresholded) and the
//! noise, and moves to the previous timestep along them; with the pipeline
//! call's `eta` above 0 it also adds fresh noise.

use candle_core::{Shape, Tensor};

use super::numerics::{add_noise_alphas, f32_tensor, mul, predicted_noise, predicted_original, Bound, Mix, Prediction};
use super::{Scheduler, SchedulerSpec};

pub(super) struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    bound: Bound,
    ratio: i64,
    eta: f64,
}

impl Ddim {
    pub(super) fn new(spec: &SchedulerSpec, steps: usize) -> Ddim {
        Ddim {
            timesteps: spec.integer_timesteps(steps),
            alphas_cumprod: spec.alphas_cumprod.clone(),
            final_alpha_cumprod: if spec.set_alpha_to_one { 1.0 } else { spec.alphas_cumprod[0] },
            prediction: spec.prediction,
            bound: Bound { threshold: spec.threshold, clip: spec.clip },
            ratio: (spec.num_train / steps) as i64,
            eta: spec.eta,
        }
    }
}

impl Scheduler for Ddim {
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
        let prev = t - self.ratio;
        let a = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let b = 1.0 - a;
        let (alpha, sigma) = (a.sqrt(), b.sqrt());
        let eps = predicted_noise(self.prediction, &mo, &x, alpha, sigma)?;
        let x0 = predicted_original(self.prediction, &mo, &x, Mix::Scaled { alpha, sigma }, self.bound)?;
        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b) * (1.0 - a / a_prev);
        let std = (self.eta as f32) * variance.sqrt();
        let direction = mul(&eps, (1.0 - a_prev - std * std).sqrt())?;
        let mut out = (mul(&x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = f32_tensor(&noise(mo.shape())?)?;
            out = (out + mul(&z, std)?)?;
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
        matches_diffusers_fixtures(&[Class::Ddim]);
    }
}
