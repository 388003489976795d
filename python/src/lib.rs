//! `mora._mora`: the native half of the Python package. It speaks the
//! daemon's protocol through `mora-common` (nothing of the protocol is
//! written again in Python) and hands Python what it needs to build arrays:
//! a checked segment descriptor and its manifest, or a CUDA IPC handle.
//! Mapping and array building are in `mora/__init__.py` (numpy, torch).
//!
//! Errors are raised as the classes of `mora.errors`, each with the one-line
//! message the CLI prints for the same failure.

use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use mora_common::connection::{self, CallError, ConnectError};
use mora_common::manifest::WeightDType;
use mora_common::protocol::{
    Device, ErrorKind, GpuUuid, ModelStatus, Request, Response, Selector,
};
use mora_common::acquired::LentMemory;
use mora_common::units::KeepAlive;
use mora_common::ModelSource;

const CLIENT: &str = concat!("mora-python ", env!("CARGO_PKG_VERSION"));

/// Raises `mora.errors.<class>(message, *extra)`; a RuntimeError with the
/// same message if that module cannot be imported.
fn error(py: Python<'_>, class: &str, message: String, kind: Option<&str>) -> PyErr {
    let made = py.import("mora.errors").and_then(|m| m.getattr(class)).and_then(|cls| match kind {
        Some(k) => cls.call1((message.clone(), k)),
        None => cls.call1((message.clone(),)),
    });
    match made {
        Ok(value) => PyErr::from_value(value),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

fn invalid(py: Python<'_>, message: String) -> PyErr {
    error(py, "InvalidArgument", message, None)
}

fn connect_error(py: Python<'_>, e: ConnectError) -> PyErr {
    match e {
        ConnectError::NotRunning(p) => error(
            py,
            "DaemonNotRunning",
            format!(
                "no cache daemon is listening at {}: start one with `mora-cache serve`, or connect with autostart=True",
                p.display()
            ),
            None,
        ),
        ConnectError::Refused { .. } => error(py, "VersionMismatch", e.to_string(), None),
        other => error(py, "ConnectFailed", other.to_string(), None),
    }
}

fn call_error(py: Python<'_>, e: CallError, during: &str) -> PyErr {
    error(
        py,
        "ConnectionLost",
        format!("{e} (during {during}; the daemon's log is beside its socket): connect again to start a new one"),
        None,
    )
}

/// The daemon's refusal as the exception for its kind.
fn daemon_error(py: Python<'_>, kind: ErrorKind, message: String) -> PyErr {
    let name = match kind {
        ErrorKind::NotFound => return error(py, "ModelNotFound", message, None),
        ErrorKind::InvalidModel => "invalid_model",
        ErrorKind::BadRequest => "bad_request",
        ErrorKind::Internal => "internal",
        ErrorKind::NoRoom => "no_room",
        ErrorKind::Refused => "refused",
    };
    error(py, "DaemonError", message, Some(name))
}

fn unexpected(py: Python<'_>, what: &str, got: &Response) -> PyErr {
    error(py, "MoraError", format!("the daemon sent an unexpected reply to {what}: {got:?}"), None)
}

fn weight_dtype(py: Python<'_>, dtype: Option<&str>) -> PyResult<WeightDType> {
    match dtype {
        None => Ok(WeightDType::default()),
        Some(d) => d.parse().map_err(|e: String| invalid(py, e)),
    }
}

fn keep_alive(py: Python<'_>, k: Option<&str>) -> PyResult<Option<KeepAlive>> {
    k.map(|k| KeepAlive::parse(k).map_err(|e| invalid(py, format!("keep_alive {e}")))).transpose()
}

/// `None` is the host; 16 bytes are a GPU's UUID (the Python side finds it
/// through the CUDA driver, in this process's numbering).
fn device(py: Python<'_>, gpu: Option<&[u8]>) -> PyResult<Device> {
    match gpu {
        None => Ok(Device::Cpu),
        Some(b) => <[u8; 16]>::try_from(b)
            .map(|u| Device::Cuda(GpuUuid(u)))
            .map_err(|_| invalid(py, format!("a GPU UUID is 16 bytes, not {}", b.len()))),
    }
}

/// `mora-cache` on `PATH`, for auto-start.
fn daemon_on_path() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("mora-cache"))
        .find(|p| p.is_file())
}

