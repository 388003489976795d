//! The denoising UNet of Stable Diffusion: diffusers' `UNet2DConditionModel`,
//! configured from its `unet/config.json` and computing what its `forward`
//! computes, for the SD 1.5, 2.1, XL (base and refiner) and Turbo shapes.
//!
//! Tensor names are those of diffusers' state dict
//! (`diffusion_pytorch_model.safetensors`). Every block is written here
//! rather than taken from candle-transformers' `stable_diffusion` module,
//! whose blocks differ from diffusers in ways that change the numbers: its
//! resnets in `DownBlock2D`/`UpBlock2D` always use 32 groups whatever
//! `norm_num_groups` says, its feed-forward uses the tanh GELU where
//! diffusers' GEGLU uses the exact (erf) one, its timestep embedding
//! multiplies in the model's dtype where diffusers multiplies in float32, and
//! it has no SDXL added conditioning nor per-block transformer depths.
//!
//! Config quirks followed here, as diffusers reads them:
//! - `attention_head_dim` is the number of heads (`num_attention_heads` must
//!   be null; diffusers itself refuses it), an int for every block or one
//!   value per down block; up block `i` uses the reversed list's `i`th value
//!   and the mid block the last one; the head width is `channels / heads`.
//! - `transformer_layers_per_block`, `layers_per_block` and
//!   `cross_attention_dim` are an int or one value per down block (up blocks
//!   read them reversed; up blocks have `layers_per_block + 1` resnets).
//! - A key absent from the file takes diffusers' default for it.

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, Linear, VarBuilder};
use serde_json::{Map, Value};

use super::attention::attention;
use super::conv::{conv2d, Conv2d};
use super::norm::{group_norm, GroupNorm};

use crate::image::DIFFUSERS_NEUTRAL;
use crate::lm_config::{read_json, ConfigError, Reader};

/// The two kinds of down and up blocks Mora runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Resnets only (`DownBlock2D`, `UpBlock2D`).
    Plain,
    /// Resnets each followed by a transformer (`CrossAttnDownBlock2D`,
    /// `CrossAttnUpBlock2D`).
    CrossAttn,
}

/// SDXL's added conditioning (`addition_embed_type: "text_time"`): the
/// pooled text embedding and the sinusoidal embeddings of the time ids
/// (sizes, crop, target size or aesthetic score), through `add_embedding`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdditionConfig {
    /// `addition_time_embed_dim`: the width of each time id's embedding.
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: the pooled text embedding's
    /// width plus the number of time ids times `time_embed_dim`.
    pub projection_input_dim: usize,
}

/// Everything a UNet is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// The latents' default height and width; see [`UNetConfig::default_image_size`].
    pub sample_size: usize,
    /// The width of `encoder_hidden_states`.
    pub cross_attention_dim: usize,
    pub addition: Option<AdditionConfig>,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    /// Resnets per down block (up blocks have one more, read reversed).
    pub layers_per_block: Vec<usize>,
    /// Transformer blocks in each transformer of down block `i`.
    pub transformer_layers_per_block: Vec<usize>,
    /// Attention heads of down block `i` (the config's `attention_head_dim`).
    pub attention_heads: Vec<usize>,
    /// A `UNetMidBlock2DCrossAttn` (false when `mid_block_type` is null).
    pub mid_block: bool,
    pub use_linear_projection: bool,
    /// Attention computed in float32 whatever the weights' dtype.
    pub upcast_attention: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    /// The width of the timestep embedding (`time_embedding_dim`, or four
    /// times the first block's channels).
    pub time_embed_dim: usize,
}

impl UNetConfig {
    /// The default image side in pixels: `sample_size` times the VAE's
    /// downscaling factor of 8, as diffusers' pipelines compute it.
    pub fn default_image_size(&self) -> usize {
        self.sample_size * 8
    }

    /// Reads `unet/config.json`.
    pub fn from_file(path: &Path) -> std::result::Result<UNetConfig, ConfigError> {
        let map = read_json(path)?;
        UNetConfig::from_json(&map, &path.display().to_string())
    }

    /// Reads one config object; `file` names it in errors.
    pub fn from_json(map: &Map<String, Value>, file: &str) -> std::result::Result<UNetConfig, ConfigError> {
        let r = Reader::new(map, file, "");
        let cfg = parse(&r)?;
        r.refuse_unread(DIFFUSERS_NEUTRAL, "a UNet2DConditionModel")?;
        Ok(cfg)
    }
}

type CResult<T> = std::result::Result<T, ConfigError>;

/// Refuses `key` unless it is absent, null, or `ok` holds for it.
fn accept(r: &Reader, key: &str, ok: fn(&Value) -> bool, why: &str) -> CResult<()> {
    match r.present(key) {
        Some(v) if !ok(v) => Err(r.err(format!("`{key}` = {v}: {why}; Mora does not run it"))),
        _ => Ok(()),
    }
}

