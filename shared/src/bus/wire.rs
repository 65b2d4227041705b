//! Conversions between the bus types of this module and their protobuf envelopes
//! (`proto::bus`, package `ampora.bus.v1`).
//!
//! Encoding cannot fail. Decoding validates everything the Rust types promise and the
//! protobuf types do not: every `oneof` is set, UIDs are exactly 16 bytes, token hashes 32,
//! addresses parse, enums are known values. A message that fails any of these is [`Malformed`]; the caller
//! counts and drops it, nothing panics on input from the wire.

use std::net::IpAddr;

use proto::bus as pb;
use proto::Message;

use super::{
    AgentFrame, AuthDecision, AuthFailure, AuthRequest, BlobChunk, CertificateId, ControlEvent,
    CoordinatorEvent, CoordinatorReply, CoordinatorRequest, Credential, FrameReply, GatewayMessage,
    PresentedToken,
};
use crate::domain::Transport;
use crate::ids::{GatewayId, InstanceUid};

/// Why a received message could not be decoded; `'static` so it never allocates on a flood of
/// garbage, and precise enough for a debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed bus message: {0}")]
pub(crate) struct Malformed(pub(crate) &'static str);

/// One envelope of a coalesced NATS message (`pb::Batch`): the body a single message would
/// have carried, its reply subject, and for a reply replaced by an error, the error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchEntry {
    pub(crate) body: Vec<u8>,
    pub(crate) reply: Option<String>,
    pub(crate) error: Option<String>,
}

/// What travels on the coordinator subjects: a request expecting one reply, or an event.
#[derive(Debug)]
pub(crate) enum Inbound {
    Request(CoordinatorRequest),
    Event(CoordinatorEvent),
}

// ---- encoding ------------------------------------------------------------------------------

pub(crate) fn encode_request(req: CoordinatorRequest) -> Vec<u8> {
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Request(request_to_pb(req))),
    }
    .encode_to_vec()
}

pub(crate) fn encode_event(ev: CoordinatorEvent) -> Vec<u8> {
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Event(event_to_pb(ev))),
    }
    .encode_to_vec()
}

pub(crate) fn encode_reply(reply: CoordinatorReply) -> Vec<u8> {
    use pb::coordinator_reply::Kind;
    let kind = match reply {
        CoordinatorReply::Auth(d) => Kind::Auth(decision_to_pb(d)),
        CoordinatorReply::Frame(f) => {
            let f = *f;
            Kind::Frame(pb::FrameReply {
                msg: Some(f.msg),
                bind: f.bind.map(|u| u.0.to_vec()),
                close: f.close,
            })
        }
        CoordinatorReply::RevokedSerials(serials) => {
            Kind::RevokedSerials(pb::RevokedSerials { serials })
        }
        CoordinatorReply::BlobChunk(c) => {
            use pb::blob_chunk::Kind as C;
            Kind::BlobChunk(pb::BlobChunk {
                kind: Some(match c {
                    BlobChunk::Bytes(b) => C::Bytes(b),
                    BlobChunk::Missing => C::Missing(true),
                    BlobChunk::Error(e) => C::Error(e),
                }),
            })
        }
    };
    pb::CoordinatorReply { kind: Some(kind) }.encode_to_vec()
}

pub(crate) fn encode_gateway(msg: GatewayMessage) -> Vec<u8> {
    use pb::gateway_message::Kind;
    let kind = match msg {
        GatewayMessage::Deliver { uid, epoch, msg } => Kind::Deliver(pb::Deliver {
            uid: uid.0.to_vec(),
            epoch,
            msg: Some(*msg),
        }),
        GatewayMessage::Close { uid, epoch, reason } => Kind::Close(pb::Close {
            uid: uid.0.to_vec(),
            epoch,
            reason,
        }),
    };
    pb::GatewayMessage { kind: Some(kind) }.encode_to_vec()
}

