//! A Stable Diffusion pipeline run end to end, as diffusers'
//! `StableDiffusionPipeline`, `StableDiffusionXLPipeline` and their
//! image-to-image variants run it: the prompt through the text encoder(s),
//! the denoising loop of UNet and scheduler with classifier-free guidance,
//! and the VAE's decode to pixels.
//!
//! Noise comes from Mora's own seeded generator on the host ([`Noise`]), so
//! a seed gives the same image on every run, cold, warm or `--no-cache`, and
//! on any device (not the image torch's generator would give: the networks
//! match diffusers, the random numbers are Mora's).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use candle_nn::VarBuilder;
use mora_tokenizers::clip::ClipTokenizer;

use super::clip::{TextEncoder, TextEncoderConfig};
use super::scheduler::{img2img_start, SchedulerSpec};
use super::unet::{AddedConditions, UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use mora_common::pipeline::PipelineIndex;

/// The pipeline classes Mora runs, by `model_index.json`'s `_class_name`.
const SD_CLASSES: &[&str] = &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"];
const SDXL_CLASSES: &[&str] = &["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x, 2.x and SD-Turbo: one text encoder, its last hidden state.
    Sd,
    /// SDXL and SDXL-Turbo: two text encoders' penultimate states, the second's
    /// pooled embedding and the size conditioning.
    Sdxl,
}

/// Why a pipeline cannot be read, built or run; each message names the file
/// or the setting and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The pipeline's files: missing, unreadable, or a combination Mora does
    /// not run.
    #[error("{0}")]
    Layout(String),
    /// A request the pipeline cannot honour (a size, a strength).
    #[error("{0}")]
    Request(String),
    /// A component's network does not build on its weights.
    #[error("{component}: {source}")]
    Build { component: &'static str, source: candle_core::Error },
    /// The computation failed.
    #[error(transparent)]
    Compute(#[from] candle_core::Error),
}

/// A text encoder and its tokenizer, as read from their folders.
pub struct TextPart {
    /// `text_encoder` or `text_encoder_2`.
    pub component: &'static str,
    pub config: TextEncoderConfig,
    pub tokenizer: ClipTokenizer,
}

/// Everything a pipeline's files say, read before any weight is: what
/// `mora-exec check` verifies.
pub struct PipelineConfig {
    pub root: PathBuf,
    pub class_name: String,
    pub family: Family,
    pub text: Vec<TextPart>,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerSpec,
    /// SDXL: an absent negative prompt is zeros, not the empty prompt encoded.
    pub force_zeros_for_empty_prompt: bool,
}

impl PipelineConfig {
    /// Reads the pipeline at `root`; `scheduler` overrides the class of
    /// `scheduler/scheduler_config.json`. Errors are one line naming the file.
    pub fn read(root: &Path, scheduler: Option<&str>) -> Result<PipelineConfig, PipelineError> {
        let index_path = root.join(mora_common::model::PIPELINE_INDEX);
        let index = PipelineIndex::read(root).map_err(|e| PipelineError::Layout(e.to_string()))?.ok_or_else(|| {
            PipelineError::Layout(format!("{} holds no model_index.json: not a diffusers pipeline (an image step needs one)", root.display()))
        })?;
        let family = if SD_CLASSES.contains(&index.class_name.as_str()) {
            Family::Sd
        } else if SDXL_CLASSES.contains(&index.class_name.as_str()) {
            Family::Sdxl
        } else {
            let known: Vec<&str> = SD_CLASSES.iter().chain(SDXL_CLASSES).copied().collect();
            return Err(PipelineError::Layout(format!(
                "{}: `_class_name` is `{}`, which Mora does not run (it runs {})",
                index_path.display(),
                index.class_name,
                known.join(", ")
            )));
        };
        let needed: &[&'static str] = match family {
            Family::Sd => &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
            Family::Sdxl => &["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"],
        };
        for c in needed {
            if !index.components.contains_key(*c) {
                return Err(PipelineError::Layout(format!(
                    "{}: the pipeline has no `{c}`, which a {} needs (an SDXL refiner, which has none, is not supported)",
                    index_path.display(),
                    index.class_name
                )));
            }
            if !root.join(c).is_dir() {
                return Err(PipelineError::Layout(format!("{}: component `{c}` is listed but its folder {} is missing", index_path.display(), root.join(c).display())));
            }
        }
        let setting = |key: &str| index.settings.get(key).and_then(|v| v.as_bool());
        let force_zeros_for_empty_prompt = setting("force_zeros_for_empty_prompt").unwrap_or(family == Family::Sdxl);
        if setting("requires_aesthetics_score") == Some(true) {
            return Err(PipelineError::Layout(format!("{}: `requires_aesthetics_score` is true (an SDXL refiner): not supported", index_path.display())));
        }
        let text_components: &[(&'static str, &'static str)] = match family {
            Family::Sd => &[("text_encoder", "tokenizer")],
            Family::Sdxl => &[("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")],
        };
        let mut text = Vec::new();
        for (enc, tok) in text_components {
            let class = index.components.get(*enc).map(|(_, c)| c.as_str());
            let config = TextEncoderConfig::from_file_with_class(&root.join(enc).join("config.json"), class).map_err(|e| PipelineError::Layout(e.to_string()))?;
            let tokenizer = ClipTokenizer::from_dir(&root.join(tok)).map_err(|e| PipelineError::Layout(e.to_string()))?;
            text.push(TextPart { component: enc, config, tokenizer });
        }
        let unet = UNetConfig::from_file(&root.join("unet").join("config.json")).map_err(|e| PipelineError::Layout(e.to_string()))?;
        let vae = VaeConfig::from_file(&root.join("vae").join("config.json")).map_err(|e| PipelineError::Layout(e.to_string()))?;
        let scheduler = SchedulerSpec::from_file(&root.join("scheduler").join("scheduler_config.json"), scheduler).map_err(|e| PipelineError::Layout(e.to_string()))?;
        let cfg = PipelineConfig { root: root.to_path_buf(), class_name: index.class_name, family, text, unet, vae, scheduler, force_zeros_for_empty_prompt };
        cfg.check_shapes()?;
        Ok(cfg)
    }

    /// The components' configs agree with one another.
    fn check_shapes(&self) -> Result<(), PipelineError> {
        let unet_file = self.root.join("unet").join("config.json");
        let context: usize = match self.family {
            Family::Sd => self.text[0].config.hidden_size,
            Family::Sdxl => self.text.iter().map(|t| t.config.hidden_size).sum(),
        };
        if context != self.unet.cross_attention_dim {
            return Err(PipelineError::Layout(format!(
                "{}: `cross_attention_dim` is {} but the text encoder(s) give {context}",
                unet_file.display(),
                self.unet.cross_attention_dim
            )));
        }
        if self.unet.in_channels != self.vae.latent_channels {
            return Err(PipelineError::Layout(format!(
                "{}: `in_channels` is {} but the VAE's latents have {} channels",
                unet_file.display(),
                self.unet.in_channels,
                self.vae.latent_channels
            )));
        }
        match (self.family, &self.unet.addition) {
            (Family::Sdxl, Some(add)) => {
                let pooled = self.text[1].config.projection_dim.ok_or_else(|| {
                    PipelineError::Layout(format!(
                        "{}: SDXL's second text encoder must be a CLIPTextModelWithProjection",
                        self.root.join("text_encoder_2").join("config.json").display()
                    ))
                })?;
                let expected = pooled + 6 * add.time_embed_dim;
                if add.projection_input_dim != expected {
                    return Err(PipelineError::Layout(format!(
                        "{}: `projection_class_embeddings_input_dim` is {} but the pooled text ({pooled}) and six size ids give {expected}",
                        unet_file.display(),
                        add.projection_input_dim
                    )));
                }
            }
            (Family::Sdxl, None) => {
                return Err(PipelineError::Layout(format!("{}: an SDXL UNet needs `addition_embed_type = \"text_time\"`", unet_file.display())))
            }
            (Family::Sd, Some(_)) => {
                return Err(PipelineError::Layout(format!("{}: `addition_embed_type` is set, which a {} does not feed", unet_file.display(), self.class_name)))
            }
            (Family::Sd, None) => {}
        }
        Ok(())
    }

    /// diffusers' default image side: the UNet's `sample_size` in pixels.
    pub fn default_size(&self) -> usize {
        self.unet.sample_size * self.vae.downscale
    }

    /// diffusers' default `guidance_scale` for this pipeline class.
    pub fn default_guidance(&self) -> f64 {
        match self.family {
            Family::Sd => 7.5,
            Family::Sdxl => 5.0,
        }
    }

    /// Components with weights, in the order they are acquired.
    pub fn components(&self) -> Vec<&'static str> {
        let mut c: Vec<&'static str> = self.text.iter().map(|t| t.component).collect();
        c.extend(["unet", "vae"]);
        c
    }

    /// Checks a requested size: a multiple of what the VAE and the UNet's
    /// down-sampling need.
    pub fn check_size(&self, width: usize, height: usize) -> Result<(), PipelineError> {
        let m = self.vae.downscale;
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % m != 0 {
                return Err(PipelineError::Request(format!("`{name}` is {v}: it must be a positive multiple of {m} (the VAE's scale)")));
            }
        }
        Ok(())
    }
}

