//! The scenarios of the benchmark harness.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::proc::{drop_cached, open_fds, read_whole, segment_bytes, smaps, Memcpy, Smaps};
use super::python::Python;
use super::{fmt_bytes, fmt_ms, fmt_ratio, interleave, Config, Contender, Headline, Section, Stats, Table, Target};
use crate::{bin, embed_workflow, read_embeddings, root, Env};
use mora_common::segment::shared_memory_huge_pages;

const TEXTS: [&str; 2] = ["A man is eating food.", "A man is eating a piece of bread."];

/// Runs `cmd` to the end and returns what it printed; `Err` is the last line
/// it printed on stderr when it failed.
pub(super) fn run_output(cmd: &mut Command) -> Result<std::process::Output, String> {
    let o = cmd.stdin(Stdio::null()).output().map_err(|e| format!("spawn: {e}"))?;
    if o.status.success() {
        return Ok(o);
    }
    Err(super::last_line(&o.stderr))
}

/// Runs `cmd` to the end; `Err` is the last line it printed on stderr.
pub(super) fn run_ok(cmd: &mut Command) -> Result<(), String> {
    run_output(cmd).map(drop)
}

pub(super) fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A synthetic llama of `size` stored in `dtype` in the model directory,
/// written once (aside, then renamed) and reused by later runs: same seed,
/// same bytes.
fn synth_llama(config: &Config, size: &str, dtype: &str) -> Result<PathBuf, String> {
    synth_model(config, "llama", &format!("llama-{dtype}-{size}"), size, dtype, 7)
}

fn synth_model(config: &Config, arch: &str, name: &str, size: &str, dtype: &str, seed: u64) -> Result<PathBuf, String> {
    let dir = config.model_dir.join(name);
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    eprintln!("mora-bench: writing a synthetic {dtype} {arch} of {size} into {}", dir.display());
    let tmp = config.model_dir.join(format!("{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let seed = seed.to_string();
    run_ok(Command::new(bin("mora-exec")).args(["synth", "--arch", arch, "--dtype", dtype, "--seed", &seed, "--size", size, "-o"]).arg(&tmp))
        .map_err(|e| format!("synth {name}: {e}"))?;
    std::fs::rename(&tmp, &dir).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
    Ok(dir)
}

fn generate_workflow(llm: &Path, max_tokens: usize) -> String {
    format!(
        "name = \"generate\"\n[models.llm]\npath = {}\ndtype = \"f32\"\n\
         [[steps]]\nname = \"complete\"\ntask = \"generate\"\nmodel = \"llm\"\nprompt = \"the man is eating\"\n\
         max_tokens = {max_tokens}\noutput = \"generate.json\"\n",
        toml_str(llm)
    )
}

fn pipeline_workflow(llm: &Path) -> String {
    format!(
        "name = \"pipeline\"\n[models.minilm]\nrepo = \"sentence-transformers/all-MiniLM-L6-v2\"\n\
         [models.llm]\npath = {}\ndtype = \"f32\"\n\
         [[steps]]\nname = \"passages\"\ntask = \"embed\"\nmodel = \"minilm\"\ntexts_file = {}\n\
         [[steps]]\nname = \"question\"\ntask = \"embed\"\nmodel = \"minilm\"\ntexts = [\"What is the man eating?\"]\n\
         [[steps]]\nname = \"retrieve\"\ntask = \"rank\"\nquery = \"{{{{ steps.question }}}}\"\ncorpus = \"{{{{ steps.passages }}}}\"\ntop_k = 1\n\
         [[steps]]\nname = \"answer\"\ntask = \"generate\"\nmodel = \"llm\"\n\
         prompt = \"Context: {{{{ steps.retrieve.top }}}} Answer:\"\nmax_tokens = 8\noutput = \"answer.json\"\n",
        toml_str(llm),
        toml_str(&root().join("examples").join("corpus.txt"))
    )
}

fn min_cosine(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let n = |v: &[f64]| v.iter().map(|p| p * p).sum::<f64>().sqrt();
            dot / (n(x) * n(y))
        })
        .fold(f64::INFINITY, f64::min)
}

