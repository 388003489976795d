//! `task = "generate"`: text from a decoder-only language model
//! ([`crate::generate`]), after a prompt or chat messages (rendered with the
//! model's chat template, [`crate::chat`]), either holding earlier steps'
//! text results.

use std::time::Instant;

use serde::Deserialize;
use toml::Spanned;

use super::kind::Kind;
use super::report::{StepKind, StepReport};
use super::step::{drop_later, write_json, Results, StepContext, StepRun};
use crate::chat::{ChatTemplate, Message};
use crate::generate::{SamplingSpec, TextGenerator};
use crate::template::{prompt_pieces, FloatDecl, IntDecl, Piece};
use crate::weights::Weights;
use crate::workflow::decl::{LoraDecl, LoraSpec, ModelSpec};
use crate::workflow::error::WorkflowError;
use crate::{ExecError, ModelError, StepError};

pub const KIND: Kind = Kind {
    name: "generate",
    keys: &[&["prompt"], &["messages"], &["max_tokens"], &["temperature", "top_p", "seed"], &["loras"]],
    text_fields: &["text"],
    results: "text",
};

/// `max_tokens` of a generate step that gives none.
pub const DEFAULT_MAX_TOKENS: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateStep {
    pub model: String,
    /// Filled in at run time: earlier steps' text results are known only then.
    pub prompt: PromptDecl,
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    /// The step's `seed`, else the workflow's, else 0.
    pub seed: u64,
    /// PEFT LoRA adapters over the decoder.
    pub loras: Vec<LoraSpec>,
}

/// What the model is asked: a prompt, or chat messages rendered with the
/// model's chat template ([`crate::chat`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptDecl {
    Text(Vec<Piece>),
    /// (role, content) of each message.
    Chat(Vec<(String, Vec<Piece>)>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageDecl {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decl {
    prompt: Option<Spanned<String>>,
    messages: Option<Spanned<Vec<MessageDecl>>>,
    max_tokens: Option<Spanned<IntDecl>>,
    temperature: Option<Spanned<FloatDecl>>,
    top_p: Option<Spanned<FloatDecl>>,
    seed: Option<Spanned<IntDecl>>,
    loras: Option<Vec<Spanned<LoraDecl>>>,
}

pub fn parse(cx: &StepContext, keys: Spanned<toml::de::DeValue<'_>>) -> Result<GenerateStep, WorkflowError> {
    let model = cx.model()?;
    let d: Decl = cx.decode(keys)?;
    let prompt = match (&d.prompt, &d.messages) {
        (Some(prompt), None) => {
            let span = Some(prompt.span());
            let pieces = prompt_pieces(prompt.get_ref(), cx.variables, cx.earlier, cx.kinds).map_err(|e| cx.err(span.clone(), e.to_string()))?;
            if pieces.is_empty() {
                return Err(cx.err(span, "`prompt` is empty".into()));
            }
            PromptDecl::Text(pieces)
        }
        (None, Some(messages)) => {
            let span = Some(messages.span());
            if messages.get_ref().is_empty() {
                return Err(cx.err(span, "`messages` is empty".into()));
            }
            let mut chat = Vec::new();
            for (i, m) in messages.get_ref().iter().enumerate() {
                if m.role.trim().is_empty() {
                    return Err(cx.err(span, format!("`messages`[{i}] has an empty `role`")));
                }
                let content = prompt_pieces(&m.content, cx.variables, cx.earlier, cx.kinds)
                    .map_err(|e| cx.err(span.clone(), format!("`messages`[{i}]: {e}")))?;
                chat.push((m.role.clone(), content));
            }
            PromptDecl::Chat(chat)
        }
        (Some(_), Some(_)) => return Err(cx.err(None, "gives both `prompt` and `messages`: keep one".into())),
        (None, None) => {
            return Err(cx.err(None, "a generate step needs `prompt = \"...\"` or `messages = [{ role = \"user\", content = \"...\" }]`".into()))
        }
    };
    let max_tokens = match &d.max_tokens {
        None => DEFAULT_MAX_TOKENS,
        Some(k) => cx.int("max_tokens", k, 1, "a whole number of at least 1")? as usize,
    };
    let temperature = match &d.temperature {
        None => 0.0,
        Some(t) => cx.float("temperature", t, |v| v >= 0.0, "a number of at least 0 (0 is greedy)")?,
    };
    let top_p = match &d.top_p {
        None => None,
        Some(t) => Some(cx.float("top_p", t, |v| v > 0.0 && v <= 1.0, "a number above 0 and at most 1")?),
    };
    let seed = match &d.seed {
        None => cx.seed,
        Some(sd) => cx.int("seed", sd, 0, "a whole number of at least 0")? as u64,
    };
    let loras = cx.loras(&model, &d.loras)?;
    Ok(GenerateStep { model, prompt, max_tokens, temperature, top_p, seed, loras })
}

/// `pieces` with earlier steps' text results filled in.
pub(crate) fn fill(pieces: &[Piece], step: &StepRun, results: &Results) -> Result<String, ExecError> {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => Ok(t.clone()),
            Piece::StepText(from) => {
                results.texts.get(from).cloned().ok_or_else(|| ExecError::step(step.name, StepError::NoText(from.clone())))
            }
        })
        .collect()
}

