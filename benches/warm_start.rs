//! Wall time of one `mora-exec run` of an embedding workflow, three ways:
//! in-process load (`--no-cache`, the baseline), cold (a fresh daemon loads the
//! model), warm (the daemon already holds it). Prints medians over repeats and
//! each one's ratio to the baseline, plus the client's own breakdown (time to
//! build the model from the weights, which for lent weights is the copy out of
//! the shared mapping).
//!
//!   cargo build --release --workspace --bins
//!   cargo bench --bench warm_start            # MORA_BENCH_REPEATS=N (default 7)
//!
//! Two models: the real all-MiniLM-L6-v2 (87 MiB), and a synthetic BERT of
//! `MORA_BENCH_SYNTH_SIZE` (default 512MiB) where size matters more than meaning.
//! The model files are in the page cache for every scenario (the first run
//! reads them), so "cold" here is a daemon load from page cache, not disk.

use std::time::Instant;

use mora::{embed_workflow, Env};

struct Sample {
    wall_ms: f64,
    build_ms: f64,
    load_ms: f64,
}

fn figure(stdout: &str, before: &str) -> f64 {
    // "... in 123 ms" right after `before`.
    stdout
        .split(before)
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

fn run(env: &Env, wf: &std::path::Path, extra: &[&str]) -> Sample {
    let start = Instant::now();
    let out = env.exec(wf, "out", extra);
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "run failed: {}", String::from_utf8_lossy(&out.stderr));
    Sample {
        wall_ms,
        build_ms: figure(&stdout, "model built"),
        load_ms: if stdout.contains("warm:") { 0.0 } else { figure(&stdout, "MiB") },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(title: &str, workflow: &str, repeats: usize) {
    let mut baseline = Vec::new();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let warm_env = Env::with_daemon("bench-warm");
    let wf = warm_env.workflow("bench.toml", workflow);
    run(&warm_env, &wf, &[]); // load once, and bring the files into the page cache
    for _ in 0..repeats {
        baseline.push(run(&warm_env, &wf, &["--no-cache"]));
        warm.push(run(&warm_env, &wf, &[]));
        let cold_env = Env::with_daemon("bench-cold");
        let cold_wf = cold_env.workflow("bench.toml", workflow);
        cold.push(run(&cold_env, &cold_wf, &[]));
    }
    let base = median(baseline.iter().map(|s| s.wall_ms).collect());
    println!("{title}, median of {repeats}");
    println!("{:<24} {:>10} {:>10} {:>12} {:>14}", "scenario", "wall ms", "vs base", "load ms", "model built ms");
    for (name, s) in [("no cache (baseline)", &baseline), ("cold daemon", &cold), ("warm daemon", &warm)] {
        let wall = median(s.iter().map(|x| x.wall_ms).collect());
        println!(
            "{:<24} {:>10.1} {:>9.2}x {:>12.1} {:>14.1}",
            name,
            wall,
            wall / base,
            median(s.iter().map(|x| x.load_ms).collect()),
            median(s.iter().map(|x| x.build_ms).collect()),
        );
    }
    println!();
}

fn main() {
    let repeats: usize = std::env::var("MORA_BENCH_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let synth_size = std::env::var("MORA_BENCH_SYNTH_SIZE").unwrap_or_else(|_| "512MiB".into());
    let texts = ["A man is eating food.", "A man is eating a piece of bread."];
    bench("all-MiniLM-L6-v2 (f32, 86.6 MiB), 2 texts", &embed_workflow(&texts), repeats);

    let synth_env = Env::new("bench-synth");
    let dir = synth_env.synth("synth-bert", "bert", &synth_size, 0);
    let workflow = embed_workflow(&texts)
        .replace("repo = \"sentence-transformers/all-MiniLM-L6-v2\"", &format!("path = {:?}", dir.display().to_string()));
    bench(&format!("synthetic BERT (f32, {synth_size}), 2 texts"), &workflow, repeats);
}
