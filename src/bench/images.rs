//! The image scenarios: a pipeline's runs warm against `--no-cache` and its
//! components shared (7), and the same work against diffusers and torch (8).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mora_models::image::clip::TextEncoder;
use mora_models::image::pipeline::PipelineConfig;
use mora_models::image::unet::UNet;
use mora_models::image::vae::Vae;

use super::python::{Diffusers, ImageRequest};
use super::scenarios::{run_ok, toml_str};
use super::{fmt_bytes, fmt_ms, fmt_ratio, interleave, Config, Contender, Section, Stats, Table, Target};
use crate::{bin, Env};

/// A synthetic SD 1.5 pipeline of `size`, f16 on disk, written once.
pub(super) fn synth_pipeline(config: &Config, size: &str, seed: u64) -> Result<PathBuf, String> {
    let name = format!("sd15-f16-{size}-seed{seed}");
    let dir = config.model_dir.join(&name);
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    eprintln!("mora-bench: writing a synthetic f16 SD 1.5 pipeline of {size} into {}", dir.display());
    let tmp = config.model_dir.join(format!("{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    run_ok(Command::new(bin("mora-exec")).args(["synth", "--arch", "sd15", "--dtype", "f16", "--seed", &seed.to_string(), "--size", size, "-o"]).arg(&tmp))
        .map_err(|e| format!("synth {name}: {e}"))?;
    std::fs::rename(&tmp, &dir).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
    Ok(dir)
}

fn image_workflow(pipelines: &[(&str, &Path)], side: usize) -> String {
    let mut wf = "name = \"image\"\n".to_string();
    for (name, dir) in pipelines {
        wf.push_str(&format!("[models.{name}]\npath = {}\n", toml_str(dir)));
    }
    for (name, _) in pipelines {
        wf.push_str(&format!(
            "[[steps]]\nname = \"{name}-image\"\ntask = \"image\"\nmodel = \"{name}\"\nprompt = \"a lighthouse at dawn\"\n\
             steps = 1\nwidth = {side}\nheight = {side}\nseed = 1\noutput = \"{name}.png\"\n"
        ));
    }
    wf
}

/// Scenario 7: an image workflow repeated, warm against `--no-cache`, and two
/// pipelines that share components.
pub fn images(config: &Config) -> Result<Section, String> {
    let a = synth_pipeline(config, &config.image_pipeline, 1)?;
    // B: A with its own UNet (a fine-tune keeps its base's VAE and text encoder).
    let b = config.model_dir.join(format!("sd15-f16-{}-own-unet", config.image_pipeline));
    if !b.join("model_index.json").is_file() {
        let other = synth_pipeline(config, &config.image_pipeline, 2)?;
        let tmp = b.with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        run_ok(Command::new("cp").arg("-r").arg(&a).arg(&tmp))?;
        std::fs::remove_dir_all(tmp.join("unet")).map_err(|e| e.to_string())?;
        run_ok(Command::new("cp").arg("-r").arg(other.join("unet")).arg(tmp.join("unet")))?;
        std::fs::rename(&tmp, &b).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
    }
    let side = config.image_side;
    let env = Env::with_daemon("bench-images");
    let wf = env.workflow("image.toml", &image_workflow(&[("a", &a)], side));
    let warm_up = Instant::now();
    run_ok(&mut env.exec_command(&wf, "cold"))?;
    let cold_ms = warm_up.elapsed().as_secs_f64() * 1e3;
    let m = interleave(
        &mut [
            Contender::timed("--no-cache (reads the pipeline every run)", || run_ok(env.exec_command(&wf, "out").arg("--no-cache"))),
            Contender::timed("warm daemon", || run_ok(&mut env.exec_command(&wf, "out"))),
        ],
        config.repeats,
    )?;
    let mut runs = Table::new(
        &format!(
            "One image, 1 step at {side}×{side}, spawn to exit, {} repeats (the first daemon run, which loaded the pipeline, took {}).",
            config.repeats,
            fmt_ms(cold_ms)
        ),
        &["contender", "median", "min", "max", "vs --no-cache"],
    );
    runs.timing_rows(&m, "", |_| vec![]);

    // Sharing: both pipelines resident in one daemon, against the sum of each alone.
    let alone = |dir: &Path| -> Result<f64, String> {
        let env = Env::with_daemon("bench-images-alone");
        run_ok(env.command("mora-cache").arg("load").arg(dir))?;
        Ok(env.resident_bytes() as f64)
    };
    let (bytes_a, bytes_b) = (alone(&a)?, alone(&b)?);
    let both = Env::with_daemon("bench-images-both");
    let two = both.workflow("two.toml", &image_workflow(&[("a", &a), ("b", &b)], side));
    run_ok(&mut both.exec_command(&two, "out"))?;
    let shared = both.resident_bytes() as f64;
    let entries = both.ps().len();
    let mut sharing = Table::new(
        "Resident bytes (`mora-cache ps`) after one run of a workflow using both pipelines, against each pipeline loaded alone.",
        &["what", "resident", "entries"],
    );
    sharing.row(vec!["pipeline A alone".into(), fmt_bytes(bytes_a), "3".into()]);
    sharing.row(vec!["pipeline B alone (A with its own UNet)".into(), fmt_bytes(bytes_b), "3".into()]);
    sharing.row(vec!["A and B without sharing (sum)".into(), fmt_bytes(bytes_a + bytes_b), "6".into()]);
    sharing.row(vec!["A and B in one daemon".into(), fmt_bytes(shared), entries.to_string()]);
    Ok(Section {
        title: "7. Images: a Stable Diffusion pipeline".into(),
        about: format!(
            "A synthetic pipeline in SD 1.5's layout and shapes scaled to {} of f16 weights on disk \
             (`mora-exec synth --arch sd15 --dtype f16 --size {}`), held as f32; the workflow makes one image \
             with one denoising step, so loading shows.",
            config.image_pipeline, config.image_pipeline
        ),
        tables: vec![runs, sharing],
        targets: vec![],
        notes: vec![format!(
            "Warm runs take {} of the --no-cache time; sharing holds {} of what two separate pipelines would.",
            fmt_ratio(m.ratio(1)),
            fmt_ratio(shared / (bytes_a + bytes_b))
        )],
    })
}

/// Runs `cmd` to the end, sampling its peak resident memory (`VmHWM`) every
/// 5 ms: the time from spawn to exit and the last peak read.
pub(super) fn run_sampling_peak(cmd: &mut Command) -> Result<(Duration, u64), String> {
    let t = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(|e| format!("spawn: {e}"))?;
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Some(s) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            let elapsed = t.elapsed();
            if !s.success() {
                let mut err = Vec::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_end(&mut e, &mut err);
                }
                return Err(super::last_line(&err));
            }
            return Ok((elapsed, peak));
        }
        // Read while the process lives; a zombie's status has no VmHWM.
        peak = peak.max(crate::kib_field(&std::fs::read_to_string(&status).unwrap_or_default(), "VmHWM:") * 1024);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pipeline scenario 8 runs: diffusers' own `save_pretrained` output
/// when the peer is there, else the synthetic one of scenario 7.
fn torch_pipeline(config: &Config, peer: &Result<Diffusers, String>) -> Result<PathBuf, String> {
    let Ok(peer) = peer else {
        return synth_pipeline(config, &config.image_pipeline, 1);
    };
    let name = if config.image_peer_tiny { "sd15-diffusers-tiny" } else { "sd15-diffusers-f16" };
    let dir = config.model_dir.join(name);
    if !dir.join("model_index.json").is_file() {
        eprintln!("mora-bench: writing an SD 1.5 pipeline with diffusers' save_pretrained into {}", dir.display());
        peer.make(&dir, config.image_peer_tiny).map_err(|e| format!("sd.py make: {e}"))?;
    }
    Ok(dir)
}

/// One component's weights, read from its safetensors files into f32 as a
/// `--no-cache` run reads them.
fn component_weights(root: &Path, component: &str) -> Result<VarBuilder<'static>, String> {
    let dir = root.join(component);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    // SAFETY: the benchmark's pipeline files are not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.map_err(|e| format!("{}: {e}", dir.display()))
}

