//! The errors of the transports: [`ConnectError`] (establishing a WebSocket connection) and
//! [`ClientError`] (an established transport or one exchange), with the server-requested
//! retry delay both can carry.

use std::time::Duration;

/// Failure to establish a WebSocket connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid endpoint: {0}")]
    Url(String),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect: timed out")]
    Timeout,
    #[error("handshake: {0}")]
    Handshake(String),
    /// The server answered the upgrade with something other than 101 (401, 429, 503, …).
    #[error("{status}: {body}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
}

impl ConnectError {
    /// Server-requested delay before the next attempt (429/503 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Failure of an established transport or of one exchange.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint: {0}")]
    Url(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(#[from] fastwebsockets::WebSocketError),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("timed out")]
    Timeout,
    /// The peer sent something that is not a valid OpAMP message.
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("connection closed")]
    Closed,
    /// Plain HTTP: the server answered with a status other than 200.
    #[error("{status}: {body}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
}

impl ClientError {
    /// Server-requested delay before the next attempt (429/503 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl From<ConnectError> for ClientError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Url(u) => Self::Url(u),
            ConnectError::Io(e) => Self::Io(e),
            ConnectError::Timeout => Self::Timeout,
            ConnectError::Handshake(h) => Self::Protocol(h),
            ConnectError::Status {
                status,
                retry_after,
                body,
            } => Self::Status {
                status,
                retry_after,
                body,
            },
        }
    }
}
