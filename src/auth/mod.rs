//! Client authentication and the identity the proxy hands to backends.
//!
//! Authenticators run in kube-apiserver's order: front proxy (requestheader) first, then x509
//! client certificates, then bearer tokens, then anonymous. The first that recognises the
//! request decides; a presented credential that fails verification is a 401, never a fall-back
//! to anonymous. `identity` then strips whatever identity the client tried to assert and writes
//! the authenticated one as `X-Remote-*` headers.

pub mod authorization;
pub mod delegating;
pub mod identity;
pub mod impersonation;
pub mod requestheader;
pub mod token;
pub mod tokenreview;
pub mod x509;

use std::sync::Arc;

use http::HeaderMap;

pub use identity::UserInfo;

/// Everything an authenticator may look at: the TLS peer chain and the request headers.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The connection's client certificate chain (empty without one).
    pub peer: &'a x509::PeerChain,
    pub headers: &'a HeaderMap,
}

/// Why a request was refused. The message is logged; clients see kube's plain `Unauthorized`.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("client certificate: {0}")]
    ClientCertificate(String),
    #[error("front-proxy client certificate: {0}")]
    FrontProxy(String),
    #[error("bearer token: {0}")]
    Token(String),
    #[error("no credentials presented and anonymous access is disabled")]
    NoCredentials,
}

/// One way of recognising a caller. `Ok(None)` means "not my kind of credential".
///
/// Users are shared (`Arc`): an authenticator that knows its users ahead of the request (the
/// token file, a connection's certificate) hands out the one it keeps instead of a copy.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, credentials: Credentials<'_>) -> Result<Option<Arc<UserInfo>>, AuthError>;
}

/// The chain of authenticators, in kube-apiserver's order, plus the anonymous fall-back.
#[derive(Clone, Default)]
pub struct AuthChain {
    authenticators: Vec<Arc<dyn Authenticator>>,
    token_reviewer: Option<Arc<dyn token::AsyncTokenAuthenticator>>,
    /// `system:anonymous`, made once, when anonymous requests are allowed.
    anonymous: Option<Arc<UserInfo>>,
}

impl AuthChain {
    pub fn new(authenticators: Vec<Arc<dyn Authenticator>>, anonymous: bool) -> Self {
        let anonymous = anonymous.then(|| Arc::new(UserInfo::anonymous()));
        Self { authenticators, token_reviewer: None, anonymous }
    }

    /// Adds an asynchronous bearer-token authenticator (TokenReview) after the synchronous ones.
    pub fn with_token_reviewer(mut self, reviewer: Arc<dyn token::AsyncTokenAuthenticator>) -> Self {
        self.token_reviewer = Some(reviewer);
        self
    }

    /// Authenticates a request with union semantics: the first authenticator that recognises
    /// the caller wins; if none does, any error one of them raised is the answer. Every
    /// authenticated user gets `system:authenticated`, as kube-apiserver's group adder does.
    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Arc<UserInfo>, AuthError> {
        let mut first_error = None;
        for authenticator in &self.authenticators {
            match authenticator.authenticate(credentials) {
                Ok(Some(user)) => return Ok(identity::with_authenticated_group(user)),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let token = token::bearer_token(credentials.headers);
        if let (Some(reviewer), Some(token)) = (&self.token_reviewer, token) {
            match reviewer.review(token).await {
                Ok(Some(user)) => return Ok(identity::with_authenticated_group(user)),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // A presented credential that nobody accepted is a failure, never anonymous.
        if token.is_some() {
            return Err(AuthError::Token("token not recognised".into()));
        }
        self.anonymous.clone().ok_or(AuthError::NoCredentials)
    }
}
