use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use mora_common::manifest::WeightDType;
use mora_common::paths::socket_path;
use mora_common::units::parse_size;
use mora_models::synth::{generate, Family, SynthSpec};
use mora_exec::run::{check, run, RunOptions};
use mora_exec::tasks::report::describe;
use mora_exec::workflow::Workflow;

/// Runs ML workflows on model weights kept resident by the Mora cache daemon
/// (`mora-cache`), so every run is a fresh process that starts warm.
#[derive(Parser)]
#[command(name = "mora-exec", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `run` takes, and `watch` passes on to each run.
#[derive(Args)]
struct RunArgs {
    /// The workflow (TOML).
    workflow: PathBuf,
    #[command(flatten)]
    flags: RunFlags,
}

/// `run`'s options besides the workflow.
#[derive(Args)]
struct RunFlags {
    /// Daemon socket [default: $MORA_SOCKET, else $XDG_RUNTIME_DIR/mora/cache.sock,
    /// else /tmp/mora-$UID/cache.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Load the weights in this process instead of borrowing them from the
    /// daemon: the baseline, and a way to run with no daemon at all.
    #[arg(long)]
    no_cache: bool,
    /// Fail instead of starting a daemon when none is listening.
    #[arg(long)]
    no_autostart: bool,
    /// Download each model the workflow names that is not in the Hugging Face
    /// cache (the files `mora-cache pull` fetches), then run.
    #[arg(long)]
    pull: bool,
    /// Directory for step outputs.
    #[arg(short = 'o', long = "output-dir", value_name = "DIR", default_value = "outputs")]
    output_dir: PathBuf,
    /// Set a variable declared in the workflow's [variables] (repeatable); the
    /// value converts to the type of its default.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    sets: Vec<String>,
    /// Let a step's `output` be an absolute path, climb out of the output
    /// directory with `..`, or follow a symlink out of it.
    #[arg(long)]
    allow_outside_output: bool,
}

