//! The autoencoder of Stable Diffusion (diffusers' `AutoencoderKL`): the
//! decoder turns latents into pixels, the encoder pixels into the diagonal
//! Gaussian of their latents.
//!
//! Configured from `vae/config.json` and loaded from
//! `vae/diffusion_pytorch_model.safetensors` with the tensor names diffusers
//! saves (the attention's `to_q`/`to_k`/`to_v`/`to_out.0`, or the
//! `query`/`key`/`value`/`proj_attn` of checkpoints written before diffusers
//! 0.14). candle-transformers' `stable_diffusion::vae` is not used: it has no
//! `in_channels`/`out_channels`/`mid_block_add_attention`, does not clamp the
//! log-variance as diffusers does, and keeps the mean and std private.

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};

use super::attention;
use super::conv::{conv2d, Conv2d};
use super::norm::{group_norm, GroupNorm};
use serde_json::{Map, Value};

use super::DIFFUSERS_NEUTRAL;
use crate::lm_config::{read_json, ConfigError, Reader};

/// The epsilon of every GroupNorm of diffusers' VAE encoder and decoder.
const NORM_EPS: f64 = 1e-6;

/// The most attention scores (per image) computed at once in the mid blocks.
const ATTENTION_CHUNK: usize = 1 << 24;

/// What `vae/config.json` says about the network and about the latent space.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Latents are `z * scaling_factor` in the denoising space: the pipeline
    /// divides by it before [`Vae::decode`] (SD 1.x/2.x 0.18215, SDXL 0.13025).
    pub scaling_factor: f64,
    /// When set, the pipeline decodes `z / scaling_factor + shift_factor` and
    /// encodes `(z - shift_factor) * scaling_factor` (SD3- and Flux-style VAEs);
    /// the network itself does not use it.
    pub shift_factor: Option<f64>,
    pub latent_channels: usize,
    /// diffusers runs this VAE in float32 even when the pipeline is float16.
    pub force_upcast: bool,
    /// How much smaller the latents are than the image: 2^(blocks - 1).
    pub downscale: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    /// A self-attention block between the two ResNets of each mid block.
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> std::result::Result<VaeConfig, ConfigError> {
        let raw = read_json(path)?;
        Self::from_json(&raw, &path.display().to_string())
    }

    /// Reads one config object; `file` names it in errors. Absent keys take
    /// the defaults of diffusers' `AutoencoderKL.__init__`, as diffusers does.
    pub fn from_json(raw: &Map<String, Value>, file: &str) -> std::result::Result<VaeConfig, ConfigError> {
        let r = Reader::new(raw, file, "");
        let class = r.str_or("_class_name", "AutoencoderKL")?;
        if class != "AutoencoderKL" {
            return Err(r.err(format!("`_class_name` is `{class}`; Mora's VAE is diffusers' AutoencoderKL")));
        }
        let block_out_channels = usize_list(&r, "block_out_channels")?.unwrap_or_else(|| vec![64]);
        if block_out_channels.is_empty() || block_out_channels.contains(&0) {
            return Err(r.err("`block_out_channels` must be a non-empty list of positive numbers".into()));
        }
        let blocks = block_out_channels.len();
        for (key, wanted) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            let types = str_list(&r, key)?.unwrap_or_else(|| vec![wanted.to_string()]);
            if let Some(other) = types.iter().find(|t| *t != wanted) {
                return Err(r.err(format!("`{key}` has `{other}`; Mora's VAE runs only {wanted}")));
            }
            if types.len() != blocks {
                return Err(r.err(format!(
                    "`{key}` has {} blocks but `block_out_channels` {blocks}; diffusers needs one per channel count",
                    types.len()
                )));
            }
        }
        let act = r.str_or("act_fn", "silu")?;
        if act != "silu" && act != "swish" {
            return Err(r.err(format!("`act_fn` is `{act}`; Mora's VAE runs silu (swish)")));
        }
        let norm_num_groups = r.opt_usize("norm_num_groups")?.unwrap_or(32);
        if norm_num_groups == 0 || block_out_channels.iter().any(|c| c % norm_num_groups != 0) {
            return Err(r.err(format!(
                "`norm_num_groups` ({norm_num_groups}) must divide every entry of `block_out_channels` ({block_out_channels:?})"
            )));
        }
        let shift_factor = r.opt_f64("shift_factor")?;
        for key in ["latents_mean", "latents_std"] {
            if r.present(key).is_some() {
                return Err(r.err(format!(
                    "`{key}` is set: per-channel latent statistics are not supported; Mora's pipelines scale latents by `scaling_factor` only"
                )));
            }
        }
        // Tiling only; the network runs at any size.
        r.take("sample_size");
        let cfg = VaeConfig {
            scaling_factor: r.opt_f64("scaling_factor")?.unwrap_or(0.18215),
            shift_factor,
            latent_channels: r.opt_usize("latent_channels")?.unwrap_or(4),
            force_upcast: r.bool_or("force_upcast", true)?,
            downscale: 1 << (blocks - 1),
            in_channels: r.opt_usize("in_channels")?.unwrap_or(3),
            out_channels: r.opt_usize("out_channels")?.unwrap_or(3),
            layers_per_block: r.opt_usize("layers_per_block")?.unwrap_or(1),
            norm_num_groups,
            use_quant_conv: r.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: r.bool_or("use_post_quant_conv", true)?,
            mid_block_add_attention: r.bool_or("mid_block_add_attention", true)?,
            block_out_channels,
        };
        for (key, v) in [("in_channels", cfg.in_channels), ("out_channels", cfg.out_channels), ("latent_channels", cfg.latent_channels)] {
            if v == 0 {
                return Err(r.err(format!("`{key}` must be at least 1")));
            }
        }
        if cfg.scaling_factor == 0.0 {
            return Err(r.err("`scaling_factor` must not be 0".into()));
        }
        r.refuse_unread(DIFFUSERS_NEUTRAL, "AutoencoderKL VAEs")?;
        Ok(cfg)
    }
}

