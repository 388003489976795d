use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mora_common::manifest::WeightDType;
use mora_common::paths::socket_path;
use mora_common::units::parse_size;
use mora_exec::synth::{generate, Arch, SynthSpec};
use mora_exec::run::{check, describe, run, RunOptions};
use mora_exec::workflow::Workflow;

/// Runs ML workflows on model weights kept resident by the Mora cache daemon
/// (`mora-cache`), so every run is a fresh process that starts warm.
#[derive(Parser)]
#[command(name = "mora-exec", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a workflow file: acquire its models, run its steps, write outputs.
    Run {
        /// The workflow (TOML).
        workflow: PathBuf,
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
    },
    /// Run a workflow, then run it again, each time in a fresh process, whenever the
    /// workflow file or an input file it names is saved; models stay warm in the
    /// daemon between runs. Ctrl-C stops.
    Watch {
        /// The workflow (TOML).
        workflow: PathBuf,
        /// As for `run`.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// As for `run`.
        #[arg(long)]
        no_cache: bool,
        /// As for `run`.
        #[arg(long)]
        no_autostart: bool,
        /// As for `run`.
        #[arg(short = 'o', long = "output-dir", value_name = "DIR", default_value = "outputs")]
        output_dir: PathBuf,
        /// As for `run`.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        sets: Vec<String>,
        /// As for `run`.
        #[arg(long)]
        allow_outside_output: bool,
    },
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
        /// bert (runs the embed task), llama or qwen2 (run the generate task).
        #[arg(long, default_value = "bert")]
        arch: Arch,
        /// Target size of model.safetensors: 1MiB .. several GiB.
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MORA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (workflow, socket, no_cache, no_autostart, output_dir, sets, allow_outside_output) = match Cli::parse().command {
        Command::Run { workflow, socket, no_cache, no_autostart, output_dir, sets, allow_outside_output } => {
            (workflow, socket, no_cache, no_autostart, output_dir, sets, allow_outside_output)
        }
        Command::Watch { workflow, socket, no_cache, no_autostart, output_dir, sets, allow_outside_output } => {
            let mut run_args = vec!["-o".to_string(), output_dir.display().to_string()];
            if let Some(s) = socket {
                run_args.extend(["--socket".to_string(), s.display().to_string()]);
            }
            if no_cache {
                run_args.push("--no-cache".into());
            }
            if no_autostart {
                run_args.push("--no-autostart".into());
            }
            if allow_outside_output {
                run_args.push("--allow-outside-output".into());
            }
            for s in &sets {
                run_args.extend(["--set".to_string(), s.clone()]);
            }
            let opts = mora_exec::watch::WatchOptions { workflow, run_args, sets };
            return match mora_exec::watch::watch(&opts) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mora-exec: error: {}", one_line(&e.to_string()));
                    ExitCode::FAILURE
                }
            };
        }
        Command::Check { workflow, sets } => {
            return match Workflow::load_with(&workflow, &sets).map_err(Into::into).and_then(|wf| check(&wf)) {
                Ok(summary) => {
                    println!("{}: ok: {summary}", workflow.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mora-exec: error: {}", one_line(&e.to_string()));
                    ExitCode::FAILURE
                }
            };
        }
        Command::Synth { arch, size, dtype, seed, output_dir } => {
            return match generate(&SynthSpec { arch, target_bytes: size, dtype, seed }, &output_dir) {
                Ok(r) => {
                    println!(
                        "wrote {}: {} bytes of {dtype} weights ({} tensors, hidden {}, {} layers)",
                        r.dir.display(),
                        r.weights_bytes,
                        r.tensors,
                        r.hidden_size,
                        r.layers
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mora-exec: error: {}", one_line(&e.to_string()));
                    ExitCode::FAILURE
                }
            };
        }
    };
    // Panics are caught and reported as one line by `guarded`; with
    // MORA_LOG=debug the usual message and backtrace show too.
    let debug = std::env::var("MORA_LOG").is_ok_and(|v| v.contains("debug") || v.contains("trace"));
    if !debug {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let result = mora_exec::guarded(|| Workflow::load_with(&workflow, &sets).map_err(Into::into)).and_then(|wf| {
        let opts = RunOptions {
            socket: socket_path(socket.as_deref()),
            no_cache,
            autostart: !no_autostart,
            output_dir,
            allow_outside_output,
        };
        mora_exec::guarded(|| run(&wf, &opts))
    });
    match result {
        Ok(reports) => {
            for r in &reports {
                println!("{}", describe(r));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mora-exec: error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// The first line of an error: candle appends a backtrace to its errors when
/// RUST_BACKTRACE is set, and a user gets one line whatever the environment.
fn one_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message).trim_end()
}