/// One tensor of a lent model: name, dtype (safetensors' name: "F32",
/// "BF16", "I64", "BOOL"), shape, byte offset in the segment, byte length.
type TensorRow = (String, String, Vec<usize>, u64, u64);

/// A model the daemon lent: where its bytes are and what they hold.
#[pyclass(module = "mora._mora", frozen, get_all)]
struct Acquired {
    name: String,
    dir: PathBuf,
    dtype: String,
    lease: u64,
    loaded_now: bool,
    load_ms: u64,
    /// Bytes of the segment or GPU allocation.
    len: u64,
    /// The sealed memfd (its seals and size checked), now owned by the
    /// caller, who maps it and closes it; `None` for GPU memory.
    fd: Option<i32>,
    /// The CUDA IPC handle (64 bytes) for GPU memory; `None` on the host.
    ipc_handle: Option<Py<PyBytes>>,
    tensors: Vec<TensorRow>,
}

/// A connection to the daemon. Its leases last while it is open.
#[pyclass(module = "mora._mora", frozen)]
struct Connection {
    conn: Mutex<Option<connection::Connection>>,
    socket: PathBuf,
    daemon_pid: u32,
}

impl Connection {
    /// Runs `f` on the open connection without the GIL.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&connection::Connection) -> T + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            guard.as_ref().map(f)
        })
        .ok_or_else(|| error(py, "ClientClosed", "this mora client is closed".into(), None))
    }

    /// Sends an admin request; the daemon's refusal becomes an exception.
    fn admin(&self, py: Python<'_>, request: Request, what: &str) -> PyResult<Response> {
        match self.with(py, |c| c.call(&request))? {
            Ok((Response::Error(e), _)) => Err(daemon_error(py, e.kind, e.message)),
            Ok((r, _)) => Ok(r),
            Err(e) => Err(call_error(py, e, what)),
        }
    }

    fn change(&self, py: Python<'_>, request: Request, what: &str) -> PyResult<(Vec<String>, u64)> {
        match self.admin(py, request, what)? {
            Response::Changed { models, bytes } => Ok((models, bytes)),
            other => Err(unexpected(py, what, &other)),
        }
    }
}

fn selector(py: Python<'_>, model: &str, dtype: Option<&str>) -> PyResult<Selector> {
    let dtype = dtype.map(|d| d.parse().map_err(|e: String| invalid(py, e))).transpose()?;
    Ok(Selector { name: ModelSource::from_arg(model).display_name(), dtype })
}

/// A model as Python names it: `model` as the CLI takes it, then one
/// component of a pipeline (`subfolder`), in a weight variant.
fn source(model: &str, subfolder: Option<&str>, variant: Option<&str>) -> ModelSource {
    let source = ModelSource::from_arg(model);
    let source = match subfolder {
        Some(sub) => source.component(sub),
        None => source,
    };
    source.with_variant(variant.map(str::to_string))
}

