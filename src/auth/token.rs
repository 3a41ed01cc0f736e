//! Bearer tokens: kube's static token file (`--token-auth-file`) and the hook for TokenReview.
//!
//! The file is CSV, `token,user,uid,"group1,group2"`; the groups column is optional. Tokens are
//! kept only as SHA-256 digests so the table in memory holds no secret and a lookup compares
//! digests, not tokens.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::{AuthError, Authenticator, Credentials, UserInfo};

/// The token in `Authorization: Bearer <token>`, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// An authenticator that needs I/O (TokenReview against kube-apiserver).
pub trait AsyncTokenAuthenticator: Send + Sync {
    /// `Ok(None)` when the token is not valid.
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Option<Arc<UserInfo>>, AuthError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("token file {path}, line {line}: {reason}")]
    Line { path: String, line: usize, reason: String },
}

/// `--token-auth-file`.
#[derive(Debug, Default, Clone)]
pub struct TokenFile {
    /// Each user as the chain hands it out (with `system:authenticated`), so a request that
    /// presents a token gets a reference to it, not a copy.
    users: HashMap<[u8; 32], Arc<UserInfo>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Splits one CSV record, honouring double quotes (`""` is a literal quote inside quotes).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().expect("one field").push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().expect("one field").push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    Ok(fields)
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenFileError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, TokenFileError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| TokenFileError::Line { path: path.to_owned(), line: index + 1, reason };
            let fields = split_csv(line).map_err(bad)?;
            if fields.len() < 3 {
                return Err(bad(format!("expected token,user,uid[,groups], found {} fields", fields.len())));
            }
            let (token, name, uid) = (fields[0].trim(), fields[1].trim(), fields[2].trim());
            if token.is_empty() || name.is_empty() {
                return Err(bad("token and user must not be empty".into()));
            }
            let groups = fields
                .get(3)
                .map(|g| g.split(',').map(str::trim).filter(|g| !g.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default();
            let mut user = UserInfo::new(name, groups);
            user.uid = (!uid.is_empty()).then(|| uid.to_owned());
            users.insert(digest(token), Arc::new(user.with_authenticated_group()));
        }
        Ok(Self { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl Authenticator for TokenFile {
    fn authenticate(&self, credentials: Credentials<'_>) -> Result<Option<Arc<UserInfo>>, AuthError> {
        Ok(bearer_token(credentials.headers).and_then(|t| self.users.get(&digest(t)).cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_parses_quoted_groups_and_optional_columns() {
        let file =
            TokenFile::parse("# comment\nt1,alice,1001,\"dev,ops\"\nt2,bob,,\nt3,carol,c\n", "tokens.csv").unwrap();
        assert_eq!(file.len(), 3);
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer t1".parse().unwrap());
        let creds = Credentials { peer: &crate::auth::x509::PeerChain::default(), headers: &h };
        let alice = file.authenticate(creds).unwrap().unwrap();
        assert_eq!((alice.name.as_str(), alice.uid.as_deref()), ("alice", Some("1001")));
        assert_eq!(alice.groups, ["dev", "ops", "system:authenticated"]);
        h.insert(AUTHORIZATION, "Bearer nope".parse().unwrap());
        let creds = Credentials { peer: &crate::auth::x509::PeerChain::default(), headers: &h };
        assert_eq!(file.authenticate(creds).unwrap(), None);
    }

    #[test]
    fn malformed_token_line_names_its_line() {
        let err = TokenFile::parse("ok,user,1\nbroken\n", "tokens.csv").unwrap_err();
        assert_eq!(err.to_string(), "token file tokens.csv, line 2: expected token,user,uid[,groups], found 1 fields");
        let err = TokenFile::parse("t,\"u,1\n", "tokens.csv").unwrap_err();
        assert!(err.to_string().contains("line 1: unterminated quote"), "{err}");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_basic_is_ignored() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }
}
