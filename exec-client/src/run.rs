//! Running a workflow: get each model's weights, run each step, write its
//! output, report what happened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mora_common::connection::Connection;

use crate::tasks::report::StepReport;
use crate::tasks::step::{Results, StepModels, StepRun};
use crate::weights::Weights;
use crate::workflow::decl::ModelSpec;
use crate::lora::Applied;
use crate::workflow::{Step, Workflow};
use crate::{daemon, ExecError, ModelError, OutputError};

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
pub fn output_path(dir: &Path, output: &Path, allow_outside: bool) -> Result<PathBuf, OutputError> {
    use std::path::Component;
    if !allow_outside {
        if output.is_absolute() {
            return Err(OutputError::Absolute(output.to_path_buf()));
        }
        if output.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(OutputError::ClimbsOut(output.to_path_buf()));
        }
    }
    Ok(dir.join(output))
}

/// Refuses a write whose directory, once symlinks are resolved, lies
/// outside `dir`.
fn check_inside(dir: &Path, path: &Path) -> Result<(), OutputError> {
    let fail = |source| OutputError::Write { path: path.to_path_buf(), source };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(fail)?;
    let (root, real) = (std::fs::canonicalize(dir).map_err(fail)?, std::fs::canonicalize(parent).map_err(fail)?);
    let leaf_escapes = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !real.starts_with(&root) || leaf_escapes {
        return Err(OutputError::Symlink { path: path.to_path_buf(), dir: dir.to_path_buf() });
    }
    Ok(())
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
            .map_err(|e| ExecError::step(&step.name, e))?;
        outputs.insert(step.name.as_str(), p);
    }
    let mut inputs = BTreeMap::new();
    for step in &workflow.steps {
        let read = step.task.read_inputs().map_err(|e| ExecError::step(&step.name, e))?;
        inputs.insert(step.name.as_str(), read);
    }

    // What each step reads before any weight is (a generate step's decoder
    // config, an image step's pipeline): a model it cannot run is refused
    // before any lease is taken.
    let mut prepared = Vec::new();
    for step in &workflow.steps {
        prepared.push(step.task.prepare(&workflow.models)?);
    }
    // Without the cache, each step's LoRA adapters are read from their
    // files here, and matched to the components they update before any
    // weight is read.
    let mut loras = Vec::new();
    if opts.no_cache {
        for (step, config) in workflow.steps.iter().zip(&prepared) {
            loras.push(step_loras(step, config.as_ref(), None)?.0);
        }
    }
    crate::phases::mark("read inputs");

    let conn: Option<Connection> =
        if opts.no_cache { None } else { Some(daemon::connect(&opts.socket, opts.autostart)?) };
    crate::phases::mark("connect");
    // Declared after the connection, so dropped before it: GPU mappings
    // close before the leases that keep their memory alive end.
    let mut weights: BTreeMap<String, Weights> = BTreeMap::new();
    let mut adapter_leases: Vec<Weights> = Vec::new();
    // With the cache, each adapter is a cache entry of its own, borrowed
    // before any step's model is acquired.
    if let Some(c) = &conn {
        for (step, config) in workflow.steps.iter().zip(&prepared) {
            let (applied, leases) = step_loras(step, config.as_ref(), Some((c, &workflow.models)))?;
            loras.push(applied);
            adapter_leases.extend(leases);
        }
    }
    let mut results = Results::default();
    let mut reports = Vec::new();
    for ((step, config), loras) in workflow.steps.iter().zip(prepared).zip(&loras) {
        let output = outputs.remove(step.name.as_str()).expect("checked above");
        if !opts.allow_outside_output {
            check_inside(&opts.output_dir, &output)?;
        }
        let acquire = |source: mora_common::ModelSource, spec: &ModelSpec, model: &str| {
            let device = mora_common::gpu::resolve(spec.device).map_err(|e| ExecError::model(model, e))?;
            match &conn {
                Some(c) => Weights::from_daemon(c, source, spec.dtype, device, spec.keep_alive),
                None => Weights::in_process(&source, spec.dtype, device),
            }
        };
        // Which of this step's weights an earlier step of this run acquired.
        let mut reused = Vec::new();
        let keys: Vec<(String, Option<&'static str>)> = match (step.model(), &config) {
            (None, _) => Vec::new(),
            (Some(model), Some(config)) => config.components().into_iter().map(|c| (format!("{model}/{c}"), Some(c))).collect(),
            (Some(model), None) => vec![(model.to_string(), None)],
        };
        // A pipeline's component sources, its index read once for the step
        // (`components` picks each folder's variant as diffusers does).
        let sources = match (step.model(), &config) {
            (Some(model), Some(_)) => mora_common::pipeline::components(&workflow.models[model].source)
                .map_err(|e| ExecError::model(model, e))?
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
        let run = StepRun { name: &step.name, output: &output, loras };
        reports.push(step.task.run(&run, models, inputs, &mut results)?);
    }
    Ok(reports)
}

