//! The Mora exec client: runs a workflow on model weights borrowed from the
//! cache daemon, or loaded in-process with `--no-cache`.
//!
//! - [`workflow`] parses and checks workflow files;
//! - [`daemon`] reaches the daemon, starting one if needed;
//! - [`weights`] maps lent segments (or loads files) for candle;
//! - `cuda` (feature `cuda`) views a daemon's GPU allocation as candle tensors;
//! - [`generate`] runs a decoder (`mora_models::decoder`), greedy or sampled;
//! - [`chat`] renders chat messages with a model's own chat template;
//! - [`tasks`] holds each step task (embed, rank, generate, image): its keys, what it
//!   reads before any weight is, and its run;
//! - [`template`] is the `{{ }}` text of workflows, shared by the reader and the tasks;
//! - [`phases`] times a run's phases for `MORA_PHASES=1`;
//! - [`run`] ties them together: the order of steps, the leases, the outputs;
//! - [`watch`] re-runs a workflow in a fresh process whenever its files change;
//! - [`repl`] is an interactive loop over one workflow, each run a fresh process;
//!
//! The networks are `mora-models`' and the tokenizers `mora-tokenizers'`:
//! this crate maps the weights they run on and runs the workflow around them.
//!
//! Architecture invariant: the client never frees or writes weights it did
//! not allocate. A lent segment is sealed and mapped read-only; lent GPU
//! memory is viewed by tensors that are never dropped; the lease that keeps
//! either resident belongs to the connection and ends with it.

pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod daemon;
pub mod generate;
pub mod heap;
pub mod lent;
pub mod lora;
pub mod phases;
pub mod repl;
pub mod run;
pub mod tasks;
pub mod template;
pub mod watch;
pub mod weights;
pub mod workflow;

use std::path::PathBuf;

use mora_common::protocol::{ErrorReply, GpuUuid, Response};

/// Everything that can stop a run, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Workflow(#[from] workflow::error::WorkflowError),
    /// What a step reads, makes or is handed is wrong.
    #[error("step `{step}`: {source}")]
    Step { step: String, source: Box<StepError> },
    /// A model of the workflow cannot be found, fetched or run as its step asks.
    #[error("model `{model}`: {source}")]
    Model { model: String, source: Box<ModelError> },
    #[error("no cache daemon is listening at {}: start one with `mora-cache serve`, or drop --no-autostart", socket.display())]
    NoDaemon { socket: PathBuf },
    #[error(transparent)]
    Connect(mora_common::connection::ConnectError),
    /// The connection closed while the daemon loaded `model`.
    #[error(
        "the cache daemon exited during the load of {model} (see its log beside the socket); \
         run again to start a new one, or use --no-cache"
    )]
    DaemonExited { model: String },
    /// The daemon refused a request; its message says why.
    #[error("{}", .0.message)]
    Daemon(ErrorReply),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Call(#[from] mora_common::connection::CallError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Embed(Box<mora_models::embed::EmbedError>),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error(transparent)]
    Generate(Box<generate::GenerateError>),
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A panic's message (see [`guarded`]).
    #[error("internal error: {0} (a bug in mora-exec or a library it uses; the daemon and its models are unaffected)")]
    Panic(String),
}

// The larger errors are boxed, so that every `Result<_, ExecError>` stays small.

impl ExecError {
    /// An error of the step `step`.
    pub fn step(step: &str, source: impl Into<StepError>) -> ExecError {
        ExecError::Step { step: step.to_string(), source: Box::new(source.into()) }
    }

    /// An error of the workflow's model `model`.
    pub fn model(model: &str, source: impl Into<ModelError>) -> ExecError {
        ExecError::Model { model: model.to_string(), source: Box::new(source.into()) }
    }
}

impl From<mora_models::embed::EmbedError> for ExecError {
    fn from(e: mora_models::embed::EmbedError) -> ExecError {
        ExecError::Embed(Box::new(e))
    }
}

impl From<generate::GenerateError> for ExecError {
    fn from(e: generate::GenerateError) -> ExecError {
        ExecError::Generate(Box::new(e))
    }
}

