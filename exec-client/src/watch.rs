//! `mora-exec watch`: run a workflow, then run it again in a fresh child
//! process every time the workflow file, or an input file it names, is saved.
//!
//! Each run is a new process, so nothing accumulates between runs (the
//! problem of a long-lived REPL that reloads models into itself), while the
//! models stay warm in the cache daemon. Files are polled (every 200 ms, by
//! modification time and size): no platform watcher to miss an editor's
//! write-and-rename.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::workflow::Workflow;

pub(crate) const POLL: Duration = Duration::from_millis(200);

/// Why watching stopped before a signal asked it to.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot handle signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot find this program: {0}")]
    Exe(#[source] std::io::Error),
    #[error("cannot start {}: {source}", exe.display())]
    Start { exe: PathBuf, source: std::io::Error },
    /// A run's process cannot be waited for.
    #[error(transparent)]
    Wait(std::io::Error),
}

/// What `watch` passes on to each `run`.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub workflow: PathBuf,
    /// Arguments for `mora-exec run` after the workflow (`--set`, `-o`, ...).
    pub run_args: Vec<String>,
    pub sets: Vec<String>,
}

/// The files whose change triggers a run: the workflow, and every input
/// file it names (when it parses).
pub(crate) fn watched(opts: &WatchOptions) -> Vec<PathBuf> {
    let mut files = vec![opts.workflow.clone()];
    if let Ok(wf) = Workflow::load_with(&opts.workflow, &opts.sets) {
        for step in &wf.steps {
            files.extend(step.task.input_files());
        }
    }
    files
}

pub(crate) type Stamp = Vec<Option<(SystemTime, u64)>>;

pub(crate) fn stamp(files: &[PathBuf]) -> Stamp {
    files.iter().map(|f| std::fs::metadata(f).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))).collect()
}

/// How a run went, as watch reports it.
pub(crate) fn summary(output: &str) -> &'static str {
    let warm = output.contains("weights warm");
    let cold = output.contains("weights cold");
    match (warm, cold, output.contains("weights no cache")) {
        (_, _, true) => "models loaded in-process (--no-cache)",
        (true, false, _) => "models warm from the cache",
        (_, true, _) => "models loaded by the cache daemon (cold)",
        _ => "no model used",
    }
}

/// Copies a child's output to `sink` as it comes, on a thread; the thread
/// returns all of it, to say how the run went.
pub(crate) fn pass_through(
    mut out: std::process::ChildStdout,
    mut sink: impl FnMut(&[u8]) + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink(&buf[..n]);
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    })
}

/// Runs until SIGINT or SIGTERM; returns the number of runs.
pub fn watch(opts: &WatchOptions) -> Result<usize, WatchError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(WatchError::Signals)?;
    }
    let exe = std::env::current_exe().map_err(WatchError::Exe)?;
    let mut runs = 0;
    loop {
        let files = watched(opts);
        let before = stamp(&files);
        runs += 1;
        let start = Instant::now();
        let mut child = Command::new(&exe)
            .arg("run")
            .arg(&opts.workflow)
            .args(&opts.run_args)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| WatchError::Start { exe: exe.clone(), source })?;
        // Pass the child's output through as it comes (generated text
        // streams), keeping a copy to say how the run went.
        let copier = pass_through(child.stdout.take().expect("piped"), |bytes| {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(bytes);
            let _ = stdout.flush();
        });
        let status = loop {
            if let Some(s) = child.try_wait().map_err(WatchError::Wait)? {
                break s;
            }
            if stop.load(Ordering::Relaxed) {
                // A terminal's Ctrl-C reached the child too; a signal sent to
                // this process alone is passed on. Either way, wait for it.
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_child(&child),
                    rustix::process::Signal::INT,
                );
                let _ = child.wait();
                let _ = copier.join();
                eprintln!("mora-exec watch: stopped after {runs} run(s)");
                return Ok(runs);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = copier.join().unwrap_or_default();
        let ms = start.elapsed().as_millis();
        let names: Vec<String> = files.iter().map(|f| display(f)).collect();
        eprintln!(
            "mora-exec watch: run {runs} {} in {ms} ms ({}); watching {} (Ctrl-C to stop)",
            if status.success() { "finished" } else { "failed" },
            summary(&output),
            names.join(", ")
        );
        // Wait for a change, or for a file that a failed parse hid to appear.
        loop {
            if stop.load(Ordering::Relaxed) {
                eprintln!("mora-exec watch: stopped after {runs} run(s)");
                return Ok(runs);
            }
            std::thread::sleep(POLL);
            let files_now = watched(opts);
            if files_now != files || stamp(&files_now) != before {
                // Let an editor finish writing.
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
        }
    }
}

fn display(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|d| p.strip_prefix(d).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_summed_up_by_where_its_weights_came_from() {
        assert_eq!(summary("x (weights warm: 86.6 MiB from the cache daemon; ...)"), "models warm from the cache");
        assert_eq!(summary("a (weights warm: ...)\nb (weights cold: the cache daemon loaded ...)"), "models loaded by the cache daemon (cold)");
        assert_eq!(summary("x (weights no cache: read 86.6 MiB in-process in 90 ms)"), "models loaded in-process (--no-cache)");
        assert_eq!(summary("r: ranked 1 queries"), "no model used");
    }
}