impl RunFlags {
    /// These options, but `--set`, as `mora-exec run` arguments after the workflow.
    fn to_run_args(&self) -> Vec<String> {
        let mut args = vec!["-o".to_string(), self.output_dir.display().to_string()];
        if let Some(s) = &self.socket {
            args.extend(["--socket".to_string(), s.display().to_string()]);
        }
        for (flag, on) in [
            ("--no-cache", self.no_cache),
            ("--no-autostart", self.no_autostart),
            ("--pull", self.pull),
            ("--allow-outside-output", self.allow_outside_output),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        args
    }
}

/// `run`'s options, with the workflow optional (`load` it later).
#[derive(Args)]
struct ReplArgs {
    /// The workflow (TOML) to start with.
    workflow: Option<PathBuf>,
    #[command(flatten)]
    flags: RunFlags,
}

#[derive(Subcommand)]
enum Command {
    /// Run a workflow file: acquire its models, run its steps, write outputs.
    Run(RunArgs),
    /// Run a workflow, then run it again, each time in a fresh process, whenever the
    /// workflow file or an input file it names is saved; models stay warm in the
    /// daemon between runs. Ctrl-C stops. Takes the options of `run`.
    Watch(RunArgs),
    /// An interactive loop over a workflow: `set` variables, `run` it (each run a
    /// fresh process, Ctrl-C stops it), `show` what is resident, `watch on`.
    /// `help` inside lists the commands; from a pipe it reads one command a line.
    /// Takes the options of `run` as defaults for its runs.
    Repl(ReplArgs),
    /// Check a workflow without running it: syntax, keys, variables and references,
    /// input files, and that every model resolves to files on disk.
    Check {
        /// The workflow (TOML).
        workflow: PathBuf,
        /// As for `run`.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        sets: Vec<String>,
    },
    /// Write a deterministic random-weight model (real config, safetensors and
    /// tokenizer) of about a given size, for tests and benchmarks.
    Synth {
        /// bert (runs the embed task); llama, mistral, qwen2, qwen3, phi3, gemma2 or
        /// gpt2 (run the generate task); sd15, sd21 or sdxl (a diffusers
        /// pipeline in those shapes, for the image task).
        #[arg(long, default_value = "bert", value_parser = parse_arch)]
        arch: SynthArch,
        /// Target size of model.safetensors (of a pipeline: of all its weight
        /// files): 1MiB .. several GiB; a pipeline at most its real size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: WeightDType,
        /// Same seed, same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory to write the model into.
        #[arg(short = 'o', long = "output-dir", value_name = "DIR")]
        output_dir: PathBuf,
    },
}

/// Lets CPU tensors view the daemon's segment in place (see `mora_exec::lent`).
#[global_allocator]
static ALLOCATOR: mora_exec::lent::LentAware = mora_exec::lent::LentAware;

fn main() -> ExitCode {
    mora_exec::phases::start();
    // Before any thread starts: the environment is not safe to change after.
    mora_models::threads::settle();
    mora_exec::heap::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MORA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match command(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mora-exec: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn command(command: Command) -> Result<(), String> {
    match command {
        Command::Run(args) => {
            // Panics are caught and reported as one line by `guarded`; with
            // MORA_LOG=debug the usual message and backtrace show too.
            let debug = std::env::var("MORA_LOG").is_ok_and(|v| v.contains("debug") || v.contains("trace"));
            if !debug {
                std::panic::set_hook(Box::new(|_| {}));
            }
            let (workflow, args) = (args.workflow, args.flags);
            let wf = mora_exec::guarded(|| Workflow::load_with(&workflow, &args.sets).map_err(Into::into))
                .map_err(|e| e.to_string())?;
            mora_exec::phases::mark("parse workflow");
            if args.pull {
                mora_exec::run::pull_missing(&wf).map_err(|e| e.to_string())?;
            }
            let opts = RunOptions {
                socket: socket_path(args.socket.as_deref()),
                no_cache: args.no_cache,
                autostart: !args.no_autostart,
                output_dir: args.output_dir,
                allow_outside_output: args.allow_outside_output,
            };
            let reports = mora_exec::guarded(|| run(&wf, &opts)).map_err(|e| e.to_string())?;
            for r in &reports {
                println!("{}", describe(r));
            }
            mora_exec::phases::mark("report");
            if let Some(phases) = mora_exec::phases::report() {
                eprintln!("{phases}");
            }
        }
        Command::Watch(args) => {
            let mut run_args = args.flags.to_run_args();
            for s in &args.flags.sets {
                run_args.extend(["--set".to_string(), s.clone()]);
            }
            let opts = mora_exec::watch::WatchOptions { workflow: args.workflow, run_args, sets: args.flags.sets };
            mora_exec::watch::watch(&opts).map_err(|e| e.to_string())?;
        }
        Command::Repl(a) => {
            // The same options as `run`, passed to every run the REPL starts.
            let opts = mora_exec::repl::ReplOptions {
                workflow: a.workflow,
                run_args: a.flags.to_run_args(),
                socket: socket_path(a.flags.socket.as_deref()),
                sets: a.flags.sets,
            };
            mora_exec::repl::repl(opts).map_err(|e| e.to_string())?;
        }
        Command::Check { workflow, sets } => {
            let wf = Workflow::load_with(&workflow, &sets).map_err(|e| e.to_string())?;
            let summary = check(&wf).map_err(|e| e.to_string())?;
            println!("{}: ok: {summary}", workflow.display());
        }
        Command::Synth { arch: SynthArch::Pipeline(arch), size, dtype, seed, output_dir } => {
            let r = mora_models::image::synth::generate(arch, size, dtype, seed, &output_dir).map_err(|e| e.to_string())?;
            println!(
                "wrote {}: a pipeline of {} bytes of {dtype} weights ({:.3} of the real shapes' width)",
                output_dir.display(),
                r.bytes,
                r.scale
            );
        }
        Command::Synth { arch: SynthArch::Model(arch), size, dtype, seed, output_dir } => {
            let r = generate(&SynthSpec { arch, target_bytes: size, dtype, seed }, &output_dir).map_err(|e| e.to_string())?;
            println!(
                "wrote {}: {} bytes of {dtype} weights ({} tensors, hidden {}, {} layers)",
                r.dir.display(),
                r.weights_bytes,
                r.tensors,
                r.hidden_size,
                r.layers
            );
        }
    }
    Ok(())
}

/// What `synth --arch` names: a model, or a diffusers pipeline.
#[derive(Clone)]
enum SynthArch {
    Model(Family),
    Pipeline(mora_models::image::synth::PipelineArch),
}

fn parse_arch(s: &str) -> Result<SynthArch, String> {
    match mora_models::image::synth::PipelineArch::parse(s) {
        Some(p) => Ok(SynthArch::Pipeline(p)),
        None => s.parse::<Family>().map(SynthArch::Model).map_err(|e| format!("{e}, or a pipeline: sd15, sd21, sdxl")),
    }
}

/// The first line of an error: candle appends a backtrace to its errors when
/// RUST_BACKTRACE is set, and a user gets one line whatever the environment.
fn one_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message).trim_end()
}
