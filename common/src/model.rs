//! Model references and how they resolve to files on disk.
//!
//! A model is either a local directory or a Hugging Face repo id looked up,
//! offline, in the standard Hugging Face cache
//! (`HUB/models--OWNER--NAME/{refs,snapshots,blobs}`). Nothing here touches
//! the network.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

/// Where a model's files are. Sent by the client, resolved by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelSource {
    /// A repo in a Hugging Face cache. The client fills `hub_cache` from its
    /// own environment, so the daemon looks where the user expects.
    HfRepo {
        repo: String,
        revision: String,
        hub_cache: PathBuf,
        /// The folder of the repo that holds the model: one component of a
        /// diffusers pipeline (`unet`), as `from_pretrained(..., subfolder=)`.
        /// `None` is the repo's root.
        subfolder: Option<String>,
        /// The weight files' variant (`fp16` picks `model.fp16.safetensors`),
        /// as diffusers' and transformers' `variant=`.
        variant: Option<String>,
    },
    /// A directory holding `config.json` and safetensors weights, or one
    /// `.safetensors` file (a LoRA adapter's), which is then the weights.
    Dir { path: PathBuf, variant: Option<String> },
}

/// A model reference resolved to concrete files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// What users call it: the repo id (with `@revision` unless `main`) or the path.
    pub name: String,
    /// The directory holding config, tokenizer and the weight files.
    pub dir: PathBuf,
    /// Weight files, in a stable order (one, or the shards of an index).
    pub weights: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("`{repo}` (revision {revision}) is not in the Hugging Face cache at {}: fetch it with `mora-cache pull` (or `mora-exec run --pull`), or give a local path", hub_cache.display())]
    NotInCache { repo: String, revision: String, hub_cache: PathBuf },
    #[error("`{0}` is not a Hugging Face repo id (expected OWNER/NAME of letters, digits, `-`, `_`, `.`)")]
    BadRepoId(String),
    #[error("`{0}` is not a valid revision")]
    BadRevision(String),
    #[error("no such directory: model directory {} does not exist; give an existing directory or a Hugging Face repo id (OWNER/NAME)", .0.display())]
    NoSuchDir(PathBuf),
    #[error("{} is a diffusers pipeline, with no weights of its own: ask for one of its components with a subfolder ({})", dir.display(), components.join(", "))]
    PipelineRoot { dir: PathBuf, components: Vec<String> },
    #[error("{} holds no model.safetensors, diffusion_pytorch_model.safetensors nor a shard index of either: not a safetensors model", .0.display())]
    NoWeights(PathBuf),
    #[error("{} holds no `{variant}` variant of its weights (such as {example})", dir.display())]
    NoVariant { dir: PathBuf, variant: String, example: String },
    #[error("{} holds only the {} variant of its weights: ask for it (`variant = \"{}\"` in a workflow, `--variant {}`)", dir.display(), variants.join(", "), variants[0], variants[0])]
    OnlyVariants { dir: PathBuf, variants: Vec<String> },
    #[error("`{name}` has no folder `{subfolder}` (looked for {})", dir.display())]
    NoSubfolder { name: String, subfolder: String, dir: PathBuf },
    #[error("`{0}` is not a folder name of a repo (letters, digits, `-`, `_`, `.`)")]
    BadSubfolder(String),
    #[error("`{0}` is not a weight variant (letters, digits, `-`, `_`)")]
    BadVariant(String),
    #[error("cannot read shard index {}: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("weight file {} listed in {} is missing", missing.display(), index.display())]
    MissingShard { index: PathBuf, missing: PathBuf },
}

pub const SINGLE_WEIGHTS: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";
/// The weight file of a diffusers component (`unet/`, `vae/`), and its index.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
pub const DIFFUSERS_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";
/// A diffusers pipeline's root file: its components and their classes.
pub const PIPELINE_INDEX: &str = "model_index.json";

