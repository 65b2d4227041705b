//! Decoding an inbound `AgentToServer` without letting its sender choose our memory use.
//!
//! A decoded message costs far more than its encoding: an empty attribute is 2 bytes on the wire
//! and well over 100 in memory, so a 4 MiB description of empty attributes used to decode to
//! ~240 MB. Three guards, in order:
//! 1. a pre-scan of the wire bytes ([`scan`]: no allocation, stops at the first limit) counts
//!    the repeated and map entries per kind ([`FrameLimits`]) and refuses a message over a limit
//!    (`too_many_fields`) before anything is decoded;
//! 2. the scan's counts give an upper bound of the decoded size, which is taken from this
//!    gateway's [`DecodeBudget`] before decoding and held until the coordinator has answered;
//!    when the budget is spent the frame is refused at once (`memory_budget`: 503 /
//!    Unavailable with a retry delay) instead of queueing;
//! 3. large frames are scanned and decoded on the blocking pool, never on the async workers.

use std::sync::Arc;

use proto::{AgentToServer, Message};
use shared::codec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits on repeated-field entries in one `AgentToServer`, nested ones included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Key-values and array values (descriptions, health and component attributes).
    pub attributes: usize,
    /// Component health entries and available-component entries.
    pub components: usize,
    /// Files of the effective config.
    pub config_files: usize,
    /// Entries of any kind (the above, packages, custom capabilities).
    pub entries: usize,
}

impl Default for FrameLimits {
    /// Far above what real agents send (a Collector describes itself in tens of attributes and
    /// lists a few hundred components), far below what a hostile 4 MiB frame can hold.
    fn default() -> Self {
        Self {
            attributes: 4096,
            components: 4096,
            config_files: 256,
            entries: 16_384,
        }
    }
}

/// Default [`DecodeBudget`] size.
pub const DEFAULT_DECODE_BUDGET_BYTES: usize = 256 << 20;

/// Frames larger than this are scanned and decoded on the blocking pool: below it a decode
/// takes microseconds, and a hop to another thread would cost more than it saves.
const INLINE_DECODE_MAX: usize = 64 << 10;

/// Deeper nesting than any real agent sends (an attribute inside a key-value list costs three
/// levels, a nested component two); prost itself stops at 100.
const MAX_DEPTH: usize = 64;

/// Upper bound of the memory one decoded message node (a struct in a `Vec` or map) takes,
/// growth slack included; see the `node_cost_covers_the_generated_types` test.
const NODE_BYTES: usize = 512;

/// Upper bound of the first allocation of a map (`BTreeMap`, prost's `btree_map`): a leaf node
/// of 11 entries however few it holds; see `map_cost_covers_a_btree_leaf`. Fuzzing found a
/// one-entry map holding 2216 bytes where its entry was charged one node.
const MAP_BYTES: usize = 4096;

/// Budget accounting unit: permits are KiB, so a u32 count covers any budget.
const UNIT: usize = 1024;

/// The memory this gateway lets decoded messages take at once.
#[derive(Debug, Clone)]
pub struct DecodeBudget {
    permits: Arc<Semaphore>,
    total: u32,
}

impl DecodeBudget {
    pub fn new(bytes: usize) -> Self {
        let total = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Takes `bytes` from the budget, or `None` when it is not available now. A frame that
    /// costs more than the whole budget takes all of it: alone it may pass.
    fn try_take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total);
        self.permits.clone().try_acquire_many_owned(units).ok()
    }

    /// The bytes available right now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.permits.available_permits() * UNIT
    }
}

/// Why a frame was not decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum DecodeError {
    #[error("malformed AgentToServer: {0}")]
    Malformed(String),
    #[error("unsupported websocket message header")]
    BadHeader,
    #[error("AgentToServer has more than {limit} {what}")]
    TooMany {
        what: &'static str,
        limit: usize,
        /// The message's `instance_uid`, when the scan got that far (for the reply).
        instance_uid: Vec<u8>,
    },
    #[error("server busy decoding other messages, retry later")]
    Busy,
}

