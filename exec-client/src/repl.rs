//! `mora-exec repl`: an interactive loop over one workflow, for people who
//! iterate the way a diffusers-workflow REPL lets them: change a variable,
//! run again, look at what is resident, without restarting anything.
//!
//! Every `run` is a fresh `mora-exec run` child process, so nothing leaks
//! between runs while the models stay warm in the daemon; Ctrl-C stops the
//! run, not the REPL. Daemon commands (`ps`, `clear`, `pin`, `unpin`) go
//! through the `mora-cache` binary, as a user would type them. On a terminal
//! it has line editing, history (`$XDG_STATE_HOME/mora/repl_history`, else
//! `~/.local/state/mora/repl_history`) and tab completion of commands,
//! variable names and file paths; from a pipe it reads one command a line, so
//! scripts can drive it.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;

use mora_common::units::human_bytes;

use crate::workflow::error::WorkflowError;
use crate::workflow::Workflow;

/// Why the REPL cannot start, or stopped reading commands.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("cannot find this program: {0}")]
    Exe(#[source] std::io::Error),
    #[error("cannot handle signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("--set {0}: expected NAME=VALUE")]
    Set(String),
    /// The line editor's settings are refused.
    #[error(transparent)]
    Settings(ReadlineError),
    #[error("cannot start the line editor: {0}")]
    Editor(#[source] ReadlineError),
    #[error("cannot read a command: {0}")]
    ReadCommand(#[source] ReadlineError),
    /// Commands come from a pipe, and it cannot be read.
    #[error("cannot read commands: {0}")]
    ReadCommands(#[source] std::io::Error),
}

/// A command line with a quote that is not closed.
#[derive(Debug, thiserror::Error)]
#[error("a quote is not closed")]
struct UnclosedQuote;

/// What the REPL starts with.
#[derive(Debug, Clone)]
pub struct ReplOptions {
    pub workflow: Option<PathBuf>,
    /// `--set`s from the command line.
    pub sets: Vec<String>,
    /// `run`'s options other than `--set`, passed to every run.
    pub run_args: Vec<String>,
    /// The daemon's socket, for `ps`, `clear`, `pin` and `unpin`.
    pub socket: PathBuf,
}

const COMMANDS: &[(&str, &str)] = &[
    ("load FILE", "use this workflow"),
    ("show", "variables (with values), steps, models (and whether each is resident)"),
    ("set NAME=VALUE", "set a variable for the runs that follow"),
    ("unset NAME", "back to the workflow's default"),
    ("run [NAME=VALUE]...", "run the workflow in a fresh process (these values for this run only); Ctrl-C stops it"),
    ("ps", "what the cache daemon holds"),
    ("clear", "evict this workflow's models that no one is using"),
    ("pin [MODEL]", "keep this workflow's models (or MODEL) resident"),
    ("unpin [MODEL]", "let them be evicted again"),
    ("watch on|off", "run again whenever the workflow or an input file is saved"),
    ("help", "this list"),
    ("exit", "leave (also Ctrl-D)"),
];

/// One REPL session.
struct Session {
    opts: ReplOptions,
    workflow: Option<PathBuf>,
    /// Variable settings, by name.
    sets: BTreeMap<String, String>,
    runs: usize,
    exe: PathBuf,
    /// Set by SIGINT while a run is in progress.
    interrupted: Arc<AtomicBool>,
    watching: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    /// Variable names, for completion.
    names: Arc<Mutex<Vec<String>>>,
    /// Show the prompt again after a watched run's output (on a terminal).
    prompt_after_watch: bool,
}

/// Where a run's output goes; on a terminal, with the line ends a raw-mode
/// terminal needs.
type Printer = Arc<Mutex<Box<dyn FnMut(String) + Send>>>;

pub fn repl(opts: ReplOptions) -> Result<(), ReplError> {
    let exe = std::env::current_exe().map_err(ReplError::Exe)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    // SIGINT stops a run in progress; at the prompt the line editor reads
    // Ctrl-C as a key, so the REPL itself never dies of it.
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone()).map_err(ReplError::Signals)?;
    let mut session = Session {
        workflow: None,
        sets: BTreeMap::new(),
        runs: 0,
        exe,
        interrupted,
        watching: None,
        names: Arc::new(Mutex::new(Vec::new())),
        prompt_after_watch: false,
        opts: opts.clone(),
    };
    for s in &opts.sets {
        let (k, v) = s.split_once('=').ok_or_else(|| ReplError::Set(s.clone()))?;
        session.sets.insert(k.trim().to_string(), v.to_string());
    }
    let stdout_printer: Printer = Arc::new(Mutex::new(Box::new(|m: String| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(m.as_bytes());
        let _ = out.flush();
    })));
    if let Some(wf) = &opts.workflow {
        session.load(wf);
    }
    if std::io::stdin().is_terminal() {
        interactive(&mut session)
    } else {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(ReplError::ReadCommands)?;
            if !session.command(&line, &stdout_printer) {
                break;
            }
        }
        session.stop_watch();
        Ok(())
    }
}

