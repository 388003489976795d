//! The noise schedulers of Stable Diffusion pipelines, as diffusers computes
//! them, configured from the pipeline's `scheduler/scheduler_config.json`:
//!
//! - `pndm` runs `PNDMScheduler` (PLMS, with or without Runge-Kutta warm-up);
//! - `ddim` runs `DDIMScheduler`;
//! - `ddpm` runs `DDPMScheduler`;
//! - `euler` runs `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`;
//! - `unipc` runs `UniPCMultistepScheduler`;
//! - `numerics` is what they share, computed as torch and numpy compute it
//!   (linspaces, beta schedules, `alphas_cumprod`, sigma conversions, the
//!   predicted clean sample and its thresholding);
//! - `timesteps` is [`SchedulerSpec::build`] (diffusers' `set_timesteps`):
//!   the step counts each class refuses, the scheduler each class builds,
//!   and the timesteps and sigmas several of them share.
//!
//! This module reads the config into a [`SchedulerSpec`], which `build`
//! turns into a [`Scheduler`] for a number of steps. It imports only
//! `numerics`: the scheduler modules import it, and `timesteps` imports
//! them, so no two modules import each other.
//! Every config key the chosen class reads is honoured, or refused with one
//! line naming the file and the key when it asks for something not
//! implemented here. Keys that only other diffusers scheduler classes read
//! are ignored, as diffusers' `from_config` ignores them (configs are shared
//! between classes); a key no diffusers scheduler reads is refused.
//!
//! Precision follows diffusers: betas are float32 (`torch.linspace` in
//! float32), `alphas_cumprod` is float32 (torch's CPU cumprod accumulates in
//! float64 and rounds each entry), sigmas are float32, and the per-step
//! scalars are float32 as diffusers' 0-dim float32 tensors are. Tensor math
//! runs in float32 whatever the sample's dtype (diffusers upcasts in the
//! Euler schedulers, and its half-precision kernels multiply by float32
//! scalars; candle's `affine` would round a coefficient to the tensor's
//! dtype), and each step returns the sample's dtype. The order of float
//! operations is diffusers' own: the fixtures of
//! `tests/fixtures/image/schedulers/` hold it to that.

mod ddim;
mod ddpm;
mod euler;
mod numerics;
mod pndm;
mod timesteps;
mod unipc;

use std::fmt::Display;
use std::path::Path;

use candle_core::{Shape, Tensor};
use serde_json::{Map, Value};

use crate::lm_config::{read_json, ConfigError, Reader};
use numerics::{
    betas_for_alpha_bar, cosine_alpha_bar, cumprod, laplace_alpha_bar, linear_betas, rescale_zero_terminal_snr,
    scaled_linear_betas, sigmoid_betas, Prediction,
};

