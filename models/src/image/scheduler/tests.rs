//! Parity with diffusers on the fixtures of
//! `tests/fixtures/image/schedulers/` (written by
//! `scripts/golden/make_scheduler_fixtures.py`, which documents the run
//! they record), and the config handling. Each scheduler module runs the
//! fixtures of its classes with the helpers here
//! ([`matches_diffusers_fixtures`], [`sigmas_match_diffusers_fixtures`]);
//! the tests here are those of what every scheduler shares.
//!
//! Tolerance: a value matches when it is within `TOL * (1 + scale)` of
//! diffusers', `scale` being the mean absolute value of the tensor for
//! elements, its sum of absolute values for sums, and the value itself
//! for scalars. Both sides compute in float32; what differs is the order
//! of a few float32 operations and torch's vectorized `linspace`, which
//! gives a few betas one unit in the last place apart.

use super::*;
use candle_core::{DType, Device};
use serde_json::json;
use std::path::PathBuf;

const TOL: f64 = 1e-5;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/image/schedulers")
}

fn formula(f: impl Fn(f64) -> f64) -> Tensor {
    let v: Vec<f32> = (0..256).map(|k| f(k as f64) as f32).collect();
    Tensor::from_vec(v, (1, 4, 8, 8), &Device::Cpu).unwrap()
}

fn latent() -> Tensor {
    formula(|k| (0.377 * k + 0.5).cos() * 1.1)
}

fn image_latent() -> Tensor {
    formula(|k| (0.291 * k).sin() * 0.8)
}

fn noise(d: usize) -> Tensor {
    formula(|k| (0.731 * k + 1.37 * d as f64 + 0.2).sin() * 1.4)
}

fn fake_unet(x: &Tensor, t: f64) -> Tensor {
    (x * 0.1).unwrap().affine(1.0, (t / 100.0).sin()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(|v| v as f64).collect()
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Compares a tensor with a fixture record (full values or stats);
/// returns the largest absolute difference and fails past the tolerance.
fn check(what: &str, got: &Tensor, want: &Value) -> (f64, f64) {
    let v = values(got);
    let mean_abs = |v: &[f64]| v.iter().map(|x| x.abs()).sum::<f64>() / v.len() as f64;
    let mut worst = (0f64, 0f64);
    if let Some(full) = want.as_array() {
        let want: Vec<f64> = full.iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(want.len(), v.len(), "{what}: length");
        let scale = mean_abs(&want);
        for (k, (a, b)) in v.iter().zip(&want).enumerate() {
            let d = (a - b).abs();
            assert!(d <= TOL * (1.0 + scale), "{what}[{k}]: {a} vs diffusers {b}");
            worst = (worst.0.max(d), worst.1.max(d / (1.0 + scale)));
        }
    } else {
        let first = nums(&want["first"]);
        let abs_sum = want["abs_sum"].as_f64().unwrap();
        let scale = abs_sum / 256.0;
        for (k, (a, b)) in v.iter().zip(&first).enumerate() {
            let d = (a - b).abs();
            assert!(d <= TOL * (1.0 + scale), "{what}: value {k} is {a}, diffusers {b}");
            worst = (worst.0.max(d), worst.1.max(d / (1.0 + scale)));
        }
        let sum: f64 = v.iter().sum();
        let want_sum = want["sum"].as_f64().unwrap();
        assert!((sum - want_sum).abs() <= TOL * (1.0 + abs_sum), "{what}: sum {sum} vs diffusers {want_sum}");
        let got_abs: f64 = v.iter().map(|x| x.abs()).sum();
        assert!((got_abs - abs_sum).abs() <= TOL * (1.0 + abs_sum), "{what}: abs sum {got_abs} vs {abs_sum}");
    }
    worst
}

fn close(what: &str, a: f64, b: f64) {
    assert!((a - b).abs() <= TOL * (1.0 + b.abs()), "{what}: {a} vs diffusers {b}");
}

/// Every fixture of `tests/fixtures/image/schedulers/`, parsed, in file name order.
fn fixtures() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files.iter().map(|file| serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()).collect()
}

fn fixture(case: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir().join(format!("{case}.json"))).unwrap()).unwrap()
}

#[test]
fn every_fixture_is_one_a_scheduler_module_runs() {
    // Each scheduler module runs the fixtures of its classes
    // (`matches_diffusers_fixtures`): together, all of them.
    let fixtures = fixtures();
    assert!(fixtures.len() >= 43, "fixtures missing: {}", fixtures.len());
    for fx in fixtures {
        let class = fx["class"].as_str().unwrap();
        assert!(Class::parse(class).is_some_and(|c| c.name() == class), "{}: class {class}", fx["case"]);
    }
}

