//! Each bad input gives one clear line on stderr and a non-zero exit, and
//! the daemon keeps running.

use std::path::{Path, PathBuf};

use mora::{embed_workflow, local_embed_workflow, one_line_failure, test_model_dir, Env};

fn local_model(env: &Env, name: &str, weights: &[u8]) -> PathBuf {
    let dir = env.scratch.join(name);
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let src = test_model_dir();
    for f in ["config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    dir
}

#[test]
fn missing_workflow_file() {
    let env = Env::with_daemon("missing");
    let line = one_line_failure(&env.exec(&env.scratch.join("nope.toml"), "out", &[]));
    assert!(line.contains("cannot read workflow") && line.contains("nope.toml"), "{line}");
}

#[test]
fn toml_syntax_error_names_line_and_column() {
    let env = Env::with_daemon("syntax");
    let wf = env.workflow("bad.toml", "name = \"x\"\n[models.m]\nrepo = \"a/b\"\n[[steps]\n");
    let line = one_line_failure(&env.exec(&wf, "out", &[]));
    assert!(line.contains("bad.toml:4:"), "{line}");
}

#[test]
fn unknown_key_in_a_step() {
    let env = Env::with_daemon("unknown-key");
    let wf = env.workflow("typo.toml", &embed_workflow(&["x"]).replace("output =", "ouput ="));
    let line = one_line_failure(&env.exec(&wf, "out", &[]));
    assert!(line.contains("unknown field `ouput`") && line.contains("typo.toml:"), "{line}");
}

#[test]
fn unknown_model_name() {
    let env = Env::with_daemon("unknown-model");
    let wf = env.workflow("m.toml", &embed_workflow(&["x"]).replace("model = \"minilm\"", "model = \"bert\""));
    let line = one_line_failure(&env.exec(&wf, "out", &[]));
    assert!(line.contains("unknown model `bert`") && line.contains("declared: minilm"), "{line}");
}

#[test]
fn repo_not_in_the_cache() {
    let mut env = Env::with_daemon("not-cached");
    let wf = env.workflow("r.toml", &embed_workflow(&["x"]).replace("all-MiniLM-L6-v2", "no-such-model"));
    let line = one_line_failure(&env.exec(&wf, "out", &[]));
    assert!(line.contains("`sentence-transformers/no-such-model` (revision main) is not in the Hugging Face cache at"), "{line}");
    assert!(line.ends_with("fetch it with `mora-cache pull` (or `mora-exec run --pull`), or give a local path"), "{line}");
    let line = one_line_failure(&env.exec(&wf, "out", &["--no-cache"]));
    assert!(line.contains("is not in the Hugging Face cache at"), "{line}");
    assert!(env.daemon_alive());
}

#[test]
fn truncated_safetensors_is_refused_and_the_daemon_keeps_running() {
    let mut env = Env::with_daemon("truncated");
    let full = std::fs::read(test_model_dir().join("model.safetensors")).unwrap();
    let dir = local_model(&env, "truncated-model", &full[..full.len() / 2]);
    let wf = env.workflow("t.toml", &local_embed_workflow(&dir));
    let line = one_line_failure(&env.exec(&wf, "out", &[]));
    assert!(line.contains("not a valid safetensors file") && line.contains("truncated"), "{line}");
    assert!(env.daemon_alive(), "daemon died on a truncated file");
    assert!(env.ps().is_empty(), "a refused load must leave nothing resident");
    // The daemon still serves good models afterwards.
    let good = env.workflow("good.toml", &embed_workflow(&["x"]));
    assert!(env.exec(&good, "good", &[]).status.success());
}

#[test]
fn corrupt_safetensors_header_is_refused() {
    let mut env = Env::with_daemon("corrupt");
    let mut bytes = 40u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"w\": {\"dtype\": \"F32\", \"shape\": [2]}}    ");
    bytes.extend_from_slice(&[0u8; 8]);
    let dir = local_model(&env, "corrupt-model", &bytes);
    let wf = env.workflow("c.toml", &local_embed_workflow(&dir));
    let line = one_line_failure(&env.exec(&wf, "out", &[]));
    assert!(line.contains("not a valid safetensors file") && line.contains("data_offsets"), "{line}");
    assert!(env.daemon_alive());
}

#[test]
fn missing_local_model_directory() {
    let env = Env::with_daemon("nodir");
    let wf = env.workflow("d.toml", &local_embed_workflow(&env.scratch.join("absent")));
    let line = one_line_failure(&env.exec(&wf, "out", &[]));
    assert!(line.contains("model directory") && line.contains("does not exist"), "{line}");
}

