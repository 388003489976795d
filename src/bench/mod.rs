//! The benchmark harness (`scripts/bench.sh`, `cargo bench --bench mora`):
//! nine scenarios that time whole processes as a user runs them, each
//! contender against a baseline measured in the same run with the runs
//! interleaved (A B A B ...), so that machine drift falls on all of them
//! alike. Figures are medians over repeats with min and max beside them;
//! targets are reported next to the figures, never asserted.
//!
//! The harness writes a Markdown report (`docs/benchmarks.md`) and a PNG chart
//! of the headline comparison. `tests/bench_smoke.rs` runs it in its smoke
//! configuration (tiny models, few repeats) so that it keeps working.

mod chart;
mod images;
mod loras;
mod proc;
mod python;
pub use python::peer_python;
mod scenarios;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to run and where to write.
#[derive(Clone, Debug)]
pub struct Config {
    /// Scenario numbers (1..=9) to run, in order.
    pub scenarios: Vec<u32>,
    /// Repeats of each measurement (scenario 1 uses `runs` instead).
    pub repeats: usize,
    /// Scenario 1: runs of the workflow per contender.
    pub runs: usize,
    /// Scenario 2: synthetic bf16 llama sizes (`mora-exec synth --size`).
    pub model_sizes: Vec<String>,
    /// Scenario 2: time both segment fills (`pwrite` and the mapping) side
    /// by side, not only the one the daemon chooses on this machine.
    pub compare_fills: bool,
    /// Scenario 4: numbers of concurrent clients.
    pub clients: Vec<usize>,
    /// Scenario 5: sequential runs.
    pub soak_runs: usize,
    /// Scenario 6: small models resident at the end.
    pub many_models: usize,
    /// Scenario 6: acquires timed per number of models.
    pub acquires: usize,
    /// Scenario 7: the synthetic SD 1.5 pipeline's size (`mora-exec synth --arch sd15 --size`).
    pub image_pipeline: String,
    /// Scenarios 7 and 8: the side of the square image, in pixels.
    pub image_side: usize,
    /// Scenario 8: repeats of each image run and of each component's forward.
    pub image_repeats: usize,
    /// Scenario 8: the latent sides the components are timed at.
    pub image_latents: Vec<usize>,
    /// Scenario 8: the diffusers-written pipeline in small shapes (smoke runs).
    pub image_peer_tiny: bool,
    /// Where synthetic models are written and kept between runs.
    pub model_dir: PathBuf,
    /// The Markdown report; the chart goes beside it with the extension `png`.
    pub report: PathBuf,
    /// The command line to print in the report, so that anyone can rerun it.
    pub command: String,
}

impl Config {
    /// The full configuration (`scripts/bench.sh`).
    pub fn full() -> Config {
        Config {
            scenarios: vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            repeats: 5,
            runs: 20,
            model_sizes: vec!["100MiB".into(), "1GiB".into(), "4GiB".into()],
            compare_fills: false,
            clients: vec![1, 4, 8, 16, 32],
            soak_runs: 500,
            many_models: 50,
            acquires: 400,
            image_pipeline: "1900MiB".into(),
            image_side: 256,
            image_repeats: 3,
            image_latents: vec![32, 64],
            image_peer_tiny: false,
            model_dir: crate::root().join(".mora-bench").join("models"),
            report: crate::root().join("docs").join("benchmarks.md"),
            command: "scripts/bench.sh".into(),
        }
    }

    /// A configuration that exercises every scenario in seconds, for CI.
    pub fn smoke(dir: &std::path::Path) -> Config {
        Config {
            scenarios: vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            repeats: 2,
            runs: 2,
            model_sizes: vec!["2MiB".into(), "4MiB".into()],
            compare_fills: true,
            clients: vec![1, 2],
            soak_runs: 3,
            many_models: 3,
            acquires: 10,
            image_pipeline: "24MiB".into(),
            image_side: 64,
            image_repeats: 2,
            image_latents: vec![8],
            image_peer_tiny: true,
            model_dir: dir.join("models"),
            report: dir.join("benchmarks.md"),
            command: "scripts/bench.sh --smoke".into(),
        }
    }

    pub fn chart_path(&self) -> PathBuf {
        self.report.with_extension("png")
    }
}

