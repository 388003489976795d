//! What the Mora cache daemon and its clients share: the wire protocol, the
//! frame codec, sealed shared-memory segments, tensor manifests, model
//! references, diffusers pipelines and the socket path.
//!
//! Neither the daemon (`mora-cache`) nor the exec client (`mora-exec`) depends
//! on the other; both depend on this crate.

pub mod acquired;
pub mod connection;
pub mod convert;
pub mod frame;
pub mod gpu;
#[cfg(feature = "hub")]
pub mod hub;
pub mod logging;
pub mod manifest;
pub mod model;
pub mod paths;
pub mod pipeline;
pub mod progress;
pub mod protocol;
pub mod safetensors;
pub mod segment;
pub mod units;


pub use manifest::{Manifest, TensorDType, TensorEntry};
pub use model::{ModelSource, ResolvedModel};
pub use protocol::{Request, Response, PROTOCOL_VERSION};
