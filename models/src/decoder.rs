//! Decoder-only language models on candle-nn, built from a
//! [`DecoderConfig`]: the llama family (llama, mistral, qwen2, qwen3, phi3,
//! gemma2: RMSNorm, rotary positions, grouped-query attention, gated
//! feed-forward, each with its own variations) and GPT-2 (learned positions,
//! LayerNorm, Conv1D weights).
//!
//! Mora owns these networks instead of using candle-transformers' so that
//! what the config says is what runs: every rope type of [`RopeScaling`]
//! (candle's llama knows only llama3 scaling, its qwen2 none), an explicit
//! `head_dim`, per-layer sliding windows as transformers applies them, and
//! GPT-2, which candle-transformers does not have. The arithmetic follows
//! transformers' modeling code (attention scores and softmax in f32, cos/sin
//! from f32 frequencies times the rope's attention factor).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, RmsNorm, VarBuilder};

use crate::lm_config::{Activation, DecoderConfig, Family, Rope, RopeScaling};

/// A decoder with its key/value cache: feed it the prompt, then one token at
/// a time.
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Embedding,
    /// GPT-2's learned positions.
    positions: Option<Embedding>,
    layers: Vec<Layer>,
    final_norm: Norm,
    lm_head: Linear,
    /// Rotary frequencies and attention factor (llama family).
    rope: Option<(Vec<f32>, f32)>,
    cache: Vec<Option<(Tensor, Tensor)>>,
    device: Device,
}

enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }
}

enum Attention {
    /// Separate q, k, v, o projections.
    Split { q: Linear, k: Linear, v: Linear, o: Linear },
    /// One projection for q, k and v together (GPT-2's Conv1D, phi3's
    /// `qkv_proj`), one for the output.
    Fused { qkv: Linear, o: Linear },
}

enum Mlp {
    /// down(act(gate(x)) * up(x))
    Gated { gate: Linear, up: Linear, down: Linear },
    /// The same with gate and up in one weight, gate first (phi3).
    FusedGated { gate_up: Linear, down: Linear },
    /// proj(act(fc(x)))
    Plain { fc: Linear, proj: Linear },
}

struct Layer {
    norm_1: Norm,
    attn: Attention,
    /// Gemma 2: a norm of the attention's output, before the residual.
    post_attn: Option<Norm>,
    norm_2: Norm,
    mlp: Mlp,
    /// Gemma 2: a norm of the feed-forward's output, before the residual.
    post_mlp: Option<Norm>,
    /// Qwen3: RMSNorms of each head's queries and keys.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    window: Option<usize>,
    /// What attention scores are multiplied by.
    scale: f64,
}

fn linear(vb: &VarBuilder, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb.pp(name))
}

/// GPT-2's Conv1D: the weight is stored `[in, out]`, transposed from a Linear's.
fn conv1d(vb: &VarBuilder, name: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let vb = vb.pp(name);
    let w = vb.get((in_dim, out_dim), "weight")?;
    let b = vb.get(out_dim, "bias")?;
    Ok(Linear::new(w.t()?, Some(b)))
}

/// Rotary inverse frequencies and the attention factor that scales cos and
/// sin, as transformers' `ROPE_INIT_FUNCTIONS` compute them (in f32).
pub fn rope_frequencies(rope: &Rope, head_dim: usize) -> (Vec<f32>, f32) {
    let dim = head_dim;
    let base = rope.theta as f32;
    let default: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect();
    match &rope.scaling {
        RopeScaling::Default => (default, 1.0),
        RopeScaling::Linear { factor } => (default.iter().map(|f| f / *factor as f32).collect(), 1.0),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
            let old = *original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            let freqs = default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (freqs, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => get_mscale(*factor, *m) / get_mscale(*factor, *a),
                _ => get_mscale(*factor, 1.0),
            });
            let base = rope.theta;
            let orig = *original_max_position_embeddings as f64;
            let correction_dim =
                |rotations: f64| (dim as f64 * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
            if low == high {
                high += 0.001;
            }
            let freqs = default
                .iter()
                .enumerate()
                .map(|(i, &extrapolation)| {
                    let interpolation = extrapolation / *factor as f32;
                    let ramp = (((i as f64 - low) / (high - low)).clamp(0.0, 1.0)) as f32;
                    let extrapolation_factor = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                })
                .collect();
            (freqs, attention as f32)
        }
    }
}