/// Median, min and max of a set of samples (milliseconds, bytes, ...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Stats { median, min: v[0], max: v[n - 1], n }
    }
}

/// One way of doing the job, timed by its own closure: the closure does any
/// setup it needs (evict a page cache, clear a daemon) and returns the time of
/// the part that counts.
pub struct Contender<'a> {
    pub name: String,
    pub run: Box<dyn FnMut() -> Result<Duration, String> + 'a>,
}

impl<'a> Contender<'a> {
    pub fn new(name: impl Into<String>, run: impl FnMut() -> Result<Duration, String> + 'a) -> Contender<'a> {
        Contender { name: name.into(), run: Box::new(run) }
    }

    /// A contender that times `f` whole.
    pub fn timed(name: impl Into<String>, mut f: impl FnMut() -> Result<(), String> + 'a) -> Contender<'a> {
        Contender::new(name, move || {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed())
        })
    }
}

/// Samples of each contender in milliseconds, in the contenders' order.
pub struct Measured {
    pub names: Vec<String>,
    pub samples: Vec<Vec<f64>>,
}

impl Measured {
    pub fn stats(&self, i: usize) -> Stats {
        Stats::of(&self.samples[i])
    }

    /// Median of contender `i` over the median of contender 0 (the baseline).
    pub fn ratio(&self, i: usize) -> f64 {
        self.stats(i).median / self.stats(0).median
    }
}

/// Runs every contender once to warm up (not counted), then `repeats` rounds
/// of one run each, in turn: A B C A B C ...
pub fn interleave(contenders: &mut [Contender], repeats: usize) -> Result<Measured, String> {
    for c in contenders.iter_mut() {
        (c.run)().map_err(|e| format!("{} (warm-up): {e}", c.name))?;
    }
    let mut samples = vec![Vec::with_capacity(repeats); contenders.len()];
    for _ in 0..repeats {
        for (i, c) in contenders.iter_mut().enumerate() {
            let d = (c.run)().map_err(|e| format!("{}: {e}", c.name))?;
            samples[i].push(d.as_secs_f64() * 1e3);
        }
    }
    Ok(Measured { names: contenders.iter().map(|c| c.name.clone()).collect(), samples })
}

/// A goal from the issue, reported next to the figure it is about.
#[derive(Clone, Debug)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub actual: String,
    pub met: bool,
}

impl Target {
    /// `actual <= goal` (a ratio or a drift).
    pub fn at_most(what: &str, actual: f64, goal: f64) -> Target {
        Target { what: what.into(), goal: format!("≤ {}", fmt_ratio(goal)), actual: fmt_ratio(actual), met: actual <= goal }
    }

    /// A goal that is not a ratio ("unchanged"), judged by the caller.
    pub fn judged(what: &str, goal: &str, actual: String, met: bool) -> Target {
        Target { what: what.into(), goal: goal.into(), actual, met }
    }

    /// `actual >= goal`.
    pub fn at_least(what: &str, actual: f64, goal: f64) -> Target {
        Target { what: what.into(), goal: format!("≥ {}", fmt_ratio(goal)), actual: fmt_ratio(actual), met: actual >= goal }
    }

    fn verdict(&self) -> &'static str {
        if self.met {
            "met"
        } else {
            "MISSED"
        }
    }
}

/// A table: a header row and rows of cells.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(caption: &str, header: &[&str]) -> Table {
        Table { caption: caption.into(), header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    /// Rows for every contender of `m`: median, min, max and the ratio to the
    /// baseline (contender 0), with `extra` cells appended per contender.
    pub fn timing_rows(&mut self, m: &Measured, label: &str, mut extra: impl FnMut(usize) -> Vec<String>) {
        for i in 0..m.names.len() {
            let s = m.stats(i);
            let mut cells = Vec::new();
            if !label.is_empty() {
                cells.push(label.to_string());
            }
            cells.push(m.names[i].clone());
            cells.extend([fmt_ms(s.median), fmt_ms(s.min), fmt_ms(s.max), if i == 0 { "1 (baseline)".into() } else { fmt_ratio(m.ratio(i)) }]);
            cells.extend(extra(i));
            self.row(cells);
        }
    }

    fn markdown(&self, out: &mut String) {
        if !self.caption.is_empty() {
            let _ = writeln!(out, "{}\n", self.caption);
        }
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let _ = writeln!(out, "|{}", self.header.iter().map(|_| "---|").collect::<String>());
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out.push('\n');
    }

    fn plain(&self, out: &mut String) {
        let cols = self.header.len();
        let mut width = vec![0; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        if !self.caption.is_empty() {
            let _ = writeln!(out, "{}", self.caption);
        }
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let line: Vec<String> = r.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
            let _ = writeln!(out, "  {}", line.join("  ").trim_end());
        }
        out.push('\n');
    }
}

