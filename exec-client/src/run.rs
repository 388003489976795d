//! Running a workflow: get each model's weights, run each step, write its
//! output, report what happened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mora_common::connection::Connection;

use crate::tasks::generate::{GenerateStep, PromptDecl};
use crate::tasks::{Results, StepModels, StepRun, Task};
use crate::weights::{Provenance, Weights};
use crate::workflow::Workflow;
use crate::{daemon, ExecError};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub socket: PathBuf,
    /// Load weights in-process instead of borrowing them from the daemon.
    pub no_cache: bool,
    /// Start a daemon when none answers.
    pub autostart: bool,
    pub output_dir: PathBuf,
    /// Let a step's `output` be absolute or climb out of `output_dir`.
    pub allow_outside_output: bool,
}

/// Where a step's output goes: inside `dir`, unless `allow_outside`. An
/// absolute path or a `..` is refused here, before anything runs; a symlink
/// that leads out of `dir` is refused when the file is written.
pub fn output_path(dir: &Path, output: &Path, allow_outside: bool) -> Result<PathBuf, String> {
    use std::path::Component;
    if !allow_outside {
        if output.is_absolute() {
            return Err(format!(
                "output {} is an absolute path: outputs go inside the output directory (-o), unless --allow-outside-output",
                output.display()
            ));
        }
        if output.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!(
                "output {} climbs out of the output directory with `..` (allowed only with --allow-outside-output)",
                output.display()
            ));
        }
    }
    Ok(dir.join(output))
}

/// Refuses a write whose directory, once symlinks are resolved, lies
/// outside `dir`.
fn check_inside(dir: &Path, path: &Path) -> Result<(), ExecError> {
    let fail = |e: std::io::Error| ExecError::Output(format!("cannot write {}: {e}", path.display()));
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(fail)?;
    let (root, real) = (std::fs::canonicalize(dir).map_err(fail)?, std::fs::canonicalize(parent).map_err(fail)?);
    let leaf_escapes = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !real.starts_with(&root) || leaf_escapes {
        return Err(ExecError::Output(format!(
            "output {} leads outside the output directory {} through a symlink (allowed only with --allow-outside-output)",
            path.display(),
            dir.display()
        )));
    }
    Ok(())
}

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

