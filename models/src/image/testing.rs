//! Helpers the image modules' tests share: the fixture pipelines diffusers
//! wrote with their reference outputs, a relative closeness check, and
//! deterministic values for the kernels' tests. A leaf: it imports no other
//! image module, so that every test may import it.

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// The fixture pipelines diffusers wrote (scripts/golden/make_image_fixtures.py).
pub(crate) fn fixture_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/image/pipelines").join(name)
}

pub(crate) fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A `{"shape": [...], "data": [...]}` entry of reference.json.
pub(crate) fn ref_tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let data: Vec<f32> = v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Asserts max |got - want| <= tol * max |want| and returns that ratio.
pub(crate) fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let ratio = diff / scale;
    eprintln!("{what}: max |diff| = {diff:.3e}, max |ref| = {scale:.3}, ratio {ratio:.2e}");
    assert!(ratio <= tol, "{what}: max |diff| {diff} > {tol} * max |ref| {scale}");
    ratio
}

/// Relative tolerance of the parity tests: float32 on both sides, the
/// same operations in a different order. Measured ratios are about 1e-6;
/// the tanh GELU in place of the exact one gives 2.4e-4 on sd21.
pub(crate) const TOL: f32 = 1e-5;

/// Deterministic values in [-1, 1), for the kernels' tests.
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    crate::synth::uniform(n, seed, 1.0)
}
