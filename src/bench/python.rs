//! The Python peer of scenario 1 (`benches/python/minilm.py`): a process per
//! run, and a persistent worker. Optional: `scripts/bench-python.sh` installs
//! its venv; without it the harness says the peer was skipped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The Python peer's interpreter: `$MORA_BENCH_PYTHON`, else the venv
/// `scripts/bench-python.sh` makes (which may not be installed).
pub fn peer_python() -> PathBuf {
    std::env::var_os("MORA_BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join(".mora-bench").join("python").join("bin").join("python"))
}

/// The peer's interpreter, if installed; `Err` says why the peer is skipped.
fn installed_peer() -> Result<PathBuf, String> {
    let python = peer_python();
    if !python.exists() {
        return Err(format!("python peer not installed ({} is missing; scripts/bench-python.sh installs it)", python.display()));
    }
    Ok(python)
}

pub struct Python {
    python: PathBuf,
    script: PathBuf,
}

impl Python {
    /// `$MORA_BENCH_PYTHON`, else the venv of `scripts/bench-python.sh`;
    /// `Err` says why the peer is skipped.
    pub fn find() -> Result<Python, String> {
        let python = installed_peer()?;
        Ok(Python { python, script: crate::root().join("benches").join("python").join("minilm.py") })
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.python);
        c.arg(&self.script).env("HF_HUB_OFFLINE", "1");
        c
    }

    /// One process: import, load the model, embed `texts`, write `out`, exit.
    pub fn once(&self, texts: &[&str], out: &Path) -> Result<(), String> {
        let texts = serde_json::to_string(texts).map_err(|e| e.to_string())?;
        let o = self
            .command()
            .arg("once")
            .arg(texts)
            .arg(out)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run {}: {e}", self.python.display()))?;
        if !o.status.success() {
            return Err(super::last_line(&o.stderr));
        }
        Ok(())
    }

    /// A worker with the model loaded, ready for requests.
    pub fn worker(&self) -> Result<Worker, String> {
        Worker::start(self.command().arg("worker"), &self.python, "python worker")
    }
}

pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Spawns `cmd` (a peer's `worker` mode) and waits for its "ready" line.
    fn start(cmd: &mut Command, python: &Path, what: &str) -> Result<Worker, String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("run {}: {e}", python.display()))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut w = Worker { child, stdin, stdout };
        match w.answer()?.as_str() {
            "ready" => Ok(w),
            other => Err(format!("{what} did not start: {other}")),
        }
    }

    fn answer(&mut self) -> Result<String, String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).map_err(|e| format!("python worker: {e}"))?;
        if n == 0 {
            return Err("python worker exited".into());
        }
        Ok(line.trim_end().to_string())
    }

    /// One request: embed `texts` into `out`, in the already-loaded model.
    pub fn embed(&mut self, texts: &[&str], out: &Path) -> Result<(), String> {
        let req = serde_json::json!({ "texts": texts, "out": out });
        writeln!(self.stdin, "{req}").map_err(|e| format!("python worker: {e}"))?;
        self.stdin.flush().map_err(|e| format!("python worker: {e}"))?;
        match self.answer()?.as_str() {
            "ok" => Ok(()),
            other => Err(other.to_string()),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python peer of scenario 8 (`benches/python/sd.py`): a diffusers
/// pipeline made, run once per process or by a worker, and its components
/// timed one forward at a time.
pub struct Diffusers {
    python: PathBuf,
    script: PathBuf,
    threads: usize,
}

/// One image request, as `sd.py` and Mora's image step both take it.
pub struct ImageRequest<'a> {
    pub prompt: &'a str,
    pub side: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
}

impl ImageRequest<'_> {
    fn json(&self, out: &Path) -> String {
        serde_json::json!({"prompt": self.prompt, "side": self.side, "steps": self.steps, "guidance": self.guidance, "seed": self.seed, "out": out})
            .to_string()
    }
}

