//! `mora-exec repl` driven as a script would (commands on a pipe) and as a
//! person would (a pseudo-terminal: prompt, tab completion, history).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mora::{tiny_llama, Env};

fn generate_example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/generate.toml")
}

#[test]
fn a_script_on_a_pipe_sets_runs_shows_and_manages_the_cache() {
    tiny_llama();
    let env = Env::with_daemon("repl-pipe");
    let script = "show\nset prompt=the cat sat\nset nope=1\nrun\nrun seed=2\nshow\npin\nps\nunpin\nbogus\nunset prompt\nshow\nclear\nexit\n";
    let mut child = env
        .command("mora-exec")
        .arg("repl")
        .arg(generate_example())
        .args(["-o", "out"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("loaded ") && stdout.contains("1 model(s), 1 step(s)"), "{stdout}");
    // The value is the rest of the line; a variable the workflow lacks is refused.
    assert!(stdout.contains("  prompt = the cat sat  (set)"), "{stdout}");
    assert!(stderr.contains("no variable `nope`"), "{stderr}");
    // One status line per run: the first loads, the second is warm.
    assert!(stdout.contains("run 1 finished in ") && stdout.contains("(models loaded by the cache daemon (cold)); 16.1 MiB resident"), "{stdout}");
    assert!(stdout.contains("run 2 finished in ") && stdout.contains("(models warm from the cache)"), "{stdout}");
    assert!(stdout.contains("(resident, 16.1 MiB, 0 lease(s))"), "{stdout}");
    assert!(stdout.contains("pinned ") && stdout.contains("unpinned "), "{stdout}");
    assert!(stderr.contains("unknown command `bogus`: `help` lists the commands"), "{stderr}");
    assert!(stdout.contains("  prompt = the man is eating\n"), "unset goes back to the default: {stdout}");
    // `clear` evicted the workflow's idle model; each run wrote its output.
    assert!(stdout.contains("evicted "), "{stdout}");
    assert!(env.ps().is_empty(), "{:?}", env.ps());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(env.scratch.join("out/generate.json")).unwrap()).unwrap();
    assert_eq!(doc["prompt"], "the cat sat");
}

#[test]
fn ctrl_c_stops_the_run_and_keeps_the_repl() {
    let env = Env::with_daemon("repl-sigint");
    let model = env.synth("llm", "llama", "48MiB", 3);
    let wf = env.workflow(
        "long.toml",
        &format!(
            "name = \"long\"\n[models.llm]\npath = {:?}\n[[steps]]\nname = \"g\"\ntask = \"generate\"\nmodel = \"llm\"\n\
             prompt = \"the man\"\nmax_tokens = 500\n",
            model.display().to_string()
        ),
    );
    let (mut child, mut stdin, lines) = spawn_repl(&env, &wf);
    stdin.write_all(b"run\n").unwrap();
    // Interrupt once the run holds its model (a lease), as Ctrl-C would.
    assert!(mora::wait_until(Duration::from_secs(60), || env.total_leases() >= 1), "the run never took its lease");
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::INT).unwrap();
    let mut seen = String::new();
    wait_for(&lines, &mut seen, "run 1 stopped in ", Duration::from_secs(30));
    // Still there: it takes the next command.
    stdin.write_all(b"help\nexit\n").unwrap();
    wait_for(&lines, &mut seen, "leave (also Ctrl-D)", Duration::from_secs(30));
    assert!(exits(&mut child), "the REPL did not exit");
}

