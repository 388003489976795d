//! Content identity of weight files, so the same bytes under two names
//! (two repo ids, a repo and a local copy) are held once.
//!
//! A file inside a Hugging Face cache is a blob named by its sha256: that
//! name is its identity, free. Any other file is hashed with sha256 once per
//! (device, inode, size, mtime) and remembered, so a later request for the
//! same unchanged file costs a `stat`.
//!
//! A model reference's resolution (refs, shard index, weight files) and the
//! identities of its files are remembered too ([`ResolutionMemo`]), checked
//! on each use by a `stat` of every file and directory the resolution read,
//! so a repeated acquire re-reads nothing unless one of them changed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mora_common::model::weight_candidates;
#[cfg(test)]
use mora_common::model::{SHARD_INDEX, SINGLE_WEIGHTS};
use mora_common::{ModelSource, ResolvedModel};
use sha2::{Digest, Sha256};

/// `sha256:<64 hex digits>`.
pub type ContentId = String;

/// What identifies an unchanged file: device, inode, size, mtime (s, ns).
type FileStamp = (u64, u64, u64, i64, i64);

#[derive(Default)]
pub struct IdentityMemo {
    known: Mutex<HashMap<FileStamp, ContentId>>,
}

/// The sha256 a hub blob path carries in its name, if it is one.
pub fn blob_sha256(canonical: &Path) -> Option<String> {
    let name = canonical.file_name()?.to_str()?;
    let in_blobs = canonical.parent()?.file_name()? == "blobs";
    (in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| name.to_ascii_lowercase())
}

impl IdentityMemo {
    pub fn new() -> Self {
        Self::default()
    }

    /// The content identity of `path` (following symlinks).
    pub fn content_id(&self, path: &Path) -> io::Result<ContentId> {
        let canonical: PathBuf = path.canonicalize()?;
        if let Some(sha) = blob_sha256(&canonical) {
            return Ok(format!("sha256:{sha}"));
        }
        let meta = std::fs::metadata(&canonical)?;
        let key = (meta.dev(), meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
        if let Some(id) = self.known.lock().expect("identity memo").get(&key) {
            return Ok(id.clone());
        }
        let mut file = File::open(&canonical)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let id = format!("sha256:{:x}", hasher.finalize());
        self.known.lock().expect("identity memo").insert(key, id.clone());
        Ok(id)
    }
}

/// What a `stat` (following symlinks) says about a path that has not
/// changed: device, inode, size, mtime and ctime (s, ns); `None` if absent.
type PathStamp = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn path_stamp(path: &Path) -> PathStamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

/// A resolution and the identities of its weight files, with the stamps of
/// every path they depend on.
#[derive(Clone)]
struct Remembered {
    resolved: ResolvedModel,
    content: Vec<ContentId>,
    stamps: Vec<(PathBuf, PathStamp)>,
}

/// Resolutions of model references, reused while nothing they read changed.
#[derive(Default)]
pub struct ResolutionMemo {
    known: Mutex<HashMap<ModelSource, Remembered>>,
}

/// Remembered references at most; past that the memo starts again.
const MAX_REMEMBERED: usize = 4096;

/// Every path whose change could change `source`'s resolution or its
/// files' identities: a directory's entries (its mtime), the ref a hub
/// revision names, the shard index, the single weight file, each weight
/// file (its target, for a hub symlink).
fn dependencies(source: &ModelSource, resolved: &ResolvedModel) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    match source {
        ModelSource::HfRepo { repo, revision, hub_cache, .. } => {
            let folder = hub_cache.join(format!("models--{}", repo.replace('/', "--")));
            paths.push(folder.join("refs").join(revision));
            paths.push(folder.join("snapshots"));
            paths.push(resolved.dir.join("config.json"));
        }
        ModelSource::Dir { path, .. } => paths.push(path.clone()),
    }
    paths.push(resolved.dir.clone());
    paths.extend(weight_candidates(&resolved.dir, source.variant()));
    paths.extend(resolved.weights.iter().cloned());
    paths.dedup();
    paths
}