/// Refuses, before any weight is read, a model this step cannot run: a
/// network Mora does not run as its config describes it, or messages
/// without a chat template. A model that does not resolve is reported
/// where it is acquired.
pub fn check_model(s: &GenerateStep, spec: &ModelSpec) -> Result<(), ExecError> {
    let Ok(resolved) = spec.source.resolve() else { return Ok(()) };
    let fail = |e: ModelError| ExecError::model(&s.model, e);
    mora_models::lm_config::read(&resolved.dir).map_err(|e| fail(e.into()))?;
    if matches!(s.prompt, PromptDecl::Chat(_)) {
        ChatTemplate::load(&resolved.dir).map_err(|e| fail(e.into()))?;
    }
    Ok(())
}

pub fn run(s: &GenerateStep, step: &StepRun, (w, reused): (&Weights, bool), results: &mut Results) -> Result<StepReport, ExecError> {
    // A rendered chat carries its own special tokens; a plain prompt gets
    // the tokenizer's.
    let (prompt, messages, special_tokens) = match &s.prompt {
        PromptDecl::Text(pieces) => (fill(pieces, step, results)?, None, true),
        PromptDecl::Chat(chat) => {
            let messages = chat
                .iter()
                .map(|(role, content)| Ok(Message { role: role.clone(), content: fill(content, step, results)? }))
                .collect::<Result<Vec<_>, ExecError>>()?;
            let template = ChatTemplate::load(&w.dir)?;
            let rendered = template.render(&messages).map_err(|e| ExecError::step(step.name, e))?;
            (rendered, Some(messages), false)
        }
    };
    let start = Instant::now();
    // f32 on the CPU (candle's CPU kernels are f32 first); on a GPU, the
    // dtype the weights are held in.
    let compute = if w.device.is_cpu() { candle_core::DType::F32 } else { crate::weights::weight_dtype(w.dtype) };
    let deltas = crate::lora::deltas(step.loras, "", &w.name, &w.shapes()).map_err(|e| ExecError::step(step.name, e))?;
    let vb = mora_models::lora::merged(w.var_builder(compute), deltas);
    let mut generator = TextGenerator::load(&w.dir, vb, w.tokenizer.as_ref())?;
    let build_ms = start.elapsed().as_millis() as u64;
    crate::phases::mark("build model");
    let start = Instant::now();
    let sampling = SamplingSpec { temperature: s.temperature, top_p: s.top_p, seed: s.seed };
    let g = generator.generate(&prompt, special_tokens, s.max_tokens, sampling, crate::generate::to_stdout)?;
    println!();
    let run_ms = start.elapsed().as_millis() as u64;
    crate::phases::mark("inference");
    let mut doc = serde_json::json!({
            "model": w.name,
            "prompt": prompt,
            "text": g.text,
            "tokens": g.tokens,
            "token_ids": g.token_ids,
            "finish_reason": g.finish.as_str(),
            "tokens_per_s": g.tokens_per_s,
    });
    if let Some(m) = messages {
        doc["messages"] = serde_json::json!(m);
    }
    if !step.loras.is_empty() {
        doc["loras"] = crate::lora::report(step.loras);
    }
    write_json(step.output, &doc)?;
    crate::phases::mark("write output");
    results.texts.insert(step.name.to_string(), g.text);
    let tokenizer_lent = generator.tokenizer_lent;
    if w.device.is_cpu() {
        drop_later(generator);
    }
    Ok(StepReport {
        step: step.name.to_string(),
        items: g.tokens,
        unit: "tokens",
        output: step.output.to_path_buf(),
        run_ms,
        what: StepKind::model(w, build_ms, reused, tokenizer_lent),
    })
}
