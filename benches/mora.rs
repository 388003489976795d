//! The benchmark harness: `scripts/bench.sh [OPTIONS]` builds the release
//! binaries and runs `cargo bench --bench mora -- [OPTIONS]`. See
//! `docs/benchmarks.md` for the figures and `--help` for the options.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mora::bench::{self, Config};

/// Times Mora against the baselines users have today and writes docs/benchmarks.md and its chart.
///
/// Scenarios: 1 repeat one workflow (warm daemon, --no-cache, a Python process
/// per run, a persistent Python worker); 2 model size (time to first token,
/// cold load against raw read bandwidth); 3 cross-workflow reuse; 4
/// concurrency and memory; 5 soak; 6 many models (acquire and ps latency); 7
/// images (a synthetic SD 1.5 pipeline: warm against --no-cache, components shared).
/// The Python peer is optional
/// (scripts/bench-python.sh installs it).
#[derive(Parser)]
#[command(name = "mora-bench", bin_name = "scripts/bench.sh")]
struct Args {
    /// Scenarios to run, e.g. 1,3 [default: all]
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=9))]
    scenarios: Vec<u32>,
    /// Repeats of each measurement (scenario 1 uses --runs)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    repeats: u64,
    /// Scenario 1: runs of the workflow per contender
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Scenario 2: synthetic bf16 llama sizes; the first is scenario 3's llama too
    #[arg(long, value_delimiter = ',', default_value = "100MiB,1GiB,4GiB")]
    sizes: Vec<String>,
    /// Scenario 2: also time the segment fill the daemon does not choose on this machine (pwrite or the mapping), side by side
    #[arg(long)]
    compare_fills: bool,
    /// Scenario 4: numbers of concurrent clients
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
    clients: Vec<usize>,
    /// Scenario 5: sequential runs
    #[arg(long, default_value_t = 500)]
    soak_runs: usize,
    /// Scenario 6: small models resident at the end
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    models: u64,
    /// Scenario 6: acquires timed per number of models
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..))]
    acquires: u64,
    /// Scenario 7: the synthetic SD 1.5 pipeline's size (f16 on disk)
    #[arg(long, default_value = "1900MiB")]
    image_pipeline: String,
    /// Scenarios 7 and 8: the side of the square image in pixels
    #[arg(long, default_value_t = 256)]
    image_side: usize,
    /// Scenario 8: repeats of each image run and of each component's forward
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    image_repeats: u64,
    /// Scenario 8: latent sides the components are timed at (32: a 256×256 image, 64: 512×512)
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    image_latents: Vec<usize>,
    /// A configuration that runs every scenario in a minute on tiny models (what CI runs); writes under --report's directory
    #[arg(long)]
    smoke: bool,
    /// The report to write; the chart goes beside it as .png [default: docs/benchmarks.md]
    #[arg(long)]
    report: Option<PathBuf>,
    /// Ignored: cargo bench passes it to every bench target
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    // The in-process timings (scenario 8's forwards) run candle as a run
    // would; the thread count stays the user's, for every contender.
    mora_models::threads::settle_spin();
    let args = Args::parse();
    let mut config = Config::full();
    if args.smoke {
        let dir = args.report.as_ref().and_then(|r| r.parent().map(PathBuf::from)).unwrap_or_else(|| mora::root().join("target").join("bench-smoke"));
        config = Config::smoke(&dir);
    } else {
        config.repeats = args.repeats as usize;
        config.runs = args.runs as usize;
        config.model_sizes = args.sizes;
        config.compare_fills = args.compare_fills;
        config.clients = args.clients;
        config.soak_runs = args.soak_runs;
        config.many_models = args.models as usize;
        config.acquires = args.acquires as usize;
        config.image_pipeline = args.image_pipeline;
        config.image_side = args.image_side;
        config.image_repeats = args.image_repeats as usize;
        config.image_latents = args.image_latents;
    }
    if !args.scenarios.is_empty() {
        config.scenarios = args.scenarios;
    }
    if let Some(r) = args.report {
        config.report = r;
    }
    config.command = std::iter::once("scripts/bench.sh".to_string()).chain(std::env::args().skip(1).filter(|a| a != "--bench")).collect::<Vec<_>>().join(" ");
    match bench::run(&config) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mora-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