fn stamps(paths: Vec<PathBuf>) -> Vec<(PathBuf, PathStamp)> {
    paths.into_iter().map(|p| {
        let s = path_stamp(&p);
        (p, s)
    }).collect()
}

/// Why a reference could not be identified.
#[derive(Debug)]
pub enum IdentifyError {
    Resolve(mora_common::model::ResolveError),
    Read { path: PathBuf, source: io::Error },
}

impl ResolutionMemo {
    pub fn new() -> Self {
        Self::default()
    }

    /// `source` resolved, with the content identity of each weight file.
    pub fn identify(&self, source: &ModelSource, files: &IdentityMemo) -> Result<(ResolvedModel, Vec<ContentId>), IdentifyError> {
        let remembered = self.known.lock().expect("resolution memo").get(source).cloned();
        if let Some(r) = remembered {
            if r.stamps.iter().all(|(p, s)| path_stamp(p) == *s) {
                return Ok((r.resolved, r.content));
            }
        }
        let resolved = source.resolve().map_err(IdentifyError::Resolve)?;
        // Stamped between two resolutions: a change before the stamps shows
        // in the second resolution, one after them in the next check.
        let stamps = stamps(dependencies(source, &resolved));
        let mut content = Vec::with_capacity(resolved.weights.len());
        for w in &resolved.weights {
            content.push(files.content_id(w).map_err(|e| IdentifyError::Read { path: w.clone(), source: e })?);
        }
        if source.resolve().as_ref() == Ok(&resolved) {
            let mut known = self.known.lock().expect("resolution memo");
            if known.len() >= MAX_REMEMBERED {
                known.clear();
            }
            known.insert(source.clone(), Remembered { resolved: resolved.clone(), content: content.clone(), stamps });
        }
        Ok((resolved, content))
    }

    /// References remembered (for tests).
    pub fn len(&self) -> usize {
        self.known.lock().expect("resolution memo").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_model(dir: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(SINGLE_WEIGHTS), bytes).unwrap();
    }

