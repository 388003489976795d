//! The workflow parser on arbitrary text: parsed, or refused with one line
//! that names the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mora_exec::workflow::Workflow;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    if let Err(e) = Workflow::parse_with(src, Path::new("/w/flow.toml"), &["a=1".to_string()]) {
        let e = e.to_string();
        assert!(e.starts_with("/w/flow.toml") && !e.contains('\n'), "{e}");
    }
});