/// Steps every fixture whose class is one of `classes` as diffusers did,
/// and checks each recorded value; prints each case's largest difference.
pub(super) fn matches_diffusers_fixtures(classes: &[Class]) {
    let mut report = Vec::new();
    for fx in fixtures().into_iter().filter(|fx| classes.iter().any(|c| c.name() == fx["class"].as_str().unwrap())) {
        let case = fx["case"].as_str().unwrap().to_string();
        let spec = SchedulerSpec::from_json(fx["config"].as_object().unwrap(), "scheduler_config.json", fx["override"].as_str())
            .unwrap_or_else(|e| panic!("{case}: {e}"))
            .with_eta(fx["eta"].as_f64().unwrap());
        assert_eq!(spec.class_name(), fx["class"].as_str().unwrap(), "{case}");
        let mut worst = (0f64, 0f64);
        let worse = |w: &mut (f64, f64), c: (f64, f64)| *w = (w.0.max(c.0), w.1.max(c.1));
        for run in fx["runs"].as_array().unwrap() {
            let steps = run["steps"].as_u64().unwrap() as usize;
            let what = format!("{case} at {steps} steps");
            if run.get("error").is_some() {
                assert!(spec.build(steps).is_err(), "{what}: diffusers fails, Mora must refuse");
                continue;
            }
            let mut s = spec.build(steps).unwrap();
            // Whole timesteps match exactly; fractional ones (Karras and
            // exponential sigmas) within a float32 rounding or two.
            let want = nums(&run["timesteps"]);
            assert_eq!(s.timesteps().len(), want.len(), "{what}: timesteps {:?}", s.timesteps());
            for (a, b) in s.timesteps().iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{what}: timesteps {:?} vs {want:?}", s.timesteps());
            }
            close(&format!("{what}: init_noise_sigma"), s.init_noise_sigma(), run["init_noise_sigma"].as_f64().unwrap());
            assert_eq!(s.order() as u64, run["order"].as_u64().unwrap(), "{what}: order");
            let mut sample = (latent() * s.init_noise_sigma()).unwrap();
            let mut draws = 0usize;
            let record = run["record"].as_array().unwrap();
            assert_eq!(record.len(), s.timesteps().len(), "{what}: number of steps");
            for (i, rec) in record.iter().enumerate() {
                let t = s.timesteps()[i];
                let model_in = s.scale_model_input(&sample, i).unwrap();
                if rec["scaled"].is_null() {
                    // Recorded only where diffusers' scale_model_input is not the identity.
                    assert!(values(&model_in) == values(&sample), "{what}, step {i}: scaled input");
                } else {
                    worse(&mut worst, check(&format!("{what}, step {i}: scaled input"), &model_in, &rec["scaled"]));
                }
                let out = fake_unet(&model_in, t);
                sample = s
                    .step(&out, i, &sample, &mut |shape: &Shape| {
                        assert_eq!(shape.dims(), &[1, 4, 8, 8]);
                        draws += 1;
                        Ok(noise(draws - 1))
                    })
                    .unwrap();
                worse(&mut worst, check(&format!("{what}, step {i}: sample"), &sample, &rec["prev"]));
            }
            assert_eq!(draws as u64, run["draws"].as_u64().unwrap(), "{what}: noise draws");
            worse(&mut worst, check(&format!("{what}: final sample"), &sample, &run["final"]));
        }
        for run in fx["img2img"].as_array().unwrap() {
            let steps = run["steps"].as_u64().unwrap() as usize;
            let what = format!("{case} img2img at {steps} steps");
            let mut s = spec.build(steps).unwrap();
            let start = img2img_start(steps, run["strength"].as_f64().unwrap(), s.order());
            assert_eq!(start as u64, run["start"].as_u64().unwrap(), "{what}: start");
            let mut sample = s.add_noise(&image_latent(), &noise(1000), start).unwrap();
            worse(&mut worst, check(&format!("{what}: add_noise"), &sample, &run["noised"]));
            let mut draws = 0usize;
            for i in start..s.timesteps().len() {
                let model_in = s.scale_model_input(&sample, i).unwrap();
                let out = fake_unet(&model_in, s.timesteps()[i]);
                sample = s
                    .step(&out, i, &sample, &mut |_: &Shape| {
                        draws += 1;
                        Ok(noise(draws - 1))
                    })
                    .unwrap();
            }
            assert_eq!(draws as u64, run["draws"].as_u64().unwrap(), "{what}: noise draws");
            worse(&mut worst, check(&format!("{what}: final sample"), &sample, &run["final"]));
        }
        report.push(format!("{case}: max abs diff {:.2e}, relative {:.2e}", worst.0, worst.1));
    }
    assert!(!report.is_empty(), "no fixture for {classes:?}");
    println!("{}", report.join("\n"));
}

