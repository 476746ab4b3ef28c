//! Event payloads (`killrvideo::events`, as read from Kafka topics anyone may write to) and `grpc-timeout`
//! headers: decoded or refused as malformed, never a panic.
#![no_main]

use killrvideo::events::{VideoAdded, VideoRated};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = VideoAdded::decode(data);
    let _ = VideoRated::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = keel_common::context::parse_grpc_timeout(text);
    }
});