pub(crate) fn encode_control(ev: ControlEvent) -> Vec<u8> {
    use pb::control_event::Kind;
    let kind = match ev {
        ControlEvent::AssignmentCreated { assignment_id } => {
            Kind::AssignmentCreated(pb::AssignmentCreated { assignment_id })
        }
        ControlEvent::TokenChanged { token_id } => {
            Kind::TokenChanged(pb::TokenChanged { token_id })
        }
        ControlEvent::MembershipChanged => Kind::MembershipChanged(pb::MembershipChanged {}),
        ControlEvent::IdentityRevoked { serial } => {
            Kind::IdentityRevoked(pb::IdentityRevoked { serial })
        }
        ControlEvent::IdentityConfirmed { serial } => {
            Kind::IdentityConfirmed(pb::IdentityConfirmed { serial })
        }
        ControlEvent::TokensCreated => Kind::TokensCreated(pb::TokensCreated {}),
        ControlEvent::PackagesChanged => Kind::PackagesChanged(pb::PackagesChanged {}),
        ControlEvent::TelemetryChanged => Kind::TelemetryChanged(pb::TelemetryChanged {}),
        ControlEvent::RolloutChanged { rollout_id } => {
            Kind::RolloutChanged(pb::RolloutChanged { rollout_id })
        }
        ControlEvent::ReapplyConfig { uid } => Kind::ReapplyConfig(pb::ReapplyConfig {
            uid: uid.as_bytes().to_vec(),
        }),
        ControlEvent::RestartAgent { uid } => Kind::RestartAgent(pb::RestartAgent {
            uid: uid.as_bytes().to_vec(),
        }),
        ControlEvent::CustomMessage {
            uid,
            capability,
            kind,
            data,
        } => Kind::CustomMessage(pb::CustomMessageToAgent {
            uid: uid.as_bytes().to_vec(),
            capability,
            r#type: kind,
            data,
        }),
    };
    pb::ControlEvent { kind: Some(kind) }.encode_to_vec()
}

fn entry_to_pb(e: BatchEntry) -> pb::BatchEntry {
    pb::BatchEntry {
        body: e.body,
        reply: e.reply,
        error: e.error,
    }
}

/// The bytes `e` adds to an encoded batch (its field tag and length included), so a batch can
/// be bounded before it is built.
pub(crate) fn batch_entry_len(e: &BatchEntry) -> usize {
    let len = pb::BatchEntry {
        body: Vec::new(),
        reply: e.reply.clone(),
        error: e.error.clone(),
    }
    .encoded_len()
        + if e.body.is_empty() {
            0
        } else {
            field_len(e.body.len())
        };
    field_len(len)
}

/// A length-delimited field of `len` bytes with a one-byte tag: tag, varint length, bytes.
fn field_len(len: usize) -> usize {
    let varint = (64 - (len as u64 | 1).leading_zeros() as usize).div_ceil(7);
    1 + varint + len
}

/// Several envelopes, in order, as one `pb::Batch`.
pub(crate) fn encode_batch(entries: Vec<BatchEntry>) -> Vec<u8> {
    pb::Batch {
        entries: entries.into_iter().map(entry_to_pb).collect(),
    }
    .encode_to_vec()
}

fn request_to_pb(req: CoordinatorRequest) -> pb::CoordinatorRequest {
    use pb::coordinator_request::Kind;
    let kind = match req {
        CoordinatorRequest::Authenticate(a) => Kind::Authenticate(pb::AuthRequest {
            presented_token: a.token.map(|t| pb::PresentedToken {
                hash: t.hash.to_vec(),
                prefix: t.prefix,
            }),
            source_ip: a.source_ip.to_string(),
            uid_hint: a.uid_hint.map(|u| u.0.to_vec()),
            transport: transport_to_pb(a.transport) as i32,
            certificate: a.certificate.map(|c| pb::Certificate {
                uid: c.uid.0.to_vec(),
                serial: c.serial,
            }),
        }),
        CoordinatorRequest::Frame(f) => {
            let f = *f;
            Kind::Frame(pb::AgentFrame {
                gateway: f.gateway.0,
                conn_id: f.conn_id,
                epoch: f.epoch,
                transport: transport_to_pb(f.transport) as i32,
                credential: Some(credential_to_pb(f.credential)),
                source_ip: f.source_ip.to_string(),
                msg: Some(f.msg),
                secure: f.secure,
            })
        }
        CoordinatorRequest::RevokedSerials => Kind::RevokedSerials(pb::RevokedSerialsRequest {}),
        CoordinatorRequest::BlobChunk { sha256, index } => {
            Kind::BlobChunk(pb::BlobChunkRequest { sha256, index })
        }
    };
    pb::CoordinatorRequest { kind: Some(kind) }
}