fn history_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("mora").join("repl_history"))
}

fn interactive(session: &mut Session) -> Result<(), ReplError> {
    let config = rustyline::Config::builder().auto_add_history(true).max_history_size(1000).map_err(ReplError::Settings)?.build();
    let mut editor: rustyline::Editor<ReplHelper, rustyline::history::FileHistory> =
        rustyline::Editor::with_config(config).map_err(ReplError::Editor)?;
    editor.set_helper(Some(ReplHelper { names: session.names.clone(), files: FilenameCompleter::new() }));
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    // Output of runs started by `watch` comes while the prompt is up; it is
    // printed as it comes and the prompt shown again after it. (rustyline's
    // ExternalPrinter would redraw the line, but with it rustyline 17 drops
    // all but the first byte of input that arrives at once: a paste.)
    let printer: Printer = Arc::new(Mutex::new(Box::new(|m: String| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(m.replace('\n', "\r\n").as_bytes());
        let _ = out.flush();
    })));
    session.prompt_after_watch = true;
    println!("mora-exec repl: `help` lists the commands; Ctrl-D leaves");
    loop {
        match editor.readline("mora> ") {
            Ok(line) => {
                if !session.command(&line, &printer) {
                    break;
                }
            }
            // Ctrl-C at the prompt clears the line, as in Python's REPL.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(ReplError::ReadCommand(e)),
        }
    }
    session.stop_watch();
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.save_history(h);
    }
    Ok(())
}

