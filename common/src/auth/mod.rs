//! Who a request acts for: API keys, the short-lived tokens minted from them, and the
//! per-process cache that checks them. The one owner of the `tenants` and `api_keys` tables.
//!
//! A key is 256 random bits, shown once when it is made and stored only as its SHA-256 hash.
//! A fast hash is the right one here, unlike for passwords: a slow hash (argon2, bcrypt)
//! protects low-entropy secrets against guessing, but nobody can enumerate 2^256 keys however
//! fast each guess is, and a fast hash lets every request be checked in microseconds.
//!
//! Tokens are keys too (rows of `api_keys` with `parent_id` and `expires_at`): the browser
//! exchanges a supervisor key for one and keeps nothing long-lived. Revoking a key ends its
//! tokens. Every process checks a credential against Postgres at most once per
//! [`RECHECK_AFTER`] and keeps the answer in memory, so a revoked key stops working within
//! that time on every replica, and a packet costs a hash and a map lookup.
//!
//! - [`settings`]: `SWITCHBOARD_AUTH` and the token lifetime.
//! - [`http`]: the `Authorization` header and the 401/403 answers.

pub mod http;
pub mod settings;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    digest,
    rand::{SecureRandom, SystemRandom},
};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{CallId, CallKey, Permission, Role, TenantId};

/// How long a checked credential is trusted before Postgres is asked again: the longest a
/// revoked key keeps working on a replica (the issue allows five seconds).
pub const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// Credentials remembered per process at most (valid and invalid alike); past that the
/// memory is cleared and refilled, so a flood of made-up keys cannot grow it.
const MAX_REMEMBERED: usize = 100_000;

/// What every key's secret starts with (`sbk_`) and every token's (`sbt_`): a leaked one is
/// recognisable by secret scanners and in a support ticket.
const KEY_PREFIX: &str = "sbk_";
const TOKEN_PREFIX: &str = "sbt_";

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key (or token) presented.
    pub key_id: i64,
    /// The key at the root: the token's parent, or the key itself.
    pub root_key_id: i64,
    pub tenant: TenantId,
    pub role: Role,
    /// Set for tokens.
    pub expires_at: Option<OffsetDateTime>,
}

impl Principal {
    /// Everything, for tenant `default`: what every request is when `SWITCHBOARD_AUTH=off`.
    pub fn unauthenticated() -> Self {
        Self {
            key_id: 0,
            root_key_id: 0,
            tenant: TenantId::default_tenant(),
            role: Role::Admin,
            expires_at: None,
        }
    }

    pub fn allows(&self, permission: Permission) -> bool {
        self.role.allows(permission)
    }

    /// The tenant's call `call_id`: a tenant can only ever name its own calls.
    pub fn call(&self, call_id: CallId) -> CallKey {
        CallKey::new(self.tenant.clone(), call_id)
    }
}

/// Why a credential was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown, revoked, or an expired token (401). One answer for all: a caller learns
    /// nothing about which keys exist.
    #[error("the key is not valid (unknown, revoked or expired)")]
    Invalid,
    /// Postgres could not be asked (503).
    #[error("keys cannot be checked right now: {0}")]
    Unavailable(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
struct Remembered {
    /// Shared: a packet's check copies a pointer, not the principal.
    principal: Option<Arc<Principal>>,
    checked_at: Instant,
}

/// Checks credentials, remembering each answer for [`RECHECK_AFTER`]. Cheap to clone.
#[derive(Clone)]
pub struct Keys {
    pool: PgPool,
    remembered: Arc<RwLock<HashMap<[u8; 32], Remembered>>>,
}

impl Keys {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            remembered: Arc::default(),
        }
    }

    /// The principal a secret (key or token) stands for.
    pub async fn authenticate(&self, secret: &str) -> Result<Arc<Principal>, AuthError> {
        let hash = hash(secret);
        let known = self
            .remembered
            .read()
            .expect("not poisoned")
            .get(&hash)
            .filter(|r| r.checked_at.elapsed() < RECHECK_AFTER)
            .cloned();
        let principal = match known {
            Some(remembered) => remembered.principal,
            None => {
                let principal = lookup(&self.pool, &hash).await?.map(Arc::new);
                let mut remembered = self.remembered.write().expect("not poisoned");
                if remembered.len() >= MAX_REMEMBERED {
                    remembered.clear();
                }
                remembered.insert(
                    hash,
                    Remembered {
                        principal: principal.clone(),
                        checked_at: Instant::now(),
                    },
                );
                principal
            }
        };
        match principal {
            Some(p) if p.expires_at.is_none_or(|at| at > OffsetDateTime::now_utc()) => Ok(p),
            _ => Err(AuthError::Invalid),
        }
    }

    /// A token standing for `principal`'s key (its role and tenant), valid for `ttl`. A token
    /// presented here mints one for the same key: a page refreshes its token without the key.
    pub async fn mint_token(
        &self,
        principal: &Principal,
        ttl: Duration,
    ) -> Result<Token, sqlx::Error> {
        let secret = generate(TOKEN_PREFIX);
        let expires_at: OffsetDateTime = sqlx::query_scalar(concat!(
            "INSERT INTO api_keys (tenant, role, hash, hint, parent_id, expires_at) ",
            "VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) RETURNING expires_at"
        ))
        .bind(principal.tenant.as_str())
        .bind(principal.role.as_str())
        .bind(hash(&secret).as_slice())
        .bind(hint(&secret))
        .bind(principal.root_key_id)
        .bind(ttl.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        // Expired tokens are of no use to anyone: each mint clears a few.
        sqlx::query(concat!(
            "DELETE FROM api_keys WHERE id IN (SELECT id FROM api_keys ",
            "WHERE expires_at < now() - interval '1 hour' LIMIT 100)"
        ))
        .execute(&self.pool)
        .await?;
        Ok(Token {
            secret,
            expires_at,
            tenant: principal.tenant.clone(),
            role: principal.role,
        })
    }
}

