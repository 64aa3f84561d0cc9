//! The call identifier a PBX chooses. It becomes a NATS subject token
//! (`<prefix>.packets.<call_id>`), so `.`, `*`, `>` and whitespace must never get through.

use std::fmt;

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;

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