/// Milliseconds of each of Mora's forwards, named as `sd.py components`
/// names torch's, on inputs of the same shapes.
fn mora_components(root: &Path, latent: usize, repeats: usize) -> Result<Vec<(&'static str, Vec<f64>)>, String> {
    let cfg = PipelineConfig::read(root, None).map_err(|e| e.to_string())?;
    let e = |e: candle_core::Error| e.to_string();
    let text = &cfg.text[0].config;
    let encoder = TextEncoder::new(component_weights(root, "text_encoder")?, text).map_err(e)?;
    let unet = UNet::new(component_weights(root, "unet")?, &cfg.unet).map_err(e)?;
    let vae = Vae::new(component_weights(root, "vae")?, &cfg.vae).map_err(e)?;
    let cpu = &Device::Cpu;
    let vocab = text.vocab_size as u32;
    let ids: Vec<u32> = (0..2 * 77u32).map(|i| (i * 7919) % vocab).collect();
    let ids = Tensor::from_vec(ids, (2, 77), cpu).map_err(e)?;
    let sample = Tensor::randn(0f32, 1.0, (2, cfg.unet.in_channels, latent, latent), cpu).map_err(e)?;
    let context = Tensor::randn(0f32, 1.0, (2, 77, cfg.unet.cross_attention_dim), cpu).map_err(e)?;
    let z = Tensor::randn(0f32, 1.0, (1, cfg.vae.latent_channels, latent, latent), cpu).map_err(e)?;
    type Forward<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let forwards: Vec<(&'static str, Forward)> = vec![
        ("text_encoder", Box::new(|| Ok(encoder.forward(&ids)?.last_hidden_state))),
        ("unet", Box::new(|| unet.forward(&sample, 999.0, &context, None))),
        ("vae_decoder", Box::new(|| vae.decode(&z))),
    ];
    let mut out = Vec::new();
    for (name, f) in &forwards {
        f().map_err(e)?; // warm-up
        let mut ms = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let t = Instant::now();
            f().map_err(e)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.push((*name, ms));
    }
    Ok(out)
}

