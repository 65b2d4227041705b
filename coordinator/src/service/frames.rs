//! One agent frame, from the gateway's request to the reply: which UID it is about (a spare
//! token never takes over an existing one), redemption, identity offers, the session core, and
//! the assignment a changed description may match. Every frame gets exactly one reply.

use super::refusals::Refused;
use super::{log_safe, refusals, Coordinator};
use crate::session::{self, Context, Event};
use proto::v1::ServerErrorResponseType;
use shared::bus::{AgentFrame, AuthFailure, Credential, FrameReply};
use shared::domain::{AgentRecord, AuditEntry, Transport};
use shared::ids::InstanceUid;
use shared::now_ms;

/// Why an agent's frame was refused at redemption: its token, or the token's scope. Scope
/// mismatches are decided here, in the coordinator, so they need no place in the bus's
/// [`AuthFailure`] (which the gateway decides on before any frame exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Auth(AuthFailure),
    /// The token is scoped and the agent's first frame does not describe it with every label
    /// of the scope (or carries no description at all).
    ScopeMismatch,
    /// A certificate-authenticated frame about another agent than the certificate names.
    IdentityMismatch,
    /// Not a refusal: the store could not be asked (redemption, scope lookup). The agent is
    /// told to retry, never refused for it.
    Unavailable,
}

impl Refusal {
    /// The audited reason code.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Auth(f) => f.as_str(),
            Self::ScopeMismatch => "scope_mismatch",
            Self::IdentityMismatch => "identity_mismatch",
            Self::Unavailable => "unavailable",
        }
    }

    /// Human text for the error reply and the close reason.
    pub(super) fn message(self) -> &'static str {
        match self {
            Self::Auth(f) => f.message(),
            Self::ScopeMismatch => "agent description does not match the token scope",
            Self::IdentityMismatch => "instance uid does not match the client certificate",
            Self::Unavailable => "authentication unavailable, retry later",
        }
    }
}

impl From<AuthFailure> for Refusal {
    fn from(f: AuthFailure) -> Self {
        Self::Auth(f)
    }
}

