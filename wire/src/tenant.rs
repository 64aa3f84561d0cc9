//! Tenants and roles: who a request acts for and what it may do.
//!
//! A tenant owns its calls: its call ids are its own (two tenants may both stream `call-1`),
//! so everything that names a call inside Switchboard names it by [`CallKey`](crate::CallKey),
//! the tenant and the call id together. The tenant is a NATS subject token
//! (`<prefix>.calls.status.<tenant>.<call_id>`), so it is held to the same character rules as
//! a call id, lower case only (an operator types it in `nats sub`).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Longest tenant name accepted.
pub const MAX_TENANT_LEN: usize = 32;

/// The tenant every call belongs to when authentication is off (`SWITCHBOARD_AUTH=off`), and
/// the tenant of calls made before tenants existed.
pub const DEFAULT_TENANT: &str = "default";

/// A tenant name: 1..=32 characters of `[a-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTenant {
    #[error("tenant must not be empty")]
    Empty,
    #[error("tenant must be at most {MAX_TENANT_LEN} characters, got {0}")]
    TooLong(usize),
    #[error("tenant may contain only lower-case letters, digits, '_' and '-', found {0:?}")]
    BadCharacter(char),
}

impl TenantId {
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidTenant> {
        let raw = raw.into();
        if raw.is_empty() {
            return Err(InvalidTenant::Empty);
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            return Err(InvalidTenant::BadCharacter(bad));
        }
        if raw.len() > MAX_TENANT_LEN {
            return Err(InvalidTenant::TooLong(raw.len()));
        }
        Ok(Self(raw))
    }

    /// [`DEFAULT_TENANT`].
    pub fn default_tenant() -> Self {
        Self(DEFAULT_TENANT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::default_tenant()
    }
}

impl TryFrom<String> for TenantId {
    type Error = InvalidTenant;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(raw)
    }
}

impl FromStr for TenantId {
    type Err = InvalidTenant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<TenantId> for String {
    fn from(id: TenantId) -> Self {
        id.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an API key may do. Each role is a set of [`Permission`]s; `admin` has them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A phone system: streams packets and completes its calls.
    Pbx,
    /// A person watching: reads calls, the live view, re-drives failed calls.
    Supervisor,
    /// Everything above, and the metrics.
    Admin,
}

/// One thing a request may do; routes name the permission they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Stream packets and complete calls.
    Stream,
    /// Read calls, one or a page, and the live view.
    Read,
    /// Re-drive a failed call.
    Retry,
    /// Operational endpoints (`/metrics`).
    Operate,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Pbx, Role::Supervisor, Role::Admin];

    pub fn allows(self, permission: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::Pbx => permission == Permission::Stream,
            Role::Supervisor => matches!(permission, Permission::Read | Permission::Retry),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Pbx => "pbx",
            Role::Supervisor => "supervisor",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("role must be one of pbx, supervisor, admin, got {s:?}"))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_one_lower_case_subject_token() {
        assert!(TenantId::parse("acme-01_x").is_ok());
        assert_eq!(TenantId::parse(""), Err(InvalidTenant::Empty));
        assert_eq!(
            TenantId::parse("a".repeat(33)),
            Err(InvalidTenant::TooLong(33))
        );
        for bad in ["a.b", "a*", "a>", "a b", "Acme", "é"] {
            assert!(
                matches!(TenantId::parse(bad), Err(InvalidTenant::BadCharacter(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn each_role_has_exactly_its_permissions() {
        use Permission::*;
        let table = [
            (Role::Pbx, [true, false, false, false]),
            (Role::Supervisor, [false, true, true, false]),
            (Role::Admin, [true, true, true, true]),
        ];
        for (role, expected) in table {
            let got = [Stream, Read, Retry, Operate].map(|p| role.allows(p));
            assert_eq!(got, expected, "{role}");
        }
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