impl DecodeError {
    /// The `reason` label of `ampora_opamp_frames_rejected_total`.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::BadHeader => "malformed",
            Self::TooMany { .. } => "too_many_fields",
            Self::Busy => "memory_budget",
        }
    }
}

/// A decoded message and its share of the budget; drop it once the message is gone.
pub(super) struct Decoded {
    pub msg: AgentToServer,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// How the bytes are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// Bare protobuf (plain HTTP).
    Plain,
    /// The WebSocket message format (`codec`): a varint header 0, or a legacy header-less body.
    WebSocket,
}

/// Checks, budgets and decodes `bytes` (see the module comment).
pub(super) async fn decode(
    bytes: Vec<u8>,
    framing: Framing,
    limits: FrameLimits,
    budget: &DecodeBudget,
) -> Result<Decoded, DecodeError> {
    if bytes.len() <= INLINE_DECODE_MAX {
        return decode_sync(&bytes, framing, &limits, budget);
    }
    let budget = budget.clone();
    tokio::task::spawn_blocking(move || decode_sync(&bytes, framing, &limits, &budget))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "decoding task failed");
            Err(DecodeError::Busy)
        })
}

pub(super) fn decode_sync(
    bytes: &[u8],
    framing: Framing,
    limits: &FrameLimits,
    budget: &DecodeBudget,
) -> Result<Decoded, DecodeError> {
    let body = match framing {
        Framing::Plain => bytes,
        // An empty message carries neither header nor fields: all fields unset.
        Framing::WebSocket if bytes.is_empty() => bytes,
        Framing::WebSocket if bytes[0] == codec::WS_HEADER => &bytes[1..],
        // Legacy header-less protobuf (see `codec::decode_ws`).
        Framing::WebSocket => {
            return decode_body(bytes, limits, budget).map_err(|e| match e {
                DecodeError::Malformed(_) if has_bad_header(bytes, limits) => {
                    DecodeError::BadHeader
                }
                e => e,
            })
        }
    };
    decode_body(body, limits, budget)
}

/// A non-zero varint header in front of a well-formed body: a framing version we don't speak.
fn has_bad_header(frame: &[u8], limits: &FrameLimits) -> bool {
    codec::read_varint(frame)
        .is_some_and(|(header, len)| header != 0 && scan(&frame[len..], limits).is_ok())
}

fn decode_body(
    body: &[u8],
    limits: &FrameLimits,
    budget: &DecodeBudget,
) -> Result<Decoded, DecodeError> {
    let counts = scan(body, limits)?;
    let permit = budget.try_take(counts.cost(body.len()));
    let Some(permit) = permit else {
        return Err(DecodeError::Busy);
    };
    let msg = AgentToServer::decode(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(Decoded {
        msg,
        permit: Some(permit),
    })
}

// ---------------------------------------------------------------------------------------------
// The pre-scan.

/// What the scan found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Counts {
    pub attributes: usize,
    pub components: usize,
    pub config_files: usize,
    pub entries: usize,
    /// Every message that decoding will allocate a struct for (entries and nested messages).
    pub nodes: usize,
    /// Maps with at least one entry, each a B-tree leaf however small.
    pub maps: usize,
}

impl Counts {
    /// An upper bound of the memory decoding `len` bytes with these counts takes, the encoded
    /// bytes included: strings and bytes are copies of at most `len`, every node a struct.
    pub(super) fn cost(&self, len: usize) -> usize {
        len.saturating_mul(2)
            .saturating_add(self.nodes.saturating_mul(NODE_BYTES))
            .saturating_add(self.maps.saturating_mul(MAP_BYTES))
    }
}