#[pymethods]
impl Connection {
    /// Connects to the daemon at `socket` (None: `$MORA_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/mora/cache.sock`, else `/tmp/mora-$UID/cache.sock`).
    /// With `autostart`, starts `mora-cache serve` (found on `PATH`) when none
    /// answers, as `mora-exec` does.
    #[new]
    #[pyo3(signature = (socket=None, autostart=true))]
    fn new(py: Python<'_>, socket: Option<PathBuf>, autostart: bool) -> PyResult<Self> {
        let socket = mora_common::paths::socket_path(socket.as_deref());
        let binary = if autostart { Some(daemon_on_path().unwrap_or_else(|| PathBuf::from("mora-cache"))) } else { None };
        let conn = py
            .detach(|| connection::connect_or_start(&socket, CLIENT, binary.as_deref()))
            .map_err(|e| match e {
                ConnectError::Start(m) if m.starts_with("cannot start mora-cache:") => error(
                    py,
                    "ConnectFailed",
                    format!(
                        "no cache daemon is listening at {} and `mora-cache` is not on PATH to start one: \
                         install it (cargo install --path cache-server) or start one with `mora-cache serve`",
                        socket.display()
                    ),
                    None,
                ),
                other => connect_error(py, other),
            })?;
        let daemon_pid = conn.daemon_pid();
        Ok(Connection { conn: Mutex::new(Some(conn)), socket, daemon_pid })
    }

    #[getter]
    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    #[getter]
    fn daemon_pid(&self) -> u32 {
        self.daemon_pid
    }

