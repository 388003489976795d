//! Scenario 9: LoRA adapters over one shared SD base. Three workflows, each
//! with its own Kohya-format LoRA over the same synthetic SD 1.5 pipeline,
//! run A B C A B C through a warm daemon and with `--no-cache`: time per
//! run, the client's peak memory, and what the daemon holds (the base once,
//! each adapter once).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::images::{run_sampling_peak, synth_pipeline};
use super::scenarios::{run_ok, toml_str};
use super::{fmt_bytes, fmt_ms, fmt_ratio, Config, Section, Stats, Table};
use crate::Env;

/// The LoRAs' rank.
const RANK: usize = 16;

/// A Kohya-format LoRA (`lora_unet_*`, `lora_te_*`, rank [`RANK`], alpha
/// = rank) over every attention projection of the pipeline's UNet and text
/// encoder, written once.
fn kohya_lora(config: &Config, pipeline: &Path, seed: u64) -> Result<PathBuf, String> {
    let file = config.model_dir.join(format!("{}-lora{seed}.safetensors", pipeline.file_name().unwrap_or_default().to_string_lossy()));
    if file.is_file() {
        return Ok(file);
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let t = |shape: &[usize], seed: u64| Tensor::from_vec(mora_models::synth::uniform(shape.iter().product(), seed, 0.02), shape, &Device::Cpu).map_err(|e| e.to_string());
    for (component, prefix, targets) in [("unet", "lora_unet_", &["to_q", "to_k", "to_v", "to_out.0"][..]), ("text_encoder", "lora_te_", &["q_proj", "k_proj", "v_proj", "out_proj"][..])] {
        let dir = pipeline.join(component);
        let weights = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .ok_or_else(|| format!("{}: no safetensors", dir.display()))?;
        let header = mora_common::safetensors::read_header(&weights).map_err(|e| e.to_string())?;
        let mut tensors_in: Vec<(String, Vec<usize>)> = mora_common::safetensors::shapes(&header).into_iter().collect();
        tensors_in.sort();
        for (k, (name, shape)) in tensors_in.into_iter().enumerate() {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            if shape.len() != 2 || !targets.iter().any(|t| module.ends_with(&format!(".{t}"))) {
                continue;
            }
            let key = format!("{prefix}{}", module.replace('.', "_"));
            let s = seed * 1_000_003 + k as u64;
            tensors.insert(format!("{key}.lora_down.weight"), t(&[RANK, shape[1]], s)?);
            tensors.insert(format!("{key}.lora_up.weight"), t(&[shape[0], RANK], s + 1)?);
            tensors.insert(format!("{key}.alpha"), Tensor::new(RANK as f32, &Device::Cpu).map_err(|e| e.to_string())?);
        }
    }
    if tensors.is_empty() {
        return Err(format!("{}: no attention projections to target", pipeline.display()));
    }
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &file).map_err(|e| e.to_string())?;
    Ok(file)
}

fn workflow(pipeline: &Path, lora: Option<&Path>, side: usize) -> String {
    let loras = lora.map(|l| format!("loras = [{{ path = {}, scale = 0.8 }}]\n", toml_str(l))).unwrap_or_default();
    format!(
        "name = \"lora\"\n[models.sd]\npath = {}\n[[steps]]\nname = \"img\"\ntask = \"image\"\nmodel = \"sd\"\nprompt = \"a lighthouse at dawn\"\n\
         steps = 1\nwidth = {side}\nheight = {side}\nseed = 1\n{loras}output = \"img.png\"\n",
        toml_str(pipeline)
    )
}

