//! The Python package (python/): its pytest suite (python/tests), run against
//! the binaries of this build. The package is installed with the one
//! `pip install ./python` a user runs (scripts/python-env.sh): into
//! `.mora-test/python` with numpy, pytest and safetensors from PyPI, always;
//! and into the benchmarks' Python peer (`$MORA_BENCH_PYTHON`, else
//! `.mora-bench/python`, made by scripts/bench-python.sh) when it exists, to
//! run the torch, transformers and sentence-transformers recipes too. Without
//! that peer the torch tests are reported as skipped, with the reason.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Installs the package into `python`'s environment (None: the test venv);
/// returns the interpreter.
fn install(python: Option<&Path>) -> PathBuf {
    let mut cmd = Command::new(mora::root().join("scripts").join("python-env.sh"));
    if let Some(p) = python {
        cmd.arg(p);
    }
    let out = cmd.output().expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed (it needs python3 with venv and pip, and PyPI):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs python/tests with `python`; returns (passed, skipped, output).
/// With `record_skips`, each test pytest skipped goes to the skip log.
fn pytest(python: &Path, record_skips: bool) -> (usize, usize, String) {
    let bin_dir = mora::bin("mora-cache").parent().unwrap().to_path_buf();
    let path = std::env::join_paths(
        std::iter::once(bin_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let out = Command::new(python)
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "python/tests"])
        .current_dir(mora::root())
        .env("PATH", path)
        .env("HF_HUB_CACHE", mora::test_hub())
        .env("HF_HUB_OFFLINE", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("MORA_SOCKET")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run pytest");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python/tests failed with {}:\n{text}", python.display());
    // pytest's `-rs` lines, `SKIPPED [1] python/tests/test_torch.py:75: transformers is not installed`:
    // recorded for the run that should have every peer (the numpy-only run
    // skips the torch tests by design; they run in the peer).
    if record_skips {
        for line in text.lines().filter_map(|l| l.strip_prefix("SKIPPED ")) {
            let line = line.split_once("] ").map_or(line, |(_, rest)| rest);
            let (place, why) = line.split_once(": ").unwrap_or((line, "no reason given"));
            mora::skipped(&format!("python ({}): {place}", python.display()), why);
        }
    }
    let summary = text.lines().rev().find(|l| l.contains(" passed")).unwrap_or_else(|| panic!("no pytest summary:\n{text}"));
    let count = |word: &str| {
        summary
            .split(',')
            .find(|part| part.contains(word))
            .and_then(|part| part.split_whitespace().find_map(|w| w.parse::<usize>().ok()))
            .unwrap_or(0)
    };
    (count("passed"), count("skipped"), text)
}

#[test]
fn python_package_tests_pass_with_numpy_and_with_torch_where_installed() {
    let venv = install(None);
    let (passed, skipped, text) = pytest(&venv, false);
    println!("{text}");
    // Every test of test_client.py and test_run.py ran; only test_torch.py
    // and test_run.py's torch test may be skipped there (the test venv has no torch).
    assert!(passed >= 33, "only {passed} passed:\n{text}");
    assert!(skipped <= 2, "{skipped} skipped:\n{text}");

    let peer = mora::bench::peer_python();
    let has_torch = peer.is_file()
        && Command::new(&peer).args(["-c", "import torch, transformers, sentence_transformers"]).output().is_ok_and(|o| o.status.success());
    if !has_torch {
        mora::skipped(
            "python: the torch tests of python/tests",
            &format!(
                "no Python peer with torch, transformers and sentence-transformers at {} (scripts/bench-python.sh installs it)",
                peer.display()
            ),
        );
        return;
    }
    let peer = install(Some(&peer));
    let (with_torch, skipped, text) = pytest(&peer, true);
    println!("{text}");
    assert!(with_torch > passed, "torch tests did not run:\n{text}");
    // Only the no-GPU check skips itself, on a machine that has a GPU.
    assert!(skipped <= 1, "{skipped} skipped:\n{text}");
}