/// Checks the sigmas `sigmas` gives for each fixture of `cases` (each of
/// one of `classes`) against diffusers'.
pub(super) fn sigmas_match_diffusers_fixtures(
    cases: &[&str],
    classes: &[Class],
    sigmas: impl Fn(&SchedulerSpec, usize) -> Vec<f32>,
) {
    for case in cases {
        let fx = fixture(case);
        let spec = SchedulerSpec::from_json(fx["config"].as_object().unwrap(), "c.json", fx["override"].as_str()).unwrap();
        assert!(classes.contains(&spec.class), "{case}: {}", spec.class_name());
        for run in fx["runs"].as_array().unwrap() {
            let steps = run["steps"].as_u64().unwrap() as usize;
            let want = nums(&run["sigmas"]);
            let got: Vec<f64> = sigmas(&spec, steps).into_iter().map(|v| v as f64).collect();
            assert_eq!(got.len(), want.len(), "{case}");
            for (a, b) in got.iter().zip(&want) {
                close(&format!("{case} at {steps} steps: sigma"), *a, *b);
            }
        }
    }
}

fn sd15() -> Value {
    json!({
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
        "clip_sample": false
    })
}

fn with(base: Value, extra: Value) -> Map<String, Value> {
    let mut m = base.as_object().unwrap().clone();
    for (k, v) in extra.as_object().unwrap() {
        m.insert(k.clone(), v.clone());
    }
    m
}

fn refused(m: &Map<String, Value>, class: Option<&str>, key: &str) {
    let e = SchedulerSpec::from_json(m, "unet-x/scheduler/scheduler_config.json", class)
        .err()
        .unwrap_or_else(|| panic!("`{key}` accepted"))
        .to_string();
    assert!(e.starts_with("unet-x/scheduler/scheduler_config.json: "), "{e}");
    assert!(e.contains(&format!("`{key}`")), "{key} not named: {e}");
    assert!(!e.contains('\n'), "not one line: {e}");
}