/// A list of block type names.
fn str_list(r: &Reader, key: &str, default: &[&str]) -> CResult<Vec<String>> {
    match r.present(key) {
        None => Ok(default.iter().map(|s| s.to_string()).collect()),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| r.err(format!("`{key}` must be a list of names, not {v}"))))
            .collect(),
        Some(v) => Err(r.err(format!("`{key}` must be a list of names, not {v}"))),
    }
}

/// An int meaning the same for every block, or one positive int per block.
fn per_block(r: &Reader, key: &str, default: usize, blocks: usize) -> CResult<Vec<usize>> {
    let one = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok()).filter(|&n| n > 0);
    let bad = |v: &Value| r.err(format!("`{key}` must be a positive whole number or a list of {blocks} of them, not {v}"));
    match r.present(key) {
        None => Ok(vec![default; blocks]),
        Some(Value::Array(a)) => {
            if a.len() != blocks {
                return Err(r.err(format!("`{key}` lists {} values for {blocks} down blocks", a.len())));
            }
            a.iter().map(|v| one(v).ok_or_else(|| bad(v))).collect()
        }
        Some(v) => one(v).map(|n| vec![n; blocks]).ok_or_else(|| bad(v)),
    }
}

fn parse(r: &Reader) -> CResult<UNetConfig> {
    // Keys that change the network and have one value Mora runs.
    let is_false = |v: &Value| v == &Value::Bool(false);
    accept(r, "num_attention_heads", |_| false, "diffusers reads the heads from `attention_head_dim` and refuses this key")?;
    accept(r, "class_embed_type", |_| false, "class embeddings are not supported")?;
    accept(r, "num_class_embeds", |_| false, "class embeddings are not supported")?;
    accept(r, "class_embeddings_concat", is_false, "class embeddings are not supported")?;
    accept(r, "encoder_hid_dim", |_| false, "an encoder_hid_proj is not supported")?;
    accept(r, "encoder_hid_dim_type", |_| false, "an encoder_hid_proj is not supported")?;
    accept(r, "time_embedding_type", |v| v == "positional", "only the positional timestep embedding is supported")?;
    accept(r, "time_embedding_act_fn", |_| false, "an activation after the time embedding is not supported")?;
    accept(r, "timestep_post_act", |_| false, "an activation after the timestep MLP is not supported")?;
    accept(r, "time_cond_proj_dim", |_| false, "a timestep condition projection (LCM) is not supported")?;
    accept(r, "resnet_time_scale_shift", |v| v == "default", "only the `default` resnet time embedding is supported")?;
    accept(r, "conv_in_kernel", |v| v.as_u64() == Some(3), "only a 3x3 conv_in is supported")?;
    accept(r, "conv_out_kernel", |v| v.as_u64() == Some(3), "only a 3x3 conv_out is supported")?;
    accept(r, "act_fn", |v| v == "silu" || v == "swish", "only the silu activation is supported")?;
    accept(r, "dual_cross_attention", is_false, "dual cross-attention is not supported")?;
    accept(r, "attention_type", |v| v == "default", "only `default` attention is supported")?;
    accept(r, "cross_attention_norm", |_| false, "a norm on the cross-attention context is not supported")?;
    accept(r, "reverse_transformer_layers_per_block", |_| false, "per-layer up-block depths are not supported")?;
    accept(r, "mid_block_only_cross_attention", is_false, "a cross-attention-only mid block is not supported")?;
    accept(
        r,
        "only_cross_attention",
        |v| v == &Value::Bool(false) || v.as_array().is_some_and(|a| a.iter().all(|x| x == &Value::Bool(false))),
        "cross-attention-only transformers are not supported",
    )?;
    // Neutral for the blocks Mora runs: dropout at inference; the first two
    // are read only by the resnet-downsampling and simple-cross-attention
    // block types, which are refused; the heads of the `text` addition type,
    // which is refused.
    for k in ["dropout", "resnet_skip_time_act", "resnet_out_scale_factor", "addition_embed_type_num_heads"] {
        r.take(k);
    }

    let down_names = str_list(
        r,
        "down_block_types",
        &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    )?;
    let up_names =
        str_list(r, "up_block_types", &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])?;
    let kind = |key: &str, name: &str, plain: &str, cross: &str| -> CResult<BlockKind> {
        if name == plain {
            Ok(BlockKind::Plain)
        } else if name == cross {
            Ok(BlockKind::CrossAttn)
        } else {
            Err(r.err(format!("`{key}` has `{name}`; Mora runs {cross} and {plain}")))
        }
    };
    let down_blocks = down_names
        .iter()
        .map(|n| kind("down_block_types", n, "DownBlock2D", "CrossAttnDownBlock2D"))
        .collect::<CResult<Vec<_>>>()?;
    let up_blocks =
        up_names.iter().map(|n| kind("up_block_types", n, "UpBlock2D", "CrossAttnUpBlock2D")).collect::<CResult<Vec<_>>>()?;
    let n = down_blocks.len();
    if up_blocks.len() != n {
        return Err(r.err(format!("`up_block_types` has {} blocks and `down_block_types` {n}", up_blocks.len())));
    }
    let block_out_channels = match r.present("block_out_channels") {
        None if n == 4 => vec![320, 640, 1280, 1280],
        None => return Err(r.err(format!("`block_out_channels` is missing ({n} down blocks)"))),
        Some(v) if !v.is_array() => return Err(r.err(format!("`block_out_channels` must be a list, not {v}"))),
        Some(_) => per_block(r, "block_out_channels", 0, n)?,
    };
    let mid_block = match r.take("mid_block_type") {
        None => true,
        Some(Value::Null) => false,
        Some(v) if v == "UNetMidBlock2DCrossAttn" => true,
        Some(v) => return Err(r.err(format!("`mid_block_type` is {v}; Mora runs UNetMidBlock2DCrossAttn (or none)"))),
    };
    let cross = per_block(r, "cross_attention_dim", 1280, n)?;
    if cross.iter().any(|&c| c != cross[0]) {
        return Err(r.err(format!("`cross_attention_dim` differs between blocks ({cross:?}); Mora runs one width for all")));
    }
    let layers_per_block = per_block(r, "layers_per_block", 2, n)?;
    if let Some(Value::Array(a)) = r.m.get("transformer_layers_per_block") {
        if a.iter().any(Value::is_array) {
            return Err(r.err("`transformer_layers_per_block` lists lists (per-layer depths); Mora runs one depth per block".into()));
        }
    }
    let transformer_layers_per_block = per_block(r, "transformer_layers_per_block", 1, n)?;
    let attention_heads = per_block(r, "attention_head_dim", 8, n)?;
    let norm_num_groups = match r.take("norm_num_groups") {
        Some(Value::Null) => return Err(r.err("`norm_num_groups` is null (no output norm); Mora does not run it".into())),
        _ => r.opt_usize("norm_num_groups")?.unwrap_or(32),
    };
    if norm_num_groups == 0 {
        return Err(r.err("`norm_num_groups` must be at least 1".into()));
    }
    for (i, &c) in block_out_channels.iter().enumerate() {
        if c % norm_num_groups != 0 {
            return Err(r.err(format!("`block_out_channels`[{i}] ({c}) is not a multiple of `norm_num_groups` ({norm_num_groups})")));
        }
    }
    // The heads of every transformer: down block i, the mid block (last),
    // up block i (reversed list).
    for (i, (&h, kind)) in attention_heads.iter().zip(&down_blocks).enumerate() {
        let c = block_out_channels[i];
        let up_c = block_out_channels[n - 1 - i];
        if (*kind == BlockKind::CrossAttn && h > c) || (up_blocks[n - 1 - i] == BlockKind::CrossAttn && h > up_c) {
            return Err(r.err(format!("`attention_head_dim`[{i}] ({h} heads) exceeds the block's channels")));
        }
    }
    let first = block_out_channels[0];
    let addition = match r.present("addition_embed_type") {
        None => {
            // Read only by the `projection` class embedding, which is refused.
            r.take("projection_class_embeddings_input_dim");
            r.take("addition_time_embed_dim");
            None
        }
        Some(v) if v == "text_time" => Some(AdditionConfig {
            time_embed_dim: r.usize("addition_time_embed_dim")?,
            projection_input_dim: r.usize("projection_class_embeddings_input_dim")?,
        }),
        Some(v) => return Err(r.err(format!("`addition_embed_type` is {v}; Mora runs null and \"text_time\" (SDXL)"))),
    };
    let sample_size = match r.present("sample_size") {
        Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => {
            a[0].as_u64().map(|n| n as usize).ok_or_else(|| r.err("`sample_size` must be whole numbers".into()))?
        }
        Some(Value::Array(_)) => return Err(r.err("`sample_size` is not square; Mora needs one side".into())),
        _ => r.usize("sample_size")?,
    };
    let freq_shift = r.opt_f64("freq_shift")?.unwrap_or(0.0);
    if freq_shift >= (first / 2) as f64 {
        return Err(r.err(format!("`freq_shift` ({freq_shift}) must be below half of `block_out_channels`[0]")));
    }
    Ok(UNetConfig {
        in_channels: r.opt_usize("in_channels")?.unwrap_or(4),
        out_channels: r.opt_usize("out_channels")?.unwrap_or(4),
        sample_size,
        cross_attention_dim: cross[0],
        addition,
        time_embed_dim: r.opt_usize("time_embedding_dim")?.unwrap_or(first * 4),
        block_out_channels,
        down_blocks,
        up_blocks,
        layers_per_block,
        transformer_layers_per_block,
        attention_heads,
        mid_block,
        use_linear_projection: r.bool_or("use_linear_projection", false)?,
        upcast_attention: r.bool_or("upcast_attention", false)?,
        norm_num_groups,
        norm_eps: r.opt_f64("norm_eps")?.unwrap_or(1e-5),
        flip_sin_to_cos: r.bool_or("flip_sin_to_cos", true)?,
        freq_shift,
        downsample_padding: r.opt_usize("downsample_padding")?.unwrap_or(1),
        mid_block_scale_factor: r.opt_f64("mid_block_scale_factor")?.unwrap_or(1.0),
        center_input_sample: r.bool_or("center_input_sample", false)?,
    })
}

