//! The call identifier a PBX chooses, and the key that names a call inside Switchboard.
//!
//! A [`CallId`] is the tenant's own name for a call; it becomes a NATS subject token
//! (`<prefix>.packets.<tenant>.<call_id>`), so `.`, `*`, `>` and whitespace must never get
//! through. A [`CallKey`] is the tenant and the call id together, written `<tenant>.<call_id>`:
//! the primary key of `calls` (and of every table keyed by call), the last two tokens of every
//! call subject, and the start of every `Nats-Msg-Id`. Neither part may contain a `.`, so the
//! written form splits back unambiguously.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::tenant::TenantId;

/// Longest call id accepted, in bytes (all accepted characters are ASCII).
pub const MAX_CALL_ID_LEN: usize = 128;

/// A call id that is 1..=128 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CallId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCallId {
    #[error("call_id must not be empty")]
    Empty,
    #[error("call_id must be at most {MAX_CALL_ID_LEN} characters, got {0}")]
    TooLong(usize),
    #[error("call_id may contain only letters, digits, '_' and '-', found {0:?}")]
    BadCharacter(char),
}

impl CallId {
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidCallId> {
        let raw = raw.into();
        if raw.is_empty() {
            return Err(InvalidCallId::Empty);
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(InvalidCallId::BadCharacter(bad));
        }
        if raw.len() > MAX_CALL_ID_LEN {
            return Err(InvalidCallId::TooLong(raw.len()));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CallId {
    type Error = InvalidCallId;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(raw)
    }
}

impl From<CallId> for String {
    fn from(id: CallId) -> Self {
        id.0
    }
}

impl AsRef<str> for CallId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A call as Switchboard knows it: its tenant and its id. Written `<tenant>.<call_id>`.
/// Compared, ordered and hashed by the written form alone (the parts follow from it): one
/// string to hash on the packet path, not three.
#[derive(Debug, Clone)]
pub struct CallKey {
    /// `<tenant>.<call_id>`, kept written so that binding it to SQL or a subject is free.
    key: String,
    tenant: TenantId,
    call_id: CallId,
}

impl PartialEq for CallKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for CallKey {}

impl std::hash::Hash for CallKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl PartialOrd for CallKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CallKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

/// A stored key that is not `<tenant>.<call_id>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a call key (<tenant>.<call_id>)")]
pub struct InvalidCallKey(pub String);

impl CallKey {
    pub fn new(tenant: TenantId, call_id: CallId) -> Self {
        Self {
            key: format!("{tenant}.{call_id}"),
            tenant,
            call_id,
        }
    }

    /// The written form, `<tenant>.<call_id>`.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn call_id(&self) -> &CallId {
        &self.call_id
    }
}

impl FromStr for CallKey {
    type Err = InvalidCallKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidCallKey(s.to_owned());
        let (tenant, call_id) = s.split_once('.').ok_or_else(invalid)?;
        Ok(Self::new(
            TenantId::parse(tenant).map_err(|_| invalid())?,
            CallId::parse(call_id).map_err(|_| invalid())?,
        ))
    }
}

impl TryFrom<String> for CallKey {
    type Error = InvalidCallKey;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        raw.parse()
    }
}

impl AsRef<str> for CallKey {
    fn as_ref(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_written_tenant_dot_call_and_splits_back() {
        let key = CallKey::new(
            TenantId::parse("acme").unwrap(),
            CallId::parse("call-1").unwrap(),
        );
        assert_eq!(key.as_str(), "acme.call-1");
        assert_eq!(key.as_str().parse::<CallKey>(), Ok(key.clone()));
        assert_eq!(key.tenant().as_str(), "acme");
        assert_eq!(key.call_id().as_str(), "call-1");
        for bad in ["call-1", "acme.", ".call-1", "acme.a.b", "Acme.c"] {
            assert!(bad.parse::<CallKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn accepts_letters_digits_underscore_and_dash() {
        assert!(CallId::parse("Call_42-a").is_ok());
        assert!(CallId::parse("x".repeat(128)).is_ok());
    }

    #[test]
    fn refuses_anything_that_could_break_a_subject() {
        assert_eq!(CallId::parse(""), Err(InvalidCallId::Empty));
        assert_eq!(
            CallId::parse("x".repeat(129)),
            Err(InvalidCallId::TooLong(129))
        );
        for bad in ["a.b", "a*", "a>", "a b", "é", "a/b"] {
            assert!(
                matches!(CallId::parse(bad), Err(InvalidCallId::BadCharacter(_))),
                "{bad}"
            );
        }
    }
}
