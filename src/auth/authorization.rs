//! Authorization, as kube-apiserver's filter chain does it in front of its aggregator.
//!
//! In cluster mode kube-apiserver is the authorizer, asked by SubjectAccessReview:
//! - impersonation: every `Impersonate-*` header is one `impersonate` check;
//! - the proxy's own endpoints (`/apis`, `/openapi/*`, `/metrics`, `/debug/*`): non-resource
//!   checks, as kube-apiserver makes for its own aggregator's;
//! - requests to extension servers: the resource attributes of kube's RequestInfo, so an
//!   extension server that trusts the aggregator's authorization is as protected behind the
//!   proxy as behind kube-aggregator (`--authorize-aggregated-requests=false` leaves it to the
//!   extension server alone).
//!
//! Requests the delegate (kube-apiserver) serves are not asked about here: it authorizes them
//! itself with the same identity and attributes, so asking first would only double the cost.
//!
//! In standalone mode there is no authorizer: authentication is the gate, and impersonation is
//! refused unless the caller is in one of `--impersonation-allowed-groups`.
//!
//! Decisions are cached per (user, attributes) with kube's webhook-authorizer TTL flags; the
//! cache is bounded and counted.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes as SarResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::impersonation::Impersonation;
use super::UserInfo;
use crate::metrics::Metrics;

/// k8s.io/apiserver's delegating authorizer default for `--authorization-webhook-cache-authorized-ttl`.
pub const DEFAULT_ALLOWED_TTL: Duration = Duration::from_secs(10);
/// The same for `--authorization-webhook-cache-unauthorized-ttl`.
pub const DEFAULT_DENIED_TTL: Duration = Duration::from_secs(10);
/// Cached decisions at most; past it the cache starts again empty.
const MAX_CACHED: usize = 10_000;

/// What is asked, in kube's authorizer terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attributes {
    Resource(ResourceAttributes),
    /// `verb` is the lower-case HTTP method.
    NonResource {
        verb: String,
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ResourceAttributes {
    pub verb: String,
    pub group: String,
    pub version: String,
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
}

impl Attributes {
    /// kube's `forbiddenMessage`: who cannot do what, where.
    pub fn forbidden_message(&self, user: &str) -> String {
        match self {
            Attributes::NonResource { verb, path } => format!("User {user:?} cannot {verb} path {path:?}"),
            Attributes::Resource(r) => {
                let resource = if r.subresource.is_empty() {
                    r.resource.clone()
                } else {
                    format!("{}/{}", r.resource, r.subresource)
                };
                let (verb, group) = (&r.verb, &r.group);
                if r.namespace.is_empty() {
                    format!(
                        "User {user:?} cannot {verb} resource {resource:?} in API group {group:?} at the cluster scope"
                    )
                } else {
                    format!(
                        "User {user:?} cannot {verb} resource {resource:?} in API group {group:?} in the namespace {:?}",
                        r.namespace
                    )
                }
            }
        }
    }
}

/// Why a request may not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    /// The authorizer said no (or standalone mode refuses impersonation).
    #[error("{}{}", attributes.forbidden_message(user), if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Forbidden { user: String, attributes: Box<Attributes>, reason: String },
    /// The authorizer could not be asked.
    #[error("authorization check failed: {0}")]
    Failed(String),
}

/// The decision and kube's reason, if it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// Cache lifetimes of decisions (`--authorization-webhook-cache-{authorized,unauthorized}-ttl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtls {
    pub allowed: Duration,
    pub denied: Duration,
}

impl Default for CacheTtls {
    fn default() -> Self {
        Self { allowed: DEFAULT_ALLOWED_TTL, denied: DEFAULT_DENIED_TTL }
    }
}

/// kube-apiserver, asked by SubjectAccessReview, with a bounded cache of its answers.
pub struct SubjectAccessReviewer {
    api: Api<SubjectAccessReview>,
    ttls: CacheTtls,
    cache: DashMap<(UserInfoKey, Attributes), (Instant, Decision)>,
}