/// Scenario 1: the MiniLM embedding workflow, run after run.
pub fn repeat(config: &Config, headline: &mut Headline) -> Result<Section, String> {
    let env = Env::with_daemon("bench-repeat");
    let wf = env.workflow("embed.toml", &embed_workflow(&TEXTS));
    let mut notes = Vec::new();
    let python = Python::find();
    let mut worker = match &python {
        Ok(p) => match p.worker() {
            Ok(w) => Some(w),
            Err(e) => {
                notes.push(format!("skipped: python peer failed to start: {e}"));
                None
            }
        },
        Err(e) => {
            notes.push(format!("skipped: {e}"));
            None
        }
    };
    let m = {
        let mut cs = vec![
            Contender::timed("(b) mora-exec run --no-cache", || run_ok(env.exec_command(&wf, "out-b").arg("--no-cache"))),
            Contender::timed("(a) mora-exec run, warm daemon", || run_ok(&mut env.exec_command(&wf, "out-a"))),
        ];
        if let (Ok(p), Some(w)) = (&python, worker.as_mut()) {
            let (out_c, out_d) = (env.scratch.join("out-c.json"), env.scratch.join("out-d.json"));
            cs.push(Contender::timed("(c) python subprocess per run", move || p.once(&TEXTS, &out_c)));
            cs.push(Contender::timed("(d) python persistent worker", move || w.embed(&TEXTS, &out_d)));
        }
        interleave(&mut cs, config.runs)?
    };
    drop(worker);
    let mut table = Table::new(
        &format!("Per run, {} runs of each, interleaved; the embedding workflow of `examples/embed.toml` (2 texts).", config.runs),
        &["contender", "median", "min", "max", "vs --no-cache", "all runs"],
    );
    table.timing_rows(&m, "", |i| vec![fmt_ms(m.samples[i].iter().sum())]);
    let mut targets = vec![Target::at_most("warm run / --no-cache", m.ratio(1), 0.5)];
    let warm = m.stats(1).median;
    if m.names.len() == 4 {
        targets.push(Target::at_most("warm run / python subprocess per run", warm / m.stats(2).median, 0.05));
        targets.push(Target::at_most("warm run / persistent python worker", warm / m.stats(3).median, 1.2));
        notes.push(format!(
            "The persistent Python worker, the latency floor of a process that never exits, answers in {}; \
             a warm `mora-exec run` costs {} more ({}) for a fresh process per run.",
            fmt_ms(m.stats(3).median),
            fmt_ms(warm - m.stats(3).median),
            fmt_ratio(warm / m.stats(3).median)
        ));
        let mora = read_embeddings(&env.scratch.join("out-a").join("embeddings.json"));
        let py = read_embeddings(&env.scratch.join("out-c.json"));
        notes.push(format!("Mora's and sentence-transformers' embeddings agree: lowest cosine {:.6}.", min_cosine(&mora, &py)));
    }
    headline.repeat = m.names.iter().enumerate().map(|(i, n)| (n.clone(), m.stats(i).median)).collect();
    let breakdown = phases(&env, &wf, config.runs)?;
    Ok(Section {
        title: "1. Repeat one workflow".into(),
        about: "all-MiniLM-L6-v2 (f32, 86.7 MiB) embedding two texts, as (a) `mora-exec run` with a warm daemon, \
                (b) `mora-exec run --no-cache` (weights read in-process), (c) a Python process per run with \
                sentence-transformers, as users do today, and (d) a persistent Python worker with the model loaded \
                (a request over a pipe: the floor that process isolation costs against)."
            .into(),
        tables: vec![table, breakdown],
        targets,
        notes,
    })
}

/// Where a warm run's time goes: `runs` more warm runs with `MORA_PHASES=1`,
/// each phase's median, the time in `main`, and spawn to exit (the rest is
/// exec, dynamic linking and exit).
fn phases(env: &Env, wf: &Path, runs: usize) -> Result<Table, String> {
    let mut by_phase: Vec<(String, Vec<f64>)> = Vec::new();
    let (mut main, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let o = run_output(env.exec_command(wf, "out-phases").env("MORA_PHASES", "1"))?;
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        let stderr = String::from_utf8_lossy(&o.stderr);
        let (list, total) = stderr
            .lines()
            .find_map(mora_exec::phases::parse)
            .ok_or_else(|| format!("mora-exec printed no phases with MORA_PHASES=1: {}", super::last_line(&o.stderr)))?;
        for (name, ms) in list {
            match by_phase.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(ms),
                None => by_phase.push((name, vec![ms])),
            }
        }
        main.push(total);
    }
    let mut table = Table::new(
        &format!(
            "Where the warm run's time goes: {runs} more warm runs with `MORA_PHASES=1` (see the analysis), \
             each phase's median over the runs; the medians of the phases need not add up to the median in `main`."
        ),
        &["phase", "median", "min", "max"],
    );
    let mut row = |name: &str, v: Vec<f64>| {
        let s = Stats::of(&v);
        table.row(vec![name.to_string(), fmt_ms(s.median), fmt_ms(s.min), fmt_ms(s.max)]);
    };
    for (name, v) in by_phase {
        row(&name, v);
    }
    let outside: Vec<f64> = wall.iter().zip(&main).map(|(w, m)| w - m).collect();
    row("in `main`", main);
    row("exec, dynamic linking, exit (spawn to exit less `main`)", outside);
    row("spawn to exit", wall);
    Ok(table)
}