#[test]
fn what_is_not_implemented_is_refused_naming_the_key() {
    let ddim = || with(sd15(), json!({"_class_name": "DDIMScheduler"}));
    let euler = || with(sd15(), json!({"_class_name": "EulerDiscreteScheduler"}));
    let unipc = || with(sd15(), json!({"_class_name": "UniPCMultistepScheduler"}));
    let set = |mut m: Map<String, Value>, k: &str, v: Value| {
        m.insert(k.into(), v);
        m
    };
    // PNDM without skip_prk_steps (its default) runs Runge-Kutta warm-up
    // steps, which need 4 steps at least.
    let mut no_skip = sd15().as_object().unwrap().clone();
    no_skip.remove("skip_prk_steps");
    let prk = SchedulerSpec::from_json(&no_skip, "s.json", None).unwrap();
    assert!(prk.build(3).is_err());
    assert_eq!(prk.build(4).unwrap().timesteps().len(), 13);
    let on = || set(ddim(), "thresholding", json!(true));
    refused(&set(on(), "dynamic_thresholding_ratio", json!(1.5)), None, "dynamic_thresholding_ratio");
    refused(&set(on(), "sample_max_value", json!("big")), None, "sample_max_value");
    refused(&set(ddim(), "beta_schedule", json!("sigmoid")), None, "beta_schedule");
    refused(&set(ddim(), "beta_schedule", json!("laplace")), Some("euler"), "beta_schedule");
    refused(&set(ddim(), "beta_schedule", json!("quadratic")), Some("ddpm"), "beta_schedule");
    refused(&set(ddim(), "timestep_spacing", json!("uniform")), None, "timestep_spacing");
    refused(&set(ddim(), "prediction_type", json!("flow_prediction")), None, "prediction_type");
    refused(&set(sd15().as_object().unwrap().clone(), "prediction_type", json!("sample")), None, "prediction_type");
    refused(&set(ddim(), "prediction_type", json!("sample")), Some("euler_a"), "prediction_type");
    let karras_beta = set(set(unipc(), "use_karras_sigmas", json!(true)), "use_beta_sigmas", json!(true));
    refused(&karras_beta, None, "use_beta_sigmas");
    let both = set(set(euler(), "use_karras_sigmas", json!(true)), "use_exponential_sigmas", json!(true));
    refused(&both, None, "use_exponential_sigmas");
    refused(&set(euler(), "interpolation_type", json!("cubic")), None, "interpolation_type");
    refused(&set(euler(), "final_sigmas_type", json!("max")), None, "final_sigmas_type");
    refused(&set(euler(), "timestep_type", json!("other")), None, "timestep_type");
    refused(&set(ddim(), "variance_type", json!("learned_range")), Some("ddpm"), "variance_type");
    refused(&set(ddim(), "variance_type", json!("fixed_large_log")), Some("ddpm"), "variance_type");
    refused(&set(unipc(), "solver_p", json!({"x": 1})), None, "solver_p");
    refused(&set(unipc(), "use_flow_sigmas", json!(true)), None, "use_flow_sigmas");
    refused(&set(unipc(), "use_dynamic_shifting", json!(true)), None, "use_dynamic_shifting");
    refused(&set(unipc(), "shift_terminal", json!(0.02)), None, "shift_terminal");
    refused(&set(unipc(), "solver_order", json!(4)), None, "solver_order");
    refused(&set(unipc(), "solver_type", json!("bh3")), None, "solver_type");
    refused(&set(unipc(), "solver_type", json!("bh1")), None, "solver_type");
    refused(&set(unipc(), "predict_x0", json!(false)), None, "predict_x0");
    let bh1 = set(set(unipc(), "solver_type", json!("bh1")), "final_sigmas_type", json!("sigma_min"));
    assert!(SchedulerSpec::from_json(&bh1, "s.json", None).is_ok());
    refused(&set(ddim(), "trained_betas", json!([0.1, 0.2])), None, "trained_betas");
    refused(&set(ddim(), "num_train_timesteps", json!("many")), None, "num_train_timesteps");
    // A key no diffusers scheduler reads may be one a newer diffusers
    // added to this class: refused rather than ignored.
    refused(&set(ddim(), "frobnicate", json!(1)), None, "frobnicate");
    refused(&set(ddim(), "frobnicate", json!(1)), Some("euler"), "frobnicate");
}

#[test]
fn keys_of_other_classes_are_ignored_as_diffusers_does() {
    // SD 1.5's PNDM config carries DDIM's clip_sample; Karras sigmas
    // mean nothing to PNDM, but are refused once Euler is chosen.
    let m = with(sd15(), json!({"use_beta_sigmas": true, "use_karras_sigmas": true, "solver_order": 7}));
    assert_eq!(SchedulerSpec::from_json(&m, "s.json", None).unwrap().class_name(), "PNDMScheduler");
    refused(&m, Some("euler"), "use_beta_sigmas");
    // Keys the chosen class takes are honoured: SD 1.5's clip_sample
    // false reaches DDIM, which defaults to true.
    let ddim = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some("ddim")).unwrap();
    assert_eq!(ddim.clip, None);
    let clip = with(sd15(), json!({"clip_sample": true, "clip_sample_range": 2.5}));
    assert_eq!(SchedulerSpec::from_json(&clip, "s.json", Some("ddim")).unwrap().clip, Some(2.5));
    // Defaults are the new class's: Euler spaces timesteps with linspace.
    let e = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some("euler")).unwrap();
    assert_eq!(e.build(4).unwrap().timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    let p = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", None).unwrap();
    assert_eq!(p.build(4).unwrap().timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
}

#[test]
fn class_names_short_names_and_overrides() {
    let m = sd15();
    let m = m.as_object().unwrap();
    for (name, class) in [
        ("pndm", "PNDMScheduler"),
        ("ddim", "DDIMScheduler"),
        ("euler", "EulerDiscreteScheduler"),
        ("euler_ancestral", "EulerAncestralDiscreteScheduler"),
        ("euler_a", "EulerAncestralDiscreteScheduler"),
        ("ddpm", "DDPMScheduler"),
        ("unipc", "UniPCMultistepScheduler"),
        ("UniPCMultistepScheduler", "UniPCMultistepScheduler"),
        ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
    ] {
        let s = SchedulerSpec::from_json(m, "s.json", Some(name)).unwrap();
        assert_eq!(s.class_name(), class);
        assert_eq!(s.prediction_type(), "epsilon");
    }
    let e = SchedulerSpec::from_json(m, "s.json", Some("DPMSolverMultistepScheduler")).unwrap_err().to_string();
    assert!(e.starts_with("s.json: ") && e.contains("DPMSolverMultistepScheduler"), "{e}");
    for name in ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DDPMScheduler", "UniPCMultistepScheduler", "euler_a", "unipc"] {
        assert!(e.contains(name), "{name} not listed: {e}");
    }
    let other = with(sd15(), json!({"_class_name": "LMSDiscreteScheduler"}));
    let e = SchedulerSpec::from_json(&other, "s.json", None).unwrap_err().to_string();
    assert!(e.contains("LMSDiscreteScheduler") && e.contains("EulerDiscreteScheduler"), "{e}");
    let mut none = m.clone();
    none.remove("_class_name");
    assert!(SchedulerSpec::from_json(&none, "s.json", None).is_err());
    assert_eq!(SchedulerSpec::from_json(&none, "s.json", Some("ddim")).unwrap().class_name(), "DDIMScheduler");
    let v = with(sd15(), json!({"prediction_type": "v_prediction"}));
    assert_eq!(SchedulerSpec::from_json(&v, "s.json", Some("euler")).unwrap().prediction_type(), "v_prediction");
}