/// The parts of a user an authorizer looks at, hashable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UserInfoKey(String, Option<String>, Vec<String>, Vec<(String, Vec<String>)>);

impl From<&UserInfo> for UserInfoKey {
    fn from(u: &UserInfo) -> Self {
        Self(u.name.clone(), u.uid.clone(), u.groups.clone(), u.extra.clone().into_iter().collect())
    }
}

impl SubjectAccessReviewer {
    pub fn new(client: Client, ttls: CacheTtls) -> Self {
        Self { api: Api::all(client), ttls, cache: DashMap::new() }
    }

    /// May `user` do what `attributes` say? `cached` says whether the answer came from the cache.
    async fn review(&self, user: &UserInfo, attributes: &Attributes) -> Result<(Decision, bool), String> {
        let key = (UserInfoKey::from(user), attributes.clone());
        if let Some(entry) = self.cache.get(&key) {
            if entry.0 > Instant::now() {
                return Ok((entry.1.clone(), true));
            }
        }
        let (resource_attributes, non_resource_attributes) = match attributes {
            Attributes::Resource(r) => (
                Some(SarResourceAttributes {
                    verb: Some(r.verb.clone()),
                    group: Some(r.group.clone()),
                    version: Some(r.version.clone()),
                    namespace: Some(r.namespace.clone()),
                    resource: Some(r.resource.clone()),
                    subresource: Some(r.subresource.clone()),
                    name: Some(r.name.clone()),
                    ..SarResourceAttributes::default()
                }),
                None,
            ),
            Attributes::NonResource { verb, path } => {
                (None, Some(NonResourceAttributes { path: Some(path.clone()), verb: Some(verb.clone()) }))
            }
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone().into_iter().collect()),
                resource_attributes,
                non_resource_attributes,
            },
            ..SubjectAccessReview::default()
        };
        let answer = self.api.create(&PostParams::default(), &review).await.map_err(|e| e.to_string())?;
        let status = answer.status.unwrap_or_default();
        let decision = Decision { allowed: status.allowed, reason: status.reason.unwrap_or_default() };
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        let ttl = if decision.allowed { self.ttls.allowed } else { self.ttls.denied };
        self.cache.insert(key, (Instant::now() + ttl, decision.clone()));
        Ok((decision, false))
    }
}

/// The authorization step of the request path, for either mode.
pub struct Authorization {
    /// Cluster mode: kube-apiserver. `None` in standalone mode.
    reviewer: Option<SubjectAccessReviewer>,
    /// Standalone mode: members of these groups may impersonate anyone (empty: nobody).
    impersonator_groups: Vec<String>,
    /// Whether requests to extension servers are authorized here first.
    aggregated: bool,
    metrics: std::sync::Arc<Metrics>,
}

/// Why standalone mode refused an impersonation.
const STANDALONE_IMPERSONATION: &str =
    "impersonation is refused in standalone mode unless the user is in one of --impersonation-allowed-groups";

impl Authorization {
    /// Cluster mode: every decision is kube-apiserver's.
    pub fn cluster(reviewer: SubjectAccessReviewer, aggregated: bool, metrics: std::sync::Arc<Metrics>) -> Self {
        Self { reviewer: Some(reviewer), impersonator_groups: Vec::new(), aggregated, metrics }
    }

    /// Standalone mode: no authorizer; impersonation only for `impersonator_groups`.
    pub fn standalone(impersonator_groups: Vec<String>, metrics: std::sync::Arc<Metrics>) -> Self {
        Self { reviewer: None, impersonator_groups, aggregated: false, metrics }
    }

    /// Whether anything is asked about requests to extension servers.
    pub fn authorizes_aggregated(&self) -> bool {
        self.reviewer.is_some() && self.aggregated
    }

