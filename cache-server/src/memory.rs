//! How much memory the machine has to give.

use std::io;

/// Share of `MemAvailable` the default budget takes.
pub const DEFAULT_BUDGET_FRACTION: f64 = 0.5;

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn available_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_available(&text).ok_or_else(|| io::Error::other("/proc/meminfo has no MemAvailable line"))
}

fn parse_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The budget when `--max-memory` is not given: half of the memory available
/// when the daemon starts, so the cache never crowds out the runs it serves.
pub fn default_budget() -> io::Result<u64> {
    Ok((available_bytes()? as f64 * DEFAULT_BUDGET_FRACTION) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_available(text), Some(20_000_000 * 1024));
        assert_eq!(parse_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn default_budget_is_a_positive_share_of_this_machine() {
        let b = default_budget().unwrap();
        assert!(b > 0 && b <= available_bytes().unwrap());
    }
}
