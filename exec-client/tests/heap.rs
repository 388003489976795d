//! `heap::keep_freed_memory`: a block of 48 MiB freed and allocated again is
//! the same memory, not fresh pages the kernel must fault in (glibc maps
//! such a block afresh on every allocation otherwise). Page faults are read
//! from `/proc/self/stat`. One test in its own process, since it changes
//! the process's malloc.

fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces): state is the 3rd field, minflt the 10th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(7).unwrap().parse().unwrap()
}

/// Page faults while allocating, writing and freeing `n` blocks of `size` bytes.
fn faults_of_blocks(n: usize, size: usize) -> u64 {
    let before = minor_faults();
    for i in 0..n {
        let v = std::hint::black_box(vec![i as u8 + 1; size]);
        assert_eq!(v[size - 1], i as u8 + 1);
    }
    minor_faults() - before
}

#[test]
fn freed_blocks_are_reused_instead_of_faulted_in_again() {
    for var in ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"] {
        std::env::remove_var(var);
    }
    // Above the 32 MiB glibc never raises its threshold past; below the 64 MiB
    // heaps it gives threads other than the main one (tests run on one).
    let size = 48 << 20;
    let pages = (size / 4096) as u64;
    let before = faults_of_blocks(4, size);
    assert!(before >= 3 * pages, "glibc's default faults each 48 MiB block in afresh: {before} faults for 4 blocks");

    assert!(mora_exec::heap::keep_freed_memory(), "mallopt refused the thresholds");
    faults_of_blocks(1, size); // the heap grows once
    let after = faults_of_blocks(4, size);
    assert!(after < pages / 4, "{after} faults for 4 blocks of 48 MiB after keep_freed_memory ({pages} pages each)");
}