/// How a checkpoint is stored and what the daemon is asked to hold it in.
const LOADS: [(&str, &str, &str); 3] = [("bf16", "f32", "widened"), ("bf16", "bf16", "kept"), ("f32", "f32", "kept")];

/// Scenario 2: time to first token and cold loads against model size.
pub fn model_size(config: &Config, headline: &mut Headline) -> Result<Section, String> {
    let mut ttft = Table::new(
        "Time to first token: a generate workflow with `max_tokens = 1`, spawn to exit, bf16 weights held as f32.",
        &["model", "contender", "median", "min", "max", "vs --no-cache"],
    );
    // The fill the daemon chooses here (the mapping where shared memory may
    // get huge pages), and with --compare-fills the other one beside it.
    let huge = shared_memory_huge_pages();
    let chosen = if huge { ("mapped", "mapping") } else { ("written", "pwrite") };
    let fills = if config.compare_fills { vec![("written", "pwrite"), ("mapped", "mapping")] } else { vec![chosen] };
    let which_fills = if config.compare_fills {
        "Two daemons side by side (`--compare-fills`): one fills each segment with `pwrite` \
         (`MORA_SEGMENT_FILL=written`), one through a writable mapping from every core (`MORA_SEGMENT_FILL=mapped`); \
         the targets take the one the daemon chooses on this machine (the mapping where shared memory may get huge \
         pages)."
    } else if huge {
        "The daemon fills each segment as it chooses on this machine: through a writable mapping from every core, \
         since shared memory may get huge pages here (`--compare-fills` times `pwrite` beside it)."
    } else {
        "The daemon fills each segment as it chooses on this machine: with `pwrite`, since shared memory gets no \
         huge pages here (`--compare-fills` times the mapping beside it)."
    };
    let mut load = Table::new(
        &format!(
            "Loads: `mora-cache load --dtype HELD` timed spawn to exit, into a daemon that has just been cleared, \
             with the page cache dropped for the file before each read (`posix_fadvise(DONTNEED)`) or with the file \
             in it. {which_fills} Baselines: `read(2)` of the file into a reused 16 MiB buffer, and `memcpy` of as \
             many bytes between two buffers allocated beforehand. GB/s is the file's bytes over the time."
        ),
        &["model", "held as", "contender", "median", "min", "max", "GB/s", "vs raw read", "vs memcpy"],
    );
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    let mut memcpy = Memcpy::new(256 << 20);
    for (k, size) in config.model_sizes.iter().enumerate() {
        let dir = synth_llama(config, size, "bf16")?;
        let label = format!("{size} bf16");
        {
            let file = dir.join("model.safetensors");
            let bytes = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
            let budget = format!("{}MiB", (bytes * 5 / 2) >> 20);
            let env = Env::with_daemon_args("bench-size", &["--max-memory", &budget, "--keep-alive", "-1"]);
            let wf = env.workflow("generate.toml", &generate_workflow(&dir, 1));
            let m = interleave(
                &mut [
                    Contender::timed("--no-cache", || run_ok(env.exec_command(&wf, "out").arg("--no-cache"))),
                    Contender::timed("warm daemon", || run_ok(&mut env.exec_command(&wf, "out"))),
                ],
                config.repeats,
            )?;
            ttft.timing_rows(&m, &label, |_| vec![]);
            headline.first_token.push((label.clone(), m.stats(1).median, m.stats(0).median));
            if k == 1 || config.model_sizes.len() == 1 {
                targets.push(Target::at_most(&format!("{label}: warm time to first token / --no-cache"), m.ratio(1), 0.25));
            }
            if k + 1 == config.model_sizes.len() {
                notes.push(format!(
                    "The largest model ({label}, {} on disk) is {} resident as f32.",
                    fmt_bytes(bytes as f64),
                    fmt_bytes(env.resident_bytes() as f64)
                ));
            }
        }
        for (stored, held, how) in LOADS {
            let dir = synth_llama(config, size, stored)?;
            let file = dir.join("model.safetensors");
            let bytes = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
            let budget = format!("{}MiB", (bytes * 5 / 2) >> 20);
            let daemon = |fill: &str| {
                Env::with_daemon_env("bench-load", &["--max-memory", &budget, "--keep-alive", "-1"], &[("MORA_SEGMENT_FILL", fill)])
            };
            let daemons: Vec<Env> = fills.iter().map(|(fill, _)| daemon(fill)).collect();
            let dir_arg = dir.display().to_string();
            let daemon_load = |which: usize, cached: bool| {
                let (env, file, dir_arg) = (&daemons[which], &file, &dir_arg);
                move || -> Result<Duration, String> {
                    run_ok(env.command("mora-cache").arg("clear"))?;
                    if !cached {
                        drop_cached(file)?;
                    }
                    let t = Instant::now();
                    run_ok(env.command("mora-cache").args(["load", "--dtype", held, dir_arg.as_str()]))?;
                    let took = t.elapsed();
                    // One segment at a time: two daemons would not fit the largest twice.
                    run_ok(env.command("mora-cache").arg("clear"))?;
                    Ok(took)
                }
            };
            let raw_read = |cached: bool| {
                let file = &file;
                move || -> Result<Duration, String> {
                    if !cached {
                        drop_cached(file)?;
                    }
                    Ok(read_whole(file)?.0)
                }
            };
            let memcpy = &mut memcpy;
            // In order: the raw read and each daemon with the page cache
            // dropped, then the raw read, memcpy and each daemon with the file
            // in the page cache.
            let n = fills.len();
            let mut contenders = vec![Contender::new("raw read(2), page cache dropped", raw_read(false))];
            for (k, (_, fill)) in fills.iter().enumerate() {
                contenders.push(Contender::new(format!("daemon load ({fill}), page cache dropped"), daemon_load(k, false)));
            }
            contenders.push(Contender::new("raw read(2), file in page cache", raw_read(true)));
            contenders.push(Contender::new("memcpy", move || Ok(memcpy.time(bytes))));
            for (k, (_, fill)) in fills.iter().enumerate() {
                contenders.push(Contender::new(format!("daemon load ({fill}), file in page cache"), daemon_load(k, true)));
            }
            let m = interleave(&mut contenders, config.repeats)?;
            let (read_cached, copy) = (n + 1, n + 2);
            let gbps = |i: usize| bytes as f64 / (m.stats(i).median / 1e3) / 1e9;
            let model = format!("{size} {stored}");
            for i in 0..m.names.len() {
                let s = m.stats(i);
                let (vs_read, vs_copy) = match i {
                    _ if i == 0 || i == read_cached => ("1 (baseline)".to_string(), String::new()),
                    _ if i == copy => (String::new(), "1 (baseline)".to_string()),
                    _ if i <= n => (fmt_ratio(gbps(i) / gbps(0)), String::new()),
                    _ => (fmt_ratio(gbps(i) / gbps(read_cached)), fmt_ratio(gbps(i) / gbps(copy))),
                };
                load.row(vec![
                    model.clone(),
                    format!("{held} ({how})"),
                    m.names[i].clone(),
                    fmt_ms(s.median),
                    fmt_ms(s.min),
                    fmt_ms(s.max),
                    format!("{:.2}", gbps(i)),
                    vs_read,
                    vs_copy,
                ]);
            }
            let what = format!("{model} held as {held}");
            // The fill the daemon uses here unless told otherwise.
            let c = fills.iter().position(|f| *f == chosen).expect("the chosen fill is always timed");
            let fill = chosen.1;
            targets.push(Target::at_least(&format!("{what}: cold load ({fill}) / raw read, page cache dropped"), gbps(1 + c) / gbps(0), 0.8));
            targets.push(Target::at_least(&format!("{what}: load ({fill}) from the page cache / memcpy"), gbps(copy + 1 + c) / gbps(copy), 0.5));
        }
    }
    Ok(Section {
        title: "2. Model size".into(),
        about: "Synthetic llama checkpoints (`mora-exec synth --arch llama --dtype bf16` or `f32`, random weights) on \
                the CPU: time to first generated token warm against `--no-cache`, and the daemon's load throughput \
                against the raw read and memory copy bandwidth of the same machine, in the same run, for bf16 \
                checkpoints widened to f32 or kept as bf16 and f32 checkpoints kept as f32."
            .into(),
        tables: vec![ttft, load],
        targets,
        notes,
    })
}

