//! The Mora cache daemon: owns model weights in sealed shared memory (and,
//! in a CUDA build, in GPU memory) and lends them to clients under leases.
//!
//! - [`admin`] implements the admin commands as clients of a running daemon;
//! - [`socket`] claims the socket path (lock, stale socket, permissions);
//! - [`server`] runs the accept loop and speaks the protocol;
//! - [`registry`] keeps the resident models, their leases, the budget and eviction;
//! - [`identity`] names weight files by content, so copies are held once;
//! - [`memory`] reads what the machine has, for the default budget;
//! - [`checkpoint`] reads safetensors files into sealed segments or GPU memory;
//! - [`metrics`] counts what the daemon does and reads the cache's state for
//!   Prometheus, and [`scrape`] serves it over HTTP (`serve --metrics`);
//! - [`gpu`] is GPU memory behind a trait (a fake in test builds), and `cuda`
//!   (feature `cuda`) its implementation over the CUDA driver.

pub mod admin;
pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gpu;
pub mod identity;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod scrape;
pub mod server;
pub mod socket;