    #[getter]
    fn closed(&self) -> bool {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// Closes the connection: the daemon ends every lease it held.
    fn close(&self) {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Asks for `model` (a repo id `OWNER/NAME[@REV]` in this process's hub
    /// cache, or a directory) in `dtype` ("f32", "f16", "bf16"; None: f32) on
    /// the host (`gpu=None`) or the GPU with that UUID. A load shows progress
    /// on stderr.
    /// `subfolder` names one component of a diffusers pipeline (`unet`),
    /// `variant` the weight files' variant (`fp16`).
    #[pyo3(signature = (model, dtype=None, gpu=None, keep_alive=None, subfolder=None, variant=None))]
    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &self,
        py: Python<'_>,
        model: &str,
        dtype: Option<&str>,
        gpu: Option<&[u8]>,
        keep_alive: Option<&str>,
        subfolder: Option<&str>,
        variant: Option<&str>,
    ) -> PyResult<Acquired> {
        let dtype = weight_dtype(py, dtype)?;
        let device = device(py, gpu)?;
        let keep_alive = self::keep_alive(py, keep_alive)?;
        let source = source(model, subfolder, variant);
        let name = source.display_name();
        let request = Request::Acquire { source, dtype, device, keep_alive };
        let answer = self.with(py, |c| c.call_showing_load(&request, "mora"))?;
        let (response, fds) = answer.map_err(|e| call_error(py, e, &format!("the load of {name}")))?;
        let a = match response {
            Response::Acquired(a) => a,
            Response::Error(e) => return Err(daemon_error(py, e.kind, e.message)),
            other => return Err(unexpected(py, "acquire", &other)),
        };
        // The prepared tokenizer's descriptor, if any, is closed here: Python
        // tokenizers read tokenizer.json themselves.
        let lent = mora_common::acquired::check(a, device, fds).map_err(|e| error(py, "MoraError", e.to_string(), None))?;
        let (a, len) = (lent.reply, lent.len);
        let broken = |m: String| error(py, "MoraError", format!("{name}: {m}"), None);
        let (fd, ipc_handle) = match lent.memory {
            LentMemory::Host(segment) => {
                let owned = segment.fd().try_clone_to_owned().map_err(|e| broken(format!("cannot keep the segment: {e}")))?;
                (Some(owned.into_raw_fd()), None)
            }
            LentMemory::Gpu { handle, .. } => (None, Some(PyBytes::new(py, &handle.0).unbind())),
        };
        let tensors = a
            .manifest
            .tensors
            .into_iter()
            .map(|t| {
                let dtype = format!("{:?}", t.dtype).to_uppercase();
                (t.name, dtype, t.shape, t.offset, t.len)
            })
            .collect();
        Ok(Acquired {
            name: a.name,
            dir: a.dir,
            dtype: dtype.to_string(),
            lease: a.lease,
            loaded_now: a.loaded_now,
            load_ms: a.load_ms,
            len,
            fd,
            ipc_handle,
            tensors,
        })
    }

    /// Ends one lease before the connection closes.
    fn release(&self, py: Python<'_>, lease: u64) -> PyResult<()> {
        match self.admin(py, Request::Release { lease }, "release")? {
            Response::Released { .. } => Ok(()),
            other => Err(unexpected(py, "release", &other)),
        }
    }

    /// The daemon's state as JSON: `{"pid", "budget", "used",
    /// "default_keep_alive", "gpus": [...], "models": [...]}`, each model as
    /// `mora-cache ps --json` prints it.
    fn ps(&self, py: Python<'_>) -> PyResult<String> {
        match self.admin(py, Request::List, "ps")? {
            Response::Status(s) => Ok(serde_json::json!({
                "pid": s.pid,
                "budget": s.budget,
                "used": s.used,
                "default_keep_alive": s.default_keep_alive.to_string(),
                "gpus": s.gpus.iter().map(|g| serde_json::json!({
                    "uuid": g.uuid.to_string(), "ordinal": g.ordinal, "name": g.name,
                    "budget": g.budget, "used": g.used,
                })).collect::<Vec<_>>(),
                "models": s.models.iter().map(ModelStatus::to_json).collect::<Vec<_>>(),
            })
            .to_string()),
            other => Err(unexpected(py, "ps", &other)),
        }
    }

    /// Makes `model` resident without lending it (`mora-cache load`);
    /// returns its state as JSON, or None when it was already resident and
    /// only its pin or keep-alive changed.
    #[pyo3(signature = (model, dtype=None, gpu=None, pin=false, keep_alive=None, subfolder=None, variant=None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        model: &str,
        dtype: Option<&str>,
        gpu: Option<&[u8]>,
        pin: bool,
        keep_alive: Option<&str>,
        subfolder: Option<&str>,
        variant: Option<&str>,
    ) -> PyResult<Option<String>> {
        let request = Request::Load {
            source: source(model, subfolder, variant),
            dtype: weight_dtype(py, dtype)?,
            device: device(py, gpu)?,
            pin,
            keep_alive: self::keep_alive(py, keep_alive)?,
        };
        let answer = self.with(py, |c| c.call_showing_load(&request, "mora"))?;
        match answer.map_err(|e| call_error(py, e, "load"))?.0 {
            Response::Loaded(s) => Ok(Some(s.to_json().to_string())),
            Response::Changed { .. } => Ok(None),
            Response::Error(e) => Err(daemon_error(py, e.kind, e.message)),
            other => Err(unexpected(py, "load", &other)),
        }
    }

    /// Evicts the entries of `model` (of `dtype` only, when given); returns
    /// their names and the bytes freed. Refused while leased or pinned.
    #[pyo3(signature = (model, dtype=None))]
    fn evict(&self, py: Python<'_>, model: &str, dtype: Option<&str>) -> PyResult<(Vec<String>, u64)> {
        self.change(py, Request::Evict { target: selector(py, model, dtype)? }, "evict")
    }

    #[pyo3(signature = (model, dtype=None))]
    fn pin(&self, py: Python<'_>, model: &str, dtype: Option<&str>) -> PyResult<Vec<String>> {
        Ok(self.change(py, Request::Pin { target: selector(py, model, dtype)? }, "pin")?.0)
    }

    #[pyo3(signature = (model, dtype=None))]
    fn unpin(&self, py: Python<'_>, model: &str, dtype: Option<&str>) -> PyResult<Vec<String>> {
        Ok(self.change(py, Request::Unpin { target: selector(py, model, dtype)? }, "unpin")?.0)
    }
}

#[pymodule]
fn _mora(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Connection>()?;
    m.add_class::<Acquired>()?;
    m.add("PROTOCOL_VERSION", mora_common::protocol::PROTOCOL_VERSION)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
