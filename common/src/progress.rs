//! Showing a long load to the person waiting for it.
//!
//! On a terminal, one line redrawn in place (a bar, a percentage, bytes);
//! elsewhere (a log, a pipe), a single line when the wait begins, so logs
//! stay readable.

use std::io::{IsTerminal, Write};

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
    const WIDTH: usize = 24;
    let frac = if total == 0 { 1.0 } else { (done as f64 / total as f64).clamp(0.0, 1.0) };
    let filled = (frac * WIDTH as f64).round() as usize;
    format!(
        "{program}: loading {name} [{}{}] {:>3}%  {} / {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        (frac * 100.0).round() as u32,
        human_bytes(done),
        human_bytes(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_shows_fraction_and_bytes() {
        let line = render("mora-exec", "org/m", 512 << 20, 1 << 30);
        assert_eq!(line, "mora-exec: loading org/m [############............]  50%  512.0 MiB / 1.0 GiB");
        assert!(render("x", "m", 5, 0).contains("100%"));
        assert!(render("x", "m", 10, 5).contains("100%"), "clamped");
    }
}
