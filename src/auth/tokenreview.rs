//! Bearer tokens (service-account tokens included) checked with a TokenReview against
//! kube-apiserver, the way delegating authentication in k8s.io/apiserver does.
//!
//! Answers, positive and negative, are cached for a bounded time keyed by the token's SHA-256,
//! so a busy client costs one review per TTL and no token is kept in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use super::token::AsyncTokenAuthenticator;
use super::{AuthError, UserInfo};

/// kube's `--authentication-token-webhook-cache-ttl` default for delegating authentication.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(10);
/// Above this many cached answers, expired ones are dropped (and all, if that is not enough).
const MAX_CACHED: usize = 10_000;

pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    ttl: Duration,
    cache: DashMap<[u8; 32], (Instant, Option<Arc<UserInfo>>)>,
}

impl TokenReviewAuthenticator {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self { api: Api::all(client), ttl, cache: DashMap::new() }
    }

    async fn review_uncached(&self, token: &str) -> Result<Option<Arc<UserInfo>>, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), ..TokenReviewSpec::default() },
            ..TokenReview::default()
        };
        let reviewed = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Token(format!("token review failed: {e}")))?;
        let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else { return Ok(None) };
        let Some(user) = status.user else { return Ok(None) };
        let user = UserInfo {
            name: user.username.unwrap_or_default(),
            uid: user.uid.filter(|u| !u.is_empty()),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        };
        // Kept as the chain hands it out, so a cached answer is not copied per request.
        Ok(Some(Arc::new(user.with_authenticated_group())))
    }

    fn remember(&self, key: [u8; 32], answer: Option<Arc<UserInfo>>) {
        if self.cache.len() >= MAX_CACHED {
            let now = Instant::now();
            self.cache.retain(|_, (expires, _)| *expires > now);
            if self.cache.len() >= MAX_CACHED {
                self.cache.clear();
            }
        }
        self.cache.insert(key, (Instant::now() + self.ttl, answer));
    }
}

impl AsyncTokenAuthenticator for TokenReviewAuthenticator {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Option<Arc<UserInfo>>, AuthError>> {
        Box::pin(async move {
            let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if let Some(entry) = self.cache.get(&key) {
                if entry.0 > Instant::now() {
                    return Ok(entry.1.clone());
                }
            }
            let answer = self.review_uncached(token).await?;
            self.remember(key, answer.clone());
            Ok(answer)
        })
    }
}