/// The classes this module runs, as `from_file` and errors list them.
pub const SUPPORTED: &str = "PNDMScheduler (pndm), DDIMScheduler (ddim), EulerDiscreteScheduler (euler), \
EulerAncestralDiscreteScheduler (euler_ancestral, euler_a), DDPMScheduler (ddpm), UniPCMultistepScheduler (unipc)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Pndm,
    Ddim,
    Euler,
    EulerAncestral,
    Ddpm,
    UniPc,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Pndm => "PNDMScheduler",
            Class::Ddim => "DDIMScheduler",
            Class::Euler => "EulerDiscreteScheduler",
            Class::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Class::Ddpm => "DDPMScheduler",
            Class::UniPc => "UniPCMultistepScheduler",
        }
    }

    fn parse(s: &str) -> Option<Class> {
        Some(match s {
            "PNDMScheduler" | "pndm" => Class::Pndm,
            "DDIMScheduler" | "ddim" => Class::Ddim,
            "EulerDiscreteScheduler" | "euler" => Class::Euler,
            "EulerAncestralDiscreteScheduler" | "euler_ancestral" | "euler_a" => Class::EulerAncestral,
            "DDPMScheduler" | "ddpm" => Class::Ddpm,
            "UniPCMultistepScheduler" | "unipc" => Class::UniPc,
            _ => return None,
        })
    }

    /// The arguments of the class's `__init__` (diffusers 0.42): the keys it reads.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Class::Pndm => &[
                "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "skip_prk_steps",
                "set_alpha_to_one", "prediction_type", "timestep_spacing", "steps_offset",
            ],
            Class::Ddim => &[
                "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
                "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
                "clip_sample_range", "sample_max_value", "timestep_spacing", "rescale_betas_zero_snr",
            ],
            Class::Euler => &[
                "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "interpolation_type", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min",
                "sigma_max", "timestep_spacing", "timestep_type", "steps_offset", "rescale_betas_zero_snr",
                "final_sigmas_type",
            ],
            Class::EulerAncestral => &[
                "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
            ],
            Class::Ddpm => &[
                "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type",
                "clip_sample", "prediction_type", "thresholding", "dynamic_thresholding_ratio", "clip_sample_range",
                "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
            ],
            Class::UniPc => &[
                "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "solver_order",
                "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "predict_x0",
                "solver_type", "lower_order_final", "disable_corrector", "solver_p", "use_karras_sigmas",
                "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "flow_shift", "timestep_spacing",
                "steps_offset", "final_sigmas_type", "rescale_betas_zero_snr", "use_dynamic_shifting",
                "time_shift_type", "sigma_min", "sigma_max", "shift_terminal",
            ],
        }
    }

    fn takes(self, key: &str) -> bool {
        self.keys().contains(&key)
    }
}

