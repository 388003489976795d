//! Showing a long load to the person waiting for it.
//!
//! On a terminal, one line redrawn in place (a bar, a percentage, bytes);
//! elsewhere (a log, a pipe), a single line when the wait begins, so logs
//! stay readable.

use std::io::{IsTerminal, Write};

use std::time::{Duration, Instant};

#[cfg(feature = "hub")]
use crate::hub::PullEvent;
use crate::units::human_bytes;

pub struct LoadProgress {
    program: &'static str,
    tty: bool,
    shown: bool,
}

impl LoadProgress {
    /// Reports on stderr, prefixed with `program`.
    pub fn new(program: &'static str) -> Self {
        LoadProgress { program, tty: std::io::stderr().is_terminal(), shown: false }
    }

    /// One progress report: `done` of `total` bytes of `name` loaded.
    pub fn update(&mut self, name: &str, done: u64, total: u64) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{}", render(self.program, name, done, total));
            let _ = err.flush();
        } else if !self.shown {
            let _ = writeln!(err, "{}: the cache daemon is loading {name} ({})", self.program, human_bytes(total));
        }
        self.shown = true;
    }

    /// Clears the redrawn line, if one was drawn.
    pub fn finish(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
        self.shown = false;
    }
}

impl Drop for LoadProgress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `mora-exec: loading NAME [########............]  40%  400.0 MiB / 1.0 GiB`
pub fn render(program: &str, name: &str, done: u64, total: u64) -> String {
    format!("{program}: loading {name} {}", bar(done, total))
}

/// `[########............]  40%  400.0 MiB / 1.0 GiB`
fn bar(done: u64, total: u64) -> String {
    const WIDTH: usize = 24;
    let frac = if total == 0 { 1.0 } else { (done as f64 / total as f64).clamp(0.0, 1.0) };
    let filled = (frac * WIDTH as f64).round() as usize;
    format!(
        "[{}{}] {:>3}%  {} / {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        (frac * 100.0).round() as u32,
        human_bytes(done),
        human_bytes(total)
    )
}

/// Shows a loop of `total` steps (the denoising of an image): on a terminal
/// one line redrawn after each step (a bar, k of n, the rate); elsewhere a
/// line after the first step, then at most one every 10 seconds, and the last.
pub struct StepProgress {
    program: &'static str,
    what: String,
    total: usize,
    tty: bool,
    start: Instant,
    last_line: Option<Instant>,
}

impl StepProgress {
    pub fn new(program: &'static str, what: impl Into<String>, total: usize) -> Self {
        StepProgress {
            program,
            what: what.into(),
            total,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last_line: None,
        }
    }

    /// Step `done` (1-based) has finished.
    pub fn step(&mut self, done: usize) {
        let line = render_steps(self.program, &self.what, done, self.total, self.start.elapsed());
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{line}");
            let _ = err.flush();
            self.last_line = Some(Instant::now());
        } else if done == self.total || self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            let _ = writeln!(err, "{line}");
            self.last_line = Some(Instant::now());
        }
    }

    /// Clears the redrawn line, if one was drawn.
    pub fn finish(&mut self) {
        if self.tty && self.last_line.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
        self.last_line = None;
    }
}

impl Drop for StepProgress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `mora-exec: denoising image 1 of 2 [######......]  12/20 steps, 1.85 steps/s`
pub fn render_steps(program: &str, what: &str, done: usize, total: usize, elapsed: Duration) -> String {
    const WIDTH: usize = 24;
    let frac = if total == 0 { 1.0 } else { (done as f64 / total as f64).clamp(0.0, 1.0) };
    let filled = (frac * WIDTH as f64).round() as usize;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 && done > 0 {
        let r = done as f64 / secs;
        if r >= 1.0 { format!("{r:.2} steps/s") } else { format!("{:.2} s/step", 1.0 / r) }
    } else {
        String::new()
    };
    format!("{program}: {what} [{}{}] {done}/{total} steps, {rate}", "#".repeat(filled), ".".repeat(WIDTH - filled))
}

/// Shows a pull: on a terminal one redrawn line per file being downloaded
/// (bar, bytes, rate, time left); elsewhere one line per file downloaded.
#[cfg(feature = "hub")]
pub struct PullProgress {
    program: &'static str,
    tty: bool,
    /// When the current download began, and the bytes it started from.
    current: Option<(Instant, u64)>,
}