/// Rotary embedding of the first `2 * cos.dim(1)` dimensions of each head
/// (all of them, unless the rope is partial); the rest pass through.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (hd, rot) = (x.dim(D::Minus1)?, 2 * cos.dim(1)?);
    if rot == hd {
        return candle_nn::rotary_emb::rope(x, cos, sin);
    }
    let turned = candle_nn::rotary_emb::rope(&x.narrow(D::Minus1, 0, rot)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[&turned, &x.narrow(D::Minus1, rot, hd - rot)?], D::Minus1)?.contiguous()
}

impl Decoder {
    /// Builds the network `cfg` describes from the tensors in `vb`.
    pub fn load(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let (embed, positions, final_norm) = if cfg.family == Family::Gpt2 {
            // Checkpoints name GPT-2's tensors with and without `transformer.`.
            let root = if vb.contains_tensor("transformer.wte.weight") { vb.pp("transformer") } else { vb.clone() };
            let ln = |name: &str| candle_nn::layer_norm(h, cfg.norm_eps, root.pp(name)).map(Norm::Layer);
            for i in 0..cfg.num_layers {
                let l = root.pp(format!("h.{i}"));
                let mut scale = if cfg.scale_attn_weights { scale } else { 1.0 };
                if cfg.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f64;
                }
                layers.push(Layer {
                    norm_1: Norm::Layer(candle_nn::layer_norm(h, cfg.norm_eps, l.pp("ln_1"))?),
                    attn: Attention::Fused { qkv: conv1d(&l, "attn.c_attn", h, 3 * h)?, o: conv1d(&l, "attn.c_proj", h, h)? },
                    post_attn: None,
                    norm_2: Norm::Layer(candle_nn::layer_norm(h, cfg.norm_eps, l.pp("ln_2"))?),
                    mlp: Mlp::Plain {
                        fc: conv1d(&l, "mlp.c_fc", h, cfg.intermediate_size)?,
                        proj: conv1d(&l, "mlp.c_proj", cfg.intermediate_size, h)?,
                    },
                    post_mlp: None,
                    qk_norm: None,
                    window: None,
                    scale,
                });
            }
            let embed = candle_nn::embedding(cfg.vocab_size, h, root.pp("wte"))?;
            let positions = candle_nn::embedding(cfg.max_positions, h, root.pp("wpe"))?;
            (embed, Some(positions), ln("ln_f")?)
        } else {
            let model = vb.pp("model");
            let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
            let gemma = cfg.family == Family::Gemma2;
            // Gemma's RMSNorm scales by (1 + weight).
            let rms = |vb: VarBuilder, size: usize| -> Result<Norm> {
                if gemma {
                    Ok(Norm::Rms(RmsNorm::new((vb.get(size, "weight")? + 1.0)?, cfg.norm_eps)))
                } else {
                    candle_nn::rms_norm(size, cfg.norm_eps, vb).map(Norm::Rms)
                }
            };
            let scale = cfg.attn_scale.unwrap_or(scale);
            for i in 0..cfg.num_layers {
                let l = model.pp(format!("layers.{i}"));
                let a = l.pp("self_attn");
                let m = l.pp("mlp");
                let i_size = cfg.intermediate_size;
                let (attn, mlp) = if cfg.family == Family::Phi3 {
                    (
                        Attention::Fused { qkv: linear(&a, "qkv_proj", h, q_out + 2 * kv_out, false)?, o: linear(&a, "o_proj", q_out, h, false)? },
                        Mlp::FusedGated { gate_up: linear(&m, "gate_up_proj", h, 2 * i_size, false)?, down: linear(&m, "down_proj", i_size, h, false)? },
                    )
                } else {
                    (
                        Attention::Split {
                            q: linear(&a, "q_proj", h, q_out, cfg.qkv_bias)?,
                            k: linear(&a, "k_proj", h, kv_out, cfg.qkv_bias)?,
                            v: linear(&a, "v_proj", h, kv_out, cfg.qkv_bias)?,
                            o: linear(&a, "o_proj", q_out, h, cfg.o_bias)?,
                        },
                        Mlp::Gated {
                            gate: linear(&m, "gate_proj", h, i_size, cfg.mlp_bias)?,
                            up: linear(&m, "up_proj", h, i_size, cfg.mlp_bias)?,
                            down: linear(&m, "down_proj", i_size, h, cfg.mlp_bias)?,
                        },
                    )
                };
                let qk_norm = if cfg.qk_norm {
                    Some((candle_nn::rms_norm(hd, cfg.norm_eps, a.pp("q_norm"))?, candle_nn::rms_norm(hd, cfg.norm_eps, a.pp("k_norm"))?))
                } else {
                    None
                };
                let (norm_2, post_attn, post_mlp) = if gemma {
                    (
                        rms(l.pp("pre_feedforward_layernorm"), h)?,
                        Some(rms(l.pp("post_attention_layernorm"), h)?),
                        Some(rms(l.pp("post_feedforward_layernorm"), h)?),
                    )
                } else {
                    (rms(l.pp("post_attention_layernorm"), h)?, None, None)
                };
                layers.push(Layer {
                    norm_1: rms(l.pp("input_layernorm"), h)?,
                    attn,
                    post_attn,
                    norm_2,
                    mlp,
                    post_mlp,
                    qk_norm,
                    window: cfg.windows.get(i).copied().flatten(),
                    scale,
                });
            }
            let embed = candle_nn::embedding(cfg.vocab_size, h, model.pp("embed_tokens"))?;
            let norm = rms(model.pp("norm"), h)?;
            (embed, None, norm)
        };
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            linear(&vb, "lm_head", h, cfg.vocab_size, false)?
        };
        let rope = cfg.rope.as_ref().map(|r| rope_frequencies(r, cfg.rotary_dim()));
        Ok(Decoder {
            cfg: cfg.clone(),
            embed,
            positions,
            layers,
            final_norm,
            lm_head,
            rope,
            cache: vec![None; cfg.num_layers],
            device,
        })
    }

    /// Forgets the key/value cache, to start a new sequence.
    pub fn clear(&mut self) {
        self.cache.iter_mut().for_each(|c| *c = None);
    }

    /// The logits (f32, `[vocab]`) after the last of `ids`, which sit at
    /// positions `pos..pos + ids.len()` after what the cache holds.
    pub fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let seq = ids.len();
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&input)?;
        if self.cfg.family == Family::Gemma2 {
            // Gemma scales its embeddings by sqrt(hidden_size), in their dtype.
            x = (x * (self.cfg.hidden_size as f64).sqrt())?;
        }
        if let Some(p) = &self.positions {
            let at = Tensor::arange(pos as u32, (pos + seq) as u32, &self.device)?.unsqueeze(0)?;
            x = x.broadcast_add(&p.forward(&at)?)?;
        }
        let rotary = match &self.rope {
            Some((freqs, factor)) => Some(self.cos_sin(freqs, *factor, pos, seq, x.dtype())?),
            None => None,
        };
        for i in 0..self.layers.len() {
            let layer = &self.layers[i];
            let residual = x.clone();
            let mut a = self.attention(i, &layer.norm_1.forward(&x)?, pos, rotary.as_ref())?;
            let layer = &self.layers[i];
            if let Some(n) = &layer.post_attn {
                a = n.forward(&a)?;
            }
            x = (a + residual)?;
            let residual = x.clone();
            let mut m = self.mlp(&layer.mlp, &layer.norm_2.forward(&x)?)?;
            if let Some(n) = &layer.post_mlp {
                m = n.forward(&m)?;
            }
            x = (m + residual)?;
        }
        let x = self.final_norm.forward(&x)?;
        let last = x.narrow(1, seq - 1, 1)?;
        let logits = self.lm_head.forward(&last)?.flatten_all()?.to_dtype(DType::F32)?;
        match self.cfg.final_softcap {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// cos and sin of `(pos + t) * freq`, times the rope's attention factor,
    /// `[seq, head_dim / 2]` each.
    fn cos_sin(&self, freqs: &[f32], factor: f32, pos: usize, seq: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let half = freqs.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for t in pos..pos + seq {
            for f in freqs {
                let angle = t as f32 * f;
                cos.push(angle.cos() * factor);
                sin.push(angle.sin() * factor);
            }
        }
        let cos = Tensor::from_vec(cos, (seq, half), &self.device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq, half), &self.device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    fn attention(&mut self, i: usize, x: &Tensor, pos: usize, rotary: Option<&(Tensor, Tensor)>) -> Result<Tensor> {
        let (b, seq, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let layer = &self.layers[i];
        let (q, k, v, o) = match &layer.attn {
            Attention::Split { q, k, v, o } => (q.forward(x)?, k.forward(x)?, v.forward(x)?, o),
            Attention::Fused { qkv, o } => {
                let y = qkv.forward(x)?;
                let (wq, wkv) = (nh * hd, nkv * hd);
                (y.narrow(D::Minus1, 0, wq)?, y.narrow(D::Minus1, wq, wkv)?, y.narrow(D::Minus1, wq + wkv, wkv)?, o)
            }
        };
        let (mut q, mut k) = (q.reshape((b, seq, nh, hd))?, k.reshape((b, seq, nkv, hd))?);
        if let Some((qn, kn)) = &layer.qk_norm {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        let heads = |t: Tensor| t.transpose(1, 2)?.contiguous();
        let (mut q, mut k, v) = (heads(q)?, heads(k)?, heads(v.reshape((b, seq, nkv, hd))?)?);
        if let Some((cos, sin)) = rotary {
            q = rotate(&q, cos, sin)?;
            k = rotate(&k, cos, sin)?;
        }
        let (k, v) = match &self.cache[i] {
            Some((ck, cv)) => (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?),
            None => (k, v),
        };
        self.cache[i] = Some((k.clone(), v.clone()));
        let kv_len = k.dim(2)?;
        let k = candle_transformers::utils::repeat_kv(k, nh / nkv)?;
        let v = candle_transformers::utils::repeat_kv(v, nh / nkv)?;
        let dtype = q.dtype();
        let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        let mut scores = (q.matmul(&k.t()?)? * layer.scale)?;
        if let Some(cap) = self.cfg.attn_softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let scores = scores.broadcast_add(&self.mask(seq, pos, kv_len, layer.window)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v.contiguous()?)?.to_dtype(dtype)?;
        let y = y.transpose(1, 2)?.reshape((b, seq, nh * hd))?;
        o.forward(&y)
    }

    /// 0 where query `pos + s` may see key `j` (causal, and within the
    /// window: `pos + s - j < window`), minus infinity elsewhere.
    fn mask(&self, seq: usize, pos: usize, kv_len: usize, window: Option<usize>) -> Result<Tensor> {
        let mut m = Vec::with_capacity(seq * kv_len);
        for s in 0..seq {
            let at = pos + s;
            for j in 0..kv_len {
                let visible = j <= at && window.is_none_or(|w| at - j < w);
                m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        Tensor::from_vec(m, (seq, kv_len), &self.device)
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        let act = |t: Tensor| match self.cfg.activation {
            Activation::Silu => candle_nn::ops::silu(&t),
            Activation::Gelu => t.gelu_erf(),
            Activation::GeluTanh => t.gelu(),
            Activation::Relu => t.relu(),
        };
        match mlp {
            Mlp::Gated { gate, up, down } => down.forward(&(act(gate.forward(x)?)? * up.forward(x)?)?),
            Mlp::FusedGated { gate_up, down } => {
                let y = gate_up.forward(x)?;
                let half = y.dim(D::Minus1)? / 2;
                down.forward(&(act(y.narrow(D::Minus1, 0, half)?)? * y.narrow(D::Minus1, half, half)?)?)
            }
            Mlp::Plain { fc, proj } => proj.forward(&act(fc.forward(x)?)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 2e-6 * w.abs().max(1e-3), "{got:?} != {want:?}");
        }
    }

    /// Reference values from transformers 5.24's `ROPE_INIT_FUNCTIONS`
    /// (head_dim 16, max_position_embeddings 128).
    #[test]
    fn rope_frequencies_match_transformers() {
        let rope = |theta: f64, scaling| Rope { theta, scaling, partial_rotary_factor: 1.0 };
        let (f, a) = rope_frequencies(&rope(500.0, RopeScaling::Linear { factor: 4.0 }), 16);
        close(&f, &[0.25, 0.1149658, 0.05286856, 0.02431231, 0.01118034, 0.005141428, 0.002364354, 0.00108728]);
        assert_eq!(a, 1.0);
        let llama3 = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16 };
        let (f, _) = rope_frequencies(&rope(500.0, llama3), 16);
        close(&f, &[0.5760564, 0.08042291, 0.02643428, 0.01215616, 0.00559017, 0.002570714, 0.001182177, 0.0005436398]);
        let yarn = |beta_fast, mscale, mscale_all_dim, truncate| RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32,
            attention_factor: None,
            beta_fast,
            beta_slow: 1.0,
            mscale,
            mscale_all_dim,
            truncate,
        };
        let (f, a) = rope_frequencies(&rope(500.0, yarn(32.0, None, None, true)), 16);
        close(&f, &[1.0, 0.3448974, 0.1057371, 0.02431231, 0.01118034, 0.005141428, 0.002364354, 0.00108728]);
        assert!((a - 1.138_629_4).abs() < 1e-6, "{a}");
        let (f, a) = rope_frequencies(&rope(10000.0, yarn(16.0, Some(1.0), Some(0.5), false)), 16);
        close(&f, &[1.0, 0.1484903, 0.025, 0.007905695, 0.0025, 0.0007905695, 0.00025, 7.905695e-05]);
        assert!((a - 1.064_821_6).abs() < 1e-6, "{a}");
    }
}
