//! Parity with the reference libraries on checkpoints they wrote themselves:
//! tests/fixtures/golden/ holds tiny random-weight models saved by
//! transformers 4 and 5 (`scripts/golden/make_fixtures.py`), with the greedy
//! token ids transformers generated (after a prompt, or after chat messages
//! its `apply_chat_template` rendered) and the embeddings
//! sentence-transformers computed. Mora must give the same, through a daemon (cold, then warm) and
//! with `--no-cache`. No torch is needed here.

use std::path::{Path, PathBuf};

use mora::{embeddings_of, one_line_failure, Env};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("golden.json").is_file())
        .collect();
    all.sort();
    all
}

fn golden(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap()
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().to_string()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// The `token_ids` of a generate step's output (or of a golden file).
fn token_ids(v: &serde_json::Value) -> Vec<u64> {
    v["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

/// A workflow of one step `s` on the model in `dir`: `step` gives its
/// task and keys.
fn workflow(env: &Env, file: &str, dir: &Path, step: &str) -> PathBuf {
    env.workflow(
        file,
        &format!(
            "name = \"golden\"\n[models.m]\npath = {:?}\n[[steps]]\nname = \"s\"\nmodel = \"m\"\n{step}\noutput = \"s.json\"\n",
            dir.display().to_string()
        ),
    )
}

/// That workflow run cold and warm through the daemon, then with
/// `--no-cache`: each run's name and output.
fn three_runs(env: &Env, dir: &Path, step: &str) -> Vec<(&'static str, serde_json::Value)> {
    let fixture = name(dir);
    let wf = workflow(env, &format!("{fixture}.toml"), dir, step);
    [("cold", &[][..]), ("warm", &[][..]), ("no-cache", &["--no-cache"][..])]
        .into_iter()
        .map(|(run, extra)| {
            let out_dir = format!("{fixture}-{run}");
            let out = env.exec(&wf, &out_dir, extra);
            assert!(out.status.success(), "{fixture} {run}: {}", String::from_utf8_lossy(&out.stderr));
            (run, read_json(&env.scratch.join(&out_dir).join("s.json")))
        })
        .collect()
}

#[test]
fn every_family_has_a_fixture_in_both_config_forms() {
    let names: Vec<String> = fixtures().iter().map(|d| name(d)).collect();
    for family in [
        "llama", "llama3-scaling", "llama-linear", "llama-yarn", "llama-chat", "mistral", "qwen2", "qwen3", "phi3", "phi3-partial-rotary",
        "gemma2", "gpt2", "bert", "xlm-roberta", "modernbert",
    ] {
        for form in ["tf4", "tf5"] {
            let want = format!("{family}-{form}");
            assert!(names.contains(&want), "no fixture {want} in {names:?}");
        }
    }
    // The forms really differ where transformers 5 changed them.
    let v5: serde_json::Value = read_json(&fixtures().into_iter().find(|d| name(d) == "llama-tf5").unwrap().join("config.json"));
    assert!(v5.get("rope_parameters").is_some() && v5.get("rope_theta").is_none(), "{v5}");
    let v4: serde_json::Value = read_json(&fixtures().into_iter().find(|d| name(d) == "llama-tf4").unwrap().join("config.json"));
    assert!(v4.get("rope_theta").is_some() && v4.get("rope_parameters").is_none(), "{v4}");
}

#[test]
fn decoders_generate_the_greedy_ids_transformers_generates_warm_and_without_cache() {
    let env = Env::with_daemon("golden-gen");
    let mut checked = 0;
    for dir in fixtures() {
        let g = golden(&dir);
        if g["task"] != "generate" {
            continue;
        }
        let fixture = name(&dir);
        let want = token_ids(&g);
        // A prompt, or chat messages rendered with the fixture's template.
        let asked = match g["messages"].as_array() {
            None => format!("prompt = {}", g["prompt"]),
            Some(messages) => {
                let m: Vec<String> =
                    messages.iter().map(|m| format!("{{ role = {}, content = {} }}", m["role"], m["content"])).collect();
                format!("messages = [{}]", m.join(", "))
            }
        };
        let step = format!("task = \"generate\"\n{asked}\nmax_tokens = {}", g["max_tokens"]);
        for (run, doc) in three_runs(&env, &dir, &step) {
            let got = token_ids(&doc);
            assert_eq!(got, want, "{fixture} ({run}): Mora's greedy ids differ from transformers' {}", g["transformers"]);
            let stopped = if want.len() < g["max_tokens"].as_u64().unwrap() as usize { "eos" } else { "max_tokens" };
            assert_eq!(doc["finish_reason"], stopped, "{fixture} ({run})");
        }
        checked += 1;
    }
    assert!(checked >= 24, "only {checked} decoder fixtures");
}

#[test]
fn encoders_embed_as_sentence_transformers_does_warm_and_without_cache() {
    let env = Env::with_daemon("golden-embed");
    let mut checked = 0;
    for dir in fixtures() {
        let g = golden(&dir);
        if g["task"] != "embed" {
            continue;
        }
        let fixture = name(&dir);
        let want = embeddings_of(&g);
        for (run, doc) in three_runs(&env, &dir, &format!("task = \"embed\"\ntexts = {}", g["texts"])) {
            let got = embeddings_of(&doc);
            assert_eq!(got.len(), want.len());
            let worst = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-5, "{fixture} ({run}): max abs difference {worst} from sentence-transformers");
        }
        checked += 1;
    }
    assert_eq!(checked, 6);
}

/// A copy of a fixture with its config edited by `edit`.
fn edited(env: &Env, fixture: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixtures().into_iter().find(|d| name(d) == fixture).unwrap();
    let dst = env.scratch.join(format!("{fixture}-edited"));
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg = read_json(&dst.join("config.json"));
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    dst
}

#[test]
fn a_config_mora_cannot_honour_fails_in_check_and_run_with_one_line_naming_the_key() {
    let env = Env::new("golden-refused");
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("llama-tf5", Box::new(|c| c["rope_parameters"]["rope_type"] = "dynamic".into()), "`rope_parameters.rope_type` is `dynamic`"),
        ("llama-tf4", Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "longrope", "factor": 2.0})), "`rope_scaling.rope_type` is `longrope`"),
        ("llama-tf5", Box::new(|c| c["hidden_act"] = "gelu_10".into()), "`hidden_act` is `gelu_10`"),
        ("llama-tf5", Box::new(|c| c["sliding_window"] = 4.into()), "key `sliding_window` is not one Mora knows for llama models"),
        ("qwen2-tf5", Box::new(|c| c["layer_types"][1] = "chunked_attention".into()), "`layer_types`[1] is `chunked_attention`"),
        ("gpt2-tf5", Box::new(|c| c["add_cross_attention"] = true.into()), "`add_cross_attention` = true changes the network"),
    ];
    // Messages for a model without a chat template.
    let dir = edited(&env, "llama-tf5", |_| {});
    let wf = workflow(&env, "chat.toml", &dir, "task = \"generate\"\nmessages = [{ role = \"user\", content = \"hi\" }]");
    let check = env.command("mora-exec").arg("check").arg(&wf).output().unwrap();
    let line = one_line_failure(&check);
    assert!(line.contains("has no chat template") && line.contains("use `prompt` instead of `messages`"), "{line}");
    assert_eq!(one_line_failure(&env.exec(&wf, "out", &["--no-cache"])), line);
    std::fs::remove_dir_all(&dir).unwrap();
    for (fixture, edit, want) in cases {
        let dir = edited(&env, fixture, edit);
        let wf = workflow(&env, "refused.toml", &dir, "task = \"generate\"\nprompt = \"the man\"");
        let check = env.command("mora-exec").arg("check").arg(&wf).output().unwrap();
        let line = one_line_failure(&check);
        assert!(line.contains("config.json") && line.contains(want), "{fixture}: {line}");
        // `run` refuses it before reading any weights, with or without the cache.
        let run = env.exec(&wf, "out", &["--no-cache"]);
        assert_eq!(one_line_failure(&run), line);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