/// Scenario 3: three workflows sharing two models, A B C A B C A B C.
pub fn cross_workflow(config: &Config) -> Result<Section, String> {
    let llm = synth_llama(config, &config.model_sizes[0], "bf16")?;
    let scratch = Env::new("bench-cross");
    let flows = [
        ("A", scratch.workflow("a.toml", &embed_workflow(&TEXTS))),
        ("B", scratch.workflow("b.toml", &pipeline_workflow(&llm))),
        ("C", scratch.workflow("c.toml", &generate_workflow(&llm, 8))),
    ];
    let sequence: Vec<&(&str, PathBuf)> = flows.iter().cycle().take(9).collect();
    // Per-run times of every repetition (the warm-up's first), and what `ps` said.
    let per_run: [RefCell<Vec<Vec<f64>>>; 2] = Default::default();
    let counts: RefCell<Vec<serde_json::Value>> = RefCell::default();
    let run_sequence = |env: &Env, no_cache: bool| -> Result<Duration, String> {
        let mut times = Vec::new();
        let t = Instant::now();
        for (_, wf) in &sequence {
            let r = Instant::now();
            let mut c = env.exec_command(wf, "out");
            if no_cache {
                c.arg("--no-cache");
            }
            run_ok(&mut c)?;
            times.push(r.elapsed().as_secs_f64() * 1e3);
        }
        let total = t.elapsed();
        per_run[usize::from(!no_cache)].borrow_mut().push(times);
        Ok(total)
    };
    let m = interleave(
        &mut [
            Contender::new("without the daemon (--no-cache)", || run_sequence(&scratch, true)),
            Contender::new("with the daemon (fresh at the start)", || {
                let env = Env::with_daemon("bench-cross-daemon");
                let total = run_sequence(&env, false)?;
                *counts.borrow_mut() = env.ps();
                Ok(total)
            }),
        ],
        config.repeats,
    )?;
    let mut totals = Table::new(
        &format!("The sequence of 9 runs, total, {} repeats; the daemon starts empty before each sequence (not timed).", config.repeats),
        &["contender", "median", "min", "max", "vs --no-cache"],
    );
    totals.timing_rows(&m, "", |_| vec![]);
    let mut header = vec!["run".to_string()];
    header.extend(sequence.iter().enumerate().map(|(i, (n, _))| format!("{n}{}", i / 3 + 1)));
    let mut runs = Table { caption: "Median time of each run of the sequence.".into(), header, rows: Vec::new() };
    for (k, name) in [(0, "--no-cache"), (1, "daemon")] {
        let reps = per_run[k].borrow();
        let mut row = vec![name.to_string()];
        for i in 0..sequence.len() {
            let xs: Vec<f64> = reps.iter().skip(1).map(|r| r[i]).collect();
            row.push(fmt_ms(Stats::of(&xs).median));
        }
        runs.row(row);
    }
    let mut ps = Table::new(
        "What `mora-cache ps --json` says after a sequence: reads from disk (loads) and leases granted (hits, the loading one included).",
        &["model", "loads", "hits"],
    );
    let mut loads = 0;
    for e in counts.borrow().iter() {
        let name = e["name"].as_str().unwrap_or("?");
        let short = Path::new(name).file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_else(|| name.to_string());
        loads += e["loads"].as_u64().unwrap_or(0);
        ps.row(vec![format!("`{short}`"), e["loads"].to_string(), e["hits"].to_string()]);
    }
    Ok(Section {
        title: "3. Cross-workflow reuse".into(),
        about: format!(
            "Three workflows sharing two models: A embeds two texts with all-MiniLM-L6-v2; B embeds `examples/corpus.txt` \
             and a question, ranks, and generates 8 tokens from the best passage with a synthetic {} bf16 llama held as f32; \
             C generates 8 tokens with the same llama. Run A B C A B C A B C.",
            config.model_sizes[0]
        ),
        tables: vec![totals, runs, ps],
        targets: vec![],
        notes: vec![format!("With the daemon the two models are read from disk {loads} times in the sequence of 9 runs; without it, 12 times (A, B and C use 1, 2 and 1 models).")],
    })
}