    /// Whether the proxy's own endpoints are authorized (cluster mode).
    pub fn authorizes_own(&self) -> bool {
        self.reviewer.is_some()
    }

    /// `requestor` asks to act as `impersonation` while doing `action` (the request's own
    /// attributes). Cluster mode: kube's constrained checks, then the legacy ones; standalone:
    /// the allow-list. On success the request continues as the impersonated user.
    pub async fn impersonate(
        &self,
        requestor: &UserInfo,
        impersonation: Impersonation,
        action: &Attributes,
    ) -> Result<UserInfo, AuthorizationError> {
        if self.reviewer.is_none() {
            if !requestor.groups.iter().any(|g| self.impersonator_groups.contains(g)) {
                self.metrics.authorization("denied", "policy");
                let attributes = impersonation.checks().swap_remove(0);
                return Err(AuthorizationError::Forbidden {
                    user: requestor.name.clone(),
                    attributes: Box::new(attributes),
                    reason: STANDALONE_IMPERSONATION.to_owned(),
                });
            }
            self.metrics.authorization("allowed", "policy");
            return Ok(impersonation.into_user());
        }
        let constrained = self.all_allowed(requestor, impersonation.constrained_checks(requestor, action)).await;
        let refusal = match constrained {
            Ok(()) => return Ok(impersonation.into_user()),
            Err(e @ AuthorizationError::Failed(_)) => return Err(e),
            Err(refusal) => refusal,
        };
        // Not granted the constrained way: the legacy `impersonate` verb decides, and a
        // refusal names the constrained check, as kube-apiserver's does.
        match self.all_allowed(requestor, impersonation.checks()).await {
            Ok(()) => Ok(impersonation.into_user()),
            Err(e @ AuthorizationError::Failed(_)) => Err(e),
            Err(_) => Err(refusal),
        }
    }

    /// Every check in order, stopping at the first that is not allowed.
    async fn all_allowed(&self, user: &UserInfo, checks: Vec<Attributes>) -> Result<(), AuthorizationError> {
        for attributes in checks {
            self.authorize(user, attributes).await?;
        }
        Ok(())
    }

    /// Asks the authorizer; without one (standalone mode) everything authenticated passes.
    pub async fn authorize(&self, user: &UserInfo, attributes: Attributes) -> Result<(), AuthorizationError> {
        let Some(reviewer) = &self.reviewer else { return Ok(()) };
        match reviewer.review(user, &attributes).await {
            Err(e) => {
                self.metrics.authorization("error", "review");
                Err(AuthorizationError::Failed(e))
            }
            Ok((decision, cached)) => {
                let source = if cached { "cache" } else { "review" };
                if decision.allowed {
                    self.metrics.authorization("allowed", source);
                    return Ok(());
                }
                self.metrics.authorization("denied", source);
                Err(AuthorizationError::Forbidden {
                    user: user.name.clone(),
                    attributes: Box::new(attributes),
                    reason: decision.reason,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_messages_read_as_kubes() {
        let r = |namespace: &str, subresource: &str| {
            Attributes::Resource(ResourceAttributes {
                verb: "list".into(),
                group: "wardle.example.com".into(),
                version: "v1alpha1".into(),
                namespace: namespace.into(),
                resource: "flunders".into(),
                subresource: subresource.into(),
                name: String::new(),
            })
        };
        assert_eq!(
            r("default", "").forbidden_message("x"),
            r#"User "x" cannot list resource "flunders" in API group "wardle.example.com" in the namespace "default""#
        );
        assert_eq!(
            r("", "status").forbidden_message("x"),
            r#"User "x" cannot list resource "flunders/status" in API group "wardle.example.com" at the cluster scope"#
        );
        let path = Attributes::NonResource { verb: "get".into(), path: "/metrics".into() };
        assert_eq!(path.forbidden_message("x"), r#"User "x" cannot get path "/metrics""#);
    }
}
