//! Diffusers pipelines: a folder whose `model_index.json` names the
//! pipeline's class and, for each component, the library and class that
//! load it from the folder of the same name (`unet/`, `vae/`, ...).
//!
//! Mora holds each component that has weights as a cache entry of its own,
//! keyed by content like any model, so two pipelines that share a component
//! (a VAE, a text encoder) hold it once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::{variant_name, weight_candidates, ModelSource, ResolveError, DIFFUSERS_WEIGHTS, PIPELINE_INDEX};

/// The components with weights that Mora holds in the cache, in the order
/// they are loaded. Other components of a pipeline (a safety checker, a
/// feature extractor, an image encoder) are not run, so not loaded.
pub const WEIGHTED_COMPONENTS: &[&str] = &["text_encoder", "text_encoder_2", "unet", "vae"];

/// Why a `model_index.json` cannot be read; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{}: cannot read it: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: not a JSON object", path.display())]
    NotAnObject { path: PathBuf },
    #[error("{}: no `_class_name`: not a diffusers pipeline index", path.display())]
    NoClassName { path: PathBuf },
    #[error("{}: component `{key}` is not [library, class]: {value}", path.display())]
    Component { path: PathBuf, key: String, value: Value },
}

/// A pipeline's `model_index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineIndex {
    /// `_class_name`: `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...
    pub class_name: String,
    /// Each component present (its entry not `[null, null]`): folder name to
    /// (library, class), as `["diffusers", "UNet2DConditionModel"]`.
    pub components: BTreeMap<String, (String, String)>,
    /// The pipeline's own settings: every other key not starting with `_`
    /// (`force_zeros_for_empty_prompt`, `requires_aesthetics_score`, ...).
    pub settings: serde_json::Map<String, Value>,
}

impl PipelineIndex {
    /// Reads `model_index.json` in `dir`; `None` when there is none (not a pipeline).
    pub fn read(dir: &Path) -> Result<Option<PipelineIndex>, IndexError> {
        let path = dir.join(PIPELINE_INDEX);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IndexError::Read { path, source }),
        };
        let json: Value = match serde_json::from_slice(&bytes) {
            Ok(json) => json,
            Err(source) => return Err(IndexError::Json { path, source }),
        };
        let Some(map) = json.as_object() else { return Err(IndexError::NotAnObject { path }) };
        let Some(class_name) = map.get("_class_name").and_then(Value::as_str) else {
            return Err(IndexError::NoClassName { path });
        };
        let class_name = class_name.to_string();
        let mut components = BTreeMap::new();
        let mut settings = serde_json::Map::new();
        for (key, v) in map {
            if key.starts_with('_') {
                continue;
            }
            // Components are `[library, class]`; other keys are the
            // pipeline's own settings (`requires_safety_checker`, ...).
            let Some(pair) = v.as_array() else {
                settings.insert(key.clone(), v.clone());
                continue;
            };
            match pair.as_slice() {
                [Value::Null, Value::Null] => {}
                [Value::String(l), Value::String(c)] => {
                    components.insert(key.clone(), (l.clone(), c.clone()));
                }
                _ => return Err(IndexError::Component { path, key: key.clone(), value: v.clone() }),
            }
        }
        Ok(Some(PipelineIndex { class_name, components, settings }))
    }

    /// The components Mora holds in the cache, in load order.
    pub fn weighted(&self) -> Vec<&'static str> {
        WEIGHTED_COMPONENTS.iter().copied().filter(|c| self.components.contains_key(*c)).collect()
    }
}