/// What one image is made from.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// Image-to-image: the starting picture (RGB, `width` × `height`) and how
    /// much of it to repaint (0 keeps it, 1 ignores it).
    pub init: Option<(RgbImage, f64)>,
}

/// 8-bit RGB pixels, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// One component's weights as a pipeline builds on them, wherever they
/// live: a lent segment, lent GPU memory, files read in-process.
pub trait ComponentWeights {
    /// The device the weights are on; the pipeline computes there.
    fn device(&self) -> &Device;
    /// The dtype the weights are held in; on a GPU the pipeline computes in it.
    fn held_dtype(&self) -> DType;
    /// The weights, each tensor given in `compute`.
    fn var_builder(&self, compute: DType) -> VarBuilder<'static>;
}

/// The pipeline with its networks built on lent (or loaded) weights.
pub struct Pipeline {
    pub config: PipelineConfig,
    encoders: Vec<TextEncoder>,
    unet: UNet,
    vae: Vae,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
}

impl Pipeline {
    /// Builds the networks; `weights(component)` gives each component's weights.
    pub fn build<'w, W: ComponentWeights + 'w>(config: PipelineConfig, weights: impl Fn(&str) -> &'w W) -> Result<Pipeline, PipelineError> {
        let unet_w = weights("unet");
        let device = unet_w.device().clone();
        // f32 on the CPU; on a GPU the dtype the weights are held in, with
        // the VAE in f32 when its config asks (`force_upcast`: SD's VAE
        // overflows in f16).
        let dtype = if device.is_cpu() { DType::F32 } else { unet_w.held_dtype() };
        let vae_dtype = if config.vae.force_upcast { DType::F32 } else { dtype };
        let mut encoders = Vec::new();
        for part in &config.text {
            let w = weights(part.component);
            encoders.push(TextEncoder::new(w.var_builder(dtype), &part.config).map_err(|source| PipelineError::Build { component: part.component, source })?);
        }
        let unet = UNet::new(unet_w.var_builder(dtype), &config.unet).map_err(|source| PipelineError::Build { component: "unet", source })?;
        let vae = Vae::new(weights("vae").var_builder(vae_dtype), &config.vae).map_err(|source| PipelineError::Build { component: "vae", source })?;
        Ok(Pipeline { config, encoders, unet, vae, device, dtype, vae_dtype })
    }

