//! LoRA adapters over a base model's weights, read as the reference
//! libraries read them and applied without writing a byte of the base.
//!
//! Formats, found by the files and keys an adapter has:
//! - **PEFT** (`adapter_config.json` and `adapter_model.safetensors`, what
//!   `PeftModel.save_pretrained` writes): keys
//!   `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, the scale
//!   `lora_alpha / r` per module (`rank_pattern` and `alpha_pattern` matched
//!   as PEFT matches them, `use_rslora`: `lora_alpha / √r`), `fan_in_fan_out`
//!   for GPT-2's transposed weights;
//! - **diffusers** (`pytorch_lora_weights.safetensors`, what
//!   `save_lora_weights` writes): keys `unet.<module>.lora_A.weight`,
//!   `text_encoder.<module>…`, `text_encoder_2.<module>…`, the LoRA config
//!   from the file's `lora_adapter_metadata` when diffusers wrote one, else
//!   alphas from `<module>.alpha` keys, else scale 1 (alpha = rank), as
//!   `load_lora_weights` does;
//! - **Kohya** (one `.safetensors` file, most published SD LoRAs):
//!   `lora_unet_<module>` / `lora_te_<module>` (`lora_te1_`, `lora_te2_` for
//!   SDXL's encoders) with `.lora_down.weight`, `.lora_up.weight` and
//!   `.alpha`, the module named by its diffusers path with `_` for `.`;
//!   LoRAs on convolutions (LoCon) included.
//!
//! What Mora cannot honour is refused, naming the file and the key: DoRA,
//! LoHa, LoKr, a LoRA bias, `modules_to_save`, a target the base does not
//! have, a shape that does not fit it.
//!
//! [`Adapter::resolve`] matches an adapter's modules to a base's tensor
//! names; [`merged`] gives a `VarBuilder` whose targeted tensors are private
//! copies `W + Σ scale · B A` and every other tensor the base's own (mapped,
//! shared, untouched). docs/decisions.md says why merged, not computed beside
//! each layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::{Map, Value};

/// Why an adapter cannot be read or applied; each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: no LoRA adapter here: expected adapter_config.json with adapter_model.safetensors (PEFT), pytorch_lora_weights.safetensors (diffusers) or a single .safetensors file (Kohya)", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: `{key}`: {why}", path.display())]
    Unsupported { path: PathBuf, key: String, why: String },
    #[error("{}: `{key}` targets `{target}`, which {component} does not have", path.display())]
    UnknownTarget { path: PathBuf, key: String, target: String, component: String },
    #[error("{}: `{key}`: {why}", path.display())]
    Shape { path: PathBuf, key: String, why: String },
}

/// The format an adapter was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Peft,
    Diffusers,
    Kohya,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Peft => "PEFT",
            Format::Diffusers => "diffusers",
            Format::Kohya => "Kohya",
        }
    }
}

/// How a module names its base tensor.
#[derive(Clone, Debug)]
enum Target {
    /// The module's path (`down_blocks.0.attentions.0.…to_q`): its weight is `<path>.weight`.
    Path(String),
    /// Kohya's flattened path (`down_blocks_0_attentions_0_…to_q`).
    Flat(String),
}

/// One low-rank update: `ΔW = scale · up × down`.
#[derive(Clone, Debug)]
pub struct Module {
    /// The component it belongs to: `unet`, `text_encoder`, `text_encoder_2`,
    /// or "" for a single model (a PEFT adapter of a decoder).
    pub component: String,
    /// Its down (A) key in the file, for messages.
    pub key: String,
    target: Target,
    /// `[r, in]` or `[r, in, kh, kw]`.
    down: Tensor,
    /// `[out, r]` or `[out, r, 1, 1]`.
    up: Tensor,
    /// alpha / r (alpha / √r for rsLoRA).
    scale: f64,
    /// The base stores the weight transposed (`fan_in_fan_out`, GPT-2's `Conv1D`).
    transposed: bool,
}

impl Module {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }
}

/// An adapter file, read.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// The weights file read.
    pub file: PathBuf,
    pub format: Format,
    pub modules: Vec<Module>,
}

/// One module's update on one base tensor, with the run's scale folded in.
#[derive(Clone, Debug)]
pub struct Delta {
    down: Tensor,
    up: Tensor,
    scale: f64,
    transposed: bool,
}

/// The updates of one component, by base tensor name.
pub type Deltas = HashMap<String, Vec<Delta>>;

impl Adapter {
    /// Reads the adapter at `path`: a directory (PEFT or diffusers) or a
    /// `.safetensors` file (diffusers or Kohya).
    pub fn read(path: &Path) -> Result<Adapter, LoraError> {
        Self::read_with(path, &read_tensors)
    }

    /// The weights file of the adapter at `path` (what [`Adapter::read`]
    /// reads), without reading it.
    pub fn weights_file(path: &Path) -> Result<PathBuf, LoraError> {
        let found = std::cell::RefCell::new(None);
        let read = Self::read_with(path, &|f| {
            *found.borrow_mut() = Some(f.to_path_buf());
            Err(LoraError::NotFound { path: f.to_path_buf() })
        });
        match (found.into_inner(), read) {
            (Some(file), _) => Ok(file),
            (None, Err(e)) => Err(e),
            (None, Ok(_)) => Err(LoraError::NotFound { path: path.to_path_buf() }),
        }
    }