/// The config keys of every diffusers scheduler class (the `__init__`
/// arguments of the 47 scheduler classes of diffusers 0.42): diffusers'
/// `from_config` ignores those the chosen class does not take, and so does
/// Mora. A key outside this list is refused.
const DIFFUSERS_SCHEDULER_KEYS: &[&str] = &[
    "algorithm_type", "alpha_cum_end", "alpha_cum_start", "base_image_seq_len", "base_shift", "beta_end",
    "beta_schedule", "beta_start", "block_length", "clip_denoised", "clip_sample", "clip_sample_range",
    "correct_steps", "corrector_k", "corrector_order", "corrector_selection", "corrector_selection_tau",
    "corrector_steps", "disable_corrector", "dynamic_thresholding_ratio", "editing_threshold", "entropy_bound",
    "eps", "eta", "euler_at_final", "final_sigmas_type", "final_step_size_scale", "flow_shift", "gamma",
    "gamma_cum_end", "gamma_cum_start", "interpolation_type", "invert_sigmas", "lambda_min_clipped",
    "lower_order_final", "mask_token_id", "masking_schedule", "max_image_seq_len", "max_shift", "minimal_topk",
    "n_grid", "noise_mode", "num_inference_steps", "num_policy_substeps", "num_train_timesteps", "num_vec_classes",
    "original_inference_steps", "predict_x0", "prediction_type", "predictor_order", "rescale_betas_zero_snr", "rho",
    "s", "s_churn", "s_max", "s_min", "s_noise", "sample_max_value", "sampling_eps", "scale_factors", "scaler",
    "schedule_mode", "scheduler_type", "set_alpha_to_one", "shift", "shift_terminal", "sigma_data", "sigma_max",
    "sigma_min", "sigma_schedule", "skip_prk_steps", "snr", "snr_shift_scale", "solver_order", "solver_p",
    "solver_type", "stage_range", "stages", "steps_offset", "stochastic_sampling", "t_lim_ode", "t_lim_ode_below",
    "t_max", "t_min", "tail_step_multiplier", "tail_steps", "tau_func", "threshold", "thresholding",
    "time_shift_type", "timestep_scaling", "timestep_spacing", "timestep_type", "trained_betas", "tsr_k",
    "tsr_sigma", "upscale_mode", "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas",
    "use_flow_sigmas", "use_karras_sigmas", "use_lu_lambdas", "variance_type",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigmaSchedule {
    Default,
    /// Karras et al.'s rho = 7 schedule between the ends.
    Karras,
    /// Log-linear between the ends.
    Exponential,
    /// Spaced by the quantiles of a Beta(0.6, 0.6) distribution.
    Beta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    /// `fixed_small`
    Small,
    /// `fixed_small_log`
    SmallLog,
    /// `fixed_large`
    Large,
}

/// A scheduler class and what its config says, ready to [`build`](SchedulerSpec::build)
/// schedulers for any number of steps.
#[derive(Debug, Clone)]
pub struct SchedulerSpec {
    class: Class,
    num_train: usize,
    /// After `rescale_betas_zero_snr` (and the Euler and UniPC 2^-24 floor).
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    spacing: Spacing,
    steps_offset: usize,
    set_alpha_to_one: bool,
    /// PNDM: PLMS steps only, no Runge-Kutta warm-up.
    skip_prk: bool,
    /// `clip_sample_range` when `clip_sample` is true.
    clip: Option<f32>,
    /// `thresholding`: (`dynamic_thresholding_ratio`, `sample_max_value`).
    threshold: Option<(f32, f32)>,
    final_sigma_min: bool,
    /// Euler's `interpolation_type` log_linear.
    log_linear: bool,
    /// `use_karras_sigmas` / `use_exponential_sigmas` (Euler, UniPC).
    sigma_schedule: SigmaSchedule,
    /// `sigma_min`, `sigma_max`: the ends of those schedules, when set.
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    continuous_timesteps: bool,
    variance: Variance,
    solver_order: usize,
    bh2: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    eta: f64,
}

/// A number of inference steps a scheduler cannot run (diffusers fails
/// with an error, or an IndexError, on each of these).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepsError {
    #[error("the number of inference steps must be at least 1")]
    Zero,
    /// DDIM and DDPM take their timesteps among the training ones.
    #[error("{steps} steps is more than the {num_train} training timesteps {class} can run")]
    MoreThanTrained { steps: usize, num_train: usize, class: &'static str },
    #[error("PNDMScheduler with skip_prk_steps false needs at least 4 steps (its Runge-Kutta warm-up spans the last four), not {steps}")]
    TooFewForWarmUp { steps: usize },
    /// Leading spacing spaces the steps `num_train / steps` apart.
    #[error("{steps} steps is more than the {num_train} training timesteps")]
    LeadingSpacing { steps: usize, num_train: usize },
    #[error("{steps} steps with steps_offset {steps_offset} reach timestep {timestep}, past the {num_train} training timesteps")]
    PastTheEnd { steps: usize, steps_offset: usize, timestep: f64, num_train: usize },
}

/// The error for a value of `key` that Mora does not run: "`key` = value: why".
fn bad(r: &Reader, key: &str, v: &dyn Display, why: &str) -> ConfigError {
    r.err(format!("`{key}` = {v}: {why}"))
}

/// A string value as errors quote it.
fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

impl SchedulerSpec {
    /// Reads `scheduler_config.json` (`path` names it in errors). `class`
    /// overrides `_class_name` (a workflow's `scheduler = "EulerDiscreteScheduler"`;
    /// the short names "pndm", "ddim", "euler", "euler_ancestral" (alias
    /// "euler_a"), "ddpm", "unipc" are accepted too).
    pub fn from_file(path: &Path, class: Option<&str>) -> Result<SchedulerSpec, ConfigError> {
        let map = read_json(path)?;
        Self::from_json(&map, &path.display().to_string(), class)
    }

    /// As [`from_file`](Self::from_file), on a parsed config; `file` names it in errors.
    ///
    /// Keys are read in a fixed order (the class, the betas, the prediction
    /// and spacing, then the keys shared by several classes, then the
    /// class's own), so a config with several faults is refused for the
    /// same one every time.
    pub fn from_json(map: &Map<String, Value>, file: &str, class: Option<&str>) -> Result<SchedulerSpec, ConfigError> {
        let r = Reader::new(map, file, "");
        let class = read_class(&r, class)?;
        let num_train = r.opt_usize("num_train_timesteps")?.unwrap_or(1000);
        if num_train < 2 {
            return Err(bad(&r, "num_train_timesteps", &num_train, "must be at least 2"));
        }
        let alphas_cumprod = read_alphas_cumprod(&r, class, num_train)?;
        let prediction = read_prediction(&r, class)?;
        let spacing = read_spacing(&r, class)?;
        let steps_offset = r.opt_usize("steps_offset")?.unwrap_or(0);

        let mut spec = SchedulerSpec {
            class,
            num_train,
            alphas_cumprod,
            prediction,
            spacing,
            steps_offset,
            set_alpha_to_one: false,
            skip_prk: true,
            clip: None,
            threshold: None,
            final_sigma_min: false,
            log_linear: false,
            sigma_schedule: SigmaSchedule::Default,
            sigma_min: None,
            sigma_max: None,
            continuous_timesteps: false,
            variance: Variance::Small,
            solver_order: 2,
            bh2: true,
            predict_x0: true,
            lower_order_final: true,
            disable_corrector: Vec::new(),
            eta: 0.0,
        };
        spec.read_shared_keys(&r)?;
        match class {
            Class::Euler => spec.read_euler_keys(&r)?,
            Class::Ddpm => spec.read_ddpm_keys(&r)?,
            Class::UniPc => spec.read_unipc_keys(&r)?,
            _ => {}
        }
        // Keys only other classes read are ignored, as diffusers ignores them.
        for k in map.keys() {
            if !class.takes(k) && DIFFUSERS_SCHEDULER_KEYS.contains(&k.as_str()) {
                r.take(k);
            }
        }
        r.refuse_unread(crate::image::DIFFUSERS_NEUTRAL, &format!("{} configs", class.name()))?;
        Ok(spec)
    }

    /// The keys several classes take: `set_alpha_to_one`, `skip_prk_steps`,
    /// the thresholding and clipping of the predicted clean sample, the sigma
    /// schedule and the final sigma.
    fn read_shared_keys(&mut self, r: &Reader) -> Result<(), ConfigError> {
        let class = self.class;
        if class.takes("set_alpha_to_one") {
            self.set_alpha_to_one = r.bool_or("set_alpha_to_one", class == Class::Ddim)?;
        }
        if class == Class::Pndm {
            self.skip_prk = r.bool_or("skip_prk_steps", false)?;
        }
        if class.takes("thresholding") {
            let on = r.bool_or("thresholding", false)?;
            let ratio = r.opt_f64("dynamic_thresholding_ratio")?.unwrap_or(0.995);
            let max = r.opt_f64("sample_max_value")?.unwrap_or(1.0);
            if on {
                if !(0.0..=1.0).contains(&ratio) {
                    return Err(bad(r, "dynamic_thresholding_ratio", &ratio, "must be between 0 and 1"));
                }
                self.threshold = Some((ratio as f32, max as f32));
            }
        }
        if class.takes("clip_sample") && r.bool_or("clip_sample", true)? {
            self.clip = Some(r.opt_f64("clip_sample_range")?.unwrap_or(1.0) as f32);
        } else if class.takes("clip_sample_range") {
            r.opt_f64("clip_sample_range")?;
        }
        if class.takes("use_karras_sigmas") {
            self.sigma_schedule = read_sigma_schedule(r)?;
            // Used only by the Karras and exponential schedules.
            self.sigma_min = r.opt_f64("sigma_min")?;
            self.sigma_max = r.opt_f64("sigma_max")?;
        }
        if class.takes("final_sigmas_type") {
            self.final_sigma_min = match r.str_or("final_sigmas_type", "zero")?.as_str() {
                "zero" => false,
                "sigma_min" => true,
                other => return Err(bad(r, "final_sigmas_type", &quoted(other), "must be zero or sigma_min")),
            };
        }
        Ok(())
    }

    /// Euler's `interpolation_type` and `timestep_type`.
    fn read_euler_keys(&mut self, r: &Reader) -> Result<(), ConfigError> {
        self.log_linear = match r.str_or("interpolation_type", "linear")?.as_str() {
            "linear" => false,
            "log_linear" => true,
            other => return Err(bad(r, "interpolation_type", &quoted(other), "must be linear or log_linear")),
        };
        self.continuous_timesteps = match r.str_or("timestep_type", "discrete")?.as_str() {
            "discrete" => false,
            // diffusers uses continuous timesteps only with v-prediction.
            "continuous" => self.prediction == Prediction::V,
            other => return Err(bad(r, "timestep_type", &quoted(other), "must be discrete or continuous")),
        };
        Ok(())
    }

    /// DDPM's `variance_type`.
    fn read_ddpm_keys(&mut self, r: &Reader) -> Result<(), ConfigError> {
        self.variance = match r.str_or("variance_type", "fixed_small")?.as_str() {
            "fixed_small" => Variance::Small,
            "fixed_small_log" => Variance::SmallLog,
            "fixed_large" => Variance::Large,
            other => {
                return Err(bad(r, "variance_type", &quoted(other), "Mora runs fixed_small, fixed_small_log and fixed_large"))
            }
        };
        Ok(())
    }

    /// UniPC's solver keys, and the flow-matching keys it refuses.
    fn read_unipc_keys(&mut self, r: &Reader) -> Result<(), ConfigError> {
        self.solver_order = r.opt_usize("solver_order")?.unwrap_or(2);
        if !(1..=3).contains(&self.solver_order) {
            return Err(bad(r, "solver_order", &self.solver_order, "must be 1, 2 or 3"));
        }
        self.bh2 = match r.str_or("solver_type", "bh2")?.as_str() {
            "bh1" => false,
            // diffusers maps the DPM-Solver names to bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            other => return Err(bad(r, "solver_type", &quoted(other), "must be bh1 or bh2")),
        };
        self.predict_x0 = r.bool_or("predict_x0", true)?;
        self.lower_order_final = r.bool_or("lower_order_final", true)?;
        self.disable_corrector = match r.present("disable_corrector") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| r.err("`disable_corrector` must be a list of step indices".into()))?,
            Some(v) => return Err(bad(r, "disable_corrector", v, "must be a list of step indices")),
        };
        // With a zero final sigma, diffusers' last UniPC step computes
        // `-inf * 0` (bh1: B_h = -h) or `0 * inf` (noise prediction:
        // h_phi_1 = e^h - 1), and the image is NaN.
        if !self.final_sigma_min && (!self.bh2 || !self.predict_x0) {
            let key = if self.bh2 { "predict_x0" } else { "solver_type" };
            let value = if self.bh2 { "false".to_string() } else { quoted("bh1") };
            return Err(bad(
                r,
                key,
                &value,
                "diffusers' last step gives NaN with `final_sigmas_type` zero; Mora runs it with final_sigmas_type sigma_min",
            ));
        }
        if let Some(v) = r.present("solver_p") {
            return Err(bad(r, "solver_p", v, "a separate predictor scheduler is not supported"));
        }
        for key in ["use_flow_sigmas", "use_dynamic_shifting"] {
            if r.bool_or(key, false)? {
                return Err(bad(r, key, &"true", "flow-matching sigmas are not implemented"));
            }
        }
        if let Some(v) = r.present("shift_terminal") {
            return Err(bad(r, "shift_terminal", v, "only used with flow sigmas, which are not implemented"));
        }
        // Read only with flow sigmas.
        r.opt_f64("flow_shift")?;
        r.str_or("time_shift_type", "exponential")?;
        Ok(())
    }

    /// The DDIM `eta` of the pipeline call (0, the pipelines' default, unless set).
    /// Only DDIM reads it; with eta > 0 each step draws noise.
    pub fn with_eta(mut self, eta: f64) -> SchedulerSpec {
        self.eta = eta;
        self
    }

    /// The diffusers class name.
    pub fn class_name(&self) -> &'static str {
        self.class.name()
    }

    /// "epsilon", "v_prediction" or "sample".
    pub fn prediction_type(&self) -> &str {
        match self.prediction {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
            Prediction::Sample => "sample",
        }
    }
}