/// The Hugging Face hub cache this process would use: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub` (the order `huggingface_hub` uses).
pub fn hub_cache_dir() -> PathBuf {
    hub_cache_dir_from(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

fn hub_cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    match env("HF_HUB_CACHE") {
        Some(p) => PathBuf::from(p),
        None => hf_home_from(env).join("hub"),
    }
}

/// `huggingface_hub`'s home (the token file, and the hub cache unless
/// `HF_HUB_CACHE` moves it): `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`,
/// else `~/.cache/huggingface`.
#[cfg(feature = "hub")]
pub(crate) fn hf_home() -> PathBuf {
    hf_home_from(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

fn hf_home_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if let Some(home) = env("HF_HOME") {
        return PathBuf::from(home);
    }
    if let Some(xdg) = env("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("huggingface");
    }
    let home = env("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache").join("huggingface")
}

pub(crate) fn valid_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

pub(crate) fn valid_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && rev.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// The cache folder of a model repo: `models--OWNER--NAME`.
pub(crate) fn repo_folder(repo: &str) -> String {
    Repo::model(repo.to_string()).folder_name()
}

impl ModelSource {
    /// A repo in the hub cache of this process's environment.
    pub fn hf_repo(repo: &str, revision: Option<&str>) -> Self {
        ModelSource::HfRepo {
            repo: repo.to_string(),
            revision: revision.unwrap_or("main").to_string(),
            hub_cache: hub_cache_dir(),
            subfolder: None,
            variant: None,
        }
    }

    /// A repo in the hub cache at `hub_cache`.
    pub fn hf_repo_in(repo: &str, revision: &str, hub_cache: &Path) -> Self {
        ModelSource::HfRepo {
            repo: repo.to_string(),
            revision: revision.to_string(),
            hub_cache: hub_cache.to_path_buf(),
            subfolder: None,
            variant: None,
        }
    }

    /// A local directory.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        ModelSource::Dir { path: path.into(), variant: None }
    }

    /// A model as a user names it (`mora-cache load MODEL`, Python's
    /// `state_dict(MODEL)`): an existing directory is a local model; anything
    /// else is a Hugging Face repo id, `OWNER/NAME[/FOLDER][@REVISION]`
    /// (`FOLDER` one component of a pipeline, such as `unet`), looked up in
    /// this process's hub cache.
    pub fn from_arg(arg: &str) -> Self {
        let p = Path::new(arg);
        // A path (`/`, `./`, `../`, `~`) is a directory even when missing, so
        // the error says there is no such directory, not that it is no repo id.
        let path_like = arg.starts_with(['/', '~']) || arg.starts_with("./") || arg.starts_with("../") || arg == "." || arg == "..";
        if p.is_dir() || path_like {
            return ModelSource::dir(std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        }
        let (id, rev) = match arg.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (arg, None),
        };
        let parts: Vec<&str> = id.splitn(3, '/').collect();
        match parts.as_slice() {
            [owner, name, folder] => ModelSource::hf_repo(&format!("{owner}/{name}"), rev).component(folder),
            _ => ModelSource::hf_repo(id, rev),
        }
    }

    /// The component in folder `sub` of this pipeline (`unet`), with the same variant.
    pub fn component(&self, sub: &str) -> Self {
        match self {
            ModelSource::HfRepo { repo, revision, hub_cache, subfolder, variant } => ModelSource::HfRepo {
                repo: repo.clone(),
                revision: revision.clone(),
                hub_cache: hub_cache.clone(),
                subfolder: Some(match subfolder {
                    Some(s) => format!("{s}/{sub}"),
                    None => sub.to_string(),
                }),
                variant: variant.clone(),
            },
            ModelSource::Dir { path, variant } => ModelSource::Dir { path: path.join(sub), variant: variant.clone() },
        }
    }

    /// The same files, in the weight variant `v` (`None`: the plain files).
    pub fn with_variant(mut self, v: Option<String>) -> Self {
        match &mut self {
            ModelSource::HfRepo { variant, .. } | ModelSource::Dir { variant, .. } => *variant = v,
        }
        self
    }

    pub fn variant(&self) -> Option<&str> {
        match self {
            ModelSource::HfRepo { variant, .. } | ModelSource::Dir { variant, .. } => variant.as_deref(),
        }
    }

    /// What users call it: `OWNER/NAME[/FOLDER][@REVISION]` (`@main` left
    /// out), or the directory's path.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::HfRepo { repo, revision, subfolder, .. } => {
                let mut name = repo.clone();
                if let Some(s) = subfolder {
                    name = format!("{name}/{s}");
                }
                if revision != "main" {
                    name = format!("{name}@{revision}");
                }
                name
            }
            ModelSource::Dir { path, .. } => path.display().to_string(),
        }
    }

    /// The directory the source names, without looking for weights in it:
    /// a pipeline's root has none.
    pub fn resolve_dir(&self) -> Result<PathBuf, ResolveError> {
        if let Some(v) = self.variant() {
            if !valid_variant(v) {
                return Err(ResolveError::BadVariant(v.to_string()));
            }
        }
        match self {
            ModelSource::HfRepo { repo, revision, hub_cache, subfolder, .. } => {
                if !valid_repo_id(repo) {
                    return Err(ResolveError::BadRepoId(repo.clone()));
                }
                if !valid_revision(revision) {
                    return Err(ResolveError::BadRevision(revision.clone()));
                }
                if let Some(s) = subfolder {
                    if !valid_subfolder(s) {
                        return Err(ResolveError::BadSubfolder(s.clone()));
                    }
                }
                let root = snapshot_dir(hub_cache, repo, revision).ok_or_else(|| ResolveError::NotInCache {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    hub_cache: hub_cache.clone(),
                })?;
                match subfolder {
                    None => Ok(root),
                    Some(s) => {
                        let dir = root.join(s);
                        if !dir.is_dir() {
                            let name = ModelSource::hf_repo(repo, Some(revision)).display_name();
                            return Err(ResolveError::NoSubfolder { name, subfolder: s.clone(), dir });
                        }
                        Ok(dir)
                    }
                }
            }
            ModelSource::Dir { path, .. } => {
                if let Some(parent) = single_file(path) {
                    return Ok(parent.to_path_buf());
                }
                if !path.is_dir() {
                    return Err(ResolveError::NoSuchDir(path.clone()));
                }
                Ok(path.clone())
            }
        }
    }

    /// Finds the model's directory and weight files. Reads only small files
    /// (refs, the shard index); never the weights.
    pub fn resolve(&self) -> Result<ResolvedModel, ResolveError> {
        if let ModelSource::Dir { path, variant: None } = self {
            if let Some(parent) = single_file(path) {
                return Ok(ResolvedModel { name: self.display_name(), dir: parent.to_path_buf(), weights: vec![path.clone()] });
            }
        }
        let dir = self.resolve_dir()?;
        let weights = weight_files(&dir, self.variant())?;
        Ok(ResolvedModel { name: self.display_name(), dir, weights })
    }
}

