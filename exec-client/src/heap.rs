//! A run keeps the memory it frees, instead of handing it back to the
//! kernel and faulting it in again for the next tensor.
//!
//! glibc's malloc serves each block of 128 KiB or more (a threshold it
//! raises as such blocks are freed, up to 32 MiB) with a fresh `mmap` and
//! unmaps it on free, and it returns the top of its heap to the kernel once
//! 128 KiB or more lies free there. A network's activations are exactly such
//! blocks, allocated and freed layer after layer: each one fresh pages, each
//! page faulted in and zeroed by the kernel. A warm 256x256 image run made
//! about 390 000 page faults and spent 1.4 s of its 8 s of CPU time in the
//! kernel. A run is a short-lived process, so `mora-exec` has malloc serve
//! blocks up to [`MMAP_THRESHOLD`] from its heap and keep what is freed
//! ([`TRIM_THRESHOLD`]): freed activations are reused by the next layer
//! (145 000 faults, docs/decisions.md has the figures). Peak memory is the
//! same: the process only stops returning memory it will need again.
//!
//! Settings the user gave glibc (`GLIBC_TUNABLES` naming a `glibc.malloc`
//! tunable, or `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_`) are kept.
//! Other C libraries have no `mallopt`, and their runs keep their
//! allocator's behaviour.

/// Blocks up to this size come from the heap (larger ones are still mapped
/// and unmapped: SDXL's largest activation at 1024x1024 is 512 MiB).
pub const MMAP_THRESHOLD: i32 = 1 << 30;

/// Free memory at the top of the heap up to this size stays with the process.
pub const TRIM_THRESHOLD: i32 = i32::MAX;

/// Whether the environment already tells glibc's malloc how to map or trim.
pub fn user_configured(var: impl Fn(&str) -> Option<String>) -> bool {
    var("GLIBC_TUNABLES").is_some_and(|t| t.contains("glibc.malloc."))
        || var("MALLOC_MMAP_THRESHOLD_").is_some()
        || var("MALLOC_TRIM_THRESHOLD_").is_some()
}

/// Applies [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`] unless the user
/// configured malloc; true when it did. Call it early in `main`, before the
/// first large allocation.
pub fn keep_freed_memory() -> bool {
    if user_configured(|v| std::env::var(v).ok()) {
        return false;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    // glibc's <malloc.h>.
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: mallopt takes two integers and only changes malloc's parameters;
    // it is thread-safe in glibc (it takes the arenas' locks).
    unsafe { mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malloc_settings_the_user_gave_are_kept() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert!(!user_configured(env(&[])));
        assert!(!user_configured(env(&[("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=2048")])));
        assert!(user_configured(env(&[("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")])));
        assert!(user_configured(env(&[("MALLOC_MMAP_THRESHOLD_", "65536")])));
        assert!(user_configured(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])));
    }
}