fn event_to_pb(ev: CoordinatorEvent) -> pb::CoordinatorEvent {
    use pb::coordinator_event::Kind;
    let kind = match ev {
        CoordinatorEvent::Disconnected {
            uid,
            gateway,
            conn_id,
            epoch,
        } => Kind::Disconnected(pb::Disconnected {
            uid: uid.0.to_vec(),
            gateway: gateway.0,
            conn_id,
            epoch,
        }),
        CoordinatorEvent::AuthFailed { source_ip, reason } => Kind::AuthFailed(pb::AuthFailed {
            source_ip: source_ip.to_string(),
            reason,
        }),
        CoordinatorEvent::OwnMetrics { uid, figures } => Kind::OwnMetrics(pb::OwnMetrics {
            uid: uid.0.to_vec(),
            cumulative: figures.cumulative.to_vec(),
            delta: figures.delta.to_vec(),
            present: figures.present.to_vec(),
            queue_size: figures.queue_size,
        }),
    };
    pb::CoordinatorEvent { kind: Some(kind) }
}

fn decision_to_pb(d: AuthDecision) -> pb::AuthDecision {
    use pb::auth_decision::Kind;
    let kind = match d {
        AuthDecision::Accept(c) => Kind::Accept(credential_to_pb(c)),
        AuthDecision::Reject(f) => Kind::Reject(failure_to_pb(f) as i32),
        AuthDecision::Unavailable => Kind::Unavailable(true),
    };
    pb::AuthDecision { kind: Some(kind) }
}

fn credential_to_pb(c: Credential) -> pb::Credential {
    match c {
        Credential::BootstrapToken {
            token_id,
            bound_uid,
        } => pb::Credential {
            kind: Some(pb::credential::Kind::BootstrapToken(pb::BootstrapToken {
                token_id,
                bound_uid: bound_uid.map(|u| u.0.to_vec()),
            })),
        },
        Credential::Certificate { uid, serial } => pb::Credential {
            kind: Some(pb::credential::Kind::Certificate(pb::Certificate {
                uid: uid.0.to_vec(),
                serial,
            })),
        },
    }
}

fn transport_to_pb(t: Transport) -> pb::Transport {
    match t {
        Transport::WebSocket => pb::Transport::WebSocket,
        Transport::Http => pb::Transport::Http,
    }
}

fn failure_to_pb(f: AuthFailure) -> pb::AuthFailure {
    match f {
        AuthFailure::MissingCredentials => pb::AuthFailure::MissingCredentials,
        AuthFailure::WrongScheme => pb::AuthFailure::WrongScheme,
        AuthFailure::MalformedToken => pb::AuthFailure::MalformedToken,
        AuthFailure::UnknownToken => pb::AuthFailure::UnknownToken,
        AuthFailure::Expired => pb::AuthFailure::Expired,
        AuthFailure::Revoked => pb::AuthFailure::Revoked,
        AuthFailure::AlreadyRedeemed => pb::AuthFailure::AlreadyRedeemed,
        AuthFailure::IdentityRequired => pb::AuthFailure::IdentityRequired,
        AuthFailure::IdentityRevoked => pb::AuthFailure::IdentityRevoked,
    }
}

// ---- decoding ------------------------------------------------------------------------------

pub(crate) fn decode_inbound(bytes: &[u8]) -> Result<Inbound, Malformed> {
    use pb::coordinator_message::Kind;
    let msg =
        pb::CoordinatorMessage::decode(bytes).map_err(|_| Malformed("coordinator message"))?;
    match msg.kind.ok_or(Malformed("coordinator message kind"))? {
        Kind::Request(r) => request_from_pb(r).map(Inbound::Request),
        Kind::Event(e) => event_from_pb(e).map(Inbound::Event),
    }
}

pub(crate) fn decode_reply(bytes: &[u8]) -> Result<CoordinatorReply, Malformed> {
    use pb::coordinator_reply::Kind;
    let msg = pb::CoordinatorReply::decode(bytes).map_err(|_| Malformed("coordinator reply"))?;
    Ok(match msg.kind.ok_or(Malformed("coordinator reply kind"))? {
        Kind::Auth(d) => CoordinatorReply::Auth(decision_from_pb(d)?),
        Kind::Frame(f) => CoordinatorReply::Frame(Box::new(FrameReply {
            msg: f.msg.ok_or(Malformed("frame reply without message"))?,
            bind: f.bind.as_deref().map(uid_from_pb).transpose()?,
            close: f.close,
        })),
        Kind::RevokedSerials(r) => CoordinatorReply::RevokedSerials(r.serials),
        Kind::BlobChunk(c) => {
            use pb::blob_chunk::Kind as C;
            CoordinatorReply::BlobChunk(match c.kind.ok_or(Malformed("blob chunk kind"))? {
                C::Bytes(b) => BlobChunk::Bytes(b),
                C::Missing(_) => BlobChunk::Missing,
                C::Error(e) => BlobChunk::Error(e),
            })
        }
    })
}