    /// Encodes `text` with every text encoder: (prompt embeddings, pooled
    /// embedding for SDXL).
    fn encode(&self, text: &str) -> Result<(Tensor, Option<Tensor>), PipelineError> {
        let mut states = Vec::new();
        let mut pooled = None;
        for (part, enc) in self.config.text.iter().zip(&self.encoders) {
            let ids = part.tokenizer.encode(text).map_err(|e| PipelineError::Request(e.to_string()))?;
            let n = ids.len();
            let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
            let out = enc.forward(&ids)?;
            match self.config.family {
                Family::Sd => states.push(out.last_hidden_state),
                Family::Sdxl => {
                    states.push(out.penultimate);
                    pooled = Some(out.pooled);
                }
            }
        }
        let embeds = Tensor::cat(&states, 2)?.to_dtype(self.dtype)?;
        Ok((embeds, pooled.map(|p| p.to_dtype(self.dtype)).transpose()?))
    }

    /// Makes one image, its noise drawn from `Noise::new(req.seed)`.
    /// `progress(k)` is called after denoising step k (1-based) of
    /// `denoising_steps(req)`.
    pub fn generate(&self, req: &ImageRequest, progress: &mut dyn FnMut(usize)) -> Result<RgbImage, PipelineError> {
        let mut noise = Noise::new(req.seed);
        let latents = self.denoise(req, &mut |n| noise.normals(n), progress)?;
        self.decode(&latents)
    }

