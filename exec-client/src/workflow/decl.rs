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
    Ok(ModelSpec { source, dtype, device, keep_alive })
}
