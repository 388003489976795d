//! Sentence embeddings: an encoder (BERT, or XLM-RoBERTa as multilingual-e5
//! and bge-m3 are) followed by the pooling and normalisation that the model's
//! sentence-transformers files declare (`modules.json`,
//! `1_Pooling/config.json`, `sentence_bert_config.json`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use candle_transformers::models::modernbert::{self, ModernBert};
use candle_transformers::models::xlm_roberta::{self, XLMRobertaModel};
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

use mora_tokenizers::Tokenizer;
use mora_tokenizers::vocab::Prepared;

/// Texts embedded per forward pass.
pub const BATCH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

/// The encoder network, by `model_type`.
enum Encoder {
    Bert(BertModel),
    XlmRoberta(XLMRobertaModel),
    ModernBert(ModernBert),
}

/// What the embed task runs.
pub const SUPPORTED: &str = "bert, xlm-roberta, modernbert";

pub struct SentenceEmbedder {
    model: Encoder,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    /// Where the weights are: inputs go there too.
    device: Device,
    /// The tokenizer is the one the daemon prepared and lent.
    pub tokenizer_lent: bool,
}

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// `1_Pooling/config.json` in both forms sentence-transformers writes: one
/// boolean per mode (up to 4.x, `pooling_mode_mean_tokens`...), or a
/// `pooling_mode` name or list (5.x and later).
#[derive(Deserialize)]
struct PoolingConfig {
    pooling_mode: Option<serde_json::Value>,
    #[serde(flatten)]
    legacy: std::collections::BTreeMap<String, serde_json::Value>,
}

impl PoolingConfig {
    /// The one pooling mode it names, or why it cannot run.
    fn mode(&self) -> Result<Pooling, String> {
        let modes: Vec<String> = match &self.pooling_mode {
            Some(serde_json::Value::String(m)) => vec![m.clone()],
            Some(serde_json::Value::Array(a)) => a.iter().map(|m| m.as_str().unwrap_or("?").to_string()).collect(),
            Some(other) => return Err(format!("`pooling_mode` must be a name or a list of names, not {other}")),
            None => {
                let on: Vec<String> = self
                    .legacy
                    .iter()
                    .filter(|(k, v)| k.starts_with("pooling_mode_") && v.as_bool() == Some(true))
                    .map(|(k, _)| k.clone())
                    .collect();
                // No mode set: sentence-transformers pools by the mean.
                if on.is_empty() { vec!["mean".into()] } else { on }
            }
        };
        match modes.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["mean" | "pooling_mode_mean_tokens"] => Ok(Pooling::Mean),
            ["cls" | "pooling_mode_cls_token"] => Ok(Pooling::Cls),
            ["max" | "pooling_mode_max_tokens"] => Ok(Pooling::Max),
            [one] => Err(format!("pooling `{one}` is not supported; Mora pools by mean, cls or max")),
            many => Err(format!("pooling by {} at once is not supported; Mora pools by one of mean, cls or max", many.join(" + "))),
        }
    }
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    model_max_length: Option<f64>,
}

impl TokenizerConfig {
    /// transformers writes 1e30 for "no limit".
    fn model_max_length(&self) -> Option<usize> {
        self.model_max_length.filter(|n| *n >= 1.0 && *n < 1e12).map(|n| n as usize)
    }
}

/// Why a sentence encoder cannot be built or run; each message names the
/// file or folder and what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not valid: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    /// A config key that changes the network and that Mora cannot honour.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{} declares model_type `{model_type}`; the embed task runs {SUPPORTED}", path.display())]
    ModelType { path: PathBuf, model_type: String },
    /// The weights do not fit the network the config describes.
    #[error("cannot build {family} from {}: {source}", dir.display())]
    Build { family: &'static str, dir: PathBuf, source: candle_core::Error },
    #[error(transparent)]
    Tokenizer(#[from] mora_tokenizers::LoadError),
    #[error("inference failed: {0}")]
    Inference(Box<dyn std::error::Error + Send + Sync>),
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EmbedError> {
    let text = std::fs::read_to_string(path).map_err(|source| EmbedError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| EmbedError::Json { path: path.to_path_buf(), source })
}

/// A config error at `path`.
fn config_error(path: &Path) -> impl Fn(String) -> EmbedError + '_ {
    move |message| EmbedError::Config { path: path.to_path_buf(), message }
}

/// Pooling and normalisation from `modules.json`; a plain transformer
/// checkpoint without one gets mean pooling and no normalisation, as
/// sentence-transformers gives it.
fn pooling_of(dir: &Path) -> Result<(Pooling, bool), EmbedError> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((Pooling::Mean, false));
    }
    let modules: Vec<Module> = read_json(&modules_path)?;
    let mut pooling = Pooling::Mean;
    let mut normalize = false;
    for m in &modules {
        if m.kind.ends_with(".Pooling") {
            let path = dir.join(&m.path).join("config.json");
            let cfg: PoolingConfig = read_json(&path)?;
            pooling = cfg.mode().map_err(config_error(&path))?;
        } else if m.kind.ends_with(".Normalize") {
            normalize = true;
        }
    }
    Ok((pooling, normalize))
}

