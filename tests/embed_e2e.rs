//! The embedding workflow end to end: daemon, exec client, real model.

use std::process::Stdio;
use std::time::Duration;

use mora::{embed_workflow, one_line_failure, read_embeddings, wait_until, Env};

const PAIR: [&str; 2] = ["A man is eating food.", "A man is eating a piece of bread."];

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn assert_ok(o: &std::process::Output) {
    assert!(o.status.success(), "mora-exec failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn cached_and_no_cache_outputs_are_bitwise_identical() {
    let env = Env::with_daemon("bitwise");
    let wf = env.workflow("embed.toml", &embed_workflow(&PAIR));
    let cached = env.exec(&wf, "cached", &[]);
    assert_ok(&cached);
    // The daemon lent its prepared tokenizer, and it was used.
    assert!(stdout(&cached).contains("tokenizer prepared by the daemon"), "{}", stdout(&cached));
    let baseline = env.exec(&wf, "baseline", &["--no-cache"]);
    assert_ok(&baseline);
    assert!(stdout(&baseline).contains("no cache"), "{}", stdout(&baseline));
    assert!(!stdout(&baseline).contains("tokenizer prepared"), "{}", stdout(&baseline));
    let a = std::fs::read(env.scratch.join("cached/embeddings.json")).unwrap();
    let b = std::fs::read(env.scratch.join("baseline/embeddings.json")).unwrap();
    assert!(!a.is_empty());
    assert_eq!(a, b, "cached and --no-cache outputs differ");
}

#[test]
fn embeddings_match_the_published_similarity_and_are_unit_length() {
    let env = Env::with_daemon("cosine");
    let wf = env.workflow("embed.toml", &embed_workflow(&PAIR));
    assert_ok(&env.exec(&wf, "out", &[]));
    let e = read_embeddings(&env.scratch.join("out/embeddings.json"));
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].len(), 384);
    let c = cosine(&e[0], &e[1]);
    assert!((c - 0.755).abs() <= 0.002, "cosine {c}, expected 0.755 ± 0.002");
    for v in &e {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() <= 1e-5, "norm {n}");
    }
}

#[test]
fn second_run_is_served_from_the_cache() {
    let env = Env::with_daemon("warm");
    let wf = env.workflow("embed.toml", &embed_workflow(&PAIR));
    let first = env.exec(&wf, "one", &[]);
    assert_ok(&first);
    assert!(stdout(&first).contains("cold"), "{}", stdout(&first));
    let second = env.exec(&wf, "two", &[]);
    assert_ok(&second);
    assert!(stdout(&second).contains("warm"), "{}", stdout(&second));
    // mora-exec lends the segment to candle rather than copying it.
    assert!(stdout(&second).contains(", in place;"), "{}", stdout(&second));
    let ps = env.ps();
    assert_eq!(ps.len(), 1, "{ps:?}");
    let m = &ps[0];
    assert_eq!(m["name"], "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(m["loads"], 1);
    assert_eq!(m["hits"], 2);
    assert_eq!(m["leases"], 0);
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["dtype"], "f32");
    assert!(m["bytes"].as_u64().unwrap() > 80_000_000);
    assert!(m["last_used"].as_u64().unwrap() > 1_600_000_000);
}

#[test]
fn two_clients_at_once_both_succeed_with_one_load() {
    let env = Env::with_daemon("concurrent");
    let wf = env.workflow("embed.toml", &embed_workflow(&PAIR));
    let spawn = |out: &str| {
        env.exec_command(&wf, out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_ok(&a);
    assert_ok(&b);
    let ps = env.ps();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["loads"], 1, "two concurrent clients must share one load: {ps:?}");
    assert_eq!(ps[0]["hits"], 2);
    assert_eq!(
        std::fs::read(env.scratch.join("a/embeddings.json")).unwrap(),
        std::fs::read(env.scratch.join("b/embeddings.json")).unwrap()
    );
}

#[test]
fn sigkilled_client_releases_its_lease_and_the_daemon_stays_up() {
    let mut env = Env::with_daemon("sigkill");
    // Enough texts that the run is still going when we kill it.
    let corpus: String = (0..20_000).map(|i| format!("sentence number {i} about nothing in particular\n")).collect();
    std::fs::write(env.scratch.join("corpus.txt"), corpus).unwrap();
    let wf = env.workflow(
        "long.toml",
        &embed_workflow(&PAIR).replace(
            "texts = [\"A man is eating food.\",\"A man is eating a piece of bread.\"]",
            "texts_file = \"corpus.txt\"",
        ),
    );
    assert!(std::fs::read_to_string(&wf).unwrap().contains("texts_file"));
    let mut child = env
        .exec_command(&wf, "out")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || env.total_leases() == 1),
        "the client never held a lease"
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the client finished before it was killed");
    assert!(wait_until(Duration::from_secs(10), || env.total_leases() == 0), "lease leaked: {:?}", env.ps());
    assert!(env.daemon_alive(), "daemon died with its client");
    // Still serving: the model stays resident and a new run is warm.
    let again = env.exec(&env.workflow("embed.toml", &embed_workflow(&PAIR)), "again", &[]);
    assert_ok(&again);
    assert!(stdout(&again).contains("warm"), "{}", stdout(&again));
}

#[test]
fn exec_starts_a_daemon_when_none_answers() {
    let env = Env::new("autostart");
    let wf = env.workflow("embed.toml", &embed_workflow(&PAIR));
    let out = env.exec(&wf, "out", &[]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cache daemon at") && err.contains("started one"), "{err}");
    assert!(env.socket.exists());
    // The daemon outlives the run and keeps the model.
    let ps = env.ps();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["loads"], 1);
    let stop = env.command("mora-cache").arg("stop").output().unwrap();
    assert!(stop.status.success(), "{}", String::from_utf8_lossy(&stop.stderr));
    assert!(!env.socket.exists(), "stop must remove the socket");
}

#[test]
fn no_autostart_without_a_daemon_is_a_clear_error() {
    let env = Env::new("noauto");
    let wf = env.workflow("embed.toml", &embed_workflow(&PAIR));
    let line = one_line_failure(&env.exec(&wf, "out", &["--no-autostart"]));
    assert!(line.contains("no cache daemon is listening at"), "{line}");
    assert!(!env.socket.exists());
}

#[test]
fn half_precision_weights_match_candles_own_conversion_bit_for_bit() {
    // The daemon converts f32 to f16 itself; the baseline lets candle do it.
    let env = Env::with_daemon("f16");
    let wf = env.workflow(
        "embed.toml",
        &embed_workflow(&PAIR).replace("[models.minilm]\n", "[models.minilm]\ndtype = \"f16\"\n"),
    );
    assert!(std::fs::read_to_string(&wf).unwrap().contains("dtype = \"f16\""));
    let cached = env.exec(&wf, "cached", &[]);
    assert_ok(&cached);
    assert_ok(&env.exec(&wf, "baseline", &["--no-cache"]));
    let ps = env.ps();
    assert_eq!(ps[0]["dtype"], "f16");
    assert!(ps[0]["bytes"].as_u64().unwrap() < 50_000_000, "held in half the bytes: {ps:?}");
    let a = std::fs::read(env.scratch.join("cached/embeddings.json")).unwrap();
    let b = std::fs::read(env.scratch.join("baseline/embeddings.json")).unwrap();
    assert_eq!(a, b, "f16 cached and --no-cache outputs differ");
    let e = read_embeddings(&env.scratch.join("cached/embeddings.json"));
    let c = cosine(&e[0], &e[1]);
    assert!((c - 0.755).abs() <= 0.01, "f16 cosine {c}");
}