pub(crate) fn decode_gateway(bytes: &[u8]) -> Result<GatewayMessage, Malformed> {
    use pb::gateway_message::Kind;
    let msg = pb::GatewayMessage::decode(bytes).map_err(|_| Malformed("gateway message"))?;
    Ok(match msg.kind.ok_or(Malformed("gateway message kind"))? {
        Kind::Deliver(d) => GatewayMessage::Deliver {
            uid: uid_from_pb(&d.uid)?,
            epoch: d.epoch,
            msg: Box::new(d.msg.ok_or(Malformed("delivery without message"))?),
        },
        Kind::Close(c) => GatewayMessage::Close {
            uid: uid_from_pb(&c.uid)?,
            epoch: c.epoch,
            reason: c.reason,
        },
    })
}

pub(crate) fn decode_control(bytes: &[u8]) -> Result<ControlEvent, Malformed> {
    use pb::control_event::Kind;
    let msg = pb::ControlEvent::decode(bytes).map_err(|_| Malformed("control event"))?;
    Ok(match msg.kind.ok_or(Malformed("control event kind"))? {
        Kind::AssignmentCreated(a) => ControlEvent::AssignmentCreated {
            assignment_id: a.assignment_id,
        },
        Kind::TokenChanged(t) => ControlEvent::TokenChanged {
            token_id: t.token_id,
        },
        Kind::MembershipChanged(_) => ControlEvent::MembershipChanged,
        Kind::IdentityRevoked(r) => ControlEvent::IdentityRevoked { serial: r.serial },
        Kind::IdentityConfirmed(c) => ControlEvent::IdentityConfirmed { serial: c.serial },
        Kind::TokensCreated(_) => ControlEvent::TokensCreated,
        Kind::PackagesChanged(_) => ControlEvent::PackagesChanged,
        Kind::TelemetryChanged(_) => ControlEvent::TelemetryChanged,
        Kind::RolloutChanged(r) => ControlEvent::RolloutChanged {
            rollout_id: r.rollout_id,
        },
        Kind::ReapplyConfig(r) => ControlEvent::ReapplyConfig {
            uid: uid_from_pb(&r.uid)?,
        },
        Kind::RestartAgent(r) => ControlEvent::RestartAgent {
            uid: uid_from_pb(&r.uid)?,
        },
        Kind::CustomMessage(m) => ControlEvent::CustomMessage {
            uid: uid_from_pb(&m.uid)?,
            capability: m.capability,
            kind: m.r#type,
            data: m.data,
        },
    })
}

/// The entries of a batch, in order; an empty batch is malformed (no sender makes one).
pub(crate) fn decode_batch(bytes: &[u8]) -> Result<Vec<BatchEntry>, Malformed> {
    let batch = pb::Batch::decode(bytes).map_err(|_| Malformed("batch"))?;
    if batch.entries.is_empty() {
        return Err(Malformed("empty batch"));
    }
    Ok(batch
        .entries
        .into_iter()
        .map(|e| BatchEntry {
            body: e.body,
            reply: e.reply,
            error: e.error,
        })
        .collect())
}

fn request_from_pb(req: pb::CoordinatorRequest) -> Result<CoordinatorRequest, Malformed> {
    use pb::coordinator_request::Kind;
    Ok(match req.kind.ok_or(Malformed("request kind"))? {
        Kind::Authenticate(a) => CoordinatorRequest::Authenticate(AuthRequest {
            token: a.presented_token.map(token_from_pb).transpose()?,
            source_ip: ip_from_pb(&a.source_ip)?,
            uid_hint: a.uid_hint.as_deref().map(uid_from_pb).transpose()?,
            transport: transport_from_pb(a.transport)?,
            certificate: a
                .certificate
                .map(|c| {
                    Ok::<_, Malformed>(CertificateId {
                        uid: uid_from_pb(&c.uid)?,
                        serial: c.serial,
                    })
                })
                .transpose()?,
        }),
        Kind::Frame(f) => CoordinatorRequest::Frame(Box::new(AgentFrame {
            gateway: GatewayId(f.gateway),
            conn_id: f.conn_id,
            epoch: f.epoch,
            transport: transport_from_pb(f.transport)?,
            credential: credential_from_pb(f.credential.ok_or(Malformed("frame credential"))?)?,
            source_ip: ip_from_pb(&f.source_ip)?,
            secure: f.secure,
            msg: f.msg.ok_or(Malformed("frame without message"))?,
        })),
        Kind::RevokedSerials(_) => CoordinatorRequest::RevokedSerials,
        Kind::BlobChunk(r) => CoordinatorRequest::BlobChunk {
            sha256: r.sha256,
            index: r.index,
        },
    })
}