/// An encoder network built on its weights, before its tokenizer is read
/// (a caller that times the two apart builds this first).
pub struct EncoderNetwork {
    model: Encoder,
    max_positions: usize,
    pad_token_id: u32,
    device: Device,
}

impl EncoderNetwork {
    /// Builds the encoder `dir/config.json` describes from `vb`.
    pub fn load(dir: &Path, vb: VarBuilder) -> Result<Self, EmbedError> {
        let device = vb.device().clone();
        let build = |family: &'static str| move |source| EmbedError::Build { family, dir: dir.to_path_buf(), source };
        let config_path = dir.join("config.json");
        let raw: serde_json::Value = read_json(&config_path)?;
        let model_type = raw.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let (model, max_positions, pad_token_id) = match model_type {
            "bert" => {
                let config: Config = serde_json::from_value(raw).map_err(|e| config_error(&config_path)(e.to_string()))?;
                let model = BertModel::load(vb, &config).map_err(build("BERT"))?;
                (Encoder::Bert(model), config.max_position_embeddings, config.pad_token_id as u32)
            }
            "xlm-roberta" => {
                let config = xlm_roberta_config(&raw).map_err(config_error(&config_path))?;
                let model = XLMRobertaModel::new(&config, vb)
                    .map_err(build("XLM-RoBERTa"))?;
                // RoBERTa's positions start after the padding id.
                let positions = config.max_position_embeddings.saturating_sub(config.pad_token_id as usize + 1);
                (Encoder::XlmRoberta(model), positions, config.pad_token_id)
            }
            "modernbert" => {
                let config = modernbert_config(&raw).map_err(config_error(&config_path))?;
                // candle names the tensors as the masked-LM checkpoint does
                // (`model.` first); sentence-transformers saves the bare encoder.
                let vb = if vb.contains_tensor("model.embeddings.tok_embeddings.weight") {
                    vb
                } else {
                    vb.rename_f(|name| name.strip_prefix("model.").unwrap_or(name).to_string())
                };
                let model =
                    ModernBert::load(vb, &config).map_err(build("ModernBERT"))?;
                (Encoder::ModernBert(model), config.max_position_embeddings, config.pad_token_id)
            }
            other => {
                return Err(EmbedError::ModelType { path: config_path, model_type: other.to_string() })
            }
        };

        Ok(EncoderNetwork { model, max_positions, pad_token_id, device })
    }
}

impl SentenceEmbedder {
    /// Builds the encoder from `vb` and the small files in `dir`; with
    /// `tokenizer`, the one the daemon prepared from `dir/tokenizer.json`.
    pub fn load(dir: &Path, vb: VarBuilder, tokenizer: Option<&Prepared>) -> Result<Self, EmbedError> {
        Self::with_tokenizer(EncoderNetwork::load(dir, vb)?, dir, tokenizer)
    }