/// The pipeline `source` names, if its folder holds a `model_index.json`:
/// a source for each of its components with weights, in load order.
///
/// With a weight variant (`fp16`), each component's files are picked as
/// diffusers' pipeline loading picks them (`_identify_model_variants`): a
/// folder that holds weights in that variant loads them, any other folder
/// its plain weights; a pipeline with no folder in that variant is an error.
pub fn components(source: &ModelSource) -> Result<Option<Vec<(&'static str, ModelSource)>>, ResolveError> {
    let dir = source.resolve_dir()?;
    let index = match PipelineIndex::read(&dir) {
        Ok(Some(i)) => i,
        Ok(None) => return Ok(None),
        Err(e) => return Err(ResolveError::BadIndex { path: dir.join(PIPELINE_INDEX), reason: e.to_string() }),
    };
    let in_variant = |c: &str, v: &str| weight_candidates(&dir.join(c), Some(v)).iter().any(|f| f.is_file());
    let parts: Vec<(&'static str, ModelSource)> = index
        .weighted()
        .into_iter()
        .map(|c| match source.variant() {
            Some(v) if !in_variant(c, v) => (c, source.component(c).with_variant(None)),
            _ => (c, source.component(c)),
        })
        .collect();
    if let Some(v) = source.variant() {
        if !parts.is_empty() && parts.iter().all(|(_, p)| p.variant().is_none()) {
            return Err(ResolveError::NoVariant { dir, variant: v.to_string(), example: format!("unet/{}", variant_name(DIFFUSERS_WEIGHTS, Some(v))) });
        }
    }
    Ok(Some(parts))
}

/// Whether a selector naming `target` (`mora-cache evict NAME`) selects the
/// entry called `name`: the same name, or a component of the pipeline
/// `target` names (`org/sd/unet` for `org/sd`, revisions alike).
pub fn selects(target: &str, name: &str) -> bool {
    if target == name {
        return true;
    }
    let split = |s: &str| match s.split_once('@') {
        Some((base, rev)) => (base.to_string(), rev.to_string()),
        None => (s.to_string(), String::new()),
    };
    let ((tb, tr), (nb, nr)) = (split(target), split(name));
    tr == nr && nb.strip_prefix(tb.as_str()).is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_lists_present_components_and_skips_settings_and_absent_ones() {
        let d = mora_test_support::Scratch::new("pipeline");
        std::fs::write(
            d.join(PIPELINE_INDEX),
            r#"{"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0",
                "force_zeros_for_empty_prompt": true, "feature_extractor": [null, null],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#,
        )
        .unwrap();
        let index = PipelineIndex::read(&d).unwrap().unwrap();
        assert_eq!(index.class_name, "StableDiffusionXLPipeline");
        assert!(!index.components.contains_key("feature_extractor"));
        assert_eq!(index.settings.get("force_zeros_for_empty_prompt"), Some(&Value::Bool(true)));
        assert_eq!(index.weighted(), vec!["text_encoder", "text_encoder_2", "unet", "vae"]);
        let parts = components(&ModelSource::dir(d.to_path_buf())).unwrap().unwrap();
        assert_eq!(parts[2], ("unet", ModelSource::dir(d.join("unet"))));
        std::fs::write(d.join(PIPELINE_INDEX), r#"{"_class_name": "X", "unet": ["diffusers"]}"#).unwrap();
        assert!(PipelineIndex::read(&d).unwrap_err().to_string().contains("component `unet` is not [library, class]"));
        std::fs::remove_file(d.join(PIPELINE_INDEX)).unwrap();
        assert_eq!(PipelineIndex::read(&d).unwrap(), None);
    }

    #[test]
    fn a_variant_is_read_where_a_component_folder_holds_it_as_diffusers_does() {
        let d = mora_test_support::Scratch::new("pipeline-variant");
        std::fs::write(
            d.join(PIPELINE_INDEX),
            r#"{"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#,
        )
        .unwrap();
        for (folder, file) in [("text_encoder", "model.safetensors"), ("unet", "diffusion_pytorch_model.fp16.safetensors"), ("vae", DIFFUSERS_WEIGHTS)] {
            std::fs::create_dir_all(d.join(folder)).unwrap();
            std::fs::write(d.join(folder).join(file), "x").unwrap();
        }
        let pipe = ModelSource::dir(d.to_path_buf()).with_variant(Some("fp16".into()));
        let parts = components(&pipe).unwrap().unwrap();
        let variants: Vec<(&str, Option<String>)> = parts.iter().map(|(c, s)| (*c, s.variant().map(str::to_string))).collect();
        assert_eq!(variants, vec![("text_encoder", None), ("unet", Some("fp16".into())), ("vae", None)]);
        assert_eq!(parts[2].1, ModelSource::dir(d.join("vae")));
        assert_eq!(parts[1].1.resolve().unwrap().weights, vec![d.join("unet/diffusion_pytorch_model.fp16.safetensors")]);
        // A variant no folder holds is refused, naming it.
        let e = components(&ModelSource::dir(d.to_path_buf()).with_variant(Some("bf16".into()))).unwrap_err();
        assert!(e.to_string().contains("holds no `bf16` variant"), "{e}");
        // Without a variant, every folder keeps its plain weights.
        let plain = components(&ModelSource::dir(d.to_path_buf())).unwrap().unwrap();
        assert!(plain.iter().all(|(_, s)| s.variant().is_none()));
    }

    #[test]
    fn a_pipeline_name_selects_its_components_and_nothing_else() {
        assert!(selects("org/sd", "org/sd"));
        assert!(selects("org/sd", "org/sd/unet"));
        assert!(selects("org/sd@v2", "org/sd/vae@v2"));
        assert!(!selects("org/sd", "org/sd/vae@v2"));
        assert!(!selects("org/sd", "org/sdxl/unet"));
        assert!(!selects("org/sd/unet", "org/sd"));
        assert!(selects("/m/pipe", "/m/pipe/unet"));
        assert!(!selects("/m", "/m/pipe/unet"));
    }
}
