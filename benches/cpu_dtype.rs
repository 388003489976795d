//! CPU compute in bf16 against f32, on the kernels Mora's CPU path runs
//! (candle's, in this process): should a model held in bf16 compute in bf16
//! on the CPU, instead of being widened to f32 by each run?
//!
//! `cargo bench --bench cpu_dtype [-- --repeats N --tokens N]`
//!
//! Three ways a client can compute with bf16-held weights, timed on the same
//! model in one run: (a) f32 weights (held f32, or widened once per run),
//! (b) bf16 weights computed in bf16, and the one-off cost of (c) widening
//! every bf16 tensor to f32, which a run on bf16-held weights pays before its
//! first result. Embeddings/s on the test model (all-MiniLM-L6-v2, 32 texts a
//! batch), tokens/s on the synthetic llamas of benchmark scenario 2 (written
//! to `.mora-bench/models` when missing). Medians over repeats, min and max.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Parser;
use mora_models::embed::SentenceEmbedder;
use mora_exec::generate::{SamplingSpec, TextGenerator};

#[derive(Parser)]
#[command(name = "cpu_dtype", bin_name = "cargo bench --bench cpu_dtype --")]
struct Args {
    /// Timed repeats of each measurement (after one untimed warm-up)
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Tokens generated per repeat
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Synthetic llama sizes (stored bf16, as scenario 2 writes them)
    #[arg(long, value_delimiter = ',', default_value = "100MiB,1GiB")]
    sizes: Vec<String>,
    /// cargo bench passes --bench; ignored
    #[arg(long, hide = true)]
    bench: bool,
}

fn tensors(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    let mut all = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).expect("model dir") {
        let p = entry.expect("dir entry").path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).expect("read safetensors"));
        }
    }
    all
}

/// Each tensor of `t` in `dtype` (floats only).
fn cast(t: &std::collections::HashMap<String, Tensor>, dtype: DType) -> std::collections::HashMap<String, Tensor> {
    t.iter().map(|(k, v)| (k.clone(), if v.dtype().is_float() { v.to_dtype(dtype).expect("cast") } else { v.clone() })).collect()
}