    /// As [`Adapter::read`], the tensors from `load`.
    pub fn read_with(path: &Path, load: Loader) -> Result<Adapter, LoraError> {
        let read_err = |source| LoraError::Read { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.is_dir() {
            let config = path.join("adapter_config.json");
            if config.is_file() {
                let file = path.join("adapter_model.safetensors");
                if !file.is_file() {
                    let why = if path.join("adapter_model.bin").is_file() { "only adapter_model.bin (a pickle) is here; Mora reads safetensors: re-save with safe_serialization=True" } else { "adapter_model.safetensors is missing" };
                    return Err(LoraError::Invalid { path: path.to_path_buf(), message: why.into() });
                }
                return read_peft(&config, &file, load);
            }
            let diffusers = path.join("pytorch_lora_weights.safetensors");
            if diffusers.is_file() {
                return read_file(&diffusers, load);
            }
            let files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(read_err)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            return match files.as_slice() {
                [one] => read_file(one, load),
                _ => Err(LoraError::NotFound { path: path.to_path_buf() }),
            };
        }
        read_file(path, load)
    }

    /// The components this adapter updates.
    pub fn components(&self) -> Vec<&str> {
        let mut c: Vec<&str> = self.modules.iter().map(|m| m.component.as_str()).collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    /// Matches the modules of `component` to the base's tensors, `base`
    /// (every tensor's name and shape; Kohya's flattened paths are matched
    /// against the names). `scale` is the run's (diffusers' `lora_scale`).
    pub fn resolve(&self, component: &str, what: &str, base: &HashMap<String, Vec<usize>>, scale: f64, into: &mut Deltas) -> Result<(), LoraError> {
        let shape = |n: &str| base.get(n).cloned();
        let mut flat: Option<HashMap<String, &String>> = None;
        for m in self.modules.iter().filter(|m| m.component == component) {
            let unknown = |target: &str| LoraError::UnknownTarget { path: self.file.clone(), key: m.key.clone(), target: target.to_string(), component: what.to_string() };
            let name = match &m.target {
                Target::Path(p) => {
                    let direct = format!("{p}.weight");
                    // transformers 5 writes CLIP's text model without its
                    // `text_model.` level and 4 with it; a LoRA may have
                    // been written against either.
                    let other = match p.strip_prefix("text_model.") {
                        Some(rest) => format!("{rest}.weight"),
                        None => format!("text_model.{p}.weight"),
                    };
                    if shape(&direct).is_some() {
                        direct
                    } else if !component.is_empty() && shape(&other).is_some() {
                        other
                    } else {
                        return Err(unknown(&direct));
                    }
                }
                Target::Flat(f) => {
                    let index = flat.get_or_insert_with(|| {
                        // In name order, so that which name an alias keeps is fixed.
                        let mut names: Vec<&String> = base.keys().collect();
                        names.sort();
                        let mut h = HashMap::new();
                        for &n in &names {
                            if let Some(module) = n.strip_suffix(".weight") {
                                h.insert(module.replace('.', "_"), n);
                                if let Some(rest) = module.strip_prefix("text_model.") {
                                    h.entry(format!("text_model_{}", rest.replace('.', "_"))).or_insert(n);
                                } else {
                                    h.entry(format!("text_model_{}", module.replace('.', "_"))).or_insert(n);
                                }
                            }
                        }
                        // Kohya's SDXL LoRAs name the original (sgm) UNet's modules.
                        if component == "unet" {
                            for (alias, n) in sgm_aliases(&names) {
                                h.entry(alias).or_insert(n);
                            }
                        }
                        h
                    });
                    match index.get(f.as_str()) {
                        Some(n) => (*n).clone(),
                        None => return Err(unknown(f)),
                    }
                }
            };
            let base = shape(&name).ok_or_else(|| unknown(&name))?;
            check_shape(&self.file, m, &base)?;
            into.entry(name).or_default().push(Delta { down: m.down.clone(), up: m.up.clone(), scale: m.scale * scale, transposed: m.transposed });
        }
        Ok(())
    }
}

/// The original (sgm, LDM) UNet's name of each diffusers UNet weight, as
/// Kohya flattens it (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`):
/// the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` and
/// `_convert_unet_lora_key`, with the layers per block read off the base's
/// own names.
fn sgm_aliases<'a>(names: &[&'a String]) -> Vec<(String, &'a String)> {
    let index = |rest: &str| rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
    // Resnets per down block (diffusers' `layers_per_block`).
    let per_block = names.iter().filter_map(|n| n.strip_prefix("down_blocks.0.resnets.")).filter_map(index).max().map_or(0, |m| m + 1);
    if per_block == 0 {
        return Vec::new();
    }
    // A resnet's parts under their sgm names.
    let resnet = |rest: &str| -> String {
        let (part, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let sgm = match part {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "time_emb_proj" => "emb_layers.1",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "conv_shortcut" => "skip_connection",
            other => other,
        };
        if tail.is_empty() { sgm.to_string() } else { format!("{sgm}.{tail}") }
    };
    // `down_blocks.B.KIND.L.REST` → (B, KIND, L, REST).
    let split = |m: &str, prefix: &str| -> Option<(usize, String, usize, String)> {
        let rest = m.strip_prefix(prefix)?;
        let mut it = rest.splitn(4, '.');
        let (b, kind, l, tail) = (it.next()?.parse().ok()?, it.next()?.to_string(), it.next()?.parse().ok()?, it.next().unwrap_or("").to_string());
        Some((b, kind, l, tail))
    };
    let mut out = Vec::new();
    for &n in names {
        let Some(m) = n.strip_suffix(".weight") else { continue };
        let sgm = match m {
            "conv_in" => Some("input_blocks.0.0".to_string()),
            "conv_out" => Some("out.2".to_string()),
            "time_embedding.linear_1" => Some("time_embed.0".to_string()),
            "time_embedding.linear_2" => Some("time_embed.2".to_string()),
            "add_embedding.linear_1" => Some("label_emb.0.0".to_string()),
            "add_embedding.linear_2" => Some("label_emb.0.2".to_string()),
            _ => {
                if let Some((b, kind, l, tail)) = split(m, "down_blocks.") {
                    match kind.as_str() {
                        "resnets" => Some(format!("input_blocks.{}.0.{}", 1 + b * (per_block + 1) + l, resnet(&tail))),
                        "attentions" => Some(format!("input_blocks.{}.1.{tail}", 1 + b * (per_block + 1) + l)),
                        "downsamplers" => Some(format!("input_blocks.{}.0.{}", (b + 1) * (per_block + 1), tail.replacen("conv", "op", 1))),
                        _ => None,
                    }
                } else if let Some((b, kind, l, tail)) = split(m, "up_blocks.") {
                    let block = b * (per_block + 1);
                    match kind.as_str() {
                        "resnets" => Some(format!("output_blocks.{}.0.{}", block + l, resnet(&tail))),
                        "attentions" => Some(format!("output_blocks.{}.1.{tail}", block + l)),
                        "upsamplers" => Some(format!("output_blocks.{}.2.{tail}", block + per_block)),
                        _ => None,
                    }
                } else if let Some(rest) = m.strip_prefix("mid_block.") {
                    let (kind, rest) = rest.split_once('.').unwrap_or((rest, ""));
                    let (l, tail) = rest.split_once('.').unwrap_or((rest, ""));
                    match (kind, l) {
                        ("resnets", "0") => Some(format!("middle_block.0.{}", resnet(tail))),
                        ("attentions", "0") => Some(format!("middle_block.1.{tail}")),
                        ("resnets", "1") => Some(format!("middle_block.2.{}", resnet(tail))),
                        _ => None,
                    }
                } else {
                    None
                }
            }
        };
        if let Some(sgm) = sgm {
            out.push((sgm.trim_end_matches('.').replace('.', "_"), n));
        }
    }
    out
}

/// The update's `[out, in…]` must have the base's element count and its
/// leading (output) size.
fn check_shape(file: &Path, m: &Module, base: &[usize]) -> Result<(), LoraError> {
    let (down, up) = (m.down.dims(), m.up.dims());
    let bad = |why: String| LoraError::Shape { path: file.to_path_buf(), key: m.key.clone(), why };
    if down.len() < 2 || up.len() < 2 || down[0] != up[1] || up[2..].iter().any(|&d| d != 1) {
        return Err(bad(format!("down {down:?} and up {up:?} are not a low-rank pair")));
    }
    let (out, inner): (usize, usize) = (up[0], down[1..].iter().product());
    let (base_out, base_in) = if m.transposed {
        (base.get(1).copied().unwrap_or(0), base.first().copied().unwrap_or(0))
    } else {
        (base.first().copied().unwrap_or(0), base[1.min(base.len())..].iter().product())
    };
    if out != base_out || inner != base_in {
        return Err(bad(format!("an update of {out}x{inner} does not fit the base weight's shape {base:?}")));
    }
    Ok(())
}

/// A `VarBuilder` over `base` in which each tensor named in `deltas` is a
/// private copy with its updates added; every other tensor is the base's.
pub fn merged(base: VarBuilder<'static>, deltas: Deltas) -> VarBuilder<'static> {
    if deltas.is_empty() {
        return base;
    }
    let (dtype, device) = (base.dtype(), base.device().clone());
    VarBuilder::from_backend(Box::new(Merged { base, deltas: Arc::new(deltas) }), dtype, device)
}

struct Merged {
    base: VarBuilder<'static>,
    deltas: Arc<Deltas>,
}

impl Merged {
    fn add(&self, name: &str, w: Tensor) -> candle_core::Result<Tensor> {
        let Some(deltas) = self.deltas.get(name) else {
            return Ok(w);
        };
        if w.device().is_cpu() && w.dtype() == DType::F32 {
            return add_in_place(w, deltas);
        }
        // Summed in f32 whatever the compute dtype, then given back in it.
        let mut acc = w.to_dtype(DType::F32)?;
        for d in deltas {
            let up = d.up.to_device(w.device())?.to_dtype(DType::F32)?;
            let down = d.down.to_device(w.device())?.to_dtype(DType::F32)?;
            let (out, r) = (up.dim(0)?, up.dim(1)?);
            let mut delta = up.reshape((out, r))?.matmul(&down.flatten_from(1)?)?;
            if d.transposed {
                delta = delta.t()?.contiguous()?;
            }
            let delta = (delta * d.scale)?.reshape(acc.shape())?;
            acc = (acc + delta)?;
        }
        acc.to_dtype(w.dtype())
    }
}

/// A CPU f32 tensor's values, copied over every core (the pages of a
/// targeted tensor are the merge's main cost: a lent weight's are first
/// read here, the copy's first written).
fn copy_f32(w: &Tensor) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    let (storage, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(src)), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        drop(storage);
        return w.flatten_all()?.to_vec1();
    };
    let src = &src[a..b];
    let mut out = vec![0f32; src.len()];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
    Ok(out)
}

