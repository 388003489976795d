//! Downloading a model from a Hugging Face hub into the standard hub cache
//! (`mora-cache pull`, `mora-exec run --pull`).
//!
//! The protocol is the one `huggingface_hub` speaks: list the files of a
//! revision (`/api/models/REPO/revision/REV`), ask each file's metadata with
//! a HEAD of `/REPO/resolve/COMMIT/FILE` (following relative redirects only:
//! `X-Repo-Commit`, `X-Linked-Etag`/`ETag`, `X-Linked-Size`/`Content-Length`,
//! and for large files a `Location` elsewhere), then GET the bytes. The
//! layout written is the one `huggingface_hub` writes and reads:
//! `models--OWNER--NAME/blobs/ETAG`, `snapshots/COMMIT/FILE` a relative
//! symlink to its blob, `refs/REVISION` holding the commit; a download in
//! progress is `blobs/ETAG.incomplete` (the name `huggingface_hub` resumes
//! from too), under a lock in `.locks/`, so an interrupted pull leaves
//! nothing half-written in `snapshots/`.
//!
//! Everything a hub sends is untrusted: file names that would land outside
//! the snapshot, commit hashes and ETags that are not plain names, bodies
//! longer than announced and bytes whose hash is not the announced ETag are
//! refused, and nothing is written outside the hub cache.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha1::Digest;

use crate::model::{hf_home, hub_cache_dir, repo_folder, snapshot_dir, valid_repo_id, valid_revision};

/// The hub `HF_ENDPOINT` defaults to.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// What a pull fetches when given no `--include`: the files Mora runs
/// (safetensors weights and their shard indexes, configs, tokenizer files,
/// chat templates), not the `.bin`/`.onnx`/`.msgpack`/`.h5` copies of the same
/// weights that many repos also carry.
pub const DEFAULT_INCLUDE: &[&str] = &["*.safetensors", "*.json", "*.txt", "*.jinja"];

/// The folders of a diffusers pipeline that Mora runs (`pull` fetches only
/// these by default).
pub const PIPELINE_FOLDERS: &[&str] = &["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"];