/// Runs every step of `workflow` and returns one report per step. Leases
/// taken from the daemon are held until this returns.
pub fn run(workflow: &Workflow, opts: &RunOptions) -> Result<Vec<StepReport>, ExecError> {
    // Check every output path and read every input before taking any
    // lease, so a bad one fails fast.
    let mut outputs = BTreeMap::new();
    for step in &workflow.steps {
        let p = output_path(&opts.output_dir, &step.output, opts.allow_outside_output)
            .and_then(|p| step.task.check_output(&p).map(|()| p))
            .map_err(|e| ExecError::Output(format!("step `{}`: {e}", step.name)))?;
        outputs.insert(step.name.as_str(), p);
    }
    let mut inputs = BTreeMap::new();
    for step in &workflow.steps {
        let read = step.task.read_inputs().map_err(|e| ExecError::Input(format!("step `{}`: {e}", step.name)))?;
        inputs.insert(step.name.as_str(), read);
    }

    check_decoder_configs(workflow)?;
    let mut pipelines = pipeline_configs(workflow)?;
    crate::phases::mark("read inputs");

    let conn: Option<Connection> =
        if opts.no_cache { None } else { Some(daemon::connect(&opts.socket, opts.autostart)?) };
    crate::phases::mark("connect");
    // Declared after the connection, so dropped before it: GPU mappings
    // close before the leases that keep their memory alive end.
    let mut weights: BTreeMap<String, Weights> = BTreeMap::new();
    let mut results = Results::default();
    let mut reports = Vec::new();
    for step in &workflow.steps {
        let output = outputs.remove(step.name.as_str()).expect("checked above");
        if !opts.allow_outside_output {
            check_inside(&opts.output_dir, &output)?;
        }
        let acquire = |source: mora_common::ModelSource, spec: &crate::workflow::ModelSpec, model: &str| {
            let device = mora_common::gpu::resolve(spec.device).map_err(|e| ExecError::Model(format!("model `{model}`: {e}")))?;
            match &conn {
                Some(c) => Weights::from_daemon(c, source, spec.dtype, device, spec.keep_alive),
                None => Weights::in_process(&source, spec.dtype, device),
            }
        };
        // Which of this step's weights an earlier step of this run acquired.
        let mut reused = Vec::new();
        // A pipeline's configs: read before the run for its first step, again
        // for a later one (which may override the scheduler).
        let config = match (step.model(), step.task.runs_pipeline()) {
            (Some(model), true) => Some(match pipelines.remove(model) {
                Some(c) => c,
                None => pipeline_config(workflow, model, &step.task)?,
            }),
            _ => None,
        };
        let keys: Vec<(String, Option<&'static str>)> = match (step.model(), &config) {
            (None, _) => Vec::new(),
            (Some(model), Some(config)) => config.components().into_iter().map(|c| (format!("{model}/{c}"), Some(c))).collect(),
            (Some(model), None) => vec![(model.to_string(), None)],
        };
        // A pipeline's component sources, its index read once for the step
        // (`components` picks each folder's variant as diffusers does).
        let sources = match (step.model(), &config) {
            (Some(model), Some(_)) => mora_common::pipeline::components(&workflow.models[model].source)
                .map_err(|e| ExecError::Model(format!("model `{model}`: {e}")))?
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        for (key, component) in &keys {
            reused.push(weights.contains_key(key.as_str()));
            if !weights.contains_key(key.as_str()) {
                let model = step.model().expect("a step with weights names a model");
                let spec = &workflow.models[model];
                let source = match component {
                    Some(c) => sources.iter().find(|(n, _)| n == c).map_or_else(|| spec.source.component(c), |(_, s)| s.clone()),
                    None => spec.source.clone(),
                };
                weights.insert(key.clone(), acquire(source, spec, model)?);
            }
        }
        let models = match (step.model(), config, keys.as_slice()) {
            (None, _, _) => StepModels::None,
            (Some(_), Some(config), _) => {
                let parts = keys.iter().zip(&reused).map(|((k, c), r)| (c.expect("a component"), &weights[k.as_str()], *r)).collect();
                StepModels::Pipeline(Box::new(config), parts)
            }
            (Some(_), None, [(k, _)]) => StepModels::One(&weights[k.as_str()], reused[0]),
            _ => unreachable!("one model, one key"),
        };
        let inputs = inputs.remove(step.name.as_str()).expect("read above");
        let run = StepRun { name: &step.name, output: &output };
        reports.push(step.task.run(&run, models, inputs, &mut results)?);
    }
    Ok(reports)
}

/// Downloads from the hub each model of the workflow that is a repo id not
/// in the Hugging Face cache: the files `mora-cache pull` fetches by default.
/// Returns the models pulled.
pub fn pull_missing(workflow: &Workflow) -> Result<Vec<String>, ExecError> {
    use mora_common::hub::{FileFilter, Hub};
    use mora_common::model::{ModelSource, ResolveError};
    let mut pulled = Vec::new();
    for (key, spec) in &workflow.models {
        let ModelSource::HfRepo { repo, revision, .. } = &spec.source else { continue };
        if !matches!(spec.source.resolve(), Err(ResolveError::NotInCache { .. })) {
            continue;
        }
        let mut progress = mora_common::progress::PullProgress::new("mora-exec");
        Hub::from_env()
            .pull(repo, revision, &FileFilter::mora_default().with_variant(spec.source.variant()), &mut |e| progress.event(e))
            .map_err(|e| ExecError::Model(format!("model `{key}`: {e}")))?;
        pulled.push(spec.source.display_name());
    }
    Ok(pulled)
}

/// What `mora-exec check` verifies beyond parsing: every input file reads,
/// every model resolves to files on disk (offline, as a run would). Returns
/// a one-line summary.
pub fn check(workflow: &Workflow) -> Result<String, ExecError> {
    for step in &workflow.steps {
        step.task.read_inputs().map_err(|e| ExecError::Input(format!("step `{}`: {e}", step.name)))?;
    }
    for (key, spec) in &workflow.models {
        let fail = |e: mora_common::model::ResolveError| ExecError::Model(format!("model `{key}`: {e}"));
        match mora_common::pipeline::components(&spec.source).map_err(fail)? {
            Some(parts) => {
                for (_, part) in parts {
                    part.resolve().map_err(fail)?;
                }
            }
            None => {
                spec.source.resolve().map_err(fail)?;
            }
        }
    }
    check_decoder_configs(workflow)?;
    pipeline_configs(workflow)?;
    let steps: Vec<&str> = workflow.steps.iter().map(|s| s.name.as_str()).collect();
    Ok(format!(
        "{} model(s), {} step(s): {}",
        workflow.models.len(),
        steps.len(),
        steps.join(", ")
    ))
}

/// The pipeline configs of every model an image step runs, read (configs,
/// tokenizers, scheduler) before any weight is: by `check` and `run`. A
/// pipeline is read once per model; a step that overrides the scheduler
/// reads its own at run time.
fn pipeline_configs(workflow: &Workflow) -> Result<BTreeMap<String, crate::image::pipeline::PipelineConfig>, ExecError> {
    let mut out = BTreeMap::new();
    for step in &workflow.steps {
        let (Some(model), true) = (step.model(), step.task.runs_pipeline()) else { continue };
        let config = pipeline_config(workflow, model, &step.task)?;
        out.entry(model.to_string()).or_insert(config);
    }
    Ok(out)
}

fn pipeline_config(workflow: &Workflow, model: &str, task: &Task) -> Result<crate::image::pipeline::PipelineConfig, ExecError> {
    let fail = |e: String| ExecError::Model(format!("model `{model}`: {e}"));
    let root = workflow.models[model].source.resolve_dir().map_err(|e| fail(e.to_string()))?;
    let scheduler = match task {
        Task::Image(s) => s.scheduler.as_deref(),
        _ => None,
    };
    crate::image::pipeline::PipelineConfig::read(&root, scheduler).map_err(fail)
}

/// A generate step's model must be a network Mora runs as its config
/// describes it, with a chat template when a step gives it messages:
/// refused before any weight is read, by `check` and `run`.
fn check_decoder_configs(workflow: &Workflow) -> Result<(), ExecError> {
    for (key, spec) in &workflow.models {
        let generating: Vec<&GenerateStep> = workflow
            .steps
            .iter()
            .filter_map(|s| match &s.task {
                Task::Generate(g) if &g.model == key => Some(g),
                _ => None,
            })
            .collect();
        // A model that does not resolve is reported where it is acquired.
        let (false, Ok(resolved)) = (generating.is_empty(), spec.source.resolve()) else { continue };
        let fail = |e: String| ExecError::Model(format!("model `{key}`: {e}"));
        crate::lm_config::read(&resolved.dir).map_err(|e| fail(e.to_string()))?;
        if generating.iter().any(|g| matches!(g.prompt, PromptDecl::Chat(_))) {
            crate::chat::ChatTemplate::load(&resolved.dir).map_err(fail)?;
        }
    }
    Ok(())
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