/// `w + Σ scale · up × down` on the CPU in f32: one copy of `w`, then each
/// update accumulated into it by `gemm` (no intermediate tensor of `w`'s
/// size: a run's merge touches each targeted tensor's pages once).
fn add_in_place(w: Tensor, deltas: &[Delta]) -> candle_core::Result<Tensor> {
    let shape = w.shape().clone();
    let (out, inner) = (shape.dims()[0], shape.elem_count() / shape.dims()[0].max(1));
    let mut acc = copy_f32(&w)?;
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    for d in deltas {
        let up = d.up.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let down = d.down.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let r = d.down.dim(0)?;
        // The update is [o, i] = up [o, r] × down [r, i]; stored transposed
        // (`fan_in_fan_out`) it lands at [i, o], the base's own layout.
        let (o, i) = if d.transposed { (inner, out) } else { (out, inner) };
        let (dst_rs, dst_cs) = if d.transposed { (1isize, o as isize) } else { (i as isize, 1isize) };
        if up.len() != o * r || down.len() != r * i || acc.len() != o * i {
            candle_core::bail!("a LoRA update of {o}x{r} by {r}x{i} does not fit a weight of shape {shape:?}");
        }
        // SAFETY: acc holds o × i floats addressed by (dst_rs, dst_cs); up is
        // o × r and down r × i, row-major, read within their lengths.
        unsafe {
            gemm::gemm(o, i, r, acc.as_mut_ptr(), dst_cs, dst_rs, true, up.as_ptr(), 1, r as isize, down.as_ptr(), 1, i as isize, 1.0, d.scale as f32, false, false, false, par);
        }
    }
    Tensor::from_vec(acc, shape, &Device::Cpu)
}

