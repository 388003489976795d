//! The `generate` task: decoder-only language models ([`mora_models::decoder`]:
//! llama, mistral, qwen2, gpt2), greedy or sampled, streaming text as it
//! comes. The network is whatever [`mora_models::lm_config`] reads from the
//! model's own config files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_nn::VarBuilder;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use mora_tokenizers::Tokenizer;
use mora_tokenizers::vocab::Prepared;

use mora_models::decoder::Decoder;
use mora_models::lm_config;

/// Why a decoder cannot be built, or a generation run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model's config asks for a network Mora does not run.
    #[error(transparent)]
    Config(#[from] lm_config::ConfigError),
    #[error("cannot build the {family} model in {}: {source}", dir.display())]
    Build { family: &'static str, dir: PathBuf, source: candle_core::Error },
    #[error(transparent)]
    Tokenizer(#[from] mora_tokenizers::LoadError),
    #[error("the prompt encodes to no tokens")]
    EmptyPrompt,
    #[error("the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's {positions} positions")]
    TooLong { prompt: usize, max_tokens: usize, positions: usize },
    /// Encoding the prompt or decoding the answer failed.
    #[error("generation failed: {0}")]
    Tokens(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The network or the sampler failed.
    #[error("generation failed: {0}")]
    Compute(#[source] candle_core::Error),
}

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
    /// The ids generated, in order, ending with the end-of-sequence id when
    /// one stopped the generation (as transformers' `generate` returns them).
    pub token_ids: Vec<u32>,
    /// Why it stopped: an end-of-sequence token, or `max_tokens`.
    pub finish: Finish,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    EndOfSequence,
    MaxTokens,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::EndOfSequence => "eos",
            Finish::MaxTokens => "max_tokens",
        }
    }
}

pub struct TextGenerator {
    decoder: Decoder,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    max_positions: usize,
    /// The tokenizer is the one the daemon prepared and lent.
    pub tokenizer_lent: bool,
}

impl TextGenerator {
    /// Builds the model `dir/config.json` declares from `vb`; `tokenizer`,
    /// the daemon's prepared `tokenizer.json`, when it lent one.
    pub fn load(dir: &Path, vb: VarBuilder, tokenizer: Option<&Prepared>) -> Result<Self, GenerateError> {
        let cfg = lm_config::read(dir)?;
        let decoder = Decoder::load(&cfg, vb)
            .map_err(|source| GenerateError::Build { family: cfg.family.name(), dir: dir.to_path_buf(), source })?;
        let tokenizer_path = dir.join("tokenizer.json");
        let (tokenizer, tokenizer_lent) = mora_tokenizers::load_lent(&tokenizer_path, tokenizer)?;
        Ok(TextGenerator { decoder, tokenizer, eos: cfg.eos, max_positions: cfg.max_positions, tokenizer_lent })
    }

    /// Generates up to `max_tokens` after `prompt`, stopping at an
    /// end-of-sequence token; `on_text` gets each new piece of text as it comes.
    /// `add_special_tokens`: let the tokenizer add its own (a BOS) around the
    /// prompt; false for a prompt a chat template rendered, which has them.
    pub fn generate(
        &mut self,
        prompt: &str,
        add_special_tokens: bool,
        max_tokens: usize,
        sampling: SamplingSpec,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generated, GenerateError> {
        let mut tokens = self.tokenizer.encode(prompt, add_special_tokens).map_err(GenerateError::Tokens)?.get_ids().to_vec();
        if tokens.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let prompt_len = tokens.len();
        if prompt_len + max_tokens > self.max_positions {
            return Err(GenerateError::TooLong { prompt: prompt_len, max_tokens, positions: self.max_positions });
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
        let mut finish = Finish::MaxTokens;
        let mut eos = None;
        self.decoder.clear();
        for i in 0..max_tokens {
            let (context, pos) = if i == 0 { (&tokens[..], 0) } else { (&tokens[tokens.len() - 1..], tokens.len() - 1) };
            let logits = self.decoder.forward(context, pos).map_err(GenerateError::Compute)?;
            let next = processor.sample(&logits).map_err(GenerateError::Compute)?;
            if self.eos.contains(&next) {
                (finish, eos) = (Finish::EndOfSequence, Some(next));
                break;
            }
            tokens.push(next);
            // Decode everything generated so far and show what is new: a
            // token can complete a character that the previous one began.
            text = self.tokenizer.decode(&tokens[prompt_len..], true).map_err(GenerateError::Tokens)?;
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
        let token_ids = tokens[prompt_len..].iter().copied().chain(eos).collect();
        Ok(Generated { text, tokens: generated, token_ids, finish, tokens_per_s: generated as f64 / secs })
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
    use candle_core::{DType, Device};
    use mora_models::synth::{generate, Family, SynthSpec};
    use mora_common::manifest::WeightDType;

    fn model(arch: Family, tag: &str) -> (mora_test_support::Scratch, VarBuilder<'static>) {
        let dir = mora_test_support::Scratch::new(tag);
        generate(&SynthSpec { arch, target_bytes: 1 << 20, dtype: WeightDType::F32, seed: 7 }, &dir).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        (dir, vb)
    }

    #[test]
    fn greedy_is_deterministic_and_the_streamed_pieces_make_the_text() {
        for arch in [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Phi3, Family::Gemma2, Family::Gpt2] {
            let (dir, vb) = model(arch, &format!("{arch:?}"));
            let greedy = SamplingSpec { temperature: 0.0, top_p: None, seed: 0 };
            let mut pieces = String::new();
            let a = TextGenerator::load(&dir, vb.clone(), None).unwrap().generate("the man is", true, 12, greedy, |p| pieces.push_str(p)).unwrap();
            let b = TextGenerator::load(&dir, vb.clone(), None).unwrap().generate("the man is", true, 12, greedy, |_| {}).unwrap();
            assert_eq!(a, Generated { tokens_per_s: a.tokens_per_s, ..b.clone() }, "{arch:?}");
            assert_eq!(pieces, a.text);
            assert!(a.tokens <= 12);
            // Sampling: the same seed gives the same text.
            let hot = SamplingSpec { temperature: 1.0, top_p: Some(0.9), seed: 42 };
            let c = TextGenerator::load(&dir, vb.clone(), None).unwrap().generate("the man is", true, 12, hot, |_| {}).unwrap();
            let d = TextGenerator::load(&dir, vb, None).unwrap().generate("the man is", true, 12, hot, |_| {}).unwrap();
            assert_eq!(c.text, d.text);
        }
    }

    #[test]
    fn too_long_a_request_and_a_foreign_model_are_refused() {
        let (dir, vb) = model(Family::Llama, "limits");
        let e = TextGenerator::load(&dir, vb, None)
            .unwrap()
            .generate("x", true, 10_000, SamplingSpec { temperature: 0.0, top_p: None, seed: 0 }, |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds the model's 512 positions"), "{e}");
        let (bert, vb) = model(Family::Bert, "bert");
        let e = TextGenerator::load(&bert, vb, None).err().unwrap().to_string();
        assert!(e.contains("`model_type` is `bert`; the generate task runs llama, mistral, qwen2, qwen3, phi3, gemma2, gpt2"), "{e}");
    }
}
