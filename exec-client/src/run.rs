//! Running a workflow: get each model's weights, run each step, write its
//! output, report what happened.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mora_common::connection::Connection;

use crate::embed::SentenceEmbedder;
use crate::weights::{Provenance, Weights};
use crate::generate::{SamplingSpec, TextGenerator};
use crate::workflow::{Piece, Task, Workflow};
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
    },
    /// A rank step: `items` queries against a corpus of `corpus` texts.
    Rank { corpus: usize, top_k: usize },
}

impl StepKind {
    /// A step that ran a model on `w`.
    fn model(w: &Weights, build_ms: u64, reused: bool) -> StepKind {
        StepKind::Model {
            model: w.name.clone(),
            weights: w.provenance.clone(),
            device: device_name(&w.device),
            device_open: w.device_open,
            map: w.map,
            in_place: w.in_place(),
            build_ms,
            reused,
        }
    }
}

/// The texts an embed step embedded and their embeddings, in order.
struct Embedded {
    texts: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

/// Runs every step of `workflow` and returns one report per step. Leases
/// taken from the daemon are held until this returns.
pub fn run(workflow: &Workflow, opts: &RunOptions) -> Result<Vec<StepReport>, ExecError> {
    // Check every output path and read every input before taking any
    // lease, so a bad one fails fast.
    let mut outputs = BTreeMap::new();
    for step in &workflow.steps {
        let p = output_path(&opts.output_dir, &step.output, opts.allow_outside_output)
            .map_err(|e| ExecError::Output(format!("step `{}`: {e}", step.name)))?;
        outputs.insert(step.name.as_str(), p);
    }
    let mut inputs = BTreeMap::new();
    for step in &workflow.steps {
        if let Task::Embed { texts, .. } = &step.task {
            let t = texts.load().map_err(|e| ExecError::Input(format!("step `{}`: {e}", step.name)))?;
            inputs.insert(step.name.as_str(), t);
        }
    }

    check_decoder_configs(workflow)?;

    let conn: Option<Connection> =
        if opts.no_cache { None } else { Some(daemon::connect(&opts.socket, opts.autostart)?) };
    // Declared after the connection, so dropped before it: GPU mappings
    // close before the leases that keep their memory alive end.
    let mut weights: BTreeMap<&str, Weights> = BTreeMap::new();
    let mut embedded: BTreeMap<&str, Embedded> = BTreeMap::new();
    // Text results (a rank step's best match, a generate step's text), for prompts.
    let mut texts_of: BTreeMap<&str, String> = BTreeMap::new();
    let mut reports = Vec::new();
    for step in &workflow.steps {
        let output = outputs.remove(step.name.as_str()).expect("checked above");
        if !opts.allow_outside_output {
            check_inside(&opts.output_dir, &output)?;
        }
        // Whether this step's model was acquired by an earlier step of this run.
        let mut reused = false;
        if let Some(model) = step.model() {
            reused = weights.contains_key(model);
            if !reused {
                let spec = &workflow.models[model];
                let device =
                    mora_common::gpu::resolve(spec.device).map_err(|e| ExecError::Model(format!("model `{model}`: {e}")))?;
                let w = match &conn {
                    Some(c) => Weights::from_daemon(c, spec.source.clone(), spec.dtype, device, spec.keep_alive)?,
                    None => Weights::in_process(&spec.source, spec.dtype, device)?,
                };
                weights.insert(model, w);
            }
        }
        match &step.task {
            Task::Embed { model, .. } => {
                let w = &weights[model.as_str()];
                let texts = inputs.remove(step.name.as_str()).expect("read above");
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
                let doc = serde_json::json!({ "model": w.name, "texts": texts, "embeddings": embeddings });
                write_atomically(&output, serde_json::to_string(&doc).expect("JSON of plain values").as_bytes())?;
                reports.push(StepReport {
                    step: step.name.clone(),
                    items: texts.len(),
                    unit: "texts",
                    output,
                    run_ms,
                    what: StepKind::model(w, build_ms, reused),
                });
                embedded.insert(step.name.as_str(), Embedded { texts, embeddings });
            }
            Task::Rank { query, corpus, top_k } => {
                // The workflow was checked: both name earlier embed steps.
                let (q, c) = (&embedded[query.as_str()], &embedded[corpus.as_str()]);
                let start = Instant::now();
                let results: Vec<serde_json::Value> = q
                    .texts
                    .iter()
                    .zip(&q.embeddings)
                    .map(|(text, e)| {
                        let matches: Vec<serde_json::Value> = top_matches(e, &c.embeddings, *top_k)
                            .into_iter()
                            .map(|(i, score)| serde_json::json!({ "index": i, "text": c.texts[i], "score": score }))
                            .collect();
                        serde_json::json!({ "query": text, "matches": matches })
                    })
                    .collect();
                let run_ms = start.elapsed().as_millis() as u64;
                let doc = serde_json::json!({ "results": results });
                write_atomically(&output, serde_json::to_string(&doc).expect("JSON of plain values").as_bytes())?;
                if let Some(best) = results.first().and_then(|r| r["matches"][0]["text"].as_str()) {
                    texts_of.insert(step.name.as_str(), best.to_string());
                }
                reports.push(StepReport {
                    step: step.name.clone(),
                    items: q.texts.len(),
                    unit: "queries",
                    output,
                    run_ms,
                    what: StepKind::Rank { corpus: c.texts.len(), top_k: *top_k },
                });
            }
            Task::Generate { model, prompt, max_tokens, temperature, top_p, seed } => {
                let w = &weights[model.as_str()];
                let prompt: String = prompt
                    .iter()
                    .map(|p| match p {
                        Piece::Text(t) => Ok(t.clone()),
                        Piece::StepText(s) => texts_of.get(s.as_str()).cloned().ok_or_else(|| {
                            ExecError::Model(format!("step `{}`: step `{s}` produced no text (a rank step with no matches?)", step.name))
                        }),
                    })
                    .collect::<Result<_, _>>()?;
                let start = Instant::now();
                // f32 on the CPU (candle's CPU kernels are f32 first); on a
                // GPU, the dtype the weights are held in.
                let compute = if w.device.is_cpu() { candle_core::DType::F32 } else { crate::weights::weight_dtype(w.dtype) };
                let mut generator = TextGenerator::load(&w.dir, w.var_builder(compute)).map_err(ExecError::Model)?;
                let build_ms = start.elapsed().as_millis() as u64;
                let start = Instant::now();
                let sampling = SamplingSpec { temperature: *temperature, top_p: *top_p, seed: *seed };
                let g = generator.generate(&prompt, *max_tokens, sampling, crate::generate::to_stdout).map_err(ExecError::Model)?;
                println!();
                let run_ms = start.elapsed().as_millis() as u64;
                let doc = serde_json::json!({
                    "model": w.name,
                    "prompt": prompt,
                    "text": g.text,
                    "tokens": g.tokens,
                    "token_ids": g.token_ids,
                    "finish_reason": g.finish.as_str(),
                    "tokens_per_s": g.tokens_per_s,
                });
                write_atomically(&output, serde_json::to_string(&doc).expect("JSON of plain values").as_bytes())?;
                texts_of.insert(step.name.as_str(), g.text);
                reports.push(StepReport {
                    step: step.name.clone(),
                    items: g.tokens,
                    unit: "tokens",
                    output,
                    run_ms,
                    what: StepKind::model(w, build_ms, reused),
                });
            }
        }
    }
    Ok(reports)
}

/// What `mora-exec check` verifies beyond parsing: every input file reads,
/// every model resolves to files on disk (offline, as a run would). Returns
/// a one-line summary.
pub fn check(workflow: &Workflow) -> Result<String, ExecError> {
    for step in &workflow.steps {
        if let Task::Embed { texts, .. } = &step.task {
            texts.load().map_err(|e| ExecError::Input(format!("step `{}`: {e}", step.name)))?;
        }
    }
    for (key, spec) in &workflow.models {
        spec.source.resolve().map_err(|e| ExecError::Model(format!("model `{key}`: {e}")))?;
    }
    check_decoder_configs(workflow)?;
    let steps: Vec<&str> = workflow.steps.iter().map(|s| s.name.as_str()).collect();
    Ok(format!(
        "{} model(s), {} step(s): {}",
        workflow.models.len(),
        steps.len(),
        steps.join(", ")
    ))
}

/// A generate step's model must be a network Mora runs as its config
/// describes it: refused before any weight is read, by `check` and `run`.
fn check_decoder_configs(workflow: &Workflow) -> Result<(), ExecError> {
    for (key, spec) in &workflow.models {
        if workflow.steps.iter().any(|s| matches!(&s.task, Task::Generate { model, .. } if model == key)) {
            // A model that does not resolve is reported where it is acquired.
            if let Ok(resolved) = spec.source.resolve() {
                crate::lm_config::read(&resolved.dir).map_err(|e| ExecError::Model(format!("model `{key}`: {e}")))?;
            }
        }
    }
    Ok(())
}

/// Cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// The `k` corpus entries most similar to `query`, best first, as (index,
/// cosine); ties keep corpus order.
pub fn top_matches(query: &[f32], corpus: &[Vec<f32>], k: usize) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = corpus.iter().map(|c| cosine(query, c)).enumerate().collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
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
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match &r.what {
        StepKind::Model { model, weights, device, device_open, map, in_place, build_ms, reused } => {
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
            format!(
                "{}: {} {} with {model} on {device} -> {} (weights {source}; {opened}{mapped}model built in {build_ms} ms; ran in {} ms)",
                r.step,
                r.items,
                r.unit,
                r.output.display(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_matches_are_the_most_similar_best_first() {
        let corpus = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.6, 0.8], vec![0.0, 0.0], vec![2.0, 0.0]];
        let m = top_matches(&[1.0, 0.0], &corpus, 3);
        // Scale does not matter (cosine), ties keep corpus order.
        assert_eq!(m.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 4, 2]);
        assert!((m[2].1 - 0.6).abs() < 1e-6);
        assert_eq!(top_matches(&[1.0, 0.0], &corpus, 10).len(), 5);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