/// A path that names one `.safetensors` file (a LoRA adapter, a single
/// checkpoint file) rather than a model's folder: its folder.
fn single_file(path: &Path) -> Option<&Path> {
    let file = path.extension().is_some_and(|e| e == "safetensors") && path.is_file();
    file.then(|| path.parent()).flatten()
}

fn valid_subfolder(s: &str) -> bool {
    s.split('/').all(|p| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

fn valid_variant(v: &str) -> bool {
    !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
}

/// A weight file's name in `variant`, as diffusers' `_add_variant` makes it:
/// the variant goes before the last extension (`model.fp16.safetensors`,
/// `model.safetensors.index.fp16.json`).
pub fn variant_name(file: &str, variant: Option<&str>) -> String {
    match (variant, file.rsplit_once('.')) {
        (Some(v), Some((stem, ext))) => format!("{stem}.{v}.{ext}"),
        _ => file.to_string(),
    }
}

/// The files whose presence decides a directory's weights, in the order
/// they are looked for: for transformers' then diffusers' names, the
/// shard index, then the single file.
pub fn weight_candidates(dir: &Path, variant: Option<&str>) -> Vec<PathBuf> {
    [SHARD_INDEX, SINGLE_WEIGHTS, DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS]
        .iter()
        .map(|f| dir.join(variant_name(f, variant)))
        .collect()
}

/// The snapshot directory of `repo` at `revision` (a ref such as `main`, or
/// a commit hash), if the cache holds one with a config or weights in it.
pub(crate) fn snapshot_dir(hub_cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let cache = Cache::new(hub_cache.to_path_buf());
    let cached = cache.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    for probe in ["config.json", SINGLE_WEIGHTS, SHARD_INDEX, PIPELINE_INDEX] {
        if let Some(file) = cached.get(probe) {
            return file.parent().map(Path::to_path_buf);
        }
    }
    // A commit hash names its snapshot directly, with no ref file.
    let by_commit = hub_cache.join(repo_folder(repo)).join("snapshots").join(revision);
    by_commit.is_dir().then_some(by_commit)
}

/// The weight files of a model directory in `variant`: the shards named by
/// a shard index, or the single file, under transformers' name
/// (`model.safetensors`) or diffusers' (`diffusion_pytorch_model.safetensors`).
pub fn weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>, ResolveError> {
    for candidate in weight_candidates(dir, variant) {
        if !candidate.is_file() {
            continue;
        }
        let is_index = candidate.extension().is_some_and(|e| e == "json");
        return if is_index { shards(dir, &candidate) } else { Ok(vec![candidate]) };
    }
    if dir.join(PIPELINE_INDEX).is_file() {
        let mut components: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("config.json").is_file())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        components.sort();
        return Err(ResolveError::PipelineRoot { dir: dir.to_path_buf(), components });
    }
    if let Some(v) = variant {
        // The file diffusers would read for a diffusers model (its config names a `_class_name`).
        let diffusers = dir.join(DIFFUSERS_WEIGHTS).is_file()
            || dir.join(DIFFUSERS_INDEX).is_file()
            || std::fs::read_to_string(dir.join("config.json")).is_ok_and(|c| c.contains("\"_class_name\""));
        return Err(ResolveError::NoVariant {
            dir: dir.to_path_buf(),
            variant: v.to_string(),
            example: variant_name(if diffusers { DIFFUSERS_WEIGHTS } else { SINGLE_WEIGHTS }, Some(v)),
        });
    }
    // Weights only in variants (`model.fp16.safetensors`): name them.
    let mut variants = BTreeSet::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        for stem in ["model.", "diffusion_pytorch_model."] {
            if let Some(v) = name.strip_prefix(stem).and_then(|r| r.strip_suffix(".safetensors")) {
                if valid_variant(v) {
                    variants.insert(v.to_string());
                }
            }
        }
    }
    if !variants.is_empty() {
        return Err(ResolveError::OnlyVariants { dir: dir.to_path_buf(), variants: variants.into_iter().collect() });
    }
    Err(ResolveError::NoWeights(dir.to_path_buf()))
}

