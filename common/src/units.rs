//! Sizes and durations as people type them: `8GiB`, `512MB`, `30m`, `-1`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a size does not parse; the message quotes what was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size (try 8GiB, 512MiB, 2GB)")]
    NotASize(String),
    #[error("`{text}`: unknown size unit `{unit}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")]
    Unit { text: String, unit: String },
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// Why a duration or a keep-alive does not parse; the message quotes what
/// was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration (try 30m, 90s, 2h, -1, 0)")]
    NotADuration(String),
    #[error("`{text}`: unknown duration unit `{unit}` (use ms, s, m, h, d)")]
    Unit { text: String, unit: String },
    #[error("`{0}` is out of range")]
    OutOfRange(String),
}

/// Parses a byte size: a number (decimals allowed) and an optional unit.
/// `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` are powers of 1024;
/// `KB`, `MB`, `GB`, `TB` are powers of 1000; `B` or no unit is bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| SizeError::NotASize(s.to_string()))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(SizeError::Unit { text: s.to_string(), unit: other.to_string() }),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(SizeError::TooLarge(s.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// `86.6 MiB`, `1.0 GiB`, `512 B`: binary units, one decimal.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// How long an idle model stays resident after its last lease ends, as in
/// Ollama's `keep_alive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeepAlive {
    /// Never evicted for being idle (`-1`); the budget may still evict it.
    Forever,
    /// Evicted this long after its last use; zero means as soon as the last
    /// lease ends.
    For(Duration),
}

impl KeepAlive {
    /// Parses `-1` (forever), `0` (at once), or a duration: `500ms`, `90s`,
    /// `30m`, `2h`, `1d`; a bare number is seconds.
    pub fn parse(s: &str) -> Result<KeepAlive, DurationError> {
        let t = s.trim();
        if t == "-1" || t.starts_with('-') && parse_duration(&t[1..]).is_ok() {
            return Ok(KeepAlive::Forever);
        }
        parse_duration(t).map(KeepAlive::For)
    }
}

impl std::fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepAlive::Forever => f.write_str("forever"),
            KeepAlive::For(d) => f.write_str(&format_duration(*d)),
        }
    }
}

/// `500ms`, `90s`, `1.5m`, `30m`, `2h`, `1d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| DurationError::NotADuration(s.to_string()))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => return Err(DurationError::Unit { text: s.to_string(), unit: other.to_string() }),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| DurationError::OutOfRange(s.to_string()))
}

/// The shortest of `1h30m`-style renderings that is exact to the millisecond.
/// The civil date (year, month 1-12, day 1-31) of a day counted from
/// 1970-01-01 (Howard Hinnant's algorithm), for dates in reports and
/// templates without a date library.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_and_decimal_units() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5 KiB").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").unwrap_err().to_string().contains("not a size"));
        assert!(parse_size("3 parsecs").unwrap_err().to_string().contains("unknown size unit"));
    }

    #[test]
    fn keep_alive_like_ollama() {
        assert_eq!(KeepAlive::parse("-1").unwrap(), KeepAlive::Forever);
        assert_eq!(KeepAlive::parse("0").unwrap(), KeepAlive::For(Duration::ZERO));
        assert_eq!(KeepAlive::parse("30m").unwrap(), KeepAlive::For(Duration::from_secs(1800)));
        assert_eq!(KeepAlive::parse("250ms").unwrap(), KeepAlive::For(Duration::from_millis(250)));
        assert_eq!(KeepAlive::parse("90").unwrap(), KeepAlive::For(Duration::from_secs(90)));
        assert!(KeepAlive::parse("soon").is_err());
    }

    #[test]
    fn durations_render_compactly() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(KeepAlive::Forever.to_string(), "forever");
    }
}