// ---------------------------------------------------------------------------
// The network.

/// SDXL's added conditions (`added_cond_kwargs`).
pub struct AddedConditions {
    /// The pooled text embedding, (batch, width).
    pub text_embeds: Tensor,
    /// (batch, number of ids): original size, crop top-left, then target size
    /// (base) or aesthetic score (refiner).
    pub time_ids: Tensor,
}

fn conv(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    conv2d(cin, cout, k, Conv2dConfig { stride, padding, ..Default::default() }, vb)
}

/// diffusers' `get_timestep_embedding`, in float32 on the host, step by step
/// as torch computes it: (rows, dim).
fn timestep_embedding(ts: &[f32], dim: usize, flip_sin_to_cos: bool, shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((i as f32 * neg_log) / denom).exp()).collect();
    let mut out = Vec::with_capacity(ts.len() * dim);
    for &t in ts {
        let args = freqs.iter().map(|&f| (t * f) as f64);
        let sin: Vec<f32> = args.clone().map(|a| a.sin() as f32).collect();
        let cos: Vec<f32> = args.map(|a| a.cos() as f32).collect();
        let (a, b) = if flip_sin_to_cos { (cos, sin) } else { (sin, cos) };
        out.extend(a);
        out.extend(b);
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// `TimestepEmbedding`: linear, silu, linear.
struct TimeMlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimeMlp {
    fn new(vb: VarBuilder, cin: usize, dim: usize) -> Result<Self> {
        Ok(TimeMlp {
            linear_1: candle_nn::linear(cin, dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&candle_nn::ops::silu(&self.linear_1.forward(x)?)?)
    }
}

/// `ResnetBlock2D` with the default time embedding.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl Resnet {
    fn new(vb: VarBuilder, cin: usize, cout: usize, temb: usize, cfg: &UNetConfig, scale: f64) -> Result<Self> {
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        Ok(Resnet {
            norm1: group_norm(g, cin, eps, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: candle_nn::linear(temb, cout, vb.pp("time_emb_proj"))?,
            norm2: group_norm(g, cout, eps, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout { Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None },
            output_scale_factor: scale,
        })
    }

    /// `temb_act` is silu(time embedding), shared by every resnet.
    fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time_emb_proj.forward(temb_act)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let y = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(y)
        } else {
            y / self.output_scale_factor
        }
    }
}

/// diffusers' `Attention` as the transformer blocks build it: no q/k/v
/// biases, softmax(QK^T / sqrt(head_dim)) V, an output projection.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    upcast: bool,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, context: usize, heads: usize, head_dim: usize, upcast: bool) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: candle_nn::linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(context, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(context, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, dim, vb.pp("to_out.0"))?,
            heads,
            head_dim,
            upcast,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        // Attention in float32 when the config asks for it (`upcast_attention`);
        // otherwise in the weights' dtype, with the softmax in float32.
        let work = if self.upcast { DType::F32 } else { x.dtype() };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = attention(&self.to_q.forward(x)?, &self.to_k.forward(ctx)?, &self.to_v.forward(ctx)?, self.heads, scale, work)?;
        self.to_out.forward(&out)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU
/// feed-forward, each after a LayerNorm and added back.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, head_dim: usize, cfg: &UNetConfig) -> Result<Self> {
        let inner_ff = dim * 4;
        let up = cfg.upcast_attention;
        Ok(TransformerBlock {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, up)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, cfg.cross_attention_dim, heads, head_dim, up)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_in: candle_nn::linear(dim, inner_ff * 2, vb.pp("ff.net.0.proj"))?,
            ff_out: candle_nn::linear(inner_ff, dim, vb.pp("ff.net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + x)?;
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let parts = h.chunk(2, D::Minus1)?;
        let h = (&parts[0] * parts[1].gelu_erf()?)?;
        self.ff_out.forward(&h)? + x
    }
}

enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` on continuous inputs.
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
    inner: usize,
}

impl Transformer2D {
    fn new(vb: VarBuilder, channels: usize, heads: usize, depth: usize, cfg: &UNetConfig) -> Result<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Proj::Linear(candle_nn::linear(channels, inner, vb.pp("proj_in"))?),
                Proj::Linear(candle_nn::linear(inner, channels, vb.pp("proj_out"))?),
            )
        } else {
            (
                Proj::Conv(conv(vb.pp("proj_in"), channels, inner, 1, 1, 0)?),
                Proj::Conv(conv(vb.pp("proj_out"), inner, channels, 1, 1, 0)?),
            )
        };
        let vbb = vb.pp("transformer_blocks");
        let blocks =
            (0..depth).map(|i| TransformerBlock::new(vbb.pp(i), inner, heads, head_dim, cfg)).collect::<Result<Vec<_>>>()?;
        Ok(Transformer2D {
            norm: group_norm(cfg.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
            inner,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let y = self.norm.forward(x)?;
        // (b, c, h, w) -> (b, h*w, c)
        let tokens = |t: &Tensor, ch: usize| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch)) };
        let mut y = match &self.proj_in {
            Proj::Conv(p) => tokens(&p.forward(&y)?, self.inner)?,
            Proj::Linear(p) => p.forward(&tokens(&y, c)?)?,
        };
        for block in &self.blocks {
            y = block.forward(&y, context)?;
        }
        let image = |t: Tensor, ch: usize| -> Result<Tensor> { t.reshape((b, h, w, ch))?.permute((0, 3, 1, 2))?.contiguous() };
        let y = match &self.proj_out {
            Proj::Conv(p) => p.forward(&image(y, self.inner)?)?,
            Proj::Linear(p) => image(p.forward(&y)?, c)?,
        };
        y + x
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
    /// `downsample_padding` 0: pad right and bottom by one before the conv.
    pad: bool,
}

impl DownBlock {
    fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(conv) = &self.downsample {
            let input = if self.pad { x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)? } else { x };
            x = conv.forward(&input)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
struct UpBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    /// `skips`: this block's skip connections, the last one first used.
    fn forward(
        &self,
        x: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet: too few skip connections".into()))?;
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = resnet.forward(&x, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        if let Some(conv) = &self.upsample {
            let (_, _, h, w) = x.dims4()?;
            let (th, tw) = size.unwrap_or((2 * h, 2 * w));
            x = conv.forward(&x.upsample_nearest2d(th, tw)?)?;
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: resnet, transformer, resnet.
struct MidBlock {
    resnet_0: Resnet,
    attention: Transformer2D,
    resnet_1: Resnet,
}

/// diffusers' `UNet2DConditionModel`.
pub struct UNet {
    cfg: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimeMlp,
    add_embedding: Option<TimeMlp>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<UNet> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.time_embed_dim;
        let conv_in = conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let time_embedding = TimeMlp::new(vb.pp("time_embedding"), ch[0], temb)?;
        let add_embedding = match &cfg.addition {
            Some(a) => Some(TimeMlp::new(vb.pp("add_embedding"), a.projection_input_dim, temb)?),
            None => None,
        };
        let mut down = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vbd = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block[i])
                .map(|j| Resnet::new(vbd.pp("resnets").pp(j), if j == 0 { in_c } else { out_c }, out_c, temb, cfg, 1.0))
                .collect::<Result<Vec<_>>>()?;
            let attentions = match cfg.down_blocks[i] {
                BlockKind::Plain => Vec::new(),
                BlockKind::CrossAttn => (0..cfg.layers_per_block[i])
                    .map(|j| {
                        Transformer2D::new(
                            vbd.pp("attentions").pp(j),
                            out_c,
                            cfg.attention_heads[i],
                            cfg.transformer_layers_per_block[i],
                            cfg,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            let downsample = if i + 1 < n {
                Some(conv(vbd.pp("downsamplers.0.conv"), out_c, out_c, 3, 2, cfg.downsample_padding)?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsample, pad: cfg.downsample_padding == 0 });
        }
        let mid = if cfg.mid_block {
            let vbm = vb.pp("mid_block");
            let c = ch[n - 1];
            let s = cfg.mid_block_scale_factor;
            Some(MidBlock {
                resnet_0: Resnet::new(vbm.pp("resnets.0"), c, c, temb, cfg, s)?,
                attention: Transformer2D::new(
                    vbm.pp("attentions.0"),
                    c,
                    cfg.attention_heads[n - 1],
                    cfg.transformer_layers_per_block[n - 1],
                    cfg,
                )?,
                resnet_1: Resnet::new(vbm.pp("resnets.1"), c, c, temb, cfg, s)?,
            })
        } else {
            None
        };
        let mut up = Vec::with_capacity(n);
        let rev = |v: &Vec<usize>, i: usize| v[n - 1 - i];
        let mut out_c = ch[n - 1];
        for i in 0..n {
            let prev_c = out_c;
            out_c = rev(ch, i);
            let in_c = rev(ch, (i + 1).min(n - 1));
            let layers = rev(&cfg.layers_per_block, i) + 1;
            let vbu = vb.pp("up_blocks").pp(i);
            let resnets = (0..layers)
                .map(|j| {
                    let skip_c = if j == layers - 1 { in_c } else { out_c };
                    let res_in = if j == 0 { prev_c } else { out_c };
                    Resnet::new(vbu.pp("resnets").pp(j), res_in + skip_c, out_c, temb, cfg, 1.0)
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = match cfg.up_blocks[i] {
                BlockKind::Plain => Vec::new(),
                BlockKind::CrossAttn => (0..layers)
                    .map(|j| {
                        Transformer2D::new(
                            vbu.pp("attentions").pp(j),
                            out_c,
                            rev(&cfg.attention_heads, i),
                            rev(&cfg.transformer_layers_per_block, i),
                            cfg,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            let upsample =
                if i + 1 < n { Some(conv(vbu.pp("upsamplers.0.conv"), out_c, out_c, 3, 1, 1)?) } else { None };
            up.push(UpBlock { resnets, attentions, upsample });
        }
        Ok(UNet {
            cfg: cfg.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out: group_norm(cfg.norm_num_groups, ch[0], cfg.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// diffusers' `forward(sample, timestep, encoder_hidden_states,
    /// added_cond_kwargs).sample`: the same timestep for every batch row.
    /// `added` is required by SDXL (`text_time`) UNets and ignored by others.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, _, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        let device = sample.device();
        let context = encoder_hidden_states.to_dtype(dtype)?;
        let x = if cfg.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };

        let c0 = cfg.block_out_channels[0];
        let t = timestep_embedding(&vec![timestep as f32; b], c0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let t = Tensor::from_vec(t, (b, c0), device)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t)?;
        if let (Some(a), Some(add_embedding)) = (&cfg.addition, &self.add_embedding) {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this UNet has `addition_embed_type` \"text_time\" (SDXL): it needs text_embeds and time_ids".into(),
                )
            })?;
            let ids = added.time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if ids.len() % b != 0 {
                candle_core::bail!("UNet: time_ids has {} values for a batch of {b}", ids.len());
            }
            let time = timestep_embedding(&ids, a.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift);
            let time = Tensor::from_vec(time, (b, ids.len() / b * a.time_embed_dim), device)?;
            let text = added.text_embeds.to_dtype(DType::F32)?;
            let add = Tensor::cat(&[&text, &time], 1)?.to_dtype(dtype)?;
            emb = (emb + add_embedding.forward(&add)?)?;
        }
        let temb = candle_nn::ops::silu(&emb)?;

        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            x = block.forward(&x, &temb, &context, &mut skips)?;
        }
        if let Some(mid) = &self.mid {
            x = mid.resnet_0.forward(&x, &temb)?;
            x = mid.attention.forward(&x, &context)?;
            x = mid.resnet_1.forward(&x, &temb)?;
        }
        for block in &self.up {
            let k = block.resnets.len();
            if skips.len() < k {
                candle_core::bail!("UNet: too few skip connections");
            }
            let mine = skips.split_off(skips.len() - k);
            // Upsample to the next skip's size: twice the size, or what the
            // down path's rounding gave for sides that are not multiples.
            let size = match skips.last() {
                Some(s) if block.upsample.is_some() => {
                    let (_, _, h, w) = s.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            x = block.forward(&x, mine, &temb, &context, size)?;
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use serde_json::json;

    fn fixture_dir(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/image/unet").join(name)
    }

    fn tensor(v: &Value) -> Tensor {
        let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let data: Vec<f32> = v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Relative tolerance: max |Mora - diffusers| over max |diffusers|.
    const TOLERANCE: f32 = 2e-5;

    /// Runs a fixture in float32 and checks it against diffusers.
    fn parity(name: &str) {
        parity_in(name, DType::F32, TOLERANCE);
    }

    /// Runs a fixture with weights and inputs in `dtype`; checks that the
    /// max abs difference is at most `tolerance` of the max |output|.
    fn parity_in(name: &str, dtype: DType, tolerance: f32) {
        let dir = fixture_dir(name);
        let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = dir.join("diffusion_pytorch_model.safetensors");
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu).unwrap() };
        let unet = UNet::new(vb, &cfg).unwrap();
        let reference: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let input = |v: &Value| tensor(v).to_dtype(dtype).unwrap();
        let sample = input(&reference["sample"]);
        let ehs = input(&reference["encoder_hidden_states"]);
        let added = reference.get("text_embeds").map(|te| AddedConditions {
            text_embeds: input(te),
            time_ids: input(&reference["time_ids"]),
        });
        assert_eq!(added.is_some(), cfg.addition.is_some());
        for case in reference["cases"].as_array().unwrap() {
            let t = case["timestep"].as_f64().unwrap();
            let want = tensor(&case["output"]);
            let got = unet.forward(&sample, t, &ehs, added.as_ref()).unwrap();
            assert_eq!(got.dtype(), dtype);
            let got = got.to_dtype(DType::F32).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let max = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{name} {dtype:?} t={t}: max abs diff {diff:.3e}, max |out| {max:.3}");
            assert!(diff <= tolerance * max, "{name} {dtype:?} t={t}: max abs diff {diff} over {tolerance} x {max}");
        }
    }

    #[test]
    fn sd15_matches_diffusers() {
        parity("sd15");
    }

    #[test]
    fn sd21_matches_diffusers() {
        parity("sd21");
    }

    #[test]
    fn sdxl_matches_diffusers() {
        parity("sdxl");
    }

    #[test]
    fn sdxl_refiner_matches_diffusers() {
        parity("sdxl_refiner");
    }

    /// Half precision runs (the GPU's dtype) and stays within float16
    /// rounding of diffusers' float32 outputs.
    #[test]
    fn float16_runs_close_to_diffusers() {
        parity_in("sd21", DType::F16, 1e-2);
        parity_in("sdxl", DType::F16, 1e-2);
    }

    #[test]
    fn sdxl_needs_added_conditions() {
        let dir = fixture_dir("sdxl");
        let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu)
                .unwrap()
        };
        let unet = UNet::new(vb, &cfg).unwrap();
        let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let ehs = Tensor::zeros((1, 3, 32), DType::F32, &Device::Cpu).unwrap();
        let err = unet.forward(&x, 10.0, &ehs, None).unwrap_err().to_string();
        assert!(err.contains("text_time"), "{err}");
    }

    fn parse(v: Value) -> CResult<UNetConfig> {
        UNetConfig::from_json(v.as_object().unwrap(), "unet/config.json")
    }

    /// runwayml/stable-diffusion-v1-5, unet/config.json.
    fn sd15() -> Value {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.6.0",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        })
    }

    /// stabilityai/stable-diffusion-2-1, unet/config.json.
    fn sd21() -> Value {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.10.0.dev0",
            "act_fn": "silu",
            "attention_head_dim": [5, 10, 20, 20],
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false,
            "cross_attention_dim": 1024,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "dual_cross_attention": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_class_embeds": null,
            "only_cross_attention": false,
            "out_channels": 4,
            "sample_size": 96,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "upcast_attention": true,
            "use_linear_projection": true
        })
    }

    /// stabilityai/stable-diffusion-xl-base-1.0, unet/config.json.
    fn sdxl() -> Value {
        // As text: the macro's recursion limit stops at this many keys.
        serde_json::from_str(
            r#"{
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.19.0.dev0",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": false,
            "class_embed_type": null,
            "class_embeddings_concat": false,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": 2048,
            "cross_attention_norm": null,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "dual_cross_attention": false,
            "encoder_hid_dim": null,
            "encoder_hid_dim_type": null,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_only_cross_attention": null,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_attention_heads": null,
            "num_class_embeds": null,
            "only_cross_attention": false,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": false,
            "resnet_time_scale_shift": "default",
            "sample_size": 128,
            "time_cond_proj_dim": null,
            "time_embedding_act_fn": null,
            "time_embedding_dim": null,
            "time_embedding_type": "positional",
            "timestep_post_act": null,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": null,
            "use_linear_projection": true
        }"#,
        )
        .unwrap()
    }

    #[test]
    fn hub_configs_parse_into_their_shapes() {
        use BlockKind::{CrossAttn as X, Plain as P};
        let c = parse(sd15()).unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.down_blocks, vec![X, X, X, P]);
        assert_eq!(c.up_blocks, vec![P, X, X, X]);
        assert_eq!(c.attention_heads, vec![8; 4]);
        assert_eq!(c.transformer_layers_per_block, vec![1; 4]);
        assert_eq!((c.cross_attention_dim, c.time_embed_dim, c.addition), (768, 1280, None));
        assert!(!c.use_linear_projection && !c.upcast_attention && c.mid_block);
        assert_eq!(c.default_image_size(), 512);

        let c = parse(sd21()).unwrap();
        assert_eq!(c.attention_heads, vec![5, 10, 20, 20]);
        // 64-wide heads everywhere.
        assert!(c.attention_heads.iter().zip(&c.block_out_channels).all(|(h, ch)| ch / h == 64));
        assert!(c.use_linear_projection && c.upcast_attention);
        assert_eq!((c.cross_attention_dim, c.default_image_size()), (1024, 768));

        let c = parse(sdxl()).unwrap();
        assert_eq!(c.down_blocks, vec![P, X, X]);
        assert_eq!(c.up_blocks, vec![X, X, P]);
        assert_eq!(c.transformer_layers_per_block, vec![1, 2, 10]);
        assert_eq!(c.attention_heads, vec![5, 10, 20]);
        assert_eq!(c.addition, Some(AdditionConfig { time_embed_dim: 256, projection_input_dim: 2816 }));
        assert!(c.use_linear_projection && !c.upcast_attention);
        assert_eq!((c.cross_attention_dim, c.default_image_size()), (2048, 1024));

        // The refiner's shape.
        let mut refiner = sdxl();
        refiner["block_out_channels"] = json!([384, 768, 1536, 1536]);
        refiner["attention_head_dim"] = json!([6, 12, 24, 24]);
        refiner["down_block_types"] = json!(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]);
        refiner["up_block_types"] = json!(["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
        refiner["transformer_layers_per_block"] = json!(4);
        refiner["cross_attention_dim"] = json!(1280);
        refiner["projection_class_embeddings_input_dim"] = json!(2560);
        let c = parse(refiner).unwrap();
        assert_eq!(c.transformer_layers_per_block, vec![4; 4]);
        assert_eq!(c.addition.unwrap().projection_input_dim, 2560);

        // The fixtures' configs, in the form diffusers 0.42 writes.
        for name in ["sd15", "sd21", "sdxl", "sdxl_refiner"] {
            UNetConfig::from_file(&fixture_dir(name).join("config.json")).unwrap();
        }
    }

    #[test]
    fn refused_keys_name_the_file_and_the_key() {
        let cases: Vec<(&str, Value)> = vec![
            ("mid_block_type", json!("UNetMidBlock2DSimpleCrossAttn")),
            ("class_embed_type", json!("timestep")),
            ("num_class_embeds", json!(10)),
            ("class_embeddings_concat", json!(true)),
            ("encoder_hid_dim", json!(768)),
            ("encoder_hid_dim_type", json!("text_proj")),
            ("time_embedding_type", json!("fourier")),
            ("time_embedding_act_fn", json!("silu")),
            ("resnet_time_scale_shift", json!("scale_shift")),
            ("conv_in_kernel", json!(7)),
            ("conv_out_kernel", json!(1)),
            ("only_cross_attention", json!(true)),
            ("only_cross_attention", json!([false, true, false, false])),
            ("dual_cross_attention", json!(true)),
            ("addition_embed_type", json!("text")),
            ("cross_attention_norm", json!("group_norm")),
            ("attention_type", json!("gated")),
            ("reverse_transformer_layers_per_block", json!([[1, 1], [1, 1]])),
            ("time_cond_proj_dim", json!(256)),
            ("timestep_post_act", json!("silu")),
            ("mid_block_only_cross_attention", json!(true)),
            ("act_fn", json!("gelu")),
            ("num_attention_heads", json!(8)),
            ("norm_num_groups", Value::Null),
            ("cross_attention_dim", json!([768, 768, 1024, 1024])),
            ("down_block_types", json!(["CrossAttnDownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])),
            ("up_block_types", json!(["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "KUpBlock2D"])),
            ("transformer_layers_per_block", json!([[1, 1], 2, 3, 4])),
            ("layers_per_block", json!([2, 2])),
            ("some_new_key", json!(1)),
        ];
        for (key, value) in cases {
            let mut c = sd15();
            c[key] = value.clone();
            let err = parse(c).expect_err(&format!("{key} = {value} should be refused")).to_string();
            assert!(err.starts_with("unet/config.json: "), "{err}");
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        // Values that leave the network as it is.
        for (key, value) in [
            ("mid_block_type", json!("UNetMidBlock2DCrossAttn")),
            ("only_cross_attention", json!([false, false, false, false])),
            ("addition_embed_type", Value::Null),
            ("dropout", json!(0.1)),
            ("act_fn", json!("swish")),
            ("cross_attention_dim", json!([768, 768, 768, 768])),
            ("layers_per_block", json!([2, 2, 2, 2])),
            ("_use_default_values", json!(["dropout"])),
        ] {
            let mut c = sd15();
            c[key] = value;
            parse(c).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        // No mid block.
        let mut c = sd15();
        c["mid_block_type"] = Value::Null;
        assert!(!parse(c).unwrap().mid_block);
        // SDXL without its added-conditioning widths.
        let mut c = sdxl();
        c.as_object_mut().unwrap().remove("addition_time_embed_dim");
        assert!(parse(c).unwrap_err().to_string().contains("`addition_time_embed_dim`"));
    }

    #[test]
    fn timestep_embedding_matches_the_formula() {
        // flip: cos first; half = 2, freqs 1 and 1e-4^(1/2) = 0.01.
        let e = timestep_embedding(&[3.0], 4, true, 0.0);
        let want = [3f64.cos(), 0.03f64.cos(), 3f64.sin(), 0.03f64.sin()];
        for (a, b) in e.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{e:?}");
        }
    }
}
