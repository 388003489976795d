//! The noise schedulers of Stable Diffusion pipelines, as diffusers computes
//! them: `PNDMScheduler` (PLMS, with or without Runge-Kutta warm-up), `DDIMScheduler`,
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`,
//! `DDPMScheduler` and `UniPCMultistepScheduler`, configured from the
//! pipeline's `scheduler/scheduler_config.json`.
//!
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
//! dtype), and each step returns the sample's dtype.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Shape, Tensor};
use serde_json::{Map, Value};

use crate::lm_config::{read_json, ConfigError, Reader};

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
enum Prediction {
    Epsilon,
    V,
    Sample,
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
    pub fn from_json(map: &Map<String, Value>, file: &str, class: Option<&str>) -> Result<SchedulerSpec, ConfigError> {
        let r = Reader::new(map, file, "");
        let named = r.str_or("_class_name", "")?;
        let class = match class {
            Some(c) => Class::parse(c).ok_or_else(|| {
                r.err(format!("scheduler `{c}` is not one Mora runs; the supported ones are {SUPPORTED}"))
            })?,
            None if named.is_empty() => {
                return Err(r.err(format!("no `_class_name`: name the scheduler; the supported ones are {SUPPORTED}")))
            }
            None => Class::parse(&named).ok_or_else(|| {
                r.err(format!("`_class_name` is `{named}`, not a scheduler Mora runs; the supported ones are {SUPPORTED}"))
            })?,
        };
        let takes = |k: &str| class.keys().contains(&k);
        let bad = |key: &str, v: &dyn std::fmt::Display, why: &str| r.err(format!("`{key}` = {v}: {why}"));

        let num_train = r.opt_usize("num_train_timesteps")?.unwrap_or(1000);
        if num_train < 2 {
            return Err(bad("num_train_timesteps", &num_train, "must be at least 2"));
        }
        let beta_start = r.opt_f64("beta_start")?.unwrap_or(0.0001);
        let beta_end = r.opt_f64("beta_end")?.unwrap_or(0.02);
        let schedule = r.str_or("beta_schedule", "linear")?;
        let mut betas: Vec<f32> = match r.present("trained_betas") {
            Some(Value::Array(a)) => {
                let b: Option<Vec<f32>> = a.iter().map(|v| v.as_f64().map(|x| x as f32)).collect();
                let b = b.ok_or_else(|| r.err("`trained_betas` must be a list of numbers".into()))?;
                if b.len() != num_train {
                    return Err(r.err(format!(
                        "`trained_betas` has {} values but `num_train_timesteps` is {num_train}",
                        b.len()
                    )));
                }
                b
            }
            Some(v) => return Err(bad("trained_betas", v, "must be a list of numbers or null")),
            None => match schedule.as_str() {
                "linear" => torch_linspace_f32(beta_start, beta_end, num_train),
                "scaled_linear" => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => betas_for_alpha_bar(num_train, cosine_alpha_bar),
                // DDPM's two more.
                "laplace" if class == Class::Ddpm => betas_for_alpha_bar(num_train, laplace_alpha_bar),
                "sigmoid" if class == Class::Ddpm => torch_linspace_f32(-6.0, 6.0, num_train)
                    .into_iter()
                    .map(|x| 1.0 / (1.0 + (-x).exp()) * (beta_end - beta_start) as f32 + beta_start as f32)
                    .collect(),
                other => {
                    let more = if class == Class::Ddpm { ", laplace, sigmoid" } else { "" };
                    return Err(bad(
                        "beta_schedule",
                        &format!("\"{other}\""),
                        &format!("{} runs linear, scaled_linear, squaredcos_cap_v2{more}", class.name()),
                    ));
                }
            },
        };
        let zsnr = takes("rescale_betas_zero_snr") && r.bool_or("rescale_betas_zero_snr", false)?;
        if zsnr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod(&betas);
        if zsnr && matches!(class, Class::Euler | Class::EulerAncestral | Class::UniPc) {
            *alphas_cumprod.last_mut().expect("at least 2 timesteps") = 2f32.powi(-24);
        }

        let prediction = match r.str_or("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            "sample" | "original_sample" if class == Class::Euler => Prediction::Sample,
            "sample" if matches!(class, Class::Ddim | Class::Ddpm | Class::UniPc) => Prediction::Sample,
            other => {
                let allowed = match class {
                    Class::Pndm | Class::EulerAncestral => "epsilon and v_prediction",
                    _ => "epsilon, v_prediction and sample",
                };
                return Err(bad("prediction_type", &format!("\"{other}\""), &format!("{} runs {allowed}", class.name())));
            }
        };
        let default_spacing = match class {
            Class::Euler | Class::EulerAncestral | Class::UniPc => "linspace",
            _ => "leading",
        };
        let spacing = match r.str_or("timestep_spacing", default_spacing)?.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => return Err(bad("timestep_spacing", &format!("\"{other}\""), "must be leading, trailing or linspace")),
        };
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

        if takes("set_alpha_to_one") {
            spec.set_alpha_to_one = r.bool_or("set_alpha_to_one", class == Class::Ddim)?;
        }
        if class == Class::Pndm {
            spec.skip_prk = r.bool_or("skip_prk_steps", false)?;
        }
        if takes("thresholding") {
            let on = r.bool_or("thresholding", false)?;
            let ratio = r.opt_f64("dynamic_thresholding_ratio")?.unwrap_or(0.995);
            let max = r.opt_f64("sample_max_value")?.unwrap_or(1.0);
            if on {
                if !(0.0..=1.0).contains(&ratio) {
                    return Err(bad("dynamic_thresholding_ratio", &ratio, "must be between 0 and 1"));
                }
                spec.threshold = Some((ratio as f32, max as f32));
            }
        }
        if takes("clip_sample") && r.bool_or("clip_sample", true)? {
            spec.clip = Some(r.opt_f64("clip_sample_range")?.unwrap_or(1.0) as f32);
        } else if takes("clip_sample_range") {
            r.opt_f64("clip_sample_range")?;
        }
        if takes("use_karras_sigmas") {
            let karras = r.bool_or("use_karras_sigmas", false)?;
            let exponential = r.bool_or("use_exponential_sigmas", false)?;
            let beta = r.bool_or("use_beta_sigmas", false)?;
            spec.sigma_schedule = match (karras, exponential, beta) {
                (false, false, false) => SigmaSchedule::Default,
                (true, false, false) => SigmaSchedule::Karras,
                (false, true, false) => SigmaSchedule::Exponential,
                (false, false, true) => SigmaSchedule::Beta,
                _ => {
                    return Err(bad(
                        if beta { "use_beta_sigmas" } else { "use_exponential_sigmas" },
                        &"true",
                        "only one of `use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas` can be true",
                    ))
                }
            };
            // Used only by the Karras and exponential schedules.
            spec.sigma_min = r.opt_f64("sigma_min")?;
            spec.sigma_max = r.opt_f64("sigma_max")?;
        }
        if takes("final_sigmas_type") {
            spec.final_sigma_min = match r.str_or("final_sigmas_type", "zero")?.as_str() {
                "zero" => false,
                "sigma_min" => true,
                other => return Err(bad("final_sigmas_type", &format!("\"{other}\""), "must be zero or sigma_min")),
            };
        }
        match class {
            Class::Euler => {
                spec.log_linear = match r.str_or("interpolation_type", "linear")?.as_str() {
                    "linear" => false,
                    "log_linear" => true,
                    other => {
                        return Err(bad("interpolation_type", &format!("\"{other}\""), "must be linear or log_linear"))
                    }
                };
                spec.continuous_timesteps = match r.str_or("timestep_type", "discrete")?.as_str() {
                    "discrete" => false,
                    // diffusers uses continuous timesteps only with v-prediction.
                    "continuous" => prediction == Prediction::V,
                    other => return Err(bad("timestep_type", &format!("\"{other}\""), "must be discrete or continuous")),
                };
            }
            Class::Ddpm => {
                spec.variance = match r.str_or("variance_type", "fixed_small")?.as_str() {
                    "fixed_small" => Variance::Small,
                    "fixed_small_log" => Variance::SmallLog,
                    "fixed_large" => Variance::Large,
                    other => {
                        return Err(bad(
                            "variance_type",
                            &format!("\"{other}\""),
                            "Mora runs fixed_small, fixed_small_log and fixed_large",
                        ))
                    }
                };
            }
            Class::UniPc => {
                spec.solver_order = r.opt_usize("solver_order")?.unwrap_or(2);
                if !(1..=3).contains(&spec.solver_order) {
                    return Err(bad("solver_order", &spec.solver_order, "must be 1, 2 or 3"));
                }
                spec.bh2 = match r.str_or("solver_type", "bh2")?.as_str() {
                    "bh1" => false,
                    // diffusers maps the DPM-Solver names to bh2.
                    "bh2" | "midpoint" | "heun" | "logrho" => true,
                    other => return Err(bad("solver_type", &format!("\"{other}\""), "must be bh1 or bh2")),
                };
                spec.predict_x0 = r.bool_or("predict_x0", true)?;
                spec.lower_order_final = r.bool_or("lower_order_final", true)?;
                spec.disable_corrector = match r.present("disable_corrector") {
                    None => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.as_u64().map(|n| n as usize))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| r.err("`disable_corrector` must be a list of step indices".into()))?,
                    Some(v) => return Err(bad("disable_corrector", v, "must be a list of step indices")),
                };
                // With a zero final sigma, diffusers' last UniPC step computes
                // `-inf * 0` (bh1: B_h = -h) or `0 * inf` (noise prediction:
                // h_phi_1 = e^h - 1), and the image is NaN.
                if !spec.final_sigma_min && (!spec.bh2 || !spec.predict_x0) {
                    let key = if spec.bh2 { "predict_x0" } else { "solver_type" };
                    let value = if spec.bh2 { "false".to_string() } else { "\"bh1\"".to_string() };
                    return Err(bad(
                        key,
                        &value,
                        "diffusers' last step gives NaN with `final_sigmas_type` zero; Mora runs it with final_sigmas_type sigma_min",
                    ));
                }
                if let Some(v) = r.present("solver_p") {
                    return Err(bad("solver_p", v, "a separate predictor scheduler is not supported"));
                }
                for key in ["use_flow_sigmas", "use_dynamic_shifting"] {
                    if r.bool_or(key, false)? {
                        return Err(bad(key, &"true", "flow-matching sigmas are not implemented"));
                    }
                }
                if let Some(v) = r.present("shift_terminal") {
                    return Err(bad("shift_terminal", v, "only used with flow sigmas, which are not implemented"));
                }
                // Read only with flow sigmas.
                r.opt_f64("flow_shift")?;
                r.str_or("time_shift_type", "exponential")?;
            }
            _ => {}
        }
        // Keys only other classes read are ignored, as diffusers ignores them.
        for k in map.keys() {
            if !takes(k) && DIFFUSERS_SCHEDULER_KEYS.contains(&k.as_str()) {
                r.take(k);
            }
        }
        r.refuse_unread(crate::image::DIFFUSERS_NEUTRAL, &format!("{} configs", class.name()))?;
        Ok(spec)
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

    /// A scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    pub fn build(&self, steps: usize) -> Result<Box<dyn Scheduler>, String> {
        if steps == 0 {
            return Err("the number of inference steps must be at least 1".into());
        }
        if matches!(self.class, Class::Ddim | Class::Ddpm) && steps > self.num_train {
            return Err(format!(
                "{} steps is more than the {} training timesteps {} can run",
                steps,
                self.num_train,
                self.class.name()
            ));
        }
        if self.class == Class::Pndm && !self.skip_prk && steps < 4 {
            return Err(format!(
                "PNDMScheduler with skip_prk_steps false needs at least 4 steps (its Runge-Kutta warm-up spans the last four), not {steps}"
            ));
        }
        if self.spacing == Spacing::Leading && self.num_train / steps == 0 {
            return Err(format!("{steps} steps is more than the {} training timesteps", self.num_train));
        }
        let s: Box<dyn Scheduler> = match self.class {
            Class::Pndm => Box::new(Pndm::new(self, steps)),
            Class::Ddim => Box::new(Ddim::new(self, steps)),
            Class::Ddpm => Box::new(Ddpm::new(self, steps)),
            Class::Euler | Class::EulerAncestral => Box::new(Euler::new(self, steps)),
            Class::UniPc => Box::new(UniPc::new(self, steps)?),
        };
        // PNDM, DDIM and DDPM index `alphas_cumprod` by timestep (diffusers
        // fails with an IndexError past the end).
        if matches!(self.class, Class::Pndm | Class::Ddim | Class::Ddpm) {
            if let Some(t) = s.timesteps().iter().find(|&&t| t >= self.num_train as f64) {
                return Err(format!(
                    "{steps} steps with steps_offset {} reach timestep {t}, past the {} training timesteps",
                    self.steps_offset, self.num_train
                ));
            }
        }
        Ok(s)
    }

    fn integer_timesteps(&self, steps: usize) -> Vec<f64> {
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
    fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
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

// ---------------------------------------------------------------- numerics

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU
/// kernel computes it element by element (its vectorized path can differ by
/// one unit in the last place on some entries).
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { s + step * i as f32 } else { e - step * (steps - i - 1) as f32 }).collect()
}

/// diffusers' cosine `alpha_bar_fn`.
fn cosine_alpha_bar(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2)
}

/// diffusers' laplace `alpha_bar_fn`.
fn laplace_alpha_bar(t: f64) -> f64 {
    let lmb = -0.5 * 1f64.copysign(0.5 - t) * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
    let snr = lmb.exp();
    (snr / (1.0 + snr)).sqrt()
}

/// diffusers' `betas_for_alpha_bar`, max_beta 0.999, in float64 then float32.
fn betas_for_alpha_bar(n: usize, f: fn(f64) -> f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - f(t2) / f(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(1 - betas)` in float32 (the CPU kernel accumulates in float64).
fn cumprod(betas: &[f32]) -> Vec<f32> {
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
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
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

/// `np.linspace(start, stop, n)` (float64).
fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(n, 0, -n / steps)` (float64), as numpy computes its length and values.
fn trailing(n: usize, steps: usize) -> Vec<f64> {
    let start = n as f64;
    let step = -(n as f64 / steps as f64);
    let len = ((0.0 - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64.
fn interp(x: f64, fp: &[f32]) -> f64 {
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

impl SchedulerSpec {
    /// diffusers' `_convert_to_karras` / `_convert_to_exponential`: `n`
    /// sigmas from `sigma_max` (default `hi`) down to `sigma_min` (default `lo`).
    fn convert_sigmas(&self, hi: f64, lo: f64, n: usize) -> Vec<f64> {
        let lo = self.sigma_min.unwrap_or(lo);
        let hi = self.sigma_max.unwrap_or(hi);
        match self.sigma_schedule {
            SigmaSchedule::Karras => {
                let rho = 7.0f64;
                let (min_inv, max_inv) = (lo.powf(1.0 / rho), hi.powf(1.0 / rho));
                np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
            }
            SigmaSchedule::Exponential => np_linspace(hi.ln(), lo.ln(), n).into_iter().map(f64::exp).collect(),
            // `sigma_min + ppf * (sigma_max - sigma_min)` for
            // `ppf = scipy.stats.beta.ppf(1 - linspace(0, 1, n), 0.6, 0.6)`.
            SigmaSchedule::Beta => np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|t| lo + beta_ppf(1.0 - t, 0.6, 0.6) * (hi - lo))
                .collect(),
            SigmaSchedule::Default => unreachable!("only called for Karras and exponential sigmas"),
        }
    }
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
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    // `cumsum(dists >= 0).argmax()`: the last index at or below, else 0.
    let low = log_sigmas.iter().rposition(|&l| ls - l as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - ls) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

fn f32_tensor(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

fn mul(t: &Tensor, c: f32) -> candle_core::Result<Tensor> {
    t.affine(c as f64, 0.0)
}

/// `t / c` as torch divides by a float32 scalar (not by its reciprocal).
fn div(t: &Tensor, c: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(c, t.device())?)
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

fn clamp(t: &Tensor, range: Option<f32>) -> candle_core::Result<Tensor> {
    match range {
        Some(r) => t.clamp(-r, r),
        None => Ok(t.clone()),
    }
}

// ---------------------------------------------------------------- PNDM

/// `PNDMScheduler`: Runge-Kutta (PRK) warm-up steps unless `skip_prk_steps`,
/// then linear multistep (PLMS) steps.
struct Pndm {
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
    fn new(spec: &SchedulerSpec, steps: usize) -> Pndm {
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

    fn prev_sample(&self, sample: &Tensor, t: i64, prev: i64, model_output: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let b = 1.0 - a;
        let b_prev = 1.0 - a_prev;
        let model_output = match self.prediction {
            Prediction::V => (mul(model_output, a.sqrt())? + mul(sample, b.sqrt())?)?,
            _ => model_output.clone(),
        };
        let sample_coeff = (a_prev / a).sqrt();
        let denom = a * b_prev.sqrt() + (a * b * a_prev).sqrt();
        mul(sample, sample_coeff)? - div(&mul(&model_output, a_prev - a)?, denom)?
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
        let mut sample = f32_tensor(sample)?;
        if self.counter < self.prk {
            // step_prk
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
            return out.to_dtype(dtype);
        }
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
        out.to_dtype(dtype)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        add_noise_alphas(&self.alphas_cumprod, self.timesteps[i], original, noise)
    }
}

/// `sqrt(ac[t]) * original + sqrt(1 - ac[t]) * noise` (PNDM, DDIM, DDPM).
fn add_noise_alphas(ac: &[f32], t: f64, original: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
    let a = ac[t as usize];
    let out = (mul(&f32_tensor(original)?, a.sqrt())? + mul(&f32_tensor(noise)?, (1.0 - a).sqrt())?)?;
    out.to_dtype(original.dtype())
}

// ---------------------------------------------------------------- DDIM

struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip: Option<f32>,
    threshold: Option<(f32, f32)>,
    ratio: i64,
    eta: f64,
}

impl Ddim {
    fn new(spec: &SchedulerSpec, steps: usize) -> Ddim {
        Ddim {
            timesteps: spec.integer_timesteps(steps),
            alphas_cumprod: spec.alphas_cumprod.clone(),
            final_alpha_cumprod: if spec.set_alpha_to_one { 1.0 } else { spec.alphas_cumprod[0] },
            prediction: spec.prediction,
            clip: spec.clip,
            threshold: spec.threshold,
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
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (div(&(&x - mul(&mo, b.sqrt())?)?, a.sqrt())?, mo.clone()),
            Prediction::Sample => {
                let eps = div(&(&x - mul(&mo, a.sqrt())?)?, b.sqrt())?;
                (mo.clone(), eps)
            }
            Prediction::V => (
                (mul(&x, a.sqrt())? - mul(&mo, b.sqrt())?)?,
                (mul(&mo, a.sqrt())? + mul(&x, b.sqrt())?)?,
            ),
        };
        let x0 = match self.threshold {
            Some((ratio, max)) => threshold(&x0, ratio, max)?,
            None => clamp(&x0, self.clip)?,
        };
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

// ---------------------------------------------------------------- DDPM

struct Ddpm {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    clip: Option<f32>,
    threshold: Option<(f32, f32)>,
    variance: Variance,
}

impl Ddpm {
    fn new(spec: &SchedulerSpec, steps: usize) -> Ddpm {
        Ddpm {
            timesteps: spec.integer_timesteps(steps),
            alphas_cumprod: spec.alphas_cumprod.clone(),
            prediction: spec.prediction,
            clip: spec.clip,
            threshold: spec.threshold,
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
        let x0 = match self.prediction {
            Prediction::Epsilon => div(&(&x - mul(&mo, b.sqrt())?)?, a.sqrt())?,
            Prediction::Sample => mo.clone(),
            Prediction::V => (mul(&x, a.sqrt())? - mul(&mo, b.sqrt())?)?,
        };
        let x0 = match self.threshold {
            Some((ratio, max)) => threshold(&x0, ratio, max)?,
            None => clamp(&x0, self.clip)?,
        };
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

// ---------------------------------------------------------------- Euler

/// `EulerDiscreteScheduler` (s_churn 0, as the pipelines call it) and
/// `EulerAncestralDiscreteScheduler`.
struct Euler {
    ancestral: bool,
    timesteps: Vec<f64>,
    /// One more than the timesteps: the last is the final sigma.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: Prediction,
}

impl Euler {
    fn new(spec: &SchedulerSpec, steps: usize) -> Euler {
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
        let x0 = match self.prediction {
            Prediction::Epsilon => (&x - mul(&mo, sigma)?)?,
            Prediction::V => {
                (mul(&mo, -sigma / (sigma * sigma + 1.0).sqrt())? + div(&x, sigma * sigma + 1.0)?)?
            }
            Prediction::Sample => mo.clone(),
        };
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

// ---------------------------------------------------------------- UniPC

/// `UniPCMultistepScheduler`: the UniP predictor and UniC corrector, bh1 or
/// bh2, data (x0) or noise prediction.
struct UniPc {
    timesteps: Vec<f64>,
    threshold: Option<(f32, f32)>,
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
    fn new(spec: &SchedulerSpec, steps: usize) -> Result<UniPc, String> {
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
        Ok(UniPc {
            timesteps: ts,
            threshold: spec.threshold,
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
        })
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

    fn convert(&self, mo: &Tensor, x: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        if self.predict_x0 {
            let x0 = match self.prediction {
                Prediction::Epsilon => div(&(x - mul(mo, s)?)?, a)?,
                Prediction::Sample => mo.clone(),
                Prediction::V => (mul(x, a)? - mul(mo, s)?)?,
            };
            match self.threshold {
                Some((ratio, max)) => threshold(&x0, ratio, max),
                None => Ok(x0),
            }
        } else {
            match self.prediction {
                Prediction::Epsilon => Ok(mo.clone()),
                Prediction::Sample => div(&(x - mul(mo, a)?)?, s),
                Prediction::V => mul(mo, a)? + mul(x, s)?,
            }
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
    //! Parity with diffusers on the fixtures of
    //! `tests/fixtures/image/schedulers/` (written by
    //! `scripts/golden/make_scheduler_fixtures.py`, which documents the run
    //! they record), and the config handling.
    //!
    //! Tolerance: a value matches when it is within `TOL * (1 + scale)` of
    //! diffusers', `scale` being the mean absolute value of the tensor for
    //! elements, its sum of absolute values for sums, and the value itself
    //! for scalars. Both sides compute in float32; what differs is the order
    //! of a few float32 operations and torch's vectorized `linspace`, which
    //! gives a few betas one unit in the last place apart.

    use super::*;
    use candle_core::Device;
    use serde_json::json;
    use std::path::PathBuf;

    const TOL: f64 = 1e-5;

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/image/schedulers")
    }

    fn formula(f: impl Fn(f64) -> f64) -> Tensor {
        let v: Vec<f32> = (0..256).map(|k| f(k as f64) as f32).collect();
        Tensor::from_vec(v, (1, 4, 8, 8), &Device::Cpu).unwrap()
    }

    fn latent() -> Tensor {
        formula(|k| (0.377 * k + 0.5).cos() * 1.1)
    }

    fn image_latent() -> Tensor {
        formula(|k| (0.291 * k).sin() * 0.8)
    }

    fn noise(d: usize) -> Tensor {
        formula(|k| (0.731 * k + 1.37 * d as f64 + 0.2).sin() * 1.4)
    }

    fn fake_unet(x: &Tensor, t: f64) -> Tensor {
        (x * 0.1).unwrap().affine(1.0, (t / 100.0).sin()).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(|v| v as f64).collect()
    }

    fn nums(v: &Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    /// Compares a tensor with a fixture record (full values or stats);
    /// returns the largest absolute difference and fails past the tolerance.
    fn check(what: &str, got: &Tensor, want: &Value) -> (f64, f64) {
        let v = values(got);
        let mean_abs = |v: &[f64]| v.iter().map(|x| x.abs()).sum::<f64>() / v.len() as f64;
        let mut worst = (0f64, 0f64);
        if let Some(full) = want.as_array() {
            let want: Vec<f64> = full.iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(want.len(), v.len(), "{what}: length");
            let scale = mean_abs(&want);
            for (k, (a, b)) in v.iter().zip(&want).enumerate() {
                let d = (a - b).abs();
                assert!(d <= TOL * (1.0 + scale), "{what}[{k}]: {a} vs diffusers {b}");
                worst = (worst.0.max(d), worst.1.max(d / (1.0 + scale)));
            }
        } else {
            let first = nums(&want["first"]);
            let abs_sum = want["abs_sum"].as_f64().unwrap();
            let scale = abs_sum / 256.0;
            for (k, (a, b)) in v.iter().zip(&first).enumerate() {
                let d = (a - b).abs();
                assert!(d <= TOL * (1.0 + scale), "{what}: value {k} is {a}, diffusers {b}");
                worst = (worst.0.max(d), worst.1.max(d / (1.0 + scale)));
            }
            let sum: f64 = v.iter().sum();
            let want_sum = want["sum"].as_f64().unwrap();
            assert!((sum - want_sum).abs() <= TOL * (1.0 + abs_sum), "{what}: sum {sum} vs diffusers {want_sum}");
            let got_abs: f64 = v.iter().map(|x| x.abs()).sum();
            assert!((got_abs - abs_sum).abs() <= TOL * (1.0 + abs_sum), "{what}: abs sum {got_abs} vs {abs_sum}");
        }
        worst
    }

    fn close(what: &str, a: f64, b: f64) {
        assert!((a - b).abs() <= TOL * (1.0 + b.abs()), "{what}: {a} vs diffusers {b}");
    }

    #[test]
    fn schedulers_match_diffusers() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        assert!(files.len() >= 43, "fixtures missing: {}", files.len());
        let mut report = Vec::new();
        for file in files {
            let fx: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            let case = fx["case"].as_str().unwrap().to_string();
            let spec = SchedulerSpec::from_json(fx["config"].as_object().unwrap(), "scheduler_config.json", fx["override"].as_str())
                .unwrap_or_else(|e| panic!("{case}: {e}"))
                .with_eta(fx["eta"].as_f64().unwrap());
            assert_eq!(spec.class_name(), fx["class"].as_str().unwrap(), "{case}");
            let mut worst = (0f64, 0f64);
            let worse = |w: &mut (f64, f64), c: (f64, f64)| *w = (w.0.max(c.0), w.1.max(c.1));
            for run in fx["runs"].as_array().unwrap() {
                let steps = run["steps"].as_u64().unwrap() as usize;
                let what = format!("{case} at {steps} steps");
                if run.get("error").is_some() {
                    assert!(spec.build(steps).is_err(), "{what}: diffusers fails, Mora must refuse");
                    continue;
                }
                let mut s = spec.build(steps).unwrap();
                // Whole timesteps match exactly; fractional ones (Karras and
                // exponential sigmas) within a float32 rounding or two.
                let want = nums(&run["timesteps"]);
                assert_eq!(s.timesteps().len(), want.len(), "{what}: timesteps {:?}", s.timesteps());
                for (a, b) in s.timesteps().iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{what}: timesteps {:?} vs {want:?}", s.timesteps());
                }
                close(&format!("{what}: init_noise_sigma"), s.init_noise_sigma(), run["init_noise_sigma"].as_f64().unwrap());
                assert_eq!(s.order() as u64, run["order"].as_u64().unwrap(), "{what}: order");
                let mut sample = (latent() * s.init_noise_sigma()).unwrap();
                let mut draws = 0usize;
                let record = run["record"].as_array().unwrap();
                assert_eq!(record.len(), s.timesteps().len(), "{what}: number of steps");
                for (i, rec) in record.iter().enumerate() {
                    let t = s.timesteps()[i];
                    let model_in = s.scale_model_input(&sample, i).unwrap();
                    if rec["scaled"].is_null() {
                        // Recorded only where diffusers' scale_model_input is not the identity.
                        assert!(values(&model_in) == values(&sample), "{what}, step {i}: scaled input");
                    } else {
                        worse(&mut worst, check(&format!("{what}, step {i}: scaled input"), &model_in, &rec["scaled"]));
                    }
                    let out = fake_unet(&model_in, t);
                    sample = s
                        .step(&out, i, &sample, &mut |shape: &Shape| {
                            assert_eq!(shape.dims(), &[1, 4, 8, 8]);
                            draws += 1;
                            Ok(noise(draws - 1))
                        })
                        .unwrap();
                    worse(&mut worst, check(&format!("{what}, step {i}: sample"), &sample, &rec["prev"]));
                }
                assert_eq!(draws as u64, run["draws"].as_u64().unwrap(), "{what}: noise draws");
                worse(&mut worst, check(&format!("{what}: final sample"), &sample, &run["final"]));
            }
            for run in fx["img2img"].as_array().unwrap() {
                let steps = run["steps"].as_u64().unwrap() as usize;
                let what = format!("{case} img2img at {steps} steps");
                let mut s = spec.build(steps).unwrap();
                let start = img2img_start(steps, run["strength"].as_f64().unwrap(), s.order());
                assert_eq!(start as u64, run["start"].as_u64().unwrap(), "{what}: start");
                let mut sample = s.add_noise(&image_latent(), &noise(1000), start).unwrap();
                worse(&mut worst, check(&format!("{what}: add_noise"), &sample, &run["noised"]));
                let mut draws = 0usize;
                for i in start..s.timesteps().len() {
                    let model_in = s.scale_model_input(&sample, i).unwrap();
                    let out = fake_unet(&model_in, s.timesteps()[i]);
                    sample = s
                        .step(&out, i, &sample, &mut |_: &Shape| {
                            draws += 1;
                            Ok(noise(draws - 1))
                        })
                        .unwrap();
                }
                assert_eq!(draws as u64, run["draws"].as_u64().unwrap(), "{what}: noise draws");
                worse(&mut worst, check(&format!("{what}: final sample"), &sample, &run["final"]));
            }
            report.push(format!("{case}: max abs diff {:.2e}, relative {:.2e}", worst.0, worst.1));
        }
        println!("{}", report.join("\n"));
    }

    #[test]
    fn sigmas_match_diffusers() {
        for case in [
            "sdxl-euler", "sd-turbo-euler", "linspace-euler", "zsnr-euler-trailing", "sd15-unipc", "unipc-noise-pred",
            "sdxl-euler-karras", "euler-exponential", "unipc-karras", "unipc-exponential", "euler-log_linear",
            "euler-log_linear-karras", "euler-beta", "unipc-beta",
        ] {
            let fx: Value = serde_json::from_slice(&std::fs::read(dir().join(format!("{case}.json"))).unwrap()).unwrap();
            let spec = SchedulerSpec::from_json(fx["config"].as_object().unwrap(), "c.json", fx["override"].as_str()).unwrap();
            for run in fx["runs"].as_array().unwrap() {
                let steps = run["steps"].as_u64().unwrap() as usize;
                let want = nums(&run["sigmas"]);
                let got: Vec<f64> = match spec.class {
                    Class::Euler | Class::EulerAncestral => Euler::new(&spec, steps).sigmas,
                    Class::UniPc => UniPc::new(&spec, steps).unwrap().sigmas,
                    _ => unreachable!(),
                }
                .into_iter()
                .map(|v| v as f64)
                .collect();
                assert_eq!(got.len(), want.len(), "{case}");
                for (a, b) in got.iter().zip(&want) {
                    close(&format!("{case} at {steps} steps: sigma"), *a, *b);
                }
            }
        }
    }

    fn sd15() -> Value {
        json!({
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
            "clip_sample": false
        })
    }

    fn with(base: Value, extra: Value) -> Map<String, Value> {
        let mut m = base.as_object().unwrap().clone();
        for (k, v) in extra.as_object().unwrap() {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    fn refused(m: &Map<String, Value>, class: Option<&str>, key: &str) {
        let e = SchedulerSpec::from_json(m, "unet-x/scheduler/scheduler_config.json", class)
            .err()
            .unwrap_or_else(|| panic!("`{key}` accepted"))
            .to_string();
        assert!(e.starts_with("unet-x/scheduler/scheduler_config.json: "), "{e}");
        assert!(e.contains(&format!("`{key}`")), "{key} not named: {e}");
        assert!(!e.contains('\n'), "not one line: {e}");
    }

    #[test]
    fn what_is_not_implemented_is_refused_naming_the_key() {
        let ddim = || with(sd15(), json!({"_class_name": "DDIMScheduler"}));
        let euler = || with(sd15(), json!({"_class_name": "EulerDiscreteScheduler"}));
        let unipc = || with(sd15(), json!({"_class_name": "UniPCMultistepScheduler"}));
        let set = |mut m: Map<String, Value>, k: &str, v: Value| {
            m.insert(k.into(), v);
            m
        };
        // PNDM without skip_prk_steps (its default) runs Runge-Kutta warm-up
        // steps, which need 4 steps at least.
        let mut no_skip = sd15().as_object().unwrap().clone();
        no_skip.remove("skip_prk_steps");
        let prk = SchedulerSpec::from_json(&no_skip, "s.json", None).unwrap();
        assert!(prk.build(3).is_err());
        assert_eq!(prk.build(4).unwrap().timesteps().len(), 13);
        let on = || set(ddim(), "thresholding", json!(true));
        refused(&set(on(), "dynamic_thresholding_ratio", json!(1.5)), None, "dynamic_thresholding_ratio");
        refused(&set(on(), "sample_max_value", json!("big")), None, "sample_max_value");
        refused(&set(ddim(), "beta_schedule", json!("sigmoid")), None, "beta_schedule");
        refused(&set(ddim(), "beta_schedule", json!("laplace")), Some("euler"), "beta_schedule");
        refused(&set(ddim(), "beta_schedule", json!("quadratic")), Some("ddpm"), "beta_schedule");
        refused(&set(ddim(), "timestep_spacing", json!("uniform")), None, "timestep_spacing");
        refused(&set(ddim(), "prediction_type", json!("flow_prediction")), None, "prediction_type");
        refused(&set(sd15().as_object().unwrap().clone(), "prediction_type", json!("sample")), None, "prediction_type");
        refused(&set(ddim(), "prediction_type", json!("sample")), Some("euler_a"), "prediction_type");
        let karras_beta = set(set(unipc(), "use_karras_sigmas", json!(true)), "use_beta_sigmas", json!(true));
        refused(&karras_beta, None, "use_beta_sigmas");
        let both = set(set(euler(), "use_karras_sigmas", json!(true)), "use_exponential_sigmas", json!(true));
        refused(&both, None, "use_exponential_sigmas");
        refused(&set(euler(), "interpolation_type", json!("cubic")), None, "interpolation_type");
        refused(&set(euler(), "final_sigmas_type", json!("max")), None, "final_sigmas_type");
        refused(&set(euler(), "timestep_type", json!("other")), None, "timestep_type");
        refused(&set(ddim(), "variance_type", json!("learned_range")), Some("ddpm"), "variance_type");
        refused(&set(ddim(), "variance_type", json!("fixed_large_log")), Some("ddpm"), "variance_type");
        refused(&set(unipc(), "solver_p", json!({"x": 1})), None, "solver_p");
        refused(&set(unipc(), "use_flow_sigmas", json!(true)), None, "use_flow_sigmas");
        refused(&set(unipc(), "use_dynamic_shifting", json!(true)), None, "use_dynamic_shifting");
        refused(&set(unipc(), "shift_terminal", json!(0.02)), None, "shift_terminal");
        refused(&set(unipc(), "solver_order", json!(4)), None, "solver_order");
        refused(&set(unipc(), "solver_type", json!("bh3")), None, "solver_type");
        refused(&set(unipc(), "solver_type", json!("bh1")), None, "solver_type");
        refused(&set(unipc(), "predict_x0", json!(false)), None, "predict_x0");
        let bh1 = set(set(unipc(), "solver_type", json!("bh1")), "final_sigmas_type", json!("sigma_min"));
        assert!(SchedulerSpec::from_json(&bh1, "s.json", None).is_ok());
        refused(&set(ddim(), "trained_betas", json!([0.1, 0.2])), None, "trained_betas");
        refused(&set(ddim(), "num_train_timesteps", json!("many")), None, "num_train_timesteps");
        // A key no diffusers scheduler reads may be one a newer diffusers
        // added to this class: refused rather than ignored.
        refused(&set(ddim(), "frobnicate", json!(1)), None, "frobnicate");
        refused(&set(ddim(), "frobnicate", json!(1)), Some("euler"), "frobnicate");
    }

    #[test]
    fn keys_of_other_classes_are_ignored_as_diffusers_does() {
        // SD 1.5's PNDM config carries DDIM's clip_sample; Karras sigmas
        // mean nothing to PNDM, but are refused once Euler is chosen.
        let m = with(sd15(), json!({"use_beta_sigmas": true, "use_karras_sigmas": true, "solver_order": 7}));
        assert_eq!(SchedulerSpec::from_json(&m, "s.json", None).unwrap().class_name(), "PNDMScheduler");
        refused(&m, Some("euler"), "use_beta_sigmas");
        // Keys the chosen class takes are honoured: SD 1.5's clip_sample
        // false reaches DDIM, which defaults to true.
        let ddim = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some("ddim")).unwrap();
        assert_eq!(ddim.clip, None);
        let clip = with(sd15(), json!({"clip_sample": true, "clip_sample_range": 2.5}));
        assert_eq!(SchedulerSpec::from_json(&clip, "s.json", Some("ddim")).unwrap().clip, Some(2.5));
        // Defaults are the new class's: Euler spaces timesteps with linspace.
        let e = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some("euler")).unwrap();
        assert_eq!(e.build(4).unwrap().timesteps(), &[999.0, 666.0, 333.0, 0.0]);
        let p = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", None).unwrap();
        assert_eq!(p.build(4).unwrap().timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
    }

    #[test]
    fn class_names_short_names_and_overrides() {
        let m = sd15();
        let m = m.as_object().unwrap();
        for (name, class) in [
            ("pndm", "PNDMScheduler"),
            ("ddim", "DDIMScheduler"),
            ("euler", "EulerDiscreteScheduler"),
            ("euler_ancestral", "EulerAncestralDiscreteScheduler"),
            ("euler_a", "EulerAncestralDiscreteScheduler"),
            ("ddpm", "DDPMScheduler"),
            ("unipc", "UniPCMultistepScheduler"),
            ("UniPCMultistepScheduler", "UniPCMultistepScheduler"),
            ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
        ] {
            let s = SchedulerSpec::from_json(m, "s.json", Some(name)).unwrap();
            assert_eq!(s.class_name(), class);
            assert_eq!(s.prediction_type(), "epsilon");
        }
        let e = SchedulerSpec::from_json(m, "s.json", Some("DPMSolverMultistepScheduler")).unwrap_err().to_string();
        assert!(e.starts_with("s.json: ") && e.contains("DPMSolverMultistepScheduler"), "{e}");
        for name in ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
            "DDPMScheduler", "UniPCMultistepScheduler", "euler_a", "unipc"] {
            assert!(e.contains(name), "{name} not listed: {e}");
        }
        let other = with(sd15(), json!({"_class_name": "LMSDiscreteScheduler"}));
        let e = SchedulerSpec::from_json(&other, "s.json", None).unwrap_err().to_string();
        assert!(e.contains("LMSDiscreteScheduler") && e.contains("EulerDiscreteScheduler"), "{e}");
        let mut none = m.clone();
        none.remove("_class_name");
        assert!(SchedulerSpec::from_json(&none, "s.json", None).is_err());
        assert_eq!(SchedulerSpec::from_json(&none, "s.json", Some("ddim")).unwrap().class_name(), "DDIMScheduler");
        let v = with(sd15(), json!({"prediction_type": "v_prediction"}));
        assert_eq!(SchedulerSpec::from_json(&v, "s.json", Some("euler")).unwrap().prediction_type(), "v_prediction");
    }

    #[test]
    fn zero_steps_and_too_many_steps_are_refused() {
        for class in ["pndm", "ddim", "euler", "euler_a", "ddpm", "unipc"] {
            let s = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some(class)).unwrap();
            assert!(s.build(0).is_err(), "{class}");
            assert!(s.build(1).is_ok(), "{class}");
        }
        let s = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some("ddim")).unwrap();
        assert!(s.build(1001).is_err());
        // Leading spacing with steps_offset 1 reaches timestep 1000 at 1000 steps.
        assert!(s.build(999).is_ok());
        for class in ["pndm", "ddim", "ddpm"] {
            let s = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some(class)).unwrap();
            assert!(s.build(1000).err().unwrap().contains("timestep 1000"), "{class}");
        }
    }

    #[test]
    fn half_precision_samples_stay_half_and_close() {
        // Steps compute in float32 and return the sample's dtype.
        for class in ["pndm", "ddim", "euler", "euler_a", "ddpm", "unipc"] {
            let spec = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some(class)).unwrap();
            let run = |dtype: DType| {
                let mut s = spec.build(10).unwrap();
                let mut x = (latent() * s.init_noise_sigma()).unwrap().to_dtype(dtype).unwrap();
                let mut d = 0usize;
                for i in 0..s.timesteps().len() {
                    let m = s.scale_model_input(&x, i).unwrap();
                    assert_eq!(m.dtype(), dtype);
                    let out = fake_unet(&m.to_dtype(DType::F32).unwrap(), s.timesteps()[i]).to_dtype(dtype).unwrap();
                    x = s
                        .step(&out, i, &x, &mut |_: &Shape| {
                            d += 1;
                            noise(d).to_dtype(dtype)
                        })
                        .unwrap();
                    assert_eq!(x.dtype(), dtype);
                }
                values(&x.to_dtype(DType::F32).unwrap())
            };
            let (full, half) = (run(DType::F32), run(DType::F16));
            let scale = full.iter().map(|v| v.abs()).sum::<f64>() / full.len() as f64;
            let worst = full.iter().zip(&half).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
            assert!(worst < 2e-2 * (1.0 + scale), "{class}: f16 off by {worst} (scale {scale})");
        }
    }

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

    #[test]
    fn img2img_start_follows_get_timesteps() {
        assert_eq!(img2img_start(20, 0.6, 1), 8);
        assert_eq!(img2img_start(4, 0.6, 1), 2);
        assert_eq!(img2img_start(50, 0.75, 1), 13);
        assert_eq!(img2img_start(10, 1.0, 1), 0);
        assert_eq!(img2img_start(10, 1.5, 1), 0);
        assert_eq!(img2img_start(10, 0.0, 1), 10);
        assert_eq!(img2img_start(10, 0.3, 2), 14);
    }

    #[test]
    fn file_and_json_errors_name_the_file() {
        let e = SchedulerSpec::from_file(Path::new("/nonexistent/scheduler_config.json"), None).unwrap_err();
        assert_eq!(e.file, "/nonexistent/scheduler_config.json");
        let d = mora_test_support::Scratch::new("sched");
        let path = d.join("scheduler_config.json");
        std::fs::write(&path, serde_json::to_vec(&sd15()).unwrap()).unwrap();
        let s = SchedulerSpec::from_file(&path, Some("euler_a")).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.class_name(), "EulerAncestralDiscreteScheduler");
    }
}