impl Coordinator {
    pub(super) async fn frame(&self, frame: AgentFrame) -> FrameReply {
        let msg = &frame.msg;
        let asked = msg.flags & proto::agent_flags::REQUEST_INSTANCE_UID != 0;
        let claimed = InstanceUid::from_slice(&msg.instance_uid);
        let token_id = match &frame.credential {
            Credential::BootstrapToken { token_id, .. } => token_id.clone(),
            Credential::Certificate { serial, .. } => format!("certificate:{serial}"),
        };
        // The gateway routed this frame by the partition of the uid it carries (0 without
        // one). Right after a hand-over it may reach a coordinator that no longer serves that
        // partition, or one that woke from a stall longer than its lease and does not know
        // yet whether it was taken over: the agent retries and finds the owner.
        let routed = claimed.map_or(0, |u| u.partition());
        if let Some(uid) = &claimed {
            // Any frame answers a bulk offer (see `deliveries`).
            self.offers.answered(uid);
        }
        if !self.answers(routed) || self.lease_lapsed() {
            return FrameReply {
                msg: session::unavailable_reply(&msg.instance_uid, "partition is moving, retry"),
                bind: None,
                close: None,
            };
        }

        // A token that can no longer be used ends the session that rests on it, at once,
        // whatever the gateway's (older) authentication said.
        if let Credential::BootstrapToken { token_id, .. } = &frame.credential {
            if let Some(f) = self.token_unusable(token_id, now_ms()) {
                return self.refuse_frame(&frame, claimed, f.into()).await;
            }
        }

        // Decide which uid this message is about.
        let (uid, assigned) = match claimed {
            Some(uid) if !asked => {
                // A spare token never takes over a UID that exists: the agent gets a new one.
                let may_claim = match &frame.credential {
                    Credential::BootstrapToken {
                        token_id,
                        bound_uid,
                    } => match self.token_may_claim(token_id, *bound_uid, uid).await {
                        Ok(may) => may,
                        Err(()) => {
                            return FrameReply {
                                msg: session::unavailable_reply(
                                    &msg.instance_uid,
                                    "authentication unavailable, retry",
                                ),
                                bind: None,
                                close: None,
                            }
                        }
                    },
                    Credential::Certificate { .. } => true,
                };
                if !may_claim {
                    metrics::counter!("ampora_agent_uid_reassigned_total", "reason" => "uid_taken")
                        .increment(1);
                    self.refused(Refused {
                        ip: frame.source_ip,
                        reason: "uid_taken",
                        uid_hint: Some(uid),
                        detail: serde_json::json!({ "token_id": token_id, "outcome": "new_uid" }),
                    })
                    .await;
                }
                let collides = !may_claim
                    || match self.slot(&uid) {
                        Some(slot) => {
                            let e = slot.lock().await;
                            // Live elsewhere under another credential: a clone, not a reconnect.
                            e.conn.as_ref().is_some_and(|(gw, conn, _)| {
                                (gw, *conn) != (&frame.gateway, frame.conn_id)
                            }) && e.state.record.transport == Some(Transport::WebSocket)
                                && e.token_id.as_deref().is_some_and(|t| t != token_id)
                        }
                        None => false,
                    };
                if collides {
                    // Same partition, so the clone stays with this coordinator.
                    (InstanceUid::new_v7_in(uid.partition()), true)
                } else {
                    (uid, false)
                }
            }
            _ => (InstanceUid::new_v7(), true),
        };

        let (slot, fresh) = match self.slot(&uid) {
            Some(s) => (s, false),
            None => (self.insert_entry(AgentRecord::new(uid, now_ms())), true),
        };
        let mut entry = slot.lock().await;

        if let Err(f) = self.redeem(&mut entry, &frame, uid).await {
            drop(entry);
            // A refused newcomer leaves no record behind (it never got in).
            if assigned || fresh {
                self.forget(&uid);
            }
            if f == Refusal::Unavailable {
                return FrameReply {
                    msg: session::unavailable_reply(&msg.instance_uid, f.message()),
                    bind: None,
                    close: None,
                };
            }
            return self.refuse_frame(&frame, Some(uid), f).await;
        }
        entry.conn_token = match &frame.credential {
            Credential::BootstrapToken { token_id, .. } => Some(token_id.clone()),
            Credential::Certificate { .. } => None,
        };

        let new_conn = match (&entry.conn, frame.transport) {
            (_, Transport::Http) => entry.conn.is_none(),
            (Some((gw, conn, _)), Transport::WebSocket) => {
                (gw, *conn) != (&frame.gateway, frame.conn_id)
            }
            (None, Transport::WebSocket) => true,
        };
        if new_conn {
            // After a move between gateways, frames in flight on the old path may have been
            // lost (the bus is at-most-once): unless this one is a full report, ask for it.
            let moved = entry
                .state
                .record
                .gateway
                .as_deref()
                .is_some_and(|g| g != frame.gateway.0);
            entry.state.connection_started();
            entry.state.record.connected_ms = now_ms();
            if moved {
                entry.state.complete = false;
            }
        }
        entry.conn = Some((frame.gateway.clone(), frame.conn_id, frame.epoch));
        entry.state.record.gateway = Some(frame.gateway.0.clone());

        if let Credential::Certificate { serial, .. } = &frame.credential {
            self.confirm_identity(uid, serial, frame.source_ip).await;
        }
        if let Err(bad_csr) = self.identity_offer(&mut entry, &frame, uid, new_conn).await {
            self.refused(Refused {
                ip: frame.source_ip,
                reason: "bad_csr",
                uid_hint: Some(uid),
                detail: serde_json::json!({ "error": bad_csr }),
            })
            .await;
            return FrameReply {
                msg: session::error_reply(
                    &msg.instance_uid,
                    ServerErrorResponseType::BadRequest,
                    &format!("certificate request refused: {bad_csr}"),
                ),
                bind: None,
                close: None,
            };
        }
        let desired = self.desired_of(&entry.state.record);
        if let (Credential::Certificate { serial, .. }, Some(id)) =
            (&frame.credential, entry.identity.clone())
        {
            if *serial == id.serial {
                session::identity_in_use(&mut entry.state, &self.offer, &id, frame.transport);
            }
        }
        // A key still to be sent waits for a TLS connection.
        let identity = entry
            .identity
            .clone()
            .filter(|i| frame.secure || i.private_key_pem.is_none());
        let packages = self
            .package_offer(&entry.state.record)
            .and_then(Result::ok)
            .and_then(|o| self.admit_upgrade(&entry.state.record, o));
        let components_known = msg
            .available_components
            .as_ref()
            .is_some_and(|ac| self.knows_components(&ac.hash));
        let telemetry = self.telemetry_offer(&entry.state.record);
        let ctx = Context {
            telemetry: telemetry.as_deref(),
            components_known,
            custom_capabilities: &self.cfg.custom_capabilities,
            packages: packages.as_deref(),
            now_ms: now_ms(),
            transport: frame.transport,
            desired: desired.as_deref(),
            opamp_offer: Some(&self.offer),
            identity: identity.as_ref(),
            assign_uid: assigned.then_some(uid),
        };
        let first_description = entry.state.record.description == Default::default();
        let mut outcome = session::handle(&mut entry.state, msg, &ctx);
        // The package set depends on the platform the agent describes: a first or changed
        // description is answered with the set it now calls for.
        if msg.agent_disconnect.is_none() && outcome.events.contains(&Event::DescriptionChanged) {
            let offer = self
                .package_offer(&entry.state.record)
                .and_then(Result::ok)
                .and_then(|o| self.admit_upgrade(&entry.state.record, o));
            if let Some(p) = offer {
                outcome.changed |= session::packages::offer(
                    &mut entry.state,
                    &p,
                    false,
                    ctx.now_ms,
                    &mut outcome.reply,
                    &mut outcome.events,
                );
            }
            // So is the own-telemetry offer (the groups follow the description), in this
            // reply rather than a heartbeat later.
            if let Some(t) = self.telemetry_offer(&entry.state.record) {
                let o = self.offer.for_agent(frame.transport, identity.is_some());
                outcome.changed |= session::offer_settings(
                    &mut entry.state,
                    Some(&o),
                    identity.as_ref(),
                    Some(&t),
                    &mut outcome.reply,
                );
            }
        }
        if let Some(p) = &packages {
            self.upgrade_progressed(&entry.state.record, p);
            outcome.changed |= self.note_verified(&mut entry.state.record, p);
        }
        self.stamp_downloads(uid, &mut outcome.reply);
        // A generated key goes out in one offer, then is forgotten.
        let key_sent = outcome
            .reply
            .connection_settings
            .as_ref()
            .and_then(|c| c.opamp.as_ref())
            .and_then(|o| o.certificate.as_ref())
            .is_some_and(|c| !c.private_key.is_empty());
        if key_sent {
            if let Some(mut key) = entry
                .identity
                .as_mut()
                .and_then(|i| i.private_key_pem.take())
            {
                zeroize::Zeroize::zeroize(&mut key);
            }
        }

        let mut described = false;
        for ev in &outcome.events {
            match ev {
                Event::ConfigFailed { hash, error } => {
                    metrics::counter!("ampora_config_remote_status_total", "status" => "failed")
                        .increment(1);
                    // The agent wrote `error`: escaped (no forged log lines) and cut short.
                    let error = log_safe(error, 512);
                    tracing::warn!(instance_uid = %uid, config_hash = %hash, error = %error, "agent failed to apply remote config");
                    self.rollout_wake.notify_one();
                }
                Event::ConfigApplied { .. } => {
                    metrics::counter!("ampora_config_remote_status_total", "status" => "applied")
                        .increment(1);
                    self.rollout_wake.notify_one();
                }
                Event::CapMismatch { what } => {
                    metrics::counter!("ampora_opamp_frames_rejected_total", "reason" => "cap_mismatch")
                        .increment(1);
                    tracing::debug!(instance_uid = %uid, what, "capability mismatch");
                }
                Event::Disconnected => {
                    entry.conn = None;
                    self.upgrade_gone(&uid);
                }
                Event::DescriptionChanged => described = true,
                Event::PackageFailed { .. } | Event::PackagesInstalled => {
                    self.package_event(uid, ev).await;
                }
                Event::ComponentsReported { hash, set } => {
                    self.components_reported(hash, set).await;
                }
            }
        }
        if described {
            // What the agent says it is, kept where operators look: the first description
            // and every change, with where it came from.
            self.audit_agent_event(AuditEntry {
                id: 0,
                at_ms: now_ms(),
                actor: "agent".into(),
                action: "agent.described".into(),
                instance_uid: Some(uid),
                source_ip: Some(frame.source_ip),
                reason: None,
                detail: serde_json::json!({
                    "first": first_description,
                    "gateway": frame.gateway.to_string(),
                    "description": entry.state.record.description,
                }),
            })
            .await;
        }
        // A description can change which assignment matches; a newly matched config goes out
        // in this very reply.
        let may_match = outcome.events.contains(&Event::DescriptionChanged)
            || entry.state.record.assigned_config.is_none();
        if may_match && self.reassign(&mut entry.state) {
            outcome.changed = true;
            let sendable = outcome.reply.error_response.is_none() && msg.agent_disconnect.is_none();
            if let (true, Some(d)) = (sendable, self.desired_of(&entry.state.record)) {
                if let Some(push) = session::push_config(&mut entry.state, &d, shared::now_ms()) {
                    outcome.reply.remote_config = push.remote_config;
                }
            }
        }
        // An operator's Restart for an HTTP agent goes out as the answer to its next poll.
        if entry.state.restart_pending
            && frame.transport == Transport::Http
            && msg.agent_disconnect.is_none()
        {
            entry.state.restart_pending = false;
            outcome.reply = session::restart_reply(&msg.instance_uid);
        } else if frame.transport == Transport::Http
            && outcome.reply.error_response.is_none()
            && !entry.state.custom_pending.is_empty()
        {
            outcome.reply.custom_message = Some(entry.state.custom_pending.remove(0));
        }
        if assigned && !self.answers(uid.partition()) {
            // A fresh uid belongs to whichever coordinator serves its partition: that one
            // gets the agent's next frame, finds it new and asks for its full state.
            drop(entry);
            self.forget(&uid);
            outcome.reply.flags |= proto::server_flags::REPORT_FULL_STATE;
        } else {
            self.mark_dirty(uid);
        }

        let bind = (frame.transport == Transport::WebSocket
            && !assigned
            && frame.epoch == 0
            && msg.agent_disconnect.is_none())
        .then_some(uid);
        FrameReply {
            msg: outcome.reply,
            bind,
            close: None,
        }
    }

    /// The reply to a refused frame (the connection is closed after it), audited.
    pub(super) async fn refuse_frame(
        &self,
        frame: &AgentFrame,
        uid: Option<InstanceUid>,
        f: Refusal,
    ) -> FrameReply {
        let presented = match &frame.credential {
            Credential::BootstrapToken { token_id, .. } => {
                serde_json::json!({ "token_id": token_id })
            }
            Credential::Certificate { serial, .. } => serde_json::json!({ "certificate": serial }),
        };
        self.refused(Refused {
            ip: frame.source_ip,
            reason: refusals::reason_label(f.as_str()),
            uid_hint: uid,
            detail: presented,
        })
        .await;
        FrameReply {
            msg: session::error_reply(
                &frame.msg.instance_uid,
                ServerErrorResponseType::BadRequest,
                f.message(),
            ),
            bind: None,
            close: Some(format!("auth: {}", f.message())),
        }
    }
}
