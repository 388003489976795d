//! The models a workflow declares (its `[models.NAME]` tables).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use mora_common::manifest::WeightDType;
use mora_common::protocol::DeviceSpec;
use mora_common::units::KeepAlive;
use mora_common::ModelSource;

use super::error::WorkflowError;
use crate::template::normalize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelDecl {
    repo: Option<String>,
    revision: Option<String>,
    path: Option<PathBuf>,
    /// The weight files' variant (`fp16`: `*.fp16.safetensors`).
    variant: Option<String>,
    dtype: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    keep_alive: Option<Spanned<KeepAliveDecl>>,
    /// The LoRA adapters its image and generate steps apply unless a step
    /// gives its own `loras`.
    loras: Option<Vec<Spanned<LoraDecl>>>,
}

/// One entry of `loras = [...]`: `{ path = "..." }` or `{ repo = "OWNER/NAME" }`,
/// with an optional `scale` (default 1) and `weight_name` (the file, where
/// the folder holds several).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoraDecl {
    repo: Option<String>,
    revision: Option<String>,
    path: Option<PathBuf>,
    weight_name: Option<String>,
    scale: Option<f64>,
}

/// A LoRA adapter a step applies, and its scale (diffusers' `lora_scale`,
/// PEFT's `set_scale`): the update is `scale · alpha / r · B A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub source: LoraSource,
    pub scale: f64,
}

/// Where an adapter's files are.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraSource {
    /// A file or a directory (relative paths anchored at the workflow's).
    Path { path: PathBuf, weight_name: Option<String> },
    /// A hub repo in the Hugging Face cache (`mora-cache pull` fetches it).
    Repo { source: ModelSource, weight_name: Option<String> },
}

impl LoraSpec {
    /// How messages and reports name it: the path, or the repo id.
    pub fn display_name(&self) -> String {
        let (base, weight) = match &self.source {
            LoraSource::Path { path, weight_name } => (path.display().to_string(), weight_name),
            LoraSource::Repo { source, weight_name } => (source.display_name(), weight_name),
        };
        match weight {
            Some(w) => format!("{base} ({w})"),
            None => base,
        }
    }

    /// The file or directory to read: a repo is looked up in the Hugging
    /// Face cache, offline, as models are.
    pub fn locate(&self) -> Result<PathBuf, mora_common::model::ResolveError> {
        let (dir, weight_name) = match &self.source {
            LoraSource::Path { path, weight_name } => (path.clone(), weight_name),
            LoraSource::Repo { source, weight_name } => (source.resolve_dir()?, weight_name),
        };
        Ok(match weight_name {
            Some(w) => dir.join(w),
            None => dir,
        })
    }
}

/// The adapters `decls` declare; `what` names their owner in messages.
pub(crate) fn lora_specs(
    what: &str,
    decls: &[Spanned<LoraDecl>],
    base: &Path,
    at: &dyn Fn(Option<Range<usize>>, String) -> WorkflowError,
) -> Result<Vec<LoraSpec>, WorkflowError> {
    decls
        .iter()
        .map(|decl| {
            let span = Some(decl.span());
            let d = decl.get_ref();
            let weight_name = match &d.weight_name {
                Some(w) if w.is_empty() || w.contains('/') || w.contains('\\') || w == ".." => {
                    return Err(at(span, format!("{what}: `weight_name` is a file name in the adapter's folder, not `{w}`")))
                }
                w => w.clone(),
            };
            let source = match (&d.repo, &d.path) {
                (Some(repo), None) => LoraSource::Repo { source: ModelSource::hf_repo(repo, d.revision.as_deref()), weight_name },
                (None, Some(p)) => {
                    if d.revision.is_some() {
                        return Err(at(span, format!("{what}: a LoRA's `revision` applies to `repo`, not to `path`")));
                    }
                    LoraSource::Path { path: normalize(&base.join(p)), weight_name }
                }
                (Some(_), Some(_)) => return Err(at(span, format!("{what}: a LoRA gives both `repo` and `path`: keep one"))),
                (None, None) => return Err(at(span, format!("{what}: a LoRA needs `path = \"FILE_OR_DIR\"` or `repo = \"OWNER/NAME\"`"))),
            };
            let scale = d.scale.unwrap_or(1.0);
            if !scale.is_finite() {
                return Err(at(span, format!("{what}: a LoRA's `scale` must be a finite number, not {scale}")));
            }
            Ok(LoraSpec { source, scale })
        })
        .collect()
}

/// `keep_alive = "10m"`, or the integers `-1` (forever) and `0` (at once).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeepAliveDecl {
    Int(i64),
    Text(String),
}

/// A model a workflow declares.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub source: ModelSource,
    pub dtype: WeightDType,
    /// Where the weights are held and the model runs: `cpu`, `cuda:N`, or
    /// `auto` (the default: the first GPU when there is one).
    pub device: DeviceSpec,
    /// Asked of the daemon with every acquire; `None` keeps the daemon's.
    pub keep_alive: Option<KeepAlive>,
    /// LoRA adapters its image and generate steps apply by default.
    pub loras: Vec<LoraSpec>,
}

/// The model `[models.KEY]` declares; relative paths are anchored at
/// `base`, errors located by `at`.
pub(crate) fn model_spec(
    key: &str,
    decl: &Spanned<ModelDecl>,
    base: &Path,
    at: &dyn Fn(Option<Range<usize>>, String) -> WorkflowError,
) -> Result<ModelSpec, WorkflowError> {
        let span = Some(decl.span());
        let decl = decl.get_ref();
        let source = match (&decl.repo, &decl.path) {
            (Some(repo), None) => ModelSource::hf_repo(repo, decl.revision.as_deref()),
            (None, Some(p)) => {
                if decl.revision.is_some() {
                    return Err(at(span, format!("model `{key}`: `revision` applies to `repo`, not to `path`")));
                }
                ModelSource::Dir { path: normalize(&base.join(p)), variant: None }
            }
            (Some(_), Some(_)) => {
                return Err(at(span, format!("model `{key}` gives both `repo` and `path`: keep one")))
            }
            (None, None) => {
                return Err(at(span, format!("model `{key}` needs `repo = \"OWNER/NAME\"` or `path = \"DIR\"`")))
            }
        };
        let source = source.with_variant(decl.variant.clone());
        let dtype = match &decl.dtype {
            Some(d) => d.get_ref().parse().map_err(|e: String| at(Some(d.span()), format!("model `{key}`: {e}")))?,
            None => WeightDType::default(),
        };
        let device = match &decl.device {
            Some(d) => d.get_ref().parse().map_err(|e: String| at(Some(d.span()), format!("model `{key}`: {e}")))?,
            None => DeviceSpec::default(),
        };
        let keep_alive = match &decl.keep_alive {
            None => None,
            Some(k) => {
                let text = match k.get_ref() {
                    KeepAliveDecl::Int(i) => i.to_string(),
                    KeepAliveDecl::Text(t) => t.clone(),
                };
                Some(KeepAlive::parse(&text).map_err(|e| at(Some(k.span()), format!("model `{key}`: keep_alive {e}")))?)
            }
        };
    let loras = match &decl.loras {
        Some(l) => lora_specs(&format!("model `{key}`"), l, base, at)?,
        None => Vec::new(),
    };
    Ok(ModelSpec { source, dtype, device, keep_alive, loras })
}