    /// The prompt encoded and the denoising loop run, to the final latents.
    /// `normals(n)` gives n standard-normal numbers; it is asked, in this
    /// order, for the initial latents (text to image) or the noise added to
    /// the starting picture's latents (image to image), then for the VAE
    /// encoder's sample (image to image), then for each stochastic scheduler
    /// step's noise.
    fn denoise(&self, req: &ImageRequest, normals: &mut dyn FnMut(usize) -> Vec<f32>, progress: &mut dyn FnMut(usize)) -> Result<Tensor, PipelineError> {
        self.config.check_size(req.width, req.height)?;
        let guided = req.guidance_scale > 1.0;
        let (cond, cond_pooled) = self.encode(&req.prompt)?;
        let (context, pooled) = if guided {
            let zeros = req.negative_prompt.is_none() && self.config.family == Family::Sdxl && self.config.force_zeros_for_empty_prompt;
            let (uncond, uncond_pooled) = if zeros {
                (cond.zeros_like()?, cond_pooled.as_ref().map(|p| p.zeros_like()).transpose()?)
            } else {
                self.encode(req.negative_prompt.as_deref().unwrap_or(""))?
            };
            let context = Tensor::cat(&[&uncond, &cond], 0)?;
            let pooled = match (uncond_pooled, cond_pooled) {
                (Some(u), Some(c)) => Some(Tensor::cat(&[&u, &c], 0)?),
                _ => None,
            };
            (context, pooled)
        } else {
            (cond, cond_pooled)
        };
        let batch = if guided { 2 } else { 1 };
        let added = match pooled {
            Some(text_embeds) => {
                let (h, w) = (req.height as f32, req.width as f32);
                let ids: Vec<f32> = (0..batch).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
                let time_ids = Tensor::from_vec(ids, (batch, 6), &self.device)?.to_dtype(self.dtype)?;
                Some(AddedConditions { text_embeds, time_ids })
            }
            None => None,
        };

        let mut scheduler = self.config.scheduler.build(req.steps).map_err(|e| PipelineError::Request(e.to_string()))?;
        let scale = self.config.vae.downscale;
        let shape = (1, self.config.unet.in_channels, req.height / scale, req.width / scale);
        let mut draw = |shape: &candle_core::Shape| -> candle_core::Result<Tensor> {
            let n = shape.elem_count();
            Tensor::from_vec(normals(n), shape.clone(), &self.device)?.to_dtype(self.dtype)
        };
        let initial = draw(&shape.into())?;
        let (mut latents, begin) = match &req.init {
            None => ((initial * scheduler.init_noise_sigma())?, 0),
            Some((image, strength)) => {
                let begin = img2img_start(req.steps, *strength, scheduler.order());
                if begin >= scheduler.timesteps().len() {
                    return Err(PipelineError::Request(format!("`strength` {strength} leaves no denoising step out of {}: raise it or `steps`", req.steps)));
                }
                let x = self.pixels_to_tensor(image)?;
                let (mean, std) = self.vae.encode(&x)?;
                let sample = draw(mean.shape())?.to_dtype(self.vae_dtype)?;
                let z = (mean + (std * sample)?)?;
                let z = match self.config.vae.shift_factor {
                    Some(shift) => (z - shift)?,
                    None => z,
                };
                let z = (z * self.config.vae.scaling_factor)?.to_dtype(self.dtype)?;
                (scheduler.add_noise(&z, &initial, begin)?, begin)
            }
        };
        let timesteps: Vec<f64> = scheduler.timesteps()[begin..].to_vec();
        for (k, &t) in timesteps.iter().enumerate() {
            let i = begin + k;
            let input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = scheduler.scale_model_input(&input, i)?;
            let pred = self.unet.forward(&input, t, &context, added.as_ref())?;
            let pred = if guided {
                let parts = pred.chunk(2, 0)?;
                let (uncond, cond) = (&parts[0], &parts[1]);
                (uncond + ((cond - uncond)? * req.guidance_scale)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, &mut draw)?;
            progress(k + 1);
        }
        Ok(latents)
    }

    /// How many times the UNet runs for `req` (the progress bar's length).
    pub fn denoising_steps(&self, req: &ImageRequest) -> Result<usize, PipelineError> {
        let scheduler = self.config.scheduler.build(req.steps).map_err(|e| PipelineError::Request(e.to_string()))?;
        let begin = match &req.init {
            None => 0,
            Some((_, strength)) => img2img_start(req.steps, *strength, scheduler.order()),
        };
        Ok(scheduler.timesteps().len().saturating_sub(begin))
    }

    /// Latents to pixels, as diffusers' VAE decode and image processor do.
    fn decode(&self, latents: &Tensor) -> Result<RgbImage, PipelineError> {
        let z = (latents.to_dtype(self.vae_dtype)? / self.config.vae.scaling_factor)?;
        let z = match self.config.vae.shift_factor {
            Some(shift) => (z + shift)?,
            None => z,
        };
        let x = self.vae.decode(&z)?;
        let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let x = (x * 255.0)?.round()?;
        let (_, _, height, width) = x.dims4()?;
        let hwc = x.squeeze(0)?.permute((1, 2, 0))?.to_dtype(DType::U8)?;
        let pixels = hwc.flatten_all()?.to_vec1::<u8>()?;
        Ok(RgbImage { width, height, pixels })
    }

    /// Pixels to the VAE's input: [1, 3, H, W] in [-1, 1].
    fn pixels_to_tensor(&self, image: &RgbImage) -> Result<Tensor, PipelineError> {
        let floats: Vec<f32> = image.pixels.iter().map(|&p| p as f32 / 255.0 * 2.0 - 1.0).collect();
        Tensor::from_vec(floats, (image.height, image.width, 3), &Device::Cpu)
            .and_then(|t| t.permute((2, 0, 1)))
            .and_then(|t| t.unsqueeze(0))
            .and_then(|t| t.to_device(&self.device))
            .and_then(|t| t.to_dtype(self.vae_dtype))
            .map_err(PipelineError::Compute)
    }
}

/// Mora's seeded standard-normal noise: xoshiro256** seeded by SplitMix64,
/// Box-Muller in f64. The same seed gives the same numbers on every
/// machine and device.
pub struct Noise {
    s: [u64; 4],
    spare: Option<f64>,
}

impl Noise {
    pub fn new(seed: u64) -> Noise {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Noise { s: [next(), next(), next(), next()], spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform number in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }
}

/// Why a PNG cannot be written or read; a read error names the file.
#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error(transparent)]
    Encode(#[from] png::EncodingError),
    #[error("{}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{}: not a readable PNG: {source}", path.display())]
    Decode { path: PathBuf, source: png::DecodingError },
    #[error("{}: an indexed PNG was not expanded", path.display())]
    Indexed { path: PathBuf },
}

/// Encodes `image` as a PNG (8-bit RGB, no metadata: the same pixels give
/// the same bytes).
pub fn png_bytes(image: &RgbImage) -> Result<Vec<u8>, PngError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(&image.pixels)?;
    }
    Ok(out)
}

