//! What a decoder's `config.json` and `generation_config.json` say about its
//! network, read once, in both forms transformers writes them.
//!
//! transformers 4 wrote `rope_theta`, `rope_scaling` and `torch_dtype`;
//! transformers 5 writes `rope_parameters` (the theta inside it), `dtype`,
//! `null` for unset values and per-layer `layer_types`. Both forms give the
//! same [`DecoderConfig`]. Every key that changes the network is read; a key
//! this module does not know, or a value Mora cannot run (another
//! `rope_type`, an unknown activation, a window on a family that has none),
//! is an error naming the file and the key, never a silent default: a model
//! that runs and answers wrong is worse than one that is refused.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

/// The model families Mora runs, by `model_type`: BERT sentence encoders
/// (the embed task) and the decoders (the generate task). A
/// [`DecoderConfig`] holds a decoder family, never `Bert`; `synth` writes
/// checkpoints of every family. The names are the `model_type`s, which
/// `mora-exec synth --arch` also takes ([`FromStr`](std::str::FromStr)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT, as sentence-transformers checkpoints carry it.
    Bert,
    Llama,
    /// Llama's layout, its own config keys, sliding windows.
    Mistral,
    /// Llama's layout plus biases on the q, k and v projections.
    Qwen2,
    /// Qwen2 plus an RMSNorm on each head's queries and keys.
    Qwen3,
    /// Fused `qkv_proj` and `gate_up_proj` weights.
    Phi3,
    /// Scaled embeddings, (1 + w) RMSNorms around attention and feed-forward,
    /// soft-capped scores and logits, alternating sliding windows.
    Gemma2,
    /// GPT-2 as OpenAI's checkpoints name it (no `transformer.` prefix,
    /// Conv1D weights stored `[in, out]`, the head tied to the embeddings).
    Gpt2,
}

/// The decoder families, as `check` and errors list them.
pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, phi3, gemma2, gpt2";

impl Family {
    /// Every family, BERT first, then the decoders in the order errors list them.
    pub const ALL: [Family; 8] = [
        Family::Bert,
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Phi3,
        Family::Gemma2,
        Family::Gpt2,
    ];

    /// The `model_type` of its configs.
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::Gemma2 => "gemma2",
            Family::Gpt2 => "gpt2",
        }
    }

    /// The family of a `model_type`, if Mora runs it.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == model_type)
    }

    /// Whether the generate task runs it (all but BERT).
    pub fn is_decoder(self) -> bool {
        self != Family::Bert
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    /// A `model_type` name, as `mora-exec synth --arch` takes it.
    fn from_str(s: &str) -> Result<Family, String> {
        Family::from_model_type(s).ok_or_else(|| {
            let names: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
            let (last, rest) = names.split_last().expect("at least one family");
            format!("unknown architecture `{s}`: expected {} or {last}", rest.join(", "))
        })
    }
}

/// The activation of the feed-forward block (`hidden_act`, or GPT-2's
/// `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// The exact (erf) GELU: transformers' `gelu`.
    Gelu,
    /// The tanh approximation: `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`.
    GeluTanh,
    Relu,
}

/// How rotary position frequencies are scaled (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// YaRN: interpolation blended with extrapolation, and an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// The fraction of each head's dimensions that rotate (the first ones).
    pub partial_rotary_factor: f64,
}

/// Everything a decoder network is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// A decoder family (never `Bert`).
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f64,
    pub activation: Activation,
    /// None for learned positions (GPT-2).
    pub rope: Option<Rope>,
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v projections.
    pub qkv_bias: bool,
    /// A bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on the feed-forward projections.
    pub mlp_bias: bool,
    /// Per layer: the attention window in tokens, or None for full attention.
    pub windows: Vec<Option<usize>>,
    /// GPT-2: attention scores also divided by the layer's index + 1.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// GPT-2: attention scores divided by sqrt(head_dim) (`scale_attn_weights`).
    pub scale_attn_weights: bool,
    /// What attention scores are multiplied by, when not 1/sqrt(head_dim)
    /// (Gemma 2's `query_pre_attn_scalar`).
    pub attn_scale: Option<f64>,
    /// Scores become `tanh(s / cap) * cap` (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Logits become `tanh(l / cap) * cap` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// An RMSNorm on each head's queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Every end-of-sequence id of `config.json` and `generation_config.json`.
    pub eos: Vec<u32>,
}

