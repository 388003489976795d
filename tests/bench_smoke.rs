//! The benchmark harness in its smoke configuration (tiny models, two
//! repeats): every scenario runs end to end and writes its report and chart.
//! Nothing here asserts a time; the figures come from `scripts/bench.sh`.

use mora::bench::{self, Config, KEPT};
use mora_common::segment::shared_memory_huge_pages;
use mora::Scratch;

#[test]
fn every_scenario_runs_and_writes_a_report_and_a_chart() {
    let dir = Scratch::new("bench-smoke");
    let config = Config::smoke(&dir.path);
    let report = bench::run(&config).expect("the harness runs");

    let titles: Vec<&str> = report.sections.iter().map(|s| s.title.as_str()).collect();
    assert_eq!(
        titles,
        ["1. Repeat one workflow", "2. Model size", "3. Cross-workflow reuse", "4. Concurrency and memory", "5. Soak", "6. Many models", "7. Images: a Stable Diffusion pipeline", "8. Images against diffusers and torch", "9. LoRA adapters over one shared base"]
    );
    let md = std::fs::read_to_string(&config.report).expect("report written");
    for t in &titles {
        assert!(md.contains(&format!("## {t}")), "report lacks {t}");
    }
    assert!(md.contains("| (a) mora-exec run, warm daemon |"), "{md}");
    assert!(md.ends_with(KEPT), "a new report ends with the marker of the hand-written part");
    let png = std::fs::read(config.chart_path()).expect("chart written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(md.contains("![Headline comparisons"), "the report shows the chart");

    // Scenario 7: warm and --no-cache timed; two pipelines share their text encoder and VAE.
    let s7 = &report.sections[6];
    assert_eq!(s7.tables[0].rows.len(), 2);
    assert_eq!(s7.tables[1].rows[3][2], "4", "{:?}", s7.tables[1].rows);

    // Scenario 9: three LoRAs over one base: the base's three components
    // and each adapter held once.
    let s9 = &report.sections[8];
    assert_eq!(s9.tables[0].rows.len(), 3);
    assert_eq!((s9.tables[1].rows[0][1].as_str(), s9.tables[1].rows[1][1].as_str()), ("3", "3"), "{:?}", s9.tables[1].rows);

    // Scenario 8: Mora's runs and forwards against diffusers' and torch's,
    // or Mora's alone with the reason the peer did not run; `python -m mora
    // run`'s two contenders where the peer has the package.
    let s8 = &report.sections[7];
    let forwards = &s8.tables[1].rows;
    assert_eq!(forwards.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["text_encoder", "unet", "vae_decoder"]);
    let no_fork = s8.notes.iter().find(|n| n.starts_with("skipped: python -m mora run"));
    match s8.notes.iter().find(|n| n.starts_with("skipped:") && !n.starts_with("skipped: python -m mora run")) {
        Some(why) => {
            mora::skipped("bench_smoke: scenario 8's diffusers and torch contenders", why.trim_start_matches("skipped: "));
            assert_eq!(s8.tables[0].rows.len(), 2, "{:?}", s8.tables[0].rows);
            assert!(forwards.iter().all(|r| r[4] == "—"), "{forwards:?}");
        }
        None => {
            if let Some(why) = no_fork {
                mora::skipped("bench_smoke: scenario 8's python -m mora run contenders", why.trim_start_matches("skipped: "));
            }
            let names: Vec<&str> = s8.tables[0].rows.iter().map(|r| r[0].as_str()).collect();
            assert_eq!(names.len(), if no_fork.is_none() { 6 } else { 4 }, "{names:?}");
            assert!(names[0].starts_with("diffusers worker") && names[3].starts_with("diffusers, a process per run"), "{names:?}");
            if no_fork.is_none() {
                assert!(names[4].contains("python -m mora run (load from disk)") && names[5].contains("python -m mora run (weights from the daemon)"), "{names:?}");
            }
            assert!(forwards.iter().all(|r| r[6].ends_with('x')), "{forwards:?}");
            assert_eq!(s8.targets.len(), 2 + usize::from(no_fork.is_none()) + 3 * config.image_latents.len());
        }
    }
    // Every contender's peak memory was read.
    assert!(s8.tables[0].rows.iter().all(|r| mib(&r[5]) > 1.0), "{:?}", s8.tables[0].rows);

    // Scenario 1: the Python peers ran, or the report says why not.
    let s1 = &report.sections[0];
    let rows = s1.tables[0].rows.len();
    if rows == 2 {
        let why = s1.notes.iter().find(|n| n.starts_with("skipped:")).map_or("no note", |n| n.as_str());
        mora::skipped("bench_smoke: scenario 1's Python contenders", why.trim_start_matches("skipped: "));
    }
    assert!(
        rows == 4 || (rows == 2 && s1.notes.iter().any(|n| n.starts_with("skipped: python peer"))),
        "{rows} contenders, notes {:?}",
        s1.notes
    );
    // Scenario 2: one row per contender and size, and a target per size.
    let s2 = &report.sections[1];
    assert_eq!(s2.tables[0].rows.len(), 2 * config.model_sizes.len());
    // Per size: three loads (bf16 widened, bf16 kept, f32 kept), seven contenders
    // each (the smoke configuration times both fills).
    assert_eq!(s2.tables[1].rows.len(), 3 * 7 * config.model_sizes.len());
    assert_eq!(s2.targets.len(), 1 + 3 * 2 * config.model_sizes.len());
    // Scenario 3: each of the two models loaded once per sequence and lent to
    // its 6 runs (A and B use MiniLM, B and C the llama).
    let ps = &report.sections[2].tables[2];
    assert_eq!(ps.rows.len(), 2, "{:?}", ps.rows);
    for r in &ps.rows {
        assert_eq!((r[1].as_str(), r[2].as_str()), ("1", "6"), "loads and hits of {}", r[0]);
    }
    // Scenario 4: wall and memory rows for every client count. A warm client
    // maps the daemon's segment instead of copying the model into its heap.
    let s4 = &report.sections[3];
    assert_eq!(s4.tables[0].rows.len(), 2 * config.clients.len());
    let mem = &s4.tables[1];
    assert_eq!(mem.rows.len(), 2 * config.clients.len());
    for pair in mem.rows.chunks(2) {
        let (no_cache, warm) = (&pair[0], &pair[1]);
        assert_eq!((no_cache[1].as_str(), warm[1].as_str()), ("--no-cache", "warm daemon"));
        assert!(mib(&warm[6]) > 10.0, "a warm client maps the segment: {warm:?}");
        assert!(mib(&no_cache[5]) > 80.0 && mib(&warm[5]) < mib(&no_cache[5]) / 2.0, "copies: {no_cache:?} {warm:?}");
    }
    // Scenario 5: no lease outlives its run, the model loaded once.
    let s5 = &report.sections[4];
    assert!(s5.notes[0].contains("0 open leases, 1 loads, 4 leases granted"), "{:?}", s5.notes);
    assert_eq!(s5.targets.len(), 2);

    // Scenario 6: one row per number of models resident, up to all of them.
    let s6 = &report.sections[5];
    let counts: Vec<&str> = s6.tables[0].rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(counts, ["1", &config.many_models.to_string()]);
    assert_eq!(s6.targets.len(), 3);

    // A rerun keeps what was written by hand after the marker.
    std::fs::write(&config.report, format!("old figures\n{KEPT}\n## Analysis\nby hand\n")).unwrap();
    let again = Config { scenarios: vec![5], ..config.clone() };
    bench::run(&again).expect("the harness runs again");
    let md = std::fs::read_to_string(&config.report).unwrap();
    assert!(md.ends_with("## Analysis\nby hand\n") && !md.contains("old figures") && md.contains("## 5. Soak"), "{md}");

    // Without --compare-fills, scenario 2 times only the fill the daemon chooses.
    let chosen = Config { scenarios: vec![2], model_sizes: vec!["2MiB".into()], compare_fills: false, ..config.clone() };
    let s2 = bench::run(&chosen).expect("the harness runs scenario 2 alone").sections.remove(0);
    let fill = if shared_memory_huge_pages() { "daemon load (mapping)" } else { "daemon load (pwrite)" };
    let loads: Vec<&str> = s2.tables[1].rows.iter().map(|r| r[2].as_str()).filter(|c| c.starts_with("daemon load")).collect();
    assert_eq!(s2.tables[1].rows.len(), 3 * 5, "{:?}", s2.tables[1].rows);
    assert!(loads.len() == 3 * 2 && loads.iter().all(|c| c.starts_with(fill)), "{loads:?}");
    assert!(s2.targets.iter().skip(1).all(|t| t.what.contains(&fill["daemon ".len()..])), "{:?}", s2.targets.iter().map(|t| &t.what).collect::<Vec<_>>());
}

/// "86.6 MiB" (as the report prints sizes) in MiB.
fn mib(cell: &str) -> f64 {
    let (v, unit) = cell.split_once(' ').unwrap_or_else(|| panic!("not a size: {cell}"));
    let v: f64 = v.parse().unwrap_or_else(|_| panic!("not a size: {cell}"));
    v * match unit {
        "B" => 1.0 / (1024.0 * 1024.0),
        "KiB" => 1.0 / 1024.0,
        "MiB" => 1.0,
        "GiB" => 1024.0,
        other => panic!("unit {other} in {cell}"),
    }
}
