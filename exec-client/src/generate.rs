//! The `generate` task: decoder-only language models from candle-transformers
//! (llama family, qwen2), greedy or sampled, streaming text as it comes.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::{llama, qwen2};
use tokenizers::Tokenizer;

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingSpec {
    /// 0 (the default) is greedy: always the most likely token.
    pub temperature: f64,
    /// Nucleus sampling: only the most likely tokens whose probabilities add
    /// up to `top_p`. Ignored when greedy.
    pub top_p: Option<f64>,
    /// The same seed gives the same text.
    pub seed: u64,
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    /// Tokens generated (the end-of-sequence token not counted).
    pub tokens: usize,
    pub tokens_per_s: f64,
}

enum Lm {
    Llama(llama::Llama, llama::Cache),
    Qwen2(qwen2::ModelForCausalLM),
}

pub struct TextGenerator {
    lm: Lm,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    device: Device,
    max_positions: usize,
}

/// The end-of-sequence ids `config.json` declares (a number or a list).
fn eos_ids(config: &serde_json::Value) -> Vec<u32> {
    match config.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

impl TextGenerator {
    /// Builds the model `dir/config.json` declares from `vb`.
    pub fn load(dir: &Path, vb: VarBuilder) -> Result<Self, String> {
        let config_path = dir.join("config.json");
        let raw: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&config_path).map_err(|e| format!("cannot read {}: {e}", config_path.display()))?,
        )
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let model_type = raw.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let device = vb.device().clone();
        let bad = |e: &dyn std::fmt::Display| format!("{}: {e}", config_path.display());
        let build = |e: candle_core::Error| format!("cannot build {model_type} from {}: {e}", dir.display());
        let (lm, max_positions) = match model_type {
            "llama" | "mistral" => {
                let cfg: llama::LlamaConfig = serde_json::from_value(raw.clone()).map_err(|e| bad(&e))?;
                let cfg = cfg.into_config(false);
                let cache = llama::Cache::new(true, vb.dtype(), &cfg, &device).map_err(build)?;
                let max = cfg.max_position_embeddings;
                (Lm::Llama(llama::Llama::load(vb, &cfg).map_err(build)?, cache), max)
            }
            "qwen2" => {
                let cfg: qwen2::Config = serde_json::from_value(raw.clone()).map_err(|e| bad(&e))?;
                let max = cfg.max_position_embeddings;
                (Lm::Qwen2(qwen2::ModelForCausalLM::new(&cfg, vb).map_err(build)?), max)
            }
            other => {
                return Err(format!(
                    "{} declares model_type `{other}`; the generate task runs llama and qwen2 models",
                    config_path.display()
                ))
            }
        };
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| format!("cannot load {}: {e}", tokenizer_path.display()))?;
        Ok(TextGenerator { lm, tokenizer, eos: eos_ids(&raw), device, max_positions })
    }

    fn logits(&mut self, input: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let logits = match &mut self.lm {
            Lm::Llama(m, cache) => m.forward(input, pos, cache)?,
            Lm::Qwen2(m) => m.forward(input, pos)?,
        };
        // [1, vocab] or [1, 1, vocab] -> [vocab], in f32 for the sampler.
        logits.flatten_all()?.to_dtype(DType::F32)
    }

    /// Generates up to `max_tokens` after `prompt`, stopping at an
    /// end-of-sequence token; `on_text` gets each new piece of text as it comes.
    pub fn generate(
        &mut self,
        prompt: &str,
        max_tokens: usize,
        sampling: SamplingSpec,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generated, String> {
        let fail = |e: &dyn std::fmt::Display| format!("generation failed: {e}");
        let mut tokens = self.tokenizer.encode(prompt, true).map_err(|e| fail(&e))?.get_ids().to_vec();
        if tokens.is_empty() {
            return Err("the prompt encodes to no tokens".into());
        }
        let prompt_len = tokens.len();
        if prompt_len + max_tokens > self.max_positions {
            return Err(format!(
                "the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's {} positions",
                self.max_positions
            ));
        }
        let mut processor = LogitsProcessor::from_sampling(
            sampling.seed,
            match (sampling.temperature, sampling.top_p) {
                (t, _) if t <= 0.0 => Sampling::ArgMax,
                (temperature, None) => Sampling::All { temperature },
                (temperature, Some(p)) => Sampling::TopP { p, temperature },
            },
        );
        let start = Instant::now();
        let mut shown = 0usize;
        let mut text = String::new();
        for i in 0..max_tokens {
            let (context, pos) = if i == 0 { (&tokens[..], 0) } else { (&tokens[tokens.len() - 1..], tokens.len() - 1) };
            let input = Tensor::new(context, &self.device).and_then(|t| t.unsqueeze(0)).map_err(|e| fail(&e))?;
            let logits = self.logits(&input, pos).map_err(|e| fail(&e))?;
            let next = processor.sample(&logits).map_err(|e| fail(&e))?;
            if self.eos.contains(&next) {
                break;
            }
            tokens.push(next);
            // Decode everything generated so far and show what is new: a
            // token can complete a character that the previous one began.
            text = self.tokenizer.decode(&tokens[prompt_len..], true).map_err(|e| fail(&e))?;
            if text.len() > shown && text.is_char_boundary(shown) && !text.ends_with('\u{fffd}') {
                on_text(&text[shown..]);
                shown = text.len();
            }
        }
        if text.len() > shown && text.is_char_boundary(shown) {
            on_text(&text[shown..]);
        }
        let generated = tokens.len() - prompt_len;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        Ok(Generated { text, tokens: generated, tokens_per_s: generated as f64 / secs })
    }
}

