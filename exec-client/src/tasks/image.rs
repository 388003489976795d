//! `task = "image"`: pictures from a Stable Diffusion pipeline
//! ([`mora_models::image::pipeline`]), from a prompt (text to image) or from a
//! prompt and a starting picture (image to image, `init_image`). Each PNG
//! gets a JSON beside it with everything needed to make it again.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use toml::Spanned;

use super::generate::fill;
use super::kind::Kind;
use super::report::{StepKind, StepReport};
use super::step::{write_bytes_atomically, write_json, Inputs, Results, StepContext, StepRun};
use crate::template::{expand, normalize, prompt_pieces, FloatDecl, IntDecl, Piece};
use crate::weights::Weights;
use crate::workflow::decl::{LoraDecl, LoraSpec, ModelSpec};
use crate::workflow::error::WorkflowError;
use mora_models::image::pipeline::{png_bytes, read_png, ComponentWeights, ImageRequest, Pipeline, PipelineConfig};
use crate::{ExecError, InputError, ModelError, StepError};

pub const KIND: Kind = Kind {
    name: "image",
    keys: &[
        &["prompt", "negative_prompt"],
        &["steps", "guidance_scale", "scheduler"],
        &["width", "height"],
        &["seed", "images"],
        &["init_image", "strength"],
        &["loras"],
    ],
    text_fields: &[],
    results: "images",
};

/// diffusers' default `num_inference_steps`.
pub const DEFAULT_STEPS: usize = 50;
/// diffusers' default img2img `strength`.
pub const DEFAULT_STRENGTH: f64 = 0.8;

#[derive(Debug, Clone, PartialEq)]
pub struct ImageStep {
    pub model: String,
    pub prompt: Vec<Piece>,
    pub negative_prompt: Option<Vec<Piece>>,
    pub steps: usize,
    /// None: the pipeline class's default (7.5 for SD, 5 for SDXL).
    pub guidance_scale: Option<f64>,
    /// None: the UNet's `sample_size` in pixels.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Image k of `images` (from 0) uses `seed + k`.
    pub seed: u64,
    pub images: usize,
    pub init_image: Option<InitImage>,
    pub strength: f64,
    /// Overrides the class of `scheduler/scheduler_config.json`.
    pub scheduler: Option<String>,
    /// LoRA adapters over the pipeline's UNet and text encoders.
    pub loras: Vec<LoraSpec>,
}

