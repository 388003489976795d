//! A step's LoRA adapters (`loras = [...]`): read before any lease, matched
//! to each component's weights when the step builds its networks, and
//! checked against the base's files by `mora-exec check`.
//!
//! The networks never see an adapter: each component's `VarBuilder` is
//! wrapped by [`mora_models::lora::merged`], which hands out private copies
//! of the targeted tensors with the updates added and the base's own
//! (lent, shared, read-only) tensors for everything else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mora_models::lora::{Adapter, Deltas, LoraError};

use crate::workflow::decl::LoraSpec;

/// An adapter a step applies: as declared, and as read.
#[derive(Debug, Clone)]
pub struct Applied {
    pub spec: LoraSpec,
    pub adapter: Adapter,
}

/// Why a step's adapters cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoraStepError {
    #[error("LoRA {name}: {source}")]
    Locate { name: String, source: mora_common::model::ResolveError },
    #[error("LoRA {0}")]
    Adapter(#[from] LoraError),
    #[error("LoRA {}: it updates `{component}`, which {what} does not have (it has {})", file.display(), has.join(", "))]
    Component { file: PathBuf, component: String, what: String, has: Vec<String> },
    #[error("LoRA {}: a {format} adapter of a pipeline's components (unet, text encoders) does not apply to the decoder {what}", file.display())]
    NotADecoderAdapter { file: PathBuf, format: &'static str, what: String },
    #[error("LoRA {}: a PEFT adapter of a single model does not apply to the pipeline {what}: give a diffusers or Kohya LoRA", file.display())]
    NotAPipelineAdapter { file: PathBuf, what: String },
    #[error("cannot read the base's weights header {}: {message}", file.display())]
    BaseHeader { file: PathBuf, message: String },
}

/// Reads every adapter of `specs`, in order.
pub fn read(specs: &[LoraSpec]) -> Result<Vec<Applied>, LoraStepError> {
    specs
        .iter()
        .map(|spec| {
            let path = spec.locate().map_err(|source| LoraStepError::Locate { name: spec.display_name(), source })?;
            Ok(Applied { spec: spec.clone(), adapter: Adapter::read(&path)? })
        })
        .collect()
}

/// Reads every adapter of `specs` through the daemon: each adapter's
/// weights file is a cache entry of its own (keyed by its content, in `ps`,
/// evictable, held once however many runs and workflows use it), lent like
/// any model's, in `dtype` on `device`. The returned weights hold the
/// leases: they must outlive the networks built on the adapters.
pub fn read_lent(
    step: &str,
    specs: &[LoraSpec],
    conn: &mora_common::connection::Connection,
    dtype: mora_common::manifest::WeightDType,
    device: mora_common::protocol::Device,
    keep_alive: Option<mora_common::units::KeepAlive>,
) -> Result<(Vec<Applied>, Vec<crate::weights::Weights>), crate::ExecError> {
    let mut applied = Vec::new();
    let mut leases = Vec::new();
    for spec in specs {
        let fail = |e: LoraStepError| crate::ExecError::step(step, e);
        let path = spec.locate().map_err(|source| fail(LoraStepError::Locate { name: spec.display_name(), source }))?;
        let file = Adapter::weights_file(&path).map_err(|e| fail(e.into()))?;
        let lent = crate::weights::Weights::from_daemon(conn, mora_common::ModelSource::dir(&file), dtype, device, keep_alive)?;
        let vb = lent.var_builder(candle_core::DType::F32);
        let names: Vec<String> = lent.shapes().into_keys().collect();
        let tensors = |_: &Path| -> Result<HashMap<String, candle_core::Tensor>, LoraError> {
            names
                .iter()
                .map(|n| vb.get_unchecked(n).map(|t| (n.clone(), t)).map_err(|e| LoraError::Invalid { path: file.clone(), message: format!("`{n}` as lent: {e}") }))
                .collect()
        };
        let adapter = Adapter::read_with(&path, &tensors).map_err(|e| fail(e.into()))?;
        applied.push(Applied { spec: spec.clone(), adapter });
        leases.push(lent);
    }
    Ok((applied, leases))
}

/// Refuses adapters that update components `what` does not have; a
/// decoder's `components` is `[""]`.
pub fn check_components(applied: &[Applied], what: &str, components: &[&str]) -> Result<(), LoraStepError> {
    let decoder = components == [""];
    for a in applied {
        for c in a.adapter.components() {
            if decoder && !c.is_empty() {
                return Err(LoraStepError::NotADecoderAdapter { file: a.adapter.file.clone(), format: a.adapter.format.name(), what: what.into() });
            }
            if !decoder && c.is_empty() {
                return Err(LoraStepError::NotAPipelineAdapter { file: a.adapter.file.clone(), what: what.into() });
            }
            if !components.contains(&c) {
                return Err(LoraStepError::Component {
                    file: a.adapter.file.clone(),
                    component: c.into(),
                    what: what.into(),
                    has: components.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
    }
    Ok(())
}

/// The updates of `component` (named `what` in messages) from every
/// adapter, each at its step's scale, matched to the base's tensor
/// `shapes`.
pub fn deltas(applied: &[Applied], component: &str, what: &str, shapes: &HashMap<String, Vec<usize>>) -> Result<Deltas, LoraStepError> {
    let mut into = Deltas::new();
    if applied.is_empty() {
        return Ok(into);
    }
    for a in applied {
        a.adapter.resolve(component, what, shapes, a.spec.scale, &mut into)?;
    }
    Ok(into)
}

/// The tensor shapes of a base's safetensors files, from their headers.
pub fn header_shapes(files: &[PathBuf]) -> Result<HashMap<String, Vec<usize>>, LoraStepError> {
    let mut shapes = HashMap::new();
    for file in files {
        let header = mora_common::safetensors::read_header(file).map_err(|e| LoraStepError::BaseHeader { file: file.clone(), message: e.reason() })?;
        shapes.extend(mora_common::safetensors::shapes(&header));
    }
    Ok(shapes)
}

/// What a step's JSON records of its adapters, to make the result again.
pub fn report(applied: &[Applied]) -> serde_json::Value {
    serde_json::Value::Array(
        applied
            .iter()
            .map(|a| {
                serde_json::json!({
                    "adapter": a.spec.display_name(),
                    "file": a.adapter.file.display().to_string(),
                    "format": a.adapter.format.name(),
                    "scale": a.spec.scale,
                })
            })
            .collect(),
    )
}