/// Peak memory of one batch of concurrent clients.
#[derive(Clone, Debug, Default)]
struct Batch {
    daemon: Smaps,
    /// The daemon's segments (its models), held by descriptor.
    segments: u64,
    clients: Vec<Smaps>,
    /// The peak, at one instant, of the segments plus every process's own PSS.
    total: u64,
}

fn median_of(xs: impl Iterator<Item = u64>) -> f64 {
    let v: Vec<f64> = xs.map(|x| x as f64).collect();
    if v.is_empty() {
        0.0
    } else {
        Stats::of(&v).median
    }
}

/// Starts `n` clients at once and samples the memory of every one (and the
/// daemon's) every 2 ms until the last exits; returns the wall time.
fn run_clients(env: &Env, wf: &Path, n: usize, no_cache: bool, daemon: u32, batch: &RefCell<Batch>) -> Result<Duration, String> {
    let t = Instant::now();
    let mut children = Vec::new();
    for i in 0..n {
        let err = std::fs::File::create(env.scratch.join(format!("client-{i}.err"))).map_err(|e| e.to_string())?;
        let mut c = env.exec_command(wf, &format!("out-{i}"));
        if no_cache {
            c.arg("--no-cache");
        }
        children.push(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().map_err(|e| format!("spawn: {e}"))?);
    }
    let mut b = Batch { clients: vec![Smaps::default(); n], ..Batch::default() };
    let mut running = n;
    let mut failed = None;
    while running > 0 {
        // Without the cache the daemon has no part in the batch: its memory
        // is shown, not counted.
        let segments = segment_bytes(daemon);
        b.segments = b.segments.max(segments);
        let mut total = if no_cache { 0 } else { segments };
        if let Some(s) = smaps(daemon) {
            b.daemon = b.daemon.max(s);
            if !no_cache {
                total += s.own_pss;
            }
        }
        running = 0;
        for (i, c) in children.iter_mut().enumerate() {
            match c.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && failed.is_none() {
                        failed = Some(i);
                    }
                }
                _ => {
                    running += 1;
                    if let Some(s) = smaps(c.id()) {
                        b.clients[i] = b.clients[i].max(s);
                        total += s.own_pss;
                    }
                }
            }
        }
        b.total = b.total.max(total);
        if running > 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let wall = t.elapsed();
    if let Some(i) = failed {
        let err = std::fs::read_to_string(env.scratch.join(format!("client-{i}.err"))).unwrap_or_default();
        return Err(format!("client {i} failed: {}", err.lines().last().unwrap_or("")));
    }
    *batch.borrow_mut() = b;
    Ok(wall)
}

