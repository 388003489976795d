//! Where a run's time goes: with `MORA_PHASES=1`, `mora-exec run` prints on
//! stderr, as it exits, how long each phase took (parsing the workflow,
//! connecting, the acquire, mapping, the tokenizer, building the model,
//! inference, writing outputs). Each phase ends where [`mark`] is called
//! and began where the previous one ended; without the variable, a mark
//! costs one load of a flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();
static MARKS: Mutex<Vec<(&'static str, Instant)>> = Mutex::new(Vec::new());

/// Starts the clock if `MORA_PHASES` is set (call first thing in `main`).
pub fn start() {
    if std::env::var_os("MORA_PHASES").is_some_and(|v| !v.is_empty() && v != "0") {
        let _ = START.set(Instant::now());
        ENABLED.store(true, Ordering::Relaxed);
    }
}

/// The phase called `name` ends now.
pub fn mark(name: &'static str) {
    if ENABLED.load(Ordering::Relaxed) {
        MARKS.lock().unwrap_or_else(|e| e.into_inner()).push((name, Instant::now()));
    }
}

/// Each phase and its duration, in order, phases of one name added up (a
/// workflow with two models acquires twice); `None` unless enabled.
pub fn summary() -> Option<Vec<(&'static str, Duration)>> {
    let start = *START.get()?;
    let marks = MARKS.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<(&'static str, Duration)> = Vec::new();
    let mut last = start;
    for &(name, at) in marks.iter() {
        let d = at.saturating_duration_since(last);
        last = at;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some(p) => p.1 += d,
            None => out.push((name, d)),
        }
    }
    Some(out)
}

/// `phases: parse 0.41 ms, connect 0.20 ms, ... (total 31.2 ms in main)`.
pub fn report() -> Option<String> {
    let phases = summary()?;
    let total: Duration = phases.iter().map(|p| p.1).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let list: Vec<String> = phases.iter().map(|(n, d)| format!("{n} {:.2} ms", ms(*d))).collect();
    Some(format!("phases: {} (total {:.2} ms in main)", list.join(", "), ms(total)))
}