/// The message types whose fields the scan must look into: those that hold repeated fields,
/// and the ones on the way to them. Every other field is skipped by its wire type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    AgentToServer,
    AgentDescription,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
    ComponentHealth,
    /// A `component_health_map` entry (key, ComponentHealth).
    HealthEntry,
    EffectiveConfig,
    AgentConfigMap,
    PackageStatuses,
    CustomCapabilities,
    AvailableComponents,
    /// A `components` / `sub_component_map` entry (key, ComponentDetails).
    ComponentEntry,
    ComponentDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Attribute,
    Component,
    ConfigFile,
    /// Counted only among all entries.
    Other,
}

/// What a field of a [`Msg`] is to the scan.
enum Field {
    /// Skipped.
    Leaf,
    /// A singular submessage to look into.
    Message(Msg),
    /// One entry of a repeated field or map, of `Kind`, looked into when it has a `Msg`.
    Entry(Kind, Option<Msg>),
}

/// The schema the scan follows (field numbers of `opamp.proto` / `anyvalue.proto`).
fn field(msg: Msg, number: u64) -> Field {
    use Field::{Entry, Leaf, Message};
    match (msg, number) {
        (Msg::AgentToServer, 3) => Message(Msg::AgentDescription),
        (Msg::AgentToServer, 5) => Message(Msg::ComponentHealth),
        (Msg::AgentToServer, 6) => Message(Msg::EffectiveConfig),
        (Msg::AgentToServer, 8) => Message(Msg::PackageStatuses),
        (Msg::AgentToServer, 12) => Message(Msg::CustomCapabilities),
        (Msg::AgentToServer, 14) => Message(Msg::AvailableComponents),
        (Msg::AgentDescription, 1 | 2) => Entry(Kind::Attribute, Some(Msg::KeyValue)),
        (Msg::KeyValue, 2) => Message(Msg::AnyValue),
        (Msg::AnyValue, 5) => Message(Msg::ArrayValue),
        (Msg::AnyValue, 6) => Message(Msg::KeyValueList),
        (Msg::ArrayValue, 1) => Entry(Kind::Attribute, Some(Msg::AnyValue)),
        (Msg::KeyValueList, 1) => Entry(Kind::Attribute, Some(Msg::KeyValue)),
        (Msg::ComponentHealth, 6) => Entry(Kind::Component, Some(Msg::HealthEntry)),
        (Msg::ComponentHealth, 7) => Entry(Kind::Attribute, Some(Msg::KeyValue)),
        (Msg::HealthEntry, 2) => Message(Msg::ComponentHealth),
        (Msg::EffectiveConfig, 1) => Message(Msg::AgentConfigMap),
        (Msg::AgentConfigMap, 1) => Entry(Kind::ConfigFile, None),
        (Msg::PackageStatuses, 1) => Entry(Kind::Other, None),
        (Msg::CustomCapabilities, 1) => Entry(Kind::Other, None),
        (Msg::AvailableComponents, 1) => Entry(Kind::Component, Some(Msg::ComponentEntry)),
        (Msg::ComponentEntry, 2) => Message(Msg::ComponentDetails),
        (Msg::ComponentDetails, 1) => Entry(Kind::Attribute, Some(Msg::KeyValue)),
        (Msg::ComponentDetails, 2) => Entry(Kind::Component, Some(Msg::ComponentEntry)),
        _ => Leaf,
    }
}

/// Whether a field is a map (the rest of the `Entry` fields are repeated fields: `Vec`s).
fn is_map(msg: Msg, number: u64) -> bool {
    matches!(
        (msg, number),
        (Msg::ComponentHealth, 6)
            | (Msg::AgentConfigMap, 1)
            | (Msg::PackageStatuses, 1)
            | (Msg::AvailableComponents, 1)
            | (Msg::ComponentDetails, 2)
    )
}