impl DecoderConfig {
    /// How many of each head's dimensions rotate (all, unless
    /// `partial_rotary_factor` says fewer).
    pub fn rotary_dim(&self) -> usize {
        match &self.rope {
            Some(r) => (self.head_dim as f64 * r.partial_rotary_factor) as usize,
            None => 0,
        }
    }
}

/// A config Mora cannot run, or cannot read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

/// Keys every `PretrainedConfig` may carry that do not change the network a
/// decoder computes (bookkeeping, training, generation defaults, labels).
pub(crate) const NEUTRAL: &[&str] = &[
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "architectures",
    "transformers_version", "model_type", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "attention_dropout", "hidden_dropout", "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "eos_token_id", "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "chunk_size_feed_forward", "tie_encoder_decoder", "is_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label",
    "label2id", "num_labels", "tokenizer_class", "prefix", "task_specific_params", "problem_type",
    "cross_attention_hidden_size", "pretraining_tp", "output_router_logits", "_num_labels", "is_llama_config",
    "cache_implementation", "auto_map",
];

/// Reads `config.json` (and `generation_config.json` when present) in `dir`.
pub fn read(dir: &Path) -> Result<DecoderConfig, ConfigError> {
    let path = dir.join("config.json");
    let raw = read_json(&path)?;
    let mut cfg = from_json(&raw, &path.display().to_string())?;
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let gen = read_json(&gen_path)?;
        for id in eos_ids(&gen, &gen_path.display().to_string())? {
            if !cfg.eos.contains(&id) {
                cfg.eos.push(id);
            }
        }
    }
    Ok(cfg)
}

pub(crate) fn read_json(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ConfigError { file: file.clone(), message: format!("cannot read it: {e}") })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ConfigError { file, message: "not a JSON object".into() }),
        Err(e) => Err(ConfigError { file, message: format!("not valid JSON: {e}") }),
    }
}

/// The `eos_token_id` of a config: a number, a list, or null/absent.
fn eos_ids(m: &Map<String, Value>, file: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = || ConfigError { file: file.into(), message: "`eos_token_id` must be a token id or a list of them".into() };
    match m.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => Ok(vec![n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?]),
        Some(Value::Array(a)) => {
            a.iter().map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)).collect()
        }
        Some(_) => Err(bad()),
    }
}

