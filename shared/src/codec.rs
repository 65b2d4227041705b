//! OpAMP WebSocket message framing (spec §WebSocket Message Format).
//!
//! Every WebSocket data message is `header ‖ data`: the header is a base-128 varint that is
//! always 0 in this spec version (so one `0x00` byte when we encode), `data` a protobuf
//! `AgentToServer` or `ServerToAgent`. Plain HTTP carries bare protobuf and does not use this
//! module's framing.
//!
//! Here, not in the gateway, because both ends use it: the gateway's WebSocket transport and
//! the agent library (`agent`).
//!
//! Pure functions only: no I/O, no metrics. Callers count rejections with
//! [`FrameError::reason`].

use proto::{Message, ServerToAgent};

/// The only header value this spec version defines.
pub const WS_HEADER: u8 = 0x00;

/// Longest legal base-128 varint for a u64.
const MAX_VARINT_LEN: usize = 10;

/// Why an inbound WebSocket message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The message (header included) is larger than the configured inbound limit.
    #[error("message of {len} bytes exceeds the {max} byte limit")]
    Oversize { len: usize, max: usize },
    /// A well-formed header carrying a value other than 0 (a framing version we don't speak).
    #[error("unsupported websocket message header")]
    BadHeader,
    /// Not a valid protobuf message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The `reason` label of `ampora_opamp_frames_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Oversize { .. } => "oversize",
            Self::BadHeader | Self::Malformed(_) => "malformed",
        }
    }
}

/// Frames a `ServerToAgent` for the WebSocket transport.
pub fn encode_ws(msg: &ServerToAgent) -> Vec<u8> {
    encode_ws_message(msg)
}

/// Frames any OpAMP message (the client uses this for `AgentToServer`).
pub fn encode_ws_message<M: Message>(msg: &M) -> Vec<u8> {
    let mut buf = Vec::with_capacity(1 + msg.encoded_len());
    buf.push(WS_HEADER);
    // A Vec grows on demand, so encoding into it cannot run out of capacity; the Result only
    // exists for fixed-size buffers.
    let _ = msg.encode(&mut buf);
    buf
}

/// Decodes one inbound WebSocket message of at most `max` bytes (header included).
///
/// Legacy tolerance, as opamp-go does it: a message whose first byte is not `0x00` is taken
/// to be a pre-v0.7 header-less protobuf. That is unambiguous for valid messages because a
/// protobuf message never starts with byte 0 (field number 0 is illegal). Only when such a
/// message does not parse as protobuf do we look for a non-zero varint header in front of a
/// valid body and report [`FrameError::BadHeader`] instead of [`FrameError::Malformed`].
pub fn decode_ws<M: Message + Default>(frame: &[u8], max: usize) -> Result<M, FrameError> {
    if frame.len() > max {
        return Err(FrameError::Oversize {
            len: frame.len(),
            max,
        });
    }
    match frame.first() {
        // An empty message carries neither header nor fields: all fields unset.
        None => Ok(M::default()),
        // The varint 0 is exactly the one byte 0x00 (no continuation bit).
        Some(&WS_HEADER) => decode_body(&frame[1..]),
        Some(_) => match M::decode(frame) {
            Ok(msg) => Ok(msg),
            Err(legacy_err) => match read_varint(frame) {
                Some((header, len)) if header != 0 && M::decode(&frame[len..]).is_ok() => {
                    Err(FrameError::BadHeader)
                }
                _ => Err(FrameError::Malformed(legacy_err.to_string())),
            },
        },
    }
}

