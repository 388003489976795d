//! The cache as a user trusts it with a machine's memory: a budget that is
//! never exceeded, eviction of the least recently used idle model, pins and
//! leases that protect, keep-alive expiry, one copy of the same bytes.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mora::{one_line_failure, process_memory, test_model_dir, wait_until, Env};
use mora_common::connection::Connection;
use mora_common::manifest::WeightDType;
use mora_common::protocol::{Device, Request, Response};
use mora_common::{ModelSource, ResolvedModel};

/// Bytes the daemon will hold for the model in `dir`, in f32.
fn segment_bytes(dir: &Path) -> u64 {
    let model = ResolvedModel {
        name: "probe".into(),
        dir: dir.to_path_buf(),
        weights: vec![dir.join("model.safetensors")],
    };
    mora_cache::checkpoint::plan(&model, WeightDType::F32, Device::Cpu).expect("plan").bytes()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Synthetic models `m0..mN` of the same shape (different seeds).
fn models(env: &Env, n: usize, size: &str) -> Vec<PathBuf> {
    (0..n).map(|i| env.synth(&format!("m{i}"), "bert", size, i as u64)).collect()
}

/// A daemon whose budget holds `slots` models of `size` (and a half to spare).
fn env_with_room_for(tag: &str, slots: u64, size: &str, n: usize, extra: &[&str]) -> (Env, Vec<PathBuf>) {
    let probe = Env::new(&format!("{tag}-probe"));
    let one = segment_bytes(&probe.synth("probe", "bert", size, 99));
    let budget = (one * slots + one / 2).to_string();
    let mut args = vec!["--max-memory", budget.as_str()];
    args.extend_from_slice(extra);
    let env = Env::with_daemon_args(tag, &args);
    let m = models(&env, n, size);
    (env, m)
}

fn name_of(p: &Path) -> String {
    p.display().to_string()
}

/// Holds a lease from this test process until dropped.
fn hold_lease(env: &Env, dir: &Path) -> Connection {
    let conn = Connection::connect(&env.socket, "test").expect("connect");
    let (resp, _fds) = conn
        .call(&Request::Acquire {
            source: ModelSource::Dir { path: dir.to_path_buf(), variant: None },
            dtype: WeightDType::F32,
            device: Device::Cpu,
            keep_alive: None,
        })
        .expect("acquire");
    assert!(matches!(resp, Response::Acquired(_)), "{resp:?}");
    conn
}

#[test]
fn budget_is_never_exceeded_across_a_scripted_sequence_of_loads() {
    let (env, m) = env_with_room_for("budget", 3, "2MiB", 5, &[]);
    let status = env.command("mora-cache").args(["ps"]).output().unwrap();
    let table = String::from_utf8_lossy(&status.stdout).to_string();
    let budget_line = table.lines().last().unwrap().to_string();
    assert!(budget_line.contains("budget in use"), "{table}");
    let budget: u64 = {
        // Recompute from the probe the same way the helper did.
        let one = segment_bytes(&m[0]);
        one * 3 + one / 2
    };
    for step in [0, 1, 2, 3, 0, 4, 1, 2, 2, 3, 4, 0, 1] {
        env.admin_ok(&["load", path(&m[step])]);
        let used = env.resident_bytes();
        assert!(used <= budget, "after loading m{step}: {used} > budget {budget}");
        assert!(env.resident_names().contains(&name_of(&m[step])), "m{step} resident after its load");
    }
    assert_eq!(env.ps().len(), 3, "the budget holds three");
}

#[test]
fn least_recently_used_idle_model_is_evicted_first() {
    let (env, m) = env_with_room_for("lru", 3, "2MiB", 4, &[]);
    for d in &m[..3] {
        env.admin_ok(&["load", path(d)]);
    }
    // Use m0 again: m1 becomes the least recently used.
    env.admin_ok(&["load", path(&m[0])]);
    env.admin_ok(&["load", path(&m[3])]);
    let mut expected = vec![name_of(&m[0]), name_of(&m[2]), name_of(&m[3])];
    expected.sort();
    assert_eq!(env.resident_names(), expected);
}

#[test]
fn pinned_model_is_never_evicted() {
    let (env, m) = env_with_room_for("pin", 2, "2MiB", 4, &[]);
    env.admin_ok(&["load", path(&m[0]), "--pin"]);
    env.admin_ok(&["load", path(&m[1])]);
    env.admin_ok(&["load", path(&m[2])]); // m0 is older but pinned: m1 goes
    let mut expected = vec![name_of(&m[0]), name_of(&m[2])];
    expected.sort();
    assert_eq!(env.resident_names(), expected);
    let line = one_line_failure(&env.admin(&["evict", path(&m[0])]));
    assert!(line.contains("is pinned"), "{line}");
    env.admin_ok(&["unpin", path(&m[0])]);
    env.admin_ok(&["load", path(&m[3])]); // now m0 is the oldest idle one
    let mut expected = vec![name_of(&m[2]), name_of(&m[3])];
    expected.sort();
    assert_eq!(env.resident_names(), expected);
}

#[test]
fn leased_model_is_never_evicted() {
    let (env, m) = env_with_room_for("lease", 2, "2MiB", 3, &[]);
    let lease = hold_lease(&env, &m[0]);
    env.admin_ok(&["load", path(&m[1])]);
    env.admin_ok(&["load", path(&m[2])]); // m0 is older but leased: m1 goes
    let mut expected = vec![name_of(&m[0]), name_of(&m[2])];
    expected.sort();
    assert_eq!(env.resident_names(), expected);
    let line = one_line_failure(&env.admin(&["evict", path(&m[0])]));
    assert!(line.contains(&format!("leased by pid {}", std::process::id())), "{line}");
    drop(lease);
    assert!(wait_until(Duration::from_secs(10), || env.total_leases() == 0));
    env.admin_ok(&["evict", path(&m[0])]);
    assert_eq!(env.resident_names(), vec![name_of(&m[2])]);
}

#[test]
fn idle_models_expire_after_their_keep_alive() {
    let env = Env::with_daemon_args("keepalive", &["--keep-alive", "300ms"]);
    let m = models(&env, 3, "1MiB");
    env.admin_ok(&["load", path(&m[0])]);
    env.admin_ok(&["load", path(&m[1]), "--keep-alive", "-1"]);
    let lease = hold_lease(&env, &m[2]);
    assert!(
        wait_until(Duration::from_secs(30), || !env.resident_names().contains(&name_of(&m[0]))),
        "m0 never expired"
    );
    let names = env.resident_names();
    assert!(names.contains(&name_of(&m[1])), "keep-alive -1 keeps it: {names:?}");
    assert!(names.contains(&name_of(&m[2])), "a leased model does not expire: {names:?}");
    drop(lease);
    assert!(
        wait_until(Duration::from_secs(30), || !env.resident_names().contains(&name_of(&m[2]))),
        "m2 never expired after its lease ended"
    );
}

#[test]
fn keep_alive_zero_evicts_when_the_last_lease_ends() {
    let env = Env::with_daemon("keepalive0");
    let m = models(&env, 1, "1MiB");
    let conn = Connection::connect(&env.socket, "test").unwrap();
    let (resp, _fds) = conn
        .call(&Request::Acquire {
            source: ModelSource::Dir { path: m[0].clone(), variant: None },
            dtype: WeightDType::F32,
            device: Device::Cpu,
            keep_alive: Some(mora_common::units::KeepAlive::For(Duration::ZERO)),
        })
        .unwrap();
    assert!(matches!(resp, Response::Acquired(_)));
    assert_eq!(env.resident_names(), vec![name_of(&m[0])]);
    drop(conn);
    assert!(wait_until(Duration::from_secs(10), || env.ps().is_empty()), "{:?}", env.ps());
}

#[test]
fn refused_fit_names_the_figures_and_the_holders() {
    let (env, m) = env_with_room_for("refuse", 1, "2MiB", 2, &[]);
    env.admin_ok(&["load", path(&m[0]), "--pin"]);
    let line = one_line_failure(&env.admin(&["load", path(&m[1])]));
    assert!(line.contains(&format!("cannot load {}: needs 2.0 MiB; budget 3.0 MiB", name_of(&m[1]))), "{line}");
    assert!(line.contains(&format!("2.0 MiB held by pinned, leased or loading models: {}", name_of(&m[0]))), "{line}");
    // Nothing was evicted or started for the refused load.
    assert_eq!(env.resident_names(), vec![name_of(&m[0])]);
    // Bigger than the whole budget: refused even with nothing held.
    env.admin_ok(&["unpin", path(&m[0])]);
    let big = env.synth("big", "bert", "8MiB", 5);
    let line = one_line_failure(&env.admin(&["load", path(&big)]));
    assert!(line.contains("budget 3.0 MiB") && line.contains("raise --max-memory"), "{line}");
    assert_eq!(env.resident_names(), vec![name_of(&m[0])], "a hopeless load evicts nothing");
}

#[test]
fn the_same_bytes_under_two_names_are_held_once() {
    let env = Env::with_daemon("dedup");
    // A plain copy of the hub snapshot: no symlinks, so only the content matches.
    let copy = env.scratch.join("local-copy");
    std::fs::create_dir_all(copy.join("1_Pooling")).unwrap();
    let src = test_model_dir();
    for f in ["config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), copy.join(f)).unwrap();
    }
    env.admin_ok(&["load", "sentence-transformers/all-MiniLM-L6-v2"]);
    let one = env.resident_bytes();
    env.admin_ok(&["load", path(&copy)]);
    let ps = env.ps();
    assert_eq!(ps.len(), 1, "one resident copy: {ps:?}");
    assert_eq!(ps[0]["loads"], 1);
    assert_eq!(env.resident_bytes(), one, "bytes counted once");
    let names: Vec<&str> = ps[0]["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert_eq!(names, vec!["sentence-transformers/all-MiniLM-L6-v2", path(&copy)]);
    let table = env.admin_ok(&["ps"]);
    assert!(table.contains(&format!("sentence-transformers/all-MiniLM-L6-v2, {}", path(&copy))), "{table}");
}

#[test]
fn evicting_releases_the_memory_for_real() {
    let env = Env::with_daemon("rss");
    let pid = env.daemon_pid().unwrap();
    let (rss_before, held_before) = process_memory(pid);
    assert_eq!(held_before, 0);
    let m = env.synth("m", "bert", "48MiB", 1);
    env.admin_ok(&["load", path(&m)]);
    let (_, held) = process_memory(pid);
    assert!(held >= segment_bytes(&m), "segment held: {held}");
    env.admin_ok(&["evict", path(&m)]);
    let (rss_after, held_after) = process_memory(pid);
    assert_eq!(held_after, 0, "the segment's memory is gone after evict");
    assert!(rss_after < rss_before + (16 << 20), "RSS {rss_after} vs {rss_before} before");
}

#[test]
fn thirty_two_clients_over_three_models_within_a_budget_of_two() {
    let (mut env, m) = env_with_room_for("crowd", 2, "2MiB", 3, &[]);
    let pid = env.daemon_pid().unwrap();
    let (rss_baseline, _) = process_memory(pid);
    let workflows: Vec<PathBuf> = m
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            env.workflow(
                &format!("w{i}.toml"),
                &format!(
                    "name = \"w{i}\"\n[models.m]\npath = {:?}\n[[steps]]\nname = \"e\"\ntask = \"embed\"\nmodel = \"m\"\ntexts = [\"the cat sat on the mat\"]\n",
                    path(dir)
                ),
            )
        })
        .collect();
    let children: Vec<_> = (0..32)
        .map(|i| {
            env.exec_command(&workflows[i % 3], &format!("out{i}"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ok = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        if out.status.success() {
            ok += 1;
        } else {
            let line = one_line_failure(&out);
            assert!(line.contains("needs") && line.contains("budget"), "not a clear refusal: {line}");
        }
    }
    assert!(ok >= 1, "no client succeeded");
    assert!(env.daemon_alive());
    assert!(wait_until(Duration::from_secs(10), || env.total_leases() == 0), "leases leaked: {:?}", env.ps());
    assert!(env.ps().len() <= 2);
    env.admin_ok(&["clear"]);
    assert!(env.ps().is_empty());
    let (rss, held) = process_memory(pid);
    assert_eq!(held, 0, "segments still held after clear");
    assert!(rss < rss_baseline + (32 << 20), "daemon RSS {rss} vs baseline {rss_baseline}");
    // Still serving.
    assert!(UnixStream::connect(&env.socket).is_ok());
}

#[test]
fn a_workflows_keep_alive_reaches_the_daemon() {
    let env = Env::with_daemon("wf-keepalive");
    let m = env.synth("m", "bert", "1MiB", 3);
    let wf = env.workflow(
        "w.toml",
        &format!(
            "name = \"w\"\n[models.m]\npath = {:?}\nkeep_alive = 0\n[[steps]]\nname = \"e\"\ntask = \"embed\"\nmodel = \"m\"\ntexts = [\"a dog\"]\n",
            path(&m)
        ),
    );
    let out = env.exec(&wf, "out", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // keep_alive = 0: evicted as soon as the run's lease ended.
    assert!(wait_until(Duration::from_secs(10), || env.ps().is_empty()), "{:?}", env.ps());
    let wf = env.workflow("w2.toml", &std::fs::read_to_string(&wf).unwrap().replace("keep_alive = 0", "keep_alive = \"-1\""));
    assert!(env.exec(&wf, "out2", &[]).status.success());
    let ps = env.ps();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["keep_alive"], "forever");
    assert!(ps[0]["expires"].is_null());
}

#[test]
fn a_daemon_without_cuda_refuses_a_gpu_request_and_keeps_serving() {
    use mora_common::protocol::{ErrorKind, GpuUuid};
    let env = Env::with_daemon("gpu-refused");
    let conn = Connection::connect(&env.socket, "test").expect("connect");
    let uuid = GpuUuid([0x5a; 16]);
    let (resp, fds) = conn
        .call(&Request::Acquire {
            source: ModelSource::Dir { path: test_model_dir(), variant: None },
            dtype: WeightDType::F32,
            device: Device::Cuda(uuid),
            keep_alive: None,
        })
        .expect("acquire");
    assert!(fds.is_empty());
    match resp {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains(&uuid.to_string()) && e.message.contains("built without CUDA"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Nothing was loaded, and the daemon still lends CPU weights.
    assert!(env.resident_names().is_empty());
    drop(hold_lease(&env, &test_model_dir()));
    assert_eq!(env.resident_names().len(), 1);
}

