use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mora_common::paths::socket_path;
use mora_exec::run::{describe, run, RunOptions};
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
    let Command::Run { workflow, socket, no_cache, no_autostart, output_dir } = Cli::parse().command;
    let result = Workflow::load(&workflow).map_err(Into::into).and_then(|wf| {
        let opts = RunOptions {
            socket: socket_path(socket.as_deref()),
            no_cache,
            autostart: !no_autostart,
            output_dir,
        };
        run(&wf, &opts)
    });
    match result {
        Ok(reports) => {
            for r in &reports {
                println!("{}", describe(r));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mora-exec: error: {e}");
            ExitCode::FAILURE
        }
    }
}
