//! Fuzz target `ws_frame`: one inbound WebSocket message payload through the gateway's decode
//! path (the OpAMP varint header, the legacy header-less form, the pre-scan with its entry
//! limits, the decode budget) and through the shared codec's `decode_ws`.
//!
//! Asserts that whatever the gateway accepts the codec decodes to the same message, and that
//! decoding never holds more heap than the budget charged for it (the pre-scan's cost bound).
#![no_main]

use std::sync::LazyLock;

use ampora_fuzz::Counting;
use gateway::server::fuzzing::{decode_cost, decode_ws_frame};
use gateway::server::{DecodeBudget, FrameLimits, DEFAULT_DECODE_BUDGET_BYTES};
use libfuzzer_sys::fuzz_target;
use proto::{AgentToServer, Message};

#[global_allocator]
static HEAP: Counting = Counting::new();

/// Limits small enough that inputs of a few KiB reach every refusal path.
const LIMITS: FrameLimits = FrameLimits {
    attributes: 64,
    components: 32,
    config_files: 8,
    entries: 128,
};

/// The budget's accounting unit (`UNIT` in gateway/src/server/decode.rs).
const BUDGET_UNIT: usize = 1024;

static BUDGET: LazyLock<DecodeBudget> =
    LazyLock::new(|| DecodeBudget::new(DEFAULT_DECODE_BUDGET_BYTES));

fuzz_target!(|frame: &[u8]| {
    let budget = &*BUDGET;
    let (decoded, held) = HEAP.measure(|| decode_ws_frame(frame, &LIMITS, budget));
    let Ok(msg) = decoded else {
        return;
    };
    // The codec (which the agent library also uses) agrees on every frame the gateway takes.
    // Compared as re-encoded bytes: an attribute's double may be a NaN, never equal to itself.
    let codec = shared::codec::decode_ws::<AgentToServer>(frame, usize::MAX)
        .expect("the codec decodes what the gateway took");
    assert_eq!(
        codec.encode_to_vec(),
        msg.encode_to_vec(),
        "gateway and codec disagree"
    );

    // The budget taken before decoding covers what decoding held.
    let body = match frame.first() {
        Some(0) => &frame[1..],
        _ => frame,
    };
    let cost = decode_cost(body, &LIMITS).expect("an accepted body passes the scan");
    // The budget is taken in whole KiB, at least one: what it really holds back. (The cost
    // alone is exceeded by a few bytes for tiny fields, e.g. a 1-byte instance_uid allocates
    // a Vec's minimum of 8.)
    let charged = cost.div_ceil(BUDGET_UNIT).max(1) * BUDGET_UNIT;
    assert!(
        held <= charged,
        "decoding {} bytes held {held} bytes, the budget charged {charged}",
        body.len()
    );
});