/// The shards a shard index names, each once, in name order.
fn shards(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, ResolveError> {
    let bad = |reason: String| ResolveError::BadIndex { path: index.to_path_buf(), reason };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files = BTreeSet::new();
    for v in map.values() {
        let name = v.as_str().ok_or_else(|| bad("a `weight_map` value is not a string".into()))?;
        if name.contains('/') || name == ".." {
            return Err(bad(format!("shard name `{name}` is not a file name")));
        }
        files.insert(name.to_string());
    }
    if files.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    let mut out = Vec::new();
    for f in files {
        let p = dir.join(&f);
        if !p.is_file() {
            return Err(ResolveError::MissingShard { index: index.to_path_buf(), missing: p });
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::fs;

    fn tmpdir(tag: &str) -> mora_test_support::Scratch {
        mora_test_support::Scratch::new(tag)
    }

    #[test]
    fn hub_cache_follows_hf_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
        };
        assert_eq!(hub_cache_dir_from(env(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b")])), PathBuf::from("/a"));
        assert_eq!(hub_cache_dir_from(env(&[("HF_HOME", "/b"), ("HOME", "/h")])), PathBuf::from("/b/hub"));
        assert_eq!(hub_cache_dir_from(env(&[("XDG_CACHE_HOME", "/x")])), PathBuf::from("/x/huggingface/hub"));
        assert_eq!(hub_cache_dir_from(env(&[("HOME", "/h")])), PathBuf::from("/h/.cache/huggingface/hub"));
    }

    #[test]
    fn repo_resolves_through_refs_to_its_snapshot() {
        let hub = tmpdir("hub");
        let repo_dir = hub.join("models--org--tiny");
        let snap = repo_dir.join("snapshots").join("abc123");
        fs::create_dir_all(&snap).unwrap();
        fs::create_dir_all(repo_dir.join("refs")).unwrap();
        fs::write(repo_dir.join("refs").join("main"), "abc123").unwrap();
        fs::write(snap.join("config.json"), "{}").unwrap();
        fs::write(snap.join("model.safetensors"), "x").unwrap();
        let src = ModelSource::hf_repo_in("org/tiny", "main", &hub);
        let r = src.resolve().unwrap();
        assert_eq!(r.dir, snap);
        assert_eq!(r.weights, vec![snap.join("model.safetensors")]);
        assert_eq!(r.name, "org/tiny");
        // A commit hash works without a ref.
        let by_commit = ModelSource::hf_repo_in("org/tiny", "abc123", &hub);
        assert_eq!(by_commit.resolve().unwrap().dir, snap);
        assert_eq!(by_commit.display_name(), "org/tiny@abc123");
    }

    #[test]
    fn one_safetensors_file_is_a_model_of_that_file() {
        let d = tmpdir("single-file");
        fs::write(d.join("style.safetensors"), "x").unwrap();
        fs::write(d.join("notes.txt"), "x").unwrap();
        let r = ModelSource::dir(d.join("style.safetensors")).resolve().unwrap();
        assert_eq!((r.dir, r.weights), (d.to_path_buf(), vec![d.join("style.safetensors")]));
        // Another file is no model, and says so as a missing directory does.
        assert!(matches!(ModelSource::dir(d.join("notes.txt")).resolve(), Err(ResolveError::NoSuchDir(_))));
        assert!(matches!(ModelSource::dir(d.join("gone.safetensors")).resolve(), Err(ResolveError::NoSuchDir(_))));
    }

    #[test]
    fn missing_repo_names_the_cache_and_what_to_do() {
        let hub = tmpdir("empty");
        let err = ModelSource::hf_repo_in("org/none", "main", &hub)
            .resolve()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("not in the Hugging Face cache at"), "{msg}");
        assert!(msg.contains(&hub.display().to_string()), "{msg}");
        assert!(msg.ends_with("(or `mora-exec run --pull`), or give a local path"), "{msg}");
    }

    #[test]
    fn repo_ids_that_could_escape_the_cache_are_refused() {
        for bad in ["../etc", "a/b/c", "", "a/..", "a b/c"] {
            let err = ModelSource::hf_repo_in(bad, "main", Path::new("/nonexistent"))
                .resolve()
                .unwrap_err();
            assert!(matches!(err, ResolveError::BadRepoId(_)), "{bad}: {err}");
        }
        let err = ModelSource::hf_repo_in("a/b", "../x", Path::new("/nonexistent"))
            .resolve()
            .unwrap_err();
        assert!(matches!(err, ResolveError::BadRevision(_)));
    }

    #[test]
    fn sharded_index_lists_each_shard_once() {
        let d = tmpdir("sharded");
        fs::write(
            d.join(SHARD_INDEX),
            r#"{"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        fs::write(d.join("model-00001-of-00002.safetensors"), "x").unwrap();
        let err = weight_files(&d, None).unwrap_err();
        assert!(matches!(err, ResolveError::MissingShard { .. }));
        fs::write(d.join("model-00002-of-00002.safetensors"), "x").unwrap();
        let files = weight_files(&d, None).unwrap();
        assert_eq!(files, vec![d.join("model-00001-of-00002.safetensors"), d.join("model-00002-of-00002.safetensors")]);
    }

    #[test]
    fn directory_without_weights_is_refused() {
        let d = tmpdir("noweights");
        assert!(matches!(weight_files(&d, None), Err(ResolveError::NoWeights(_))));
        let missing = ModelSource::dir(d.join("nope")).resolve().unwrap_err();
        assert!(matches!(missing, ResolveError::NoSuchDir(_)));
    }

    #[test]
    fn a_pipeline_root_names_its_components_and_a_missing_variant_names_the_diffusers_file() {
        let d = tmpdir("pipeline-root");
        std::fs::write(d.join(PIPELINE_INDEX), "{}").unwrap();
        for c in ["vae", "unet", "text_encoder"] {
            std::fs::create_dir(d.join(c)).unwrap();
            std::fs::write(d.join(c).join("config.json"), "{\"_class_name\": \"X\"}").unwrap();
        }
        std::fs::create_dir(d.join("scheduler")).unwrap();
        let e = weight_files(&d, None).unwrap_err();
        assert!(matches!(&e, ResolveError::PipelineRoot { components, .. } if components == &["text_encoder", "unet", "vae"]), "{e}");
        assert!(e.to_string().contains("subfolder (text_encoder, unet, vae)"), "{e}");
        std::fs::write(d.join("unet").join(DIFFUSERS_WEIGHTS), b"").unwrap();
        let e = weight_files(&d.join("unet"), Some("fp16")).unwrap_err();
        assert!(e.to_string().contains("diffusion_pytorch_model.fp16.safetensors"), "{e}");
        let e = weight_files(&d.join("vae"), Some("fp16")).unwrap_err();
        assert!(e.to_string().contains("diffusion_pytorch_model.fp16.safetensors"), "{e}");
    }

    #[test]
    fn a_missing_path_is_no_such_directory_not_a_bad_repo_id() {
        let d = tmpdir("missing-path");
        let missing = d.join("models").join("nowhere");
        let e = ModelSource::from_arg(missing.to_str().unwrap()).resolve().unwrap_err();
        assert!(matches!(e, ResolveError::NoSuchDir(_)), "{e}");
        assert!(e.to_string().starts_with("no such directory: model directory"), "{e}");
        let e = ModelSource::from_arg("./no/such/model").resolve().unwrap_err();
        assert!(matches!(e, ResolveError::NoSuchDir(_)), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn diffusers_weight_names_and_variants_resolve_as_diffusers_finds_them() {
        let d = tmpdir("diffusers");
        fs::write(d.join(DIFFUSERS_WEIGHTS), "x").unwrap();
        fs::write(d.join("diffusion_pytorch_model.fp16.safetensors"), "x").unwrap();
        assert_eq!(weight_files(&d, None).unwrap(), vec![d.join(DIFFUSERS_WEIGHTS)]);
        assert_eq!(weight_files(&d, Some("fp16")).unwrap(), vec![d.join("diffusion_pytorch_model.fp16.safetensors")]);
        let none = weight_files(&d, Some("bf16")).unwrap_err().to_string();
        assert!(none.contains("no `bf16` variant") && none.contains("model.bf16.safetensors"), "{none}");
        // A sharded variant: diffusers puts the variant before `.json`.
        assert_eq!(variant_name(DIFFUSERS_INDEX, Some("fp16")), "diffusion_pytorch_model.safetensors.index.fp16.json");
        fs::write(d.join("diffusion_pytorch_model.safetensors.index.fp16.json"), r#"{"weight_map": {"a": "u.fp16-1.safetensors"}}"#).unwrap();
        fs::write(d.join("u.fp16-1.safetensors"), "x").unwrap();
        assert_eq!(weight_files(&d, Some("fp16")).unwrap(), vec![d.join("u.fp16-1.safetensors")]);
        // Only a variant present: the error names it and how to ask for it.
        let only = tmpdir("only-fp16");
        fs::write(only.join("model.fp16.safetensors"), "x").unwrap();
        let e = weight_files(&only, None).unwrap_err();
        assert!(matches!(&e, ResolveError::OnlyVariants { variants, .. } if variants == &["fp16".to_string()]), "{e}");
        assert!(e.to_string().contains("variant = \"fp16\""), "{e}");
        assert!(matches!(ModelSource::dir(only.to_path_buf()).with_variant(Some("../x".into())).resolve(), Err(ResolveError::BadVariant(_))));
    }

    #[test]
    fn a_pipeline_component_resolves_to_its_folder_and_is_named_after_it() {
        let hub = tmpdir("pipeline-hub");
        let repo_dir = hub.join("models--org--pipe");
        let snap = repo_dir.join("snapshots").join("c0ffee");
        fs::create_dir_all(snap.join("unet")).unwrap();
        fs::create_dir_all(repo_dir.join("refs")).unwrap();
        fs::write(repo_dir.join("refs").join("main"), "c0ffee").unwrap();
        // The root of a pipeline holds model_index.json and no weights.
        fs::write(snap.join(PIPELINE_INDEX), "{}").unwrap();
        fs::write(snap.join("unet").join(DIFFUSERS_WEIGHTS), "x").unwrap();
        let pipe = ModelSource::hf_repo_in("org/pipe", "main", &hub);
        assert_eq!(pipe.resolve_dir().unwrap(), snap);
        let unet = pipe.component("unet");
        let r = unet.resolve().unwrap();
        assert_eq!((r.dir.clone(), r.weights.clone()), (snap.join("unet"), vec![snap.join("unet").join(DIFFUSERS_WEIGHTS)]));
        assert_eq!(r.name, "org/pipe/unet");
        assert_eq!(ModelSource::hf_repo_in("org/pipe", "v2", &hub).component("vae").display_name(), "org/pipe/vae@v2");
        let e = pipe.component("vae").resolve().unwrap_err();
        assert!(matches!(e, ResolveError::NoSubfolder { .. }) && e.to_string().starts_with("`org/pipe` has no folder `vae`"), "{e}");
        assert!(matches!(pipe.component("..").resolve(), Err(ResolveError::BadSubfolder(_))));
        // As users write it: OWNER/NAME/FOLDER[@REVISION].
        match ModelSource::from_arg("org/pipe/unet@v3") {
            ModelSource::HfRepo { repo, revision, subfolder, .. } => {
                assert_eq!((repo.as_str(), revision.as_str(), subfolder.as_deref()), ("org/pipe", "v3", Some("unet")))
            }
            other => panic!("{other:?}"),
        }
        // A local pipeline's component is its folder.
        assert_eq!(ModelSource::dir("/p").component("unet"), ModelSource::dir("/p/unet"));
    }
}