#[test]
fn zero_steps_and_too_many_steps_are_refused() {
    for class in ["pndm", "ddim", "euler", "euler_a", "ddpm", "unipc"] {
        let s = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some(class)).unwrap();
        assert!(s.build(0).is_err(), "{class}");
        assert!(s.build(1).is_ok(), "{class}");
    }
    let s = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some("ddim")).unwrap();
    assert!(s.build(1001).is_err());
    // Leading spacing with steps_offset 1 reaches timestep 1000 at 1000 steps.
    assert!(s.build(999).is_ok());
    for class in ["pndm", "ddim", "ddpm"] {
        let s = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some(class)).unwrap();
        assert!(s.build(1000).err().unwrap().to_string().contains("timestep 1000"), "{class}");
    }
}

#[test]
fn half_precision_samples_stay_half_and_close() {
    // Steps compute in float32 and return the sample's dtype.
    for class in ["pndm", "ddim", "euler", "euler_a", "ddpm", "unipc"] {
        let spec = SchedulerSpec::from_json(sd15().as_object().unwrap(), "s.json", Some(class)).unwrap();
        let run = |dtype: DType| {
            let mut s = spec.build(10).unwrap();
            let mut x = (latent() * s.init_noise_sigma()).unwrap().to_dtype(dtype).unwrap();
            let mut d = 0usize;
            for i in 0..s.timesteps().len() {
                let m = s.scale_model_input(&x, i).unwrap();
                assert_eq!(m.dtype(), dtype);
                let out = fake_unet(&m.to_dtype(DType::F32).unwrap(), s.timesteps()[i]).to_dtype(dtype).unwrap();
                x = s
                    .step(&out, i, &x, &mut |_: &Shape| {
                        d += 1;
                        noise(d).to_dtype(dtype)
                    })
                    .unwrap();
                assert_eq!(x.dtype(), dtype);
            }
            values(&x.to_dtype(DType::F32).unwrap())
        };
        let (full, half) = (run(DType::F32), run(DType::F16));
        let scale = full.iter().map(|v| v.abs()).sum::<f64>() / full.len() as f64;
        let worst = full.iter().zip(&half).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(worst < 2e-2 * (1.0 + scale), "{class}: f16 off by {worst} (scale {scale})");
    }
}

#[test]
fn img2img_start_follows_get_timesteps() {
    assert_eq!(img2img_start(20, 0.6, 1), 8);
    assert_eq!(img2img_start(4, 0.6, 1), 2);
    assert_eq!(img2img_start(50, 0.75, 1), 13);
    assert_eq!(img2img_start(10, 1.0, 1), 0);
    assert_eq!(img2img_start(10, 1.5, 1), 0);
    assert_eq!(img2img_start(10, 0.0, 1), 10);
    assert_eq!(img2img_start(10, 0.3, 2), 14);
}

#[test]
fn file_and_json_errors_name_the_file() {
    let e = SchedulerSpec::from_file(Path::new("/nonexistent/scheduler_config.json"), None).unwrap_err();
    assert_eq!(e.file, "/nonexistent/scheduler_config.json");
    let d = mora_test_support::Scratch::new("sched");
    let path = d.join("scheduler_config.json");
    std::fs::write(&path, serde_json::to_vec(&sd15()).unwrap()).unwrap();
    let s = SchedulerSpec::from_file(&path, Some("euler_a")).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(s.class_name(), "EulerAncestralDiscreteScheduler");
}