#[cfg(feature = "hub")]
impl PullProgress {
    pub fn new(program: &'static str) -> Self {
        PullProgress { program, tty: std::io::stderr().is_terminal(), current: None }
    }

    pub fn event(&mut self, event: PullEvent) {
        let mut err = std::io::stderr().lock();
        match event {
            PullEvent::Listed { .. } | PullEvent::Cached { .. } => {}
            PullEvent::Started { name, size, from } => {
                self.current = Some((Instant::now(), from));
                if self.tty {
                    let _ = write!(err, "\r\x1b[K{}", render_download(self.program, name, from, size, None));
                } else if from > 0 {
                    let _ = writeln!(err, "{}: resuming {name} at {} of {}", self.program, human_bytes(from), human_bytes(size));
                }
            }
            PullEvent::Bytes { name, done, size } => {
                if self.tty {
                    let rate = self.current.and_then(|(t, from)| rate(done.saturating_sub(from), t.elapsed()));
                    let _ = write!(err, "\r\x1b[K{}", render_download(self.program, name, done, size, rate));
                }
            }
            PullEvent::Finished { name, size, downloaded, elapsed } => {
                if self.tty {
                    let _ = write!(err, "\r\x1b[K");
                }
                let speed = rate(downloaded, elapsed).map(|r| format!(", {}/s", human_bytes(r as u64))).unwrap_or_default();
                let _ = writeln!(
                    err,
                    "{}: pulled {name} ({}{}, {:.1} s{speed})",
                    self.program,
                    human_bytes(size),
                    if downloaded < size { format!(", {} downloaded", human_bytes(downloaded)) } else { String::new() },
                    elapsed.as_secs_f64()
                );
                self.current = None;
            }
        }
        let _ = err.flush();
    }
}

/// Bytes per second, once there is enough time to say.
#[cfg(feature = "hub")]
fn rate(bytes: u64, elapsed: Duration) -> Option<f64> {
    (elapsed >= Duration::from_millis(200)).then(|| bytes as f64 / elapsed.as_secs_f64())
}

/// `mora-cache: model.safetensors [####........]  33%  30.0 MiB / 90.0 MiB  12.0 MiB/s  ETA 5s`
pub fn render_download(program: &str, name: &str, done: u64, total: u64, rate: Option<f64>) -> String {
    let speed = match rate {
        Some(r) if r > 0.0 => {
            let eta = (total.saturating_sub(done) as f64 / r).ceil() as u64;
            format!("  {}/s  ETA {}", human_bytes(r as u64), clock(eta))
        }
        _ => String::new(),
    };
    format!("{program}: {name} {}{speed}", bar(done, total))
}

/// 5s, 3m07s, 2h05m.
fn clock(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_line_shows_the_bar_the_count_and_the_rate() {
        let line = render_steps("mora-exec", "denoising", 5, 20, Duration::from_secs(2));
        assert_eq!(line, "mora-exec: denoising [######..................] 5/20 steps, 2.50 steps/s");
        let slow = render_steps("mora-exec", "denoising", 1, 4, Duration::from_secs(3));
        assert!(slow.ends_with("1/4 steps, 3.00 s/step"), "{slow}");
    }

    #[test]
    fn bar_shows_fraction_and_bytes() {
        let line = render("mora-exec", "org/m", 512 << 20, 1 << 30);
        assert_eq!(line, "mora-exec: loading org/m [############............]  50%  512.0 MiB / 1.0 GiB");
        assert!(render("x", "m", 5, 0).contains("100%"));
        assert!(render("x", "m", 10, 5).contains("100%"), "clamped");
    }

    #[test]
    fn download_line_shows_rate_and_time_left() {
        let line = render_download("mora-cache", "model.safetensors", 30 << 20, 90 << 20, Some((12u64 << 20) as f64));
        assert_eq!(line, "mora-cache: model.safetensors [########................]  33%  30.0 MiB / 90.0 MiB  12.0 MiB/s  ETA 5s");
        assert!(!render_download("x", "f", 0, 10, None).contains("ETA"));
        assert_eq!(clock(187), "3m07s");
        assert_eq!(clock(7500), "2h05m");
    }
}
