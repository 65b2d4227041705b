//! The subject names of the bus (see the table in the `nats` module docs): what each process
//! subscribes and publishes to, ids made into single subject tokens, and the check of the
//! configured prefix. Pure string work, kept apart so every subscribing or publishing part
//! names subjects the same way.

use crate::bus::{BusError, Route};
use crate::ids::GatewayId;

/// The queue group of every coordinator subscription.
pub(super) const QUEUE_GROUP: &str = "coord";

pub(super) struct Subjects {
    pub(super) prefix: String,
    /// `<prefix>.inbox.<node>.`, the start of every subject this process's inbox receives.
    pub(super) inbox: String,
    /// Where other processes fetch this one's large messages from.
    pub(super) fetch: String,
}

impl Subjects {
    pub(super) fn new(prefix: &str, node: &str) -> Self {
        let inbox = format!("{prefix}.inbox.{}.", token(node));
        Self {
            prefix: prefix.to_string(),
            fetch: format!("{inbox}fetch"),
            inbox,
        }
    }

    pub(super) fn route(&self, route: Route) -> String {
        match route {
            Route::Partition(p) => self.partition(p),
            Route::Any => format!("{}.any", self.prefix),
        }
    }

    pub(super) fn partition(&self, p: u16) -> String {
        format!("{}.a2s.{p}", self.prefix)
    }

    pub(super) fn gateway(&self, gateway: &GatewayId) -> String {
        format!("{}.gw.{}", self.prefix, token(&gateway.0))
    }

    pub(super) fn control(&self) -> String {
        format!("{}.ctl", self.prefix)
    }

    pub(super) fn reply(&self, id: u64) -> String {
        format!("{}r.{id}", self.inbox)
    }

    /// For the reply subject of another process's request (`<prefix>.inbox.<node>.r.<id>`),
    /// the subject its coalesced replies go to (`<prefix>.inbox.<node>.batch`).
    pub(super) fn batch_inbox_of(&self, reply: &str) -> Option<String> {
        let (base, id) = reply.rsplit_once(".r.")?;
        let valid = self.is_inbox(reply) && id.parse::<u64>().is_ok();
        valid.then(|| format!("{base}.batch"))
    }

    /// The request id of a reply subject on this process's inbox.
    pub(super) fn request_id(&self, reply: &str) -> Option<u64> {
        reply
            .strip_prefix(&self.inbox)?
            .strip_prefix("r.")?
            .parse()
            .ok()
    }

    pub(super) fn is_inbox(&self, subject: &str) -> bool {
        subject
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with(".inbox."))
    }
}

/// `s` as one subject token: the characters NATS gives meaning to become `_`.
pub(super) fn token(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    s.chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

pub(super) fn validate_prefix(prefix: &str) -> Result<(), BusError> {
    let ok = !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && !t
                    .chars()
                    .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
        });
    if ok {
        Ok(())
    } else {
        Err(BusError::Unavailable(format!(
            "invalid subject prefix {prefix:?}: dot-separated tokens without wildcards or spaces"
        )))
    }
}
