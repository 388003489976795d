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
    HfRepo { repo: String, revision: String, hub_cache: PathBuf },
    /// A directory holding `config.json` and safetensors weights.
    Dir { path: PathBuf },
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
    #[error("model directory {} does not exist", .0.display())]
    NoSuchDir(PathBuf),
    #[error("{} holds no model.safetensors nor model.safetensors.index.json: not a safetensors model", .0.display())]
    NoWeights(PathBuf),
    #[error("cannot read shard index {}: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("weight file {} listed in {} is missing", missing.display(), index.display())]
    MissingShard { index: PathBuf, missing: PathBuf },
}

pub const SINGLE_WEIGHTS: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

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
        }
    }

    /// A model as a user names it (`mora-cache load MODEL`, Python's
    /// `state_dict(MODEL)`): an existing directory is a local model; anything
    /// else is a Hugging Face repo id, `OWNER/NAME[@REVISION]`, looked up in
    /// this process's hub cache.
    pub fn from_arg(arg: &str) -> Self {
        let p = Path::new(arg);
        if p.is_dir() {
            return ModelSource::Dir { path: std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()) };
        }
        match arg.split_once('@') {
            Some((repo, rev)) => ModelSource::hf_repo(repo, Some(rev)),
            None => ModelSource::hf_repo(arg, None),
        }
    }

    pub fn display_name(&self) -> String {
        match self {
            ModelSource::HfRepo { repo, revision, .. } if revision == "main" => repo.clone(),
            ModelSource::HfRepo { repo, revision, .. } => format!("{repo}@{revision}"),
            ModelSource::Dir { path } => path.display().to_string(),
        }
    }

    /// Finds the model's directory and weight files. Reads only small files
    /// (refs, the shard index); never the weights.
    pub fn resolve(&self) -> Result<ResolvedModel, ResolveError> {
        let dir = match self {
            ModelSource::HfRepo { repo, revision, hub_cache } => {
                if !valid_repo_id(repo) {
                    return Err(ResolveError::BadRepoId(repo.clone()));
                }
                if !valid_revision(revision) {
                    return Err(ResolveError::BadRevision(revision.clone()));
                }
                snapshot_dir(hub_cache, repo, revision).ok_or_else(|| ResolveError::NotInCache {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    hub_cache: hub_cache.clone(),
                })?
            }
            ModelSource::Dir { path } => {
                if !path.is_dir() {
                    return Err(ResolveError::NoSuchDir(path.clone()));
                }
                path.clone()
            }
        };
        let weights = weight_files(&dir)?;
        Ok(ResolvedModel { name: self.display_name(), dir, weights })
    }
}

/// The snapshot directory of `repo` at `revision` (a ref such as `main`, or
/// a commit hash), if the cache holds one with a config or weights in it.
pub(crate) fn snapshot_dir(hub_cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let cache = Cache::new(hub_cache.to_path_buf());
    let cached = cache.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    for probe in ["config.json", SINGLE_WEIGHTS, SHARD_INDEX] {
        if let Some(file) = cached.get(probe) {
            return file.parent().map(Path::to_path_buf);
        }
    }
    // A commit hash names its snapshot directly, with no ref file.
    let by_commit = hub_cache.join(repo_folder(repo)).join("snapshots").join(revision);
    by_commit.is_dir().then_some(by_commit)
}

/// The weight files of a model directory: the shards named by
/// `model.safetensors.index.json`, or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ResolveError> {
    let index = dir.join(SHARD_INDEX);
    if index.is_file() {
        let bad = |reason: String| ResolveError::BadIndex { path: index.clone(), reason };
        let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
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
                return Err(ResolveError::MissingShard { index: index.clone(), missing: p });
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join(SINGLE_WEIGHTS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ResolveError::NoWeights(dir.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::fs;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mora-model-test-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
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
        let src = ModelSource::HfRepo { repo: "org/tiny".into(), revision: "main".into(), hub_cache: hub.clone() };
        let r = src.resolve().unwrap();
        assert_eq!(r.dir, snap);
        assert_eq!(r.weights, vec![snap.join("model.safetensors")]);
        assert_eq!(r.name, "org/tiny");
        // A commit hash works without a ref.
        let by_commit = ModelSource::HfRepo { repo: "org/tiny".into(), revision: "abc123".into(), hub_cache: hub.clone() };
        assert_eq!(by_commit.resolve().unwrap().dir, snap);
        assert_eq!(by_commit.display_name(), "org/tiny@abc123");
    }

    #[test]
    fn missing_repo_names_the_cache_and_what_to_do() {
        let hub = tmpdir("empty");
        let err = ModelSource::HfRepo { repo: "org/none".into(), revision: "main".into(), hub_cache: hub.clone() }
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
            let err = ModelSource::HfRepo { repo: bad.into(), revision: "main".into(), hub_cache: "/nonexistent".into() }
                .resolve()
                .unwrap_err();
            assert!(matches!(err, ResolveError::BadRepoId(_)), "{bad}: {err}");
        }
        let err = ModelSource::HfRepo { repo: "a/b".into(), revision: "../x".into(), hub_cache: "/nonexistent".into() }
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
        let err = weight_files(&d).unwrap_err();
        assert!(matches!(err, ResolveError::MissingShard { .. }));
        fs::write(d.join("model-00002-of-00002.safetensors"), "x").unwrap();
        let files = weight_files(&d).unwrap();
        assert_eq!(files, vec![d.join("model-00001-of-00002.safetensors"), d.join("model-00002-of-00002.safetensors")]);
    }

    #[test]
    fn directory_without_weights_is_refused() {
        let d = tmpdir("noweights");
        assert!(matches!(weight_files(&d), Err(ResolveError::NoWeights(_))));
        let missing = ModelSource::Dir { path: d.join("nope") }.resolve().unwrap_err();
        assert!(matches!(missing, ResolveError::NoSuchDir(_)));
    }
}
