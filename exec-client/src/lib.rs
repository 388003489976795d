//! The Mora exec client: runs a workflow on model weights borrowed from the
//! cache daemon, or loaded in-process with `--no-cache`.
//!
//! - [`workflow`] parses and checks workflow files;
//! - [`daemon`] reaches the daemon, starting one if needed;
//! - [`weights`] maps lent segments (or loads files) for candle;
//! - `cuda` (feature `cuda`) views a daemon's GPU allocation as candle tensors;
//! - [`embed`] runs BERT with sentence-transformers pooling;
//! - [`generate`] runs llama-family and qwen2 decoders, greedy or sampled;
//! - [`run`] ties them together and writes outputs;
//! - [`watch`] re-runs a workflow in a fresh process whenever its files change;
//! - [`synth`] writes deterministic random-weight models for tests and benchmarks.
//!
//! Architecture invariant: the client never frees or writes weights it did
//! not allocate. A lent segment is sealed and mapped read-only; lent GPU
//! memory is viewed by tensors that are never dropped; the lease that keeps
//! either resident belongs to the connection and ends with it.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod daemon;
pub mod embed;
pub mod generate;
pub mod run;
pub mod synth;
pub mod watch;
pub mod weights;
pub mod workflow;

/// Everything that can stop a run, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Workflow(#[from] workflow::WorkflowError),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Daemon(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Call(#[from] mora_common::connection::CallError),
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Output(String),
}
