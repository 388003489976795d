//! Running a workflow: get each model's weights, run each step, write its
//! output, report what happened.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mora_common::connection::Connection;

use crate::embed::SentenceEmbedder;
use crate::weights::{Provenance, Weights};
use crate::workflow::{Task, Workflow};
use crate::{daemon, ExecError};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub socket: PathBuf,
    /// Load weights in-process instead of borrowing them from the daemon.
    pub no_cache: bool,
    /// Start a daemon when none answers.
    pub autostart: bool,
    pub output_dir: PathBuf,
}

/// What a step produced.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: String,
    pub model: String,
    pub items: usize,
    pub output: PathBuf,
    pub weights: Provenance,
    /// Where it ran ("cpu", "cuda:0").
    pub device: String,
    /// Opening that device (a GPU's CUDA context), and mapping lent weights.
    pub device_open: Duration,
    pub map: Duration,
    /// Building the candle model from the weights (for lent weights, this is
    /// the copy out of the shared mapping).
    pub build_ms: u64,
    pub run_ms: u64,
}

/// Runs every step of `workflow` and returns one report per step. Leases
/// taken from the daemon are held until this returns.
pub fn run(workflow: &Workflow, opts: &RunOptions) -> Result<Vec<StepReport>, ExecError> {
    // Read every input before taking any lease, so a bad input fails fast.
    let mut inputs = Vec::new();
    for step in &workflow.steps {
        inputs.push(step.texts.load().map_err(|e| ExecError::Input(format!("step `{}`: {e}", step.name)))?);
    }

    let conn: Option<Connection> =
        if opts.no_cache { None } else { Some(daemon::connect(&opts.socket, opts.autostart)?) };
    let mut weights: BTreeMap<&str, Weights> = BTreeMap::new();
    let mut reports = Vec::new();
    for (step, texts) in workflow.steps.iter().zip(inputs) {
        if !weights.contains_key(step.model.as_str()) {
            let spec = &workflow.models[&step.model];
            let device = mora_common::gpu::resolve(spec.device)
                .map_err(|e| ExecError::Model(format!("model `{}`: {e}", step.model)))?;
            let w = match &conn {
                Some(c) => Weights::from_daemon(c, spec.source.clone(), spec.dtype, device, spec.keep_alive)?,
                None => Weights::in_process(&spec.source, spec.dtype, device)?,
            };
            weights.insert(step.model.as_str(), w);
        }
        let w = &weights[step.model.as_str()];
        match step.task {
            Task::Embed => {
                let start = Instant::now();
                // f32 whatever the weights are held in: candle's CPU BERT
                // turns its attention mask into NaN in f16 (0 × -inf), and
                // f32 keeps GPU and CPU outputs within 1e-4 of each other.
                let vb = w.var_builder(candle_core::DType::F32);
                let embedder = SentenceEmbedder::load(&w.dir, vb).map_err(ExecError::Model)?;
                let build_ms = start.elapsed().as_millis() as u64;
                let start = Instant::now();
                let embeddings = embedder.embed(&texts).map_err(ExecError::Model)?;
                let run_ms = start.elapsed().as_millis() as u64;
                let output = opts.output_dir.join(&step.output);
                let doc = serde_json::json!({ "model": w.name, "texts": texts, "embeddings": embeddings });
                write_atomically(&output, serde_json::to_string(&doc).expect("JSON of plain values").as_bytes())?;
                reports.push(StepReport {
                    step: step.name.clone(),
                    model: w.name.clone(),
                    items: texts.len(),
                    output,
                    weights: w.provenance.clone(),
                    device: device_name(&w.device),
                    device_open: w.device_open,
                    map: w.map,
                    build_ms,
                    run_ms,
                });
            }
        }
    }
    Ok(reports)
}

/// Writes via a temporary file and a rename, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExecError> {
    let fail = |e: std::io::Error| ExecError::Output(format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(bytes).map_err(fail)?;
    f.write_all(b"\n").map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(fail)
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
    let weights = match &r.weights {
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
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let opened = if r.device == "cpu" { String::new() } else { format!("device opened in {:.1} ms; ", ms(r.device_open)) };
    let mapped = match r.weights {
        Provenance::Daemon { .. } => format!("mapped in {:.2} ms; ", ms(r.map)),
        Provenance::InProcess { .. } => String::new(),
    };
    format!(
        "{}: {} texts with {} on {} -> {} (weights {weights}; {opened}{mapped}model built in {} ms; ran in {} ms)",
        r.step,
        r.items,
        r.model,
        r.device,
        r.output.display(),
        r.build_ms,
        r.run_ms
    )
}