/// What one scenario found.
#[derive(Clone, Debug, Default)]
pub struct Section {
    pub title: String,
    pub about: String,
    pub tables: Vec<Table>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Section {
    /// The section, its heading followed by `provenance` (which run wrote it).
    fn markdown(&self, out: &mut String, provenance: &str) {
        let _ = writeln!(out, "## {}\n\n{provenance}\n\n{}\n", self.title, self.about);
        for t in &self.tables {
            t.markdown(out);
        }
        if !self.targets.is_empty() {
            let mut t = Table::new("", &["target", "goal", "measured", ""]);
            for g in &self.targets {
                t.row(vec![g.what.clone(), g.goal.clone(), g.actual.clone(), g.verdict().into()]);
            }
            t.markdown(out);
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
    }

    fn plain(&self) -> String {
        let mut out = format!("== {}\n", self.title);
        for t in &self.tables {
            t.plain(&mut out);
        }
        for g in &self.targets {
            let _ = writeln!(out, "  target: {} {} -> {} [{}]", g.what, g.goal, g.actual, g.verdict());
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out
    }
}

/// Figures the chart draws (the headline comparisons).
#[derive(Clone, Debug, Default)]
pub struct Headline {
    /// Scenario 1: (contender, median ms per run).
    pub repeat: Vec<(String, f64)>,
    /// Scenario 2: (model size, warm median ms, no-cache median ms).
    pub first_token: Vec<(String, f64, f64)>,
}

/// Everything a run found.
#[derive(Default)]
pub struct Report {
    pub sections: Vec<Section>,
    pub headline: Headline,
}

/// Runs the configured scenarios, printing each section as it completes, then
/// writes the report and the chart.
pub fn run(config: &Config) -> Result<Report, String> {
    std::fs::create_dir_all(&config.model_dir).map_err(|e| format!("create {}: {e}", config.model_dir.display()))?;
    let started = now_utc();
    let t0 = Instant::now();
    let mut report = Report::default();
    for &n in &config.scenarios {
        eprintln!("mora-bench: scenario {n} ...");
        let section = match n {
            1 => scenarios::repeat(config, &mut report.headline)?,
            2 => scenarios::model_size(config, &mut report.headline)?,
            3 => scenarios::cross_workflow(config)?,
            4 => scenarios::concurrency(config)?,
            5 => scenarios::soak(config)?,
            6 => scenarios::many_models(config)?,
            7 => images::images(config)?,
            8 => images::against_torch(config)?,
            9 => loras::loras(config)?,
            other => return Err(format!("there is no scenario {other} (scenarios are 1 to 9)")),
        };
        print!("{}", section.plain());
        report.sections.push(section);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    if let Some(dir) = config.report.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let old = std::fs::read_to_string(&config.report).ok();
    // The chart shows scenarios 1 and 2 side by side: a run of only one of
    // them keeps the chart an earlier run drew rather than draw half of it.
    let chart = config.chart_path();
    let whole_chart = [1, 2].iter().all(|n| config.scenarios.contains(n));
    let drawn = (whole_chart || !chart.exists()) && chart::draw(&report.headline, &chart)?;
    let numbers: Vec<String> = config.scenarios.iter().map(u32::to_string).collect();
    let provenance = format!(
        "*Written by `{}` on {started} ({elapsed:.0} s for {} {}){}: {}.*",
        config.command,
        if numbers.len() == 1 { "section" } else { "sections" },
        numbers.join(", "),
        if drawn { "; the chart above is from this run" } else { "" },
        machine()
    );
    let fresh: Vec<(u32, String)> = config
        .scenarios
        .iter()
        .zip(&report.sections)
        .map(|(&n, s)| {
            let mut md = String::new();
            s.markdown(&mut md, &provenance);
            (n, md)
        })
        .collect();
    let image = drawn.then(|| chart.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default());
    let every = (1..=9).all(|n| config.scenarios.contains(&n));
    let md = assemble(old.as_deref(), &fresh, every, image.as_deref());
    std::fs::write(&config.report, md).map_err(|e| format!("write {}: {e}", config.report.display()))?;
    eprintln!("mora-bench: wrote {}", config.report.display());
    Ok(report)
}

/// The head of a report written from scratch; each section then says which
/// run wrote it.
const HEAD: &str = "# Benchmarks\n\n\
    Each section says which run wrote it, on which machine. Every figure times whole processes, \
    spawn to exit, as a user runs them, unless its table says otherwise. Contenders of one table \
    run interleaved (A B A B ...) after one warm-up run each; figures are the median over the \
    repeats, with min and max beside; the ratio is each contender's median over the baseline's \
    (first row). Targets are the goals of the project, reported, not asserted. The analysis after \
    the figures is written by hand and kept when the harness rewrites this file.\n\n";

/// The scenario a `## N. Title` heading starts, if the line is one.
fn scenario_heading(line: &str) -> Option<u32> {
    line.strip_prefix("## ")?.split_once(". ")?.0.parse().ok()
}

/// The report: the `fresh` sections (scenario number, Markdown) in place of
/// the old report's, the old report's other sections kept, so that running
/// some scenarios rewrites only theirs; its head (with the chart's image
/// line) kept unless `every` scenario ran; its hand-written tail from
/// [`KEPT`] on kept. `image` is the chart's file name when this run drew it.
fn assemble(old: Option<&str>, fresh: &[(u32, String)], every: bool, image: Option<&str>) -> String {
    let old = old.unwrap_or("");
    let (figures, kept) = match old.find(KEPT) {
        Some(i) => (&old[..i], &old[i..]),
        None => (old, KEPT),
    };
    let mut head = String::new();
    let mut sections: Vec<(u32, String)> = Vec::new();
    for line in figures.split_inclusive('\n') {
        if let Some(n) = scenario_heading(line) {
            sections.push((n, String::new()));
        }
        match sections.last_mut() {
            Some((_, text)) => text.push_str(line),
            None => head.push_str(line),
        }
    }
    if every || sections.is_empty() {
        head = HEAD.to_string();
    }
    if let Some(name) = image {
        if !head.contains(&format!("]({name})")) {
            let _ = writeln!(head, "![Headline comparisons: scenario 1 and 2]({name})\n");
        }
    }
    sections.retain(|(n, _)| !fresh.iter().any(|(f, _)| f == n));
    sections.extend(fresh.iter().cloned());
    sections.sort_by_key(|(n, _)| *n);
    let mut md = head;
    for (_, text) in &sections {
        md.push_str(text);
    }
    md.push_str(kept);
    md
}

/// The last line a process printed on stderr, for a one-line error.
fn last_line(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("failed with no message").trim().to_string()
}

/// Everything from this line on in an existing report is written by hand and
/// kept when the harness rewrites the figures above it.
pub const KEPT: &str = "<!-- Written by hand below this line: the harness keeps it when it rewrites the figures above. -->\n";

/// `12.3 ms`, `1.23 s`.
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if ms >= 1_000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// `0.42x`, `0.031x`.
pub fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}x")
    } else if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

/// `86.6 MiB`, as the rest of Mora prints sizes.
pub fn fmt_bytes(b: f64) -> String {
    mora_common::units::human_bytes(b.max(0.0) as u64)
}

/// CPU model, cores, memory and kernel, from /proc.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_string();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kib = crate::kib_field(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default(), "MemTotal:");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // The setting in brackets, e.g. "always within_size advise [never] deny force".
    let shmem_thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .ok()
        .and_then(|s| s.split('[').nth(1).and_then(|r| r.split(']').next()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{cpu}, {cores} cores available, {} memory, Linux {}, transparent huge pages for shared memory: `{shmem_thp}` \
         (see the analysis), no GPU used (CPU path)",
        fmt_bytes((mem_kib * 1024) as f64),
        kernel.trim()
    )
}

/// The date and time in UTC, `2026-11-23 04:28 UTC`, from the system clock.
fn now_utc() -> String {
    utc(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = mora_common::units::civil_from_days(days);
    format!("{y}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_counts() {
        assert_eq!(Stats::of(&[3.0, 1.0, 2.0]), Stats { median: 2.0, min: 1.0, max: 3.0, n: 3 });
        assert_eq!(Stats::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn interleave_runs_contenders_in_turn_after_one_warm_up_each() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut cs = vec![
            Contender::new("a", || {
                order.borrow_mut().push('a');
                Ok(Duration::from_millis(10))
            }),
            Contender::new("b", || {
                order.borrow_mut().push('b');
                Ok(Duration::from_millis(5))
            }),
        ];
        let m = interleave(&mut cs, 3).unwrap();
        drop(cs);
        assert_eq!(order.into_inner().into_iter().collect::<String>(), "abababab");
        assert_eq!(m.samples[0], vec![10.0; 3]);
        assert_eq!(m.ratio(1), 0.5);
    }

    #[test]
    fn a_failing_contender_names_itself() {
        let mut cs = vec![Contender::new("flaky", || Err("boom".to_string()))];
        assert_eq!(interleave(&mut cs, 1).err().unwrap(), "flaky (warm-up): boom");
    }

    #[test]
    fn targets_compare_the_right_way() {
        assert!(Target::at_most("x", 0.4, 0.5).met);
        assert!(!Target::at_most("x", 0.6, 0.5).met);
        assert!(Target::at_least("x", 0.9, 0.8).met);
        assert!(!Target::at_least("x", 0.7, 0.8).met);
    }

    #[test]
    fn a_run_of_some_scenarios_rewrites_only_theirs() {
        let old = format!(
            "# Benchmarks\n\nhand-edited head\n\n![chart](benchmarks.png)\n\n\
             ## 1. Repeat\n\nold one\n\n## 2. Size\n\nold two\n\n## 5. Soak\n\nold five\n\n{KEPT}\n## Analysis\n\nby hand\n"
        );
        let fresh = vec![(1, "## 1. Repeat\n\nnew one\n\n".to_string()), (4, "## 4. Many\n\nnew four\n\n".to_string())];
        let md = assemble(Some(&old), &fresh, false, None);
        assert!(md.starts_with("# Benchmarks\n\nhand-edited head\n\n![chart](benchmarks.png)\n\n## 1. Repeat\n\nnew one"), "{md}");
        let order: Vec<u32> = md.lines().filter_map(scenario_heading).collect();
        assert_eq!(order, [1, 2, 4, 5]);
        assert!(md.contains("old two") && md.contains("old five") && md.contains("new four"));
        assert!(!md.contains("old one"));
        assert!(md.ends_with(&format!("{KEPT}\n## Analysis\n\nby hand\n")));
    }

    #[test]
    fn a_run_of_every_scenario_or_a_new_report_gets_a_fresh_head_and_the_chart() {
        let fresh: Vec<(u32, String)> = (1..=7).map(|n| (n, format!("## {n}. S\n\nnew\n\n"))).collect();
        let old = format!("# Benchmarks\n\nstale head\n\n## 3. S\n\nold\n\n{KEPT}tail\n");
        let md = assemble(Some(&old), &fresh, true, Some("benchmarks.png"));
        assert!(md.starts_with(HEAD) && !md.contains("stale head") && !md.contains("old\n"));
        assert!(md.contains("](benchmarks.png)\n\n## 1. S"));
        assert!(md.ends_with(&format!("{KEPT}tail\n")));
        let md = assemble(None, &fresh[..1], false, None);
        assert!(md.starts_with(HEAD) && md.ends_with(KEPT));
        assert_eq!(md.lines().filter_map(scenario_heading).count(), 1);
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400 + 3_600 + 120), "2000-02-29 01:02 UTC");
        assert_eq!(utc(1_795_407_480), "2026-11-23 04:18 UTC");
    }

    #[test]
    fn figures_print_at_a_readable_precision() {
        assert_eq!(fmt_ms(3.04), "3.0 ms");
        assert_eq!(fmt_ms(123.4), "123 ms");
        assert_eq!(fmt_ms(1234.0), "1.23 s");
        assert_eq!(fmt_ratio(0.0312), "0.031x");
        assert_eq!(fmt_bytes(90_868_376.0), "86.7 MiB");
    }
}
