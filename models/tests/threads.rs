//! `threads::settle` stops candle's CPU matmuls from reading files: without
//! `RAYON_NUM_THREADS`, each one works its thread count out from
//! `/proc/cpuinfo` (counted here by the bytes this process reads, `rchar`
//! in `/proc/self/io`). One test in its own process, since it changes the
//! environment.

use candle_core::{Device, Tensor};

fn bytes_read() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    let line = io.lines().find(|l| l.starts_with("rchar:")).unwrap();
    line["rchar:".len()..].trim().parse().unwrap()
}

/// Bytes read by the process during `n` matmuls (the reading of
/// `/proc/self/io` itself taken off).
fn read_by_matmuls(n: usize) -> u64 {
    let a = Tensor::ones((16, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((32, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let idle = {
        let before = bytes_read();
        bytes_read() - before
    };
    let before = bytes_read();
    for _ in 0..n {
        assert_eq!(a.matmul(&b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 16.0 * 8.0 * 32.0);
    }
    bytes_read() - before - idle
}

#[test]
fn settled_thread_count_keeps_candles_count_and_matmuls_read_no_files() {
    std::env::remove_var(mora_models::threads::VAR);
    let count = candle_core::utils::get_num_threads();
    read_by_matmuls(1); // thread pools start, reading what they read once
    let unsettled = read_by_matmuls(8);
    assert!(
        unsettled > 0,
        "candle no longer reads files on each matmul; threads::settle can go (read {unsettled} bytes)"
    );

    assert!(mora_models::threads::settle().contains(&mora_models::threads::VAR));
    assert_eq!(std::env::var(mora_models::threads::VAR).unwrap(), count.to_string());
    assert_eq!(candle_core::utils::get_num_threads(), count, "candle's own count, unchanged");
    assert_eq!(read_by_matmuls(8), 0, "a matmul read files with the count settled");

    // A count the user set is theirs.
    std::env::set_var(mora_models::threads::VAR, "3");
    assert!(!mora_models::threads::settle().contains(&mora_models::threads::VAR));
    assert_eq!(candle_core::utils::get_num_threads(), 3);
}
