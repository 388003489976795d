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
pub mod lent;
pub mod phases;
pub mod repl;
pub mod run;
pub mod tasks;
pub mod template;
pub mod threads;
pub mod watch;
pub mod weights;
pub mod workflow;

/// Everything that can stop a run, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Workflow(#[from] workflow::error::WorkflowError),
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
    #[error("internal error: {0} (a bug in mora-exec or a library it uses; the daemon and its models are unaffected)")]
    Panic(String),
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
        let e = guarded::<()>(|| Err(ExecError::Input("bad".into()))).unwrap_err().to_string();
        assert_eq!(e, "bad");
    }
}
