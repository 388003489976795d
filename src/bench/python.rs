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

pub struct Python {
    python: PathBuf,
    script: PathBuf,
}

impl Python {
    /// `$MORA_BENCH_PYTHON`, else the venv of `scripts/bench-python.sh`;
    /// `Err` says why the peer is skipped.
    pub fn find() -> Result<Python, String> {
        let python = peer_python();
        if !python.exists() {
            return Err(format!("python peer not installed ({} is missing; scripts/bench-python.sh installs it)", python.display()));
        }
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
        let mut child = self
            .command()
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("run {}: {e}", self.python.display()))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut w = Worker { child, stdin, stdout };
        match w.answer()?.as_str() {
            "ready" => Ok(w),
            other => Err(format!("python worker did not start: {other}")),
        }
    }
}

pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
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