    /// `network` with its tokenizer and pooling, read from `dir`.
    pub fn with_tokenizer(network: EncoderNetwork, dir: &Path, tokenizer: Option<&Prepared>) -> Result<Self, EmbedError> {
        let EncoderNetwork { model, max_positions, pad_token_id, device } = network;
        let tok_path = dir.join("tokenizer.json");
        let (mut tokenizer, tokenizer_lent) = mora_tokenizers::load_lent(&tok_path, tokenizer)?;
        // sentence-transformers' max_seq_length: in sentence_bert_config.json
        // up to 4.x; later, the tokenizer's model_max_length.
        let st_path = dir.join("sentence_bert_config.json");
        let tc_path = dir.join("tokenizer_config.json");
        let max_len = if st_path.is_file() {
            read_json::<SentenceBertConfig>(&st_path)?.max_seq_length
        } else {
            None
        }
        .or(if tc_path.is_file() { read_json::<TokenizerConfig>(&tc_path)?.model_max_length() } else { None })
        .unwrap_or(max_positions)
        .min(max_positions);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| config_error(&tok_path)(e.to_string()))?;
        // Pad with the model's own padding token ("[PAD]" for BERT, "<pad>"
        // for XLM-RoBERTa): the attention mask hides it, and RoBERTa's
        // positions skip it.
        let pad_token = tokenizer.id_to_token(pad_token_id).unwrap_or_else(|| "[PAD]".into());
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id: pad_token_id,
            pad_token,
            ..Default::default()
        }));
        let (pooling, normalize) = pooling_of(dir)?;
        Ok(SentenceEmbedder { model, tokenizer, pooling, normalize, device, tokenizer_lent })
    }

    pub fn pooling(&self) -> (Pooling, bool) {
        (self.pooling, self.normalize)
    }

    /// One embedding per text, in order.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            out.extend(self.embed_batch(batch).map_err(EmbedError::Inference)?);
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error + Send + Sync>> {
        let dev = &self.device;
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true)?;
        let ids: Vec<Tensor> = encodings.iter().map(|e| Tensor::new(e.get_ids(), dev)).collect::<Result<_, _>>()?;
        let masks: Vec<Tensor> =
            encodings.iter().map(|e| Tensor::new(e.get_attention_mask(), dev)).collect::<Result<_, _>>()?;
        let input_ids = Tensor::stack(&ids, 0)?;
        let mask = Tensor::stack(&masks, 0)?;
        let token_types = input_ids.zeros_like()?;
        let hidden = match &self.model {
            Encoder::Bert(m) => m.forward(&input_ids, &token_types, Some(&mask))?,
            Encoder::XlmRoberta(m) => m.forward(&input_ids, &mask, &token_types, None, None, None)?,
            Encoder::ModernBert(m) => m.forward(&input_ids, &mask)?,
        }
        .to_dtype(DType::F32)?;
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = match self.pooling {
            Pooling::Mean => hidden.broadcast_mul(&maskf)?.sum(1)?.broadcast_div(&maskf.sum(1)?)?,
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Max => {
                // Padding positions must never win the max.
                let neg = ((maskf.ones_like()? - &maskf)? * -1e9)?;
                hidden.broadcast_add(&neg)?.max(1)?
            }
        };
        let pooled = if self.normalize {
            pooled.broadcast_div(&pooled.sqr()?.sum_keepdim(1)?.sqrt()?)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2::<f32>()?)
    }
}

/// A whole-number key of an encoder's `config.json`.
fn whole(raw: &serde_json::Value, key: &str) -> Result<usize, String> {
    raw.get(key).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| format!("`{key}` is missing or not a whole number"))
}

/// candle's XLM-RoBERTa config from `config.json` as transformers 4 and 5
/// write it (5 leaves out `position_embedding_type` when it is absolute).
fn xlm_roberta_config(raw: &serde_json::Value) -> Result<xlm_roberta::Config, String> {
    let usize_of = |k: &str| whole(raw, k);
    let position = raw.get("position_embedding_type").and_then(|v| v.as_str()).unwrap_or("absolute");
    if position != "absolute" {
        return Err(format!("`position_embedding_type` is `{position}`; Mora runs absolute positions"));
    }
    if raw.get("is_decoder").and_then(|v| v.as_bool()) == Some(true) || raw.get("add_cross_attention").and_then(|v| v.as_bool()) == Some(true) {
        return Err("`is_decoder`/`add_cross_attention`: the embed task runs encoders".into());
    }
    let act = raw.get("hidden_act").cloned().unwrap_or(serde_json::json!("gelu"));
    Ok(xlm_roberta::Config {
        hidden_size: usize_of("hidden_size")?,
        layer_norm_eps: raw.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-12),
        attention_probs_dropout_prob: 0.0,
        hidden_dropout_prob: 0.0,
        num_attention_heads: usize_of("num_attention_heads")?,
        position_embedding_type: position.to_string(),
        intermediate_size: usize_of("intermediate_size")?,
        hidden_act: serde_json::from_value(act.clone()).map_err(|_| format!("`hidden_act` {act} is not one Mora runs"))?,
        num_hidden_layers: usize_of("num_hidden_layers")?,
        vocab_size: usize_of("vocab_size")?,
        max_position_embeddings: usize_of("max_position_embeddings")?,
        type_vocab_size: usize_of("type_vocab_size").unwrap_or(1),
        pad_token_id: usize_of("pad_token_id").unwrap_or(1) as u32,
    })
}

