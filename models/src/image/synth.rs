//! Synthetic pipelines: `mora-exec synth --arch sd15|sd21|sdxl` writes a
//! deterministic random-weight pipeline in the exact layout diffusers
//! writes (model_index.json, scheduler/, text_encoder/, tokenizer/, unet/,
//! vae/, and SDXL's text_encoder_2/, tokenizer_2/), its configs in the
//! forms of the official repos, scaled to a requested size. At the real
//! shapes (the largest size) it is as big as the pipeline it imitates,
//! which is what a benchmark of loading wants.
//!
//! The tensors written are exactly those Mora's own networks read: each
//! component is built once over a backend that records the names and shapes
//! it is asked for.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use serde_json::{json, Value};

use super::clip::{TextEncoder, TextEncoderConfig};
use super::unet::{UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use crate::lm_config::ConfigError;
use crate::synth::{io_error, write_safetensors, Init, SynthError};
use mora_common::manifest::WeightDType;

/// Why a synthetic pipeline cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum PipelineSynthError {
    #[error("{target} B is above this architecture's real size ({full} B, its largest synthetic pipeline)")]
    TooLarge { target: u64, full: u64 },
    #[error("{target} B is below this architecture's smallest synthetic pipeline ({smallest} B)")]
    TooSmall { target: u64, smallest: u64 },
    /// A file or folder cannot be made, or a weight file written.
    #[error(transparent)]
    Files(#[from] SynthError),
    /// A tokenizer's `vocab.json` or `merges.txt` cannot be written.
    #[error(transparent)]
    Tokenizer(std::io::Error),
    #[error("the built-in vocabulary: {0}")]
    Vocabulary(#[source] serde_json::Error),
    #[error("the built-in vocabulary has no <|endoftext|>")]
    NoEndOfText,
    /// A config written here does not read back (a bug in this module).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A network does not build from a config written here (a bug in this module).
    #[error(transparent)]
    Build(#[from] candle_core::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineArch {
    Sd15,
    Sd21,
    Sdxl,
}

impl PipelineArch {
    pub fn parse(s: &str) -> Option<PipelineArch> {
        match s {
            "sd15" => Some(PipelineArch::Sd15),
            "sd21" => Some(PipelineArch::Sd21),
            "sdxl" => Some(PipelineArch::Sdxl),
            _ => None,
        }
    }
}

/// The small real CLIP BPE vocabulary every synthetic pipeline's tokenizer uses.
const VOCAB: &str = include_str!("../../../tests/fixtures/image/pipelines/sd15/tokenizer/vocab.json");
const MERGES: &str = include_str!("../../../tests/fixtures/image/pipelines/sd15/tokenizer/merges.txt");

/// One text encoder's shape: hidden width, layers, activation, projection.
struct TextShape {
    hidden: usize,
    layers: usize,
    act: &'static str,
    projection: bool,
}

/// A multiple of `step`, at least `step`, nearest `v`.
fn round_to(v: f64, step: usize) -> usize {
    ((v / step as f64).round() as usize).max(1) * step
}

/// The pipeline's configs at width multiplier `m` (1: the real shapes).
struct Configs {
    unet: Value,
    vae: Value,
    text: Vec<Value>,
    scheduler: Value,
    index: Value,
    /// `pad_token` of each tokenizer.
    pads: Vec<&'static str>,
}

fn configs(arch: PipelineArch, m: f64, vocab: usize, eos: usize) -> Configs {
    let ch = |c: usize| round_to(c as f64 * m, 64);
    let depth = |d: usize| ((d as f64 * m).round() as usize).max(1);
    let texts: Vec<TextShape> = match arch {
        PipelineArch::Sd15 => vec![TextShape { hidden: 768, layers: 12, act: "quick_gelu", projection: false }],
        PipelineArch::Sd21 => vec![TextShape { hidden: 1024, layers: 23, act: "gelu", projection: false }],
        PipelineArch::Sdxl => vec![
            TextShape { hidden: 768, layers: 12, act: "quick_gelu", projection: false },
            TextShape { hidden: 1280, layers: 32, act: "gelu", projection: true },
        ],
    };
    let mut text = Vec::new();
    let mut hidden_sum = 0;
    let mut pooled = 0;
    for t in &texts {
        let h = ch(t.hidden);
        hidden_sum += h;
        if t.projection {
            pooled = h;
        }
        text.push(json!({
            "architectures": [if t.projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": eos,
            "hidden_act": t.act,
            "hidden_size": h,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 4 * h,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": h / 64,
            "num_hidden_layers": depth(t.layers),
            "pad_token_id": 1,
            "projection_dim": if t.projection { h } else { ch(768) },
            "torch_dtype": "float16",
            "transformers_version": "4.32.0",
            "vocab_size": vocab,
        }));
    }
    let (blocks, sample): (Vec<usize>, usize) = match arch {
        PipelineArch::Sd15 => (vec![320, 640, 1280, 1280], 64),
        PipelineArch::Sd21 => (vec![320, 640, 1280, 1280], 96),
        PipelineArch::Sdxl => (vec![320, 640, 1280], 128),
    };
    let blocks: Vec<usize> = blocks.into_iter().map(ch).collect();
    let mut unet = json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu",
        "block_out_channels": blocks,
        "center_input_sample": false,
        "cross_attention_dim": hidden_sum,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": sample,
    });
    let u = unet.as_object_mut().expect("an object");
    match arch {
        PipelineArch::Sd15 => {
            u.insert("attention_head_dim".into(), json!(8));
            u.insert("down_block_types".into(), json!(["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]));
            u.insert("up_block_types".into(), json!(["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]));
        }
        PipelineArch::Sd21 => {
            let heads: Vec<usize> = blocks.iter().map(|c| c / 64).collect();
            u.insert("attention_head_dim".into(), json!(heads));
            u.insert("down_block_types".into(), json!(["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]));
            u.insert("up_block_types".into(), json!(["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]));
            u.insert("use_linear_projection".into(), json!(true));
            u.insert("upcast_attention".into(), json!(true));
            u.insert("dual_cross_attention".into(), json!(false));
            u.insert("num_class_embeds".into(), Value::Null);
            u.insert("only_cross_attention".into(), json!(false));
            u.insert("class_embed_type".into(), Value::Null);
            u.insert("resnet_time_scale_shift".into(), json!("default"));
        }
        PipelineArch::Sdxl => {
            let heads: Vec<usize> = blocks.iter().map(|c| c / 64).collect();
            let time_dim = round_to(256.0 * m, 8);
            u.insert("attention_head_dim".into(), json!(heads));
            u.insert("down_block_types".into(), json!(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]));
            u.insert("up_block_types".into(), json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]));
            u.insert("transformer_layers_per_block".into(), json!([1, depth(2), depth(10)]));
            u.insert("use_linear_projection".into(), json!(true));
            u.insert("addition_embed_type".into(), json!("text_time"));
            u.insert("addition_time_embed_dim".into(), json!(time_dim));
            u.insert("projection_class_embeddings_input_dim".into(), json!(pooled + 6 * time_dim));
            u.insert("upcast_attention".into(), Value::Null);
        }
    }
    let vae_blocks: Vec<usize> = [128, 256, 512, 512].iter().map(|&c| round_to(c as f64 * m, 32)).collect();
    let mut vae = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": vae_blocks,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample * 8,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    });
    if arch == PipelineArch::Sdxl {
        vae["scaling_factor"] = json!(0.13025);
        vae["force_upcast"] = json!(true);
    }
    let scheduler = match arch {
        PipelineArch::Sd15 => json!({
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false,
        }),
        PipelineArch::Sd21 => json!({
            "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
            "prediction_type": "v_prediction", "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
            "trained_betas": null,
        }),
        PipelineArch::Sdxl => json!({
            "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear",
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null,
            "use_karras_sigmas": false,
        }),
    };
    let index = match arch {
        PipelineArch::Sd15 | PipelineArch::Sd21 => json!({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.19.0",
            "feature_extractor": [null, null], "safety_checker": [null, null], "requires_safety_checker": false,
            "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
        PipelineArch::Sdxl => json!({
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0", "force_zeros_for_empty_prompt": true,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    };
    let pads = match arch {
        PipelineArch::Sd15 => vec!["<|endoftext|>"],
        PipelineArch::Sd21 => vec!["!"],
        PipelineArch::Sdxl => vec!["<|endoftext|>", "!"],
    };
    Configs { unet, vae, text, scheduler, index, pads }
}

/// A VarBuilder backend that hands out zero-cost broadcast tensors of the
/// shapes asked for, and remembers each name and shape in a list its
/// creator keeps a handle on.
struct Recorder(std::sync::Arc<Mutex<Vec<Recorded>>>);

/// A tensor's name and shape.
type Recorded = (String, Vec<usize>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().expect("recorder").push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("synthetic pipelines give every tensor a shape (asked for {name} without one)")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The tensors `build` reads, in the order it reads them (each once).
fn record(build: impl FnOnce(candle_nn::VarBuilder) -> candle_core::Result<()>) -> Result<Vec<Recorded>, PipelineSynthError> {
    let recorded = std::sync::Arc::new(Mutex::new(Vec::new()));
    let vb = candle_nn::VarBuilder::from_backend(Box::new(Recorder(recorded.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let mut seen = std::collections::HashSet::new();
    let all = recorded.lock().expect("recorder").clone();
    Ok(all.into_iter().filter(|(n, _)| seen.insert(n.clone())).collect())
}

fn init_of(name: &str, shape: &[usize]) -> Init {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let owner = name.rsplit('.').nth(1).unwrap_or("");
    if leaf == "bias" {
        Init::Zeros
    } else if leaf == "weight" && (owner.contains("norm") || owner.contains("ln")) && shape.len() == 1 {
        Init::Ones
    } else if shape.len() > 2 {
        Init::RandomFanIn
    } else {
        Init::Random
    }
}

fn parse<T>(value: &Value, file: &str, read: impl Fn(&serde_json::Map<String, Value>, &str) -> Result<T, ConfigError>) -> Result<T, ConfigError> {
    read(value.as_object().expect("an object"), file)
}

/// Every component's tensors at multiplier `m`: (folder, file name, tensors).
type Component = (&'static str, &'static str, Vec<(String, Vec<usize>)>);

fn components(c: &Configs) -> Result<Vec<Component>, PipelineSynthError> {
    let mut out = Vec::new();
    for (i, t) in c.text.iter().enumerate() {
        let cfg = parse(t, "config.json", TextEncoderConfig::from_json)?;
        let tensors = record(|vb| TextEncoder::new(vb, &cfg).map(|_| ()))?;
        out.push((if i == 0 { "text_encoder" } else { "text_encoder_2" }, "model.safetensors", tensors));
    }
    let unet = parse(&c.unet, "unet/config.json", UNetConfig::from_json)?;
    out.push(("unet", "diffusion_pytorch_model.safetensors", record(|vb| UNet::new(vb, &unet).map(|_| ()))?));
    let vae = parse(&c.vae, "vae/config.json", VaeConfig::from_json)?;
    out.push(("vae", "diffusion_pytorch_model.safetensors", record(|vb| Vae::new(vb, &vae).map(|_| ()))?));
    Ok(out)
}

fn elements(parts: &[Component]) -> u64 {
    parts.iter().flat_map(|(_, _, t)| t.iter()).map(|(_, s)| s.iter().product::<usize>() as u64).sum()
}

/// What was written.
pub struct PipelineReport {
    pub bytes: u64,
    /// The width multiplier of the real shapes used (1: the real pipeline's size).
    pub scale: f64,
}

/// Writes a synthetic pipeline of about `target_bytes` into `dir`.
pub fn generate(arch: PipelineArch, target_bytes: u64, dtype: WeightDType, seed: u64, dir: &Path) -> Result<PipelineReport, PipelineSynthError> {
    let vocab: serde_json::Map<String, Value> = serde_json::from_str(VOCAB).map_err(PipelineSynthError::Vocabulary)?;
    let eos = vocab.get("<|endoftext|>").and_then(Value::as_u64).ok_or(PipelineSynthError::NoEndOfText)? as usize;
    let elem = dtype.tensor_dtype().size_in_bytes() as u64;
    let size_at = |m: f64| -> Result<u64, PipelineSynthError> { Ok(elements(&components(&configs(arch, m, vocab.len(), eos))?) * elem) };
    let full = size_at(1.0)?;
    let smallest = size_at(0.05)?;
    if target_bytes > full + full / 20 {
        return Err(PipelineSynthError::TooLarge { target: target_bytes, full });
    }
    if target_bytes < smallest {
        return Err(PipelineSynthError::TooSmall { target: target_bytes, smallest });
    }
    // Bytes grow with the multiplier: bisect it.
    let (mut lo, mut hi) = (0.05f64, 1.0f64);
    for _ in 0..24 {
        let mid = (lo + hi) / 2.0;
        if size_at(mid)? < target_bytes {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let m = if size_at(hi)?.abs_diff(target_bytes) < size_at(lo)?.abs_diff(target_bytes) { hi } else { lo };
    let c = configs(arch, m, vocab.len(), eos);
    let parts = components(&c)?;
    let write_json = |p: &Path, v: &Value| -> Result<(), SynthError> {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
        }
        std::fs::write(p, serde_json::to_string_pretty(v).expect("JSON") + "\n").map_err(io_error("write", p))
    };
    write_json(&dir.join("model_index.json"), &c.index)?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &c.scheduler)?;
    write_json(&dir.join("unet/config.json"), &c.unet)?;
    write_json(&dir.join("vae/config.json"), &c.vae)?;
    for (i, (t, pad)) in c.text.iter().zip(&c.pads).enumerate() {
        let suffix = if i == 0 { String::new() } else { format!("_{}", i + 1) };
        write_json(&dir.join(format!("text_encoder{suffix}/config.json")), t)?;
        let tok = dir.join(format!("tokenizer{suffix}"));
        std::fs::create_dir_all(&tok).map_err(io_error("create", &tok))?;
        std::fs::write(tok.join("vocab.json"), VOCAB).map_err(PipelineSynthError::Tokenizer)?;
        std::fs::write(tok.join("merges.txt"), MERGES).map_err(PipelineSynthError::Tokenizer)?;
        let specials = json!({
            "bos_token": {"content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
            "eos_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
            "pad_token": pad,
            "unk_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
        });
        write_json(&tok.join("special_tokens_map.json"), &specials)?;
        write_json(&tok.join("tokenizer_config.json"), &json!({
            "add_prefix_space": false, "bos_token": "<|startoftext|>", "do_lower_case": true, "eos_token": "<|endoftext|>",
            "errors": "replace", "model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        }))?;
    }
    let mut bytes = 0;
    for (k, (folder, file, tensors)) in parts.iter().enumerate() {
        let path = dir.join(folder).join(file);
        let with_init: Vec<(String, Vec<usize>, Init)> =
            tensors.iter().map(|(n, s)| (n.clone(), s.clone(), init_of(n, s))).collect();
        write_safetensors(&path, &with_init, dtype, seed ^ ((k as u64 + 1) << 56))?;
        bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    }
    Ok(PipelineReport { bytes, scale: m })
}
