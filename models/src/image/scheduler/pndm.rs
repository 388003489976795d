//! `PNDMScheduler`: pseudo numerical methods for diffusion models. Runge-Kutta
//! (PRK) warm-up steps unless `skip_prk_steps` (SD 1.5's config skips them),
//! then linear multistep (PLMS) steps over the model outputs of up to the
//! four previous steps. The model's output is taken as noise (v-prediction
//! is converted to it), never as a clean sample.

use candle_core::{Shape, Tensor};

use super::numerics::{add_noise_alphas, div, f32_tensor, mul, np_linspace, predicted_noise, trailing, Prediction};
use super::{Scheduler, SchedulerSpec, Spacing};

pub(super) struct Pndm {
    timesteps: Vec<f64>,
    /// How many of the timesteps are Runge-Kutta ones (0 with `skip_prk_steps`).
    prk: usize,
    /// `num_train_timesteps // steps // 2`: the Runge-Kutta half step.
    half: i64,
    /// The Runge-Kutta weighted sum of model outputs (`cur_model_output`).
    cur_model_output: Option<Tensor>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    ratio: i64,
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub(super) fn new(spec: &SchedulerSpec, steps: usize) -> Pndm {
        let n = spec.num_train;
        // `_timesteps`, ascending.
        let base: Vec<f64> = match spec.spacing {
            Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps).into_iter().map(|t| t.round_ties_even()).collect(),
            Spacing::Leading => (0..steps).map(|i| (i * (n / steps) + spec.steps_offset) as f64).collect(),
            Spacing::Trailing => trailing(n, steps).into_iter().rev().map(|t| t.round_ties_even() - 1.0).collect(),
        };
        let k = base.len();
        let half = (n / steps / 2) as f64;
        let (timesteps, prk) = if spec.skip_prk {
            let mut plms: Vec<f64> = base[..k - 1].to_vec();
            if k >= 2 {
                plms.push(base[k - 2]);
            }
            plms.push(base[k - 1]);
            plms.reverse();
            (plms, 0)
        } else {
            // `_timesteps[-4:].repeat(2) + tile([0, half], 4)`, then
            // `[:-1].repeat(2)[1:-1][::-1]`, then the PLMS `_timesteps[:-3][::-1]`.
            let pairs: Vec<f64> = base[k - 4..].iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<f64> = pairs[..7].iter().flat_map(|&t| [t, t]).collect();
            let mut ts: Vec<f64> = doubled[1..13].iter().rev().copied().collect();
            ts.extend(base[..k - 3].iter().rev());
            (ts, 12)
        };
        Pndm {
            timesteps,
            prk,
            half: half as i64,
            cur_model_output: None,
            final_alpha_cumprod: if spec.set_alpha_to_one { 1.0 } else { spec.alphas_cumprod[0] },
            alphas_cumprod: spec.alphas_cumprod.clone(),
            prediction: spec.prediction,
            ratio: (n / steps) as i64,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        }
    }

    /// diffusers' `_get_prev_sample`: from timestep `t` to `prev` (the
    /// final alpha when negative), the model output taken as noise.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev: i64, model_output: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let b = 1.0 - a;
        let b_prev = 1.0 - a_prev;
        let model_output = predicted_noise(self.prediction, model_output, sample, a.sqrt(), b.sqrt())?;
        let sample_coeff = (a_prev / a).sqrt();
        let denom = a * b_prev.sqrt() + (a * b * a_prev).sqrt();
        mul(sample, sample_coeff)? - div(&mul(&model_output, a_prev - a)?, denom)?
    }

    /// diffusers' `step_prk`: one of the four evaluations of a Runge-Kutta step.
    fn step_prk(&mut self, mo: Tensor, i: usize, sample: Tensor) -> candle_core::Result<Tensor> {
        let diff = if self.counter % 2 == 1 { 0 } else { self.half };
        let prev = self.timesteps[i] as i64 - diff;
        let t = self.timesteps[self.counter / 4 * 4] as i64;
        let sixth = mul(&mo, (1.0f64 / 6.0) as f32)?;
        let third = || mul(&mo, (1.0f64 / 3.0) as f32);
        let used = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(sixth);
                self.ets.push(mo.clone());
                self.cur_sample = Some(sample.clone());
                mo
            }
            1 | 2 => {
                let acc = self.cur_model_output.take().expect("set at the group's first step");
                self.cur_model_output = Some((acc + third()?)?);
                mo
            }
            _ => (self.cur_model_output.take().expect("set at the group's first step") + sixth)?,
        };
        let base = self.cur_sample.clone().unwrap_or(sample);
        let out = self.prev_sample(&base, t, prev, &used)?;
        self.counter += 1;
        Ok(out)
    }

    /// diffusers' `step_plms`: a linear multistep step over the stored outputs.
    fn step_plms(&mut self, mo: Tensor, i: usize, mut sample: Tensor) -> candle_core::Result<Tensor> {
        let mut t = self.timesteps[i] as i64;
        let mut prev = t - self.ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(mo.clone());
        } else {
            prev = t;
            t += self.ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let mo = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            mo
        } else if n == 1 && self.counter == 1 {
            if let Some(s) = self.cur_sample.take() {
                sample = s;
            }
            div(&(mo + &e[0])?, 2.0)?
        } else if n == 2 {
            div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if n == 3 {
            div(&((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?, 12.0)?
        } else {
            let s = (((mul(&e[3], 55.0)? - mul(&e[2], 59.0)?)? + mul(&e[1], 37.0)?)? - mul(&e[0], 9.0)?)?;
            mul(&s, (1.0f64 / 24.0) as f32)?
        };
        let out = self.prev_sample(&sample, t, prev, &mo)?;
        self.counter += 1;
        Ok(out)
    }
}

impl Scheduler for Pndm {
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
        let sample = f32_tensor(sample)?;
        let out = if self.counter < self.prk { self.step_prk(mo, i, sample)? } else { self.step_plms(mo, i, sample)? };
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
        matches_diffusers_fixtures(&[Class::Pndm]);
    }
}