impl SimpleBackend for Merged {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let w = self.base.get_with_hints_dtype(s, name, h, dtype)?;
        self.add(name, w)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let w = self.base.get_unchecked_dtype(name, dtype)?;
        self.add(name, w)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

/// Where an adapter's tensors come from: its file read here
/// ([`read_tensors`]), or the copy a cache daemon holds of it.
pub type Loader<'a> = &'a dyn Fn(&Path) -> Result<HashMap<String, Tensor>, LoraError>;

/// A safetensors file's tensors, read into memory on the CPU.
pub fn read_tensors(file: &Path) -> Result<HashMap<String, Tensor>, LoraError> {
    metadata(file)?;
    candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| LoraError::Invalid { path: file.to_path_buf(), message: format!("not a safetensors file: {e}") })
}

/// A safetensors file's `__metadata__`, from its header alone.
fn metadata(file: &Path) -> Result<Map<String, Value>, LoraError> {
    use mora_common::safetensors::{self, HeaderError};
    match safetensors::read_header(file) {
        Ok(header) => Ok(safetensors::metadata(&header)),
        Err(HeaderError::Read { source, .. }) => Err(LoraError::Read { path: file.to_path_buf(), source }),
        Err(e) => Err(LoraError::Invalid { path: file.to_path_buf(), message: format!("not a safetensors file: {}", e.reason()) }),
    }
}

/// The scalar of a 0-d (or 1-element) alpha tensor.
fn scalar(file: &Path, key: &str, t: &Tensor) -> Result<f64, LoraError> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .ok()
        .and_then(|v| (v.len() == 1).then(|| v[0]))
        .ok_or_else(|| LoraError::Invalid { path: file.to_path_buf(), message: format!("`{key}` is not a single number") })
}

/// Keys of formats Mora does not apply, with why.
fn refused(key: &str) -> Option<&'static str> {
    const REFUSED: &[(&str, &str)] = &[
        ("dora_scale", "DoRA (weight-decomposed LoRA) is not supported"),
        ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA) is not supported"),
        ("hada_w", "LoHa (LyCORIS) is not supported"),
        ("lokr_w", "LoKr (LyCORIS) is not supported"),
        ("lora_mid", "LoCon with a Tucker decomposition (`lora_mid`) is not supported"),
        (".diff", "full weight differences (`.diff`) are not supported"),
        ("modules_to_save", "`modules_to_save` (whole replaced modules) is not supported"),
        ("lora_embedding_A", "LoRA on embeddings is not supported"),
        ("lora_embedding_B", "LoRA on embeddings is not supported"),
    ];
    REFUSED.iter().find(|(k, _)| key.contains(k)).map(|(_, why)| *why)
}

/// A diffusers or Kohya file, by its keys.
fn read_file(file: &Path, load: Loader) -> Result<Adapter, LoraError> {
    let metadata = metadata(file)?;
    let tensors = load(file)?;
    if tensors.keys().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te")) {
        read_kohya(file, tensors)
    } else if tensors.keys().any(|k| k.contains(".lora_A.") || k.contains(".lora_B.")) {
        read_diffusers(file, tensors, &metadata)
    } else if tensors.keys().any(|k| k.contains("lora.down") || k.contains("lora_linear_layer")) {
        let key = tensors.keys().find(|k| k.contains("lora.down") || k.contains("lora_linear_layer")).cloned().unwrap_or_default();
        Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: "diffusers' old attention-processor LoRA format; load it in diffusers and save it again with save_lora_weights".into() })
    } else {
        Err(LoraError::Invalid { path: file.to_path_buf(), message: "no LoRA keys (`lora_A`/`lora_B`, or Kohya's `lora_down`/`lora_up`) in this file".into() })
    }
}

/// Splits `<module>.lora_A[.<adapter>].weight` into the module, the side
/// (A or B) and whether it is a weight.
fn split_peft_key(key: &str) -> Option<(&str, char)> {
    for (marker, side) in [(".lora_A.", 'A'), (".lora_B.", 'B')] {
        if let Some(i) = key.find(marker) {
            return Some((&key[..i], side));
        }
    }
    None
}

/// A PEFT LoRA config's scale rules: `r` and `lora_alpha`, with their
/// per-module patterns.
struct Scaling {
    r: f64,
    alpha: f64,
    rank_pattern: Vec<(String, f64)>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

impl Scaling {
    /// PEFT's `get_pattern_key`: the first pattern `p` with
    /// `re.match(rf"(.*\.)?({p})$", module)`; patterns here are plain
    /// module names or dotted suffixes, matched as such (a pattern with
    /// regex syntax is refused when read).
    fn pick(patterns: &[(String, f64)], module: &str, default: f64) -> f64 {
        patterns
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map_or(default, |(_, v)| *v)
    }

