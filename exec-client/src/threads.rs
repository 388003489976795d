//! How many threads candle's CPU kernels use, settled once per process.
//!
//! candle 0.11 asks how many threads to use on every CPU matmul
//! (`candle_core::utils::get_num_threads`). Unless `RAYON_NUM_THREADS` is
//! set, that answer is worked out afresh each time: `num_cpus::get_physical`
//! opens and parses `/proc/cpuinfo`, whose size and cost grow with the
//! machine's cores. A MiniLM embedding makes about 50 matmuls, a token of a
//! 22-layer Llama about 150. So `mora-exec` works the answer out once, as
//! its first step, and writes it into `RAYON_NUM_THREADS`, the variable
//! candle reads first; the count is candle's own, so the kernels split their
//! work as before. A count the user set is kept.
//!
//! rayon sizes its global pool from the same variable. Without it the pool
//! has a thread per logical CPU; with it, one per physical core, the count
//! candle already hands its matmuls (docs/decisions.md).

/// The variable candle and rayon read for their thread counts.
pub const VAR: &str = "RAYON_NUM_THREADS";

/// The value to write into [`VAR`], given its current value and candle's
/// default count: `None` when the current one is a count candle accepts (a
/// positive integer), since candle then never works out its own.
pub fn value_to_set(current: Option<&std::ffi::OsStr>, default: impl FnOnce() -> usize) -> Option<String> {
    let accepted = current.and_then(|v| v.to_str()).and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| n > 0);
    (!accepted).then(|| default().to_string())
}

/// Writes candle's thread count into [`VAR`] unless the user set one; true
/// when it wrote. Call it first thing in `main`, while the process has one
/// thread: the environment is not safe to change once other threads may
/// read it.
pub fn settle() -> bool {
    match value_to_set(std::env::var_os(VAR).as_deref(), candle_core::utils::get_num_threads) {
        Some(v) => {
            std::env::set_var(VAR, v);
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
}
