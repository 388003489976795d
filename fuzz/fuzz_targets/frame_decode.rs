//! The daemon's first contact with a peer: a length prefix and a postcard
//! payload. Whatever arrives must decode or fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mora_common::frame;
use mora_common::protocol::{Hello, HelloReply, Request, Response};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = frame::payload_len(data[..4].try_into().unwrap());
    }
    let _ = frame::decode::<Hello>(data);
    let _ = frame::decode::<HelloReply>(data);
    if let Ok(r) = frame::decode::<Request>(data) {
        // What decodes re-encodes to something that decodes the same.
        let again = frame::encode(&r).unwrap();
        assert_eq!(frame::decode::<Request>(&again[4..]).unwrap(), r);
    }
    let _ = frame::decode::<Response>(data);
});
