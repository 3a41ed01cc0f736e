//! Kubernetes `Status` bodies, and the one place where request errors become responses.
//!
//! kube-aggregator answers many of these in plain text and keeps the cause in its logs; we keep
//! its status codes but always answer a `Status` whose message names the APIService and the
//! cause, never a backend address or a secret.

use axum::body::Body;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::auth::authorization::{Attributes, AuthorizationError};
use crate::auth::impersonation::ImpersonationError;
use crate::auth::AuthError;
use crate::backend::BackendError;

/// A backend failure in the client's words: unavailable, unless the request itself was at
/// fault or the backend was too slow.
fn backend_message(apiservice: &str, error: &BackendError) -> String {
    match error {
        BackendError::HeadersTooLarge { .. } | BackendError::Timeout(_) => {
            format!("APIService {apiservice:?}: {error}")
        }
        _ => format!("APIService {apiservice:?} is unavailable: {error}"),
    }
}

pub const CONTENT_TYPE_JSON: &str = "application/json";

/// kube's `NewForbidden` around the authorizer's words: `<resource>.<group> "<name>" is
/// forbidden: ...` for resources, `forbidden: ...` for paths, with the resource in `details`.
fn forbidden(code: StatusCode, attributes: &Attributes, error: &RequestError) -> Status {
    let (message, details) = match attributes {
        Attributes::NonResource { .. } => (format!("forbidden: {error}"), StatusDetails::default()),
        Attributes::Resource(r) => {
            let resource = if r.group.is_empty() { r.resource.clone() } else { format!("{}.{}", r.resource, r.group) };
            let message = if r.name.is_empty() {
                format!("{resource} is forbidden: {error}")
            } else {
                format!("{resource} {:?} is forbidden: {error}", r.name)
            };
            let some = |s: &String| (!s.is_empty()).then(|| s.clone());
            (
                message,
                StatusDetails {
                    name: some(&r.name),
                    group: some(&r.group),
                    kind: some(&r.resource),
                    ..Default::default()
                },
            )
        }
    };
    Status::failure(code, "Forbidden", message).with_details(details)
}

/// `metav1.Status`, as much of it as the proxy writes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub status: &'static str,
    pub message: String,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    pub code: u16,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