/// Reads one config object; `file` names it in errors.
pub fn from_json(raw: &Map<String, Value>, file: &str) -> Result<DecoderConfig, ConfigError> {
    let r = Reader::new(raw, file, "");
    let model_type = r.str_or("model_type", "")?;
    let family = match Family::from_model_type(&model_type) {
        Some(family) if family.is_decoder() => family,
        _ if model_type.is_empty() => return Err(r.err("no `model_type`: cannot tell which network this is".into())),
        _ => return Err(r.err(format!("`model_type` is `{model_type}`; the generate task runs {SUPPORTED}"))),
    };
    // Keys that change the network, accepted only when they leave it as is.
    for (key, ok) in [
        ("pruned_heads", |v: &Value| v.as_object().is_some_and(|o| o.is_empty())),
        ("add_cross_attention", |v: &Value| v == &Value::Bool(false)),
        ("is_encoder_decoder", |v: &Value| v == &Value::Bool(false)),
        ("tie_encoder_decoder", |v: &Value| v == &Value::Bool(false)),
        ("use_mrope", |v: &Value| v == &Value::Bool(false)),
        ("rope_interleaved", |v: &Value| v == &Value::Bool(false)),
        ("use_bidirectional_attention", |v: &Value| v == &Value::Bool(false)),
    ] as [(&str, fn(&Value) -> bool); 7]
    {
        if let Some(v) = r.take(key) {
            if !v.is_null() && !ok(v) {
                return Err(r.err(format!("`{key}` = {v} changes the network and Mora does not run it")));
            }
        }
    }
    if let Some(q) = r.take("quantization_config") {
        if !q.is_null() {
            return Err(r.err("`quantization_config`: quantized checkpoints are not supported; use unquantized weights".into()));
        }
    }
    let mut cfg = match family {
        Family::Gpt2 => gpt2(&r)?,
        _ => llama_like(&r, family)?,
    };
    cfg.eos = eos_ids(raw, file)?;
    r.used.borrow_mut().insert("eos_token_id".into());
    // Whatever is left must be a key known not to change the network.
    let used = r.used.borrow();
    if let Some(k) = raw.keys().find(|k| !used.contains(*k) && !NEUTRAL.contains(&k.as_str())) {
        return Err(r.err(format!(
            "key `{k}` is not one Mora knows for {} models; it may change the network, so the model is refused",
            family.name()
        )));
    }
    Ok(cfg)
}

