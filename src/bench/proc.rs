//! What the benchmarks read of processes and files: memory from
//! `/proc/PID/smaps_rollup`, open descriptors, and file reads with the page
//! cache dropped for that file.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

/// A process's memory, in bytes, from `/proc/PID/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Smaps {
    /// Resident set: every page mapped and in memory.
    pub rss: u64,
    /// Proportional set: each shared page divided among the processes mapping it.
    pub pss: u64,
    /// Resident pages other processes map too.
    pub shared: u64,
    /// Resident pages only this process maps: what it holds of its own.
    pub private: u64,
}

impl Smaps {
    /// The larger of each field (a peak over samples).
    pub fn max(self, o: Smaps) -> Smaps {
        Smaps { rss: self.rss.max(o.rss), pss: self.pss.max(o.pss), shared: self.shared.max(o.shared), private: self.private.max(o.private) }
    }
}

/// Parses the text of `smaps_rollup` (kB fields).
pub fn parse_smaps(text: &str) -> Smaps {
    let mut s = Smaps::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(v)) = (it.next(), it.next()) else { continue };
        let Ok(kb) = v.parse::<u64>() else { continue };
        let b = kb * 1024;
        match key {
            "Rss:" => s.rss = b,
            "Pss:" => s.pss = b,
            "Shared_Clean:" | "Shared_Dirty:" => s.shared += b,
            "Private_Clean:" | "Private_Dirty:" => s.private += b,
            _ => {}
        }
    }
    s
}

/// The memory of process `pid`; `None` once it has exited (a zombie maps nothing).
pub fn smaps(pid: u32) -> Option<Smaps> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let s = parse_smaps(&text);
    (s.rss > 0).then_some(s)
}

/// Descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Asks the kernel to drop `path`'s pages from the page cache, so that the
/// next read comes from the disk. Pages a process still maps stay.
pub fn drop_cached(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).map_err(|e| format!("fadvise {}: {e}", path.display()))
}

/// Reads `path` whole in 16 MiB chunks, as fast as `read(2)` goes; returns
/// the time taken and the bytes read.
pub fn read_whole(path: &Path) -> Result<(Duration, u64), String> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; 16 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((t.elapsed(), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_fields_add_up() {
        let text = "00400000-7ffd [rollup]\nRss:                1000 kB\nPss:                 600 kB\n\
                    Pss_Anon:            100 kB\nShared_Clean:        700 kB\nShared_Dirty:        100 kB\n\
                    Private_Clean:        50 kB\nPrivate_Dirty:       150 kB\nReferenced:         1000 kB\n";
        assert_eq!(parse_smaps(text), Smaps { rss: 1000 << 10, pss: 600 << 10, shared: 800 << 10, private: 200 << 10 });
    }

    #[test]
    fn this_process_has_memory_and_descriptors() {
        let me = smaps(std::process::id()).expect("smaps of self");
        assert!(me.rss > 0 && me.pss > 0 && me.rss >= me.private);
        assert!(open_fds(std::process::id()) >= 3);
    }

    #[test]
    fn a_file_reads_whole_after_its_pages_are_dropped() {
        let dir = crate::Scratch::new("bench-read");
        let p = dir.join("f");
        std::fs::write(&p, vec![7u8; (16 << 20) + 5]).unwrap();
        drop_cached(&p).unwrap();
        assert_eq!(read_whole(&p).unwrap().1, (16 << 20) + 5);
    }
}