pub fn loras(config: &Config) -> Result<Section, String> {
    let base = synth_pipeline(config, &config.image_pipeline, 1)?;
    let adapters: Vec<PathBuf> = (1..=3).map(|s| kohya_lora(config, &base, s)).collect::<Result<_, _>>()?;
    let side = config.image_side;
    let env = Env::with_daemon("bench-loras");
    let plain = env.workflow("plain.toml", &workflow(&base, None, side));
    let with: Vec<PathBuf> = adapters.iter().enumerate().map(|(i, l)| env.workflow(&format!("lora{i}.toml"), &workflow(&base, Some(l), side))).collect();
    run_ok(&mut env.exec_command(&plain, "cold"))?;
    // A B C A B C, each run warm then --no-cache, and a run without a LoRA
    // between rounds.
    let (mut warm, mut cold, mut none) = (Vec::new(), Vec::new(), Vec::new());
    let (mut warm_rss, mut cold_rss, mut none_rss) = (0u64, 0u64, 0u64);
    let rounds = config.repeats.clamp(1, 3);
    for _ in 0..rounds {
        let (t, rss) = run_sampling_peak(&mut env.exec_command(&plain, "out"))?;
        none.push(t.as_secs_f64() * 1e3);
        none_rss = none_rss.max(rss);
        for wf in &with {
            let (t, rss) = run_sampling_peak(&mut env.exec_command(wf, "out"))?;
            warm.push(t.as_secs_f64() * 1e3);
            warm_rss = warm_rss.max(rss);
            let (t, rss) = run_sampling_peak(env.exec_command(wf, "out").arg("--no-cache"))?;
            cold.push(t.as_secs_f64() * 1e3);
            cold_rss = cold_rss.max(rss);
        }
    }
    let ps = env.ps();
    let held = |pred: &dyn Fn(&str) -> bool| -> (usize, u64) {
        let m: Vec<&serde_json::Value> = ps.iter().filter(|m| m["name"].as_str().is_some_and(pred)).collect();
        (m.len(), m.iter().map(|m| m["bytes"].as_u64().unwrap_or(0)).sum())
    };
    let is_lora = |n: &str| n.ends_with(".safetensors");
    let (lora_entries, lora_bytes) = held(&|n| is_lora(n));
    let (base_entries, base_bytes) = held(&|n| !is_lora(n));
    let (n, w, c) = (Stats::of(&none), Stats::of(&warm), Stats::of(&cold));
    let mut runs = Table::new(
        &format!(
            "One image, 1 step at {side}×{side}, spawn to exit; {rounds} rounds of A B C (each warm, then --no-cache) with a run without a LoRA before each round. Peak RSS: the client's VmHWM, sampled every 5 ms."
        ),
        &["contender", "median", "min", "max", "vs warm without a LoRA", "peak RSS"],
    );
    for (what, s, rss) in [("warm daemon, no LoRA", &n, none_rss), ("warm daemon, LoRA A, B or C", &w, warm_rss), ("--no-cache, LoRA A, B or C", &c, cold_rss)] {
        runs.row(vec![what.into(), fmt_ms(s.median), fmt_ms(s.min), fmt_ms(s.max), fmt_ratio(s.median / n.median), fmt_bytes(rss as f64)]);
    }
    let mut resident = Table::new("What the daemon held after every run (`mora-cache ps`).", &["entries", "count", "resident"]);
    resident.row(vec!["the base pipeline's components".into(), base_entries.to_string(), fmt_bytes(base_bytes as f64)]);
    resident.row(vec!["the LoRA adapters".into(), lora_entries.to_string(), fmt_bytes(lora_bytes as f64)]);
    let lora_file = std::fs::metadata(&adapters[0]).map(|m| m.len()).unwrap_or(0);
    Ok(Section {
        title: "9. LoRA adapters over one shared base".into(),
        about: format!(
            "The synthetic SD 1.5 pipeline of scenario 7 ({} of f16 weights on disk, held as f32) and three Kohya-format LoRAs of rank {RANK} \
             over every attention projection of its UNet and text encoder ({} each, f32), one workflow per LoRA at scale 0.8. Each run merges its \
             adapter into private copies of the targeted tensors (docs/decisions.md); the base stays one shared copy.",
            config.image_pipeline,
            fmt_bytes(lora_file as f64)
        ),
        tables: vec![runs, resident],
        targets: vec![],
        notes: vec![format!(
            "A warm run with a LoRA takes {} of a warm run without one, {} of a --no-cache run with it; the daemon holds the base once ({} entries) and each adapter once ({} entries) for all {} runs. Computing an adapter beside each layer instead of merging it is not built, so its time per step is not measured.",
            fmt_ratio(w.median / n.median),
            fmt_ratio(w.median / c.median),
            base_entries,
            lora_entries,
            warm.len() + none.len()
        )],
    })
}