fn event_from_pb(ev: pb::CoordinatorEvent) -> Result<CoordinatorEvent, Malformed> {
    use pb::coordinator_event::Kind;
    Ok(match ev.kind.ok_or(Malformed("event kind"))? {
        Kind::Disconnected(d) => CoordinatorEvent::Disconnected {
            uid: uid_from_pb(&d.uid)?,
            gateway: GatewayId(d.gateway),
            conn_id: d.conn_id,
            epoch: d.epoch,
        },
        Kind::AuthFailed(a) => CoordinatorEvent::AuthFailed {
            source_ip: ip_from_pb(&a.source_ip)?,
            reason: a.reason,
        },
        Kind::OwnMetrics(m) => {
            let counters = |v: Vec<f64>| {
                <[f64; crate::own_telemetry::COUNTERS]>::try_from(v)
                    .map_err(|_| Malformed("own metrics counters"))
            };
            CoordinatorEvent::OwnMetrics {
                uid: uid_from_pb(&m.uid)?,
                figures: Box::new(crate::own_telemetry::Figures {
                    cumulative: counters(m.cumulative)?,
                    delta: counters(m.delta)?,
                    present: m
                        .present
                        .try_into()
                        .map_err(|_| Malformed("own metrics counters"))?,
                    queue_size: m.queue_size,
                }),
            }
        }
    })
}

fn decision_from_pb(d: pb::AuthDecision) -> Result<AuthDecision, Malformed> {
    use pb::auth_decision::Kind;
    Ok(match d.kind.ok_or(Malformed("auth decision kind"))? {
        Kind::Accept(c) => AuthDecision::Accept(credential_from_pb(c)?),
        Kind::Reject(f) => AuthDecision::Reject(failure_from_pb(f)?),
        Kind::Unavailable(_) => AuthDecision::Unavailable,
    })
}

fn credential_from_pb(c: pb::Credential) -> Result<Credential, Malformed> {
    match c.kind.ok_or(Malformed("credential kind"))? {
        pb::credential::Kind::BootstrapToken(t) => Ok(Credential::BootstrapToken {
            token_id: t.token_id,
            bound_uid: t.bound_uid.as_deref().map(uid_from_pb).transpose()?,
        }),
        pb::credential::Kind::Certificate(c) => Ok(Credential::Certificate {
            uid: uid_from_pb(&c.uid)?,
            serial: c.serial,
        }),
    }
}

fn token_from_pb(t: pb::PresentedToken) -> Result<PresentedToken, Malformed> {
    Ok(PresentedToken {
        hash: t
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| Malformed("token hash is not 32 bytes"))?,
        prefix: t.prefix,
    })
}

fn uid_from_pb(bytes: &[u8]) -> Result<InstanceUid, Malformed> {
    InstanceUid::from_slice(bytes).ok_or(Malformed("instance uid is not 16 bytes"))
}

fn ip_from_pb(s: &str) -> Result<IpAddr, Malformed> {
    s.parse().map_err(|_| Malformed("source ip"))
}

fn transport_from_pb(v: i32) -> Result<Transport, Malformed> {
    match pb::Transport::try_from(v) {
        Ok(pb::Transport::WebSocket) => Ok(Transport::WebSocket),
        Ok(pb::Transport::Http) => Ok(Transport::Http),
        Ok(pb::Transport::Unspecified) | Err(_) => Err(Malformed("transport")),
    }
}