fn usize_list(r: &Reader, key: &str) -> std::result::Result<Option<Vec<usize>>, ConfigError> {
    let Some(v) = r.present(key) else { return Ok(None) };
    let bad = || r.err(format!("`{key}` must be a list of whole numbers, not {v}"));
    let a = v.as_array().ok_or_else(bad)?;
    a.iter().map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(bad)).collect::<std::result::Result<_, _>>().map(Some)
}

fn str_list(r: &Reader, key: &str) -> std::result::Result<Option<Vec<String>>, ConfigError> {
    let Some(v) = r.present(key) else { return Ok(None) };
    let bad = || r.err(format!("`{key}` must be a list of strings, not {v}"));
    let a = v.as_array().ok_or_else(bad)?;
    a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(bad)).collect::<std::result::Result<_, _>>().map(Some)
}

fn conv(vb: VarBuilder, cin: usize, cout: usize, k: usize, padding: usize, stride: usize) -> Result<Conv2d> {
    conv2d(cin, cout, k, Conv2dConfig { padding, stride, ..Default::default() }, vb)
}

/// diffusers' `ResnetBlock2D` without a time embedding: two GroupNorm, SiLU,
/// 3x3 conv steps and a 1x1 shortcut when the channel count changes.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: group_norm(groups, cin, NORM_EPS, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: group_norm(groups, cout, NORM_EPS, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout { Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 0, 1)?) } else { None },
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?.apply(&self.conv1)?;
        let h = self.norm2.forward_silu(&h)?.apply(&self.conv2)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// A q/k/v/out projection: a Linear, or the 1x1 conv weight of very old
/// checkpoints.
fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?,
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

/// The single-head self-attention over pixels of the mid blocks (diffusers'
/// `Attention` with `heads = channels / attention_head_dim = 1`,
/// `residual_connection=True`, `rescale_output_factor=1`).
struct AttentionBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    scale: f64,
    /// At most this many scores at once (ATTENTION_CHUNK).
    chunk: usize,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let (q, k, v, o) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(AttentionBlock {
            norm: group_norm(groups, channels, NORM_EPS, vb.pp("group_norm"))?,
            q: projection(vb.pp(q), channels)?,
            k: projection(vb.pp(k), channels)?,
            v: projection(vb.pp(v), channels)?,
            out: projection(vb.pp(o), channels)?,
            scale: 1.0 / (channels as f64).sqrt(),
            chunk: ATTENTION_CHUNK,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, attention::ours(&[x]))
    }
}

