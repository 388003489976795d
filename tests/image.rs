//! The image task end to end, on the tiny pipelines diffusers itself wrote
//! (tests/fixtures/image/pipelines: SD 1.5, 2.1 and XL shapes): the same
//! PNG bytes cold, warm and with `--no-cache`; image to image; components
//! held once however many pipelines share them; every bad input one line,
//! with the daemon serving on.

use std::path::{Path, PathBuf};

use mora::{one_line_failure, root, Env};

fn fixture(name: &str) -> PathBuf {
    let dir = root().join("tests/fixtures/image/pipelines").join(name);
    assert!(dir.join("model_index.json").is_file(), "fixture pipeline {} is missing", dir.display());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A workflow of image steps on the pipeline at `dir` (model `sd`).
fn workflow(env: &Env, file: &str, dir: &Path, steps: &str) -> PathBuf {
    env.workflow(file, &format!("name = \"img\"\n[models.sd]\npath = {:?}\n{steps}", dir.display().to_string()))
}

const ONE_STEP: &str = "[[steps]]\nname = \"cat\"\nmodel = \"sd\"\ntask = \"image\"\nprompt = \"a photo of a cat, watercolor\"\nnegative_prompt = \"blurry\"\nsteps = 3\nseed = 7\noutput = \"cat.png\"\n";

fn run_ok(env: &Env, wf: &Path, out: &str, extra: &[&str]) -> String {
    let o = env.exec(wf, out, extra);
    assert!(o.status.success(), "{out}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn sidecar(p: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&read(p)).unwrap()
}

#[test]
fn every_shape_gives_the_same_png_cold_warm_and_without_cache() {
    let env = Env::with_daemon("image-3runs");
    for name in ["sd15", "sd21", "sdxl"] {
        let dir = fixture(name);
        let wf = workflow(&env, &format!("{name}.toml"), &dir, ONE_STEP);
        let cold = run_ok(&env, &wf, &format!("{name}-cold"), &[]);
        assert!(cold.contains("cold"), "{name}: {cold}");
        let warm = run_ok(&env, &wf, &format!("{name}-warm"), &[]);
        assert!(warm.contains("warm") && !warm.contains("cold"), "{name}: {warm}");
        run_ok(&env, &wf, &format!("{name}-nocache"), &["--no-cache"]);
        let png = |run: &str| read(env.scratch.join(format!("{name}-{run}/cat.png")));
        let first = png("cold");
        assert_eq!(&first[1..4], b"PNG", "{name}");
        assert_eq!(first, png("warm"), "{name}: a warm run drew another picture");
        assert_eq!(first, png("nocache"), "{name}: --no-cache drew another picture");
        // The picture is not flat: the networks ran.
        let doc = sidecar(env.scratch.join(format!("{name}-cold/cat.json")));
        assert_eq!(doc["seed"], 7, "{doc}");
        assert_eq!(doc["steps"], 3, "{doc}");
        assert_eq!(doc["prompt"], "a photo of a cat, watercolor");
        assert!(doc["scheduler"].as_str().unwrap().ends_with("Scheduler"), "{doc}");
        let components: Vec<&str> = doc["components"].as_array().unwrap().iter().map(|c| c["component"].as_str().unwrap()).collect();
        let want: &[&str] = if name == "sdxl" { &["text_encoder", "text_encoder_2", "unet", "vae"] } else { &["text_encoder", "unet", "vae"] };
        assert_eq!(components, want, "{name}");
        assert!(first.len() > 100, "{name}: {} bytes", first.len());
    }
    // Each component is its own entry, named after its folder.
    let names = env.resident_names();
    let unet = fixture("sdxl").join("unet").display().to_string();
    assert!(names.contains(&unet), "{names:?}");
    assert_eq!(names.len(), 3 + 3 + 4, "{names:?}");
}

#[test]
fn another_seed_draws_another_picture_and_several_images_are_numbered() {
    let env = Env::with_daemon("image-seeds");
    let dir = fixture("sd15");
    let wf = workflow(&env, "seeds.toml", &dir, &ONE_STEP.replace("seed = 7", "seed = 7\nimages = 2"));
    run_ok(&env, &wf, "two", &[]);
    let one = read(env.scratch.join("two/cat-1.png"));
    let two = read(env.scratch.join("two/cat-2.png"));
    assert_ne!(one, two, "seeds 7 and 8 drew the same picture");
    assert_eq!(sidecar(env.scratch.join("two/cat-2.json"))["seed"], 8);
    // Image 1 of two is the single image of the same seed.
    let single = workflow(&env, "single.toml", &dir, ONE_STEP);
    run_ok(&env, &single, "single", &[]);
    assert_eq!(read(env.scratch.join("single/cat.png")), one);
}

#[test]
fn image_to_image_starts_from_an_earlier_step_or_a_file() {
    let env = Env::with_daemon("image-img2img");
    let dir = fixture("sd15");
    let steps = format!(
        "{ONE_STEP}[[steps]]\nname = \"again\"\nmodel = \"sd\"\ntask = \"image\"\nprompt = \"a cat in the snow\"\ninit_image = \"{{{{ steps.cat }}}}\"\nstrength = 0.5\nsteps = 4\nseed = 1\noutput = \"again.png\"\n"
    );
    let wf = workflow(&env, "i2i.toml", &dir, &steps);
    let out = run_ok(&env, &wf, "warm", &[]);
    assert!(out.contains("already held by this run"), "{out}");
    run_ok(&env, &wf, "nocache", &["--no-cache"]);
    let again = read(env.scratch.join("warm/again.png"));
    assert_eq!(again, read(env.scratch.join("nocache/again.png")));
    assert_ne!(again, read(env.scratch.join("warm/cat.png")));
    let doc = sidecar(env.scratch.join("warm/again.json"));
    // As diffusers: PNDM has 5 timesteps for 4 steps; strength 0.5 starts at index 2.
    assert_eq!((doc["strength"].as_f64(), doc["denoising_steps"].as_u64()), (Some(0.5), Some(3)), "{doc}");
    // From a file: the first step's picture, copied next to the workflow.
    std::fs::copy(env.scratch.join("warm/cat.png"), env.scratch.join("start.png")).unwrap();
    let from_file = steps.replace("{{ steps.cat }}", "start.png");
    let wf = workflow(&env, "i2i-file.toml", &dir, &from_file);
    run_ok(&env, &wf, "file", &[]);
    assert_eq!(read(env.scratch.join("file/again.png")), again);
}

#[test]
fn components_shared_by_two_pipelines_are_held_once() {
    let env = Env::with_daemon("image-shared");
    // Two pipelines, the second a copy of the first with its own scheduler:
    // every component with weights is the same bytes.
    let a = env.scratch.join("pipe-a");
    let b = env.scratch.join("pipe-b");
    copy_dir(&fixture("sd15"), &a);
    copy_dir(&fixture("sd15"), &b);
    let loaded = env.admin_ok(&["load", a.to_str().unwrap()]);
    assert_eq!(loaded.lines().count(), 3, "{loaded}");
    let bytes_one = env.resident_bytes();
    let steps = ONE_STEP.to_string() + &ONE_STEP.replace("name = \"cat\"", "name = \"dog\"").replace("model = \"sd\"", "model = \"other\"").replace("cat.png", "dog.png");
    let wf = env.workflow(
        "shared.toml",
        &format!("name = \"two\"\n[models.sd]\npath = {:?}\n[models.other]\npath = {:?}\n{steps}", a.display().to_string(), b.display().to_string()),
    );
    run_ok(&env, &wf, "out", &[]);
    let ps = env.ps();
    assert_eq!(ps.len(), 3, "{ps:?}");
    for entry in &ps {
        let names: Vec<&str> = entry["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
    assert_eq!(env.resident_bytes(), bytes_one);
    assert_eq!(read(env.scratch.join("out/cat.png")), read(env.scratch.join("out/dog.png")));
    // A pipeline's name selects its components.
    let evicted = env.admin_ok(&["evict", a.to_str().unwrap()]);
    assert!(env.ps().is_empty(), "{evicted}");
}

#[test]
fn a_pipeline_by_repo_id_reads_its_variant_where_a_folder_has_it() {
    let env = Env::with_daemon("image-variant");
    // A hub cache holding `org/pipe`: the SD 1.5-shaped fixture, its UNet only
    // as the fp16 variant (the same bytes), as diffusers' `variant="fp16"`
    // finds it: the variant where a folder has it, the plain files elsewhere.
    let hub = env.scratch.join("hub");
    let repo = hub.join("models--org--pipe");
    let snap = repo.join("snapshots").join("0123abcd");
    copy_dir(&fixture("sd15"), &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    let unet = snap.join("unet");
    std::fs::rename(unet.join("diffusion_pytorch_model.safetensors"), unet.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let by_repo = |file: &str, variant: &str| env.workflow(file, &format!("name = \"v\"\n[models.sd]\nrepo = \"org/pipe\"\n{variant}\n{ONE_STEP}"));
    let exec = |wf: &Path, out: &str| env.exec_command(wf, out).env("HF_HUB_CACHE", &hub).output().unwrap();
    let o = exec(&by_repo("variant.toml", "variant = \"fp16\""), "variant");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plain = workflow(&env, "plain.toml", &fixture("sd15"), ONE_STEP);
    run_ok(&env, &plain, "plain", &[]);
    assert_eq!(read(env.scratch.join("variant/cat.png")), read(env.scratch.join("plain/cat.png")));
    let names: Vec<String> = env.ps().iter().flat_map(|e| e["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect::<Vec<_>>()).collect();
    for part in ["org/pipe/text_encoder", "org/pipe/unet", "org/pipe/vae"] {
        assert!(names.iter().any(|n| n == part), "{part} not in {names:?}");
    }
    // Without the variant, the UNet's folder says what it holds; a variant
    // no folder holds is refused.
    let line = one_line_failure(&exec(&by_repo("plain-repo.toml", ""), "none"));
    assert!(line.contains("holds only the fp16 variant"), "{line}");
    let line = one_line_failure(&exec(&by_repo("bf16.toml", "variant = \"bf16\""), "bf16"));
    assert!(line.contains("holds no `bf16` variant"), "{line}");
}

#[test]
fn bad_inputs_each_give_one_line_and_leave_the_daemon_serving() {
    let mut env = Env::with_daemon("image-bad");
    let good = fixture("sd15");
    let step = |extra: &str| ONE_STEP.replace("steps = 3\n", &format!("steps = 3\n{extra}\n"));
    let fails = |name: &str, dir: &Path, steps: &str, needle: &str| {
        let wf = workflow(&env, &format!("{name}.toml"), dir, steps);
        let line = one_line_failure(&env.exec(&wf, name, &[]));
        assert!(line.contains(needle), "{name}: {line}");
    };
    fails("width", &good, &step("width = 36"), "`width` is 36: it must be a multiple of 8");
    fails("steps0", &good, &ONE_STEP.replace("steps = 3", "steps = 0"), "`steps` must be a whole number of at least 1");
    fails("strength", &good, &step("strength = 0.5"), "`strength` applies to image to image");
    fails("jpeg", &good, &ONE_STEP.replace("cat.png", "cat.jpg"), "must be a .png file");
    fails("scheduler", &good, &step("scheduler = \"NoSuchScheduler\""), "NoSuchScheduler");
    fails("init", &good, &step("init_image = \"missing.png\""), "missing.png");

    let broken = |name: &str, edit: &dyn Fn(&Path)| {
        let dir = env.scratch.join(name);
        copy_dir(&good, &dir);
        edit(&dir);
        dir
    };
    let no_vae = broken("no-vae", &|d| std::fs::remove_dir_all(d.join("vae")).unwrap());
    fails("no-vae", &no_vae, ONE_STEP, "vae");
    let kandinsky = broken("class", &|d| {
        let p = d.join("model_index.json");
        let text = std::fs::read_to_string(&p).unwrap().replace("StableDiffusionPipeline", "KandinskyPipeline");
        std::fs::write(p, text).unwrap();
    });
    fails("class", &kandinsky, ONE_STEP, "`_class_name` is `KandinskyPipeline`, which Mora does not run");
    let key = broken("key", &|d| {
        let p = d.join("unet/config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        v["class_embed_type"] = "timestep".into();
        std::fs::write(p, v.to_string()).unwrap();
    });
    // `check` refuses it too, naming the file and the key.
    let wf = workflow(&env, "key-check.toml", &key, ONE_STEP);
    let out = env.command("mora-exec").arg("check").arg(&wf).output().unwrap();
    let line = one_line_failure(&out);
    assert!(line.contains("unet/config.json") && line.contains("class_embed_type"), "{line}");
    let truncated = broken("truncated", &|d| {
        let p = d.join("unet/diffusion_pytorch_model.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();
    });
    fails("truncated", &truncated, ONE_STEP, "unet");
    // The daemon is still there, and a good run works.
    assert!(env.daemon_alive(), "the daemon died: {}", env.daemon_log());
    let wf = workflow(&env, "after.toml", &good, ONE_STEP);
    run_ok(&env, &wf, "after", &[]);
}

#[test]
fn synthetic_pipelines_of_every_shape_run_and_are_reproducible() {
    let env = Env::with_daemon("image-synth");
    for arch in ["sd15", "sd21", "sdxl"] {
        let dir = env.synth(arch, arch, "24MiB", 3);
        let again = env.synth(&format!("{arch}-again"), arch, "24MiB", 3);
        for part in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"] {
            assert_eq!(read(dir.join(part)), read(again.join(part)), "{arch} {part}: same seed, other bytes");
        }
        let steps = ONE_STEP.replace("steps = 3", "steps = 2\nwidth = 64\nheight = 64");
        let wf = workflow(&env, &format!("{arch}.toml"), &dir, &steps);
        run_ok(&env, &wf, &format!("{arch}-warm"), &[]);
        run_ok(&env, &wf, &format!("{arch}-nocache"), &["--no-cache"]);
        let png = read(env.scratch.join(format!("{arch}-warm/cat.png")));
        assert_eq!(png, read(env.scratch.join(format!("{arch}-nocache/cat.png"))), "{arch}");
        let doc = sidecar(env.scratch.join(format!("{arch}-warm/cat.json")));
        assert_eq!((doc["width"].as_u64(), doc["height"].as_u64()), (Some(64), Some(64)), "{doc}");
    }
    // Above the real shapes' size is refused, with the size it has.
    let out = std::process::Command::new(mora::bin("mora-exec"))
        .args(["synth", "--arch", "sd15", "--size", "64GiB", "-o"])
        .arg(env.scratch.join("too-big"))
        .output()
        .unwrap();
    assert!(one_line_failure(&out).contains("above this architecture's real size"));
}

#[test]
fn a_turbo_style_run_takes_one_step_without_guidance_and_another_scheduler() {
    let env = Env::with_daemon("image-turbo");
    for shape in ["sd21", "sdxl"] {
        let steps = ONE_STEP
            .replace("steps = 3", "steps = 1\nguidance_scale = 0.0\nscheduler = \"EulerAncestralDiscreteScheduler\"")
            .replace("negative_prompt = \"blurry\"\n", "");
        let wf = workflow(&env, &format!("{shape}.toml"), &fixture(shape), &steps);
        run_ok(&env, &wf, &format!("{shape}-warm"), &[]);
        run_ok(&env, &wf, &format!("{shape}-nocache"), &["--no-cache"]);
        let png = read(env.scratch.join(format!("{shape}-warm/cat.png")));
        assert_eq!(png, read(env.scratch.join(format!("{shape}-nocache/cat.png"))), "{shape}");
        let doc = sidecar(env.scratch.join(format!("{shape}-warm/cat.json")));
        assert_eq!(doc["scheduler"], "EulerAncestralDiscreteScheduler", "{doc}");
        assert_eq!((doc["guidance_scale"].as_f64(), doc["denoising_steps"].as_u64()), (Some(0.0), Some(1)), "{doc}");
    }
}