impl Session {
    /// Runs one command line; false to leave.
    fn command(&mut self, line: &str, printer: &Printer) -> bool {
        let words = match split_words(line) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("{e}");
                return true;
            }
        };
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let Some((&cmd, args)) = words.split_first() else { return true };
        match cmd {
            "exit" | "quit" => return false,
            "help" | "?" => {
                for (usage, what) in COMMANDS {
                    println!("  {usage:<22} {what}");
                }
            }
            "load" => match args {
                [file] => self.load(Path::new(file)),
                _ => eprintln!("usage: load FILE"),
            },
            "show" => self.show(),
            // The value is the rest of the line: `set prompt=the man is`.
            "set" => match line.trim_start().strip_prefix("set").map(str::trim) {
                Some(rest) if rest.contains('=') => {
                    let (k, v) = rest.split_once('=').expect("checked");
                    let v = v.trim();
                    let unquoted = split_words(v).ok().filter(|w| w.len() == 1 && v.starts_with(['"', '\'']));
                    self.set(k.trim(), unquoted.map(|mut w| w.remove(0)).unwrap_or_else(|| v.to_string()));
                }
                _ => eprintln!("usage: set NAME=VALUE"),
            },
            "unset" => {
                for a in args {
                    if self.sets.remove(*a).is_none() {
                        eprintln!("`{a}` is not set");
                    }
                }
            }
            "run" => {
                let Some(wf) = self.workflow.clone() else {
                    eprintln!("no workflow: `load FILE` first");
                    return true;
                };
                let mut sets = self.sets.clone();
                for a in args {
                    match a.split_once('=') {
                        Some((k, v)) => {
                            sets.insert(k.to_string(), v.to_string());
                        }
                        None => {
                            eprintln!("run takes NAME=VALUE settings, not `{a}`");
                            return true;
                        }
                    }
                }
                self.runs += 1;
                self.interrupted.store(false, Ordering::Relaxed);
                let status = run_once(&self.exe, &wf, &sets, &self.opts.run_args, &self.interrupted, printer);
                println!("{}", status.line(self.runs, &self.opts.socket));
            }
            "ps" => {
                let _ = self.cache(&["ps"]).status();
            }
            "clear" => self.each_model("evict"),
            "pin" | "unpin" => match args {
                [] => self.each_model(cmd),
                models => {
                    for m in models {
                        let key = self.model_name(m).unwrap_or_else(|| m.to_string());
                        let _ = self.cache(&[cmd, &key]).status();
                    }
                }
            },
            "watch" => match args {
                ["on"] => self.start_watch(printer),
                ["off"] => {
                    if self.watching.is_none() {
                        eprintln!("not watching");
                    }
                    self.stop_watch();
                }
                _ => eprintln!("usage: watch on|off"),
            },
            other => eprintln!("unknown command `{other}`: `help` lists the commands"),
        }
        true
    }

    /// The workflow with this session's settings, parsed and checked.
    fn parsed(&self, path: &Path, sets: &BTreeMap<String, String>) -> Result<Workflow, WorkflowError> {
        let sets: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Workflow::load_with(path, &sets)
    }

    fn load(&mut self, path: &Path) {
        // Settings of variables the new workflow does not declare are dropped.
        let declared = match Workflow::load(path) {
            Ok(w) => w.variables.keys().cloned().collect::<Vec<_>>(),
            Err(e) => {
                eprintln!("{e}");
                return;
            }
        };
        let dropped: Vec<String> = self.sets.keys().filter(|k| !declared.contains(k)).cloned().collect();
        for k in &dropped {
            self.sets.remove(k);
        }
        match self.parsed(path, &self.sets) {
            Ok(w) => {
                println!("loaded {}: {} model(s), {} step(s)", path.display(), w.models.len(), w.steps.len());
                if !dropped.is_empty() {
                    println!("(dropped settings it does not declare: {})", dropped.join(", "));
                }
                *self.names.lock().expect("names") = declared;
                self.workflow = Some(path.to_path_buf());
            }
            Err(e) => eprintln!("{e}"),
        }
    }

    fn set(&mut self, name: &str, value: String) {
        let mut sets = self.sets.clone();
        sets.insert(name.to_string(), value);
        // Checked against the workflow now, not at the next run.
        if let Some(wf) = &self.workflow {
            if let Err(e) = self.parsed(wf, &sets) {
                eprintln!("{e}");
                return;
            }
        }
        self.sets = sets;
    }

    fn show(&self) {
        let Some(path) = &self.workflow else {
            eprintln!("no workflow: `load FILE` first");
            return;
        };
        let w = match self.parsed(path, &self.sets) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("{e}");
                return;
            }
        };
        println!("workflow {} ({})", w.name, path.display());
        if !w.variables.is_empty() {
            println!("variables:");
            for (k, v) in &w.variables {
                println!("  {k} = {v}{}", if self.sets.contains_key(k) { "  (set)" } else { "" });
            }
        }
        let resident = self.resident();
        println!("models:");
        for (key, spec) in &w.models {
            let name = spec.source.resolve().map(|r| r.name).unwrap_or_else(|e| format!("unresolved: {e}"));
            let state = match &resident {
                None => "no daemon running".to_string(),
                Some(r) => match r.get(&name) {
                    Some(entry) => format!("resident, {}", entry),
                    None => "not resident".to_string(),
                },
            };
            println!("  {key}: {name} ({state})");
        }
        println!("steps:");
        for s in &w.steps {
            let model = s.model().map(|m| format!(" with {m}")).unwrap_or_default();
            println!("  {}: {}{model} -> {}", s.name, s.task.kind().name, s.output.display());
        }
    }

    /// What the daemon holds, by every name of each entry: a short
    /// description. None when no daemon answers.
    fn resident(&self) -> Option<BTreeMap<String, String>> {
        let mut by_name = BTreeMap::new();
        for m in ps_json(&self.opts.socket)? {
            let what = format!(
                "{}, {} lease(s){}",
                human_bytes(m["bytes"].as_u64().unwrap_or(0)),
                m["leases"].as_u64().unwrap_or(0),
                if m["pinned"].as_bool() == Some(true) { ", pinned" } else { "" }
            );
            for n in m["names"].as_array().into_iter().flatten().filter_map(|n| n.as_str()) {
                by_name.insert(n.to_string(), what.clone());
            }
        }
        Some(by_name)
    }

    fn cache(&self, args: &[&str]) -> Command {
        cache_command(&self.opts.socket, args)
    }

    /// The name the daemon knows a workflow model key by.
    fn model_name(&self, key: &str) -> Option<String> {
        let w = self.parsed(self.workflow.as_ref()?, &self.sets).ok()?;
        w.models.get(key)?.source.resolve().ok().map(|r| r.name)
    }

    /// `mora-cache VERB NAME` for every model of the workflow.
    fn each_model(&self, verb: &str) {
        let Some(path) = &self.workflow else {
            eprintln!("no workflow: `load FILE` first");
            return;
        };
        let Ok(w) = self.parsed(path, &self.sets) else { return };
        for (key, spec) in &w.models {
            match spec.source.resolve() {
                Ok(r) => {
                    let _ = self.cache(&[verb, &r.name]).status();
                }
                Err(e) => eprintln!("model `{key}`: {e}"),
            }
        }
    }

    fn start_watch(&mut self, printer: &Printer) {
        let Some(wf) = self.workflow.clone() else {
            eprintln!("no workflow: `load FILE` first");
            return;
        };
        if self.watching.is_some() {
            eprintln!("already watching");
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (exe, sets, run_args, printer) = (self.exe.clone(), self.sets.clone(), self.opts.run_args.clone(), printer.clone());
        let (flag, socket, prompt) = (stop.clone(), self.opts.socket.clone(), if self.prompt_after_watch { "mora> " } else { "" });
        let sets_list: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // The files as they are now, before `watching` is printed: a save
        // right after it is a change.
        let watch_opts = crate::watch::WatchOptions { workflow: wf.clone(), run_args: Vec::new(), sets: sets_list };
        let mut files = crate::watch::watched(&watch_opts);
        let mut before = crate::watch::stamp(&files);
        let handle = std::thread::spawn(move || {
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(crate::watch::POLL);
                let now = crate::watch::watched(&watch_opts);
                if now == files && crate::watch::stamp(&now) == before {
                    continue;
                }
                std::thread::sleep(Duration::from_millis(100));
                (files, before) = (now.clone(), crate::watch::stamp(&now));
                n += 1;
                let r = run_once(&exe, &wf, &sets, &run_args, &flag, &printer);
                (printer.lock().expect("printer"))(format!("watch: {}\n{prompt}", r.line(n, &socket)));
            }
        });
        self.watching = Some((stop, handle));
        println!("watching {}: it runs again whenever it or an input file is saved (`watch off` stops)", self.workflow.as_ref().expect("set").display());
    }

    fn stop_watch(&mut self) {
        if let Some((stop, handle)) = self.watching.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
            println!("stopped watching");
        }
    }
}

