//! Content identity of weight files, so the same bytes under two names
//! (two repo ids, a repo and a local copy) are held once.
//!
//! A file inside a Hugging Face cache is a blob named by its sha256: that
//! name is its identity, free. Any other file is hashed with sha256 once per
//! (device, inode, size, mtime) and remembered, so a later request for the
//! same unchanged file costs a `stat`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_blob_is_identified_by_its_name_and_a_copy_by_its_hash() {
        let d = std::env::temp_dir().join(format!("mora-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
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
