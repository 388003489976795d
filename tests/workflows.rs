//! The workflow format end to end: every example passes `check` and runs;
//! variables set from the command line; a rank step over two embed steps of
//! one model.

use std::path::{Path, PathBuf};

use std::time::Duration;

use mora::{embed_workflow, one_line_failure, read_embeddings, tiny_llama, wait_until, Env};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

fn examples() -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(example(""))
        .expect("examples/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    all.sort();
    assert!(all.len() >= 2, "{all:?}");
    all
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("JSON output")
}

#[test]
fn every_example_passes_check_and_runs() {
    tiny_llama();
    let env = Env::with_daemon("examples");
    for wf in examples() {
        let out = env.command("mora-exec").arg("check").arg(&wf).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "check {}: {}", wf.display(), String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": ok: "), "{stdout}");
        let name = wf.file_stem().unwrap().to_str().unwrap();
        let out = env.exec(&wf, name, &[]);
        assert!(out.status.success(), "run {}: {}", wf.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn search_ranks_the_corpus_and_takes_its_query_from_set() {
    let env = Env::with_daemon("search");
    let wf = example("search.toml");
    let out = env.exec(&wf, "a", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("search: ranked 1 queries against 9 texts, top 3"), "{stdout}");
    let doc = read_json(&env.scratch.join("a/search.json"));
    let r = &doc["results"][0];
    assert_eq!(r["query"], "A man is eating pasta.");
    let matches = r["matches"].as_array().unwrap();
    assert_eq!(matches.len(), 3);
    assert_eq!(matches[0]["text"], "A man is eating food.");
    assert_eq!(matches[0]["index"], 0);
    let scores: Vec<f64> = matches.iter().map(|m| m["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]) && scores[0] < 1.0 && scores[0] > 0.5, "{scores:?}");

    let out = env.exec(&wf, "b", &["--set", "query=A cheetah chases prey across a field.", "--set", "top_k=1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = read_json(&env.scratch.join("b/search.json"));
    let matches = doc["results"][0]["matches"].as_array().unwrap().clone();
    assert_eq!(matches.len(), 1);
    assert_eq!(matches[0]["text"], "A cheetah is running behind its prey.");
    // Both embed steps used one model, acquired once per run.
    let ps = env.ps();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["hits"], 2);
}

#[test]
fn bad_settings_and_references_fail_before_any_model_is_loaded() {
    let env = Env::with_daemon("wf-errors");
    let wf = example("search.toml");
    let line = one_line_failure(&env.exec(&wf, "out", &["--set", "top_k=three"]));
    assert!(line.contains("--set top_k=three: `top_k` is an integer (default 3), and `three` is not one"), "{line}");
    let line = one_line_failure(&env.exec(&wf, "out", &["--set", "qurey=x"]));
    assert!(line.contains("no variable `qurey` (declared: query, top_k)"), "{line}");
    let later = std::fs::read_to_string(&wf).unwrap().replace("{{ steps.query }}", "{{ steps.search }}");
    let bad = env.workflow("later.toml", &later.replace("texts_file = \"corpus.txt\"", "texts = [\"x\"]"));
    let line = one_line_failure(&env.command("mora-exec").arg("check").arg(&bad).output().unwrap());
    assert!(line.contains("later.toml:") && line.contains("does not come before it"), "{line}");
    let line = one_line_failure(&env.exec(&bad, "out", &[]));
    assert!(line.contains("does not come before it"), "{line}");
    let missing = env.workflow("missing.toml", &std::fs::read_to_string(&wf).unwrap());
    let line = one_line_failure(&env.command("mora-exec").arg("check").arg(&missing).output().unwrap());
    assert!(line.contains("cannot read texts_file") && line.contains("corpus.txt"), "{line}");
    assert!(env.resident_names().is_empty(), "nothing was loaded");
}

#[test]
fn generation_is_deterministic_streams_and_matches_no_cache() {
    tiny_llama();
    let env = Env::with_daemon("generate");
    let wf = example("generate.toml");
    let text = |out: &str| read_json(&env.scratch.join(out).join("generate.json"))["text"].as_str().unwrap().to_string();
    for (tag, extra) in [("greedy", &[][..]), ("sampled", &["--set", "temperature=0.9", "--set", "seed=5"][..])] {
        let cached = env.exec(&wf, &format!("{tag}-cached"), extra);
        assert!(cached.status.success(), "{}", String::from_utf8_lossy(&cached.stderr));
        let again = env.exec(&wf, &format!("{tag}-again"), extra);
        let mut args = extra.to_vec();
        args.push("--no-cache");
        let baseline = env.exec(&wf, &format!("{tag}-baseline"), &args);
        assert!(again.status.success() && baseline.status.success());
        let t = text(&format!("{tag}-cached"));
        assert!(!t.is_empty(), "{tag}: nothing generated");
        assert_eq!(t, text(&format!("{tag}-again")), "{tag}: same seed, same text");
        assert_eq!(t, text(&format!("{tag}-baseline")), "{tag}: the cache changes nothing");
        // The text streamed to stdout as it came, before the step's report.
        let stdout = String::from_utf8_lossy(&cached.stdout);
        assert!(stdout.starts_with(&t), "{tag}: {stdout}");
        assert!(stdout.contains("complete: ") && stdout.contains(" tokens with "), "{stdout}");
        // Its byte-level BPE came prepared by the daemon.
        assert!(stdout.contains("tokenizer prepared by the daemon"), "{stdout}");
    }
    let greedy = text("greedy-cached");
    assert_ne!(greedy, text("sampled-cached"), "sampling at temperature 0.9 picked the greedy tokens every time");
    let doc = read_json(&env.scratch.join("greedy-cached/generate.json"));
    assert_eq!(doc["prompt"], "the man is eating");
    assert!(doc["tokens"].as_u64().unwrap() >= 1 && doc["tokens_per_s"].as_f64().unwrap() > 0.0, "{doc}");
}

#[test]
fn the_pipeline_generates_from_the_retrieved_passage() {
    tiny_llama();
    let env = Env::with_daemon("pipeline");
    let out = env.exec(&example("pipeline.toml"), "p", &["--set", "question=Who is playing drums?"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer = read_json(&env.scratch.join("p/answer.json"));
    assert_eq!(answer["prompt"], "Context: A monkey is playing drums. Question: Who is playing drums? Answer:");
    // Two models, each acquired once in the run.
    let ps = env.ps();
    assert_eq!(ps.len(), 2, "{ps:?}");
}

#[test]
fn watch_reruns_in_a_fresh_process_after_a_change_and_stops_on_sigint() {
    let env = Env::with_daemon("watch");
    let wf = env.workflow("w.toml", &embed_workflow(&["first"]));
    let log = env.scratch.join("watch.log");
    let mut child = env
        .command("mora-exec")
        .arg("watch")
        .arg(&wf)
        .arg("-o")
        .arg(env.scratch.join("out"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start watch");
    let said = |what: &str| std::fs::read_to_string(&log).unwrap_or_default().contains(what);
    let out = env.scratch.join("out/embeddings.json");
    assert!(wait_until(Duration::from_secs(60), || said("run 1 finished")), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(read_embeddings(&out).len(), 1);
    // A different size as well as a new mtime, whatever the file system's clock.
    std::fs::write(&wf, embed_workflow(&["second", "third"])).unwrap();
    assert!(wait_until(Duration::from_secs(60), || said("run 2 finished")), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(read_embeddings(&out).len(), 2);
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::INT).unwrap();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("run 1 finished") && text.contains("models loaded by the cache daemon (cold)"), "{text}");
    assert!(text.contains("run 2 finished") && text.contains("(models warm from the cache)"), "{text}");
    assert!(text.contains("stopped after 2 run(s)"), "{text}");
    // Each run was its own process: the daemon saw two leases come and go.
    assert_eq!(env.ps()[0]["hits"], 2);
    assert_eq!(env.ps()[0]["leases"], 0);
}
