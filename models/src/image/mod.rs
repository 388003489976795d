//! Image generation: Stable Diffusion pipelines in the layout diffusers
//! writes (`model_index.json` and one folder per component), run on candle.
//!
//! - [`clip`] is the CLIP text encoders;
//! - [`conv`], [`norm`] and [`attention`] are their convolution, group norm
//!   (with SiLU fused) and attention, with Mora's own CPU kernels, whose
//!   matrix products go through [`product`];
//! - [`unet`] is the denoising UNet (`UNet2DConditionModel`), SD 1.5, 2.1, XL and Turbo shapes;
//! - [`vae`] is the autoencoder (`AutoencoderKL`) that turns latents into pixels and back;
//! - [`scheduler`] is the noise schedulers, configured by `scheduler/scheduler_config.json`;
//! - [`pipeline`] reads a pipeline's files and runs prompt to pixels (text to image, image to image).
//!
//! Each component's config is read key by key from the files diffusers and
//! transformers write (`lm_config::Reader`): a key that changes the network
//! and that Mora cannot honour is refused with one line naming the file and
//! the key, never replaced by a default.

pub mod attention;
pub mod clip;
pub mod conv;
pub mod norm;
pub mod pipeline;
mod product;
pub mod scheduler;
pub mod synth;
#[cfg(test)]
pub(crate) mod testing;
pub mod unet;
pub mod vae;

/// Keys every diffusers config carries that do not change the network.
pub(crate) const DIFFUSERS_NEUTRAL: &[&str] = &["_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"];

/// Whether Mora's own CPU kernels run: `MORA_KERNELS=candle` runs candle's
/// ops instead, to compare the two on the same run (docs/benchmarks.md).
pub fn own_kernels() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| std::env::var("MORA_KERNELS").map_or(true, |v| v != "candle"))
}
