//! The workflow format end to end: every example passes `check` and runs;
//! variables set from the command line; a rank step over two embed steps of
//! one model.

use std::path::{Path, PathBuf};

use mora::{one_line_failure, Env};

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