/// A freshly minted token: the answer to `POST /v1/auth/token`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Token {
    #[serde(rename = "token")]
    pub secret: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub tenant: TenantId,
    pub role: Role,
}

/// A valid credential's row, as [`lookup`] reads it.
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: i64,
    parent_id: Option<i64>,
    tenant: String,
    role: String,
    expires_at: Option<OffsetDateTime>,
}

async fn lookup(pool: &PgPool, hash: &[u8; 32]) -> Result<Option<Principal>, sqlx::Error> {
    let row: Option<KeyRow> = sqlx::query_as(concat!(
        "SELECT k.id, k.parent_id, k.tenant, k.role, k.expires_at ",
        "FROM api_keys k LEFT JOIN api_keys p ON p.id = k.parent_id ",
        "WHERE k.hash = $1 AND k.revoked_at IS NULL AND p.revoked_at IS NULL"
    ))
    .bind(hash.as_slice())
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let decode = |e: String| sqlx::Error::Decode(e.into());
    Ok(Some(Principal {
        key_id: row.id,
        root_key_id: row.parent_id.unwrap_or(row.id),
        tenant: TenantId::parse(row.tenant).map_err(|e| decode(e.to_string()))?,
        role: row.role.parse().map_err(decode)?,
        expires_at: row.expires_at,
    }))
}

/// A key as `ingest keys list` shows it (never its secret: only its first characters).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: i64,
    pub tenant: String,
    pub role: String,
    pub hint: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// Makes a key for `tenant` (created if new) with `role`; returns its id and its secret, which
/// exists nowhere else from now on.
pub async fn create_key(
    pool: &PgPool,
    tenant: &TenantId,
    role: Role,
) -> Result<(i64, String), sqlx::Error> {
    let secret = generate(KEY_PREFIX);
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO tenants (tenant) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(tenant.as_str())
        .execute(&mut *tx)
        .await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO api_keys (tenant, role, hash, hint) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(tenant.as_str())
    .bind(role.as_str())
    .bind(hash(&secret).as_slice())
    .bind(hint(&secret))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((id, secret))
}

/// Every key (not the tokens minted from them), oldest first.
pub async fn list_keys(pool: &PgPool) -> Result<Vec<KeyInfo>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, tenant, role, hint, created_at, revoked_at FROM api_keys \
         WHERE parent_id IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Revokes key `id` (and so every token minted from it). `false` if there is no such key;
/// revoking twice keeps the first time.
pub async fn revoke_key(pool: &PgPool, id: i64) -> Result<bool, sqlx::Error> {
    let found: Option<i64> = sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) \
         WHERE id = $1 AND parent_id IS NULL RETURNING id",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(found.is_some())
}

/// `prefix` + 256 random bits, base64url: URL- and header-safe, 47 characters.
fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source works");
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn hash(secret: &str) -> [u8; 32] {
    let digest = digest::digest(&digest::SHA256, secret.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The prefix and the first four characters of the random part: enough to tell keys apart in
/// a list, far too little to guess the rest (232 bits remain).
fn hint(secret: &str) -> String {
    secret.chars().take(KEY_PREFIX.len() + 4).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_url_safe() {
        let a = generate(KEY_PREFIX);
        let b = generate(KEY_PREFIX);
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_PREFIX.len() + 43);
        assert!(a.starts_with("sbk_"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
        assert_eq!(hint(&a), a[..8]);
        assert_ne!(hash(&a), hash(&b));
    }
}