/// The class: `class` when given, else `_class_name`.
fn read_class(r: &Reader, class: Option<&str>) -> Result<Class, ConfigError> {
    let named = r.str_or("_class_name", "")?;
    match class {
        Some(c) => Class::parse(c)
            .ok_or_else(|| r.err(format!("scheduler `{c}` is not one Mora runs; the supported ones are {SUPPORTED}"))),
        None if named.is_empty() => {
            Err(r.err(format!("no `_class_name`: name the scheduler; the supported ones are {SUPPORTED}")))
        }
        None => Class::parse(&named).ok_or_else(|| {
            r.err(format!("`_class_name` is `{named}`, not a scheduler Mora runs; the supported ones are {SUPPORTED}"))
        }),
    }
}

/// `alphas_cumprod` from `trained_betas` or `beta_schedule` (with
/// `beta_start`, `beta_end`), after `rescale_betas_zero_snr` where the
/// class takes it.
fn read_alphas_cumprod(r: &Reader, class: Class, num_train: usize) -> Result<Vec<f32>, ConfigError> {
    let mut betas = read_betas(r, class, num_train)?;
    let zsnr = class.takes("rescale_betas_zero_snr") && r.bool_or("rescale_betas_zero_snr", false)?;
    if zsnr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let mut alphas_cumprod = cumprod(&betas);
    if zsnr && matches!(class, Class::Euler | Class::EulerAncestral | Class::UniPc) {
        *alphas_cumprod.last_mut().expect("at least 2 timesteps") = 2f32.powi(-24);
    }
    Ok(alphas_cumprod)
}