/// candle's ModernBERT config from `config.json` as transformers 4 writes it
/// (`global_rope_theta`, `local_rope_theta`, `global_attn_every_n_layers`)
/// and as 5 does (`rope_parameters` per layer type, `layer_types`).
/// candle's ModernBERT has no biases and runs GeGLU with the exact GELU:
/// anything else is refused.
fn modernbert_config(raw: &serde_json::Value) -> Result<modernbert::Config, String> {
    let usize_of = |k: &str| whole(raw, k);
    for key in ["norm_bias", "attention_bias", "mlp_bias"] {
        if raw.get(key).and_then(|v| v.as_bool()) == Some(true) {
            return Err(format!("`{key}` is true; Mora runs ModernBERT without biases"));
        }
    }
    let act = raw.get("hidden_activation").and_then(|v| v.as_str()).unwrap_or("gelu");
    if act != "gelu" {
        return Err(format!("`hidden_activation` is `{act}`; Mora runs ModernBERT with gelu"));
    }
    let layers = usize_of("num_hidden_layers")?;
    // Which layers attend globally: every n-th from the first.
    let every = match raw.get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => {
            let global: Vec<bool> = types.iter().map(|t| t.as_str() == Some("full_attention")).collect();
            let n = global.iter().skip(1).position(|g| *g).map(|p| p + 1).unwrap_or(layers.max(1));
            if global.len() != layers || !global.iter().enumerate().all(|(i, g)| *g == i.is_multiple_of(n)) {
                return Err("`layer_types`: Mora runs ModernBERT with a full-attention layer every n layers from the first".into());
            }
            n
        }
        None => usize_of("global_attn_every_n_layers")?,
    };
    let theta = |layer_type: &str, old_key: &str, default: f64| -> Result<f64, String> {
        match raw.get("rope_parameters").and_then(|p| p.get(layer_type)) {
            Some(p) => {
                let kind = p.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default");
                if kind != "default" {
                    return Err(format!("`rope_parameters.{layer_type}.rope_type` is `{kind}`; Mora runs default rope here"));
                }
                p.get("rope_theta").and_then(|t| t.as_f64()).ok_or_else(|| format!("`rope_parameters.{layer_type}.rope_theta` is missing"))
            }
            None => Ok(raw.get(old_key).and_then(|t| t.as_f64()).unwrap_or(default)),
        }
    };
    Ok(modernbert::Config {
        vocab_size: usize_of("vocab_size")?,
        hidden_size: usize_of("hidden_size")?,
        num_hidden_layers: layers,
        num_attention_heads: usize_of("num_attention_heads")?,
        intermediate_size: usize_of("intermediate_size")?,
        max_position_embeddings: usize_of("max_position_embeddings")?,
        layer_norm_eps: raw.get("norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5),
        pad_token_id: usize_of("pad_token_id")? as u32,
        global_attn_every_n_layers: every,
        global_rope_theta: theta("full_attention", "global_rope_theta", 160_000.0)?,
        local_attention: usize_of("local_attention")?,
        local_rope_theta: theta("sliding_attention", "local_rope_theta", 10_000.0)?,
        classifier_config: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(json: &str) -> Result<Pooling, String> {
        serde_json::from_str::<PoolingConfig>(json).unwrap().mode()
    }

    #[test]
    fn pooling_is_read_in_both_sentence_transformers_forms() {
        // Up to sentence-transformers 4.x, as all-MiniLM-L6-v2 ships it.
        let old = r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false,
                      "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false}"#;
        assert_eq!(mode(old), Ok(Pooling::Mean));
        assert_eq!(mode(r#"{"pooling_mode_cls_token": true}"#), Ok(Pooling::Cls));
        assert_eq!(mode(r#"{"word_embedding_dimension": 8}"#), Ok(Pooling::Mean));
        // 5.x and later.
        assert_eq!(mode(r#"{"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": true}"#), Ok(Pooling::Mean));
        assert_eq!(mode(r#"{"pooling_mode": ["max"]}"#), Ok(Pooling::Max));
        let e = mode(r#"{"pooling_mode": "lasttoken"}"#).unwrap_err();
        assert!(e.contains("pooling `lasttoken` is not supported"), "{e}");
        let e = mode(r#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#).unwrap_err();
        assert!(e.contains("at once is not supported"), "{e}");
        let e = mode(r#"{"pooling_mode_weightedmean_tokens": true}"#).unwrap_err();
        assert!(e.contains("`pooling_mode_weightedmean_tokens` is not supported"), "{e}");
    }
}