fn llama_like(r: &Reader, family: Family) -> Result<DecoderConfig, ConfigError> {
    let hidden_size = r.usize("hidden_size")?;
    let num_heads = r.usize("num_attention_heads")?;
    let num_layers = r.usize("num_hidden_layers")?;
    let num_kv_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(r.err(format!(
            "`num_attention_heads` ({num_heads}) must be a positive multiple of `num_key_value_heads` ({num_kv_heads})"
        )));
    }
    let head_dim = match r.opt_usize("head_dim")? {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => return Err(r.err(format!("`hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_heads})"))),
    };
    let max_positions = r.usize("max_position_embeddings")?;
    let activation = if family == Family::Gemma2 {
        // Gemma 2 runs `hidden_activation`; configs may also carry `hidden_act`.
        r.take("hidden_act");
        activation(r, "hidden_activation", "gelu_pytorch_tanh")?
    } else {
        activation(r, "hidden_act", "silu")?
    };
    let (qkv_bias, o_bias, mlp_bias) = match family {
        Family::Llama => {
            let a = r.bool_or("attention_bias", false)?;
            (a, a, r.bool_or("mlp_bias", false)?)
        }
        Family::Qwen3 | Family::Gemma2 => {
            let a = r.bool_or("attention_bias", false)?;
            (a, a, false)
        }
        // Phi-3.5 configs say `attention_bias: false`; its modeling code has none.
        Family::Phi3 => {
            if r.bool_or("attention_bias", false)? {
                return Err(r.err("`attention_bias` is true; phi3 has no attention biases".into()));
            }
            (false, false, false)
        }
        // Qwen2 always has q, k and v biases and none elsewhere.
        Family::Qwen2 => (true, false, false),
        _ => (false, false, false),
    };
    if family == Family::Phi3 {
        // Dropouts, and the length longrope scaling reads (which is refused).
        for k in ["resid_pdrop", "embd_pdrop", "original_max_position_embeddings"] {
            r.take(k);
        }
    }
    let windows = windows(r, family, num_layers)?;
    let rope = rope(r, max_positions)?;
    // As transformers computes it: `int(head_dim * partial_rotary_factor)`.
    let rotary = (head_dim as f64 * rope.partial_rotary_factor) as usize;
    if rotary == 0 || !rotary.is_multiple_of(2) || rotary > head_dim {
        return Err(r.err(format!(
            "`partial_rotary_factor` {} gives {rotary} rotary dimensions of {head_dim}; Mora needs an even number, at least 2",
            rope.partial_rotary_factor
        )));
    }
    let (attn_scale, attn_softcap, final_softcap) = if family == Family::Gemma2 {
        let scalar = r.opt_f64("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
        (Some(1.0 / scalar.sqrt()), r.opt_f64("attn_logit_softcapping")?, r.opt_f64("final_logit_softcapping")?)
    } else {
        (None, None, None)
    };
    Ok(DecoderConfig {
        family,
        vocab_size: r.usize("vocab_size")?,
        hidden_size,
        intermediate_size: r.usize("intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        norm_eps: r.f64("rms_norm_eps")?,
        activation,
        rope: Some(rope),
        max_positions,
        // Gemma 2 ties its head to the embeddings unless told otherwise.
        tie_word_embeddings: r.bool_or("tie_word_embeddings", family == Family::Gemma2)?,
        qkv_bias,
        o_bias,
        mlp_bias,
        windows,
        scale_attn_by_inverse_layer_idx: false,
        scale_attn_weights: true,
        attn_scale,
        attn_softcap,
        final_softcap,
        qk_norm: family == Family::Qwen3,
        eos: Vec::new(),
    })
}

/// Which layers attend through a sliding window, and how wide.
fn windows(r: &Reader, family: Family, layers: usize) -> Result<Vec<Option<usize>>, ConfigError> {
    if family == Family::Llama {
        // Llama has no window; a `sliding_window` key is left unread, so it
        // is refused as an unknown key.
        return Ok(vec![None; layers]);
    }
    let window = r.opt_usize("sliding_window")?;
    let layer_types = match r.take("layer_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a.clone()),
        Some(_) => return Err(r.err("`layer_types` must be a list".into())),
    };
    let use_sliding = match family {
        Family::Qwen2 | Family::Qwen3 => r.bool_or("use_sliding_window", false)?,
        _ => true,
    };
    let max_window_layers = match family {
        Family::Qwen2 | Family::Qwen3 => r.opt_usize("max_window_layers")?,
        _ => None,
    };
    if let Some(types) = layer_types {
        // transformers 5: the kind of every layer, spelled out.
        if types.len() != layers {
            return Err(r.err(format!("`layer_types` lists {} layers but `num_hidden_layers` is {layers}", types.len())));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => match window {
                    Some(w) if w > 0 => Ok(Some(w)),
                    _ => Err(r.err(format!("`layer_types`[{i}] is sliding_attention but `sliding_window` is not a positive number"))),
                },
                other => Err(r.err(format!(
                    "`layer_types`[{i}] is {}; Mora runs full_attention and sliding_attention layers",
                    other.map(|s| format!("`{s}`")).unwrap_or_else(|| t.to_string())
                ))),
            })
            .collect();
    }
    // transformers 4: qwen2 and qwen3 slide from layer `max_window_layers`
    // on, and only with `use_sliding_window`; gemma2 slides on even layers;
    // mistral and phi3 slide everywhere.
    Ok((0..layers)
        .map(|i| match (family, window) {
            (_, None) | (_, Some(0)) => None,
            (Family::Qwen2 | Family::Qwen3, Some(w)) => (use_sliding && i >= max_window_layers.unwrap_or(0)).then_some(w),
            (Family::Gemma2, Some(w)) => (i % 2 == 0).then_some(w),
            (_, Some(w)) => Some(w),
        })
        .collect())
}