/// The float32 betas: `trained_betas` when set, else the `beta_schedule`.
fn read_betas(r: &Reader, class: Class, num_train: usize) -> Result<Vec<f32>, ConfigError> {
    let beta_start = r.opt_f64("beta_start")?.unwrap_or(0.0001);
    let beta_end = r.opt_f64("beta_end")?.unwrap_or(0.02);
    let schedule = r.str_or("beta_schedule", "linear")?;
    match r.present("trained_betas") {
        Some(Value::Array(a)) => {
            let b: Option<Vec<f32>> = a.iter().map(|v| v.as_f64().map(|x| x as f32)).collect();
            let b = b.ok_or_else(|| r.err("`trained_betas` must be a list of numbers".into()))?;
            if b.len() != num_train {
                return Err(r.err(format!(
                    "`trained_betas` has {} values but `num_train_timesteps` is {num_train}",
                    b.len()
                )));
            }
            Ok(b)
        }
        Some(v) => Err(bad(r, "trained_betas", v, "must be a list of numbers or null")),
        None => Ok(match schedule.as_str() {
            "linear" => linear_betas(beta_start, beta_end, num_train),
            "scaled_linear" => scaled_linear_betas(beta_start, beta_end, num_train),
            "squaredcos_cap_v2" => betas_for_alpha_bar(num_train, cosine_alpha_bar),
            // DDPM's two more.
            "laplace" if class == Class::Ddpm => betas_for_alpha_bar(num_train, laplace_alpha_bar),
            "sigmoid" if class == Class::Ddpm => sigmoid_betas(beta_start, beta_end, num_train),
            other => {
                let more = if class == Class::Ddpm { ", laplace, sigmoid" } else { "" };
                return Err(bad(
                    r,
                    "beta_schedule",
                    &quoted(other),
                    &format!("{} runs linear, scaled_linear, squaredcos_cap_v2{more}", class.name()),
                ));
            }
        }),
    }
}