/// Scenario 4: 1, 4, 8 clients at once on one model.
pub fn concurrency(config: &Config) -> Result<Section, String> {
    let env = Env::with_daemon("bench-conc");
    let daemon = env.daemon_pid().expect("daemon started");
    let wf = env.workflow("embed.toml", &embed_workflow(&TEXTS));
    let mut wall = Table::new(
        "Wall time from starting the clients to the last one's exit.",
        &["clients", "contender", "median", "min", "max", "vs --no-cache"],
    );
    let mut mem = Table::new(
        "Peak memory over each client's life, sampled every 2 ms from `/proc/PID/smaps_rollup` and `status` \
         (last repeat; client figures are medians over clients). The daemon holds its models as segments by \
         descriptor, outside its RSS. Client anon: the client's own heap, weight copies included; client segment: \
         pages of the daemon's segment it maps (only those it touched). Total: the peak, at one instant, of the \
         segments plus every process's proportional set of anonymous and file pages, what the batch really costs \
         (the daemon counted only where the clients use it).",
        &["clients", "contender", "daemon RSS", "daemon segments", "client RSS", "client anon", "client segment", "total"],
    );
    let mut notes = Vec::new();
    for &n in &config.clients {
        let batches: [RefCell<Batch>; 2] = Default::default();
        let m = interleave(
            &mut [
                Contender::new("--no-cache", || run_clients(&env, &wf, n, true, daemon, &batches[0])),
                Contender::new("warm daemon", || run_clients(&env, &wf, n, false, daemon, &batches[1])),
            ],
            config.repeats,
        )?;
        wall.timing_rows(&m, &n.to_string(), |_| vec![]);
        for (i, b) in batches.iter().enumerate() {
            let b = b.borrow();
            let c = |f: fn(&Smaps) -> u64| fmt_bytes(median_of(b.clients.iter().map(f)));
            mem.row(vec![
                n.to_string(),
                m.names[i].clone(),
                fmt_bytes(b.daemon.rss as f64),
                fmt_bytes(b.segments as f64),
                c(|s| s.rss),
                c(|s| s.anon),
                c(|s| s.shmem),
                fmt_bytes(b.total as f64),
            ]);
        }
        if n == *config.clients.iter().max().unwrap_or(&n) {
            let (nc, wd) = (batches[0].borrow().total as f64, batches[1].borrow().total as f64);
            notes.push(format!(
                "With {n} clients the batch's peak memory is {} with the daemon (its segment counted once), {} without: {}.",
                fmt_bytes(wd),
                fmt_bytes(nc),
                fmt_ratio(wd / nc)
            ));
        }
    }
    Ok(Section {
        title: "4. Concurrency and memory".into(),
        about: format!(
            "{} clients started at once, each running the MiniLM embedding workflow, with a warm daemon \
             against `--no-cache`.",
            config.clients.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
        ),
        tables: vec![wall, mem],
        targets: vec![],
        notes,
    })
}