/// What is wrong with a step's inputs, output or results.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A prompt names an earlier step's text, and it made none.
    #[error("step `{0}` produced no text (a rank step with no matches?)")]
    NoText(String),
    /// `init_image` names an earlier step, and it made no image.
    #[error("step `{0}` made no image")]
    NoImage(String),
    /// The chat template does not render these messages.
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    /// `what` (`image`, `init_image`) is of a size the pipeline cannot make.
    #[error("{what} size {width}x{height}: {source}")]
    Size { what: &'static str, width: usize, height: usize, source: mora_models::image::pipeline::PipelineError },
    #[error(transparent)]
    Pipeline(#[from] mora_models::image::pipeline::PipelineError),
    #[error(transparent)]
    Png(#[from] mora_models::image::pipeline::PngError),
    #[error(transparent)]
    Lora(#[from] lora::LoraStepError),
}

/// A step's input that cannot be read: checked before any model is acquired.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read texts_file {}: {source}", path.display())]
    Texts { path: PathBuf, source: std::io::Error },
    #[error("texts_file {} holds no texts", .0.display())]
    NoTexts(PathBuf),
    #[error("init_image {0}")]
    InitImage(#[source] mora_models::image::pipeline::PngError),
}

/// An output path refused, or an output that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "output {} is an absolute path: outputs go inside the output directory (-o), unless --allow-outside-output",
        .0.display()
    )]
    Absolute(PathBuf),
    #[error("output {} climbs out of the output directory with `..` (allowed only with --allow-outside-output)", .0.display())]
    ClimbsOut(PathBuf),
    #[error(
        "output {} leads outside the output directory {} through a symlink (allowed only with --allow-outside-output)",
        path.display(),
        dir.display()
    )]
    Symlink { path: PathBuf, dir: PathBuf },
    #[error("output {} of an image step must be a .png file", .0.display())]
    NotPng(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// Why a model of the workflow cannot be used by its step.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Resolve(#[from] mora_common::model::ResolveError),
    #[error(transparent)]
    Device(#[from] mora_common::gpu::DeviceError),
    #[error(transparent)]
    Pull(#[from] mora_common::hub::HubError),
    /// A decoder's config asks for a network Mora does not run.
    #[error(transparent)]
    Config(#[from] mora_models::lm_config::ConfigError),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error(transparent)]
    Pipeline(#[from] mora_models::image::pipeline::PipelineError),
}

/// A reply of the daemon that breaks the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("unexpected reply to acquire: {0:?}")]
    UnexpectedReply(Box<Response>),
    #[error(transparent)]
    Lent(#[from] mora_common::acquired::LentError),
    /// The lent segment of `model` cannot be mapped.
    #[error("{model}: {source}")]
    Map { model: String, source: mora_common::segment::SegmentError },
    #[error("{model}: the daemon lent GPU memory to a build without CUDA")]
    GpuWithoutCuda { model: String },
}

/// Weights that cannot be opened on their device, or read in-process.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("GPU {0}: this mora-exec was built without CUDA (build with scripts/build-cuda.sh)")]
    NoCuda(GpuUuid),
    /// The GPU cannot be opened (`cuda::candle_device`'s reason).
    #[cfg(feature = "cuda")]
    #[error("{0}")]
    OpenGpu(String),
    /// Lent GPU memory cannot be viewed (`cuda::import`'s reason).
    #[cfg(feature = "cuda")]
    #[error("{model}: {message}")]
    ImportGpu { model: String, message: String },
    #[error(transparent)]
    Resolve(mora_common::model::ResolveError),
    #[error("cannot load {}: {source}", file.display())]
    Load { file: PathBuf, source: candle_core::Error },
    #[error("cannot convert {model}: {source}")]
    Convert { model: String, source: candle_core::Error },
}

/// Runs `f`, turning a panic (candle's model code asserts on some malformed
/// inputs) into an error, so that a user sees one line, not a backtrace.
/// `main` installs a panic hook that stays silent; the message comes back here.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, ExecError>) -> Result<T, ExecError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(ExecError::Panic(msg.replace('\n', " ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_one_line_error() {
        let e = guarded::<()>(|| panic!("index out of bounds:\nthe len is 3")).unwrap_err().to_string();
        assert!(e.starts_with("internal error: index out of bounds: the len is 3 ("), "{e}");
        assert!(!e.contains('\n'));
        assert_eq!(guarded(|| Ok(7)).unwrap(), 7);
        let e = guarded::<()>(|| Err(ExecError::step("s", StepError::NoImage("t".into())))).unwrap_err().to_string();
        assert_eq!(e, "step `s`: step `t` made no image");
    }
}