/// `prediction_type`, as far as the class runs it.
fn read_prediction(r: &Reader, class: Class) -> Result<Prediction, ConfigError> {
    match r.str_or("prediction_type", "epsilon")?.as_str() {
        "epsilon" => Ok(Prediction::Epsilon),
        "v_prediction" => Ok(Prediction::V),
        "sample" | "original_sample" if class == Class::Euler => Ok(Prediction::Sample),
        "sample" if matches!(class, Class::Ddim | Class::Ddpm | Class::UniPc) => Ok(Prediction::Sample),
        other => {
            let allowed = match class {
                Class::Pndm | Class::EulerAncestral => "epsilon and v_prediction",
                _ => "epsilon, v_prediction and sample",
            };
            Err(bad(r, "prediction_type", &quoted(other), &format!("{} runs {allowed}", class.name())))
        }
    }
}

/// `timestep_spacing`, with the class's own default.
fn read_spacing(r: &Reader, class: Class) -> Result<Spacing, ConfigError> {
    let default = match class {
        Class::Euler | Class::EulerAncestral | Class::UniPc => "linspace",
        _ => "leading",
    };
    match r.str_or("timestep_spacing", default)?.as_str() {
        "leading" => Ok(Spacing::Leading),
        "trailing" => Ok(Spacing::Trailing),
        "linspace" => Ok(Spacing::Linspace),
        other => Err(bad(r, "timestep_spacing", &quoted(other), "must be leading, trailing or linspace")),
    }
}

