//! Scratch directories for tests, removed when dropped, so that a test run
//! leaves nothing behind in the temporary directory. Every crate's unit
//! tests and the end-to-end tests (`mora::Scratch`) share this one; no
//! product crate depends on it but as a dev-dependency.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh, private (0700) directory under the temporary directory, named
/// `mora-t-PID-N-TAG`; removed with its contents on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mora-t-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        // Private whatever the umask: daemons refuse world-writable socket directories.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod scratch dir");
        Scratch { path }
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_directory_is_private_distinct_and_gone_when_dropped() {
        let (a, b) = (Scratch::new("x"), Scratch::new("x"));
        assert_ne!(a.path, b.path);
        std::fs::write(a.join("f"), "data").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&a.path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
        let kept = a.path.clone();
        drop(a);
        assert!(!kept.exists() && b.path.is_dir());
    }
}
