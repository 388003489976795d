//! LoRA adapters through `mora-exec`, on adapters the reference libraries
//! wrote themselves (tests/fixtures/lora, `scripts/golden/make_lora_fixtures.py`):
//! PEFT adapters over the golden llama and qwen2 decoders give the greedy
//! ids transformers + PEFT gave, at two scales, through the daemon and with
//! `--no-cache`; an image step applies diffusers' and Kohya's files over the
//! SD 1.5 fixture pipeline, records them, holds each as a cache entry of its
//! own, and leaves the base's resident copy untouched; adapters that do not fit are refused by `check` and
//! `run` in one line. The networks' outputs themselves are checked against
//! diffusers in `mora-models` (`lora_adapters_match_diffusers_load_lora_weights`).

use std::path::{Path, PathBuf};

use mora::{one_line_failure, Env};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

#[test]
fn peft_adapters_over_decoders_give_transformers_and_peft_greedy_ids_at_each_scale() {
    let env = Env::with_daemon("lora-gen");
    for adapter in ["llama-tf5-peft", "qwen2-tf5-peft"] {
        let dir = fixtures().join("lora").join(adapter);
        let reference = read_json(&dir.join("lora.json"));
        let base = fixtures().join(reference["base"].as_str().unwrap());
        for case in reference["cases"].as_array().unwrap() {
            let scale = case["scale"].as_f64().unwrap();
            let wf = env.workflow(
                &format!("{adapter}-{scale}.toml"),
                &format!(
                    "name = \"lora\"\n[models.m]\npath = {:?}\n[[steps]]\nname = \"s\"\ntask = \"generate\"\nmodel = \"m\"\nprompt = {}\nmax_tokens = {}\nloras = [{{ path = {:?}, scale = {scale} }}]\noutput = \"s.json\"\n",
                    base.display().to_string(),
                    reference["prompt"],
                    reference["max_tokens"],
                    dir.display().to_string(),
                ),
            );
            for (run, extra) in [("daemon", &[][..]), ("no-cache", &["--no-cache"][..])] {
                let out_dir = format!("{adapter}-{scale}-{run}");
                let out = env.exec(&wf, &out_dir, extra);
                assert!(out.status.success(), "{adapter} x{scale} ({run}): {}", String::from_utf8_lossy(&out.stderr));
                let doc = read_json(&env.scratch.join(&out_dir).join("s.json"));
                assert_eq!(ids(&doc["token_ids"]), ids(&case["ids"]), "{adapter} x{scale} ({run}): greedy ids differ from transformers + PEFT {}", reference["peft_version"]);
                assert_ne!(ids(&doc["token_ids"]), ids(&reference["base_ids"]), "{adapter} x{scale}: the adapter changed nothing");
                assert_eq!(doc["loras"][0]["format"], "PEFT", "{doc}");
                assert_eq!(doc["loras"][0]["scale"], scale, "{doc}");
            }
        }
    }
}

/// An SD 1.5 image workflow on the fixture pipeline, with `loras` as given.
fn image_workflow(env: &Env, file: &str, loras: &str) -> PathBuf {
    env.workflow(
        file,
        &format!(
            "name = \"lora-image\"\n[models.sd]\npath = {:?}\n[[steps]]\nname = \"cat\"\ntask = \"image\"\nmodel = \"sd\"\nprompt = \"a photo of a cat\"\nsteps = 2\nwidth = 16\nheight = 16\nseed = 5\n{loras}output = \"cat.png\"\n",
            fixtures().join("image/pipelines/sd15").display().to_string(),
        ),
    )
}

