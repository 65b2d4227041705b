//! Fuzz target `http_body`: the plain-HTTP transport's body reader (identity or gzip, with
//! the decompressed size limit).
//!
//! Input: one flags byte (bit 0: `Content-Encoding: gzip`), two bytes of limit (big-endian,
//! so 0..=65535 decoded bytes), then the body as it arrives on the wire.
//! Asserts the limit holds: a body accepted is never longer than the limit, and reading holds
//! at most the wire body, about twice the limit and the inflater's fixed state, however far a
//! gzip bomb would expand.
#![no_main]

use ampora_fuzz::Counting;
use gateway::server::fuzzing::read_http_body;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static HEAP: Counting = Counting::new();

/// The inflater's window and buffers, independent of the input.
const INFLATE_STATE: usize = 256 << 10;

fuzz_target!(|data: &[u8]| {
    let [flags, hi, lo, body @ ..] = data else {
        return;
    };
    let gzip = flags & 1 == 1;
    let max = usize::from(u16::from_be_bytes([*hi, *lo]));
    let wire = body.to_vec();
    let (read, held) = HEAP.measure(|| read_http_body(wire, gzip, max));
    match read {
        Ok(out) => {
            assert!(
                out.len() <= max,
                "{} bytes accepted over a {max} byte limit",
                out.len()
            );
            if !gzip {
                assert_eq!(out, body, "identity bodies pass unchanged");
            }
        }
        Err(reason) => assert!(matches!(reason, "oversize" | "malformed"), "{reason}"),
    }
    // Vec growth may double the output buffer once past the limit's last byte.
    let bound = body.len() + 2 * (max + 1) + INFLATE_STATE;
    assert!(
        held <= bound,
        "reading held {held} bytes (limit {max}, body {})",
        body.len()
    );
});