/// Streams generated text to stdout, flushing each piece.
pub fn to_stdout(piece: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(piece.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{generate, Arch, SynthSpec};
    use mora_common::manifest::WeightDType;

    fn model(arch: Arch, tag: &str) -> (std::path::PathBuf, VarBuilder<'static>) {
        let dir = std::env::temp_dir().join(format!("mora-gen-{}-{tag}", std::process::id()));
        generate(&SynthSpec { arch, target_bytes: 1 << 20, dtype: WeightDType::F32, seed: 7 }, &dir).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        (dir, vb)
    }

    #[test]
    fn greedy_is_deterministic_and_the_streamed_pieces_make_the_text() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let (dir, vb) = model(arch, &format!("{arch:?}"));
            let greedy = SamplingSpec { temperature: 0.0, top_p: None, seed: 0 };
            let mut pieces = String::new();
            let a = TextGenerator::load(&dir, vb.clone()).unwrap().generate("the man is", 12, greedy, |p| pieces.push_str(p)).unwrap();
            let b = TextGenerator::load(&dir, vb.clone()).unwrap().generate("the man is", 12, greedy, |_| {}).unwrap();
            assert_eq!(a, Generated { tokens_per_s: a.tokens_per_s, ..b.clone() }, "{arch:?}");
            assert_eq!(pieces, a.text);
            assert!(a.tokens <= 12);
            // Sampling: the same seed gives the same text.
            let hot = SamplingSpec { temperature: 1.0, top_p: Some(0.9), seed: 42 };
            let c = TextGenerator::load(&dir, vb.clone()).unwrap().generate("the man is", 12, hot, |_| {}).unwrap();
            let d = TextGenerator::load(&dir, vb).unwrap().generate("the man is", 12, hot, |_| {}).unwrap();
            assert_eq!(c.text, d.text);
        }
    }

    #[test]
    fn too_long_a_request_and_a_foreign_model_are_refused() {
        let (dir, vb) = model(Arch::Llama, "limits");
        let e = TextGenerator::load(&dir, vb)
            .unwrap()
            .generate("x", 10_000, SamplingSpec { temperature: 0.0, top_p: None, seed: 0 }, |_| {})
            .unwrap_err();
        assert!(e.contains("exceeds the model's 512 positions"), "{e}");
        let (bert, vb) = model(Arch::Bert, "bert");
        let e = TextGenerator::load(&bert, vb).err().unwrap();
        assert!(e.contains("model_type `bert`; the generate task runs llama and qwen2"), "{e}");
    }
}