/// A command line's words: split at spaces, except inside '...' or "...".
fn split_words(line: &str) -> Result<Vec<String>, UnclosedQuote> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    if quote.is_some() {
        return Err(UnclosedQuote);
    }
    words.extend(word);
    Ok(words)
}

/// How a run ended.
struct RunStatus {
    verdict: &'static str,
    ms: u128,
    /// What it printed, to say where its models came from.
    output: String,
}

impl RunStatus {
    /// The line after run `n`: how it ended, how long it took, where its
    /// models came from, and what the daemon at `socket` holds now.
    fn line(&self, n: usize, socket: &Path) -> String {
        let resident = ps_json(socket)
            .map(|list| format!("; {} resident", human_bytes(list.iter().map(|m| m["bytes"].as_u64().unwrap_or(0)).sum())))
            .unwrap_or_default();
        format!("run {n} {} in {} ms ({}){resident}", self.verdict, self.ms, crate::watch::summary(&self.output))
    }
}

/// `mora-cache ARGS... --socket S`.
fn cache_command(socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(crate::daemon::daemon_binary());
    c.args(args).arg("--socket").arg(socket);
    c
}

/// `mora-cache ps --json`, parsed; None when no daemon answers.
fn ps_json(socket: &Path) -> Option<Vec<serde_json::Value>> {
    let out = cache_command(socket, &["ps", "--json"]).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Runs the workflow once as a child `mora-exec run`, passing its output
/// through as it comes; `stop` (Ctrl-C) interrupts it.
fn run_once(exe: &Path, wf: &Path, sets: &BTreeMap<String, String>, run_args: &[String], stop: &AtomicBool, printer: &Printer) -> RunStatus {
    let start = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg(wf).args(run_args).stdout(Stdio::piped());
    for (k, v) in sets {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start {}: {e}", exe.display());
            return RunStatus { verdict: "failed", ms: 0, output: String::new() };
        }
    };
    let printer = printer.clone();
    let copier = crate::watch::pass_through(child.stdout.take().expect("piped"), move |bytes| {
        (printer.lock().expect("printer"))(String::from_utf8_lossy(bytes).into_owned())
    });
    let mut stopped = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) => {}
            Err(_) => break None,
        }
        if stop.load(Ordering::Relaxed) && !stopped {
            // A terminal's Ctrl-C reached the child too; a signal sent to
            // this process alone is passed on.
            let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::INT);
            stopped = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = copier.join().unwrap_or_default();
    let verdict = match status {
        _ if stopped => "stopped",
        Some(s) if s.success() => "finished",
        _ => "failed",
    };
    RunStatus { verdict, ms: start.elapsed().as_millis(), output }
}

