//! The daemon's checkpoint header reader on arbitrary files: an error or a
//! list of disjoint, in-bounds tensors of the right lengths, never a panic.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use mora_cache::checkpoint::read_header;
use mora_common::manifest::tensor_bytes;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("mora-fuzz-header-{}", std::process::id()));
    std::fs::File::create(&path).and_then(|mut f| f.write_all(data)).unwrap();
    if let Ok(tensors) = read_header(&path) {
        let mut end = 0;
        for t in &tensors {
            assert!(t.file_offset >= end, "overlap");
            assert_eq!(Some(t.len), tensor_bytes(t.dtype, &t.shape));
            end = t.file_offset + t.len;
            assert!(end <= data.len() as u64);
        }
    }
});
