//! Arbitrary bytes through the pgoutput decoder, in and out of a stream and with every protocol
//! version that changes the decoding, and through `parse_copy_data`: a value or an error, never
//! a panic, an overflow or an unbounded allocation.
#![no_main]

use bytes::Bytes;
use fluxbase_replication::pgoutput::{decode, parse_copy_data, DecodeContext, ReplicationMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = Bytes::copy_from_slice(data);
    for protocol_version in [1, 4] {
        for in_stream in [false, true] {
            let ctx = DecodeContext {
                protocol_version,
                in_stream,
            };
            let _ = decode(data.clone(), ctx);
        }
    }
    if let Ok(ReplicationMessage::XLogData(x)) = parse_copy_data(data) {
        let _ = decode(x.data, DecodeContext::new(1));
    }
});
