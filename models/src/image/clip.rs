//! The CLIP text encoders of Stable Diffusion (transformers' `CLIPTextModel`
//! and `CLIPTextModelWithProjection`); their BPE tokenizer is
//! `mora_tokenizers::clip`.
//!
//! The encoder is configured from `text_encoder/config.json` (or
//! `text_encoder_2/`) in the forms transformers 4 and 5 write, and loaded from
//! `model.safetensors` with either naming transformers uses:
//! `text_model.embeddings...` (transformers 4, and the projection variant) or
//! `embeddings...` (`CLIPTextModel` saved by transformers 5).
//! candle-transformers' `stable_diffusion::clip` is not used: its `gelu` is
//! the tanh approximation where transformers' is the exact one (SD 2.1 and
//! SDXL's second encoder), its LayerNorm epsilon is fixed, it gives no pooled
//! output and no projection.
//!
use std::path::Path;

use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde_json::{Map, Value};

use crate::lm_config::{read_json, ConfigError, Reader, NEUTRAL};

/// Keys of CLIP text configs, beyond transformers' bookkeeping, that do not
/// change what the network computes at inference.
const CLIP_NEUTRAL: &[&str] = &["dropout", "initializer_factor", "gradient_checkpointing", "tie_word_embeddings"];

/// The feed-forward activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextActivation {
    /// `x * sigmoid(1.702 x)`: SD 1.x and SDXL's first encoder.
    QuickGelu,
    /// The exact (erf) GELU: SD 2.x and SDXL's second encoder.
    Gelu,
}

/// What `text_encoder/config.json` says about the network.
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoderConfig {
    pub hidden_size: usize,
    /// Some for `CLIPTextModelWithProjection`: the size of `text_embeds`.
    pub projection_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub activation: TextActivation,
    /// Where the pooled output is taken: 2 (the legacy value of the official
    /// checkpoints) means at `argmax(input_ids)`, any other id at its first
    /// position in each sequence.
    pub eos_token_id: u32,
}

impl TextEncoderConfig {
    pub fn from_file(path: &Path) -> std::result::Result<Self, ConfigError> {
        Self::from_file_with_class(path, None)
    }

    /// As [`TextEncoderConfig::from_file`]; `class` is the class
    /// `model_index.json` names for the folder (`CLIPTextModel` or
    /// `CLIPTextModelWithProjection`), used when the config has no
    /// `architectures` and checked against it when it has.
    pub fn from_file_with_class(path: &Path, class: Option<&str>) -> std::result::Result<Self, ConfigError> {
        let raw = read_json(path)?;
        Self::from_json_with_class(&raw, &path.display().to_string(), class)
    }

    /// Reads one config object; `file` names it in errors. Absent keys take
    /// the defaults of transformers' `CLIPTextConfig`, as transformers does.
    pub fn from_json(raw: &Map<String, Value>, file: &str) -> std::result::Result<Self, ConfigError> {
        Self::from_json_with_class(raw, file, None)
    }

