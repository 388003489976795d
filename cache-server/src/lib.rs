//! The Mora cache daemon: owns model weights in sealed shared memory and
//! lends them to clients under leases.
//!
//! - [`admin`] implements `ps` and `stop` as clients of a running daemon;
//! - [`socket`] claims the socket path (lock, stale socket, permissions);
//! - [`server`] runs the accept loop and speaks the protocol;
//! - [`registry`] keeps the resident models and their leases;
//! - [`checkpoint`] reads safetensors files into sealed segments.

pub mod admin;
pub mod checkpoint;
pub mod registry;
pub mod server;
pub mod socket;