/// Completion: commands first, then variable names (`set`, `unset`, `run`)
/// or file paths (`load`).
struct ReplHelper {
    names: Arc<Mutex<Vec<String>>>,
    files: FilenameCompleter,
}

impl Completer for ReplHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, ctx: &rustyline::Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map(|i| i + 1).unwrap_or(0);
        let word = &before[start..];
        let pair = |s: String| Pair { display: s.clone(), replacement: s };
        if start == 0 {
            let cmds = COMMANDS.iter().map(|(u, _)| u.split_whitespace().next().unwrap_or(u).to_string());
            return Ok((0, cmds.filter(|c| c.starts_with(word)).map(|c| pair(format!("{c} "))).collect()));
        }
        let cmd = before.split_whitespace().next().unwrap_or("");
        match cmd {
            "load" => self.files.complete(line, pos, ctx),
            "set" | "run" => {
                let names = self.names.lock().expect("names");
                Ok((start, names.iter().filter(|n| n.starts_with(word)).map(|n| pair(format!("{n}="))).collect()))
            }
            "unset" => {
                let names = self.names.lock().expect("names");
                Ok((start, names.iter().filter(|n| n.starts_with(word)).map(|n| pair(format!("{n} "))).collect()))
            }
            "watch" => Ok((start, ["on", "off"].iter().filter(|o| o.starts_with(word)).map(|o| pair(o.to_string())).collect())),
            _ => Ok((start, Vec::new())),
        }
    }
}

impl rustyline::hint::Hinter for ReplHelper {
    type Hint = String;
}
impl rustyline::highlight::Highlighter for ReplHelper {}
impl rustyline::validate::Validator for ReplHelper {}
impl rustyline::Helper for ReplHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_at_spaces_but_not_inside_quotes() {
        assert_eq!(split_words("run a=1  b='x y' c=\"\"").unwrap(), vec!["run", "a=1", "b=x y", "c="]);
        assert!(split_words("run a='x").unwrap_err().to_string().contains("not closed"));
        assert!(split_words("   ").unwrap().is_empty());
    }
}