    pub fn from_json_with_class(
        raw: &Map<String, Value>,
        file: &str,
        class: Option<&str>,
    ) -> std::result::Result<Self, ConfigError> {
        let r = Reader::new(raw, file, "");
        let model_type = r.str_or("model_type", "clip_text_model")?;
        if model_type != "clip_text_model" {
            return Err(r.err(format!(
                "`model_type` is `{model_type}`; a Stable Diffusion text encoder is a `clip_text_model` (CLIPTextModel or CLIPTextModelWithProjection)"
            )));
        }
        let arch = match r.present("architectures") {
            None => None,
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().map(str::to_string),
            Some(v) => return Err(r.err(format!("`architectures` must name one class, not {v}"))),
        };
        let class = match (arch.as_deref(), class) {
            (Some(a), Some(c)) if a != c => {
                return Err(r.err(format!("`architectures` says `{a}` but model_index.json says `{c}`")));
            }
            (Some(a), _) => a.to_string(),
            (None, Some(c)) => c.to_string(),
            (None, None) => {
                return Err(r.err(
                    "no `architectures`: cannot tell CLIPTextModel from CLIPTextModelWithProjection".into(),
                ))
            }
        };
        let with_projection = match class.as_str() {
            "CLIPTextModel" => false,
            "CLIPTextModelWithProjection" => true,
            other => {
                return Err(r.err(format!(
                    "`architectures` is `{other}`; Mora runs CLIPTextModel and CLIPTextModelWithProjection"
                )))
            }
        };
        let activation = match r.str_or("hidden_act", "quick_gelu")?.as_str() {
            "quick_gelu" => TextActivation::QuickGelu,
            "gelu" => TextActivation::Gelu,
            other => return Err(r.err(format!("`hidden_act` is `{other}`; Mora's CLIP runs quick_gelu and gelu"))),
        };
        let eos_token_id = match r.present("eos_token_id") {
            None => 49407,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| r.err(format!("`eos_token_id` must be one token id, not {v}")))?,
        };
        // Keys of full transformers 4 dumps, accepted when they leave the network as is.
        for (key, ok) in [
            ("pruned_heads", |v: &Value| v.as_object().is_some_and(|o| o.is_empty())),
            ("add_cross_attention", |v: &Value| v == &Value::Bool(false)),
            ("is_encoder_decoder", |v: &Value| v == &Value::Bool(false)),
            ("is_decoder", |v: &Value| v == &Value::Bool(false)),
        ] as [(&str, fn(&Value) -> bool); 4]
        {
            if let Some(v) = r.present(key) {
                if !ok(v) {
                    return Err(r.err(format!("`{key}` = {v} changes the network and Mora does not run it")));
                }
            }
        }
        if let Some(q) = r.present("quantization_config") {
            return Err(r.err(format!("`quantization_config` = {q}: quantized text encoders are not supported")));
        }
        let default = |key: &str, d: usize| -> std::result::Result<usize, ConfigError> {
            match r.opt_usize(key)? {
                Some(0) => Err(r.err(format!("`{key}` must be at least 1"))),
                Some(n) => Ok(n),
                None => Ok(d),
            }
        };
        let hidden_size = default("hidden_size", 512)?;
        let num_attention_heads = default("num_attention_heads", 8)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(r.err(format!(
                "`hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_attention_heads})"
            )));
        }
        let projection_dim = default("projection_dim", 512)?;
        let cfg = TextEncoderConfig {
            hidden_size,
            projection_dim: with_projection.then_some(projection_dim),
            max_position_embeddings: default("max_position_embeddings", 77)?,
            vocab_size: default("vocab_size", 49408)?,
            intermediate_size: default("intermediate_size", 2048)?,
            num_hidden_layers: default("num_hidden_layers", 12)?,
            num_attention_heads,
            layer_norm_eps: r.opt_f64("layer_norm_eps")?.unwrap_or(1e-5),
            activation,
            eos_token_id,
        };
        let neutral: Vec<&str> = NEUTRAL.iter().chain(CLIP_NEUTRAL).copied().collect();
        r.refuse_unread(&neutral, "CLIP text encoders")?;
        Ok(cfg)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * (self.head_dim as f64).powf(-0.5))?;
        // Masked and normalised in float32, as transformers does for any dtype.
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        self.out.forward(&o)
    }
}

struct Layer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: TextActivation,
}