    fn scale(&self, module: &str) -> f64 {
        let r = Self::pick(&self.rank_pattern, module, self.r);
        let alpha = Self::pick(&self.alpha_pattern, module, self.alpha);
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Reads a LoRA config (`adapter_config.json`, or diffusers' metadata
    /// with its component prefix removed), refusing what changes the network
    /// and is not applied.
    fn read(file: &Path, config: &Map<String, Value>) -> Result<Scaling, LoraError> {
        let unsupported = |key: &str, why: &str| LoraError::Unsupported { path: file.to_path_buf(), key: key.into(), why: why.into() };
        let invalid = |message: String| LoraError::Invalid { path: file.to_path_buf(), message };
        if let Some(t) = config.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(unsupported("peft_type", &format!("{t} adapters are not supported; Mora applies LoRA")));
            }
        }
        let truthy = |k: &str| config.get(k).is_some_and(|v| v.as_bool() == Some(true));
        if truthy("use_dora") {
            return Err(unsupported("use_dora", "DoRA (weight-decomposed LoRA) is not supported"));
        }
        if truthy("lora_bias") {
            return Err(unsupported("lora_bias", "a LoRA bias is not supported"));
        }
        match config.get("bias").and_then(Value::as_str) {
            None | Some("none") => {}
            Some(b) => return Err(unsupported("bias", &format!("bias = \"{b}\" trains the base's biases, which Mora does not apply"))),
        }
        if config.get("modules_to_save").is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(unsupported("modules_to_save", "whole replaced modules are not supported"));
        }
        for key in ["layer_replication", "megatron_config"] {
            if config.get(key).is_some_and(|v| !v.is_null()) {
                return Err(unsupported(key, "changes the network and is not supported"));
            }
        }
        let number = |k: &str| config.get(k).and_then(Value::as_f64);
        let r = number("r").ok_or_else(|| invalid("the LoRA config has no rank `r`".into()))?;
        let alpha = number("lora_alpha").unwrap_or(r);
        let pattern = |k: &str| -> Result<Vec<(String, f64)>, LoraError> {
            let Some(v) = config.get(k).filter(|v| !v.is_null()) else {
                return Ok(Vec::new());
            };
            let obj = v.as_object().ok_or_else(|| invalid(format!("`{k}` is not an object")))?;
            obj.iter()
                .map(|(p, v)| {
                    if p.chars().any(|c| "^$*+?()[]{}|\\".contains(c)) {
                        return Err(unsupported(k, &format!("the pattern `{p}` is a regular expression; Mora matches module names and dotted suffixes")));
                    }
                    v.as_f64().map(|n| (p.clone(), n)).ok_or_else(|| invalid(format!("`{k}.{p}` is not a number")))
                })
                .collect()
        };
        Ok(Scaling { r, alpha, rank_pattern: pattern("rank_pattern")?, alpha_pattern: pattern("alpha_pattern")?, rslora: truthy("use_rslora") })
    }
}

/// A module's down (A) key, and its A and B tensors as found.
type Pair = (String, Option<Tensor>, Option<Tensor>);

/// Pairs `lora_A`/`lora_B` tensors by module; `component(module)` splits
/// a module path into its component and its path inside it.
fn pairs(file: &Path, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Pair>, LoraError> {
    let mut by_module: HashMap<String, Pair> = HashMap::new();
    for (key, t) in tensors {
        if let Some(why) = refused(&key) {
            return Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: why.into() });
        }
        if key.ends_with(".alpha") {
            continue;
        }
        let Some((module, side)) = split_peft_key(&key) else {
            return Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: "not a LoRA key (`lora_A`/`lora_B`)".into() });
        };
        if key.ends_with(".bias") {
            return Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: "a LoRA bias is not supported".into() });
        }
        let e = by_module.entry(module.to_string()).or_insert_with(|| (String::new(), None, None));
        if side == 'A' {
            e.0 = key.clone();
            e.1 = Some(t);
        } else {
            e.2 = Some(t);
            if e.0.is_empty() {
                e.0 = key.clone();
            }
        }
    }
    Ok(by_module)
}

fn read_peft(config_path: &Path, file: &Path, load: Loader) -> Result<Adapter, LoraError> {
    let text = std::fs::read_to_string(config_path).map_err(|source| LoraError::Read { path: config_path.to_path_buf(), source })?;
    let config: Map<String, Value> = serde_json::from_str(&text).map_err(|e| LoraError::Invalid { path: config_path.to_path_buf(), message: format!("not a JSON object: {e}") })?;
    let scaling = Scaling::read(config_path, &config)?;
    let transposed = config.get("fan_in_fan_out").is_some_and(|v| v.as_bool() == Some(true));
    let tensors = load(file)?;
    let mut modules = Vec::new();
    for (module, (key, down, up)) in pairs(file, tensors)? {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(LoraError::Invalid { path: file.to_path_buf(), message: format!("`{module}` has only one of lora_A and lora_B") });
        };
        let path = module.strip_prefix("base_model.model.").unwrap_or(&module).to_string();
        let scale = scaling.scale(&path);
        check_rank(file, &key, &down, scaling_rank(&scaling, &path))?;
        modules.push(Module { component: String::new(), key, target: Target::Path(path), down, up, scale, transposed });
    }
    modules.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Adapter { file: file.to_path_buf(), format: Format::Peft, modules })
}

fn scaling_rank(s: &Scaling, module: &str) -> f64 {
    Scaling::pick(&s.rank_pattern, module, s.r)
}

/// The config's rank for a module must be its tensors' rank.
fn check_rank(file: &Path, key: &str, down: &Tensor, r: f64) -> Result<(), LoraError> {
    let got = down.dims().first().copied().unwrap_or(0);
    if got as f64 != r {
        return Err(LoraError::Shape { path: file.to_path_buf(), key: key.into(), why: format!("rank {got}, where the config says {r}") });
    }
    Ok(())
}

/// The components of an SD pipeline a diffusers LoRA names.
const COMPONENTS: &[&str] = &["unet", "text_encoder", "text_encoder_2"];

fn read_diffusers(file: &Path, tensors: HashMap<String, Tensor>, metadata: &Map<String, Value>) -> Result<Adapter, LoraError> {
    // Per-module alphas written as `<prefix>.<module>.alpha`.
    let alphas: HashMap<String, f64> = tensors
        .iter()
        .filter_map(|(k, t)| k.strip_suffix(".alpha").map(|m| (m.to_string(), k, t)))
        .map(|(m, k, t)| scalar(file, k, t).map(|a| (m, a)))
        .collect::<Result<_, _>>()?;
    // diffusers' own LoRA config per component, when it wrote one.
    let configs: Option<HashMap<&str, Map<String, Value>>> = match metadata.get("lora_adapter_metadata").and_then(Value::as_str) {
        None => None,
        Some(text) => {
            let all: Map<String, Value> = serde_json::from_str(text).map_err(|e| LoraError::Invalid { path: file.to_path_buf(), message: format!("lora_adapter_metadata is not a JSON object: {e}") })?;
            let mut by = HashMap::new();
            for (k, v) in all {
                let Some((c, rest)) = COMPONENTS.iter().find_map(|c| k.strip_prefix(&format!("{c}.")).map(|rest| (*c, rest.to_string()))) else {
                    continue;
                };
                by.entry(c).or_insert_with(Map::new).insert(rest, v);
            }
            Some(by)
        }
    };
    let scalings: HashMap<&str, Scaling> = match &configs {
        Some(by) => by.iter().map(|(c, cfg)| Scaling::read(file, cfg).map(|s| (*c, s))).collect::<Result<_, _>>()?,
        None => HashMap::new(),
    };
    let mut modules = Vec::new();
    for (module, (key, down, up)) in pairs(file, tensors)? {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(LoraError::Invalid { path: file.to_path_buf(), message: format!("`{module}` has only one of lora_A and lora_B") });
        };
        let Some((component, path)) = module.split_once('.').filter(|(c, _)| COMPONENTS.contains(c)) else {
            return Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: format!("names no pipeline component ({})", COMPONENTS.join(", ")) });
        };
        let rank = down.dims().first().copied().unwrap_or(0) as f64;
        let scale = match scalings.get(component) {
            Some(s) => {
                check_rank(file, &key, &down, scaling_rank(s, path))?;
                s.scale(path)
            }
            None => alphas.get(&module).map_or(1.0, |a| a / rank),
        };
        modules.push(Module { component: component.to_string(), key, target: Target::Path(path.to_string()), down, up, scale, transposed: false });
    }
    modules.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Adapter { file: file.to_path_buf(), format: Format::Diffusers, modules })
}

