//! Support for Mora's end-to-end tests and benchmarks: find the built
//! binaries and the test model, run a daemon on a private socket, run
//! workflows against it, read its state.
//!
//! The test model (all-MiniLM-L6-v2) comes from `scripts/fetch-test-model.sh`;
//! a test that needs it fails loudly when it is missing, it never skips.
//!
//! [`bench`] is the benchmark harness built on the same support.

pub mod bench;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where skipped checks are recorded: `$MORA_SKIP_LOG`, else
/// `.mora-test/skipped.txt` in the workspace. `scripts/test.sh` empties it
/// before the run and prints it after.
pub fn skip_log() -> PathBuf {
    std::env::var_os("MORA_SKIP_LOG").map(PathBuf::from).unwrap_or_else(|| root().join(".mora-test").join("skipped.txt"))
}

/// Records that `check` did not run, and why (a peer it needs is missing):
/// on stderr, and as a line of the skip log, which `scripts/test.sh` prints
/// at the end of the run. A test that returns early without calling this
/// passes silently: every early return for a missing peer calls it.
pub fn skipped(check: &str, why: &str) {
    use std::io::Write;
    eprintln!("skipped: {check}: {why}");
    let log = skip_log();
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // One write per line (O_APPEND): test processes that skip at once do not
    // interleave their lines.
    let line = format!("{check}: {}\n", why.replace('\n', " "));
    let written = std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", log.display());
    }
}

/// A binary of the workspace (`mora-cache`, `mora-exec`), built by
/// `cargo build --workspace --bins` into the same profile directory as the
/// running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; scripts/test.sh does)",
        path.display()
    );
    path
}

