//! What a step reports when it has run, and the line the CLI prints for it.

use std::path::PathBuf;
use std::time::Duration;

use crate::weights::{Provenance, Weights};

/// What a step produced.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: String,
    pub items: usize,
    /// What `items` counts: "texts", "tokens", "queries".
    pub unit: &'static str,
    pub output: PathBuf,
    pub run_ms: u64,
    pub what: StepKind,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    /// A step that ran a model.
    Model {
        model: String,
        weights: Provenance,
        /// Where it ran ("cpu", "cuda:0").
        device: String,
        /// Opening that device (a GPU's CUDA context), and mapping lent weights.
        device_open: Duration,
        map: Duration,
        /// Lent weights viewed in place (no copy into this process).
        in_place: bool,
        /// Building the candle model from the weights (for lent weights on
        /// the CPU that could not be viewed in place, this includes the copy
        /// out of the shared mapping).
        build_ms: u64,
        /// The weights were acquired by an earlier step of the same run.
        reused: bool,
        /// The tokenizer was the one the daemon prepared and lent.
        tokenizer_lent: bool,
    },
    /// A rank step: `items` queries against a corpus of `corpus` texts.
    Rank { corpus: usize, top_k: usize },
    /// A step that ran a pipeline: each component's name, weights and
    /// whether an earlier step of the run acquired it.
    Pipeline { device: String, components: Vec<(String, Provenance, bool)>, build_ms: u64 },
}

impl StepKind {
    /// A step that ran the pipeline of components `parts`.
    pub fn pipeline(parts: &[(&'static str, &Weights, bool)], build_ms: u64) -> StepKind {
        StepKind::Pipeline {
            device: parts.first().map(|(_, w, _)| device_name(&w.device)).unwrap_or_default(),
            components: parts.iter().map(|(_, w, reused)| (w.name.clone(), w.provenance.clone(), *reused)).collect(),
            build_ms,
        }
    }

    /// A step that ran a model on `w`.
    pub fn model(w: &Weights, build_ms: u64, reused: bool, tokenizer_lent: bool) -> StepKind {
        StepKind::Model {
            model: w.name.clone(),
            weights: w.provenance.clone(),
            device: device_name(&w.device),
            device_open: w.device_open,
            map: w.map,
            in_place: w.in_place(),
            build_ms,
            reused,
            tokenizer_lent,
        }
    }
}

fn device_name(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// One line per step for the terminal.
pub fn describe(r: &StepReport) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match &r.what {
        StepKind::Model { model, weights, device, device_open, map, in_place, build_ms, reused, tokenizer_lent } => {
            let source = match weights {
                _ if *reused => "already held by this run".to_string(),
                Provenance::Daemon { loaded_now: true, load_ms, bytes, .. } => {
                    format!("cold: the cache daemon loaded {:.1} MiB in {load_ms} ms", mib(*bytes))
                }
                Provenance::Daemon { loaded_now: false, bytes, .. } => {
                    format!("warm: {:.1} MiB from the cache daemon", mib(*bytes))
                }
                Provenance::InProcess { load_ms, bytes } => {
                    format!("no cache: read {:.1} MiB in-process in {load_ms} ms", mib(*bytes))
                }
            };
            let opened = if device == "cpu" || *reused { String::new() } else { format!("device opened in {:.1} ms; ", ms(*device_open)) };
            let mapped = match weights {
                _ if *reused => String::new(),
                Provenance::Daemon { .. } => {
                    format!("mapped in {:.2} ms, {}; ", ms(*map), if *in_place { "in place" } else { "copied" })
                }
                Provenance::InProcess { .. } => String::new(),
            };
            let tokenizer = if *tokenizer_lent { "tokenizer prepared by the daemon; " } else { "" };
            format!(
                "{}: {} {} with {model} on {device} -> {} (weights {source}; {opened}{mapped}{tokenizer}model built in {build_ms} ms; ran in {} ms)",
                r.step,
                r.items,
                r.unit,
                r.output.display(),
                r.run_ms
            )
        }
        StepKind::Pipeline { device, components, build_ms } => {
            let parts: Vec<String> = components
                .iter()
                .map(|(name, weights, reused)| match weights {
                    _ if *reused => format!("{name} already held by this run"),
                    Provenance::Daemon { loaded_now: true, load_ms, bytes, .. } => {
                        format!("{name} cold, {:.1} MiB loaded in {load_ms} ms", mib(*bytes))
                    }
                    Provenance::Daemon { loaded_now: false, bytes, .. } => format!("{name} warm, {:.1} MiB", mib(*bytes)),
                    Provenance::InProcess { load_ms, bytes } => format!("{name} no cache, {:.1} MiB read in {load_ms} ms", mib(*bytes)),
                })
                .collect();
            format!(
                "{}: {} {} on {device} -> {} (weights: {}; pipeline built in {build_ms} ms; ran in {} ms)",
                r.step,
                r.items,
                if r.items == 1 { r.unit.trim_end_matches('s') } else { r.unit },
                r.output.display(),
                parts.join("; "),
                r.run_ms
            )
        }
        StepKind::Rank { corpus, top_k } => format!(
            "{}: ranked {} queries against {corpus} texts, top {top_k} -> {} (ran in {} ms)",
            r.step,
            r.items,
            r.output.display(),
            r.run_ms
        ),
    }
}