impl Layer {
    fn new(vb: VarBuilder, c: &TextEncoderConfig) -> Result<Self> {
        let h = c.hidden_size;
        let a = vb.pp("self_attn");
        Ok(Layer {
            norm1: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention {
                q: candle_nn::linear(h, h, a.pp("q_proj"))?,
                k: candle_nn::linear(h, h, a.pp("k_proj"))?,
                v: candle_nn::linear(h, h, a.pp("v_proj"))?,
                out: candle_nn::linear(h, h, a.pp("out_proj"))?,
                heads: c.num_attention_heads,
                head_dim: h / c.num_attention_heads,
            },
            norm2: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
            activation: c.activation,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, mask)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let h = match self.activation {
            TextActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            TextActivation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }
}

/// What [`TextEncoder::forward`] returns.
pub struct TextOutput {
    /// [batch, seq, hidden], after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// [batch, seq, hidden]: `hidden_states[-2]` (or the `-k` asked of
    /// [`TextEncoder::forward_from_end`]), before the final norm, what SDXL
    /// conditions on.
    pub penultimate: Tensor,
    /// [batch, hidden] `pooler_output` (the final-normed state at the
    /// end-of-text position), or for the projection variant [batch,
    /// projection_dim] `text_embeds`.
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    max_positions: usize,
    eos_token_id: u32,
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, cfg: &TextEncoderConfig) -> Result<TextEncoder> {
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else if vb.contains_tensor("embeddings.token_embedding.weight") {
            vb.clone()
        } else {
            candle_core::bail!(
                "no `text_model.embeddings.token_embedding.weight` nor `embeddings.token_embedding.weight`: not a CLIP text encoder's weights"
            )
        };
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(tm.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let projection = match cfg.projection_dim {
            Some(p) => Some(Linear::new(vb.get((p, h), "text_projection.weight")?, None)),
            None => None,
        };
        Ok(TextEncoder {
            token_embedding: candle_nn::embedding(cfg.vocab_size, h, tm.pp("embeddings.token_embedding"))?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                h,
                tm.pp("embeddings.position_embedding"),
            )?,
            layers,
            final_norm: candle_nn::layer_norm(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?,
            projection,
            max_positions: cfg.max_position_embeddings,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// ids: [batch, seq] u32; `penultimate` is `hidden_states[-2]`.
    pub fn forward(&self, ids: &Tensor) -> Result<TextOutput> {
        self.forward_from_end(ids, 2)
    }

    /// As [`TextEncoder::forward`], with `hidden_states[-k]` as `penultimate`
    /// (k = 2 + clip_skip in diffusers' SDXL pipelines; k = num_layers + 1 is
    /// the embeddings).
    pub fn forward_from_end(&self, ids: &Tensor, k: usize) -> Result<TextOutput> {
        let n = self.layers.len();
        if k == 0 || k > n + 1 {
            candle_core::bail!("hidden_states[-{k}] does not exist: the encoder has {n} layers ({} states)", n + 1);
        }
        let (batch, seq) = ids.dims2()?;
        if seq > self.max_positions {
            candle_core::bail!("{seq} tokens, more than the encoder's {} positions", self.max_positions);
        }
        let device = ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let mut x = self.token_embedding.forward(ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask: Vec<f32> =
            (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (seq, seq), device)?;
        // hidden_states[0] is the embeddings, hidden_states[i] layer i's output.
        let wanted = n + 1 - k;
        let mut penultimate = if wanted == 0 { Some(x.clone()) } else { None };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &mask)?;
            if i + 1 == wanted {
                penultimate = Some(x.clone());
            }
        }
        let last_hidden_state = self.final_norm.forward(&x)?;
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let pooled = (0..batch)
            .map(|b| last_hidden_state.i((b, pooled_position(&rows[b], self.eos_token_id)))?.unsqueeze(0))
            .collect::<Result<Vec<_>>>()?;
        let mut pooled = Tensor::cat(&pooled, 0)?;
        if let Some(p) = &self.projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(TextOutput { last_hidden_state, penultimate: penultimate.expect("k checked above"), pooled })
    }
}

/// Where transformers' CLIP takes the pooled state of one sequence: with the
/// legacy `eos_token_id == 2`, at `argmax(input_ids)` (the first largest id:
/// end-of-text is the last id of CLIP's vocabulary); otherwise at the first
/// position of `eos_token_id` (0 when absent, as `argmax` of all-false).
fn pooled_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&t| t == max).unwrap_or(0)
    } else {
        ids.iter().position(|&t| t == eos_token_id).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testing::{assert_close, fixture_dir, ref_tensor, reference, TOL};
    use candle_core::Device;
    use serde_json::json;

    fn parse(v: Value) -> std::result::Result<TextEncoderConfig, ConfigError> {
        TextEncoderConfig::from_json(v.as_object().unwrap(), "text_encoder/config.json")
    }

    /// runwayml/stable-diffusion-v1-5 text_encoder/config.json.
    fn sd15() -> Value {
        json!({
            "_name_or_path": "openai/clip-vit-large-patch14",
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "projection_dim": 768,
            "torch_dtype": "float32",
            "transformers_version": "4.22.0.dev0",
            "vocab_size": 49408
        })
    }

    /// stabilityai/stable-diffusion-2-1 text_encoder/config.json.
    fn sd21() -> Value {
        json!({
            "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "pad_token_id": 1,
            "projection_dim": 512,
            "torch_dtype": "float32",
            "transformers_version": "4.25.0.dev0",
            "vocab_size": 49408
        })
    }

    /// stabilityai/stable-diffusion-xl-base-1.0 text_encoder/config.json.
    fn sdxl() -> Value {
        json!({
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "projection_dim": 768,
            "torch_dtype": "float16",
            "transformers_version": "4.32.0.dev0",
            "vocab_size": 49408
        })
    }

    /// stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json.
    fn sdxl2() -> Value {
        json!({
            "architectures": ["CLIPTextModelWithProjection"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 5120,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "pad_token_id": 1,
            "projection_dim": 1280,
            "torch_dtype": "float16",
            "transformers_version": "4.32.0.dev0",
            "vocab_size": 49408
        })
    }

    fn with(mut base: Value, key: &str, v: Value) -> Value {
        base.as_object_mut().unwrap().insert(key.into(), v);
        base
    }

    #[test]
    fn official_configs_parse() {
        let a = parse(sd15()).unwrap();
        assert_eq!((a.hidden_size, a.projection_dim, a.activation, a.eos_token_id), (768, None, TextActivation::QuickGelu, 2));
        let b = parse(sd21()).unwrap();
        assert_eq!((b.hidden_size, b.num_hidden_layers, b.activation), (1024, 23, TextActivation::Gelu));
        let c = parse(sdxl()).unwrap();
        assert_eq!(c, TextEncoderConfig { ..a.clone() });
        let d = parse(sdxl2()).unwrap();
        assert_eq!((d.hidden_size, d.projection_dim, d.num_attention_heads), (1280, Some(1280), 20));
        // transformers 5's form of the same file: `dtype`, no `dropout`.
        let mut v5 = sd15();
        let o = v5.as_object_mut().unwrap();
        o.remove("torch_dtype");
        o.remove("dropout");
        o.insert("dtype".into(), json!("float32"));
        o.insert("transformers_version".into(), json!("5.24.0"));
        assert_eq!(parse(v5).unwrap(), a);
        // A full transformers 4 dump carries every PretrainedConfig key.
        let full = json!({"add_cross_attention": false, "is_encoder_decoder": false, "pruned_heads": {},
            "tie_word_embeddings": true, "output_hidden_states": false, "chunk_size_feed_forward": 0,
            "torchscript": false, "return_dict": true, "id2label": {"0": "LABEL_0"}, "problem_type": null});
        let mut v = sd15();
        v.as_object_mut().unwrap().extend(full.as_object().unwrap().clone());
        assert_eq!(parse(v).unwrap(), a);
        // The class model_index.json names stands in for a missing `architectures`.
        let mut bare = sdxl2();
        bare.as_object_mut().unwrap().remove("architectures");
        let e = TextEncoderConfig::from_json_with_class(bare.as_object().unwrap(), "te2/config.json", Some("CLIPTextModelWithProjection"));
        assert_eq!(e.unwrap(), d);
    }

    #[test]
    fn refused_keys_name_file_and_key() {
        for (key, value) in [
            ("hidden_act", json!("gelu_new")),
            ("architectures", json!(["CLIPModel"])),
            ("model_type", json!("clip")),
            ("eos_token_id", json!([2, 3])),
            ("pruned_heads", json!({"0": [1]})),
            ("is_decoder", json!(true)),
            ("quantization_config", json!({"quant_method": "bitsandbytes"})),
            ("position_embedding_type", json!("relative_key")),
            ("num_attention_heads", json!(7)),
        ] {
            let e = parse(with(sd15(), key, value)).unwrap_err().to_string();
            assert!(e.starts_with("text_encoder/config.json: ") && e.contains(&format!("`{key}`")), "{key}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let mut bare = sd15();
        bare.as_object_mut().unwrap().remove("architectures");
        assert!(parse(bare).unwrap_err().to_string().contains("`architectures`"));
    }

    #[test]
    fn pooled_position_follows_transformers() {
        // Legacy configs: argmax of the ids, the first when tied.
        assert_eq!(pooled_position(&[49406, 320, 49407, 49407, 49407], 2), 2);
        // An added token above end-of-text wins argmax; a real eos id does not.
        assert_eq!(pooled_position(&[49406, 49408, 320, 49407, 0], 2), 1);
        assert_eq!(pooled_position(&[49406, 49408, 320, 49407, 0], 49407), 3);
        assert_eq!(pooled_position(&[49406, 320, 0], 49407), 0);
    }

    #[test]
    fn text_encoders_match_transformers() {
        for name in ["sd15", "sd21", "sdxl"] {
            let r = reference(name);
            for (folder, want) in r["text_encoders"].as_object().unwrap() {
                let dir = fixture_dir(name).join(folder);
                let cfg = TextEncoderConfig::from_file(&dir.join("config.json")).unwrap();
                assert_eq!(cfg.projection_dim.is_some(), folder == "text_encoder_2");
                // SAFETY: the fixture file is not modified while mapped.
                let vb = unsafe {
                    VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)
                }
                .unwrap();
                let te = TextEncoder::new(vb, &cfg).unwrap();
                let ids: Vec<Vec<u32>> = serde_json::from_value(want["input_ids"].clone()).unwrap();
                let (b, n) = (ids.len(), ids[0].len());
                let ids = Tensor::from_vec(ids.concat(), (b, n), &Device::Cpu).unwrap();
                let out = te.forward(&ids).unwrap();
                let what = format!("{name}/{folder}");
                assert_close(&format!("{what} last_hidden_state"), &out.last_hidden_state, &ref_tensor(&want["last_hidden_state"]), TOL);
                assert_close(&format!("{what} hidden_states[-2]"), &out.penultimate, &ref_tensor(&want["penultimate"]), TOL);
                assert_close(&format!("{what} pooled"), &out.pooled, &ref_tensor(&want["pooled"]), TOL);
            }
        }
    }

    #[test]
    fn runs_in_half_precision() {
        let dir = fixture_dir("sdxl").join("text_encoder_2");
        let want = &reference("sdxl")["text_encoders"]["text_encoder_2"];
        let cfg = TextEncoderConfig::from_file(&dir.join("config.json")).unwrap();
        // SAFETY: the fixture file is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F16, &Device::Cpu) }
            .unwrap();
        let te = TextEncoder::new(vb, &cfg).unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(want["input_ids"].clone()).unwrap();
        let (b, n) = (ids.len(), ids[0].len());
        let out = te.forward(&Tensor::from_vec(ids.concat(), (b, n), &Device::Cpu).unwrap()).unwrap();
        assert_eq!(out.pooled.dtype(), DType::F16);
        let pooled = out.pooled.to_dtype(DType::F32).unwrap();
        assert_close("sdxl/text_encoder_2 pooled, float16", &pooled, &ref_tensor(&want["pooled"]), 1e-2);
    }
}
