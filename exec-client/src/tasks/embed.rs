//! `task = "embed"`: sentence embeddings of texts, with the model's own
//! pooling and normalisation ([`crate::embed`]).

use std::path::PathBuf;
use std::time::Instant;

use serde::Deserialize;
use toml::Spanned;

use mora_models::embed::{EncoderNetwork, SentenceEmbedder};

use super::kind::Kind;
use super::report::{StepKind, StepReport};
use super::step::{drop_later, write_json, Inputs, Results, StepContext, StepRun};
use crate::template::{expand, normalize};
use crate::weights::Weights;
use crate::workflow::error::WorkflowError;
use crate::{ExecError, InputError};

pub const KIND: Kind = Kind { name: "embed", keys: &[&["texts"], &["texts_file"]], text_fields: &[], results: "embeddings" };

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedStep {
    /// Key into [`crate::workflow::Workflow::models`].
    pub model: String,
    pub texts: Texts,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Texts {
    Inline(Vec<String>),
    /// One text per line; resolved against the workflow's directory.
    File(PathBuf),
}

impl Texts {
    /// The texts themselves: inline, or the non-empty lines of the file.
    pub fn load(&self) -> Result<Vec<String>, InputError> {
        match self {
            Texts::Inline(t) => Ok(t.clone()),
            Texts::File(p) => {
                let body = std::fs::read_to_string(p).map_err(|source| InputError::Texts { path: p.clone(), source })?;
                let texts: Vec<String> = body.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
                if texts.is_empty() {
                    return Err(InputError::NoTexts(p.clone()));
                }
                Ok(texts)
            }
        }
    }

    pub fn file(&self) -> Option<PathBuf> {
        match self {
            Texts::File(f) => Some(f.clone()),
            Texts::Inline(_) => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decl {
    texts: Option<Vec<String>>,
    texts_file: Option<String>,
}

pub fn parse(cx: &StepContext, keys: Spanned<toml::de::DeValue<'_>>) -> Result<EmbedStep, WorkflowError> {
    let model = cx.model()?;
    if cx.models.get(&model).is_some_and(|m| !m.loras.is_empty()) {
        return Err(cx.err(None, format!("model `{model}` declares `loras`, which embed steps do not apply (image and generate steps do)")));
    }
    let d: Decl = cx.decode(keys)?;
    let texts = match (d.texts, d.texts_file) {
        (Some(t), None) if t.is_empty() => return Err(cx.err(None, "`texts` is empty".into())),
        (Some(t), None) => {
            Texts::Inline(t.iter().map(|t| expand(t, cx.variables)).collect::<Result<_, _>>().map_err(|e| cx.err(None, e.to_string()))?)
        }
        (None, Some(f)) => Texts::File(normalize(&cx.base.join(expand(&f, cx.variables).map_err(|e| cx.err(None, e.to_string()))?))),
        (Some(_), Some(_)) => return Err(cx.err(None, "gives both `texts` and `texts_file`: keep one".into())),
        (None, None) => return Err(cx.err(None, "needs `texts = [...]` or `texts_file = \"FILE\"`".into())),
    };
    Ok(EmbedStep { model, texts })
}

pub fn run(_: &EmbedStep, step: &StepRun, (w, reused): (&Weights, bool), inputs: Inputs, results: &mut Results) -> Result<StepReport, ExecError> {
    let Inputs::Texts(texts) = inputs else { unreachable!("an embed step's inputs are its texts") };
    let start = Instant::now();
    // f32 whatever the weights are held in: candle's CPU BERT turns its
    // attention mask into NaN in f16 (0 × -inf), and f32 keeps GPU and CPU
    // outputs within 1e-4 of each other.
    let vb = w.var_builder(candle_core::DType::F32);
    let network = EncoderNetwork::load(&w.dir, vb)?;
    crate::phases::mark("build model");
    let embedder = SentenceEmbedder::with_tokenizer(network, &w.dir, w.tokenizer.as_ref())?;
    let build_ms = start.elapsed().as_millis() as u64;
    crate::phases::mark("tokenizer");
    let start = Instant::now();
    let embeddings = embedder.embed(&texts)?;
    let run_ms = start.elapsed().as_millis() as u64;
    crate::phases::mark("inference");
    write_json(step.output, &serde_json::json!({ "model": w.name, "texts": texts, "embeddings": embeddings }))?;
    crate::phases::mark("write output");
    let report = StepReport {
        step: step.name.to_string(),
        items: texts.len(),
        unit: "texts",
        output: step.output.to_path_buf(),
        run_ms,
        what: StepKind::model(w, build_ms, reused, embedder.tokenizer_lent),
    };
    results.embedded.insert(step.name.to_string(), (texts, embeddings));
    if w.device.is_cpu() {
        drop_later(embedder);
    }
    Ok(report)
}