/// Reads a PNG as 8-bit RGB (alpha dropped, grey expanded).
pub fn read_png(path: &Path) -> Result<RgbImage, PngError> {
    let file = std::fs::File::open(path).map_err(|source| PngError::Open { path: path.to_path_buf(), source })?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let unreadable = |source| PngError::Decode { path: path.to_path_buf(), source };
    let mut reader = decoder.read_info().map_err(unreadable)?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(unreadable)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let data = &buf[..info.buffer_size()];
    let pixels: Vec<u8> = match info.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => data.chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        png::ColorType::Indexed => return Err(PngError::Indexed { path: path.to_path_buf() }),
    };
    Ok(RgbImage { width: w, height: h, pixels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_standard_normal_and_fixed_by_its_seed() {
        let a = Noise::new(7).normals(20_000);
        assert_eq!(a, Noise::new(7).normals(20_000));
        assert_ne!(a[..8], Noise::new(8).normals(8)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, variance {var}");
    }

    /// A component's files read into f32 tensors on the CPU, with LoRA
    /// updates over them when `deltas` has any.
    struct Files(std::collections::HashMap<String, Tensor>, crate::lora::Deltas);
    impl ComponentWeights for Files {
        fn device(&self) -> &Device {
            &Device::Cpu
        }
        fn held_dtype(&self) -> DType {
            DType::F32
        }
        fn var_builder(&self, compute: DType) -> VarBuilder<'static> {
            crate::lora::merged(VarBuilder::from_tensors(self.0.clone(), compute, &Device::Cpu), self.1.clone())
        }
    }

    impl Files {
        fn shapes(&self) -> std::collections::HashMap<String, Vec<usize>> {
            self.0.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect()
        }
    }

    /// A LoRA parity fixture (`tests/fixtures/lora/NAME.json`): the fixtures
    /// folder, the reference's document, and its base pipeline's root and
    /// config.
    fn lora_fixture(name: &str) -> (std::path::PathBuf, serde_json::Value, std::path::PathBuf, PipelineConfig) {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("lora").join(name)).unwrap()).unwrap();
        let root = fixtures.join(doc["base"].as_str().unwrap());
        let config = PipelineConfig::read(&root, None).unwrap();
        (fixtures, doc, root, config)
    }

    /// The first row of the token ids under `key` in a fixture's document, as a (1, n) tensor.
    fn fixture_ids(doc: &serde_json::Value, key: &str) -> Tensor {
        let ids: Vec<u32> = doc[key][0].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap()
    }

    /// Component `c` of the pipeline at `root`, with `adapter` (if any) applied at `scale`.
    fn adapted_files(root: &std::path::Path, c: &str, adapter: Option<&crate::lora::Adapter>, scale: f64) -> Files {
        let mut files = read_files(mora_common::ModelSource::dir(root).component(c));
        if let Some(a) = adapter {
            a.resolve(c, c, &files.shapes(), scale, &mut files.1).unwrap();
        }
        files
    }

    fn read_files(source: mora_common::ModelSource) -> Files {
        let mut tensors = std::collections::HashMap::new();
        for file in source.resolve().unwrap().weights {
            for (name, t) in candle_core::safetensors::load(&file, &Device::Cpu).unwrap() {
                let t = if t.dtype().is_float() { t.to_dtype(DType::F32).unwrap() } else { t };
                tensors.insert(name, t);
            }
        }
        Files(tensors, Default::default())
    }

    /// Replays one recorded diffusers run (`runs.json`'s form) on `parts`.
    fn replay(run: &serde_json::Value, config: PipelineConfig, parts: &[(&str, Files)]) {
        use crate::image::testing::{assert_close, ref_tensor};
        let name = run["name"].as_str().unwrap();
        let pipeline = Pipeline::build(config, |c| &parts.iter().find(|(n, _)| *n == c).unwrap().1).unwrap();
        let (width, height) = (run["width"].as_u64().unwrap() as usize, run["height"].as_u64().unwrap() as usize);
        let init = run["init_image"].as_array().map(|px| {
            let pixels = px.iter().map(|v| v.as_u64().unwrap() as u8).collect();
            (RgbImage { width, height, pixels }, run["strength"].as_f64().unwrap())
        });
        let req = ImageRequest {
            prompt: run["prompt"].as_str().unwrap().to_string(),
            negative_prompt: run["negative_prompt"].as_str().map(str::to_string),
            steps: run["steps"].as_u64().unwrap() as usize,
            guidance_scale: run["guidance_scale"].as_f64().unwrap(),
            width,
            height,
            seed: 0,
            init,
        };
        let mut draws = run["draws"].as_array().unwrap().iter().map(|d| ref_tensor(d).flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let mut taken = 0;
        let mut normals = |n: usize| {
            let d = draws.next().unwrap_or_else(|| panic!("{name}: Mora drew more often than diffusers"));
            assert_eq!(d.len(), n, "{name}: draw {taken} has another shape");
            taken += 1;
            d
        };
        let mut steps = 0;
        let latents = pipeline.denoise(&req, &mut normals, &mut |k| steps = k).unwrap();
        assert_eq!(taken, run["draws"].as_array().unwrap().len(), "{name}: Mora drew less often than diffusers");
        assert_eq!(steps, pipeline.denoising_steps(&req).unwrap(), "{name}");
        assert_close(&format!("{name} latents"), &latents, &ref_tensor(&run["latents"]), 1e-4);
        let image = pipeline.decode(&latents).unwrap();
        assert_eq!((image.width, image.height), (width, height), "{name}");
        let want = ref_tensor(&run["image"]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(image.pixels.len(), want.len(), "{name}");
        let mut off = 0;
        for (i, (&got, &w)) in image.pixels.iter().zip(&want).enumerate() {
            let exact = (w * 255.0).round();
            if got as f32 != exact {
                let boundary = ((w * 255.0).fract() - 0.5).abs() < 0.05;
                assert!(boundary && (got as f32 - exact).abs() <= 1.0, "{name}: pixel {i} is {got}, diffusers {}", w * 255.0);
                off += 1;
            }
        }
        eprintln!("{name}: {} of {} pixel values equal diffusers' rounded", want.len() - off, want.len());
    }

    /// Whole runs of diffusers' own pipelines on the fixture pipelines
    /// (tests/fixtures/image/pipelines/runs.json, written by
    /// scripts/golden/make_pipeline_fixtures.py), replayed with diffusers'
    /// random draws: the final latents agree within 1e-4 of their largest
    /// value, and every pixel is diffusers' float rounded to 8 bits, give or
    /// take one level where the float lies within 0.05 of a level of a rounding
    /// boundary.
    #[test]
    fn every_fixture_run_matches_diffusers() {
        use crate::image::testing::fixture_dir;
        use mora_common::ModelSource;
        let path = fixture_dir("runs.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let runs = doc["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 6);
        for run in runs {
            let root = fixture_dir(run["pipeline"].as_str().unwrap());
            let config = PipelineConfig::read(&root, run["scheduler"].as_str()).unwrap();
            let parts: Vec<(&str, Files)> = config.components().into_iter().map(|c| (c, read_files(ModelSource::dir(&root).component(c)))).collect();
            replay(run, config, &parts);
        }
    }

    /// The LoRA fixtures (tests/fixtures/lora, written by
    /// scripts/golden/make_lora_fixtures.py): an SD 1.5 adapter written by
    /// diffusers' `save_lora_weights` (rank and alpha patterns in its
    /// metadata, a 1x1 convolution among its targets) and a Kohya file
    /// diffusers loads (LoCon on 3x3 convolutions, `text_model_` names), each
    /// at two scales: the UNet's and the text encoder's outputs as diffusers
    /// computes them after `load_lora_weights` and `set_adapters`, within
    /// the parity tolerance, and whole runs as above. The base's outputs
    /// are checked too, and each adapter is checked to change them.
    #[test]
    fn lora_adapters_match_diffusers_load_lora_weights() {
        use crate::image::clip::TextEncoder;
        use crate::image::testing::{assert_close, ref_tensor, TOL};
        use crate::image::unet::UNet;
        use crate::lora::Adapter;
        let (fixtures, doc, root, config) = lora_fixture("sd15.json");
        let with = |adapter: Option<&str>, scale: f64| -> Vec<(&'static str, Files)> {
            let read = adapter.map(|a| Adapter::read(&fixtures.join("lora").join(a)).unwrap());
            config.components().into_iter().map(|c| (c, adapted_files(&root, c, read.as_ref(), scale))).collect()
        };
        let input = &doc["unet_input"];
        let (sample, context) = (ref_tensor(&input["sample"]), ref_tensor(&input["context"]));
        let ids = fixture_ids(&doc, "text_input_ids");
        let base = with(None, 1.0);
        let mut changed = 0;
        for case in doc["cases"].as_array().unwrap() {
            let (adapter, scale) = (case["adapter"].as_str(), case["scale"].as_f64().unwrap());
            let what = format!("{} x{scale}", adapter.unwrap_or("base"));
            let parts = with(adapter, scale);
            let part = |c: &str| &parts.iter().find(|(n, _)| *n == c).unwrap().1;
            let unet = UNet::new(part("unet").var_builder(DType::F32), &config.unet).unwrap();
            let out = unet.forward(&sample, input["timestep"].as_f64().unwrap(), &context, None).unwrap();
            assert_close(&format!("{what}: unet"), &out, &ref_tensor(&case["unet"]), TOL);
            let enc = TextEncoder::new(part("text_encoder").var_builder(DType::F32), &config.text[0].config).unwrap();
            let hidden = enc.forward(&ids).unwrap().last_hidden_state;
            assert_close(&format!("{what}: text encoder"), &hidden, &ref_tensor(&case["text_encoder"]), TOL);
            if adapter.is_some() {
                // The adapter moves both outputs well beyond the tolerance.
                let base_unet = UNet::new(base.iter().find(|(n, _)| *n == "unet").unwrap().1.var_builder(DType::F32), &config.unet).unwrap();
                let moved = (out - base_unet.forward(&sample, input["timestep"].as_f64().unwrap(), &context, None).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(moved > 1e-2, "{what}: the adapter barely changes the UNet ({moved})");
                changed += 1;
            }
        }
        assert_eq!(changed, 4);
        let runs = doc["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 3);
        for run in runs {
            let parts = with(run["adapter"].as_str(), run["lora_scale"].as_f64().unwrap());
            replay(run, PipelineConfig::read(&root, run["scheduler"].as_str()).unwrap(), &parts);
        }
    }

    /// An SDXL Kohya LoRA named after the original (sgm) UNet's modules, as
    /// kohya-ss writes SDXL LoRAs (LoCon on 3x3 convolutions, a
    /// downsampler, a time-embedding projection, a shortcut, both text
    /// encoders; tests/fixtures/lora/sdxl.json): the UNet's and both text
    /// encoders' outputs as diffusers computes them after
    /// `load_lora_weights`, at two scales.
    #[test]
    fn an_sdxl_lora_in_sgm_names_matches_diffusers_load_lora_weights() {
        use crate::image::clip::TextEncoder;
        use crate::image::testing::{assert_close, ref_tensor, TOL};
        use crate::image::unet::{AddedConditions, UNet};
        use crate::lora::Adapter;
        let (fixtures, doc, root, config) = lora_fixture("sdxl.json");
        let input = &doc["unet_input"];
        let (sample, context) = (ref_tensor(&input["sample"]), ref_tensor(&input["context"]));
        let added = AddedConditions { text_embeds: ref_tensor(&input["text_embeds"]), time_ids: ref_tensor(&input["time_ids"]) };
        for case in doc["cases"].as_array().unwrap() {
            let (adapter, scale) = (case["adapter"].as_str(), case["scale"].as_f64().unwrap());
            let what = format!("{} x{scale}", adapter.unwrap_or("base"));
            let read = adapter.map(|a| Adapter::read(&fixtures.join("lora").join(a)).unwrap());
            let part = |c: &str| {
                let files = adapted_files(&root, c, read.as_ref(), scale);
                if read.is_some() && c == "unet" {
                    // Every module diffusers gave a LoRA layer gets its update.
                    let mut want: Vec<String> = doc["targets"][c].as_array().unwrap().iter().map(|t| format!("{}.weight", t.as_str().unwrap())).collect();
                    want.sort();
                    let mut got: Vec<String> = files.1.keys().cloned().collect();
                    got.sort();
                    assert_eq!(got, want, "{what}: targets");
                }
                files
            };
            let unet = UNet::new(part("unet").var_builder(DType::F32), &config.unet).unwrap();
            let out = unet.forward(&sample, input["timestep"].as_f64().unwrap(), &context, Some(&added)).unwrap();
            assert_close(&format!("{what}: unet"), &out, &ref_tensor(&case["unet"]), TOL);
            for (i, (c, key)) in [("text_encoder", "text_input_ids"), ("text_encoder_2", "text_input_ids_2")].into_iter().enumerate() {
                let enc = TextEncoder::new(part(c).var_builder(DType::F32), &config.text[i].config).unwrap();
                let hidden = enc.forward(&fixture_ids(&doc, key)).unwrap().last_hidden_state;
                assert_close(&format!("{what}: {c}"), &hidden, &ref_tensor(&case[c]), TOL);
            }
        }
    }

    #[test]
    fn a_png_reads_back_as_written() {
        let image = RgbImage { width: 3, height: 2, pixels: (0..18).map(|i| (i * 14) as u8).collect() };
        let bytes = png_bytes(&image).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let d = mora_test_support::Scratch::new("png");
        let p = d.join("image.png");
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read_png(&p).unwrap(), image);
        std::fs::write(&p, b"not a png").unwrap();
        assert!(read_png(&p).unwrap_err().to_string().contains("not a readable PNG"));
        let _ = std::fs::remove_file(&p);
    }
}
