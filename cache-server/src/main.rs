use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use mora_cache::{admin, server::Daemon, socket};
use mora_common::paths::socket_path;

/// The Mora cache daemon: keeps model weights resident and lends them to
/// `mora-exec` runs, so each run starts warm.
#[derive(Parser)]
#[command(name = "mora-cache", version)]
struct Cli {
    /// Socket path [default: $MORA_SOCKET, else $XDG_RUNTIME_DIR/mora/cache.sock,
    /// else /tmp/mora-$UID/cache.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (logs to stderr; level from MORA_LOG, default info).
    Serve,
    /// List resident models: size, leases, loads, hits, last use.
    Ps {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon. Clients that map its weights keep them until they exit.
    Stop,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = socket_path(cli.socket.as_deref());
    let result = match cli.command {
        Command::Serve => serve(socket),
        Command::Ps { json } => admin::list(&socket).map_err(anyhow::Error::from).map(|models| {
            if json {
                println!("{}", admin::to_json(&models));
            } else {
                print!("{}", admin::to_table(&models));
            }
        }),
        Command::Stop => admin::stop(&socket, Duration::from_secs(10)).map_err(anyhow::Error::from).map(|stopped| {
            if stopped {
                eprintln!("mora-cache: stopped the daemon at {}", socket.display());
            } else {
                eprintln!("mora-cache: no daemon at {}; nothing to stop", socket.display());
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mora-cache: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(socket_path: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MORA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let bound = socket::bind(&socket_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(Arc::new(Daemon::new()).serve(bound))?;
    Ok(())
}