fn read_kohya(file: &Path, mut tensors: HashMap<String, Tensor>) -> Result<Adapter, LoraError> {
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let mut modules = Vec::new();
    for key in names {
        if let Some(why) = refused(&key) {
            return Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: why.into() });
        }
        let Some(name) = key.strip_suffix(".lora_down.weight").map(str::to_string) else {
            if key.ends_with(".lora_up.weight") || key.ends_with(".alpha") {
                continue;
            }
            return Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: "not a Kohya LoRA key (`lora_down`, `lora_up`, `alpha`)".into() });
        };
        let (component, flat) = if let Some(rest) = name.strip_prefix("lora_unet_") {
            ("unet", rest)
        } else if let Some(rest) = name.strip_prefix("lora_te1_").or_else(|| name.strip_prefix("lora_te_")) {
            ("text_encoder", rest)
        } else if let Some(rest) = name.strip_prefix("lora_te2_") {
            ("text_encoder_2", rest)
        } else {
            return Err(LoraError::Unsupported { path: file.to_path_buf(), key, why: "names no pipeline component (lora_unet_, lora_te_, lora_te1_, lora_te2_)".into() });
        };
        let down = tensors.remove(&key).expect("listed");
        let up_key = format!("{name}.lora_up.weight");
        let up = tensors.remove(&up_key).ok_or_else(|| LoraError::Invalid { path: file.to_path_buf(), message: format!("`{key}` has no `{up_key}`") })?;
        let rank = down.dims().first().copied().unwrap_or(0) as f64;
        let alpha_key = format!("{name}.alpha");
        let scale = match tensors.get(&alpha_key) {
            Some(t) => scalar(file, &alpha_key, t)? / rank,
            None => 1.0,
        };
        modules.push(Module { component: component.into(), key, target: Target::Flat(flat.to_string()), down, up, scale, transposed: false });
    }
    Ok(Adapter { file: file.to_path_buf(), format: Format::Kohya, modules })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mora_test_support::Scratch;

    fn t(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (((i as u64 + 1) * (seed * 2 + 7) % 97) as f32 - 48.0) / 48.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    fn base() -> HashMap<String, Tensor> {
        [
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", t(&[6, 4], 1)),
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight", t(&[4, 6], 2)),
            ("down_blocks.0.resnets.0.conv1.weight", t(&[5, 3, 3, 3], 3)),
            ("model.layers.0.self_attn.q_proj.weight", t(&[6, 4], 4)),
            ("model.layers.0.mlp.gate_proj.weight", t(&[8, 4], 5)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn shapes(b: &HashMap<String, Tensor>) -> HashMap<String, Vec<usize>> {
        b.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect()
    }

    /// The merged weight `name` of `adapter` over [`base`] at `scale`.
    fn merged_weight(adapter: &Adapter, component: &str, scale: f64, name: &str) -> Tensor {
        let b = base();
        let mut deltas = Deltas::new();
        adapter.resolve(component, "the base", &shapes(&b), scale, &mut deltas).unwrap();
        let vb = merged(VarBuilder::from_tensors(b.clone(), DType::F32, &Device::Cpu), deltas);
        vb.get(b[name].dims(), name).unwrap()
    }

    fn expect(name: &str, up: &Tensor, down: &Tensor, scale: f64) -> Tensor {
        let w = base()[name].clone();
        let r = down.dim(0).unwrap();
        let d = up.reshape((up.dim(0).unwrap(), r)).unwrap().matmul(&down.flatten_from(1).unwrap()).unwrap();
        (w + (d * scale).unwrap().reshape(base()[name].shape()).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn kohya_linear_and_conv_updates_merge_at_alpha_over_rank_times_the_scale() {
        let dir = Scratch::new("lora-kohya");
        let file = dir.join("style.safetensors");
        let (qd, qu) = (t(&[2, 4], 11), t(&[6, 2], 12));
        let (cd, cu) = (t(&[2, 3, 3, 3], 13), t(&[5, 2, 1, 1], 14));
        save(
            &file,
            &[
                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", qd.clone()),
                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", qu.clone()),
                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha", Tensor::new(1f32, &Device::Cpu).unwrap()),
                ("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", cd.clone()),
                ("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", cu.clone()),
            ],
        );
        // A folder with one .safetensors file reads as that file.
        let a = Adapter::read(&dir).unwrap();
        assert_eq!((a.format, a.components()), (Format::Kohya, vec!["unet"]));
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
        assert!(max_diff(&merged_weight(&a, "unet", 0.8, q), &expect(q, &qu, &qd, 0.8 * 1.0 / 2.0)) < 1e-6);
        let c = "down_blocks.0.resnets.0.conv1.weight";
        // No alpha: scale 1 (alpha = rank).
        assert!(max_diff(&merged_weight(&a, "unet", 1.0, c), &expect(c, &cu, &cd, 1.0)) < 1e-6);
        // Untargeted tensors are the base's own.
        let o = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight";
        assert_eq!(max_diff(&merged_weight(&a, "unet", 1.0, o), &base()[o]), 0.0);
    }

    #[test]
    fn peft_scales_follow_rank_and_alpha_patterns_and_rslora() {
        let dir = Scratch::new("lora-peft");
        let (qd, qu) = (t(&[4, 4], 21), t(&[6, 4], 22));
        let (gd, gu) = (t(&[2, 4], 23), t(&[8, 2], 24));
        save(
            &dir.join("adapter_model.safetensors"),
            &[
                ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", qd.clone()),
                ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", qu.clone()),
                ("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight", gd.clone()),
                ("base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight", gu.clone()),
            ],
        );
        let config = |ranks: &str, extra: &str| {
            std::fs::write(
                dir.join("adapter_config.json"),
                format!(r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {{{ranks}}}, "alpha_pattern": {{"mlp.gate_proj": 3}}, "target_modules": ["q_proj", "gate_proj"], "bias": "none"{extra}}}"#),
            )
            .unwrap()
        };
        config(r#""gate_proj": 2"#, "");
        let a = Adapter::read(&dir).unwrap();
        assert_eq!((a.format, a.components()), (Format::Peft, vec![""]));
        let (q, g) = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight");
        assert!(max_diff(&merged_weight(&a, "", 1.0, q), &expect(q, &qu, &qd, 8.0 / 4.0)) < 1e-5);
        assert!(max_diff(&merged_weight(&a, "", 0.5, g), &expect(g, &gu, &gd, 0.5 * 3.0 / 2.0)) < 1e-5);
        config(r#""gate_proj": 2"#, r#", "use_rslora": true"#);
        let a = Adapter::read(&dir).unwrap();
        assert!(max_diff(&merged_weight(&a, "", 1.0, q), &expect(q, &qu, &qd, 8.0 / 2.0)) < 1e-5);
        // A config rank that is not the tensors' is refused.
        config(r#""gate_proj": 2, "q_proj": 3"#, "");
        let e = Adapter::read(&dir).unwrap_err().to_string();
        assert!(e.contains("q_proj.lora_A.weight") && e.contains("rank 4, where the config says 3"), "{e}");
    }

    #[test]
    fn sgm_names_map_onto_the_diffusers_unet_as_diffusers_maps_them() {
        // Two resnets per down block (three per up block), as SDXL.
        let names: Vec<String> = [
            "conv_in.weight",
            "down_blocks.0.resnets.0.conv1.weight",
            "down_blocks.0.resnets.1.time_emb_proj.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
            "down_blocks.1.resnets.0.conv_shortcut.weight",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight",
            "mid_block.resnets.1.conv2.weight",
            "mid_block.attentions.0.proj_in.weight",
            "up_blocks.0.resnets.2.conv1.weight",
            "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_out.0.weight",
            "up_blocks.0.upsamplers.0.conv.weight",
            "up_blocks.1.resnets.0.norm1.weight",
            "time_embedding.linear_2.weight",
            "add_embedding.linear_1.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got: HashMap<String, String> = sgm_aliases(&names.iter().collect::<Vec<_>>()).into_iter().map(|(a, n)| (a, n.clone())).collect();
        for (sgm, diffusers) in [
            ("input_blocks_0_0", "conv_in"),
            ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
            ("input_blocks_2_0_emb_layers_1", "down_blocks.0.resnets.1.time_emb_proj"),
            ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
            ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
            ("input_blocks_5_1_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"),
            ("middle_block_2_out_layers_3", "mid_block.resnets.1.conv2"),
            ("middle_block_1_proj_in", "mid_block.attentions.0.proj_in"),
            ("output_blocks_2_0_in_layers_2", "up_blocks.0.resnets.2.conv1"),
            ("output_blocks_2_1_transformer_blocks_1_attn2_to_out_0", "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_out.0"),
            // At inner index 2 whatever the block holds, as diffusers reads it.
            ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
            ("output_blocks_3_0_in_layers_0", "up_blocks.1.resnets.0.norm1"),
            ("time_embed_2", "time_embedding.linear_2"),
            ("label_emb_0_0", "add_embedding.linear_1"),
        ] {
            assert_eq!(got.get(sgm).map(String::as_str), Some(format!("{diffusers}.weight").as_str()), "{sgm}");
        }
    }

    #[test]
    fn fan_in_fan_out_updates_land_transposed_on_gpt2_style_weights() {
        let dir = Scratch::new("lora-fan-in");
        // GPT-2's Conv1D keeps its weight as [in, out]: here [4, 8].
        let name = "model.layers.0.mlp.gate_proj.weight";
        let (d, u) = (t(&[2, 4], 41), t(&[8, 2], 42));
        save(&dir.join("adapter_model.safetensors"), &[("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight", d.clone()), ("base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight", u.clone())]);
        std::fs::write(dir.join("adapter_config.json"), r#"{"r": 2, "lora_alpha": 2, "fan_in_fan_out": true}"#).unwrap();
        let a = Adapter::read(&dir).unwrap();
        let mut b = base();
        b.insert(name.into(), t(&[4, 8], 5));
        let mut deltas = Deltas::new();
        a.resolve("", "the base", &shapes(&b), 1.0, &mut deltas).unwrap();
        let got = merged(VarBuilder::from_tensors(b.clone(), DType::F32, &Device::Cpu), deltas).get((4, 8), name).unwrap();
        let want = (&b[name] + u.matmul(&d).unwrap().t().unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn what_changes_the_network_and_is_not_applied_is_refused_naming_file_and_key() {
        let dir = Scratch::new("lora-refused");
        let file = dir.join("x.safetensors");
        let refuse = |tensors: &[(&str, Tensor)], want: &str| {
            save(&file, tensors);
            let e = Adapter::read(&file).unwrap_err().to_string();
            assert!(e.contains("x.safetensors") && e.contains(want), "{e}");
        };
        let (d, u) = (t(&[2, 4], 1), t(&[6, 2], 2));
        refuse(&[("lora_unet_a.lora_down.weight", d.clone()), ("lora_unet_a.lora_up.weight", u.clone()), ("lora_unet_a.dora_scale", t(&[6, 1], 3))], "DoRA");
        refuse(&[("lora_unet_a.hada_w1_a", d.clone())], "LoHa");
        refuse(&[("unet.a.processor.to_q_lora.down.weight", d.clone())], "old attention-processor");
        refuse(&[("unet.a.lora_A.weight", d.clone()), ("unet.a.lora_magnitude_vector", t(&[6], 1))], "DoRA");
        refuse(&[("transformer.a.lora_A.weight", d.clone()), ("transformer.a.lora_B.weight", u.clone())], "names no pipeline component");
        refuse(&[("weight", d.clone())], "no LoRA keys");
        std::fs::write(&file, b"not safetensors").unwrap();
        assert!(Adapter::read(&file).unwrap_err().to_string().contains("not a safetensors file"));

        // PEFT configs that change the network.
        let peft = Scratch::new("lora-refused-peft");
        save(&peft.join("adapter_model.safetensors"), &[("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", d.clone()), ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", u.clone())]);
        for (extra, want) in [
            (r#""use_dora": true"#, "use_dora"),
            (r#""bias": "all""#, "`bias`"),
            (r#""modules_to_save": ["lm_head"]"#, "modules_to_save"),
            (r#""peft_type": "IA3""#, "IA3"),
            (r#""rank_pattern": {"^model.*q_proj$": 2}"#, "regular expression"),
        ] {
            std::fs::write(peft.join("adapter_config.json"), format!(r#"{{"r": 2, "lora_alpha": 4, {extra}}}"#)).unwrap();
            let e = Adapter::read(&peft).unwrap_err().to_string();
            assert!(e.contains("adapter_config.json") && e.contains(want), "{extra}: {e}");
        }
        // Nothing to read.
        let empty = Scratch::new("lora-empty");
        assert!(Adapter::read(&empty).unwrap_err().to_string().contains("no LoRA adapter here"));
    }

    #[test]
    fn unknown_targets_and_shapes_that_do_not_fit_name_the_key() {
        let dir = Scratch::new("lora-targets");
        let file = dir.join("pytorch_lora_weights.safetensors");
        let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
        let resolve = |a: &Adapter| {
            a.resolve("unet", "the UNet", &shapes(&base()), 1.0, &mut Deltas::new()).unwrap_err().to_string()
        };
        save(&file, &[(key, t(&[2, 5], 1)), (&key.replace("lora_A", "lora_B"), t(&[6, 2], 2))]);
        let e = resolve(&Adapter::read(&dir).unwrap());
        assert!(e.contains(key) && e.contains("does not fit"), "{e}");
        let other = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
        save(&file, &[(other, t(&[2, 4], 1)), (&other.replace("lora_A", "lora_B"), t(&[6, 2], 2))]);
        let e = resolve(&Adapter::read(&dir).unwrap());
        assert!(e.contains(other) && e.contains("which the UNet does not have"), "{e}");
    }

    #[test]
    fn diffusers_alphas_come_from_metadata_or_alpha_keys_else_scale_one() {
        let dir = Scratch::new("lora-diffusers");
        let file = dir.join("pytorch_lora_weights.safetensors");
        let m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let (d, u) = (t(&[2, 4], 31), t(&[6, 2], 32));
        let tensors: HashMap<String, Tensor> = [(format!("unet.{m}.lora_A.weight"), d.clone()), (format!("unet.{m}.lora_B.weight"), u.clone())].into_iter().collect();
        let name = format!("{m}.weight");
        // No alpha anywhere: scale 1.
        candle_core::safetensors::save(&tensors, &file).unwrap();
        assert!(max_diff(&merged_weight(&Adapter::read(&file).unwrap(), "unet", 1.0, &name), &expect(&name, &u, &d, 1.0)) < 1e-6);
        // An alpha key.
        let mut with_alpha = tensors.clone();
        with_alpha.insert(format!("unet.{m}.alpha"), Tensor::new(6f32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&with_alpha, &file).unwrap();
        assert!(max_diff(&merged_weight(&Adapter::read(&file).unwrap(), "unet", 1.0, &name), &expect(&name, &u, &d, 3.0)) < 1e-6);
        // diffusers' metadata, written as safetensors' `__metadata__`.
        let meta = serde_json::json!({"unet.r": 2, "unet.lora_alpha": 1, "unet.target_modules": ["to_q"]}).to_string();
        let data: Vec<(String, safetensors_view::View)> = tensors.iter().map(|(k, v)| (k.clone(), safetensors_view::View::of(v))).collect();
        safetensors_view::write(&file, &data, &[("lora_adapter_metadata", &meta)]);
        assert!(max_diff(&merged_weight(&Adapter::read(&file).unwrap(), "unet", 2.0, &name), &expect(&name, &u, &d, 2.0 * 0.5)) < 1e-6);
    }

    /// A safetensors writer with `__metadata__`, which candle's `save` does
    /// not write (f32 tensors only).
    mod safetensors_view {
        use candle_core::Tensor;
        use std::path::Path;

        pub struct View(Vec<usize>, Vec<u8>);

        impl View {
            pub fn of(t: &Tensor) -> View {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                View(t.dims().to_vec(), v.iter().flat_map(|f| f.to_le_bytes()).collect())
            }
        }

        pub fn write(path: &Path, tensors: &[(String, View)], metadata: &[(&str, &str)]) {
            let mut header = serde_json::Map::new();
            let meta: serde_json::Map<String, serde_json::Value> = metadata.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
            header.insert("__metadata__".into(), serde_json::Value::Object(meta));
            let mut offset = 0;
            for (name, View(shape, bytes)) in tensors {
                header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes.len()]}));
                offset += bytes.len();
            }
            let h = serde_json::to_vec(&header).unwrap();
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            for (_, View(_, bytes)) in tensors {
                out.extend(bytes);
            }
            std::fs::write(path, out).unwrap();
        }
    }
}