impl AttentionBlock {
    /// With Mora's attention kernel when `own` (CPU, f32), else with candle's
    /// ops by chunks of queries.
    fn forward_with(&self, x: &Tensor, own: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.q.forward(&hs)?;
        let k = self.k.forward(&hs)?;
        let v = self.v.forward(&hs)?;
        if own {
            // Mora's kernel holds a block of scores at a time already.
            let o = self.out.forward(&attention::attention(&q, &k, &v, 1, self.scale, DType::F32)?)?;
            return o.transpose(1, 2)?.reshape((b, c, h, w))? + x;
        }
        let kt = k.t()?;
        // The pixels attend to each other: a 1024x1024 SDXL image has 16384
        // latent pixels, a 1 GiB score matrix. Queries go by chunks of at
        // most `chunk` scores (softmax is per query, so this changes
        // nothing but the peak memory).
        let n = h * w;
        let rows = (self.chunk / n).clamp(1, n);
        let mut parts = Vec::with_capacity(n.div_ceil(rows));
        for start in (0..n).step_by(rows) {
            let qc = q.narrow(1, start, rows.min(n - start))?;
            let scores = (qc.matmul(&kt)? * self.scale)?;
            // diffusers' VAE attention upcasts the softmax (`upcast_softmax=True`).
            let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
            parts.push(probs.matmul(&v)?);
        }
        let o = self.out.forward(&Tensor::cat(&parts, 1)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

/// diffusers' `UNetMidBlock2D` without a time embedding: ResNet, attention
/// (unless `mid_block_add_attention` is false), ResNet.
struct MidBlock {
    first: ResnetBlock,
    attention: Option<AttentionBlock>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(MidBlock {
            first: ResnetBlock::new(vb.pp("resnets.0"), channels, channels, groups)?,
            attention: if attention { Some(AttentionBlock::new(vb.pp("attentions.0"), channels, groups)?) } else { None },
            second: ResnetBlock::new(vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.first.forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.second.forward(&x)
    }
}

/// `DownEncoderBlock2D`: ResNets, then (but for the last block) a stride-2
/// 3x3 conv after padding the bottom and right edges by one (diffusers'
/// `Downsample2D` with `padding=0`).
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl Module for DownBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.downsample {
            Some(d) => x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?.apply(d),
            None => Ok(x),
        }
    }
}

/// `UpDecoderBlock2D`: ResNets, then (but for the last block) nearest
/// upsampling by 2 and a 3x3 conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl Module for UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.upsample {
            Some(u) => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)?.apply(u)
            }
            None => Ok(x),
        }
    }
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock::new(vb.pp(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<Vec<_>>>()?;
            let downsample =
                if i + 1 < ch.len() { Some(conv(vb.pp("downsamplers.0.conv"), cout, cout, 3, 0, 2)?) } else { None };
            down.push(DownBlock { resnets, downsample });
            cin = cout;
        }
        let last = *ch.last().expect("block_out_channels is not empty");
        Ok(Encoder {
            conv_in: conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            norm_out: group_norm(g, last, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for d in &self.down {
            x = d.forward(&x)?;
        }
        let x = self.mid.forward(&x)?;
        self.norm_out.forward_silu(&x)?.apply(&self.conv_out)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up = Vec::with_capacity(rev.len());
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock::new(vb.pp(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<Vec<_>>>()?;
            let upsample =
                if i + 1 < rev.len() { Some(conv(vb.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?) } else { None };
            up.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        let first = cfg.block_out_channels[0];
        Ok(Decoder {
            conv_in: conv(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?,
            mid: MidBlock::new(vb.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?,
            up,
            norm_out: group_norm(g, first, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid.forward(&self.conv_in.forward(z)?)?;
        for u in &self.up {
            x = u.forward(&x)?;
        }
        self.norm_out.forward_silu(&x)?.apply(&self.conv_out)
    }
}

/// diffusers' `AutoencoderKL` (no tiling, no slicing).
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl Vae {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Vae> {
        let l = cfg.latent_channels;
        Ok(Vae {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: if cfg.use_quant_conv { Some(conv(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 0, 1)?) } else { None },
            post_quant_conv: if cfg.use_post_quant_conv { Some(conv(vb.pp("post_quant_conv"), l, l, 1, 0, 1)?) } else { None },
        })
    }

    /// diffusers `vae.decode(z).sample` (z NOT scaled here; the pipeline
    /// divides by `scaling_factor`). [batch, latent_channels, h, w] to
    /// [batch, out_channels, h * downscale, w * downscale], roughly in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// diffusers `vae.encode(x).latent_dist`: (mean, std) of the diagonal
    /// Gaussian; x in [-1, 1], [batch, in_channels, h, w].
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.encoder.forward(x)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&h)?,
            None => h,
        };
        gaussian(&moments)
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the first half of the channels
/// is the mean, the second the log-variance, clamped to [-30, 20].
fn gaussian(moments: &Tensor) -> Result<(Tensor, Tensor)> {
    let l = moments.dim(1)? / 2;
    let mean = moments.narrow(1, 0, l)?;
    let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
    let std = (logvar * 0.5)?.exp()?;
    Ok((mean, std))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testing::{assert_close, fixture_dir, ref_tensor, reference, TOL};
    use candle_core::{DType, Device};
    use serde_json::json;

    fn parse(v: Value) -> std::result::Result<VaeConfig, ConfigError> {
        VaeConfig::from_json(v.as_object().unwrap(), "vae/config.json")
    }

    fn blocks(n: usize, kind: &str) -> Value {
        Value::Array(vec![json!(kind); n])
    }

    /// runwayml/stable-diffusion-v1-5 vae/config.json.
    fn sd15() -> Value {
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.6.0",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": blocks(4, "DownEncoderBlock2D"),
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 512,
            "up_block_types": blocks(4, "UpDecoderBlock2D")
        })
    }

    /// stabilityai/stable-diffusion-2-1 vae/config.json.
    fn sd21() -> Value {
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.8.0",
            "_name_or_path": "hf-models/stable-diffusion-v2-768x768/vae",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": blocks(4, "DownEncoderBlock2D"),
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 768,
            "up_block_types": blocks(4, "UpDecoderBlock2D")
        })
    }

    /// stabilityai/stable-diffusion-xl-base-1.0 vae/config.json.
    fn sdxl() -> Value {
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.20.0.dev0",
            "_name_or_path": "../sdxl-vae/",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": blocks(4, "DownEncoderBlock2D"),
            "force_upcast": true,
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 1024,
            "scaling_factor": 0.13025,
            "up_block_types": blocks(4, "UpDecoderBlock2D")
        })
    }

    fn with(mut base: Value, key: &str, v: Value) -> Value {
        base.as_object_mut().unwrap().insert(key.into(), v);
        base
    }

    #[test]
    fn official_configs_parse() {
        let a = parse(sd15()).unwrap();
        assert_eq!((a.scaling_factor, a.downscale, a.latent_channels, a.force_upcast), (0.18215, 8, 4, true));
        assert_eq!((a.layers_per_block, a.norm_num_groups), (2, 32));
        assert!(a.use_quant_conv && a.use_post_quant_conv && a.mid_block_add_attention);
        let b = parse(sd21()).unwrap();
        assert_eq!(b.block_out_channels, vec![128, 256, 512, 512]);
        let c = parse(sdxl()).unwrap();
        assert_eq!((c.scaling_factor, c.shift_factor), (0.13025, None));
        // diffusers' full form of the same file, as save_pretrained writes it now.
        let full = json!({"force_upcast": true, "latents_mean": null, "latents_std": null, "mid_block_add_attention": true,
            "shift_factor": null, "use_post_quant_conv": true, "use_quant_conv": true, "_diffusers_version": "0.42.1"});
        let mut v = sdxl();
        v.as_object_mut().unwrap().extend(full.as_object().unwrap().clone());
        assert_eq!(parse(v).unwrap(), c);
        let f = parse(with(sdxl(), "shift_factor", json!(0.0609))).unwrap();
        assert_eq!(f.shift_factor, Some(0.0609));
    }

    #[test]
    fn refused_keys_name_file_and_key() {
        for (key, value) in [
            ("latents_mean", json!([0.1, 0.2, 0.3, 0.4])),
            ("latents_std", json!([1.0, 1.0, 1.0, 1.0])),
            ("act_fn", json!("gelu")),
            ("down_block_types", blocks(4, "AttnDownEncoderBlock2D")),
            ("up_block_types", blocks(3, "UpDecoderBlock2D")),
            ("_class_name", json!("AutoencoderTiny")),
            ("norm_type", json!("spatial")),
            ("norm_num_groups", json!(48)),
        ] {
            let e = parse(with(sd15(), key, value)).unwrap_err().to_string();
            assert!(e.starts_with("vae/config.json: ") && e.contains(&format!("`{key}`")), "{key}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn logvar_is_clamped_like_diffusers() {
        let m = Tensor::new(&[[[[0.5f32]], [[1.5]], [[-40.0]], [[30.0]]]], &Device::Cpu).unwrap();
        let (mean, std) = gaussian(&m).unwrap();
        assert_eq!(mean.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.5, 1.5]);
        let s = std.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((s[0] - (-15f32).exp()).abs() < 1e-12 && (s[1] - 10f32.exp()).abs() < 1e-1, "{s:?}");
    }

    #[test]
    fn builds_without_quant_convs_or_mid_attention() {
        let small = with(with(sd15(), "block_out_channels", json!([8, 16])), "norm_num_groups", json!(4));
        let small = with(with(small, "down_block_types", blocks(2, "DownEncoderBlock2D")), "up_block_types", blocks(2, "UpDecoderBlock2D"));
        let mut cfg = parse(small).unwrap();
        cfg.use_quant_conv = false;
        cfg.use_post_quant_conv = false;
        cfg.mid_block_add_attention = false;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let vae = Vae::new(vb, &cfg).unwrap();
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(!names.iter().any(|n| n.contains("quant_conv") || n.contains("attentions")), "{names:?}");
        let z = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vae.decode(&z).unwrap().dims(), &[1, 3, 8, 8]);
        let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vae.encode(&x).unwrap().0.dims(), &[1, 4, 4, 4]);
    }


    #[test]
    fn matches_diffusers_on_the_fixture_pipelines() {
        for name in ["sd15", "sd21", "sdxl"] {
            let dir = fixture_dir(name).join("vae");
            let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
            let weights = dir.join("diffusion_pytorch_model.safetensors");
            // SAFETY: the fixture file is not modified while mapped.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }.unwrap();
            let vae = Vae::new(vb, &cfg).unwrap();
            let r = reference(name);
            let r = &r["vae"];
            let decoded = vae.decode(&ref_tensor(&r["latents"])).unwrap();
            assert_close(&format!("{name} decode"), &decoded, &ref_tensor(&r["decode"]), TOL);
            let (mean, std) = vae.encode(&ref_tensor(&r["image"])).unwrap();
            assert_close(&format!("{name} encode mean"), &mean, &ref_tensor(&r["encode_mean"]), TOL);
            assert_close(&format!("{name} encode std"), &std, &ref_tensor(&r["encode_std"]), TOL);
        }
        let xl = VaeConfig::from_file(&fixture_dir("sdxl").join("vae/config.json")).unwrap();
        assert_eq!((xl.scaling_factor, xl.force_upcast, xl.downscale), (0.13025, true, 2));
    }

    #[test]
    fn runs_in_half_precision() {
        let dir = fixture_dir("sd15").join("vae");
        let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = dir.join("diffusion_pytorch_model.safetensors");
        // SAFETY: the fixture file is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F16, &Device::Cpu) }.unwrap();
        let vae = Vae::new(vb, &cfg).unwrap();
        let r = &reference("sd15")["vae"];
        let z = ref_tensor(&r["latents"]).to_dtype(DType::F16).unwrap();
        let decoded = vae.decode(&z).unwrap();
        assert_eq!(decoded.dtype(), DType::F16);
        let decoded = decoded.to_dtype(DType::F32).unwrap();
        assert_close("sd15 decode, float16", &decoded, &ref_tensor(&r["decode"]), 1e-2);
    }

    #[test]
    fn attention_by_chunks_equals_attention_at_once() {
        let dir = fixture_dir("sd15").join("vae");
        let weights = dir.join("diffusion_pytorch_model.safetensors");
        // SAFETY: the fixture file is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }.unwrap();
        let mut attn = AttentionBlock::new(vb.pp("decoder.mid_block.attentions.0"), 32, 8).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 32, 5, 7), &Device::Cpu).unwrap();
        let whole = attn.forward_with(&x, false).unwrap();
        // 35 pixels by 3 queries at a time: 11 full chunks and one of 2.
        attn.chunk = 3 * 35;
        let chunked = attn.forward_with(&x, false).unwrap();
        let diff = (&whole - chunked).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        // Mora's kernel, which holds a block of scores at a time itself.
        assert_close("Mora's attention kernel", &attn.forward_with(&x, true).unwrap(), &whole, 1e-5);
    }
}