impl Diffusers {
    /// The peer running torch on `threads` threads; `Err` says why it is skipped.
    pub fn find(threads: usize) -> Result<Diffusers, String> {
        let python = installed_peer()?;
        Ok(Diffusers { python, script: crate::root().join("benches").join("python").join("sd.py"), threads })
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.python);
        c.arg(&self.script).env("HF_HUB_OFFLINE", "1").env("MORA_BENCH_THREADS", self.threads.to_string());
        c
    }

    fn output(&self, c: &mut Command) -> Result<String, String> {
        let o = c.stdin(Stdio::null()).output().map_err(|e| format!("run {}: {e}", self.python.display()))?;
        if !o.status.success() {
            return Err(super::last_line(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Writes an SD-1.5-shaped pipeline with diffusers' `save_pretrained`
    /// into `out` (small shapes if `tiny`).
    pub fn make(&self, out: &Path, tiny: bool) -> Result<(), String> {
        let mut c = self.command();
        c.arg("make").arg(out);
        if tiny {
            c.arg("--tiny");
        }
        self.output(&mut c).map(drop)
    }

    /// One process: import, load the pipeline, make the image into `out`,
    /// exit. Returns the process's peak resident memory in bytes.
    pub fn once(&self, pipeline: &Path, req: &ImageRequest, out: &Path) -> Result<u64, String> {
        let stdout = self.output(self.command().arg("once").arg(pipeline).arg(req.json(out)))?;
        stdout.lines().last().and_then(|l| l.trim().parse().ok()).ok_or_else(|| format!("sd.py once printed no peak memory: {stdout:?}"))
    }

    /// `once` through `python -m mora run` (a process forked from a warm
    /// interpreter, started on first use beside the daemon at `socket`);
    /// with `borrow`, the weights are the daemon's (`sd.py once --mora`).
    /// Returns the run's peak resident memory in bytes.
    pub fn once_forked(&self, socket: &Path, pipeline: &Path, req: &ImageRequest, out: &Path, borrow: bool) -> Result<u64, String> {
        let mut c = self.forked(socket);
        c.arg(&self.script).arg("once").arg(pipeline).arg(req.json(out));
        if borrow {
            c.arg("--mora");
        }
        let stdout = self.output(&mut c)?;
        stdout.lines().last().and_then(|l| l.trim().parse().ok()).ok_or_else(|| format!("sd.py once printed no peak memory: {stdout:?}"))
    }

    /// `python -m mora run` in the peer, with the daemon at `socket`.
    fn forked(&self, socket: &Path) -> Command {
        let mut c = Command::new(&self.python);
        c.args(["-m", "mora", "run"])
            .env("HF_HUB_OFFLINE", "1")
            .env("MORA_BENCH_THREADS", self.threads.to_string())
            .env("MORA_SOCKET", socket);
        c
    }

    /// Starts the run server of `python -m mora run` (so that its start, once
    /// per installation, is not timed): runs an empty script through it.
    /// `Err` says why the peer cannot run it (the package is not installed).
    pub fn start_forked(&self, socket: &Path, scratch: &Path) -> Result<(), String> {
        let empty = scratch.join("empty.py");
        std::fs::write(&empty, "").map_err(|e| format!("write {}: {e}", empty.display()))?;
        self.output(self.forked(socket).arg(&empty)).map(drop)
    }

    /// Stops the run server started for the daemon at `socket`.
    pub fn stop_forked(&self, socket: &Path) {
        let _ = self.forked(socket).arg("--stop").stdin(Stdio::null()).output();
    }

    /// A worker with the pipeline loaded, ready for requests.
    pub fn worker(&self, pipeline: &Path) -> Result<DiffusersWorker, String> {
        Worker::start(self.command().arg("worker").arg(pipeline), &self.python, "diffusers worker").map(DiffusersWorker)
    }

    /// Milliseconds of each forward (`text_encoder`, `unet`, `vae_decoder`)
    /// over `repeats`, at `latent`×`latent` latents.
    pub fn components(&self, pipeline: &Path, latent: usize, repeats: usize) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let stdout = self.output(self.command().arg("components").arg(pipeline).arg(latent.to_string()).arg(repeats.to_string()))?;
        let last = stdout.lines().last().unwrap_or("");
        match serde_json::from_str(last) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(format!("sd.py components printed {last:?}")),
        }
    }
}

pub struct DiffusersWorker(Worker);

impl DiffusersWorker {
    /// One request in the loaded pipeline: the image into `out`.
    pub fn image(&mut self, req: &ImageRequest, out: &Path) -> Result<(), String> {
        let w = &mut self.0;
        writeln!(w.stdin, "{}", req.json(out)).map_err(|e| format!("diffusers worker: {e}"))?;
        w.stdin.flush().map_err(|e| format!("diffusers worker: {e}"))?;
        match w.answer()?.as_str() {
            "ok" => Ok(()),
            other => Err(other.to_string()),
        }
    }

    /// The worker's peak resident memory (VmHWM) so far, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.child.id())).unwrap_or_default();
        crate::kib_field(&status, "VmHWM:") * 1024
    }
}
