//! How a `NatsBus` is configured: [`NatsBusOptions`] and the defaults it starts from. Kept
//! apart because the options are public API and plain data that every other part reads.

use std::time::Duration;

/// The prefix of every subject unless configured otherwise.
pub const DEFAULT_SUBJECT_PREFIX: &str = "ampora";
/// The largest logical message unless configured otherwise.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a request waits for its reply unless configured otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a burst of small messages to one subject may keep gathering unless configured
/// otherwise (see `batch`: a lone message does not wait for it).
pub const DEFAULT_BATCH_LINGER: Duration = Duration::from_micros(300);
/// The largest coalesced NATS message unless configured otherwise; always also below the
/// chunk limit.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 64 * 1024;

/// How to reach NATS and how to name things on it.
#[derive(Debug, Clone)]
pub struct NatsBusOptions {
    /// A NATS URL (`nats://host:4222`), or several separated by commas.
    pub url: String,
    /// First token(s) of every subject (default `ampora`); processes that must talk share it.
    pub subject_prefix: String,
    /// This process's id, unique in the cluster: names its inbox and its NATS connection.
    pub node: String,
    /// How long a request waits for its reply; also how long partial large messages are kept.
    pub request_timeout: Duration,
    /// The largest logical message (encoded) sent or accepted (default 64 MiB).
    pub max_message_bytes: usize,
    /// How long small messages to one subject may gather into one NATS message while more keep
    /// coming (default 300 µs). Zero sends each message at once, alone, as versions without
    /// batching did: set it while older versions, which cannot read batches, are still running.
    pub batch_linger: Duration,
    /// The largest NATS message small messages are coalesced into (default 64 KiB).
    pub batch_max_bytes: usize,
}

impl NatsBusOptions {
    /// Defaults for everything but the URL; the node id is random.
    pub fn new(url: impl Into<String>) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            url: url.into(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
            node: format!("node-{}", &id[..12]),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            batch_linger: DEFAULT_BATCH_LINGER,
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
        }
    }
}

impl Default for NatsBusOptions {
    fn default() -> Self {
        Self::new("nats://127.0.0.1:4222")
    }
}