impl Status {
    pub fn failure(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: "Status",
            api_version: "v1",
            metadata: serde_json::Map::new(),
            status: "Failure",
            message: message.into(),
            reason,
            details: None,
            code: code.as_u16(),
        }
    }

    pub fn with_details(mut self, details: StatusDetails) -> Self {
        self.details = Some(details);
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.details.as_ref().and_then(|d| d.retry_after_seconds);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = code;
        // What an audit event keeps of a Status answer.
        response.extensions_mut().insert(crate::audit::event::ResponseStatus {
            metadata: Default::default(),
            status: self.status.to_owned(),
            message: self.message.clone(),
            reason: self.reason.to_owned(),
            code: self.code,
        });
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_JSON));
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Why a request could not be served, by the phase that failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Authentication failed; the cause is logged, the client sees kube's plain `Unauthorized`.
    #[error("authentication failed: {0}")]
    Unauthorized(#[from] AuthError),
    /// Authorization (kube-apiserver, by SubjectAccessReview) said no, or could not be asked.
    #[error(transparent)]
    Authorization(#[from] AuthorizationError),
    /// The impersonation headers cannot be used.
    #[error(transparent)]
    Impersonation(#[from] ImpersonationError),
    /// No route: an unknown group, version or path.
    #[error("{0}")]
    NotFound(String),
    /// The routing table has not been built yet.
    #[error("the request has been made before all known HTTP paths have been installed, please try again")]
    NotReady,
    /// A local APIService or core path, with no delegate configured.
    #[error("APIService {apiservice:?} is served locally, and no --delegate-url is configured")]
    NoDelegate { apiservice: String },
    /// The backend could not be resolved or reached.
    #[error("APIService {apiservice:?} is unavailable: {cause}")]
    ServiceUnavailable { apiservice: String, cause: String },
    /// The backend's TLS client could not be built from the APIService (bad caBundle, ...).
    #[error("APIService {apiservice:?}: {cause}")]
    Transport { apiservice: String, cause: String },
    /// The backend layer could not get an answer: the words say where it broke.
    #[error("{}", backend_message(apiservice, error))]
    Backend { apiservice: String, error: crate::backend::BackendError },
    /// The backend answered a redirect, which the proxy refuses to forward.
    #[error("APIService {apiservice:?}: the backend attempted to redirect this request, which is not permitted")]
    RedirectRejected { apiservice: String },
    /// The request itself is malformed (a `?timeout=` that does not parse, ...).
    #[error("{0}")]
    BadRequest(String),
    /// The request outlived `--request-timeout` (or its own `?timeout=`); kube's words.
    #[error("Timeout: request did not complete within the allotted timeout")]
    Timeout,
    /// The APIService's own flow control (annotations or `--apiservice-*`) said no.
    #[error("APIService {apiservice:?}: {refusal}")]
    ApiServiceTooManyRequests { apiservice: String, refusal: crate::server::flow::FlowRefusal },
    /// The server is draining and `--shutdown-send-retry-after` asks new requests to go
    /// elsewhere; kube's words.
    #[error("The apiserver is shutting down, please try again later.")]
    ShuttingDown,
    /// `--max-requests-inflight` / `--max-mutating-requests-inflight` were full.
    #[error("Too many requests, please try again later.")]
    TooManyRequests,
    /// The authenticated identity has a byte no HTTP header can carry (a control character):
    /// the request is refused rather than sent without it.
    #[error("the identity of this request cannot be sent to the backend: {0}")]
    IdentityNotRepresentable(#[from] crate::auth::identity::IdentityHeaderError),
}

impl RequestError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Authorization(AuthorizationError::Forbidden { .. }) => StatusCode::FORBIDDEN,
            Self::Authorization(AuthorizationError::Failed(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Impersonation(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::NotReady | Self::NoDelegate { .. } | Self::ServiceUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Transport { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::RedirectRejected { .. } => StatusCode::BAD_GATEWAY,
            Self::Backend { error, .. } => match error {
                BackendError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                BackendError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::TooManyRequests | Self::ApiServiceTooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::IdentityNotRepresentable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ShuttingDown => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn to_status(&self) -> Status {
        let code = self.status_code();
        match self {
            Self::Unauthorized(_) => Status::failure(code, "Unauthorized", "Unauthorized"),
            Self::Authorization(AuthorizationError::Forbidden { attributes, .. }) => forbidden(code, attributes, self),
            Self::Authorization(e @ AuthorizationError::Failed(_)) => {
                Status::failure(code, "InternalError", format!("Internal error occurred: {e}"))
            }
            Self::Impersonation(e) => Status::failure(code, "BadRequest", e.to_string()),
            Self::NotFound(message) => Status::failure(code, "NotFound", message.clone()),
            Self::NotReady => Status::failure(code, "ServiceUnavailable", self.to_string())
                .with_details(StatusDetails { retry_after_seconds: Some(5), ..Default::default() }),
            Self::NoDelegate { .. } | Self::ServiceUnavailable { .. } => {
                Status::failure(code, "ServiceUnavailable", self.to_string())
            }
            Self::Transport { .. } => Status::failure(code, "InternalError", self.to_string()),
            Self::RedirectRejected { .. } => Status::failure(code, "BadGateway", self.to_string()),
            Self::Backend { error, .. } => match error {
                BackendError::HeadersTooLarge { .. } => Status::failure(code, "BadRequest", self.to_string()),
                BackendError::Timeout(_) => Status::failure(code, "Timeout", self.to_string()),
                BackendError::Overloaded { .. } | BackendError::QueueTimeout(_) => {
                    Status::failure(code, "ServiceUnavailable", self.to_string())
                        .with_details(StatusDetails { retry_after_seconds: Some(1), ..Default::default() })
                }
                _ => Status::failure(code, "ServiceUnavailable", self.to_string()),
            },
            Self::BadRequest(message) => Status::failure(code, "BadRequest", message.clone()),
            Self::Timeout => Status::failure(code, "Timeout", self.to_string()).with_details(StatusDetails::default()),
            // kube answers these in plain text; the Status keeps its code, words and Retry-After.
            Self::ShuttingDown => Status::failure(code, "TooManyRequests", self.to_string())
                .with_details(StatusDetails { retry_after_seconds: Some(5), ..Default::default() }),
            Self::TooManyRequests => Status::failure(code, "TooManyRequests", self.to_string())
                .with_details(StatusDetails { retry_after_seconds: Some(1), ..Default::default() }),
            Self::ApiServiceTooManyRequests { refusal, .. } => {
                Status::failure(code, "TooManyRequests", self.to_string()).with_details(StatusDetails {
                    retry_after_seconds: Some(refusal.retry_after_seconds()),
                    ..Default::default()
                })
            }
            Self::IdentityNotRepresentable(_) => {
                Status::failure(code, "InternalError", format!("Internal error occurred: {self}"))
            }
        }
    }

    pub fn into_response(self) -> Response<Body> {
        self.to_status().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_body_matches_kube_apiserver() {
        let status = RequestError::Unauthorized(AuthError::NoCredentials).to_status();
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#
        );
    }

    #[test]
    fn unavailable_names_apiservice_and_cause() {
        let err = RequestError::ServiceUnavailable {
            apiservice: "v1.echo.example.com".into(),
            cause: "connection refused".into(),
        };
        let status = err.to_status();
        assert_eq!((status.code, status.reason), (503, "ServiceUnavailable"));
        assert_eq!(status.message, "APIService \"v1.echo.example.com\" is unavailable: connection refused");
    }

    #[test]
    fn timeout_and_too_many_requests_match_kube_apiserver() {
        let timeout = serde_json::to_string(&RequestError::Timeout.to_status()).unwrap();
        assert_eq!(
            timeout,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Timeout: request did not complete within the allotted timeout","reason":"Timeout","details":{},"code":504}"#
        );
        let response = RequestError::TooManyRequests.into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn not_ready_asks_to_retry_after_five_seconds() {
        let response = RequestError::NotReady.into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[RETRY_AFTER], "5");
    }
}