/// The rotary embedding: `rope_parameters` (transformers 5) or `rope_theta`
/// + `rope_scaling` (transformers 4).
fn rope(r: &Reader, max_positions: usize) -> Result<Rope, ConfigError> {
    let top_theta = r.opt_f64("rope_theta")?;
    let (params, key) = match (r.take("rope_parameters"), r.take("rope_scaling")) {
        (Some(p), Some(s)) if !p.is_null() && !s.is_null() && p != s => {
            return Err(r.err("both `rope_parameters` and `rope_scaling` are set, and they differ".into()));
        }
        (Some(p), _) if !p.is_null() => (Some(p), "rope_parameters"),
        (_, Some(s)) if !s.is_null() => (Some(s), "rope_scaling"),
        _ => (None, "rope_scaling"),
    };
    let top_partial = r.opt_f64("partial_rotary_factor")?;
    let Some(params) = params else {
        return Ok(Rope {
            theta: top_theta.unwrap_or(10_000.0),
            scaling: RopeScaling::Default,
            partial_rotary_factor: top_partial.unwrap_or(1.0),
        });
    };
    let Some(p) = params.as_object() else {
        return Err(r.err(format!("`{key}` must be an object")));
    };
    let sub = Reader::new(p, r.file, &format!("{key}."));
    let name = |k: &str| format!("{key}.{k}");
    // transformers 4 wrote `type` before it wrote `rope_type`; neither
    // means `default`, as transformers reads it.
    let rope_type = match (sub.take("rope_type"), sub.take("type")) {
        (Some(Value::String(t)), _) | (None | Some(Value::Null), Some(Value::String(t))) => t.clone(),
        (None | Some(Value::Null), None | Some(Value::Null)) => "default".to_string(),
        _ => return Err(r.err(format!("`{}` must be a string", name("rope_type")))),
    };
    let theta = match (sub.opt_f64("rope_theta")?, top_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(r.err(format!("`{}` ({a}) and `rope_theta` ({b}) differ", name("rope_theta"))));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => 10_000.0,
    };
    let factor = |default: Option<f64>| -> Result<f64, ConfigError> {
        match sub.opt_f64("factor")?.or(default) {
            Some(f) if f >= 1.0 => Ok(f),
            Some(f) => Err(r.err(format!("`{}` is {f}; it must be at least 1", name("factor")))),
            None => Err(r.err(format!("`{key}` of rope_type `{rope_type}` needs `factor`"))),
        }
    };
    // As transformers reads it: the model's own length when not given.
    let orig = sub.opt_usize("original_max_position_embeddings")?.unwrap_or(max_positions);
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor(None)? },
        "llama3" => {
            let s = RopeScaling::Llama3 {
                factor: factor(None)?,
                low_freq_factor: sub.f64("low_freq_factor")?,
                high_freq_factor: sub.f64("high_freq_factor")?,
                original_max_position_embeddings: orig,
            };
            if let RopeScaling::Llama3 { low_freq_factor: l, high_freq_factor: h, .. } = s {
                if h <= l {
                    return Err(r.err(format!("`{}` must exceed `{}`", name("high_freq_factor"), name("low_freq_factor"))));
                }
            }
            s
        }
        "yarn" => RopeScaling::Yarn {
            // transformers 5: no factor means the ratio of the lengths.
            factor: factor(Some(max_positions as f64 / orig as f64))?,
            original_max_position_embeddings: orig,
            attention_factor: sub.opt_f64("attention_factor")?,
            beta_fast: sub.opt_f64("beta_fast")?.unwrap_or(32.0),
            beta_slow: sub.opt_f64("beta_slow")?.unwrap_or(1.0),
            mscale: sub.opt_f64("mscale")?,
            mscale_all_dim: sub.opt_f64("mscale_all_dim")?,
            truncate: sub.bool_or("truncate", true)?,
        },
        other => {
            return Err(r.err(format!(
                "`{}` is `{other}`; Mora runs the rope types default, linear, llama3 and yarn",
                name("rope_type")
            )))
        }
    };
    let partial_rotary_factor = match (sub.opt_f64("partial_rotary_factor")?, top_partial) {
        (Some(a), Some(b)) if a != b => {
            return Err(r.err(format!("`{}` ({a}) and `partial_rotary_factor` ({b}) differ", name("partial_rotary_factor"))));
        }
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => 1.0,
    };
    let used = sub.used.borrow();
    if let Some(k) = p.keys().find(|k| !used.contains(*k)) {
        return Err(r.err(format!("`{}` is not a parameter Mora knows for rope_type `{rope_type}`", name(k))));
    }
    Ok(Rope { theta, scaling, partial_rotary_factor })
}