fn decode_body<M: Message + Default>(data: &[u8]) -> Result<M, FrameError> {
    M::decode(data).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads a base-128 varint from the front of `buf`: `(value, bytes used)`, or `None` when it
/// is truncated, longer than 10 bytes or overflows u64. The gateway's frame scanner reads
/// headers and protobuf lengths with it.
pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let bits = u64::from(byte & 0x7F);
        // The 10th byte may only contribute the top bit of a u64.
        if i == MAX_VARINT_LEN - 1 && bits > 1 {
            return None;
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::AgentToServer;

    fn agent_msg() -> AgentToServer {
        AgentToServer {
            instance_uid: vec![7; 16],
            sequence_num: 42,
            capabilities: 0x1,
            ..Default::default()
        }
    }

    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn round_trip_server_to_agent() {
        let msg = ServerToAgent {
            instance_uid: vec![0xAB; 16],
            capabilities: 0x67,
            ..Default::default()
        };
        let bytes = encode_ws(&msg);
        let back: ServerToAgent = decode_ws(&bytes, 1024).expect("decodes");
        assert_eq!(back, msg);
    }

    #[test]
    fn round_trip_agent_to_server() {
        let bytes = encode_ws_message(&agent_msg());
        let back: AgentToServer = decode_ws(&bytes, 1024).expect("decodes");
        assert_eq!(back, agent_msg());
    }

    #[test]
    fn encoder_writes_zero_header_then_protobuf() {
        // opamp-facts §1.4: `00` `0A 10 <uid>` `38 67`.
        let msg = ServerToAgent {
            instance_uid: vec![0xAB; 16],
            capabilities: 0x67,
            ..Default::default()
        };
        let bytes = encode_ws(&msg);
        assert_eq!(bytes[0], 0x00);
        assert_eq!(&bytes[1..3], &[0x0A, 0x10]);
        assert_eq!(&bytes[19..], &[0x38, 0x67]);
        assert_eq!(&bytes[1..], msg.encode_to_vec().as_slice());
    }

    #[test]
    fn empty_message_is_header_only() {
        assert_eq!(encode_ws(&ServerToAgent::default()), vec![0x00]);
    }

    #[test]
    fn legacy_headerless_frame_decodes() {
        let bytes = agent_msg().encode_to_vec();
        assert_ne!(bytes[0], 0);
        let back: AgentToServer = decode_ws(&bytes, 1024).expect("legacy decodes");
        assert_eq!(back, agent_msg());
    }

    #[test]
    fn empty_data_is_valid() {
        let with_header: AgentToServer = decode_ws(&[0x00], 16).expect("header only");
        assert_eq!(with_header, AgentToServer::default());
        let nothing: AgentToServer = decode_ws(&[], 16).expect("empty");
        assert_eq!(nothing, AgentToServer::default());
    }

    #[test]
    fn empty_but_present_submessage_survives() {
        // agent_disconnect (field 9) present and empty: presence is the signal.
        let back: AgentToServer = decode_ws(&[0x00, 0x4A, 0x00], 16).expect("decodes");
        assert!(back.agent_disconnect.is_some());
    }

    #[test]
    fn garbage_is_malformed() {
        let err =
            decode_ws::<AgentToServer>(&[0x00, 0xFF, 0xFF, 0xFF], 1024).expect_err("must fail");
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
        assert_eq!(err.reason(), "malformed");
        let err = decode_ws::<AgentToServer>(b"hello world", 1024).expect_err("must fail");
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
        // Truncated length-delimited field after a valid header.
        let err =
            decode_ws::<AgentToServer>(&[0x00, 0x0A, 0x10, 1, 2], 1024).expect_err("must fail");
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn oversize_is_refused_before_decoding() {
        let bytes = encode_ws_message(&agent_msg());
        let max = bytes.len() - 1;
        let err = decode_ws::<AgentToServer>(&bytes, max).expect_err("must fail");
        assert_eq!(
            err,
            FrameError::Oversize {
                len: bytes.len(),
                max
            }
        );
        assert_eq!(err.reason(), "oversize");
        // Exactly at the limit is fine.
        assert!(decode_ws::<AgentToServer>(&bytes, bytes.len()).is_ok());
    }

    #[test]
    fn nonzero_ten_byte_header_is_bad_header() {
        let mut bytes = varint(u64::MAX);
        assert_eq!(bytes.len(), 10);
        bytes.extend(agent_msg().encode_to_vec());
        let err = decode_ws::<AgentToServer>(&bytes, 1024).expect_err("must fail");
        assert_eq!(err, FrameError::BadHeader);
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn overlong_varint_is_malformed() {
        let mut bytes = vec![0xFF; 11];
        bytes.push(0x00);
        let err = decode_ws::<AgentToServer>(&bytes, 1024).expect_err("must fail");
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn varint_reader_matches_encoder() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let enc = varint(v);
            assert_eq!(read_varint(&enc), Some((v, enc.len())));
        }
        assert_eq!(read_varint(&[0x80]), None, "truncated");
        assert_eq!(read_varint(&[]), None);
    }
}
