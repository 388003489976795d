//! What the benchmarks read of processes and files: memory from
//! `/proc/PID/smaps_rollup`, open descriptors, and file reads with the page
//! cache dropped for that file.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

/// A process's memory, in bytes, from `/proc/PID/smaps_rollup` and
/// `/proc/PID/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Smaps {
    /// Resident set: every page mapped and in memory.
    pub rss: u64,
    /// Anonymous pages: the process's own heap, weight copies included.
    pub anon: u64,
    /// Shared-memory pages mapped (a lent segment, as far as it was touched).
    pub shmem: u64,
    /// Proportional set of anonymous and file pages: what the process costs
    /// beyond the shared memory it maps, each shared page divided among its
    /// mappers.
    pub own_pss: u64,
}

impl Smaps {
    /// The larger of each field (a peak over samples).
    pub fn max(self, o: Smaps) -> Smaps {
        Smaps { rss: self.rss.max(o.rss), anon: self.anon.max(o.anon), shmem: self.shmem.max(o.shmem), own_pss: self.own_pss.max(o.own_pss) }
    }
}

/// Parses the text of `smaps_rollup` followed by `status` (kB fields).
pub fn parse_smaps(text: &str) -> Smaps {
    let mut s = Smaps::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(v)) = (it.next(), it.next()) else { continue };
        let Ok(kb) = v.parse::<u64>() else { continue };
        let b = kb * 1024;
        match key {
            "Rss:" => s.rss = b,
            "Anonymous:" => s.anon = b,
            "RssShmem:" => s.shmem = b,
            "Pss_Anon:" | "Pss_File:" => s.own_pss += b,
            _ => {}
        }
    }
    s
}

/// The memory of process `pid`; `None` once it has exited (a zombie maps nothing).
pub fn smaps(pid: u32) -> Option<Smaps> {
    let mut text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.push_str(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?);
    let s = parse_smaps(&text);
    (s.rss > 0).then_some(s)
}

/// Bytes of the memfd segments process `pid` holds open (the daemon's
/// models), resident whether or not anything maps them.
pub fn segment_bytes(pid: u32) -> u64 {
    crate::process_memory(pid).1
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

/// Two buffers allocated and written once, for timing `memcpy` between them:
/// the memory's copy bandwidth, with no page allocated during the copy.
pub struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Memcpy {
    /// Buffers of `len` bytes each (larger copies go round them).
    pub fn new(len: usize) -> Memcpy {
        Memcpy { src: vec![1u8; len.max(1)], dst: vec![2u8; len.max(1)] }
    }

    /// The time to copy `bytes` bytes.
    pub fn time(&mut self, bytes: u64) -> Duration {
        let t = Instant::now();
        let mut left = bytes as usize;
        while left > 0 {
            let n = left.min(self.src.len());
            self.dst[..n].copy_from_slice(&self.src[..n]);
            std::hint::black_box(&mut self.dst);
            left -= n;
        }
        t.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_and_status_fields_add_up() {
        let text = "00400000-7ffd [rollup]\nRss:                1000 kB\nPss:                 600 kB\n\
                    Pss_Anon:            100 kB\nPss_File:            200 kB\nPss_Shmem:           300 kB\n\
                    Anonymous:           150 kB\nReferenced:         1000 kB\n\
                    Name:\tmora-exec\nVmRSS:\t    1000 kB\nRssAnon:\t     150 kB\nRssFile:\t     350 kB\nRssShmem:\t     500 kB\n";
        assert_eq!(parse_smaps(text), Smaps { rss: 1000 << 10, anon: 150 << 10, shmem: 500 << 10, own_pss: 300 << 10 });
    }

    #[test]
    fn this_process_has_memory_and_descriptors() {
        let me = smaps(std::process::id()).expect("smaps of self");
        assert!(me.rss > 0 && me.own_pss > 0 && me.rss >= me.anon);
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