#[test]
fn image_steps_apply_diffusers_and_kohya_loras_without_touching_the_shared_base() {
    let env = Env::with_daemon("lora-image");
    let lora = fixtures().join("lora");
    let run = |file: &str, loras: &str, out_dir: &str, extra: &[&str]| -> (Vec<u8>, serde_json::Value) {
        let wf = image_workflow(&env, file, loras);
        let out = env.exec(&wf, out_dir, extra);
        assert!(out.status.success(), "{file} {out_dir}: {}", String::from_utf8_lossy(&out.stderr));
        let dir = env.scratch.join(out_dir);
        (std::fs::read(dir.join("cat.png")).unwrap(), read_json(&dir.join("cat.json")))
    };
    let (plain, plain_doc) = run("plain.toml", "", "plain", &[]);
    assert!(plain_doc.get("loras").is_none(), "{plain_doc}");
    let both = format!(
        "loras = [{{ path = {:?}, scale = 0.8 }}, {{ path = {:?}, weight_name = \"lora.safetensors\", scale = 0.5 }}]\n",
        lora.join("sd15-diffusers").display().to_string(),
        lora.join("sd15-kohya").display().to_string(),
    );
    let (with, doc) = run("both.toml", &both, "both", &[]);
    assert_ne!(with, plain, "two adapters changed nothing");
    let recorded: Vec<(String, f64)> = doc["loras"].as_array().unwrap().iter().map(|l| (l["format"].as_str().unwrap().to_string(), l["scale"].as_f64().unwrap())).collect();
    assert_eq!(recorded, vec![("diffusers".to_string(), 0.8), ("Kohya".to_string(), 0.5)], "{doc}");
    // Each adapter is a cache entry of its own, held once: the second run
    // on them finds them resident.
    let (_, again_doc) = run("both.toml", &both, "both-again", &[]);
    assert_eq!(again_doc["loras"], doc["loras"]);
    let ps = env.ps();
    for file in ["sd15-diffusers/pytorch_lora_weights.safetensors", "sd15-kohya/lora.safetensors"] {
        let entry = ps.iter().find(|m| m["name"].as_str().is_some_and(|n| n.ends_with(file))).unwrap_or_else(|| panic!("no entry for {file} in {ps:?}"));
        assert!(entry["hits"].as_u64().unwrap() >= 1, "{entry}");
    }
    // The same adapters with --no-cache give the same bytes.
    let (again, _) = run("both.toml", &both, "both-no-cache", &["--no-cache"]);
    assert_eq!(again, with, "--no-cache differs from the warm run");
    // The base was only read: a run without adapters after them, on the
    // same resident weights, gives the first picture again.
    let (after, _) = run("plain.toml", "", "plain-after", &[]);
    assert_eq!(after, plain, "the adapters' run changed the resident base");
    // A model's default `loras` applies to its steps.
    let wf = env.workflow(
        "default.toml",
        &format!(
            "name = \"d\"\n[models.sd]\npath = {:?}\n{}[[steps]]\nname = \"cat\"\ntask = \"image\"\nmodel = \"sd\"\nprompt = \"a photo of a cat\"\nsteps = 2\nwidth = 16\nheight = 16\nseed = 5\noutput = \"cat.png\"\n",
            fixtures().join("image/pipelines/sd15").display().to_string(),
            both
        ),
    );
    let out = env.exec(&wf, "default", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(env.scratch.join("default/cat.png")).unwrap(), with, "a model's default loras are not the step's");
}

#[test]
fn adapters_that_do_not_fit_fail_in_check_and_run_with_one_line_naming_the_file() {
    let env = Env::with_daemon("lora-refused");
    let lora = fixtures().join("lora");
    let bad = env.scratch.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    // A decoder's PEFT adapter on an image step.
    let peft = format!("loras = [{{ path = {:?} }}]\n", lora.join("llama-tf5-peft").display().to_string());
    // A file that is no adapter.
    std::fs::write(bad.join("notes.safetensors"), b"not safetensors").unwrap();
    let garbage = format!("loras = [{{ path = {:?} }}]\n", bad.join("notes.safetensors").display().to_string());
    // A missing path.
    let missing = format!("loras = [{{ path = {:?} }}]\n", bad.join("missing").display().to_string());
    for (name, loras, want) in [
        ("peft", peft.as_str(), "adapter_model.safetensors: a PEFT adapter of a single model does not apply to the pipeline"),
        ("garbage", garbage.as_str(), "notes.safetensors: not a safetensors file"),
        ("missing", missing.as_str(), "missing"),
    ] {
        let wf = image_workflow(&env, &format!("{name}.toml"), loras);
        let check = env.command("mora-exec").arg("check").arg(&wf).output().unwrap();
        let line = one_line_failure(&check);
        assert!(line.contains("step `cat`") && line.contains(want), "check, {name}: {line}");
        let run = one_line_failure(&env.exec(&wf, name, &[]));
        assert!(run.contains(want), "run, {name}: {run}");
    }
    // A Kohya SD LoRA on a decoder, and keys a workflow cannot hold.
    let wf = env.workflow(
        "gen.toml",
        &format!(
            "name = \"g\"\n[models.m]\npath = {:?}\n[[steps]]\nname = \"s\"\ntask = \"generate\"\nmodel = \"m\"\nprompt = \"hi\"\nloras = [{{ path = {:?} }}]\noutput = \"s.json\"\n",
            fixtures().join("golden/llama-tf5").display().to_string(),
            lora.join("sd15-kohya/lora.safetensors").display().to_string()
        ),
    );
    let line = one_line_failure(&env.command("mora-exec").arg("check").arg(&wf).output().unwrap());
    assert!(line.contains("lora.safetensors: a Kohya adapter of a pipeline's components"), "{line}");
    let wf = image_workflow(&env, "both-keys.toml", "loras = [{ path = \"a\", repo = \"o/n\" }]\n");
    let line = one_line_failure(&env.command("mora-exec").arg("check").arg(&wf).output().unwrap());
    assert!(line.contains("gives both `repo` and `path`"), "{line}");
    let wf = image_workflow(&env, "typo.toml", "loras = [{ path = \"a\", scael = 0.5 }]\n");
    let line = one_line_failure(&env.command("mora-exec").arg("check").arg(&wf).output().unwrap());
    assert!(line.contains("scael"), "{line}");
}