/// Attempts at one file before a pull gives up on it (each resumes where the
/// last stopped).
const ATTEMPTS: usize = 3;
/// The largest file listing read from a hub.
const MAX_LISTING: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{0}` is not a Hugging Face repo id (expected OWNER/NAME of letters, digits, `-`, `_`, `.`)")]
    BadRepoId(String),
    #[error("`{0}` is not a valid revision")]
    BadRevision(String),
    #[error("`{pattern}` is not a valid file pattern: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("HF_HUB_OFFLINE is set and `{repo}` (revision {revision}) is not in the Hugging Face cache at {}", cache.display())]
    Offline { repo: String, revision: String, cache: PathBuf },
    #[error("cannot reach the hub at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("`{repo}` is not on the hub at {endpoint}, or it is private and no token was given (set HF_TOKEN or log in with `hf auth login`)")]
    RepoNotFound { repo: String, endpoint: String },
    #[error("`{repo}` is gated: {why}")]
    Gated { repo: String, why: String },
    #[error("`{repo}` has no revision `{revision}` on the hub")]
    RevisionNotFound { repo: String, revision: String },
    #[error("{what}: the hub answered HTTP {status}{message}")]
    Status { what: String, status: u16, message: String },
    #[error("the hub's listing of `{repo}` is not usable: {reason}")]
    BadListing { repo: String, reason: String },
    #[error("the hub's listing of `{repo}` names `{name}`, which would land outside the repository's snapshot; refusing to pull")]
    UnsafeName { repo: String, name: String },
    #[error("no file of `{repo}` matches {patterns}")]
    NothingMatched { repo: String, patterns: String },
    #[error("{file}: {reason}")]
    BadMetadata { file: String, reason: String },
    #[error("{file}: the hub sent more than the {size} bytes it announced; refused, nothing kept")]
    TooLong { file: String, size: u64 },
    #[error("{file}: the download stopped at {got} of {size} bytes ({reason}); pull again to resume")]
    Short { file: String, got: u64, size: u64, reason: String },
    #[error("{file}: checksum mismatch: the hub announced {algorithm} {expected}, the bytes received have {got}; nothing kept")]
    Checksum { file: String, algorithm: &'static str, expected: String, got: String },
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |e| HubError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

/// Which files of a repo a pull fetches, matched as `huggingface_hub`'s
/// `allow_patterns`/`ignore_patterns` are (fnmatch: `*` also matches `/`; a
/// pattern ending in `/` means everything under that folder).
#[derive(Debug, Clone)]
pub struct FileFilter {
    /// No `--include` given: Mora's defaults, which know diffusers pipelines.
    default: bool,
    /// The weight variant a pipeline is pulled for (`fp16`).
    variant: Option<String>,
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
    shown: String,
}

impl FileFilter {
    /// `include` replaces [`DEFAULT_INCLUDE`] when not empty; `exclude` then
    /// removes files from what `include` chose.
    pub fn new(include: &[String], exclude: &[String]) -> Result<FileFilter, HubError> {
        let compile = |p: &str| {
            let p = if p.ends_with('/') { format!("{p}*") } else { p.to_string() };
            glob::Pattern::new(&p).map_err(|e| HubError::BadPattern { pattern: p.clone(), reason: e.msg.to_string() })
        };
        let include_src: Vec<String> = if include.is_empty() {
            DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect()
        } else {
            include.to_vec()
        };
        let mut shown = format!("--include {}", include_src.join(" "));
        if !exclude.is_empty() {
            shown.push_str(&format!(" --exclude {}", exclude.join(" ")));
        }
        Ok(FileFilter {
            default: include.is_empty(),
            variant: None,
            include: include_src.iter().map(|p| compile(p)).collect::<Result<_, _>>()?,
            exclude: exclude.iter().map(|p| compile(p)).collect::<Result<_, _>>()?,
            shown,
        })
    }

    /// The default filter: what Mora runs.
    pub fn mora_default() -> FileFilter {
        FileFilter::new(&[], &[]).expect("the default patterns are valid")
    }

    /// For a weight variant (`fp16`): a pipeline's folders that hold it give
    /// its files instead of the plain ones, as diffusers' `variant=` downloads.
    pub fn with_variant(mut self, variant: Option<&str>) -> FileFilter {
        self.variant = variant.map(str::to_string);
        self
    }

    pub fn wants(&self, name: &str) -> bool {
        self.include.iter().any(|p| p.matches(name)) && !self.exclude.iter().any(|p| p.matches(name))
    }

    /// The files of a repo listing this filter fetches. By default, a
    /// diffusers pipeline (a listing with `model_index.json` at its root)
    /// brings only what Mora runs, as diffusers' `DiffusionPipeline.download`
    /// does: the index, and the scheduler, tokenizer, text encoder, UNet and
    /// VAE folders, their plain weights and not the variants beside them
    /// (`*.fp16.safetensors`) nor the single-file checkpoints at the root.
    pub fn select(&self, names: Vec<String>) -> Vec<String> {
        let wanted: Vec<String> = names.iter().filter(|n| self.wants(n)).cloned().collect();
        if !self.default || !names.iter().any(|n| n == crate::model::PIPELINE_INDEX) {
            return wanted;
        }
        let folder_of = |n: &str| n.split_once('/').map(|(f, _)| f.to_string());
        let is_weights = |n: &str| n.ends_with(".safetensors") || (n.contains(".safetensors.index.") && n.ends_with(".json"));
        // The variant of a weight file: `NAME.VARIANT.safetensors`,
        // `NAME.VARIANT-00001-of-00002.safetensors`, `NAME.safetensors.index.VARIANT.json`.
        let variant_of = |n: &str| -> Option<String> {
            let file = n.rsplit('/').next().unwrap_or(n);
            let rest = ["model.", "diffusion_pytorch_model."].iter().find_map(|stem| file.strip_prefix(stem))?;
            if rest == "safetensors" || rest == "safetensors.index.json" {
                return None;
            }
            match rest.strip_prefix("safetensors.index.") {
                Some(v) => v.strip_suffix(".json").map(str::to_string),
                None => rest.split(['.', '-']).next().map(str::to_string),
            }
        };
        // The variants of a folder's weight files (None: a plain file).
        let variants_in = |f: &str| -> Vec<Option<String>> {
            names.iter().filter(|o| folder_of(o).as_deref() == Some(f) && is_weights(o)).map(|o| variant_of(o)).collect()
        };
        // Which weights a folder gives: the asked-for variant where it has
        // it, else its plain files, else (only variants there) all of them.
        let keeps = |f: &str, n: &str| -> bool {
            let mine = variant_of(n);
            let there = variants_in(f);
            if let Some(v) = &self.variant {
                if there.iter().any(|x| x.as_ref() == Some(v)) {
                    return mine.as_ref() == Some(v);
                }
            }
            mine.is_none() || !there.iter().any(Option::is_none)
        };
        wanted
            .into_iter()
            .filter(|n| match folder_of(n) {
                None => n == crate::model::PIPELINE_INDEX,
                Some(f) => PIPELINE_FOLDERS.contains(&f.as_str()) && (!is_weights(n) || keeps(&f, n)),
            })
            .collect()
    }
}

/// Where and how to reach a hub, from the environment `huggingface_hub` reads.
#[derive(Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    offline: bool,
    cache: PathBuf,
    /// HEAD requests: redirects are followed by hand, relative ones only.
    meta: ureq::Agent,
    /// Downloads: redirects followed, the token never sent to another host.
    get: ureq::Agent,
}

/// What happened to one file of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledFile {
    pub name: String,
    pub size: u64,
    /// Bytes this pull downloaded for it (0 when it was already cached).
    pub downloaded: u64,
}

/// The outcome of a pull.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub repo: String,
    pub commit: String,
    pub snapshot: PathBuf,
    pub files: Vec<PulledFile>,
    /// True when HF_HUB_OFFLINE was set and the cached snapshot was used.
    pub offline: bool,
}

impl Pulled {
    pub fn downloaded_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.downloaded).sum()
    }
}

/// Progress of a pull, for whoever shows it.
#[derive(Debug, Clone, Copy)]
pub enum PullEvent<'a> {
    /// The listing is in: `files` files will be checked.
    Listed { files: usize },
    /// `name` is already in the cache.
    Cached { name: &'a str, size: u64 },
    /// A download of `name` begins (or resumes at `from`).
    Started { name: &'a str, size: u64, from: u64 },
    /// `done` of `size` bytes of `name` are on disk.
    Bytes { name: &'a str, done: u64, size: u64 },
    /// `name` is complete and in the snapshot; `downloaded` bytes came over
    /// the network in `elapsed`.
    Finished { name: &'a str, size: u64, downloaded: u64, elapsed: Duration },
}

/// A file's metadata from the HEAD of its resolve URL.
#[derive(Debug)]
struct Metadata {
    etag: String,
    size: u64,
    /// Where to GET the bytes from.
    location: String,
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// `huggingface_hub`'s truthy values for boolean variables.
fn env_true(key: &str) -> bool {
    env_nonempty(key).is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.trim().to_ascii_lowercase().as_str()))
}

/// The token `huggingface_hub` would send: `HF_TOKEN`, else the token file
/// (`HF_TOKEN_PATH`, else `HF_HOME/token`, else
/// `$XDG_CACHE_HOME/huggingface/token` or `~/.cache/huggingface/token`).
pub fn token_from_env() -> Option<String> {
    if let Some(t) = env_nonempty("HF_TOKEN").or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN")) {
        return Some(t.trim().to_string());
    }
    let path = match env_nonempty("HF_TOKEN_PATH") {
        Some(p) => PathBuf::from(p),
        None => hf_home().join("token"),
    };
    fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

impl Hub {
    /// The hub of this process's environment: `HF_ENDPOINT`, `HF_TOKEN` (or
    /// the token file), `HF_HUB_OFFLINE`, and the cache of `HF_HUB_CACHE` /
    /// `HF_HOME`.
    pub fn from_env() -> Hub {
        let endpoint = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Hub::new(&endpoint, token_from_env(), env_true("HF_HUB_OFFLINE"), hub_cache_dir())
    }

    pub fn new(endpoint: &str, token: Option<String>, offline: bool, cache: PathBuf) -> Hub {
        let agent = |redirects| {
            ureq::AgentBuilder::new()
                .user_agent(concat!("mora/", env!("CARGO_PKG_VERSION")))
                .timeout_connect(Duration::from_secs(15))
                .timeout_read(Duration::from_secs(60))
                .try_proxy_from_env(true)
                .redirects(redirects)
                .build()
        };
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            offline,
            cache,
            meta: agent(0),
            get: agent(5),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn cache(&self) -> &Path {
        &self.cache
    }

    pub fn offline(&self) -> bool {
        self.offline
    }

    fn authorized(&self, req: ureq::Request) -> ureq::Request {
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Whether `url` is on the endpoint's own host (the token goes nowhere else).
    fn same_host(&self, url: &str) -> bool {
        fn origin(u: &str) -> Option<&str> {
            let rest = u.split_once("://")?.1;
            Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
        }
        origin(url).is_some() && origin(url) == origin(&self.endpoint)
    }

    /// Fetches `repo` at `revision` (a branch, tag or commit) into the cache:
    /// every file the filter wants, each checked against the size and hash
    /// the hub announced. Files already in the snapshot are not downloaded
    /// again; an interrupted download resumes.
    pub fn pull(
        &self,
        repo: &str,
        revision: &str,
        filter: &FileFilter,
        report: &mut dyn FnMut(PullEvent),
    ) -> Result<Pulled, HubError> {
        if !valid_repo_id(repo) {
            return Err(HubError::BadRepoId(repo.to_string()));
        }
        if !valid_revision(revision) {
            return Err(HubError::BadRevision(revision.to_string()));
        }
        let repo_dir = self.cache.join(repo_folder(repo));
        if self.offline {
            return self.cached_snapshot(repo, revision);
        }
        let (commit, names) = self.list(repo, revision)?;
        let names = filter.select(names);
        if names.is_empty() {
            return Err(HubError::NothingMatched { repo: repo.to_string(), patterns: filter.shown.clone() });
        }
        report(PullEvent::Listed { files: names.len() });
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let mut files = Vec::new();
        for name in &names {
            files.push(self.pull_file(repo, &repo_dir, &commit, name, report)?);
        }
        if revision != commit {
            write_ref(&repo_dir, revision, &commit)?;
        }
        Ok(Pulled { repo: repo.to_string(), commit, snapshot, files, offline: false })
    }

    /// With HF_HUB_OFFLINE: the snapshot the cache already holds, or an error.
    fn cached_snapshot(&self, repo: &str, revision: &str) -> Result<Pulled, HubError> {
        // The snapshot a run would resolve to: the same lookup.
        let snapshot = snapshot_dir(&self.cache, repo, revision).ok_or_else(|| HubError::Offline {
            repo: repo.to_string(),
            revision: revision.to_string(),
            cache: self.cache.clone(),
        })?;
        let commit = snapshot.file_name().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Pulled { repo: repo.to_string(), commit, snapshot, files: Vec::new(), offline: true })
    }

    /// The commit `revision` names and the files in it.
    fn list(&self, repo: &str, revision: &str) -> Result<(String, Vec<String>), HubError> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, encode(revision, false));
        let resp = self
            .authorized(self.get.get(&url))
            .call()
            .map_err(|e| self.http_error(e, repo, Some(revision), &format!("listing `{repo}`")))?;
        let bad = |reason: String| HubError::BadListing { repo: repo.to_string(), reason };
        let mut body = Vec::new();
        resp.into_reader().take(MAX_LISTING + 1).read_to_end(&mut body).map_err(|e| bad(e.to_string()))?;
        if body.len() as u64 > MAX_LISTING {
            return Err(bad(format!("longer than {MAX_LISTING} bytes")));
        }
        let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(format!("not JSON: {e}")))?;
        let commit = json.get("sha").and_then(|s| s.as_str()).ok_or_else(|| bad("no `sha`".into()))?;
        if !valid_commit(commit) {
            return Err(bad(format!("`sha` {commit:?} is not a commit hash")));
        }
        let siblings = json.get("siblings").and_then(|s| s.as_array()).ok_or_else(|| bad("no `siblings` list".into()))?;
        let mut names = Vec::new();
        for s in siblings {
            let name = s.get("rfilename").and_then(|n| n.as_str()).ok_or_else(|| bad("a sibling has no `rfilename`".into()))?;
            if !safe_name(name) {
                return Err(HubError::UnsafeName { repo: repo.to_string(), name: name.to_string() });
            }
            names.push(name.to_string());
        }
        names.sort();
        names.dedup();
        Ok((commit.to_string(), names))
    }

    fn pull_file(
        &self,
        repo: &str,
        repo_dir: &Path,
        commit: &str,
        name: &str,
        report: &mut dyn FnMut(PullEvent),
    ) -> Result<PulledFile, HubError> {
        let snapshot = repo_dir.join("snapshots").join(commit);
        let pointer = snapshot.join(name);
        let meta = self.metadata(repo, commit, name)?;
        // A snapshot is one commit's files: an entry that is there, with the
        // announced size, is that file.
        if fs::metadata(&pointer).is_ok_and(|m| m.is_file() && m.len() == meta.size) {
            report(PullEvent::Cached { name, size: meta.size });
            return Ok(PulledFile { name: name.to_string(), size: meta.size, downloaded: 0 });
        }
        let started = Instant::now();
        let blob = repo_dir.join("blobs").join(&meta.etag);
        let downloaded = self.fetch_blob(repo_dir, name, &meta, &blob, report)?;
        link_pointer(&snapshot, name, &meta.etag)?;
        report(PullEvent::Finished { name, size: meta.size, downloaded, elapsed: started.elapsed() });
        Ok(PulledFile { name: name.to_string(), size: meta.size, downloaded })
    }

    /// HEAD of the file's resolve URL, following relative redirects (a
    /// renamed repo) and stopping at an absolute one (large files live
    /// elsewhere; the hub announces their size and hash in `X-Linked-*`).
    fn metadata(&self, repo: &str, commit: &str, name: &str) -> Result<Metadata, HubError> {
        let mut url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, encode(name, true));
        let bad = |reason: String| HubError::BadMetadata { file: name.to_string(), reason };
        let mut hops = 0;
        let resp = loop {
            let req = self.authorized(self.meta.head(&url)).set("Accept-Encoding", "identity");
            let resp = req.call().map_err(|e| self.http_error(e, repo, None, name))?;
            let status = resp.status();
            if (300..400).contains(&status) {
                let location = resp.header("Location").ok_or_else(|| bad(format!("HTTP {status} without a Location")))?;
                if location.starts_with('/') && hops < 5 {
                    url = format!("{}{location}", self.endpoint);
                    hops += 1;
                    continue;
                }
            }
            break resp;
        };
        let header = |h: &str| resp.header(h).map(str::to_string);
        let answered = header("X-Repo-Commit").ok_or_else(|| bad("the hub sent no X-Repo-Commit".into()))?;
        if answered != commit {
            return Err(bad(format!("the hub answered for commit {answered}, the listing named {commit}")));
        }
        let etag = header("X-Linked-Etag").or_else(|| header("ETag")).ok_or_else(|| bad("the hub sent no ETag".into()))?;
        let etag = etag.trim().trim_start_matches("W/").trim_matches('"').to_string();
        if !valid_etag(&etag) {
            return Err(bad(format!("ETag {etag:?} is not a plain name")));
        }
        let size = header("X-Linked-Size")
            .or_else(|| header("Content-Length"))
            .ok_or_else(|| bad("the hub sent no size (X-Linked-Size or Content-Length)".into()))?;
        let size: u64 = size.trim().parse().map_err(|_| bad(format!("size {size:?} is not a number")))?;
        let location = match resp.status() {
            300..=399 => header("Location").expect("checked above"),
            _ => url,
        };
        if !(location.starts_with("http://") || location.starts_with("https://")) {
            return Err(bad(format!("download location {location:?} is not an http(s) URL")));
        }
        Ok(Metadata { etag, size, location })
    }

    /// Puts the file's bytes at `blob` (unless another pull or commit already
    /// did), through `blob.incomplete` under the blob's lock. Returns the
    /// bytes downloaded.
    fn fetch_blob(
        &self,
        repo_dir: &Path,
        name: &str,
        meta: &Metadata,
        blob: &Path,
        report: &mut dyn FnMut(PullEvent),
    ) -> Result<u64, HubError> {
        let blobs = repo_dir.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let locks = self.cache.join(".locks").join(repo_dir.file_name().expect("a repo folder"));
        fs::create_dir_all(&locks).map_err(io_err(&locks))?;
        let lock_path = locks.join(format!("{}.lock", meta.etag));
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| HubError::Io { path: lock_path.clone(), reason: e.to_string() })?;
        if fs::metadata(blob).is_ok_and(|m| m.len() == meta.size) {
            return Ok(0);
        }
        let part = blobs.join(format!("{}.incomplete", meta.etag));
        let mut file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&part).map_err(io_err(&part))?;
        let mut have = file.metadata().map_err(io_err(&part))?.len();
        if have > meta.size {
            file.set_len(0).map_err(io_err(&part))?;
            have = 0;
        }
        let mut hasher = Hasher::for_etag(&meta.etag, meta.size);
        // Resuming: the bytes already there count towards the hash.
        file.seek(SeekFrom::Start(0)).map_err(io_err(&part))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = have;
        while left > 0 {
            let take = left.min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..take]).map_err(io_err(&part))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        report(PullEvent::Started { name, size: meta.size, from: have });
        let start = have;
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            if have == meta.size {
                break;
            }
            match self.get_range(name, meta, &mut file, &part, &mut have, &mut hasher, &mut buf, report) {
                Ok(()) => {}
                Err(Fetch::Fatal(e)) => {
                    if matches!(e, HubError::TooLong { .. }) {
                        drop(file);
                        let _ = fs::remove_file(&part);
                    }
                    return Err(e);
                }
                Err(Fetch::Retry(reason)) => last_error = reason,
            }
        }
        if have < meta.size {
            return Err(HubError::Short { file: name.to_string(), got: have, size: meta.size, reason: last_error });
        }
        file.sync_all().map_err(io_err(&part))?;
        drop(file);
        if let Err((algorithm, expected, got)) = hasher.check() {
            let _ = fs::remove_file(&part);
            return Err(HubError::Checksum { file: name.to_string(), algorithm, expected, got });
        }
        fs::rename(&part, blob).map_err(io_err(blob))?;
        drop(lock);
        Ok(have - start)
    }

    /// One GET from `have` on, appended to `file`.
    #[allow(clippy::too_many_arguments)]
    fn get_range(
        &self,
        name: &str,
        meta: &Metadata,
        file: &mut File,
        part: &Path,
        have: &mut u64,
        hasher: &mut Hasher,
        buf: &mut [u8],
        report: &mut dyn FnMut(PullEvent),
    ) -> Result<(), Fetch> {
        let mut req = self.get.get(&meta.location);
        if self.same_host(&meta.location) {
            req = self.authorized(req);
        }
        if *have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Transport(t)) => return Err(Fetch::Retry(t.to_string())),
            Err(e) => return Err(Fetch::Fatal(self.http_error(e, "", None, name))),
        };
        if resp.status() == 206 {
            let range = resp.header("Content-Range").unwrap_or("");
            if !range.starts_with(&format!("bytes {have}-")) {
                return Err(Fetch::Fatal(HubError::BadMetadata {
                    file: name.to_string(),
                    reason: format!("asked for bytes from {have}, the hub sent range {range:?}"),
                }));
            }
        } else if *have > 0 {
            // The server ignored the range: start over.
            file.set_len(0).map_err(|e| Fetch::Fatal(io_err(part)(e)))?;
            *hasher = Hasher::for_etag(&meta.etag, meta.size);
            *have = 0;
        }
        file.seek(SeekFrom::Start(*have)).map_err(|e| Fetch::Fatal(io_err(part)(e)))?;
        let mut body = resp.into_reader();
        let mut last_report = Instant::now();
        loop {
            let n = match body.read(buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => return Err(Fetch::Retry(e.to_string())),
            };
            if *have + n as u64 > meta.size {
                return Err(Fetch::Fatal(HubError::TooLong { file: name.to_string(), size: meta.size }));
            }
            file.write_all(&buf[..n]).map_err(|e| Fetch::Fatal(io_err(part)(e)))?;
            hasher.update(&buf[..n]);
            *have += n as u64;
            if last_report.elapsed() >= Duration::from_millis(100) || *have == meta.size {
                report(PullEvent::Bytes { name, done: *have, size: meta.size });
                last_report = Instant::now();
            }
        }
    }

    /// One line for a refused request, from the hub's own error code when it
    /// sends one (`X-Error-Code`, as `huggingface_hub` reads it).
    fn http_error(&self, e: ureq::Error, repo: &str, revision: Option<&str>, what: &str) -> HubError {
        let resp = match e {
            ureq::Error::Status(_, resp) => resp,
            ureq::Error::Transport(t) => {
                return HubError::Unreachable { endpoint: self.endpoint.clone(), reason: t.to_string() }
            }
        };
        let status = resp.status();
        let code = resp.header("X-Error-Code").unwrap_or("").to_string();
        let message = resp.header("X-Error-Message").map(|m| format!(": {}", one_line(m))).unwrap_or_default();
        match (code.as_str(), status) {
            ("RepoNotFound", _) | ("", 401) if !repo.is_empty() => {
                HubError::RepoNotFound { repo: repo.to_string(), endpoint: self.endpoint.clone() }
            }
            ("GatedRepo", _) => HubError::Gated {
                repo: repo.to_string(),
                why: if self.token.is_some() {
                    "the hub refused this token: accept the model's terms on its page with the token's account".into()
                } else {
                    "the hub needs a token of an account that accepted its terms (set HF_TOKEN or log in with `hf auth login`)".into()
                },
            },
            ("RevisionNotFound", _) => HubError::RevisionNotFound {
                repo: repo.to_string(),
                revision: revision.unwrap_or("?").to_string(),
            },
            _ => HubError::Status { what: what.to_string(), status, message },
        }
    }
}

enum Fetch {
    /// The connection failed or closed early: try again from where it stopped.
    Retry(String),
    Fatal(HubError),
}

/// The hash an ETag promises: sha256 of the bytes for a large (LFS) file, the
/// git blob sha1 for a regular one. Any other ETag is checked by size only.
enum Hasher {
    Sha256(sha2::Sha256, String),
    GitSha1(sha1::Sha1, String),
    None,
}

impl Hasher {
    fn for_etag(etag: &str, size: u64) -> Hasher {
        let hex = |n| etag.len() == n && etag.bytes().all(|b| b.is_ascii_hexdigit());
        if hex(64) {
            Hasher::Sha256(sha2::Sha256::new(), etag.to_ascii_lowercase())
        } else if hex(40) {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {size}\0").as_bytes());
            Hasher::GitSha1(h, etag.to_ascii_lowercase())
        } else {
            Hasher::None
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h, _) => h.update(bytes),
            Hasher::GitSha1(h, _) => h.update(bytes),
            Hasher::None => {}
        }
    }

    fn check(self) -> Result<(), (&'static str, String, String)> {
        let (algorithm, expected, got) = match self {
            Hasher::Sha256(h, e) => ("sha256", e, hex(&h.finalize())),
            Hasher::GitSha1(h, e) => ("git sha1", e, hex(&h.finalize())),
            Hasher::None => return Ok(()),
        };
        if expected == got {
            Ok(())
        } else {
            Err((algorithm, expected, got))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The git blob sha1 of `bytes`: the ETag a hub gives a regular file.
pub fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A file name from a listing that stays inside the snapshot: relative,
/// without `.`/`..`/empty components, backslashes or control characters.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && !name.starts_with('/')
        && !name.chars().any(|c| c == '\\' || c.is_control())
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn valid_commit(c: &str) -> bool {
    c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_etag(e: &str) -> bool {
    !e.is_empty() && e.len() <= 128 && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Percent-encodes `s` for a URL path, keeping `/` when `keep_slash`.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Makes `snapshot/name` a relative symlink to `blobs/etag`, refusing a path
/// through anything but real directories (a symlink planted in the cache
/// must not carry the entry elsewhere).
fn link_pointer(snapshot: &Path, name: &str, etag: &str) -> Result<(), HubError> {
    let parts: Vec<&str> = name.split('/').collect();
    let mut dir = snapshot.to_path_buf();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(HubError::Io { path: dir, reason: "is in the way of a snapshot folder (not a directory)".into() })
            }
            Err(_) => fs::create_dir(&dir).map_err(io_err(&dir))?,
        }
    }
    let pointer = dir.join(parts[parts.len() - 1]);
    match fs::symlink_metadata(&pointer) {
        Ok(m) if m.is_dir() => {
            return Err(HubError::Io { path: pointer, reason: "is a directory where a file belongs".into() })
        }
        Ok(_) => fs::remove_file(&pointer).map_err(io_err(&pointer))?,
        Err(_) => {}
    }
    // From snapshots/COMMIT/a/b/ up to the repo folder: one `..` per folder
    // in the name, plus COMMIT and snapshots.
    let target = format!("{}blobs/{etag}", "../".repeat(parts.len() + 1));
    std::os::unix::fs::symlink(&target, &pointer).map_err(io_err(&pointer))
}

/// Records that `revision` is `commit` (`refs/REVISION`), atomically.
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<(), HubError> {
    let path = repo_dir.join("refs").join(revision);
    let parent = path.parent().expect("refs/ is a parent");
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!(".{}.{}.tmp", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    fs::write(&tmp, commit).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pipeline_pulls_its_components_plain_weights_only() {
        let names: Vec<String> = [
            "model_index.json", "README.md", "v1-5-pruned.safetensors", "sd_turbo.safetensors",
            "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
            "safety_checker/model.safetensors", "safety_checker/config.json",
            "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
            "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got = super::FileFilter::mora_default().select(names.clone());
        assert_eq!(
            got,
            [
                "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                // Only variants in vae/: they are what there is.
                "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
            ]
        );
        // For the fp16 variant: its files where a folder has them, else the plain ones.
        let fp16 = super::FileFilter::mora_default().with_variant(Some("fp16")).select(names.clone());
        let weights: Vec<&str> = fp16.iter().filter(|n| n.contains(".safetensors")).map(String::as_str).collect();
        assert_eq!(
            weights,
            [
                "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
            ]
        );
        // Asked for by pattern, a pipeline's files are what the patterns say.
        let all = super::FileFilter::new(&["*.safetensors".into()], &[]).unwrap().select(names);
        assert!(all.contains(&"v1-5-pruned.safetensors".to_string()));
    }

    use super::*;

    #[test]
    fn names_that_leave_the_snapshot_are_not_safe() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a\\..\\b", "a\nb", "a/"] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        for good in ["config.json", "1_Pooling/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "..a", "a..b"] {
            assert!(safe_name(good), "{good:?}");
        }
    }

    #[test]
    fn default_filter_takes_what_mora_runs_and_patterns_match_as_fnmatch() {
        let f = FileFilter::mora_default();
        for yes in ["model.safetensors", "config.json", "1_Pooling/config.json", "vocab.txt", "merges.txt", "chat_template.jinja", "model.safetensors.index.json"] {
            assert!(f.wants(yes), "{yes}");
        }
        for no in ["pytorch_model.bin", "onnx/model.onnx", "flax_model.msgpack", "tf_model.h5", "rust_model.ot", "README.md"] {
            assert!(!f.wants(no), "{no}");
        }
        let f = FileFilter::new(&["onnx/".into(), "*.md".into()], &["*O1*".into()]).unwrap();
        assert!(f.wants("onnx/model.onnx") && f.wants("README.md"));
        assert!(!f.wants("onnx/model_O1.onnx") && !f.wants("model.safetensors"));
        assert!(matches!(FileFilter::new(&["[".into()], &[]), Err(HubError::BadPattern { .. })));
    }

    #[test]
    fn git_blob_sha1_is_git_s() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(git_blob_sha1(b"hello\n"), "ce013625030ba8dba906f756967f9e9ca394464a");
        let mut h = Hasher::for_etag("ce013625030ba8dba906f756967f9e9ca394464a", 6);
        h.update(b"hel");
        h.update(b"lo\n");
        assert!(h.check().is_ok());
        let mut h = Hasher::for_etag(&"0".repeat(64), 1);
        h.update(b"x");
        assert_eq!(h.check().unwrap_err().0, "sha256");
    }

    #[test]
    fn paths_are_percent_encoded_per_segment() {
        assert_eq!(encode("a b/c+d.json", true), "a%20b/c%2Bd.json");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
    }

    #[test]
    fn the_token_goes_only_to_the_endpoint_s_host() {
        let hub = Hub::new("https://huggingface.co/", Some("t".into()), false, PathBuf::from("/nonexistent"));
        assert_eq!(hub.endpoint(), "https://huggingface.co");
        assert!(hub.same_host("https://huggingface.co/org/m/resolve/x/f"));
        assert!(!hub.same_host("https://cdn-lfs.huggingface.co/repos/x"));
        assert!(!hub.same_host("https://huggingface.co.evil.example/x"));
    }

    #[test]
    fn pointers_are_relative_links_into_blobs_and_refuse_planted_symlinks() {
        let root = mora_test_support::Scratch::new("hub-link");
        let repo = root.join("models--o--n");
        fs::create_dir_all(repo.join("blobs")).unwrap();
        fs::write(repo.join("blobs").join("abc"), "x").unwrap();
        let snap = repo.join("snapshots").join("c0");
        link_pointer(&snap, "1_Pooling/config.json", "abc").unwrap();
        let p = snap.join("1_Pooling/config.json");
        assert_eq!(fs::read_link(&p).unwrap(), PathBuf::from("../../../blobs/abc"));
        assert_eq!(fs::read_to_string(&p).unwrap(), "x");
        // A symlink planted where a folder belongs is not followed.
        std::os::unix::fs::symlink(&root, snap.join("evil")).unwrap();
        assert!(link_pointer(&snap, "evil/x.json", "abc").is_err());
        write_ref(&repo, "refs/pr/1", "c0").unwrap();
        assert_eq!(fs::read_to_string(repo.join("refs/refs/pr/1")).unwrap(), "c0");
        fs::remove_dir_all(&root).unwrap();
    }
}
