//! Setting a scheduler for a number of steps, diffusers' `set_timesteps`:
//! [`SchedulerSpec::build`] refuses the step counts a class cannot run and
//! builds the class's scheduler; the timesteps and sigmas several schedulers
//! share are computed here from the spec.
//!
//! It sits apart from the spec's module (`mod.rs`) so that imports go one
//! way: this module uses the schedulers, they use the spec and `numerics`,
//! and the spec uses only `numerics`.

use super::ddim::Ddim;
use super::ddpm::Ddpm;
use super::euler::Euler;
use super::numerics::{beta_sigmas, exponential_sigmas, karras_sigmas, np_linspace, trailing};
use super::pndm::Pndm;
use super::unipc::UniPc;
use super::{Class, Scheduler, SchedulerSpec, SigmaSchedule, Spacing, StepsError};

impl SchedulerSpec {
    /// A scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    pub fn build(&self, steps: usize) -> Result<Box<dyn Scheduler>, StepsError> {
        let num_train = self.num_train;
        if steps == 0 {
            return Err(StepsError::Zero);
        }
        if matches!(self.class, Class::Ddim | Class::Ddpm) && steps > num_train {
            return Err(StepsError::MoreThanTrained { steps, num_train, class: self.class.name() });
        }
        if self.class == Class::Pndm && !self.skip_prk && steps < 4 {
            return Err(StepsError::TooFewForWarmUp { steps });
        }
        if self.spacing == Spacing::Leading && num_train / steps == 0 {
            return Err(StepsError::LeadingSpacing { steps, num_train });
        }
        let s: Box<dyn Scheduler> = match self.class {
            Class::Pndm => Box::new(Pndm::new(self, steps)),
            Class::Ddim => Box::new(Ddim::new(self, steps)),
            Class::Ddpm => Box::new(Ddpm::new(self, steps)),
            Class::Euler | Class::EulerAncestral => Box::new(Euler::new(self, steps)),
            Class::UniPc => Box::new(UniPc::new(self, steps)),
        };
        // PNDM, DDIM and DDPM index `alphas_cumprod` by timestep (diffusers
        // fails with an IndexError past the end).
        if matches!(self.class, Class::Pndm | Class::Ddim | Class::Ddpm) {
            if let Some(&timestep) = s.timesteps().iter().find(|&&t| t >= num_train as f64) {
                return Err(StepsError::PastTheEnd { steps, steps_offset: self.steps_offset, timestep, num_train });
            }
        }
        Ok(s)
    }

    /// The whole-number timesteps of DDIM and DDPM, descending.
    pub(super) fn integer_timesteps(&self, steps: usize) -> Vec<f64> {
        let n = self.num_train;
        match self.spacing {
            Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t.round_ties_even()).collect(),
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps).rev().map(|i| (i * ratio + self.steps_offset) as f64).collect()
            }
            Spacing::Trailing => trailing(n, steps).into_iter().map(|t| t.round_ties_even() - 1.0).collect(),
        }
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, in float32, by training timestep.
    pub(super) fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }

    /// diffusers' `_convert_to_karras` / `_convert_to_exponential` /
    /// `_convert_to_beta`: `n` sigmas from `sigma_max` (default `hi`) down to
    /// `sigma_min` (default `lo`).
    pub(super) fn convert_sigmas(&self, hi: f64, lo: f64, n: usize) -> Vec<f64> {
        let lo = self.sigma_min.unwrap_or(lo);
        let hi = self.sigma_max.unwrap_or(hi);
        match self.sigma_schedule {
            SigmaSchedule::Karras => karras_sigmas(hi, lo, n),
            SigmaSchedule::Exponential => exponential_sigmas(hi, lo, n),
            SigmaSchedule::Beta => beta_sigmas(hi, lo, n),
            SigmaSchedule::Default => unreachable!("only called for Karras, exponential and beta sigmas"),
        }
    }
}
