//! The five scenarios of the benchmark harness.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::proc::{drop_cached, open_fds, read_whole, segment_bytes, smaps, Smaps};
use super::python::Python;
use super::{fmt_bytes, fmt_ms, fmt_ratio, interleave, Config, Contender, Headline, Section, Stats, Table, Target};
use crate::{bin, embed_workflow, read_embeddings, root, Env};

const TEXTS: [&str; 2] = ["A man is eating food.", "A man is eating a piece of bread."];

/// Runs `cmd` to the end; `Err` is the last line it printed on stderr.
fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let o = cmd.stdin(Stdio::null()).output().map_err(|e| format!("spawn: {e}"))?;
    if o.status.success() {
        return Ok(());
    }
    Err(super::last_line(&o.stderr))
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A synthetic bf16 llama of `size` in the model directory, written once
/// (aside, then renamed) and reused by later runs: same seed, same bytes.
fn synth_llama(config: &Config, size: &str) -> Result<PathBuf, String> {
    let dir = config.model_dir.join(format!("llama-bf16-{size}"));
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    eprintln!("mora-bench: writing a synthetic bf16 llama of {size} into {}", dir.display());
    let tmp = config.model_dir.join(format!("llama-bf16-{size}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    run_ok(Command::new(bin("mora-exec")).args(["synth", "--arch", "llama", "--dtype", "bf16", "--seed", "7", "--size", size, "-o"]).arg(&tmp))
        .map_err(|e| format!("synth {size}: {e}"))?;
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
    Ok(Section {
        title: "1. Repeat one workflow".into(),
        about: "all-MiniLM-L6-v2 (f32, 86.7 MiB) embedding two texts, as (a) `mora-exec run` with a warm daemon, \
                (b) `mora-exec run --no-cache` (weights read in-process), (c) a Python process per run with \
                sentence-transformers, as users do today, and (d) a persistent Python worker with the model loaded \
                (a request over a pipe: the floor that process isolation costs against)."
            .into(),
        tables: vec![table],
        targets,
        notes,
    })
}

/// Scenario 2: time to first token and cold loads against model size.
pub fn model_size(config: &Config, headline: &mut Headline) -> Result<Section, String> {
    let mut ttft = Table::new(
        "Time to first token: a generate workflow with `max_tokens = 1`, spawn to exit, bf16 weights held as f32.",
        &["model", "contender", "median", "min", "max", "vs --no-cache"],
    );
    let mut load = Table::new(
        "Cold load: the page cache dropped for the file before each read (`posix_fadvise(DONTNEED)`); \
         `mora-cache load --dtype f32` timed spawn to exit, into a daemon that has just evicted the model. \
         Throughput is the file's bytes over the time.",
        &["model", "contender", "median", "min", "max", "GB/s", "vs raw read"],
    );
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    for (k, size) in config.model_sizes.iter().enumerate() {
        let dir = synth_llama(config, size)?;
        let file = dir.join("model.safetensors");
        let bytes = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
        let budget = format!("{}MiB", (bytes * 5 / 2) >> 20);
        let env = Env::with_daemon_args("bench-size", &["--max-memory", &budget, "--keep-alive", "-1"]);
        let wf = env.workflow("generate.toml", &generate_workflow(&dir, 1));
        let label = format!("{size} bf16");
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

        let dir_arg = dir.display().to_string();
        let daemon_load = |cached: bool| {
            let env = &env;
            let (file, dir_arg) = (&file, &dir_arg);
            move || -> Result<Duration, String> {
                run_ok(env.command("mora-cache").arg("clear"))?;
                if !cached {
                    drop_cached(file)?;
                }
                let t = Instant::now();
                run_ok(env.command("mora-cache").args(["load", "--dtype", "f32", dir_arg.as_str()]))?;
                Ok(t.elapsed())
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
        let m = interleave(
            &mut [
                Contender::new("raw read(2), page cache dropped", raw_read(false)),
                Contender::new("daemon load, page cache dropped", daemon_load(false)),
                Contender::new("raw read(2), file in page cache", raw_read(true)),
                Contender::new("daemon load, file in page cache", daemon_load(true)),
            ],
            config.repeats,
        )?;
        let gbps = |i: usize| bytes as f64 / (m.stats(i).median / 1e3) / 1e9;
        for i in 0..4 {
            let s = m.stats(i);
            let base = if i < 2 { 0 } else { 2 };
            let vs = if i == base { "1 (baseline)".to_string() } else { fmt_ratio(gbps(i) / gbps(base)) };
            load.row(vec![label.clone(), m.names[i].clone(), fmt_ms(s.median), fmt_ms(s.min), fmt_ms(s.max), format!("{:.2}", gbps(i)), vs]);
        }
        targets.push(Target::at_least(&format!("{label}: daemon cold load / raw read bandwidth"), gbps(1) / gbps(0), 0.8));
        if k + 1 == config.model_sizes.len() {
            notes.push(format!(
                "The largest model ({label}, {} on disk) is {} resident as f32.",
                fmt_bytes(bytes as f64),
                fmt_bytes(env.resident_bytes() as f64)
            ));
        }
    }
    Ok(Section {
        title: "2. Model size".into(),
        about: "Synthetic llama checkpoints (`mora-exec synth --arch llama --dtype bf16`, random weights) loaded as f32 \
                on the CPU: time to first generated token warm against `--no-cache`, and the daemon's cold load \
                throughput against the raw read bandwidth of the same file, in the same run."
            .into(),
        tables: vec![ttft, load],
        targets,
        notes,
    })
}

/// Scenario 3: three workflows sharing two models, A B C A B C A B C.
pub fn cross_workflow(config: &Config) -> Result<Section, String> {
    let llm = synth_llama(config, &config.model_sizes[0])?;
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
        about: "1, 4 and 8 clients started at once, each running the MiniLM embedding workflow, with a warm daemon \
                against `--no-cache`."
            .into(),
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