/// Walks the wire bytes of an `AgentToServer`, counting entries; fails at the first limit
/// passed or at bytes that are not protobuf.
pub(super) fn scan(body: &[u8], limits: &FrameLimits) -> Result<Counts, DecodeError> {
    let mut s = Scan {
        limits,
        counts: Counts::default(),
        instance_uid: None,
    };
    match s.message(body, Msg::AgentToServer, 0) {
        Ok(()) => Ok(s.counts),
        Err(ScanError::Malformed(why)) => Err(DecodeError::Malformed(why.into())),
        Err(ScanError::TooMany(what, limit)) => Err(DecodeError::TooMany {
            what,
            limit,
            instance_uid: s.instance_uid.map(<[u8]>::to_vec).unwrap_or_default(),
        }),
    }
}

enum ScanError {
    Malformed(&'static str),
    TooMany(&'static str, usize),
}

struct Scan<'a, 'b> {
    limits: &'a FrameLimits,
    counts: Counts,
    /// The top-level `instance_uid` (field 1), once seen.
    instance_uid: Option<&'b [u8]>,
}

impl<'b> Scan<'_, 'b> {
    fn message(&mut self, mut buf: &'b [u8], msg: Msg, depth: usize) -> Result<(), ScanError> {
        if depth > MAX_DEPTH {
            return Err(ScanError::TooMany("nesting levels", MAX_DEPTH));
        }
        // No message type has more than one map field.
        let mut has_map = false;
        while !buf.is_empty() {
            let (tag, n) = varint(buf)?;
            buf = &buf[n..];
            let number = tag >> 3;
            if number == 0 {
                return Err(ScanError::Malformed("field number 0"));
            }
            let kind = field(msg, number);
            if !matches!(kind, Field::Leaf) && tag & 7 != 2 {
                return Err(ScanError::Malformed(
                    "a message field with a scalar wire type",
                ));
            }
            match tag & 7 {
                0 => buf = &buf[varint(buf)?.1..],
                1 => buf = skip(buf, 8)?,
                5 => buf = skip(buf, 4)?,
                2 => {
                    let (len, n) = varint(buf)?;
                    let len = usize::try_from(len).map_err(|_| truncated())?;
                    let rest = &buf[n..];
                    if rest.len() < len {
                        return Err(truncated());
                    }
                    let (value, after) = rest.split_at(len);
                    buf = after;
                    if msg == Msg::AgentToServer && number == 1 {
                        self.instance_uid = Some(value);
                    }
                    match kind {
                        Field::Leaf => {}
                        Field::Message(m) => {
                            self.counts.nodes += 1;
                            self.message(value, m, depth + 1)?;
                        }
                        Field::Entry(kind, m) => {
                            self.entry(kind)?;
                            if !has_map && is_map(msg, number) {
                                has_map = true;
                                self.counts.maps += 1;
                            }
                            if let Some(m) = m {
                                self.message(value, m, depth + 1)?;
                            }
                        }
                    }
                }
                // Groups (3, 4) are long deprecated and no OpAMP field uses them.
                _ => return Err(ScanError::Malformed("unsupported wire type")),
            }
        }
        Ok(())
    }

    fn entry(&mut self, kind: Kind) -> Result<(), ScanError> {
        let l = self.limits;
        let c = &mut self.counts;
        c.nodes += 1;
        c.entries += 1;
        if c.entries > l.entries {
            return Err(ScanError::TooMany("entries", l.entries));
        }
        let (count, limit, what) = match kind {
            Kind::Attribute => (&mut c.attributes, l.attributes, "attributes"),
            Kind::Component => (&mut c.components, l.components, "components"),
            Kind::ConfigFile => (&mut c.config_files, l.config_files, "config files"),
            Kind::Other => return Ok(()),
        };
        *count += 1;
        if *count > limit {
            return Err(ScanError::TooMany(what, limit));
        }
        Ok(())
    }
}

fn truncated() -> ScanError {
    ScanError::Malformed("truncated field")
}

fn varint(buf: &[u8]) -> Result<(u64, usize), ScanError> {
    codec::read_varint(buf).ok_or(ScanError::Malformed("invalid varint"))
}

fn skip(buf: &[u8], n: usize) -> Result<&[u8], ScanError> {
    buf.get(n..).ok_or_else(truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{
        any_value, AgentConfigFile, AgentConfigMap, AgentDescription, AnyValue, ArrayValue,
        AvailableComponents, ComponentDetails, ComponentHealth, EffectiveConfig, KeyValue,
        KeyValueList,
    };

    fn kv(key: &str, value: Option<any_value::Value>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.map(|v| AnyValue { value: Some(v) }),
        }
    }

    fn with_attributes(n: usize) -> AgentToServer {
        AgentToServer {
            instance_uid: vec![7; 16],
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue::default(); n],
                non_identifying_attributes: Vec::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn counts_every_kind_of_entry_nested_ones_included() {
        let nested = kv(
            "k8s",
            Some(any_value::Value::KvlistValue(KeyValueList {
                values: vec![
                    kv("a", Some(any_value::Value::StringValue("x".into()))),
                    kv(
                        "b",
                        Some(any_value::Value::ArrayValue(ArrayValue {
                            values: vec![AnyValue::default(); 3],
                        })),
                    ),
                ],
            })),
        );
        let health = ComponentHealth {
            component_health_map: [(
                "pipeline".to_string(),
                ComponentHealth {
                    component_health_map: [("receiver".to_string(), ComponentHealth::default())]
                        .into(),
                    attributes: vec![KeyValue::default()],
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![nested],
                non_identifying_attributes: vec![KeyValue::default()],
            }),
            health: Some(health),
            effective_config: Some(EffectiveConfig {
                config_map: Some(AgentConfigMap {
                    config_map: [
                        ("a.yaml".to_string(), AgentConfigFile::default()),
                        ("b.yaml".to_string(), AgentConfigFile::default()),
                    ]
                    .into(),
                }),
            }),
            available_components: Some(AvailableComponents {
                components: [(
                    "receivers".to_string(),
                    ComponentDetails {
                        metadata: vec![KeyValue::default()],
                        sub_component_map: [("otlp".to_string(), ComponentDetails::default())]
                            .into(),
                    },
                )]
                .into(),
                hash: vec![1],
            }),
            custom_capabilities: Some(proto::v1::CustomCapabilities {
                capabilities: vec!["a".into(), "b".into()],
            }),
            ..Default::default()
        };
        let counts = scan(&msg.encode_to_vec(), &FrameLimits::default()).expect("within limits");
        // 1 + 2 + 3 in the description, 1 health, 1 component metadata.
        assert_eq!(counts.attributes, 1 + 2 + 3 + 1 + 1 + 1);
        assert_eq!(counts.components, 2 + 2);
        assert_eq!(counts.config_files, 2);
        assert_eq!(counts.entries, 9 + 4 + 2 + 2);
    }

    #[test]
    fn limits_refuse_before_decoding_with_the_instance_uid() {
        let limits = FrameLimits {
            attributes: 10,
            ..FrameLimits::default()
        };
        assert!(scan(&with_attributes(10).encode_to_vec(), &limits).is_ok());
        let err = scan(&with_attributes(11).encode_to_vec(), &limits).expect_err("over");
        assert_eq!(err.reason(), "too_many_fields");
        assert_eq!(
            err,
            DecodeError::TooMany {
                what: "attributes",
                limit: 10,
                instance_uid: vec![7; 16]
            }
        );
        let limits = FrameLimits {
            entries: 5,
            ..FrameLimits::default()
        };
        let err = scan(&with_attributes(6).encode_to_vec(), &limits).expect_err("over");
        assert!(matches!(
            err,
            DecodeError::TooMany {
                what: "entries",
                ..
            }
        ));
        let config = |n: usize| AgentToServer {
            effective_config: Some(EffectiveConfig {
                config_map: Some(AgentConfigMap {
                    config_map: (0..n)
                        .map(|i| (i.to_string(), AgentConfigFile::default()))
                        .collect(),
                }),
            }),
            ..Default::default()
        };
        let limits = FrameLimits {
            config_files: 3,
            ..FrameLimits::default()
        };
        assert!(scan(&config(3).encode_to_vec(), &limits).is_ok());
        let err = scan(&config(4).encode_to_vec(), &limits).expect_err("over");
        assert!(matches!(
            err,
            DecodeError::TooMany {
                what: "config files",
                ..
            }
        ));
    }

    /// The hostile frame of the security review: a 4 MiB description of empty attributes.
    #[test]
    fn a_description_of_two_million_empty_attributes_is_refused() {
        let bytes = with_attributes(2_000_000).encode_to_vec();
        assert!(bytes.len() <= 4 << 20);
        let err = scan(&bytes, &FrameLimits::default()).expect_err("refused");
        assert_eq!(err.reason(), "too_many_fields");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = AnyValue::default();
        for _ in 0..40 {
            v = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![v] })),
            };
        }
        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue {
                    key: "deep".into(),
                    value: Some(v),
                }],
                non_identifying_attributes: Vec::new(),
            }),
            ..Default::default()
        };
        let err = scan(&msg.encode_to_vec(), &FrameLimits::default()).expect_err("too deep");
        assert!(matches!(
            err,
            DecodeError::TooMany {
                what: "nesting levels",
                ..
            }
        ));
    }

    #[test]
    fn the_scan_refuses_what_prost_refuses() {
        let limits = FrameLimits::default();
        for bad in [
            &[0xFF, 0xFF, 0xFF][..], // truncated varint
            &[0x1A, 0x05, 0x0A][..], // description longer than the message
            &[0x00][..],             // field number 0
            &[0x1B][..],             // start group
            &[0x20][..],             // capabilities without its varint
            &[0x1D, 0, 0, 0, 0][..], // description with a fixed32 wire type
        ] {
            assert!(scan(bad, &limits).is_err(), "{bad:?}");
            assert!(AgentToServer::decode(bad).is_err(), "{bad:?}");
        }
        // Unknown fields are skipped, as prost does.
        let unknown = [0xA0, 0x06, 0x01, 0xAA, 0x06, 0x01, 0x00];
        assert!(scan(&unknown, &limits).is_ok());
        assert!(AgentToServer::decode(&unknown[..]).is_ok());
    }

    #[test]
    fn node_cost_covers_the_generated_types() {
        use std::mem::size_of;
        let largest = [
            size_of::<KeyValue>(),
            size_of::<AnyValue>(),
            size_of::<ComponentHealth>() + size_of::<String>(),
            size_of::<ComponentDetails>() + size_of::<String>(),
            size_of::<AgentConfigFile>() + size_of::<String>(),
            size_of::<proto::v1::PackageStatus>() + size_of::<String>(),
        ]
        .into_iter()
        .max()
        .unwrap_or_default();
        // Vecs may double while growing; map nodes add a few words per entry.
        assert!(
            2 * largest + 64 <= NODE_BYTES,
            "largest node {largest} bytes"
        );
    }

    #[test]
    fn map_cost_covers_a_btree_leaf() {
        use std::mem::size_of;
        let largest_entry = [
            size_of::<ComponentHealth>(),
            size_of::<ComponentDetails>(),
            size_of::<AgentConfigFile>(),
            size_of::<proto::v1::PackageStatus>(),
        ]
        .into_iter()
        .max()
        .unwrap_or_default()
            + size_of::<String>();
        // A leaf node: 11 keys and values, a parent pointer and two u16s.
        assert!(
            11 * largest_entry + 64 <= MAP_BYTES,
            "largest map entry {largest_entry} bytes"
        );
    }

    /// Fuzzing finding (tests/fuzz/corpus/ws_frame/found-one-entry-map): a map of one entry
    /// allocates a whole B-tree leaf, 2216 bytes for one `PackageStatus`, but was charged as one
    /// node. Nested one-entry health maps multiplied that by the component limit.
    #[test]
    fn every_map_is_charged_a_btree_leaf() {
        // package_statuses { packages { "" : {} } }, as the fuzzer sent it.
        let found = [0x42, 0x02, 0x0A, 0x00];
        let counts = scan(&found, &FrameLimits::default()).expect("scans");
        assert!(counts.cost(found.len()) >= MAP_BYTES, "{counts:?}");

        let mut health = ComponentHealth::default();
        for i in 0..20 {
            health = ComponentHealth {
                component_health_map: [(i.to_string(), health)].into(),
                ..Default::default()
            };
        }
        let msg = AgentToServer {
            health: Some(health),
            ..Default::default()
        };
        let bytes = msg.encode_to_vec();
        let counts = scan(&bytes, &FrameLimits::default()).expect("scans");
        assert_eq!(counts.maps, 20);
        assert!(counts.cost(bytes.len()) >= 20 * MAP_BYTES);
    }

    #[tokio::test]
    async fn the_budget_refuses_at_once_when_spent_and_comes_back() {
        let bytes = with_attributes(100).encode_to_vec();
        let cost = scan(&bytes, &FrameLimits::default())
            .expect("scan")
            .cost(bytes.len());
        // Room for one such message, not two.
        let budget = DecodeBudget::new(cost + cost / 2);
        let limits = FrameLimits::default();
        let first = decode(bytes.clone(), Framing::Plain, limits, &budget)
            .await
            .expect("fits");
        assert_eq!(first.msg, with_attributes(100));
        let second = decode(bytes.clone(), Framing::Plain, limits, &budget).await;
        assert_eq!(second.err(), Some(DecodeError::Busy));
        drop(first);
        assert_eq!(budget.available(), (cost + cost / 2).div_ceil(UNIT) * UNIT);
        assert!(decode(bytes, Framing::Plain, limits, &budget).await.is_ok());

        // A message costing more than the whole budget still passes alone.
        let big = with_attributes(4000).encode_to_vec();
        let alone = decode(big.clone(), Framing::Plain, limits, &budget).await;
        assert!(alone.is_ok());
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test]
    async fn large_frames_decode_off_the_async_workers() {
        // Above INLINE_DECODE_MAX: decoded on the blocking pool, same result.
        let mut msg = with_attributes(3000);
        msg.capabilities = 5;
        let mut bytes = vec![codec::WS_HEADER];
        bytes.extend(msg.encode_to_vec());
        let mut big = msg.clone();
        big.custom_message = Some(proto::v1::CustomMessage {
            data: vec![1; INLINE_DECODE_MAX],
            ..Default::default()
        });
        let mut big_bytes = vec![codec::WS_HEADER];
        big_bytes.extend(big.encode_to_vec());
        let budget = DecodeBudget::new(DEFAULT_DECODE_BUDGET_BYTES);
        let limits = FrameLimits::default();
        let d = decode(bytes, Framing::WebSocket, limits, &budget)
            .await
            .expect("inline");
        assert_eq!(d.msg, msg);
        let d = decode(big_bytes, Framing::WebSocket, limits, &budget)
            .await
            .expect("blocking pool");
        assert_eq!(d.msg, big);
    }

    #[tokio::test]
    async fn websocket_framing_as_the_codec_has_it() {
        let budget = DecodeBudget::new(DEFAULT_DECODE_BUDGET_BYTES);
        let limits = FrameLimits::default();
        let msg = with_attributes(2);
        let ws = |bytes: Vec<u8>| decode(bytes, Framing::WebSocket, limits, &budget);
        // Legacy header-less.
        assert_eq!(ws(msg.encode_to_vec()).await.expect("legacy").msg, msg);
        // Empty.
        assert_eq!(
            ws(Vec::new()).await.expect("empty").msg,
            AgentToServer::default()
        );
        // A non-zero header in front of a valid body.
        let mut bad = vec![0x05];
        bad.extend(msg.encode_to_vec());
        assert_eq!(ws(bad).await.err(), Some(DecodeError::BadHeader));
        assert!(matches!(
            ws(b"hello world".to_vec()).await.err(),
            Some(DecodeError::Malformed(_))
        ));
    }
}
