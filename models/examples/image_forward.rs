//! Runs one image component's forward in a loop, for a profiler to watch:
//!
//!     cargo run --release -p mora-models --example image_forward -- PIPELINE unet 64 3
//!     perf record -F 250 -g -- target/release/examples/image_forward PIPELINE vae_decoder 64 3
//!
//! COMPONENT is `text_encoder`, `unet` (batch 2, 77-token context) or
//! `vae_decoder` (one latent); LATENT the latent side; the forward runs once
//! to warm up and then REPEATS times, each printed in milliseconds. Weights
//! are read from the pipeline's safetensors into f32, as `--no-cache` does.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mora_models::image::clip::TextEncoder;
use mora_models::image::pipeline::PipelineConfig;
use mora_models::image::unet::UNet;
use mora_models::image::vae::Vae;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn weights(root: &Path, component: &str) -> VarBuilder<'static> {
    let dir = root.join(component);
    let files: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("component folder").flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
    // SAFETY: the pipeline's files are not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.expect("weights")
}

fn main() -> candle_core::Result<()> {
    // As `mora-exec` does, before any thread starts.
    mora_models::threads::settle();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, component, latent, repeats] = args.as_slice() else {
        eprintln!("usage: image_forward PIPELINE text_encoder|unet|vae_decoder LATENT REPEATS");
        std::process::exit(2);
    };
    let root = Path::new(root);
    let (latent, repeats): (usize, usize) = (latent.parse().expect("LATENT"), repeats.parse().expect("REPEATS"));
    let cfg = PipelineConfig::read(root, None).unwrap_or_else(|e| panic!("{e}"));
    let cpu = &Device::Cpu;
    let f: Box<dyn Fn() -> candle_core::Result<Tensor>> = match component.as_str() {
        "text_encoder" => {
            let text = &cfg.text[0].config;
            let enc = TextEncoder::new(weights(root, "text_encoder"), text)?;
            let ids: Vec<u32> = (0..2 * 77u32).map(|i| (i * 7919) % text.vocab_size as u32).collect();
            let ids = Tensor::from_vec(ids, (2, 77), cpu)?;
            Box::new(move || Ok(enc.forward(&ids)?.last_hidden_state))
        }
        "unet" => {
            let unet = UNet::new(weights(root, "unet"), &cfg.unet)?;
            let sample = Tensor::randn(0f32, 1.0, (2, cfg.unet.in_channels, latent, latent), cpu)?;
            let context = Tensor::randn(0f32, 1.0, (2, 77, cfg.unet.cross_attention_dim), cpu)?;
            Box::new(move || unet.forward(&sample, 999.0, &context, None))
        }
        "vae_decoder" => {
            let vae = Vae::new(weights(root, "vae"), &cfg.vae)?;
            let z = Tensor::randn(0f32, 1.0, (1, cfg.vae.latent_channels, latent, latent), cpu)?;
            Box::new(move || vae.decode(&z))
        }
        other => panic!("unknown component {other}"),
    };
    f()?;
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        println!("{component} {latent}x{latent}: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