/// (median, min, max) of `xs`.
fn stats(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn row(label: &str, unit: &str, (med, min, max): (f64, f64, f64), baseline: f64) {
    println!("| {label} | {med:.1} {unit} | {min:.1} | {max:.1} | {:.2}x |", med / baseline);
}

/// Widening every bf16 tensor to f32 once, as a run on bf16-held weights
/// does, with candle's `to_dtype` and with Mora's conversion over every core
/// (what a warm client does for large tensors): (candle ms, Mora ms, MiB of bf16).
fn widen_ms(bf16: &std::collections::HashMap<String, Tensor>, repeats: usize) -> ((f64, f64, f64), (f64, f64, f64), f64) {
    let mib = bf16.values().filter(|t| t.dtype() == DType::BF16).map(|t| t.elem_count() * 2).sum::<usize>() as f64 / (1 << 20) as f64;
    let time = |f: &dyn Fn()| {
        let times = (0..repeats)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        stats(times)
    };
    let bytes: Vec<Vec<u8>> = bf16
        .values()
        .filter(|t| t.dtype() == DType::BF16)
        .map(|t| t.flatten_all().and_then(|t| t.to_vec1::<half::bf16>()).expect("bf16 values").iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let threads = mora_common::convert::cores();
    let candle = time(&|| drop(cast(bf16, DType::F32)));
    let mora = time(&|| {
        for b in &bytes {
            let mut out = vec![0u8; b.len() * 2];
            mora_common::convert::convert_parallel(b, mora_common::TensorDType::BF16, &mut out, mora_common::TensorDType::F32, threads);
        }
    });
    (candle, mora, mib)
}

fn embeddings(args: &Args) {
    let dir = mora::test_model_dir();
    let stored = tensors(&dir);
    // A fresh process's first inference against the same call repeated: the
    // two texts of examples/embed.toml, in f32.
    let pair: Vec<String> = vec!["A man is eating food.".into(), "A man is eating a piece of bread.".into()];
    let e = SentenceEmbedder::load(&dir, VarBuilder::from_tensors(cast(&stored, DType::F32), DType::F32, &Device::Cpu), None).expect("build the embedder");
    let mut times: Vec<f64> = (0..=args.repeats.max(10))
        .map(|_| {
            let t = Instant::now();
            e.embed(&pair).expect("embed");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let first = times.remove(0);
    let (med, min, max) = stats(times);
    println!("\nThe two texts of examples/embed.toml in f32: the process's first call {first:.1} ms, then {med:.1} ms (min {min:.1}, max {max:.1}).");
    let texts: Vec<String> = (0..32)
        .map(|i| format!("sentence number {i} of the benchmark, about a cat that sat on mat {} and watched the rain", i * 7))
        .collect();
    println!("\n### Embeddings: all-MiniLM-L6-v2, batches of {} texts\n", texts.len());
    println!("| compute | embeddings/s (median) | min | max | vs f32 |\n|---|---|---|---|---|");
    let mut outs = Vec::new();
    let mut f32_rate = 0.0;
    for (label, dtype) in [("f32 weights, f32 compute", DType::F32), ("bf16 weights, bf16 compute", DType::BF16)] {
        let vb = VarBuilder::from_tensors(cast(&stored, dtype), dtype, &Device::Cpu);
        let e = SentenceEmbedder::load(&dir, vb, None).expect("build the embedder");
        let first = e.embed(&texts).expect("embed");
        let rates = (0..args.repeats)
            .map(|_| {
                let t = Instant::now();
                e.embed(&texts).expect("embed");
                texts.len() as f64 / t.elapsed().as_secs_f64()
            })
            .collect();
        let s = stats(rates);
        if dtype == DType::F32 {
            f32_rate = s.0;
        }
        row(label, "/s", s, f32_rate);
        outs.push(first);
    }
    let lowest = outs[0]
        .iter()
        .zip(&outs[1])
        .map(|(a, b)| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (n(a) * n(b))
        })
        .collect::<Vec<f32>>();
    let not_finite = outs[1].iter().filter(|v| v.iter().any(|x| !x.is_finite())).count();
    let lowest = lowest.iter().copied().filter(|c| c.is_finite()).fold(f32::INFINITY, f32::min);
    let agreement = match not_finite {
        0 => format!("lowest cosine {lowest:.6}"),
        n => format!("{n} of {} bf16 embeddings are not finite (NaN or infinite)", texts.len()),
    };
    let bf16 = cast(&stored, DType::BF16);
    let ((w, wmin, wmax), (m, mmin, mmax), mib) = widen_ms(&bf16, args.repeats);
    println!("\nbf16 against f32 embeddings: {agreement}. Widening the {mib:.1} MiB of bf16 weights to f32 once: {w:.1} ms (min {wmin:.1}, max {wmax:.1}) with candle's `to_dtype`, {m:.1} ms (min {mmin:.1}, max {mmax:.1}) with Mora's conversion over every core.");
}

fn llama(size: &str) -> PathBuf {
    let dir = mora::root().join(".mora-bench").join("models").join(format!("llama-bf16-{size}"));
    if !dir.join("config.json").is_file() {
        let bytes = mora_common::units::parse_size(size).expect("a size such as 100MiB");
        eprintln!("cpu_dtype: writing a synthetic bf16 llama of {size} into {}", dir.display());
        let spec = mora_models::synth::SynthSpec {
            arch: mora_models::synth::Family::Llama,
            target_bytes: bytes,
            dtype: mora_common::manifest::WeightDType::BF16,
            seed: 7,
        };
        mora_models::synth::generate(&spec, &dir).expect("write the synthetic llama");
    }
    dir
}

fn tokens(args: &Args) {
    for size in &args.sizes {
        let dir = llama(size);
        let stored = tensors(&dir);
        println!("\n### Tokens: synthetic llama, {size} stored bf16, {} tokens greedy\n", args.tokens);
        println!("| compute | tokens/s (median) | min | max | vs f32 |\n|---|---|---|---|---|");
        let greedy = SamplingSpec { temperature: 0.0, top_p: None, seed: 0 };
        let mut f32_rate = 0.0;
        let mut texts = Vec::new();
        for (label, dtype) in [("f32 weights, f32 compute", DType::F32), ("bf16 weights, bf16 compute", DType::BF16)] {
            let vb = VarBuilder::from_tensors(cast(&stored, dtype), dtype, &Device::Cpu);
            let mut g = TextGenerator::load(&dir, vb, None).expect("build the generator");
            let mut rates = Vec::new();
            for i in 0..=args.repeats {
                let out = g.generate("the man is", true, args.tokens, greedy, |_| {}).expect("generate");
                if i == 0 {
                    texts.push(out.token_ids);
                } else {
                    rates.push(out.tokens_per_s);
                }
            }
            let s = stats(rates);
            if dtype == DType::F32 {
                f32_rate = s.0;
            }
            row(label, "/s", s, f32_rate);
        }
        let same = texts[0].iter().zip(&texts[1]).take_while(|(a, b)| a == b).count();
        let bf16 = cast(&stored, DType::BF16);
        let ((w, wmin, wmax), (m, mmin, mmax), mib) = widen_ms(&bf16, args.repeats);
        println!(
            "\nGreedy tokens equal for the first {same} of {}. Widening the {mib:.0} MiB of bf16 weights to f32 once: {w:.0} ms (min {wmin:.0}, max {wmax:.0}) with candle's `to_dtype`, {m:.0} ms (min {mmin:.0}, max {mmax:.0}) with Mora's conversion over every core.",
            texts[0].len()
        );
    }
}

fn main() {
    // As `mora-exec` does first: candle's thread count worked out once (not on
    // every matmul) and its elementwise workers' spin limit.
    mora_models::threads::settle();
    let args = Args::parse();
    println!("## CPU compute: bf16 against f32 (`cargo bench --bench cpu_dtype -- --repeats {}`)", args.repeats);
    println!("\n{} CPU threads, candle 0.11.", std::thread::available_parallelism().map_or(1, |n| n.get()));
    embeddings(&args);
    tokens(&args);
}