fn gpt2(r: &Reader) -> Result<DecoderConfig, ConfigError> {
    let hidden_size = r.usize("n_embd")?;
    let num_heads = r.usize("n_head")?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(r.err(format!("`n_embd` ({hidden_size}) is not a multiple of `n_head` ({num_heads})")));
    }
    let num_layers = r.usize("n_layer")?;
    // Neutral for inference: dropouts, the old name of n_positions, the
    // sequence-summary head of other tasks, the order of an upcast.
    for k in [
        "resid_pdrop", "embd_pdrop", "attn_pdrop", "n_ctx", "summary_type", "summary_use_proj", "summary_activation",
        "summary_proj_to_labels", "summary_first_dropout", "reorder_and_upcast_attn", "gradient_checkpointing",
    ] {
        r.take(k);
    }
    Ok(DecoderConfig {
        family: Family::Gpt2,
        vocab_size: r.usize("vocab_size")?,
        hidden_size,
        intermediate_size: r.opt_usize("n_inner")?.unwrap_or(4 * hidden_size),
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim: hidden_size / num_heads,
        norm_eps: r.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
        activation: activation(r, "activation_function", "gelu_new")?,
        rope: None,
        max_positions: r.usize("n_positions")?,
        tie_word_embeddings: r.bool_or("tie_word_embeddings", true)?,
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        windows: vec![None; num_layers],
        scale_attn_by_inverse_layer_idx: r.bool_or("scale_attn_by_inverse_layer_idx", false)?,
        scale_attn_weights: r.bool_or("scale_attn_weights", true)?,
        attn_scale: None,
        attn_softcap: None,
        final_softcap: None,
        qk_norm: false,
        eos: Vec::new(),
    })
}

fn activation(r: &Reader, key: &str, default: &str) -> Result<Activation, ConfigError> {
    match r.str_or(key, default)?.as_str() {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        other => Err(r.err(format!(
            "`{key}` is `{other}`; Mora runs silu, swish, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast and relu"
        ))),
    }
}

