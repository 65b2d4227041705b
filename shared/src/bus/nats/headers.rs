//! The headers that carry the transport's own signalling (`Ampora-Chunk`, `Ampora-Pull`,
//! `Ampora-Error`, `Ampora-Batch`), reading a header off a message, and the strict parsers of the first two.
//! A leaf shared by the sending side, the receiving side and the reassembly.

use async_nats::Message;

pub(super) const H_CHUNK: &str = "Ampora-Chunk";
pub(super) const H_PULL: &str = "Ampora-Pull";
pub(super) const H_ERROR: &str = "Ampora-Error";
/// On a coalesced message (`batch`): the payload is a `Batch` of this many envelopes.
pub(super) const H_BATCH: &str = "Ampora-Batch";

pub(super) fn header<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

/// `Ampora-Pull: <fetch-subject> <msg-id> <total-bytes>`.
pub(super) struct Pull<'a> {
    pub(super) fetch: &'a str,
    pub(super) msg_id: &'a str,
    pub(super) len: usize,
}

impl<'a> Pull<'a> {
    pub(super) fn parse(value: &'a str) -> Option<Self> {
        let mut parts = value.split(' ');
        let pull = Pull {
            fetch: parts.next()?,
            msg_id: parts.next()?,
            len: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(pull)
    }
}

/// `Ampora-Chunk: <msg-id> <index> <count> <total-bytes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChunkHeader<'a> {
    pub(super) msg_id: &'a str,
    pub(super) index: usize,
    pub(super) count: usize,
    pub(super) total: usize,
}

impl<'a> ChunkHeader<'a> {
    pub(super) fn parse(value: &'a str) -> Option<Self> {
        let mut parts = value.split(' ');
        let h = ChunkHeader {
            msg_id: parts.next()?,
            index: parts.next()?.parse().ok()?,
            count: parts.next()?.parse().ok()?,
            total: parts.next()?.parse().ok()?,
        };
        let valid = parts.next().is_none() && !h.msg_id.is_empty() && h.index < h.count;
        valid.then_some(h)
    }
}