#[test]
fn a_gpu_device_in_a_build_without_cuda_is_a_clear_error_with_and_without_the_cache() {
    let env = Env::with_daemon("nocuda");
    let wf = env.workflow(
        "gpu.toml",
        &embed_workflow(&["x"]).replace("[models.minilm]\n", "[models.minilm]\ndevice = \"cuda:0\"\n"),
    );
    for extra in [&[][..], &["--no-cache"][..]] {
        let line = one_line_failure(&env.exec(&wf, "out", extra));
        assert!(line.contains("device cuda:0 needs a CUDA build") && line.contains("scripts/build-cuda.sh"), "{line}");
    }
    let line = one_line_failure(&env.exec(
        &env.workflow("typo.toml", &embed_workflow(&["x"]).replace("[models.minilm]\n", "[models.minilm]\ndevice = \"gpu\"\n")),
        "out",
        &[],
    ));
    assert!(line.contains("typo.toml:") && line.contains("unknown device `gpu`"), "{line}");
    // `auto` is the CPU here, and the default: the same workflow runs.
    let auto = env.workflow(
        "auto.toml",
        &embed_workflow(&["x"]).replace("[models.minilm]\n", "[models.minilm]\ndevice = \"auto\"\n"),
    );
    let out = env.exec(&auto, "out", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn outputs_stay_inside_the_output_directory_unless_allowed() {
    let env = Env::with_daemon("escape");
    let outside = env.scratch.join("outside.json");
    let with_output = |o: &str| embed_workflow(&["x"]).replace("output = \"embeddings.json\"", &format!("output = {o:?}"));
    let abs = env.workflow("abs.toml", &with_output(&outside.display().to_string()));
    let line = one_line_failure(&env.exec(&abs, "out", &[]));
    assert!(line.contains("is an absolute path") && line.contains("--allow-outside-output"), "{line}");
    let up = env.workflow("up.toml", &with_output("../outside.json"));
    let line = one_line_failure(&env.exec(&up, "out", &[]));
    assert!(line.contains("climbs out of the output directory"), "{line}");
    // A symlink inside the output directory that leads out of it.
    std::fs::create_dir_all(env.scratch.join("out")).unwrap();
    std::os::unix::fs::symlink(env.scratch.join("elsewhere"), env.scratch.join("out/link")).unwrap();
    std::fs::create_dir_all(env.scratch.join("elsewhere")).unwrap();
    let link = env.workflow("link.toml", &with_output("link/e.json"));
    let line = one_line_failure(&env.exec(&link, "out", &[]));
    assert!(line.contains("through a symlink"), "{line}");
    assert!(!outside.exists() && !env.scratch.join("elsewhere/e.json").exists(), "nothing written outside");
    assert!(env.resident_names().is_empty(), "refused before any model was loaded");
    // The explicit flag allows it.
    let out = env.exec(&abs, "out", &["--allow-outside-output"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(outside.is_file());
}

/// Rewrites a safetensors file without the tensor `drop` (the others keep
/// their bytes and offsets).
fn without_tensor(path: &Path, drop: &str) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert!(header.remove(drop).is_some(), "no tensor {drop}");
    let mut h = serde_json::to_vec(&header).unwrap();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_model_missing_a_tensor_or_with_an_absurd_config_is_one_line_and_the_daemon_lives() {
    let env = Env::with_daemon("hostile-model");
    let missing = env.synth("missing", "bert", "1MiB", 3);
    without_tensor(&missing.join("model.safetensors"), "encoder.layer.0.attention.self.query.weight");
    let absurd = env.synth("absurd", "bert", "1MiB", 4);
    let config_path = absurd.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["hidden_size"] = serde_json::json!(1u64 << 40);
    config["intermediate_size"] = serde_json::json!(1u64 << 42);
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    // Without the cache, candle's own loader already refuses the gap the
    // missing tensor leaves; with it, building the model names the tensor.
    for (dir, expected) in [(&missing, "encoder.layer.0.attention.self.query"), (&absurd, "shape mismatch")] {
        let wf = env.workflow("m.toml", &local_embed_workflow(dir));
        for extra in [&[][..], &["--no-cache"][..]] {
            let line = one_line_failure(&env.exec(&wf, "out", extra));
            assert!(line.contains(expected) && !line.contains("panicked"), "{extra:?}: {line}");
        }
    }
    // The daemon still serves.
    let ok = env.exec(&env.workflow("ok.toml", &embed_workflow(&["fine"])), "ok", &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}