fn failure_from_pb(v: i32) -> Result<AuthFailure, Malformed> {
    Ok(match pb::AuthFailure::try_from(v) {
        Ok(pb::AuthFailure::MissingCredentials) => AuthFailure::MissingCredentials,
        Ok(pb::AuthFailure::WrongScheme) => AuthFailure::WrongScheme,
        Ok(pb::AuthFailure::MalformedToken) => AuthFailure::MalformedToken,
        Ok(pb::AuthFailure::UnknownToken) => AuthFailure::UnknownToken,
        Ok(pb::AuthFailure::Expired) => AuthFailure::Expired,
        Ok(pb::AuthFailure::Revoked) => AuthFailure::Revoked,
        Ok(pb::AuthFailure::AlreadyRedeemed) => AuthFailure::AlreadyRedeemed,
        Ok(pb::AuthFailure::IdentityRequired) => AuthFailure::IdentityRequired,
        Ok(pb::AuthFailure::IdentityRevoked) => AuthFailure::IdentityRevoked,
        Ok(pb::AuthFailure::Unspecified) | Err(_) => return Err(Malformed("auth failure")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token;

    fn uid() -> InstanceUid {
        InstanceUid([7; 16])
    }

    fn frame() -> AgentFrame {
        AgentFrame {
            gateway: GatewayId("gw-1".into()),
            conn_id: 42,
            epoch: 9,
            transport: Transport::Http,
            credential: Credential::BootstrapToken {
                token_id: "tok".into(),
                bound_uid: Some(uid()),
            },
            source_ip: "2001:db8::1".parse().expect("ip"),
            secure: true,
            msg: proto::AgentToServer {
                instance_uid: uid().0.to_vec(),
                sequence_num: 3,
                ..Default::default()
            },
        }
    }

    #[test]
    fn batches_round_trip_in_order_with_exact_lengths() {
        let entries: Vec<BatchEntry> = (0..300usize)
            .map(|i| BatchEntry {
                body: vec![i as u8; i * 7],
                reply: (i % 3 != 0).then(|| format!("p.inbox.n.r.{i}")),
                error: (i % 5 == 0).then(|| "e".repeat(i)),
            })
            .collect();
        let predicted: usize = entries.iter().map(batch_entry_len).sum();
        let bytes = encode_batch(entries.clone());
        assert_eq!(bytes.len(), predicted, "batch bounds rely on exact lengths");
        assert_eq!(decode_batch(&bytes).expect("decode"), entries);
        assert_eq!(decode_batch(&[]), Err(Malformed("empty batch")));
        assert!(decode_batch(b"\xff\xff").is_err());
    }

    #[test]
    fn requests_round_trip() {
        let raw = token::new_bootstrap_token();
        let auth = AuthRequest {
            token: Some(PresentedToken::from_bootstrap_token(&raw).expect("well-formed")),
            source_ip: "10.0.0.1".parse().expect("ip"),
            uid_hint: Some(uid()),
            transport: Transport::WebSocket,
            certificate: Some(CertificateId {
                uid: uid(),
                serial: "4abc".into(),
            }),
        };
        match decode_inbound(&encode_request(CoordinatorRequest::Authenticate(
            auth.clone(),
        ))) {
            Ok(Inbound::Request(CoordinatorRequest::Authenticate(back))) => {
                assert_eq!(back.token, auth.token);
                assert_eq!(back.source_ip, auth.source_ip);
                assert_eq!(back.uid_hint, auth.uid_hint);
                assert_eq!(back.transport, auth.transport);
                assert_eq!(back.certificate, auth.certificate);
            }
            other => panic!("unexpected {other:?}"),
        }
        let f = frame();
        let plaintext = AgentFrame {
            secure: false,
            ..frame()
        };
        match decode_inbound(&encode_request(CoordinatorRequest::Frame(Box::new(
            plaintext,
        )))) {
            Ok(Inbound::Request(CoordinatorRequest::Frame(back))) => assert!(!back.secure),
            other => panic!("unexpected {other:?}"),
        }
        match decode_inbound(&encode_request(CoordinatorRequest::Frame(Box::new(
            f.clone(),
        )))) {
            Ok(Inbound::Request(CoordinatorRequest::Frame(back))) => {
                assert_eq!(back.gateway, f.gateway);
                assert_eq!((back.conn_id, back.epoch), (f.conn_id, f.epoch));
                assert_eq!(back.transport, f.transport);
                assert_eq!(back.credential, f.credential);
                assert_eq!(back.source_ip, f.source_ip);
                assert_eq!(back.secure, f.secure);
                assert_eq!(back.msg, f.msg);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn events_replies_deliveries_and_control_round_trip() {
        let ev = CoordinatorEvent::Disconnected {
            uid: uid(),
            gateway: GatewayId("gw".into()),
            conn_id: 1,
            epoch: 2,
        };
        match decode_inbound(&encode_event(ev)) {
            Ok(Inbound::Event(CoordinatorEvent::Disconnected {
                uid: u,
                conn_id: 1,
                epoch: 2,
                ..
            })) => assert_eq!(u, uid()),
            other => panic!("unexpected {other:?}"),
        }
        let mut figures = crate::own_telemetry::Figures::default();
        figures.cumulative[3] = 12.5;
        figures.present[3] = true;
        figures.queue_size = Some(4.0);
        let ev = CoordinatorEvent::OwnMetrics {
            uid: uid(),
            figures: Box::new(figures.clone()),
        };
        match decode_inbound(&encode_event(ev)) {
            Ok(Inbound::Event(CoordinatorEvent::OwnMetrics {
                uid: u,
                figures: back,
            })) => assert_eq!((u, *back), (uid(), figures)),
            other => panic!("unexpected {other:?}"),
        }
        let short = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Event(pb::CoordinatorEvent {
                kind: Some(pb::coordinator_event::Kind::OwnMetrics(pb::OwnMetrics {
                    uid: uid().0.to_vec(),
                    cumulative: vec![1.0],
                    ..Default::default()
                })),
            })),
        };
        assert!(decode_inbound(&short.encode_to_vec()).is_err());
        for failure in [
            AuthFailure::MissingCredentials,
            AuthFailure::WrongScheme,
            AuthFailure::MalformedToken,
            AuthFailure::UnknownToken,
            AuthFailure::Expired,
            AuthFailure::Revoked,
            AuthFailure::AlreadyRedeemed,
            AuthFailure::IdentityRequired,
            AuthFailure::IdentityRevoked,
        ] {
            match decode_reply(&encode_reply(CoordinatorReply::Auth(AuthDecision::Reject(
                failure,
            )))) {
                Ok(CoordinatorReply::Auth(AuthDecision::Reject(back))) => {
                    assert_eq!(back, failure)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(matches!(
            decode_reply(&encode_reply(CoordinatorReply::Auth(
                AuthDecision::Unavailable
            ))),
            Ok(CoordinatorReply::Auth(AuthDecision::Unavailable))
        ));
        let reply = FrameReply {
            msg: proto::ServerToAgent {
                capabilities: 5,
                ..Default::default()
            },
            bind: Some(uid()),
            close: Some("bye".into()),
        };
        match decode_reply(&encode_reply(CoordinatorReply::Frame(Box::new(
            reply.clone(),
        )))) {
            Ok(CoordinatorReply::Frame(back)) => {
                assert_eq!(back.msg, reply.msg);
                assert_eq!(back.bind, reply.bind);
                assert_eq!(back.close, reply.close);
            }
            other => panic!("unexpected {other:?}"),
        }
        let serials = vec!["4a".to_string(), "7f00".to_string()];
        match decode_reply(&encode_reply(CoordinatorReply::RevokedSerials(
            serials.clone(),
        ))) {
            Ok(CoordinatorReply::RevokedSerials(back)) => assert_eq!(back, serials),
            other => panic!("unexpected {other:?}"),
        }
        match decode_inbound(&encode_request(CoordinatorRequest::RevokedSerials)) {
            Ok(Inbound::Request(CoordinatorRequest::RevokedSerials)) => {}
            other => panic!("unexpected {other:?}"),
        }
        for chunk in [
            BlobChunk::Bytes(vec![0, 1, 2, 255]),
            BlobChunk::Bytes(Vec::new()),
            BlobChunk::Missing,
            BlobChunk::Error("store down".into()),
        ] {
            match decode_reply(&encode_reply(CoordinatorReply::BlobChunk(chunk.clone()))) {
                Ok(CoordinatorReply::BlobChunk(back)) => assert_eq!(back, chunk),
                other => panic!("unexpected {other:?}"),
            }
        }
        match decode_inbound(&encode_request(CoordinatorRequest::BlobChunk {
            sha256: "ab".repeat(32),
            index: 7,
        })) {
            Ok(Inbound::Request(CoordinatorRequest::BlobChunk { sha256, index })) => {
                assert_eq!((sha256, index), ("ab".repeat(32), 7));
            }
            other => panic!("unexpected {other:?}"),
        }
        let cert = Credential::Certificate {
            uid: uid(),
            serial: "4abc".into(),
        };
        match decode_reply(&encode_reply(CoordinatorReply::Auth(AuthDecision::Accept(
            cert.clone(),
        )))) {
            Ok(CoordinatorReply::Auth(AuthDecision::Accept(back))) => assert_eq!(back, cert),
            other => panic!("unexpected {other:?}"),
        }
        match decode_gateway(&encode_gateway(GatewayMessage::Close {
            uid: uid(),
            epoch: 4,
            reason: "moved".into(),
        })) {
            Ok(GatewayMessage::Close {
                epoch: 4, reason, ..
            }) => assert_eq!(reason, "moved"),
            other => panic!("unexpected {other:?}"),
        }
        for ev in [
            ControlEvent::AssignmentCreated { assignment_id: -3 },
            ControlEvent::TokenChanged {
                token_id: "t".into(),
            },
            ControlEvent::MembershipChanged,
            ControlEvent::IdentityRevoked {
                serial: "4abc".into(),
            },
            ControlEvent::IdentityConfirmed {
                serial: "4abd".into(),
            },
            ControlEvent::TokensCreated,
            ControlEvent::PackagesChanged,
            ControlEvent::TelemetryChanged,
            ControlEvent::RolloutChanged { rollout_id: 9 },
            ControlEvent::ReapplyConfig { uid: uid() },
            ControlEvent::RestartAgent { uid: uid() },
            ControlEvent::CustomMessage {
                uid: uid(),
                capability: "com.example.echo".into(),
                kind: "ping".into(),
                data: vec![0, 1, 255],
            },
        ] {
            assert_eq!(decode_control(&encode_control(ev.clone())), Ok(ev));
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(decode_inbound(b"\xff\xff\xff").is_err());
        assert!(decode_inbound(&[]).is_err(), "an empty oneof is malformed");
        assert!(decode_reply(&[]).is_err());
        assert!(decode_gateway(&[]).is_err());
        assert!(decode_control(&[]).is_err());

        // Well-formed protobuf, invalid content.
        let short_uid = pb::GatewayMessage {
            kind: Some(pb::gateway_message::Kind::Close(pb::Close {
                uid: vec![1; 15],
                epoch: 1,
                reason: String::new(),
            })),
        }
        .encode_to_vec();
        assert!(decode_gateway(&short_uid).is_err());
        let mut bad_ip = request_to_pb(CoordinatorRequest::Frame(Box::new(frame())));
        if let Some(pb::coordinator_request::Kind::Frame(f)) = bad_ip.kind.as_mut() {
            f.source_ip = "not an address".into();
        }
        let bytes = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Request(bad_ip)),
        }
        .encode_to_vec();
        assert_eq!(decode_inbound(&bytes).err(), Some(Malformed("source ip")));
        let bad_transport = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Request(
                pb::CoordinatorRequest {
                    kind: Some(pb::coordinator_request::Kind::Authenticate(
                        pb::AuthRequest {
                            presented_token: None,
                            source_ip: "127.0.0.1".into(),
                            uid_hint: None,
                            transport: 99,
                            certificate: None,
                        },
                    )),
                },
            )),
        }
        .encode_to_vec();
        assert_eq!(
            decode_inbound(&bad_transport).err(),
            Some(Malformed("transport"))
        );
        let short_hash = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Request(
                pb::CoordinatorRequest {
                    kind: Some(pb::coordinator_request::Kind::Authenticate(
                        pb::AuthRequest {
                            presented_token: Some(pb::PresentedToken {
                                hash: vec![0; 31],
                                prefix: "amp-bs.abcd…".into(),
                            }),
                            source_ip: "127.0.0.1".into(),
                            uid_hint: None,
                            transport: pb::Transport::Http as i32,
                            certificate: None,
                        },
                    )),
                },
            )),
        }
        .encode_to_vec();
        assert_eq!(
            decode_inbound(&short_hash).err(),
            Some(Malformed("token hash is not 32 bytes"))
        );
    }

    /// Issue 17: only the hash and the display prefix of a bootstrap token cross the bus,
    /// never its text, nor the secret part of it in any form.
    #[test]
    fn auth_request_does_not_carry_the_raw_token() {
        let raw = token::new_bootstrap_token();
        let presented = PresentedToken::from_bootstrap_token(&raw).expect("well-formed");
        let bytes = encode_request(CoordinatorRequest::Authenticate(AuthRequest {
            token: Some(presented.clone()),
            certificate: None,
            source_ip: "10.0.0.1".parse().expect("ip"),
            uid_hint: None,
            transport: Transport::WebSocket,
        }));
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        let secret = raw
            .strip_prefix("amp-bs.")
            .and_then(|r| r.rsplit_once('.'))
            .map(|(secret, _crc)| secret)
            .expect("token shape");
        assert!(!contains(raw.as_bytes()), "the raw token crossed the bus");
        // Anything past the display prefix of the secret (which is not secret) is absent too.
        let shown = token::display_prefix(&raw).trim_end_matches('…').len() - "amp-bs.".len();
        assert!(
            !contains(&secret.as_bytes()[shown..]),
            "the token's secret crossed the bus"
        );
        assert!(
            contains(&token::hash_token(&raw)),
            "its hash is what crosses"
        );
        match decode_inbound(&bytes) {
            Ok(Inbound::Request(CoordinatorRequest::Authenticate(back))) => {
                assert_eq!(back.token, Some(presented));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
