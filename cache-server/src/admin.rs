//! The admin commands (`ps`, `load`, `evict`, `pin`, `unpin`, `clear`,
//! `stop`): short-lived clients of a running daemon.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mora_common::connection::{ConnectError, Connection};
use mora_common::manifest::WeightDType;
use mora_common::protocol::{DaemonStatus, Device, ModelState, ModelStatus, Request, Response, Selector};
use mora_common::units::KeepAlive;
use mora_common::ModelSource;

use mora_common::units::human_bytes;

const CLIENT: &str = concat!("mora-cache ", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Call(#[from] mora_common::connection::CallError),
    #[error("{0}")]
    Daemon(String),
    #[error("the daemon sent an unexpected reply")]
    Unexpected,
    #[error("the daemon at {} did not exit within {secs} s of being asked to stop", path.display())]
    StillRunning { path: std::path::PathBuf, secs: u64 },
}

fn call(socket: &Path, request: &Request) -> Result<Response, AdminError> {
    let conn = Connection::connect(socket, CLIENT)?;
    match conn.call(request)?.0 {
        Response::Error(e) => Err(AdminError::Daemon(e.message)),
        other => Ok(other),
    }
}

/// The selector for a model named on the command line (see [`ModelSource::from_arg`]).
pub fn selector(arg: &str, dtype: Option<WeightDType>) -> Selector {
    Selector { name: ModelSource::from_arg(arg).display_name(), dtype }
}

/// Asks the daemon for its state.
pub fn status(socket: &Path) -> Result<DaemonStatus, AdminError> {
    match call(socket, &Request::List)? {
        Response::Status(s) => Ok(s),
        _ => Err(AdminError::Unexpected),
    }
}

/// Preloads a model; returns its state as the daemon reports it.
pub fn load(
    socket: &Path,
    source: ModelSource,
    dtype: WeightDType,
    device: Device,
    pin: bool,
    keep_alive: Option<KeepAlive>,
) -> Result<Option<ModelStatus>, AdminError> {
    let conn = Connection::connect(socket, CLIENT)?;
    let request = Request::Load { source, dtype, device, pin, keep_alive };
    let (response, _) = conn.call_showing_load(&request, "mora-cache")?;
    match response {
        Response::Error(e) => Err(AdminError::Daemon(e.message)),
        Response::Loaded(s) => Ok(Some(s)),
        Response::Changed { .. } => Ok(None),
        _ => Err(AdminError::Unexpected),
    }
}

/// Sends evict, pin, unpin or clear; returns the models acted on and the bytes freed.
pub fn change(socket: &Path, request: Request) -> Result<(Vec<String>, u64), AdminError> {
    match call(socket, &request)? {
        Response::Changed { models, bytes } => Ok((models, bytes)),
        _ => Err(AdminError::Unexpected),
    }
}

/// `ps --json`: an array of objects, one per model held or loading.
pub fn to_json(models: &[ModelStatus]) -> String {
    let arr: Vec<serde_json::Value> = models.iter().map(ModelStatus::to_json).collect();
    serde_json::to_string_pretty(&arr).expect("JSON of plain values")
}

/// `ps`: a table for people, and a line with the budget.
pub fn to_table(status: &DaemonStatus) -> String {
    let mut out = String::new();
    let models = &status.models;
    if models.is_empty() {
        out.push_str("no models resident\n");
    } else {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let rows: Vec<[String; 10]> = models
            .iter()
            .map(|m| {
                [
                    m.names.join(", "),
                    device_label(status, m.device),
                    m.dtype.to_string(),
                    human_bytes(m.bytes),
                    m.leases.to_string(),
                    if m.pinned { "yes".into() } else { "no".into() },
                    m.loads.to_string(),
                    m.hits.to_string(),
                    match m.state {
                        ModelState::Loading => "loading".into(),
                        ModelState::Resident => format!("{} ago", human_age(now.saturating_sub(m.last_used_unix_ms))),
                    },
                    match (m.expires_unix_ms, m.pinned, m.leases) {
                        (Some(at), _, _) => format!("in {}", human_age(at.saturating_sub(now))),
                        (None, true, _) => "pinned".into(),
                        (None, _, n) if n > 0 => "in use".into(),
                        (None, _, _) if m.keep_alive == KeepAlive::Forever => "never".into(),
                        _ => "-".into(),
                    },
                ]
            })
            .collect();
        let header = ["NAME", "DEVICE", "DTYPE", "SIZE", "LEASES", "PINNED", "LOADS", "HITS", "LAST USED", "EXPIRES"];
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let mut line = |cells: &[&str]| {
            let parts: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(&header);
        for r in &rows {
            line(&r.each_ref().map(String::as_str));
        }
    }
    out.push_str(&format!(
        "cpu: {} of {} budget in use; default keep-alive {}\n",
        human_bytes(status.used),
        human_bytes(status.budget),
        status.default_keep_alive
    ));
    for g in &status.gpus {
        out.push_str(&format!(
            "cuda:{} ({}, {}): {} of {} budget in use\n",
            g.ordinal,
            g.name,
            g.uuid,
            human_bytes(g.used),
            human_bytes(g.budget)
        ));
    }
    out
}

/// `cpu`, or `cuda:N` in the daemon's numbering (the UUID if it has none).
fn device_label(status: &DaemonStatus, device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(uuid) => match status.gpus.iter().find(|g| g.uuid == uuid) {
            Some(g) => format!("cuda:{}", g.ordinal),
            None => uuid.to_string(),
        },
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
        // Gone once its socket is (a socket it bound), or once its lock is
        // free (a socket a service manager passed it stays, and connecting
        // to it would start the daemon again).
        if !socket.exists() || lock_is_free(socket) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(AdminError::StillRunning { path: socket.to_path_buf(), secs: wait.as_secs() })
}

/// True when no process holds the daemon lock beside `socket`. The shared
/// lock taken to find out is dropped at once.
fn lock_is_free(socket: &Path) -> bool {
    use rustix::fs::{flock, FlockOperation};
    match std::fs::File::open(mora_common::paths::lock_path(socket)) {
        Ok(f) => flock(&f, FlockOperation::NonBlockingLockShared).is_ok(),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelStatus {
        ModelStatus {
            name: "org/model".into(),
            names: vec!["org/model".into(), "/local/copy".into()],
            state: ModelState::Resident,
            dir: "/m".into(),
            dtype: WeightDType::F32,
            device: Device::Cpu,
            bytes: 90_868_224,
            tensors: 101,
            leases: 1,
            lease_pids: vec![4242],
            pinned: false,
            keep_alive: KeepAlive::For(Duration::from_secs(1800)),
            expires_unix_ms: None,
            loads: 1,
            hits: 2,
            last_used_unix_ms: 1_700_000_000_000,
            load_ms: 40,
        }
    }

    fn status(models: Vec<ModelStatus>) -> DaemonStatus {
        DaemonStatus {
            pid: 1,
            budget: 8 << 30,
            used: 90_868_224,
            default_keep_alive: KeepAlive::Forever,
            gpus: Vec::new(),
            models,
        }
    }

    #[test]
    fn json_listing_has_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_str(&to_json(&[model()])).unwrap();
        let m = &v[0];
        for key in [
            "name", "names", "dtype", "device", "bytes", "leases", "pinned", "loads", "hits", "last_used", "expires",
            "keep_alive",
        ] {
            assert!(m.get(key).is_some(), "missing {key}");
        }
        assert_eq!(m["dtype"], "f32");
        assert_eq!(m["device"], "cpu");
        assert_eq!(m["hits"], 2);
        assert_eq!(m["last_used"], 1_700_000_000);
        assert_eq!(m["names"][1], "/local/copy");
        assert_eq!(m["keep_alive"], "30m");
        assert_eq!(m["lease_pids"][0], 4242);
    }

    #[test]
    fn table_lists_every_name_and_the_budget() {
        let t = to_table(&status(vec![model()]));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].starts_with("org/model, /local/copy") && lines[1].contains("86.7 MiB"), "{t}");
        assert!(lines[1].contains("in use"), "{t}");
        assert!(lines[2].contains("of 8.0 GiB budget"), "{t}");
        assert!(to_table(&status(vec![])).starts_with("no models resident\n"));
    }

    #[test]
    fn table_names_gpus_by_the_daemons_ordinal_and_shows_their_budgets() {
        use mora_common::protocol::{GpuStatus, GpuUuid};
        let uuid = GpuUuid([0x11; 16]);
        let mut m = model();
        m.device = Device::Cuda(uuid);
        let mut s = status(vec![m]);
        s.gpus.push(GpuStatus { uuid, ordinal: 1, name: "NVIDIA H100".into(), budget: 70 << 30, used: 90_868_224 });
        let t = to_table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].contains("  cuda:1  "), "{t}");
        assert_eq!(lines[3], format!("cuda:1 (NVIDIA H100, {uuid}): 86.7 MiB of 70.0 GiB budget in use"));
    }

    #[test]
    fn a_directory_argument_is_a_local_model_and_anything_else_a_repo() {
        let dir = std::env::temp_dir();
        assert!(matches!(ModelSource::from_arg(dir.to_str().unwrap()), ModelSource::Dir { .. }));
        match ModelSource::from_arg("org/name@v2") {
            ModelSource::HfRepo { repo, revision, .. } => assert_eq!((repo.as_str(), revision.as_str()), ("org/name", "v2")),
            other => panic!("{other:?}"),
        }
        assert_eq!(selector("org/name", None).name, "org/name");
    }
}
