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
    Some(format(&summary()?))
}

/// The line [`report`] prints for these phases; [`parse`] reads it back.
fn format(phases: &[(&str, Duration)]) -> String {
    let total: Duration = phases.iter().map(|p| p.1).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let list: Vec<String> = phases.iter().map(|(n, d)| format!("{n} {:.2} ms", ms(*d))).collect();
    format!("phases: {} (total {:.2} ms in main)", list.join(", "), ms(total))
}

/// Reads a line [`report`] printed (the benchmarks do): each phase's name
/// and milliseconds, and the total; `None` for any other line.
pub fn parse(line: &str) -> Option<(Vec<(String, f64)>, f64)> {
    let (list, total) = line.strip_prefix("phases: ")?.split_once(" (total ")?;
    let phase = |p: &str| {
        let (name, v) = p.strip_suffix(" ms")?.rsplit_once(' ')?;
        Some((name.to_string(), v.parse::<f64>().ok()?))
    };
    let phases = list.split(", ").map(phase).collect::<Option<Vec<_>>>()?;
    let total = total.strip_suffix(" ms in main)")?.parse().ok()?;
    Some((phases, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back() {
        let ms = Duration::from_micros;
        let line = format(&[("parse workflow", ms(540)), ("connect", ms(340)), ("build model", ms(12_000))]);
        assert_eq!(line, "phases: parse workflow 0.54 ms, connect 0.34 ms, build model 12.00 ms (total 12.88 ms in main)");
        let (list, total) = parse(&line).unwrap();
        assert_eq!(list, [("parse workflow".to_string(), 0.54), ("connect".to_string(), 0.34), ("build model".to_string(), 12.0)]);
        assert_eq!(total, 12.88);
        assert!(parse("mora-exec: wrote outputs/embeddings.json").is_none());
        assert!(parse("phases: connect x ms (total 1.00 ms in main)").is_none());
    }
}