/// Scenario 5: sequential runs against one daemon; its RSS and descriptors.
pub fn soak(config: &Config) -> Result<Section, String> {
    let env = Env::with_daemon("bench-soak");
    let daemon = env.daemon_pid().expect("daemon started");
    let wf = env.workflow("embed.toml", &embed_workflow(&TEXTS));
    run_ok(&mut env.exec_command(&wf, "out"))?;
    let state = || (smaps(daemon).unwrap_or_default().rss, open_fds(daemon));
    let (rss0, fds0) = state();
    let mut times = Vec::with_capacity(config.soak_runs);
    let t = Instant::now();
    for i in 0..config.soak_runs {
        let r = Instant::now();
        run_ok(&mut env.exec_command(&wf, "out")).map_err(|e| format!("run {}: {e}", i + 1))?;
        times.push(r.elapsed().as_secs_f64() * 1e3);
    }
    let elapsed = t.elapsed();
    let (rss1, fds1) = state();
    let ps = env.ps();
    let sum = |k: &str| ps.iter().map(|m| m[k].as_u64().unwrap_or(0)).sum::<u64>();
    let s = Stats::of(&times);
    let mut table = Table::new("", &["", "after the warm-up run", &format!("after {} more runs", config.soak_runs)]);
    table.row(vec!["daemon RSS".into(), fmt_bytes(rss0 as f64), fmt_bytes(rss1 as f64)]);
    table.row(vec!["daemon open descriptors".into(), fds0.to_string(), fds1.to_string()]);
    let drift = (rss1 as f64 - rss0 as f64) / rss0 as f64;
    let fd_target = Target::judged("daemon descriptors after / before", "unchanged", format!("{fds0} → {fds1}"), fds0 == fds1);
    let rss_target = Target::judged("daemon RSS drift", "≤ 2%", format!("{:+.2}%", drift * 100.0), drift.abs() <= 0.02);
    Ok(Section {
        title: "5. Soak".into(),
        about: format!(
            "{} sequential runs of the MiniLM embedding workflow against one daemon, after one warm-up run.",
            config.soak_runs
        ),
        tables: vec![table],
        targets: vec![rss_target, fd_target],
        notes: vec![format!(
            "{} runs in {:.0} s: median {}, min {}, max {} per run; afterwards {} open leases, {} loads, {} leases granted in all.",
            config.soak_runs,
            elapsed.as_secs_f64(),
            fmt_ms(s.median),
            fmt_ms(s.min),
            fmt_ms(s.max),
            sum("leases"),
            sum("loads"),
            sum("hits")
        )],
    })
}