/// `mora-exec repl WF -o out` on pipes: the child, its stdin, its stdout's chunks.
fn spawn_repl(env: &Env, wf: &std::path::Path) -> (Child, std::process::ChildStdin, mpsc::Receiver<String>) {
    let mut child = env
        .command("mora-exec")
        .arg("repl")
        .arg(wf)
        .args(["-o", "out"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let lines = reader(child.stdout.take().unwrap());
    (child, stdin, lines)
}

/// Chunks of a stream, as they come.
fn reader(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

/// What a pseudo-terminal's program writes, as it comes, answering its
/// cursor-position queries (ESC [6n) the way a terminal does.
fn terminal(master: std::fs::File) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reply = master.try_clone().unwrap();
        let mut master = master;
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
            for _ in 0..chunk.matches("\x1b[6n").count() {
                let _ = reply.write_all(b"\x1b[1;1R");
            }
            if tx.send(chunk).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads into `seen` until it holds `what`.
fn wait_for(rx: &mpsc::Receiver<String>, seen: &mut String, what: &str, timeout: Duration) {
    let start = Instant::now();
    while !seen.contains(what) {
        let left = timeout.checked_sub(start.elapsed()).unwrap_or_else(|| panic!("no `{what}` within {timeout:?} in:\n{seen}"));
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&chunk),
            Err(_) => panic!("no `{what}` within {timeout:?} in:\n{seen}"),
        }
    }
}

fn exits(child: &mut Child) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(s)) = child.try_wait() {
            return s.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    false
}

#[test]
fn on_a_terminal_it_prompts_completes_and_keeps_history() {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    tiny_llama();
    let env = Env::new("repl-pty");
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let slave_path = ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new().read(true).write(true).open(slave_path.to_str().unwrap()).unwrap();
    let state = env.scratch.join("state");
    let mut cmd: Command = env.command("mora-exec");
    cmd.arg("repl")
        .arg(generate_example())
        .env("XDG_STATE_HOME", &state)
        .env("TERM", "xterm")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    let mut child = cmd.spawn().unwrap();
    let mut master = std::fs::File::from(master);
    let lines = terminal(master.try_clone().unwrap());
    let mut seen = String::new();
    wait_for(&lines, &mut seen, "mora> ", Duration::from_secs(20));
    // `sh` and Tab complete to `show`; `set te` and Tab to `set temperature=`.
    master.write_all(b"sh\t").unwrap();
    wait_for(&lines, &mut seen, "mora> show ", Duration::from_secs(20));
    master.write_all(b"\r").unwrap();
    wait_for(&lines, &mut seen, "steps:", Duration::from_secs(20));
    // Typed as a person types: a key sequence, then what it shows.
    master.write_all(b"set te\t").unwrap();
    wait_for(&lines, &mut seen, "mora> set temperature=", Duration::from_secs(20));
    master.write_all(b"0.5\r").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    master.write_all(b"show\r").unwrap();
    wait_for(&lines, &mut seen, "temperature = 0.5  (set)", Duration::from_secs(20));
    master.write_all(b"exit\r").unwrap();
    assert!(exits(&mut child), "the REPL did not exit: {seen}");
    let history = std::fs::read_to_string(state.join("mora/repl_history")).unwrap();
    assert!(history.contains("show") && history.contains("set temperature=0.5"), "{history}");
}

#[test]
fn watch_on_runs_again_when_the_workflow_is_saved_until_watch_off() {
    let model = tiny_llama();
    let env = Env::with_daemon("repl-watch");
    let toml = |prompt: &str| {
        format!(
            "name = \"w\"\n[models.llm]\npath = {:?}\n[[steps]]\nname = \"g\"\ntask = \"generate\"\nmodel = \"llm\"\n\
             prompt = \"{prompt}\"\nmax_tokens = 4\n",
            model.display().to_string()
        )
    };
    let wf = env.workflow("w.toml", &toml("the man"));
    let (mut child, mut stdin, lines) = spawn_repl(&env, &wf);
    let mut seen = String::new();
    stdin.write_all(b"watch on\n").unwrap();
    wait_for(&lines, &mut seen, "watching ", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&wf, toml("the cat")).unwrap();
    wait_for(&lines, &mut seen, "watch: run 1 finished in ", Duration::from_secs(30));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(env.scratch.join("out/g.json")).unwrap()).unwrap();
    assert_eq!(doc["prompt"], "the cat");
    stdin.write_all(b"watch off\nexit\n").unwrap();
    wait_for(&lines, &mut seen, "stopped watching", Duration::from_secs(20));
    assert!(exits(&mut child), "the REPL did not exit: {seen}");
}
