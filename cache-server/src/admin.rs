//! The admin commands (`ps`, `stop`): short-lived clients of a running daemon.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mora_common::connection::{ConnectError, Connection};
use mora_common::protocol::{ModelStatus, Request, Response};

const CLIENT: &str = concat!("mora-cache ", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Call(#[from] mora_common::connection::CallError),
    #[error("the daemon answered: {0}")]
    Daemon(String),
    #[error("the daemon sent an unexpected reply")]
    Unexpected,
    #[error("the daemon at {} did not exit within {secs} s of being asked to stop", path.display())]
    StillRunning { path: std::path::PathBuf, secs: u64 },
}

/// Asks the daemon for its resident models.
pub fn list(socket: &Path) -> Result<Vec<ModelStatus>, AdminError> {
    let conn = Connection::connect(socket, CLIENT)?;
    match conn.call(&Request::List)?.0 {
        Response::Models(models) => Ok(models),
        Response::Error(e) => Err(AdminError::Daemon(e.message)),
        _ => Err(AdminError::Unexpected),
    }
}

/// `ps --json`: an array of objects, one per resident model.
pub fn to_json(models: &[ModelStatus]) -> String {
    let arr: Vec<serde_json::Value> = models
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.name,
                "dir": m.dir,
                "dtype": m.dtype.to_string(),
                "device": m.device.to_string(),
                "bytes": m.bytes,
                "tensors": m.tensors,
                "leases": m.leases,
                "loads": m.loads,
                "hits": m.hits,
                "last_used": m.last_used_unix_ms / 1000,
                "load_ms": m.load_ms,
            })
        })
        .collect();
    serde_json::to_string_pretty(&arr).expect("JSON of plain values")
}

/// `ps`: a table for people.
pub fn to_table(models: &[ModelStatus]) -> String {
    if models.is_empty() {
        return "no models resident\n".to_string();
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let rows: Vec<[String; 8]> = models
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.device.to_string(),
                m.dtype.to_string(),
                human_bytes(m.bytes),
                m.leases.to_string(),
                m.loads.to_string(),
                m.hits.to_string(),
                format!("{} ago", human_age(now.saturating_sub(m.last_used_unix_ms))),
            ]
        })
        .collect();
    let header = ["NAME", "DEVICE", "DTYPE", "SIZE", "LEASES", "LOADS", "HITS", "LAST USED"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let parts: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        line(&r.each_ref().map(String::as_str));
    }
    out
}

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

fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Asks the daemon to stop and waits until it has released its socket.
/// Returns `Ok(false)` when no daemon was running.
pub fn stop(socket: &Path, wait: Duration) -> Result<bool, AdminError> {
    let conn = match Connection::connect(socket, CLIENT) {
        Ok(c) => c,
        Err(ConnectError::NotRunning(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    match conn.call(&Request::Stop)?.0 {
        Response::Stopping => {}
        Response::Error(e) => return Err(AdminError::Daemon(e.message)),
        _ => return Err(AdminError::Unexpected),
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if !socket.exists() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(AdminError::StillRunning { path: socket.to_path_buf(), secs: wait.as_secs() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mora_common::manifest::WeightDType;
    use mora_common::protocol::Device;

    fn status() -> ModelStatus {
        ModelStatus {
            name: "org/model".into(),
            dir: "/m".into(),
            dtype: WeightDType::F32,
            device: Device::Cpu,
            bytes: 90_868_224,
            tensors: 101,
            leases: 1,
            loads: 1,
            hits: 2,
            last_used_unix_ms: 1_700_000_000_000,
            load_ms: 40,
        }
    }

    #[test]
    fn json_listing_has_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_str(&to_json(&[status()])).unwrap();
        let m = &v[0];
        for key in ["name", "dtype", "device", "bytes", "leases", "loads", "hits", "last_used"] {
            assert!(m.get(key).is_some(), "missing {key}");
        }
        assert_eq!(m["dtype"], "f32");
        assert_eq!(m["device"], "cpu");
        assert_eq!(m["hits"], 2);
        assert_eq!(m["last_used"], 1_700_000_000);
    }

    #[test]
    fn table_lists_one_row_per_model_under_a_header() {
        let t = to_table(&[status()]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].starts_with("org/model") && lines[1].contains("86.7 MiB"), "{t}");
        assert_eq!(to_table(&[]), "no models resident\n");
    }
}