/// The sample at quantile `q` (0..=1) of `xs`, by rank.
fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Times `acquires` acquires (each released at once) on one connection,
/// cycling over `dirs`, after one untimed acquire of each; milliseconds.
fn time_acquires(env: &Env, dirs: &[PathBuf], acquires: usize) -> Result<Vec<f64>, String> {
    use mora_common::connection::Connection;
    use mora_common::manifest::WeightDType;
    use mora_common::protocol::{Device, Request, Response};
    let conn = Connection::connect(&env.socket, "mora-bench").map_err(|e| e.to_string())?;
    let acquire = |dir: &Path| -> Result<Duration, String> {
        let request = Request::Acquire {
            source: mora_common::ModelSource::Dir { path: dir.to_path_buf(), variant: None },
            dtype: WeightDType::F32,
            device: Device::Cpu,
            keep_alive: None,
        };
        let t = Instant::now();
        let (response, fds) = conn.call(&request).map_err(|e| e.to_string())?;
        let took = t.elapsed();
        drop(fds);
        let Response::Acquired(a) = response else { return Err(format!("acquire {}: {response:?}", dir.display())) };
        match conn.call(&Request::Release { lease: a.lease }).map_err(|e| e.to_string())?.0 {
            Response::Released { .. } => Ok(took),
            other => Err(format!("release: {other:?}")),
        }
    };
    for d in dirs {
        acquire(d)?;
    }
    (0..acquires).map(|i| acquire(&dirs[i % dirs.len()]).map(|d| d.as_secs_f64() * 1e3)).collect()
}

/// Scenario 6: one daemon holding more and more small models.
pub fn many_models(config: &Config) -> Result<Section, String> {
    let n = config.many_models.max(1);
    let mut dirs = Vec::with_capacity(n);
    for i in 0..n {
        // Distinct seeds: the same bytes under two names would be held once.
        dirs.push(synth_model(config, "bert", &format!("bert-f32-256KiB-{i}"), "256KiB", "f32", 1000 + i as u64)?);
    }
    let env = Env::with_daemon_args("bench-many", &["--keep-alive", "-1"]);
    let mut stages: Vec<usize> = vec![1, 10, n];
    stages.retain(|&k| k <= n);
    stages.dedup();
    let acquires = config.acquires;
    let mut table = Table::new(
        &format!(
            "With K small models resident (synthetic BERTs, `mora-exec synth --arch bert --size 256KiB`, distinct seeds): \
             {acquires} acquires on one connection cycling over the K models, each released at once, timed from request \
             to answer (the segment's descriptor included); and `mora-cache ps --json`, spawn to exit, {} runs.",
            config.repeats * 4
        ),
        &["models resident", "acquire p50", "acquire p99", "acquire max", "ps p50", "ps p99"],
    );
    let mut rows = Vec::new();
    let mut loaded = 0;
    for &k in &stages {
        while loaded < k {
            run_ok(env.command("mora-cache").arg("load").arg(&dirs[loaded]))?;
            loaded += 1;
        }
        let times = time_acquires(&env, &dirs[..k], acquires)?;
        let mut ps = Vec::new();
        for _ in 0..config.repeats * 4 {
            let t = Instant::now();
            run_ok(env.command("mora-cache").args(["ps", "--json"]))?;
            ps.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let row = (quantile(&times, 0.5), quantile(&times, 0.99), quantile(&times, 1.0), quantile(&ps, 0.5), quantile(&ps, 0.99));
        let us = |ms: f64| format!("{:.0} µs", ms * 1e3);
        table.row(vec![k.to_string(), us(row.0), us(row.1), us(row.2), fmt_ms(row.3), fmt_ms(row.4)]);
        rows.push(row);
    }
    let (first, last) = (rows[0], rows[rows.len() - 1]);
    let k = stages[stages.len() - 1];
    Ok(Section {
        title: "6. Many models".into(),
        about: format!("One daemon holding 1 to {n} small models: does an acquire or a `ps` slow down as the models grow?"),
        tables: vec![table],
        targets: vec![
            Target::at_most(&format!("acquire p50, {k} models / 1 model"), last.0 / first.0, 1.2),
            Target::at_most(&format!("acquire p99, {k} models / 1 model"), last.1 / first.1, 1.2),
            Target::at_most(&format!("ps p50, {k} models / 1 model"), last.3 / first.3, 1.2),
        ],
        notes: vec![],
    })
}