/// Reads typed keys and remembers which were read. `null` counts as absent
/// (transformers 5 writes unset values as `null`).
/// Reads typed keys of one config object, remembering which it read so
/// that [`Reader::refuse_unread`] can refuse the keys nobody understood.
pub(crate) struct Reader<'a> {
    pub(crate) m: &'a Map<String, Value>,
    pub(crate) file: &'a str,
    /// Put before key names in errors (`rope_parameters.`).
    prefix: String,
    used: std::cell::RefCell<BTreeSet<String>>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(m: &'a Map<String, Value>, file: &'a str, prefix: &str) -> Self {
        Reader { m, file, prefix: prefix.to_string(), used: Default::default() }
    }

    pub(crate) fn err(&self, message: String) -> ConfigError {
        ConfigError { file: self.file.to_string(), message }
    }

    pub(crate) fn take(&self, key: &str) -> Option<&Value> {
        self.used.borrow_mut().insert(key.to_string());
        self.m.get(key)
    }

    pub(crate) fn present(&self, key: &str) -> Option<&Value> {
        self.take(key).filter(|v| !v.is_null())
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(format!("`{}{key}` must be a whole number, not {v}", self.prefix))),
        }
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        match self.opt_usize(key)? {
            Some(0) => Err(self.err(format!("`{}{key}` must be at least 1", self.prefix))),
            Some(n) => Ok(n),
            None => Err(self.err(format!("`{}{key}` is missing", self.prefix))),
        }
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(format!("`{}{key}` must be a number, not {v}", self.prefix))),
        }
    }

    pub(crate) fn f64(&self, key: &str) -> Result<f64, ConfigError> {
        self.opt_f64(key)?.ok_or_else(|| self.err(format!("`{}{key}` is missing", self.prefix)))
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.present(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("`{}{key}` must be true or false, not {v}", self.prefix))),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.present(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(format!("`{}{key}` must be a string, not {v}", self.prefix))),
        }
    }

    /// Refuses the first key of the object that was neither read nor is in
    /// `neutral` (keys known not to change the network): `what` names the
    /// kind of model in the message.
    pub(crate) fn refuse_unread(&self, neutral: &[&str], what: &str) -> Result<(), ConfigError> {
        let used = self.used.borrow();
        match self.m.keys().find(|k| !used.contains(*k) && !neutral.contains(&k.as_str())) {
            Some(k) => Err(self.err(format!(
                "key `{}{k}` is not one Mora knows for {what}; it may change what is computed, so it is refused",
                self.prefix
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<DecoderConfig, ConfigError> {
        from_json(v.as_object().unwrap(), "config.json")
    }

    fn llama(extra: Value) -> Value {
        let mut c = json!({
            "model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "eos_token_id": 2,
        });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    }

    #[test]
    fn both_config_forms_give_the_same_network() {
        let old = parse(llama(json!({"rope_theta": 500.0, "torch_dtype": "float32",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})))
        .unwrap();
        let new = parse(llama(json!({"dtype": "float32", "head_dim": null,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(new.rope.as_ref().unwrap().theta, 500.0);
        assert_eq!((new.head_dim, new.num_kv_heads), (8, 2));
        // The legacy `type` key, and no scaling at all.
        // Phi-3.5's keys (and the `auto_map` of checkpoints with their own code).
        let mut phi = llama(json!({"attention_bias": false, "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"},
                                   "original_max_position_embeddings": 4096, "sliding_window": 2047, "resid_pdrop": 0.0}));
        phi["model_type"] = "phi3".into();
        assert_eq!(parse(phi).unwrap().windows, vec![Some(2047), Some(2047)]);
        // SmolLM2's extra keys leave the network as llama's.
        assert!(parse(llama(json!({"is_llama_config": true, "rope_interleaved": false, "pad_token_id": null}))).is_ok());
        let legacy = parse(llama(json!({"rope_scaling": {"type": "linear", "factor": 2.0}}))).unwrap();
        assert_eq!(legacy.rope.unwrap().scaling, RopeScaling::Linear { factor: 2.0 });
        let plain = parse(llama(json!({"rope_scaling": null}))).unwrap();
        assert_eq!(plain.rope.unwrap(), Rope { theta: 10_000.0, scaling: RopeScaling::Default, partial_rotary_factor: 1.0 });
    }

    #[test]
    fn what_cannot_run_is_refused_naming_the_key() {
        let cases = [
            (json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1.0}}), "`rope_parameters.rope_type` is `dynamic`"),
            (json!({"rope_scaling": {"rope_type": "linear"}}), "needs `factor`"),
            (json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 0.5}}), "`rope_scaling.beta_fast` is not a parameter"),
            (json!({"partial_rotary_factor": 0.4}), "gives 3 rotary dimensions of 8"),
            (json!({"partial_rotary_factor": 0.1}), "gives 0 rotary dimensions of 8"),
            (json!({"rope_theta": 10.0, "rope_parameters": {"rope_theta": 20.0}}), "differ"),
            (json!({"hidden_act": "gelu_10"}), "`hidden_act` is `gelu_10`"),
            (json!({"sliding_window": 4}), "key `sliding_window` is not one Mora knows"),
            (json!({"quantization_config": {"bits": 4}}), "quantized checkpoints are not supported"),
            (json!({"rope_interleaved": true}), "`rope_interleaved` = true changes the network"),
            (json!({"num_key_value_heads": 3}), "must be a positive multiple"),
            (json!({"max_position_embeddings": null}), "`max_position_embeddings` is missing"),
        ];
        for (extra, want) in cases {
            let e = parse(llama(extra.clone())).unwrap_err().to_string();
            assert!(e.starts_with("config.json: ") && e.contains(want), "{extra}: {e}");
        }
        let e = parse(json!({"model_type": "t5"})).unwrap_err().to_string();
        assert!(e.contains("`model_type` is `t5`; the generate task runs llama, mistral, qwen2, qwen3, phi3, gemma2, gpt2"), "{e}");
    }

    #[test]
    fn sliding_windows_follow_layer_types_or_the_old_keys() {
        let qwen = |extra: Value| {
            let mut c = llama(extra);
            c["model_type"] = "qwen2".into();
            parse(c)
        };
        // transformers 5: null window, every layer full.
        let c = qwen(json!({"sliding_window": null, "use_sliding_window": false, "max_window_layers": 28,
                            "layer_types": ["full_attention", "full_attention"]}))
        .unwrap();
        assert_eq!(c.windows, vec![None, None]);
        assert!(c.qkv_bias && !c.o_bias);
        let c = qwen(json!({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]})).unwrap();
        assert_eq!(c.windows, vec![None, Some(8)]);
        // transformers 4: from layer max_window_layers on, only when used.
        let c = qwen(json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1})).unwrap();
        assert_eq!(c.windows, vec![None, Some(8)]);
        let c = qwen(json!({"sliding_window": 8, "use_sliding_window": false, "max_window_layers": 1})).unwrap();
        assert_eq!(c.windows, vec![None, None]);
        let e = qwen(json!({"sliding_window": null, "layer_types": ["sliding_attention", "full_attention"]})).unwrap_err();
        assert!(e.message.contains("`layer_types`[0] is sliding_attention but `sliding_window`"), "{e}");
        let mut m = llama(json!({"sliding_window": 4}));
        m["model_type"] = "mistral".into();
        assert_eq!(parse(m).unwrap().windows, vec![Some(4), Some(4)]);
    }

    #[test]
    fn end_of_sequence_ids_come_from_both_files() {
        let dir = mora_test_support::Scratch::new("lmcfg");
        std::fs::write(dir.join("config.json"), llama(json!({})).to_string()).unwrap();
        std::fs::write(dir.join("generation_config.json"), json!({"eos_token_id": [2, 7, 9]}).to_string()).unwrap();
        assert_eq!(read(&dir).unwrap().eos, vec![2, 7, 9]);
        std::fs::write(dir.join("generation_config.json"), json!({"eos_token_id": "x"}).to_string()).unwrap();
        let e = read(&dir).unwrap_err();
        assert!(e.file.ends_with("generation_config.json") && e.message.contains("`eos_token_id`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn families_go_by_model_type_and_only_decoders_configure_a_decoder() {
        for f in Family::ALL {
            assert_eq!(f.name().parse::<Family>(), Ok(f));
        }
        assert_eq!(
            "bart".parse::<Family>().unwrap_err(),
            "unknown architecture `bart`: expected bert, llama, mistral, qwen2, qwen3, phi3, gemma2 or gpt2"
        );
        let decoders: Vec<&str> = Family::ALL.iter().filter(|f| f.is_decoder()).map(|f| f.name()).collect();
        assert_eq!(decoders.join(", "), SUPPORTED);
        let e = parse(llama(json!({"model_type": "bert"}))).unwrap_err();
        assert_eq!(e.message, format!("`model_type` is `bert`; the generate task runs {SUPPORTED}"));
        let e = parse(llama(json!({"model_type": ""}))).unwrap_err();
        assert_eq!(e.message, "no `model_type`: cannot tell which network this is");
    }

    #[test]
    fn gpt2_reads_its_own_key_names() {
        let c = parse(json!({"model_type": "gpt2", "vocab_size": 300, "n_embd": 32, "n_layer": 2, "n_head": 4,
                             "n_positions": 64, "n_inner": null, "activation_function": "gelu_new",
                             "resid_pdrop": 0.1, "summary_type": "cls_index", "eos_token_id": 2}))
        .unwrap();
        assert_eq!((c.family, c.intermediate_size, c.activation, c.rope.is_none()), (Family::Gpt2, 128, Activation::GeluTanh, true));
        assert!(c.tie_word_embeddings && c.scale_attn_weights && !c.scale_attn_by_inverse_layer_idx);
    }
}
