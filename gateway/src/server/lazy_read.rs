//! Reading WebSocket frames without a read buffer while the connection is idle.
//!
//! fastwebsockets' reader allocates an 8 KiB buffer when it is created and keeps it for its
//! whole life; it has no way to shrink or release it. Held agents are idle almost all the time,
//! and at 10,000 of them those buffers were the largest item of the gateway's heap (80 MB).
//!
//! So a connection keeps only its raw read half and [`CARRY`] bytes. [`LazyReader::read_frame`]
//! waits for the first bytes of a frame in that small buffer, works out from the header how
//! long the frame is, and only then creates a fastwebsockets reader, over a view that yields
//! exactly that one frame: the carried bytes, then the socket limited to the rest. Having read
//! the frame, the reader (and its buffer) is dropped. Nothing is lost with it: the view never
//! gives it a byte past the frame's end, and bytes of the next frame that arrived in the carry
//! buffer stay there. fastwebsockets still does all the decoding and validation; the length
//! is the only part of the header read here.

use fastwebsockets::{Frame, OpCode, Role, WebSocketError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read ahead into the connection's own buffer: a complete frame header (at most 14
/// bytes) and, in the same read, a small message whole. Heartbeats are a few dozen bytes.
pub(super) const CARRY: usize = 128;

/// One frame, as the connection task needs it.
pub(super) struct ReadFrame {
    pub opcode: OpCode,
    pub fin: bool,
    pub payload: Vec<u8>,
}

pub(super) struct LazyReader<R> {
    inner: R,
    carry: [u8; CARRY],
    /// `carry[start..end]` holds bytes read from the socket and not yet given out.
    start: usize,
    end: usize,
    max_message_size: usize,
}

impl<R: AsyncRead + Unpin> LazyReader<R> {
    /// `max_message_size`: frames of this many payload bytes or more are refused unread
    /// ([`WebSocketError::FrameTooLarge`]), as fastwebsockets' own setting does.
    pub(super) fn new(inner: R, max_message_size: usize) -> Self {
        Self {
            inner,
            carry: [0; CARRY],
            start: 0,
            end: 0,
            max_message_size,
        }
    }

    /// Reads the next frame, control frames included (they are answered by the caller).
    /// Cancel-safe only while no bytes of a frame have arrived: keep the future across
    /// `select!` iterations, as with fastwebsockets' own `read_frame`.
    pub(super) async fn read_frame(&mut self) -> Result<ReadFrame, WebSocketError> {
        let total = loop {
            if let Some(total) = frame_len(&self.carry[self.start..self.end]) {
                break total;
            }
            // The header is incomplete, and shorter than CARRY: make room after it.
            self.carry.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let n = self.inner.read(&mut self.carry[self.end..]).await?;
            if n == 0 {
                return Err(WebSocketError::UnexpectedEOF);
            }
            self.end += n;
        };
        let carried = (self.end - self.start).min(usize::try_from(total).unwrap_or(usize::MAX));
        let frame = {
            let head = &self.carry[self.start..self.start + carried];
            let rest = total - carried as u64;
            let view = head.chain((&mut self.inner).take(rest));
            let (mut rd, _) =
                fastwebsockets::after_handshake_split(view, tokio::io::sink(), Role::Server);
            rd.set_auto_pong(false);
            rd.set_auto_close(false);
            rd.set_max_message_size(self.max_message_size);
            let frame = rd.read_frame(&mut no_obligations).await?;
            ReadFrame {
                opcode: frame.opcode,
                fin: frame.fin,
                payload: Vec::from(frame.payload),
            }
        };
        self.start += carried;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Ok(frame)
    }
}

/// The whole length (header and payload) of the frame `head` starts with, once its header is
/// complete (RFC 6455 §5.2): a 7-bit length, or 126 / 127 for a 16- / 64-bit one after it,
/// then a 4-byte mask key when the mask bit is set.
fn frame_len(head: &[u8]) -> Option<u64> {
    let b1 = *head.get(1)?;
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
    if head.len() < header {
        return None;
    }
    let payload = match ext {
        0 => u64::from(b1 & 0x7f),
        2 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        _ => u64::from_be_bytes(head[2..10].try_into().ok()?),
    };
    Some(payload.saturating_add(header as u64))
}

/// The read half's callback for frames it must send (pongs, close echoes). Never called: with
/// auto-pong and auto-close off it has nothing to send; the connection task answers those.
fn no_obligations(_: Frame<'_>) -> std::future::Ready<Result<(), std::convert::Infallible>> {
    std::future::ready(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A client frame (masked, as RFC 6455 requires of clients).
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    fn payloads() -> Vec<Vec<u8>> {
        vec![
            b"hi".to_vec(),
            Vec::new(),
            vec![7; 125],
            vec![8; 126],
            vec![9; 3000],
            vec![10; 70_000],
            b"last".to_vec(),
        ]
    }

    /// Frames of every length class, sent back to back and delivered in pieces of `chunk`
    /// bytes, come out whole, in order, and nothing is left over or lost.
    async fn frames_survive_chunks_of(chunk: usize) {
        let sent = payloads();
        let mut wire = Vec::new();
        for p in &sent {
            wire.extend(client_frame(0x2, true, p));
        }
        let (client, server) = tokio::io::duplex(chunk);
        let writer = tokio::spawn(async move {
            let mut client = client;
            for piece in wire.chunks(chunk) {
                client.write_all(piece).await.expect("write");
            }
            client
        });
        let mut reader = LazyReader::new(server, 1 << 20);
        for want in &sent {
            let frame = reader.read_frame().await.expect("frame");
            assert_eq!(frame.opcode, OpCode::Binary);
            assert!(frame.fin);
            assert_eq!(&frame.payload, want, "chunk {chunk}");
        }
        drop(writer.await.expect("writer"));
        assert!(matches!(
            reader.read_frame().await,
            Err(WebSocketError::UnexpectedEOF)
        ));
    }

    #[tokio::test]
    async fn frames_come_out_whole_however_the_bytes_arrive() {
        for chunk in [1, 2, 3, 13, 14, 127, 128, 129, 4096, 1 << 17] {
            frames_survive_chunks_of(chunk).await;
        }
    }

    #[tokio::test]
    async fn control_and_fragmented_frames_keep_their_kind() {
        let mut wire = client_frame(0x2, false, b"part one ");
        wire.extend(client_frame(0x9, true, b"ping"));
        wire.extend(client_frame(0x0, true, b"part two"));
        wire.extend(client_frame(0x8, true, &1000u16.to_be_bytes()));
        let mut reader = LazyReader::new(&wire[..], 1 << 20);
        let kinds = [
            (OpCode::Binary, false, &b"part one "[..]),
            (OpCode::Ping, true, b"ping"),
            (OpCode::Continuation, true, b"part two"),
            (OpCode::Close, true, &[0x03, 0xe8]),
        ];
        for (opcode, fin, payload) in kinds {
            let f = reader.read_frame().await.expect("frame");
            assert_eq!((f.opcode, f.fin, &f.payload[..]), (opcode, fin, payload));
        }
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_unread() {
        let wire = client_frame(0x2, true, &[1; 200]);
        let mut reader = LazyReader::new(&wire[..], 100);
        assert!(matches!(
            reader.read_frame().await,
            Err(WebSocketError::FrameTooLarge)
        ));
    }

    #[test]
    fn frame_lengths_follow_the_header() {
        assert_eq!(frame_len(&[0x82]), None);
        assert_eq!(frame_len(&[0x82, 0x05]), Some(7), "unmasked");
        assert_eq!(frame_len(&[0x82, 0x85]), None, "mask key missing");
        assert_eq!(frame_len(&[0x82, 0x85, 1, 2, 3, 4]), Some(11));
        assert_eq!(frame_len(&[0x82, 0xfe, 0x01]), None);
        assert_eq!(frame_len(&[0x82, 0xfe, 0x01, 0x00, 1, 2, 3, 4]), Some(264));
        let mut long = vec![0x82, 0xff];
        long.extend_from_slice(&70_000u64.to_be_bytes());
        assert_eq!(frame_len(&long), None);
        long.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(frame_len(&long), Some(70_014));
        let mut huge = vec![0x82, 0x7f];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(frame_len(&huge), Some(u64::MAX), "saturates");
    }
}
