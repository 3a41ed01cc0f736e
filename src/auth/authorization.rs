//! Authorization of the proxy's own endpoints in cluster mode (`/apis`, `/apis/<group>`,
//! `/openapi/*`, `/metrics`, `/debug/*`): kube-apiserver authorizes these non-resource paths
//! before its aggregator answers them, so the proxy asks it the same question with a
//! SubjectAccessReview. Requests it forwards are authorized where they land (kube-apiserver or
//! the extension server's delegated authorization).
//!
//! Decisions are cached briefly per (user, verb, path), as k8s.io/apiserver's delegating
//! authorizer does.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

use super::UserInfo;

/// k8s.io/apiserver's `--authorization-webhook-cache-authorized-ttl` default.
pub const ALLOWED_TTL: Duration = Duration::from_secs(10);
/// `--authorization-webhook-cache-unauthorized-ttl` default.
pub const DENIED_TTL: Duration = Duration::from_secs(10);
const MAX_CACHED: usize = 10_000;

#[derive(Debug, thiserror::Error)]
#[error("authorization check failed: {0}")]
pub struct AuthorizationError(String);

/// The decision and kube's reason, if it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

pub struct SubjectAccessReviewer {
    api: Api<SubjectAccessReview>,
    cache: DashMap<(UserInfoKey, String, String), (Instant, Decision)>,
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
    pub fn new(client: Client) -> Self {
        Self { api: Api::all(client), cache: DashMap::new() }
    }

    /// May `user` perform `verb` (lower-case HTTP verb, e.g. `get`) on the non-resource `path`?
    pub async fn non_resource(&self, user: &UserInfo, verb: &str, path: &str) -> Result<Decision, AuthorizationError> {
        let key = (UserInfoKey::from(user), verb.to_owned(), path.to_owned());
        if let Some(entry) = self.cache.get(&key) {
            if entry.0 > Instant::now() {
                return Ok(entry.1.clone());
            }
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone().into_iter().collect()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_owned()),
                    verb: Some(verb.to_owned()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer =
            self.api.create(&PostParams::default(), &review).await.map_err(|e| AuthorizationError(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        let decision = Decision { allowed: status.allowed, reason: status.reason.unwrap_or_default() };
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        let ttl = if decision.allowed { ALLOWED_TTL } else { DENIED_TTL };
        self.cache.insert(key, (Instant::now() + ttl, decision.clone()));
        Ok(decision)
    }
}
