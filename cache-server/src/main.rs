use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use mora_cache::admin;
use mora_cache::registry::Limits;
use mora_cache::{memory, scrape, server::Daemon, socket};
use mora_common::manifest::WeightDType;
use mora_common::paths::socket_path;
use mora_common::protocol::{DeviceSpec, Request};
use mora_common::units::{human_bytes, parse_size, KeepAlive};

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

#[derive(Args)]
struct Target {
    /// A Hugging Face repo id (OWNER/NAME[@REVISION]) or a model directory.
    model: String,
    /// Only the copy held in this dtype (f32, f16, bf16) [default: every copy].
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<WeightDType>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (logs to stderr; level from MORA_LOG, default info).
    Serve {
        /// Most memory resident models may use, e.g. 8GiB, 512MiB, 2GB
        /// [default: half of the memory available when the daemon starts].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_memory: Option<u64>,
        /// How long an idle model stays resident: 30m, 1h, 90s; -1 forever; 0 evict
        /// when its last lease ends. A workflow's `keep_alive` overrides it per model.
        #[arg(long, value_name = "DURATION", default_value = "30m", allow_hyphen_values = true, value_parser = KeepAlive::parse)]
        keep_alive: KeepAlive,
        /// Serve Prometheus metrics over HTTP at http://ADDR/metrics; ADDR is HOST:PORT,
        /// e.g. 127.0.0.1:9477 (port 0 picks a free one, logged at start) [default: off].
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// List resident models: names, size, leases, pin, loads, hits, last use, expiry.
    Ps {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load a model into the cache now, without running anything. A diffusers
    /// pipeline (a folder with model_index.json) loads each of its components
    /// with weights (text encoders, UNet, VAE), each its own cache entry.
    Load {
        /// A Hugging Face repo id (OWNER/NAME[/FOLDER][@REVISION], FOLDER one
        /// component of a pipeline) or a model directory.
        model: String,
        /// The weight files' variant: `fp16` loads `*.fp16.safetensors`, as
        /// diffusers' `variant="fp16"`.
        #[arg(long)]
        variant: Option<String>,
        /// Hold the weights in this dtype.
        #[arg(long, default_value = "f32", value_parser = parse_dtype)]
        dtype: WeightDType,
        /// Where: cpu, cuda:N (this process's numbering) or auto (the first GPU if
        /// this build has CUDA and the machine a GPU, else cpu), as in a workflow.
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceSpec,
        /// Protect it from eviction until `unpin`.
        #[arg(long)]
        pin: bool,
        /// Its keep-alive (see `serve --keep-alive`).
        #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = KeepAlive::parse)]
        keep_alive: Option<KeepAlive>,
    },
    /// Download a model from the Hugging Face hub into the hub cache
    /// ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), where
    /// `load` and workflows find it. By default only what Mora runs: safetensors,
    /// JSON configs, tokenizer and chat-template files; of a diffusers pipeline,
    /// its index and the scheduler, tokenizer, text encoder, UNet and VAE
    /// folders with their plain weights (no `*.fp16.*` variants beside them, no
    /// single-file checkpoints at the root). Files already there are
    /// not downloaded again; an interrupted pull resumes. Reads HF_ENDPOINT,
    /// HF_TOKEN (or the token file `hf auth login` writes) and HF_HUB_OFFLINE.
    Pull {
        /// OWNER/NAME, optionally @REVISION (a branch, tag or commit) [default: main].
        model: String,
        /// Fetch only files matching this pattern (repeatable; fnmatch as in
        /// huggingface_hub: `*.safetensors`, `onnx/`); replaces the default set.
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        /// Skip files matching this pattern (repeatable).
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Of a diffusers pipeline: the weight variant to fetch where a folder
        /// has it (`fp16`: `*.fp16.safetensors` instead of the plain files).
        #[arg(long)]
        variant: Option<String>,
    },
    /// Evict a model now. Refused while a client holds a lease on it, or while it is pinned.
    Evict(Target),
    /// Protect a resident model from eviction.
    Pin(Target),
    /// Let a pinned model be evicted again.
    Unpin(Target),
    /// Evict every model that has no lease and no pin.
    Clear,
    /// Stop the daemon. Clients that map its weights keep them until they exit.
    Stop,
}

/// GPU options of `serve`, in builds with CUDA.
#[derive(Args)]
struct GpuArgs {
    /// GPU memory left out of each GPU's budget for the clients' CUDA contexts and
    /// activations [default: 10% of the GPU, at least 2GiB].
    #[cfg(feature = "cuda")]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    gpu_reserve: Option<u64>,
    /// Most GPU memory resident models may use on each GPU [default: the memory free
    /// when the daemon starts, minus --gpu-reserve].
    #[cfg(feature = "cuda")]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_gpu_memory: Option<u64>,
}

fn parse_dtype(s: &str) -> Result<WeightDType, String> {
    s.parse()
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = socket_path(cli.socket.as_deref());
    match run(cli.command, socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mora-cache: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, socket: PathBuf) -> anyhow::Result<()> {
    match command {
        Command::Serve { max_memory, keep_alive, metrics, gpu } => serve(socket, max_memory, keep_alive, metrics, gpu)?,
        Command::Ps { json } => {
            let status = admin::status(&socket)?;
            if json {
                println!("{}", admin::to_json(&status.models));
            } else {
                print!("{}", admin::to_table(&status));
            }
        }
        Command::Load { model, variant, dtype, device, pin, keep_alive } => {
            let device = mora_common::gpu::resolve(device).map_err(anyhow::Error::msg)?;
            let source = mora_common::ModelSource::from_arg(&model).with_variant(variant);
            // A pipeline is loaded component by component; a model in one go.
            let parts = match mora_common::pipeline::components(&source) {
                Ok(Some(parts)) => parts.into_iter().map(|(_, s)| s).collect(),
                Ok(None) => vec![source],
                // Not resolvable here: the daemon says why, as for any model.
                Err(_) => vec![source],
            };
            for part in parts {
                let name = part.display_name();
                match admin::load(&socket, part, dtype, device, pin, keep_alive)? {
                    Some(m) => println!(
                        "{} ({}, {}) resident: {}{}; keep-alive {}",
                        m.name,
                        m.device,
                        m.dtype,
                        human_bytes(m.bytes),
                        if m.pinned { ", pinned" } else { "" },
                        m.keep_alive
                    ),
                    None => println!("{name} loaded and released at once (keep-alive 0)"),
                }
            }
        }
        Command::Pull { model, include, exclude, variant } => pull(&model, &include, &exclude, variant.as_deref())?,
        Command::Evict(t) => {
            let (models, bytes) = admin::change(&socket, Request::Evict { target: admin::selector(&t.model, t.dtype) })?;
            println!("evicted {} ({} freed)", models.join(", "), human_bytes(bytes));
        }
        Command::Pin(t) => {
            let (models, _) = admin::change(&socket, Request::Pin { target: admin::selector(&t.model, t.dtype) })?;
            println!("pinned {}", models.join(", "));
        }
        Command::Unpin(t) => {
            let (models, _) = admin::change(&socket, Request::Unpin { target: admin::selector(&t.model, t.dtype) })?;
            println!("unpinned {}", models.join(", "));
        }
        Command::Clear => {
            let (models, bytes) = admin::change(&socket, Request::Clear)?;
            if models.is_empty() {
                println!("nothing to evict: every resident model is leased or pinned");
            } else {
                println!("evicted {} ({} freed)", models.join(", "), human_bytes(bytes));
            }
        }
        Command::Stop => {
            if admin::stop(&socket, Duration::from_secs(10))? {
                eprintln!("mora-cache: stopped the daemon at {}", socket.display());
            } else {
                eprintln!("mora-cache: no daemon at {}; nothing to stop", socket.display());
            }
        }
    }
    Ok(())
}

fn pull(model: &str, include: &[String], exclude: &[String], variant: Option<&str>) -> anyhow::Result<()> {
    use mora_common::hub::{FileFilter, Hub};
    if std::path::Path::new(model).is_dir() {
        anyhow::bail!("{model} is a local directory: pull takes a Hugging Face repo id (OWNER/NAME[@REVISION])");
    }
    let (repo, revision) = model.split_once('@').unwrap_or((model, "main"));
    let filter = FileFilter::new(include, exclude)?.with_variant(variant);
    let hub = Hub::from_env();
    let mut progress = mora_common::progress::PullProgress::new("mora-cache");
    let pulled = hub.pull(repo, revision, &filter, &mut |e| progress.event(e))?;
    if pulled.offline {
        println!("{model}: HF_HUB_OFFLINE is set; the cache holds commit {} at {}", pulled.commit, pulled.snapshot.display());
        return Ok(());
    }
    let total: u64 = pulled.files.iter().map(|f| f.size).sum();
    let fetched = pulled.files.iter().filter(|f| f.downloaded > 0).count();
    println!(
        "{model}: {} file(s), {} at commit {}; {}; in {}",
        pulled.files.len(),
        human_bytes(total),
        pulled.commit,
        if fetched == 0 {
            "all already in the cache".to_string()
        } else {
            format!("downloaded {} ({fetched} file(s))", human_bytes(pulled.downloaded_bytes()))
        },
        pulled.snapshot.display()
    );
    Ok(())
}

fn serve(
    socket_path: PathBuf,
    max_memory: Option<u64>,
    keep_alive: KeepAlive,
    metrics: Option<String>,
    gpu: GpuArgs,
) -> anyhow::Result<()> {
    let format = mora_common::logging::log_format()?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MORA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        // One JSON object a line, the event's fields at the top level.
        mora_common::logging::LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
        // Colours only on a terminal: the log of a daemon started by
        // mora-exec is a file, read by people and scripts.
        mora_common::logging::LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    let budget = match max_memory {
        Some(b) => b,
        None => memory::default_budget()?,
    };
    // A socket handed over by systemd (socket activation), else our own.
    let bound = match socket::adopt()? {
        Some(adopted) => {
            if adopted.path() != socket_path {
                tracing::info!(socket = %adopted.path().display(), "serving the socket the service manager passed");
            }
            adopted
        }
        None => socket::bind(&socket_path)?,
    };
    // After the socket: a second daemon on the same path is told so, not
    // that the metrics port is taken.
    let metrics = metrics.as_deref().map(scrape::bind).transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let limits = Limits { budget, default_keep_alive: keep_alive };
    let daemon = Arc::new(Daemon::with_gpus(limits, open_gpus(gpu)));
    runtime.block_on(daemon.serve(bound, metrics))?;
    Ok(())
}

/// The GPUs to hold weights on: every one this process sees, in a CUDA build
/// on a machine with a usable driver; none otherwise (CPU requests only).
fn open_gpus(args: GpuArgs) -> Option<Arc<dyn mora_cache::gpu::GpuMemory>> {
    #[cfg(feature = "cuda")]
    {
        match mora_cache::cuda::CudaGpus::open(args.gpu_reserve, args.max_gpu_memory) {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => {
                tracing::warn!(error = %e, "no usable GPU; serving CPU requests only");
                None
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let GpuArgs {} = args;
        None
    }
}