/// The Hugging Face hub cache holding the test model: `$MORA_TEST_HF_CACHE`,
/// else `.mora-test/hf-hub` in the workspace. Panics when the model is not there.
pub fn test_hub() -> PathBuf {
    let hub = std::env::var_os("MORA_TEST_HF_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".mora-test").join("hf-hub"));
    let refs = hub.join("models--sentence-transformers--all-MiniLM-L6-v2").join("refs").join("main");
    assert!(
        refs.is_file(),
        "test model all-MiniLM-L6-v2 is missing from {}: run scripts/fetch-test-model.sh (scripts/test.sh does)",
        hub.display()
    );
    hub
}

/// The snapshot directory of the test model (config, tokenizer, weights).
pub fn test_model_dir() -> PathBuf {
    let repo = test_hub().join("models--sentence-transformers--all-MiniLM-L6-v2");
    let commit = std::fs::read_to_string(repo.join("refs").join("main")).expect("refs/main");
    repo.join("snapshots").join(commit.trim())
}

/// The synthetic llama the generate examples use (`examples/generate.toml`,
/// `examples/pipeline.toml`): `.mora-test/tiny-llama`, written with
/// `mora-exec synth` the first time it is needed. Written aside and renamed
/// into place, so tests racing to make it all see a whole model.
pub fn tiny_llama() -> PathBuf {
    let dir = root().join(".mora-test").join("tiny-llama");
    if !dir.join("model.safetensors").is_file() {
        let tmp = root().join(".mora-test").join(format!("tiny-llama.tmp.{}", std::process::id()));
        let out = Command::new(bin("mora-exec"))
            .args(["synth", "--arch", "llama", "--size", "16MiB", "--seed", "1", "-o"])
            .arg(&tmp)
            .output()
            .expect("run mora-exec synth");
        assert!(out.status.success(), "synth failed: {}", String::from_utf8_lossy(&out.stderr));
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another test got there first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    dir
}

pub use mora_test_support::Scratch;

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A private environment: a scratch directory with its own socket, and a
/// daemon when started. The daemon is killed on drop.
pub struct Env {
    pub scratch: Scratch,
    pub socket: PathBuf,
    daemon: Option<Child>,
}

impl Env {
    /// A scratch environment with no daemon running.
    pub fn new(tag: &str) -> Env {
        let scratch = Scratch::new(tag);
        let socket = scratch.join("run").join("cache.sock");
        Env { scratch, socket, daemon: None }
    }

    /// A scratch environment with a daemon serving its socket.
    pub fn with_daemon(tag: &str) -> Env {
        Env::with_daemon_args(tag, &[])
    }

    /// A scratch environment with a daemon started with `serve ARGS...`.
    pub fn with_daemon_args(tag: &str, args: &[&str]) -> Env {
        let mut env = Env::new(tag);
        env.start_daemon_with(args);
        env
    }

    pub fn start_daemon(&mut self) {
        self.start_daemon_with(&[]);
    }

    pub fn start_daemon_with(&mut self, args: &[&str]) {
        self.start_daemon_with_env(args, &[]);
    }

    /// A scratch environment with a daemon started with `serve ARGS...` and
    /// these environment variables set.
    pub fn with_daemon_env(tag: &str, args: &[&str], vars: &[(&str, &str)]) -> Env {
        let mut env = Env::new(tag);
        env.start_daemon_with_env(args, vars);
        env
    }

    pub fn start_daemon_with_env(&mut self, args: &[&str], vars: &[(&str, &str)]) {
        let log = std::fs::File::create(self.scratch.join("daemon.log")).expect("daemon log");
        let child = self
            .command("mora-cache")
            .args(["serve", "--socket"])
            .arg(&self.socket)
            .args(args)
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mora-cache serve");
        self.daemon = Some(child);
        let socket = self.socket.clone();
        assert!(
            wait_until(Duration::from_secs(20), || std::os::unix::net::UnixStream::connect(&socket).is_ok()),
            "daemon did not start listening at {}: {}",
            socket.display(),
            self.daemon_log()
        );
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// True while the daemon this environment started is running.
    pub fn daemon_alive(&mut self) -> bool {
        match self.daemon.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.scratch.join("daemon.log")).unwrap_or_default()
    }

    /// A command for a workspace binary with this environment's socket and
    /// the test model's hub cache.
    pub fn command(&self, name: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.env("MORA_SOCKET", &self.socket)
            .env("HF_HUB_CACHE", test_hub())
            .env_remove("HF_HOME")
            .env_remove("MORA_LOG")
            .current_dir(&self.scratch.path);
        c
    }

    /// Writes a workflow file into the scratch directory.
    pub fn workflow(&self, name: &str, toml: &str) -> PathBuf {
        let p = self.scratch.join(name);
        std::fs::write(&p, toml).expect("write workflow");
        p
    }

    /// `mora-exec run WORKFLOW -o OUT`, to add to, spawn or run.
    pub fn exec_command(&self, workflow: &Path, out: &str) -> Command {
        let mut c = self.command("mora-exec");
        c.arg("run").arg(workflow).arg("-o").arg(self.scratch.join(out));
        c
    }

    /// `mora-exec run WORKFLOW -o OUT [extra...]`, waited for.
    pub fn exec(&self, workflow: &Path, out: &str, extra: &[&str]) -> Output {
        self.exec_command(workflow, out).args(extra).output().expect("run mora-exec")
    }

    /// `mora-cache ps --json`, parsed.
    pub fn ps(&self) -> Vec<serde_json::Value> {
        let out = self.command("mora-cache").args(["ps", "--json"]).output().expect("run mora-cache ps");
        assert!(out.status.success(), "ps failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("ps --json prints JSON")
    }

    /// `mora-cache ARGS...` against this environment's daemon, waited for.
    pub fn admin(&self, args: &[&str]) -> Output {
        self.command("mora-cache").args(args).output().expect("run mora-cache")
    }

    /// `mora-cache ARGS...`, asserting success; returns stdout.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(out.status.success(), "mora-cache {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Writes a synthetic model with `mora-exec synth` and returns its directory.
    pub fn synth(&self, name: &str, arch: &str, size: &str, seed: u64) -> PathBuf {
        let dir = self.scratch.join(name);
        let out = Command::new(bin("mora-exec"))
            .args(["synth", "--arch", arch, "--size", size, "--seed", &seed.to_string(), "-o"])
            .arg(&dir)
            .output()
            .expect("run mora-exec synth");
        assert!(out.status.success(), "synth failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    }

    /// Names of the resident (or loading) models, as `ps --json` lists them.
    pub fn resident_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.ps().iter().map(|m| m["name"].as_str().unwrap_or("").to_string()).collect();
        names.sort();
        names
    }

    /// Sum of `bytes` over every model `ps` lists.
    pub fn resident_bytes(&self) -> u64 {
        self.ps().iter().map(|m| m["bytes"].as_u64().unwrap_or(0)).sum()
    }

    /// Sum of open leases over every resident model.
    pub fn total_leases(&self) -> u64 {
        self.ps().iter().map(|m| m["leases"].as_u64().unwrap_or(0)).sum()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // An auto-started daemon is not our child: stop it through its socket.
        if self.socket.exists() {
            let _ = Command::new(bin("mora-cache")).args(["stop", "--socket"]).arg(&self.socket).output();
        }
    }
}

/// The embedding workflow of `examples/embed.toml` on the given texts.
pub fn embed_workflow(texts: &[&str]) -> String {
    let texts = serde_json::to_string(texts).expect("texts as JSON");
    format!(
        "name = \"embed\"\n[models.minilm]\nrepo = \"sentence-transformers/all-MiniLM-L6-v2\"\n\
         [[steps]]\nname = \"embed\"\ntask = \"embed\"\nmodel = \"minilm\"\ntexts = {texts}\noutput = \"embeddings.json\"\n"
    )
}

/// [`embed_workflow`] of one text on the model in `dir` instead of the test model.
pub fn local_embed_workflow(dir: &Path) -> String {
    embed_workflow(&["x"]).replace(
        "repo = \"sentence-transformers/all-MiniLM-L6-v2\"",
        &format!("path = {:?}", dir.display().to_string()),
    )
}

/// Reads an output file written by an embed step.
pub fn read_embeddings(path: &Path) -> Vec<Vec<f64>> {
    embeddings_of(&serde_json::from_slice(&std::fs::read(path).expect("read output")).expect("output is JSON"))
}

/// The `embeddings` of an embed step's output (or of a golden file).
pub fn embeddings_of(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v["embeddings"]
        .as_array()
        .expect("embeddings array")
        .iter()
        .map(|e| e.as_array().expect("embedding").iter().map(|x| x.as_f64().expect("number")).collect())
        .collect()
}

/// Asserts a process failed with exactly one line on stderr, and returns it.
pub fn one_line_failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got success; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    lines[0].to_string()
}

/// The number after `key` (e.g. `VmRSS:`) in a `/proc` file of `key value kB`
/// lines; 0 when absent.
pub fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Memory a process holds: resident set size, and the bytes allocated to the
/// Mora segments (memfds) it has open. A daemon that has dropped a segment's
/// descriptor no longer pays for it, whatever its RSS says.
pub fn process_memory(pid: u32) -> (u64, u64) {
    let rss_kib = kib_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), "VmRSS:");
    let mut memfd = 0u64;
    // Each segment once, however many descriptors of it are open (the
    // daemon holds a second one while it sends a segment to a client).
    let mut seen = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            let is_segment = std::fs::read_link(fd.path())
                .map(|t| t.to_string_lossy().starts_with("/memfd:mora:"))
                .unwrap_or(false);
            if is_segment {
                if let Ok(meta) = std::fs::metadata(fd.path()) {
                    use std::os::unix::fs::MetadataExt;
                    if seen.insert((meta.dev(), meta.ino())) {
                        memfd += meta.blocks() * 512;
                    }
                }
            }
        }
    }
    (rss_kib * 1024, memfd)
}
