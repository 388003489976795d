//! Faults and time: clients killed at random moments, a daemon killed in the
//! middle of a load, and a soak of sequential runs. The daemon must stay up,
//! leak no lease and no descriptor, and a client must say what happened in
//! one line. docs/reliability.md records these runs.

use std::process::Stdio;
use std::time::{Duration, Instant};

use mora::{embed_workflow, local_embed_workflow, wait_until, Env};

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig).unwrap();
}

/// splitmix64, for delays that differ from run to run but not between test runs.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn clients_killed_at_random_moments_leak_no_lease_and_no_descriptor() {
    let env = Env::with_daemon("sigkill");
    let pid = env.daemon_pid().unwrap();
    let wf = env.workflow("w.toml", &embed_workflow(&["a man is eating food", "a monkey plays drums"]));
    // Warm up (the model resident), then take the baseline.
    let out = env.exec(&wf, "warm", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let baseline = fds(pid);
    let mut rng = 0x5eed_u64;
    let (mut killed, mut finished) = (0, 0);
    const RUNS: usize = 200;
    for i in 0..RUNS {
        // Every tenth run finds the model evicted, so some kills land while
        // the client waits for a load.
        if i % 10 == 0 {
            let _ = env.admin(&["evict", "sentence-transformers/all-MiniLM-L6-v2"]);
        }
        let mut child = env
            .exec_command(&wf, "out")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // 0 to 150 ms: connecting, acquiring, mapping, inference, writing
        // (a warm run takes about 100 ms in a debug build).
        std::thread::sleep(Duration::from_micros(next(&mut rng) % 150_000));
        match child.try_wait().unwrap() {
            Some(_) => finished += 1,
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
        child.wait().unwrap();
    }
    eprintln!("{RUNS} clients: {killed} killed with SIGKILL, {finished} finished first");
    assert!(killed >= RUNS / 4, "too few kills landed ({killed}) to test anything");
    // Connections of killed clients close; the daemon notices each one.
    assert!(wait_until(Duration::from_secs(10), || env.total_leases() == 0), "leases leaked: {:?}", env.ps());
    assert!(
        wait_until(Duration::from_secs(10), || fds(pid) <= baseline),
        "daemon descriptors grew from {baseline} to {}",
        fds(pid)
    );
    // Still serving, with the model resident once.
    let out = env.exec(&wf, "after", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.resident_names().len() <= 1);
}

#[test]
fn a_daemon_killed_mid_load_is_reported_and_the_next_run_starts_a_new_one() {
    let mut env = Env::with_daemon("daemon-kill");
    let big = env.synth("big", "bert", "384MiB", 9);
    let wf = env.workflow("big.toml", &local_embed_workflow(&big));
    let pid = env.daemon_pid().unwrap();
    let client = env
        .exec_command(&wf, "out")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the daemon once the load has begun.
    let loading = wait_until(Duration::from_secs(30), || env.ps().iter().any(|m| m["state"] == "loading"));
    assert!(loading, "never saw the load in progress");
    signal(pid, rustix::process::Signal::KILL);
    assert!(wait_until(Duration::from_secs(10), || !env.daemon_alive()));
    let out = client.wait_with_output().unwrap();
    assert!(!out.status.success());
    // One error line; before it, when the load was slow enough to report,
    // the one progress line a client prints when stderr is not a terminal.
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("the cache daemon is loading")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = lines[0];
    assert!(line.contains("the cache daemon exited during the load of") && line.contains("run again"), "{line}");
    // The next run starts a daemon of its own (the stale socket is replaced) and succeeds.
    let start = Instant::now();
    let out = env.exec(&wf, "again", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let _ = env.admin(&["stop"]);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("started one"), "{stderr}");
    eprintln!("recovered in {} ms (daemon start and a cold load of 384 MiB)", start.elapsed().as_millis());
}

#[test]
fn a_soak_of_sequential_runs_grows_neither_descriptors_nor_leases() {
    let env = Env::with_daemon("soak");
    let pid = env.daemon_pid().unwrap();
    let wf = env.workflow("w.toml", &embed_workflow(&["soak"]));
    let out = env.exec(&wf, "warm", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (fd0, (rss0, _)) = (fds(pid), mora::process_memory(pid));
    const RUNS: usize = 100;
    for i in 0..RUNS {
        let out = env.exec(&wf, "out", &[]);
        assert!(out.status.success(), "run {i}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(wait_until(Duration::from_secs(5), || env.total_leases() == 0));
    // The daemon closes its side of a connection (the last run's, the `ps`
    // just above) a moment after the client's: a leak is a count that stays up.
    let settled = wait_until(Duration::from_secs(5), || fds(pid) <= fd0);
    let (fd1, (rss1, _)) = (fds(pid), mora::process_memory(pid));
    eprintln!("{RUNS} runs: daemon fds {fd0} -> {fd1}, RSS {} -> {} KiB", rss0 / 1024, rss1 / 1024);
    assert!(settled, "descriptors grew from {fd0} to {fd1}");
    assert_eq!(env.ps()[0]["hits"], RUNS as u64 + 1);
    assert_eq!(env.ps()[0]["loads"], 1);
}

#[test]
fn sixty_four_clients_cycling_leases_under_a_tight_budget_all_succeed_or_are_refused_clearly() {
    use mora_common::connection::Connection;
    use mora_common::manifest::WeightDType;
    use mora_common::protocol::{Device, ErrorKind, Request, Response};
    use mora_common::ModelSource;
    // Three 1 MiB models, room for two.
    let env = Env::with_daemon_args("load", &["--max-memory", "2560KiB"]);
    let models: Vec<_> = (0..3).map(|i| env.synth(&format!("m{i}"), "bert", "1MiB", 100 + i)).collect();
    const CLIENTS: usize = 64;
    const CYCLES: usize = 2000;
    let socket = env.socket.clone();
    let results: Vec<(Vec<u128>, usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (socket, models) = (&socket, &models);
                s.spawn(move || {
                    let conn = Connection::connect(socket, "load-test").expect("connect");
                    let (mut warm_us, mut refused, mut cold) = (Vec::new(), 0, 0);
                    let mut rng = c as u64;
                    for _ in 0..CYCLES / CLIENTS + usize::from(c < CYCLES % CLIENTS) {
                        let dir = &models[(next(&mut rng) % 3) as usize];
                        let start = Instant::now();
                        let (resp, _fds) = conn
                            .call(&Request::Acquire {
                                source: ModelSource::Dir { path: dir.clone(), variant: None },
                                dtype: WeightDType::F32,
                                device: Device::Cpu,
                                keep_alive: None,
                            })
                            .expect("the daemon answers");
                        let took = start.elapsed().as_micros();
                        match resp {
                            Response::Acquired(a) => {
                                if a.loaded_now {
                                    cold += 1;
                                } else {
                                    warm_us.push(took);
                                }
                                match conn.call(&Request::Release { lease: a.lease }).expect("release").0 {
                                    Response::Released { .. } => {}
                                    other => panic!("release answered {other:?}"),
                                }
                            }
                            Response::Error(e) => {
                                assert_eq!(e.kind, ErrorKind::NoRoom, "{}", e.message);
                                assert!(e.message.contains("held by pinned, leased or loading models"), "{}", e.message);
                                refused += 1;
                            }
                            other => panic!("acquire answered {other:?}"),
                        }
                    }
                    (warm_us, refused, cold)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut warm: Vec<u128> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let refused: usize = results.iter().map(|r| r.1).sum();
    let cold: usize = results.iter().map(|r| r.2).sum();
    assert_eq!(warm.len() + refused + cold, CYCLES);
    warm.sort_unstable();
    let pct = |p: f64| warm.get(((warm.len() as f64 * p) as usize).min(warm.len().saturating_sub(1))).copied().unwrap_or(0);
    eprintln!(
        "{CYCLES} acquire/release cycles from {CLIENTS} clients over 3 models, room for 2: {} warm hits (p50 {} us, p99 {} us), {cold} loads, {refused} refused for room",
        warm.len(),
        pct(0.50),
        pct(0.99)
    );
    assert!(!warm.is_empty());
    assert!(wait_until(Duration::from_secs(5), || env.total_leases() == 0));
    assert!(env.resident_names().len() <= 2, "the budget held: {:?}", env.resident_names());
}

#[test]
fn sigterm_stops_accepting_answers_the_load_in_progress_and_exits() {
    let mut env = Env::with_daemon("sigterm");
    let big = env.synth("big", "bert", "384MiB", 11);
    let wf = env.workflow("big.toml", &local_embed_workflow(&big));
    let pid = env.daemon_pid().unwrap();
    let client = env
        .exec_command(&wf, "out")
        .arg("--no-autostart")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || env.ps().iter().any(|m| m["state"] == "loading")));
    signal(pid, rustix::process::Signal::TERM);
    // No new clients: the socket goes at once.
    assert!(wait_until(Duration::from_secs(5), || !env.socket.exists()), "the socket is still there");
    // The client that was waiting for the load gets its weights and finishes its run.
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.scratch.join("out/embeddings.json").is_file());
    assert!(
        wait_until(mora_cache::server::DRAIN_TIMEOUT + Duration::from_secs(10), || !env.daemon_alive()),
        "the daemon did not exit"
    );
    let log = std::fs::read_to_string(env.scratch.join("daemon.log")).unwrap();
    assert!(log.contains("answering the requests in progress before exiting"), "{log}");
}
