//! How candle's CPU kernels use the cores, settled once per process, first
//! thing in `main` (`mora-exec`, the benchmarks, the profiling example).
//!
//! Two settings, each written into the environment variable candle reads,
//! and each left alone when the user set it:
//!
//! - **The thread count** (`RAYON_NUM_THREADS`). candle 0.11 asks how many
//!   threads to use on every CPU matmul (`candle_core::utils::get_num_threads`).
//!   Unless the variable is set, that answer is worked out afresh each time:
//!   `num_cpus::get_physical` opens and parses `/proc/cpuinfo`, whose size
//!   and cost grow with the machine's cores. A MiniLM embedding makes about 50
//!   matmuls, a token of a 22-layer Llama about 150. So the count is worked
//!   out once and written; it is candle's own, so the kernels split their
//!   work as before. rayon sizes its global pool from the same variable:
//!   without it the pool has a thread per logical CPU; with it, one per
//!   physical core, the count candle already hands its matmuls.
//! - **How long candle's elementwise workers spin** (`CANDLE_BARRIER_POOL_SPIN_LIMIT`).
//!   candle 0.11 runs large elementwise ops on a pool of its own (one
//!   worker fewer than the thread count) beside rayon's, whose threads run
//!   the matmuls. After each op those workers spin 25 000 rounds before they
//!   sleep, and a matmul started meanwhile has rayon's threads compete with
//!   them for the same cores. In the CLIP text encoder, where elementwise
//!   ops and matmuls alternate, a quarter of the samples of a profile were
//!   that spinning, and the forward took 250 ms against 176 ms with a
//!   limit of [`SPIN_LIMIT`] (2 threads; docs/decisions.md has the figures).
//!   The UNet, VAE, embedders and decoders were unchanged within noise.

/// The variable candle and rayon read for their thread counts.
pub const VAR: &str = "RAYON_NUM_THREADS";

/// The variable candle reads for the rounds its elementwise workers spin
/// before they sleep.
pub const SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The rounds Mora lets them spin: enough to catch an op issued right after
/// the last, short enough that a matmul does not wait on them.
pub const SPIN_LIMIT: u32 = 100;

/// The value to write into [`VAR`], given its current value and candle's
/// default count: `None` when the current one is a count candle accepts (a
/// positive integer), since candle then never works out its own.
pub fn value_to_set(current: Option<&std::ffi::OsStr>, default: impl FnOnce() -> usize) -> Option<String> {
    let accepted = current.and_then(|v| v.to_str()).and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| n > 0);
    (!accepted).then(|| default().to_string())
}

/// The value to write into [`SPIN_VAR`]: `None` when the current one is a
/// limit candle accepts (any unsigned integer, 0 included).
pub fn spin_to_set(current: Option<&std::ffi::OsStr>) -> Option<String> {
    let accepted = current.and_then(|v| v.to_str()).is_some_and(|v| v.parse::<u32>().is_ok());
    (!accepted).then(|| SPIN_LIMIT.to_string())
}

/// Writes candle's thread count into [`VAR`] and Mora's spin limit into
/// [`SPIN_VAR`], each unless the user set one; returns the variables it
/// wrote. Call it first thing in `main`, while the process has one thread:
/// the environment is not safe to change once other threads may read it,
/// and candle reads the spin limit once, when its pool starts.
pub fn settle() -> Vec<&'static str> {
    let mut wrote = Vec::new();
    if let Some(v) = value_to_set(std::env::var_os(VAR).as_deref(), candle_core::utils::get_num_threads) {
        std::env::set_var(VAR, v);
        wrote.push(VAR);
    }
    if settle_spin() {
        wrote.push(SPIN_VAR);
    }
    wrote
}

/// Writes only Mora's spin limit, unless the user set one; true when it
/// wrote. For a process that computes with candle and also starts other
/// programs whose thread count must stay the user's (the benchmarks); the
/// same rule as [`settle`] on when to call it.
pub fn settle_spin() -> bool {
    match spin_to_set(std::env::var_os(SPIN_VAR).as_deref()) {
        Some(v) => {
            std::env::set_var(SPIN_VAR, v);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn a_count_the_user_set_is_kept_and_anything_else_replaced_by_candles() {
        assert_eq!(value_to_set(None, || 6), Some("6".into()));
        assert_eq!(value_to_set(Some(OsStr::new("3")), || 6), None);
        // candle ignores these and works its default out on every call.
        for ignored in ["0", "", "four", "-2", "2.5"] {
            assert_eq!(value_to_set(Some(OsStr::new(ignored)), || 6), Some("6".into()), "{ignored:?}");
        }
    }

    #[test]
    fn a_spin_limit_the_user_set_is_kept_and_anything_else_replaced_by_moras() {
        assert_eq!(spin_to_set(None), Some("100".into()));
        for kept in ["0", "25000"] {
            assert_eq!(spin_to_set(Some(OsStr::new(kept))), None, "{kept:?}");
        }
        // candle ignores these and spins its default.
        for ignored in ["", "none", "-1", "1.5"] {
            assert_eq!(spin_to_set(Some(OsStr::new(ignored))), Some("100".into()), "{ignored:?}");
        }
    }
}