    #[test]
    fn a_remembered_resolution_follows_changes_to_the_files_it_read() {
        let d = mora_test_support::Scratch::new("resolve-memo");
        write_model(&d, b"first bytes");
        let (memo, files) = (ResolutionMemo::new(), IdentityMemo::new());
        let source = ModelSource::Dir { path: d.to_path_buf(), variant: None };
        let sha = |b: &[u8]| format!("sha256:{:x}", Sha256::digest(b));
        let (r, ids) = memo.identify(&source, &files).unwrap();
        assert_eq!((r.weights.clone(), ids), (vec![d.join(SINGLE_WEIGHTS)], vec![sha(b"first bytes")]));
        assert_eq!(memo.len(), 1);
        assert_eq!(memo.identify(&source, &files).unwrap().1, vec![sha(b"first bytes")]);

        // Rewritten in place, same size: a new identity.
        std::fs::write(d.join(SINGLE_WEIGHTS), b"other bytes").unwrap();
        assert_eq!(memo.identify(&source, &files).unwrap().1, vec![sha(b"other bytes")]);
        // Replaced by a rename.
        std::fs::write(d.join("new"), b"renamed over").unwrap();
        std::fs::rename(d.join("new"), d.join(SINGLE_WEIGHTS)).unwrap();
        assert_eq!(memo.identify(&source, &files).unwrap().1, vec![sha(b"renamed over")]);
        // Sharded: an index appears, and the resolution follows it.
        std::fs::write(d.join("s1.safetensors"), b"shard one").unwrap();
        std::fs::write(d.join("s2.safetensors"), b"shard two").unwrap();
        std::fs::write(d.join(SHARD_INDEX), r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#).unwrap();
        let (r, ids) = memo.identify(&source, &files).unwrap();
        assert_eq!(r.weights, vec![d.join("s1.safetensors"), d.join("s2.safetensors")]);
        assert_eq!(ids, vec![sha(b"shard one"), sha(b"shard two")]);
        // A shard changes.
        std::fs::write(d.join("s2.safetensors"), b"shard 2, longer").unwrap();
        assert_eq!(memo.identify(&source, &files).unwrap().1[1], sha(b"shard 2, longer"));
        // The index goes: back to the single file; then the directory goes.
        std::fs::remove_file(d.join(SHARD_INDEX)).unwrap();
        assert_eq!(memo.identify(&source, &files).unwrap().1, vec![sha(b"renamed over")]);
        std::fs::remove_dir_all(&d).unwrap();
        assert!(matches!(memo.identify(&source, &files), Err(IdentifyError::Resolve(_))));
    }

    #[test]
    fn a_remembered_hub_reference_follows_its_ref() {
        let hub = mora_test_support::Scratch::new("resolve-hub");
        let repo = hub.join("models--o--m");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        let blob = |bytes: &[u8]| {
            let sha = format!("{:x}", Sha256::digest(bytes));
            std::fs::write(repo.join("blobs").join(&sha), bytes).unwrap();
            sha
        };
        let snapshot = |commit: &str, sha: &str| {
            let s = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&s).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{sha}"), s.join(SINGLE_WEIGHTS)).unwrap();
        };
        let (a, b) = (blob(b"revision a"), blob(b"revision b"));
        snapshot("aaaa", &a);
        snapshot("bbbb", &b);
        std::fs::write(repo.join("refs").join("main"), "aaaa").unwrap();
        let (memo, files) = (ResolutionMemo::new(), IdentityMemo::new());
        let source = ModelSource::HfRepo { repo: "o/m".into(), revision: "main".into(), hub_cache: hub.to_path_buf(), subfolder: None, variant: None };
        assert_eq!(memo.identify(&source, &files).unwrap().1, vec![format!("sha256:{a}")]);
        assert_eq!(memo.identify(&source, &files).unwrap().1, vec![format!("sha256:{a}")]);
        std::fs::write(repo.join("refs").join("main"), "bbbb").unwrap();
        let (r, ids) = memo.identify(&source, &files).unwrap();
        assert_eq!((r.dir, ids), (repo.join("snapshots").join("bbbb"), vec![format!("sha256:{b}")]));
        let _ = std::fs::remove_dir_all(&hub);
    }

    #[test]
    fn hub_blob_is_identified_by_its_name_and_a_copy_by_its_hash() {
        let d = mora_test_support::Scratch::new("id");
        std::fs::create_dir_all(d.join("blobs")).unwrap();
        let content = b"the same bytes";
        let sha = format!("{:x}", Sha256::digest(content));
        std::fs::write(d.join("blobs").join(&sha), content).unwrap();
        std::fs::write(d.join("copy.safetensors"), content).unwrap();
        std::os::unix::fs::symlink(d.join("blobs").join(&sha), d.join("link.safetensors")).unwrap();
        let memo = IdentityMemo::new();
        let by_name = memo.content_id(&d.join("blobs").join(&sha)).unwrap();
        let by_link = memo.content_id(&d.join("link.safetensors")).unwrap();
        let by_hash = memo.content_id(&d.join("copy.safetensors")).unwrap();
        assert_eq!(by_name, format!("sha256:{sha}"));
        assert_eq!(by_link, by_name);
        assert_eq!(by_hash, by_name, "a local copy hashes to the blob's name");
        std::fs::write(d.join("other.safetensors"), b"other bytes").unwrap();
        assert_ne!(memo.content_id(&d.join("other.safetensors")).unwrap(), by_name);
    }

    #[test]
    fn only_hex_names_inside_blobs_count_as_blob_hashes() {
        assert!(blob_sha256(Path::new("/x/blobs/notahash")).is_none());
        let h = "a".repeat(64);
        assert!(blob_sha256(&Path::new("/x/snapshots").join(&h)).is_none());
        assert_eq!(blob_sha256(&Path::new("/x/blobs").join(&h)), Some(h));
    }
}