/// A step's LoRA adapters, read, each checked to update only components
/// its model has (a pipeline's UNet and text encoders, or a decoder).
/// From their files, or through the daemon (`lent`: the connection and the
/// workflow's models), with the leases then taken.
fn step_loras(
    step: &Step,
    config: Option<&mora_models::image::pipeline::PipelineConfig>,
    lent: Option<(&Connection, &BTreeMap<String, ModelSpec>)>,
) -> Result<(Vec<Applied>, Vec<Weights>), ExecError> {
    let specs = step.task.loras();
    if specs.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let fail = |e: crate::lora::LoraStepError| ExecError::step(&step.name, e);
    let model = step.task.model().unwrap_or_default();
    let (applied, leases) = match lent {
        None => (crate::lora::read(specs).map_err(fail)?, Vec::new()),
        Some((c, models)) => {
            let spec = &models[model];
            let device = mora_common::gpu::resolve(spec.device).map_err(|e| ExecError::model(model, e))?;
            crate::lora::read_lent(&step.name, specs, c, mora_common::manifest::WeightDType::F32, device, spec.keep_alive)?
        }
    };
    match config {
        Some(c) => crate::lora::check_components(&applied, &format!("pipeline `{model}`"), &c.components()).map_err(fail)?,
        None => crate::lora::check_components(&applied, &format!("model `{model}`"), &[""]).map_err(fail)?,
    }
    Ok((applied, leases))
}

/// Matches a step's adapters to its model's files (tensor names and
/// shapes from their headers), as a run would match them to the weights.
fn check_loras(step: &Step, spec: &ModelSpec, applied: &[Applied], components: Option<Vec<&'static str>>) -> Result<(), ExecError> {
    let model = step.task.model().unwrap_or_default();
    let fail = |e: crate::lora::LoraStepError| ExecError::step(&step.name, e);
    let resolve = |source: &mora_common::ModelSource| source.resolve().map_err(|e| ExecError::model(model, ModelError::Resolve(e)));
    match components {
        None => {
            let shapes = crate::lora::header_shapes(&resolve(&spec.source)?.weights).map_err(fail)?;
            crate::lora::deltas(applied, "", &spec.source.display_name(), &shapes).map_err(fail)?;
        }
        Some(components) => {
            let sources = mora_common::pipeline::components(&spec.source).map_err(|e| ExecError::model(model, ModelError::Resolve(e)))?.unwrap_or_default();
            for c in components {
                if !applied.iter().any(|a| a.adapter.components().contains(&c)) {
                    continue;
                }
                let source = sources.iter().find(|(n, _)| *n == c).map_or_else(|| spec.source.component(c), |(_, s)| s.clone());
                let shapes = crate::lora::header_shapes(&resolve(&source)?.weights).map_err(fail)?;
                crate::lora::deltas(applied, c, &source.display_name(), &shapes).map_err(fail)?;
            }
        }
    }
    Ok(())
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
            .map_err(|e| ExecError::model(key, e))?;
        pulled.push(spec.source.display_name());
    }
    Ok(pulled)
}

/// What `mora-exec check` verifies beyond parsing: every input file reads,
/// every model resolves to files on disk (offline, as a run would). Returns
/// a one-line summary.
pub fn check(workflow: &Workflow) -> Result<String, ExecError> {
    for step in &workflow.steps {
        step.task.read_inputs().map_err(|e| ExecError::step(&step.name, e))?;
    }
    for (key, spec) in &workflow.models {
        let fail = |e: mora_common::model::ResolveError| ExecError::model(key, ModelError::Resolve(e));
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
    for step in &workflow.steps {
        let config = step.task.prepare(&workflow.models)?;
        let (applied, _) = step_loras(step, config.as_ref(), None)?;
        if let (false, Some(model)) = (applied.is_empty(), step.task.model()) {
            check_loras(step, &workflow.models[model], &applied, config.map(|c| c.components()))?;
        }
    }
    let steps: Vec<&str> = workflow.steps.iter().map(|s| s.name.as_str()).collect();
    Ok(format!(
        "{} model(s), {} step(s): {}",
        workflow.models.len(),
        steps.len(),
        steps.join(", ")
    ))
}