/// Where an image-to-image step's starting picture comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum InitImage {
    /// A PNG file, relative to the workflow's directory.
    File(PathBuf),
    /// The first image of an earlier image step (`"{{ steps.NAME }}"`).
    Step(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decl {
    prompt: Option<Spanned<String>>,
    negative_prompt: Option<Spanned<String>>,
    steps: Option<Spanned<IntDecl>>,
    guidance_scale: Option<Spanned<FloatDecl>>,
    scheduler: Option<String>,
    width: Option<Spanned<IntDecl>>,
    height: Option<Spanned<IntDecl>>,
    seed: Option<Spanned<IntDecl>>,
    images: Option<Spanned<IntDecl>>,
    init_image: Option<Spanned<String>>,
    strength: Option<Spanned<FloatDecl>>,
    loras: Option<Vec<Spanned<LoraDecl>>>,
}

pub fn parse(cx: &StepContext, keys: Spanned<toml::de::DeValue<'_>>) -> Result<ImageStep, WorkflowError> {
    let model = cx.model()?;
    let d: Decl = cx.decode(keys)?;
    let pieces = |p: &Spanned<String>| prompt_pieces(p.get_ref(), cx.variables, cx.earlier, cx.kinds).map_err(|e| cx.err(Some(p.span()), e.to_string()));
    let prompt = match &d.prompt {
        Some(p) => pieces(p)?,
        None => return Err(cx.err(None, "an image step needs `prompt = \"...\"`".into())),
    };
    let negative_prompt = d.negative_prompt.as_ref().map(pieces).transpose()?;
    let steps = match &d.steps {
        None => DEFAULT_STEPS,
        Some(k) => cx.int("steps", k, 1, "a whole number of at least 1")? as usize,
    };
    let guidance_scale = match &d.guidance_scale {
        None => None,
        Some(g) => Some(cx.float("guidance_scale", g, |v| v >= 0.0, "a number of at least 0 (1 or less: no guidance)")?),
    };
    let size = |key: &str, decl: &Option<Spanned<IntDecl>>| -> Result<Option<usize>, WorkflowError> {
        match decl {
            None => Ok(None),
            Some(k) => {
                let v = cx.int(key, k, 8, "a whole number of pixels, a multiple of 8")? as usize;
                if !v.is_multiple_of(8) {
                    return Err(cx.err(Some(k.span()), format!("`{key}` is {v}: it must be a multiple of 8 (the VAE's scale)")));
                }
                Ok(Some(v))
            }
        }
    };
    let (width, height) = (size("width", &d.width)?, size("height", &d.height)?);
    let seed = match &d.seed {
        None => cx.seed,
        Some(sd) => cx.int("seed", sd, 0, "a whole number of at least 0")? as u64,
    };
    let images = match &d.images {
        None => 1,
        Some(k) => cx.int("images", k, 1, "a whole number of at least 1")? as usize,
    };
    let init_image = match &d.init_image {
        None => None,
        Some(i) => Some(init_image(cx, i)?),
    };
    let strength = match (&d.strength, &init_image) {
        (Some(s), None) => return Err(cx.err(Some(s.span()), "`strength` applies to image to image: give `init_image` too".into())),
        (Some(s), Some(_)) => cx.float("strength", s, |v| v > 0.0 && v <= 1.0, "a number above 0 and at most 1")?,
        (None, _) => DEFAULT_STRENGTH,
    };
    if init_image.is_some() && (width.is_some() || height.is_some()) {
        return Err(cx.err(None, "`width` and `height` come from `init_image` in image to image: leave them out".into()));
    }
    let scheduler = d.scheduler.map(|s| expand(&s, cx.variables)).transpose().map_err(|e| cx.err(None, e.to_string()))?;
    let loras = cx.loras(&model, &d.loras)?;
    Ok(ImageStep {
        model,
        prompt,
        negative_prompt,
        steps,
        guidance_scale,
        width,
        height,
        seed,
        images,
        init_image,
        strength,
        scheduler,
        loras,
    })
}

/// `init_image = "FILE"` or `init_image = "{{ steps.NAME }}"` (an earlier image step).
fn init_image(cx: &StepContext, decl: &Spanned<String>) -> Result<InitImage, WorkflowError> {
    let text = decl.get_ref().trim();
    let reference = text.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")).map(str::trim).and_then(|r| r.strip_prefix("steps."));
    if let Some(name) = reference {
        return match cx.earlier.get(name) {
            Some(kind) if kind.name == KIND.name => Ok(InitImage::Step(name.to_string())),
            Some(kind) => Err(cx.err(Some(decl.span()), format!("`init_image`: step `{name}` is a {} step; only an image step's picture can start another", kind.name))),
            None => Err(cx.err(Some(decl.span()), format!("`init_image`: no earlier step `{name}`"))),
        };
    }
    let path = expand(text, cx.variables).map_err(|e| cx.err(Some(decl.span()), e.to_string()))?;
    Ok(InitImage::File(normalize(&cx.base.join(path))))
}

impl ImageStep {
    pub fn input_files(&self) -> Vec<PathBuf> {
        match &self.init_image {
            Some(InitImage::File(p)) => vec![p.clone()],
            _ => Vec::new(),
        }
    }

    /// Reads the starting picture from a file, before any model is acquired.
    pub fn read_inputs(&self) -> Result<Inputs, InputError> {
        match &self.init_image {
            Some(InitImage::File(p)) => Ok(Inputs::Image(read_png(p).map_err(InputError::InitImage)?)),
            _ => Ok(Inputs::None),
        }
    }
}

/// The pipeline this step runs, its files read (configs, tokenizers, the
/// scheduler with this step's override) before any weight is.
pub fn pipeline_config(s: &ImageStep, spec: &ModelSpec) -> Result<PipelineConfig, ExecError> {
    let fail = |e: ModelError| ExecError::model(&s.model, e);
    let root = spec.source.resolve_dir().map_err(|e| fail(e.into()))?;
    PipelineConfig::read(&root, s.scheduler.as_deref()).map_err(|e| fail(e.into()))
}

/// The files of image k (from 0) of `n`: `OUTPUT` alone, or `STEM-K.png`
/// (from 1) when there are several; each with its `.json` beside it.
pub fn image_paths(output: &Path, k: usize, n: usize) -> (PathBuf, PathBuf) {
    let png = if n == 1 {
        output.to_path_buf()
    } else {
        let stem = output.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        output.with_file_name(format!("{stem}-{}.png", k + 1))
    };
    let json = png.with_extension("json");
    (png, json)
}

/// Runs the step on the pipeline whose components `parts` holds (name,
/// weights, acquired earlier in this run).
pub fn run(
    s: &ImageStep,
    step: &StepRun,
    config: PipelineConfig,
    parts: &[(&'static str, &Weights, bool)],
    inputs: Inputs,
    results: &mut Results,
) -> Result<StepReport, ExecError> {
    let fail = |e: StepError| ExecError::step(step.name, e);
    let init = match (&s.init_image, inputs) {
        (Some(InitImage::File(_)), Inputs::Image(img)) => Some(img),
        (Some(InitImage::Step(from)), _) => {
            let path = results.images.get(from).and_then(|v| v.first()).ok_or_else(|| fail(StepError::NoImage(from.clone())))?;
            Some(read_png(path).map_err(|e| fail(e.into()))?)
        }
        _ => None,
    };
    let (width, height) = match &init {
        Some(img) => (img.width, img.height),
        None => (s.width.unwrap_or(config.default_size()), s.height.unwrap_or(config.default_size())),
    };
    config.check_size(width, height).map_err(|source| {
        let what = if init.is_some() { "init_image" } else { "image" };
        fail(StepError::Size { what, width, height, source })
    })?;
    let guidance_scale = s.guidance_scale.unwrap_or(config.default_guidance());
    let prompt = fill(&s.prompt, step, results)?;
    let negative_prompt = s.negative_prompt.as_ref().map(|p| fill(p, step, results)).transpose()?;

    let start = Instant::now();
    // Each component with the step's LoRA updates over it (none: the
    // component's own weights, untouched).
    let adapted = parts
        .iter()
        .map(|(c, w, _)| {
            let deltas = if step.loras.is_empty() { Default::default() } else { crate::lora::deltas(step.loras, c, &w.name, &w.shapes())? };
            Ok((*c, Adapted { weights: w, deltas }))
        })
        .collect::<Result<Vec<_>, crate::lora::LoraStepError>>()
        .map_err(|e| fail(e.into()))?;
    let weights = |c: &str| adapted.iter().find(|(n, _)| *n == c).map(|(_, w)| w).expect("every component was acquired");
    let identities: Vec<serde_json::Value> = parts
        .iter()
        .map(|(c, w, _)| serde_json::json!({ "component": c, "name": w.name, "dir": w.dir, "dtype": w.dtype.to_string() }))
        .collect();
    let class_name = config.class_name.clone();
    let scheduler_class = config.scheduler.class_name();
    let pipeline = Pipeline::build(config, weights).map_err(|e| fail(e.into()))?;
    let build_ms = start.elapsed().as_millis() as u64;
    crate::phases::mark("build model");

    let start = Instant::now();
    let mut written = Vec::new();
    for k in 0..s.images {
        let req = ImageRequest {
            prompt: prompt.clone(),
            negative_prompt: negative_prompt.clone(),
            steps: s.steps,
            guidance_scale,
            width,
            height,
            seed: s.seed + k as u64,
            init: init.clone().map(|img| (img, s.strength)),
        };
        let total = pipeline.denoising_steps(&req).map_err(|e| fail(e.into()))?;
        let what = if s.images > 1 { format!("{}: image {} of {}", step.name, k + 1, s.images) } else { format!("{}: denoising", step.name) };
        let mut bar = mora_common::progress::StepProgress::new("mora-exec", what, total);
        let image = pipeline.generate(&req, &mut |done| bar.step(done)).map_err(|e| fail(e.into()))?;
        bar.finish();
        let (png, json) = image_paths(step.output, k, s.images);
        write_bytes_atomically(&png, &png_bytes(&image).map_err(|e| fail(e.into()))?)?;
        let mut doc = serde_json::json!({
            "image": png.file_name().map(|f| f.to_string_lossy().to_string()),
            "pipeline": parts.first().map(|(_, w, _)| pipeline_name(&w.name)),
            "class_name": class_name,
            "components": identities,
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "seed": req.seed,
            "steps": req.steps,
            "denoising_steps": total,
            "guidance_scale": guidance_scale,
            "scheduler": scheduler_class,
            "width": width,
            "height": height,
            "noise": "mora xoshiro256** (seeded by splitmix64), Box-Muller",
        });
        if !step.loras.is_empty() {
            doc["loras"] = crate::lora::report(step.loras);
        }
        if let Some(init) = &s.init_image {
            doc["init_image"] = serde_json::json!(match init {
                InitImage::File(p) => p.display().to_string(),
                InitImage::Step(from) => format!("steps.{from}"),
            });
            doc["strength"] = serde_json::json!(s.strength);
        }
        write_json(&json, &doc)?;
        written.push(png);
    }
    let run_ms = start.elapsed().as_millis() as u64;
    crate::phases::mark("inference");
    results.images.insert(step.name.to_string(), written);
    Ok(StepReport {
        step: step.name.to_string(),
        items: s.images,
        unit: "images",
        output: step.output.to_path_buf(),
        run_ms,
        what: StepKind::pipeline(parts, build_ms),
    })
}

/// A component's weights with a step's LoRA updates: the targeted tensors
/// are private copies with the updates added, the rest the component's own.
struct Adapted<'w> {
    weights: &'w Weights,
    deltas: mora_models::lora::Deltas,
}

impl ComponentWeights for Adapted<'_> {
    fn device(&self) -> &candle_core::Device {
        ComponentWeights::device(self.weights)
    }

    fn held_dtype(&self) -> candle_core::DType {
        ComponentWeights::held_dtype(self.weights)
    }

    fn var_builder(&self, compute: candle_core::DType) -> candle_nn::VarBuilder<'static> {
        mora_models::lora::merged(self.weights.var_builder(compute), self.deltas.clone())
    }
}

/// The pipeline a component's name belongs to (`org/sd` of `org/sd/unet`).
fn pipeline_name(component: &str) -> String {
    let (base, rev) = match component.split_once('@') {
        Some((b, r)) => (b, Some(r)),
        None => (component, None),
    };
    let base = base.rsplit_once('/').map_or(base, |(p, _)| p);
    match rev {
        Some(r) => format!("{base}@{r}"),
        None => base.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_images_are_numbered_from_one_each_with_its_json() {
        let out = Path::new("out/cat.png");
        assert_eq!(image_paths(out, 0, 1), (PathBuf::from("out/cat.png"), PathBuf::from("out/cat.json")));
        assert_eq!(image_paths(out, 1, 3), (PathBuf::from("out/cat-2.png"), PathBuf::from("out/cat-2.json")));
        assert_eq!(pipeline_name("org/sd/unet@v2"), "org/sd@v2");
        assert_eq!(pipeline_name("/m/sd/vae"), "/m/sd");
    }
}
