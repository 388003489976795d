//! `threads::settle` keeps candle's elementwise workers from spinning long
//! after each op (the cores they spin on are the ones the next matmul
//! needs): the idle worker's time on a CPU, read from
//! `/proc/self/task/TID/schedstat`, over ops spaced apart. One test in its
//! own process, since it changes the environment and candle reads the limit
//! once, when its pool starts.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use mora_models::threads;

/// Nanoseconds the thread named `name` has run on a CPU.
fn on_cpu(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            return stat.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

#[test]
fn candles_elementwise_workers_sleep_soon_after_each_op() {
    // Two threads, so candle's pool has a worker even where it counts one core.
    std::env::set_var(threads::VAR, "2");
    std::env::remove_var(threads::SPIN_VAR);
    assert_eq!(threads::settle(), vec![threads::SPIN_VAR]);
    assert_eq!(std::env::var(threads::SPIN_VAR).unwrap(), threads::SPIN_LIMIT.to_string());
    let x = Tensor::ones((64, 1024), DType::F32, &Device::Cpu).unwrap();
    (&x + &x).unwrap(); // large enough for candle's pool: it starts
    let before = on_cpu("candle-bp-0").expect("candle's elementwise worker `candle-bp-0`: has candle renamed it?");
    let ops = 200u64;
    for _ in 0..ops {
        let y = (&x + &x).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        drop(y);
    }
    // Each op hands the worker half of 64 Ki additions, some microseconds;
    // candle's own limit (25 000 rounds) kept it on a CPU for about 700 us
    // an op on the machine the limit was chosen on, Mora's about 20 us.
    let per_op_us = (on_cpu("candle-bp-0").unwrap() - before) / 1000 / ops;
    assert!(
        per_op_us < 200,
        "candle's elementwise worker ran {per_op_us} us per op: it spins after each op (does candle still read {}?)",
        threads::SPIN_VAR
    );
}
