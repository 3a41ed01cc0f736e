//! Why a backend exchange failed: one type that knows where it broke and whether trying again
//! (once, on another connection or endpoint) is safe.

use std::time::Duration;

use super::tls::describe_error;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// TCP did not connect (refused, unreachable, timed out): nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// The TLS handshake failed (certificate, name, protocol): trying again will not help.
    #[error("{0}")]
    Tls(String),
    /// The request's headers are larger than the backend accepts; sending them would make it
    /// tear down the connection, other clients' streams included.
    #[error("the request headers are {size} bytes, more than the backend accepts ({limit} bytes)")]
    HeadersTooLarge { size: usize, limit: usize },
    /// Every connection the endpoint may have is full and the queue of waiting requests too.
    #[error("{pending} requests are already waiting for a connection to the backend")]
    Overloaded { pending: usize },
    /// No connection had room before the request's deadline.
    #[error("no connection to the backend became free within {0:?}")]
    QueueTimeout(Duration),
    /// The backend did not answer within the request's deadline.
    #[error("the backend did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection failed after the request was handed to it (reset, GOAWAY, closed, a
    /// PING not answered). `retry` says what that allows.
    #[error("{cause}")]
    Transport { cause: String, retry: Retry },
}

/// What a transport failure allows for an idempotent request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The backend may have processed it (a reset, an answer cut short).
    Never,
    /// The connection failed before any answer: one more try.
    Once,
    /// The backend never took the request (GOAWAY past its stream, REFUSED_STREAM, a
    /// connection that went away before the request was written): it may be sent again on a
    /// fresh connection a bounded number of times, as Go's HTTP/2 transport does.
    Unprocessed,
}

impl BackendError {
    /// A short, fixed name for the kind of failure (a trace's `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Connect(_) => "connect",
            BackendError::Tls(_) => "tls",
            BackendError::HeadersTooLarge { .. } => "headers_too_large",
            BackendError::Overloaded { .. } => "overloaded",
            BackendError::QueueTimeout(_) => "queue_timeout",
            BackendError::Timeout(_) => "timeout",
            BackendError::Transport { .. } => "transport",
        }
    }

    /// Whether an idempotent request may be sent again after this: nothing reached the
    /// backend, or the connection failed before any answer.
    pub fn retry_safe(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Transport { retry, .. } => *retry != Retry::Never,
            _ => false,
        }
    }

    /// Whether the backend never took the request, so sending it again cannot repeat it.
    pub fn unprocessed(&self) -> bool {
        matches!(self, Self::Transport { retry: Retry::Unprocessed, .. })
    }

    /// Whether this counts against the endpoint's health (it says nothing about the backend
    /// when the request itself was at fault or the proxy's own queue was full).
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Tls(_) | Self::Timeout(_) | Self::Transport { .. })
    }

    /// The error of a request that hyper failed; whether its connection is finished (a
    /// GOAWAY, a broken or silent connection: anything but a reset of this one stream); and
    /// whether the backend simply declined it (a graceful GOAWAY, REFUSED_STREAM), which says
    /// nothing bad about its health.
    pub(super) fn from_hyper(e: &hyper::Error, server_name: &str) -> (Self, bool, bool) {
        let h2 = source::<h2::Error>(e);
        let goaway = h2.is_some_and(h2::Error::is_go_away);
        let refused = h2.is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM));
        let stream_only = h2.is_some_and(h2::Error::is_reset) && !goaway;
        let cause = if e.is_timeout() {
            "the backend stopped answering (HTTP/2 PING not answered)".to_owned()
        } else if goaway {
            "the backend closed the connection (GOAWAY) before answering".to_owned()
        } else {
            describe_error(e, server_name)
        };
        // Canceled: the request never left; GOAWAY past its stream or REFUSED_STREAM: the
        // backend says it did not process it; closed or silent before the answer began: a
        // connection-level failure before any response byte.
        let retry = if e.is_canceled() || goaway || refused {
            Retry::Unprocessed
        } else if e.is_incomplete_message() || e.is_closed() || e.is_timeout() {
            Retry::Once
        } else {
            Retry::Never
        };
        let declined = refused || (goaway && h2.and_then(h2::Error::reason) == Some(h2::Reason::NO_ERROR));
        (Self::Transport { cause, retry }, !stream_only, declined)
    }
}

/// The first error of type `T` in `e`'s chain of sources.
fn source<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}