/// The threads both sides compute on: `RAYON_NUM_THREADS` when set (Mora's
/// pool reads it), else every CPU (what rayon and torch take by default).
fn compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Scenario 8: the image workflow against diffusers (a worker with the
/// pipeline loaded, a process per run, a process per run forked by
/// `python -m mora run`), and each component's forward against
/// torch's on inputs of the same shapes.
pub fn against_torch(config: &Config) -> Result<Section, String> {
    let threads = compute_threads();
    let peer = Diffusers::find(threads);
    let pipeline = torch_pipeline(config, &peer)?;
    let mut notes = Vec::new();
    let side = config.image_side;
    let req = ImageRequest { prompt: "a lighthouse at dawn", side, steps: 1, guidance: 7.5, seed: 1 };
    let env = Env::with_daemon("bench-images-torch");
    let wf = env.workflow("image.toml", &image_workflow(&[("a", &pipeline)], side));
    let threads_var = threads.to_string();
    let exec = |no_cache: bool| {
        let mut c = env.exec_command(&wf, "out");
        c.env("RAYON_NUM_THREADS", &threads_var);
        if no_cache {
            c.arg("--no-cache");
        }
        c
    };
    let peaks: RefCell<Vec<u64>> = RefCell::new(vec![0; 6]);
    let peak = |i: usize, bytes: u64| {
        let mut p = peaks.borrow_mut();
        p[i] = p[i].max(bytes);
    };
    let png = env.scratch.join("diffusers.png");
    let mut worker = match &peer {
        Ok(p) => Some(p.worker(&pipeline)?),
        Err(why) => {
            notes.push(format!("skipped: {why}: the diffusers contenders and torch's forwards did not run"));
            None
        }
    };
    let worker_cell = RefCell::new(worker.as_mut());
    let mut contenders = Vec::new();
    if worker_cell.borrow().is_some() {
        contenders.push(Contender::timed("diffusers worker, pipeline loaded (per request)", || {
            let mut w = worker_cell.borrow_mut();
            let w = w.as_mut().expect("worker");
            w.image(&req, &png)?;
            peak(0, w.peak_rss());
            Ok(())
        }));
    }
    contenders.push(Contender::new("mora-exec run, warm daemon", || {
        let (d, p) = run_sampling_peak(&mut exec(false))?;
        peak(1, p);
        Ok(d)
    }));
    contenders.push(Contender::new("mora-exec run --no-cache", || {
        let (d, p) = run_sampling_peak(&mut exec(true))?;
        peak(2, p);
        Ok(d)
    }));
    if let Ok(p) = &peer {
        contenders.push(Contender::timed("diffusers, a process per run (import, load, run)", || {
            peak(3, p.once(&pipeline, &req, &png)?);
            Ok(())
        }));
    }
    // A process per run again, forked from an interpreter that has imported
    // torch and diffusers (`python -m mora run`): loading from disk, and
    // with the weights the daemon holds. Its server starts before the timing.
    let forked = match &peer {
        Ok(p) => match p.start_forked(&env.socket, &env.scratch) {
            Ok(()) => true,
            Err(why) => {
                notes.push(format!("skipped: python -m mora run in the peer ({why}): scripts/bench-python.sh installs the package there"));
                false
            }
        },
        Err(_) => false,
    };
    if let (Ok(p), true) = (&peer, forked) {
        contenders.push(Contender::timed("diffusers, a process per run through python -m mora run (load from disk)", || {
            peak(4, p.once_forked(&env.socket, &pipeline, &req, &png, false)?);
            Ok(())
        }));
        contenders.push(Contender::timed("diffusers, a process per run through python -m mora run (weights from the daemon)", || {
            peak(5, p.once_forked(&env.socket, &pipeline, &req, &png, true)?);
            Ok(())
        }));
    }
    let with_peer = peer.is_ok();
    let m = interleave(&mut contenders, config.image_repeats);
    if let (Ok(p), true) = (&peer, forked) {
        p.stop_forked(&env.socket);
    }
    let m = m?;
    drop(contenders);
    let peaks = peaks.into_inner();
    let slots: Vec<usize> = match (with_peer, forked) {
        (true, true) => vec![0, 1, 2, 3, 4, 5],
        (true, false) => vec![0, 1, 2, 3],
        _ => vec![1, 2],
    };
    let mut runs = Table::new(
        &format!(
            "One image, 1 step at {side}×{side} with guidance 7.5, spawn to exit (the worker: request to answer), {} repeats, {threads} threads each. \
             Peak RSS: the process's VmHWM (Mora's clients sampled every 5 ms; a client maps the weights, so its RSS counts the pages it read).",
            config.image_repeats
        ),
        &["contender", "median", "min", "max", "vs first row", "peak RSS"],
    );
    runs.timing_rows(&m, "", |i| vec![fmt_bytes(peaks[slots[i]] as f64)]);
    let mut targets = Vec::new();
    if with_peer {
        targets.push(Target::at_most("warm mora-exec run / diffusers worker", m.ratio(1), 1.0));
        targets.push(Target::at_most("warm mora-exec run / diffusers process per run", m.stats(1).median / m.stats(3).median, 0.4));
    }
    if forked {
        targets.push(Target::at_most("python -m mora run (weights from the daemon) / diffusers worker", m.ratio(5), 1.2));
    }
    drop(worker);

    let mut components = Table::new(
        &format!(
            "Each component's forward in process, on inputs of the same shapes, after one warm-up, medians of {} ({threads} threads): \
             the text encoder (batch 2, 77 tokens), one UNet step (batch 2, 77×{} context), the VAE decoder (one latent).",
            config.image_repeats,
            PipelineConfig::read(&pipeline, None).map_err(|e| e.to_string())?.unet.cross_attention_dim
        ),
        &["component", "latents", "Mora median", "Mora min", "torch median", "torch min", "Mora / torch"],
    );
    for &latent in &config.image_latents {
        let ours = mora_components(&pipeline, latent, config.image_repeats)?;
        let theirs = match &peer {
            Ok(p) => Some(p.components(&pipeline, latent, config.image_repeats)?),
            Err(_) => None,
        };
        for (name, ms) in ours {
            let o = Stats::of(&ms);
            let t = theirs.as_ref().map(|t| {
                let ms: Vec<f64> = t.get(name).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
                Stats::of(&ms)
            });
            let (tm, tmin, ratio) = match &t {
                Some(t) => (fmt_ms(t.median), fmt_ms(t.min), fmt_ratio(o.median / t.median)),
                None => ("—".into(), "—".into(), "—".into()),
            };
            components.row(vec![name.into(), format!("{latent}×{latent}"), fmt_ms(o.median), fmt_ms(o.min), tm, tmin, ratio]);
            if let Some(t) = &t {
                targets.push(Target::at_most(&format!("{name} at {latent}×{latent} latents, Mora / torch"), o.median / t.median, 1.2));
            }
        }
    }
    let made_by = if with_peer {
        "written by diffusers' own `save_pretrained` (`benches/python/sd.py make`: random weights"
    } else {
        "written by `mora-exec synth --arch sd15` (the Python peer is missing: random weights"
    };
    Ok(Section {
        title: "8. Images against diffusers and torch".into(),
        about: format!(
            "An SD 1.5 pipeline {made_by}{}, float16 on disk, computed in float32 by both. \
             The diffusers contenders are `benches/python/sd.py` in the Python peer (`scripts/bench-python.sh`).",
            if config.image_peer_tiny { ", shapes scaled down)" } else { ", the official shapes)" }
        ),
        tables: vec![runs, components],
        targets,
        notes,
    })
}