/// `use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas`: at most one.
fn read_sigma_schedule(r: &Reader) -> Result<SigmaSchedule, ConfigError> {
    let karras = r.bool_or("use_karras_sigmas", false)?;
    let exponential = r.bool_or("use_exponential_sigmas", false)?;
    let beta = r.bool_or("use_beta_sigmas", false)?;
    match (karras, exponential, beta) {
        (false, false, false) => Ok(SigmaSchedule::Default),
        (true, false, false) => Ok(SigmaSchedule::Karras),
        (false, true, false) => Ok(SigmaSchedule::Exponential),
        (false, false, true) => Ok(SigmaSchedule::Beta),
        _ => Err(bad(
            r,
            if beta { "use_beta_sigmas" } else { "use_exponential_sigmas" },
            &"true",
            "only one of `use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas` can be true",
        )),
    }
}

/// The begin index into `timesteps()` of an image-to-image run, as the
/// diffusers img2img pipelines' `get_timesteps(num_inference_steps, strength)`
/// computes it: `init = min(int(steps * strength), steps)`,
/// `t_start = max(steps - init, 0)`, and the run starts at `t_start * order`
/// (diffusers' `set_begin_index`). The image is noised
/// with `add_noise` at that index.
pub fn img2img_start(steps: usize, strength: f64, order: usize) -> usize {
    let init = ((steps as f64 * strength) as usize).min(steps);
    steps.saturating_sub(init) * order
}

/// A scheduler set for a number of steps, as diffusers' after `set_timesteps`.
/// Steps are taken in order, from 0 or from the begin index of an
/// image-to-image run: the multistep schedulers (PNDM, UniPC) keep the model
/// outputs of the previous steps.
pub trait Scheduler: Send {
    /// Timesteps the UNet is called with, in order (f64: Euler's can be fractional with linspace).
    fn timesteps(&self) -> &[f64];
    /// diffusers' `init_noise_sigma` (1 unless the scheduler says otherwise).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' scale_model_input for the i-th timestep (the sample
    /// itself unless the scheduler scales it).
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// One step at the i-th timestep. `noise` draws standard-normal noise of the given shape,
    /// on the sample's device and dtype, for the stochastic schedulers (ancestral, DDPM, DDIM with eta>0).
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(&Shape) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor>;
    /// diffusers' add_noise at the i-th timestep (image-to-image).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor>;
    /// diffusers' `scheduler.order`: 1 for all six classes (PNDM's PLMS
    /// path included); img2img skips `t_start * order` entries. Steps are
    /// addressed by index, so an image-to-image run needs no begin index:
    /// it starts stepping at its first index.
    fn order(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests;
