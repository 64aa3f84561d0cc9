//! Every NATS subject and stream name Switchboard uses, derived from `SWITCHBOARD_PREFIX`.
//! Nothing else in the code base spells a subject out.
//!
//! | subject                                         | stream             | what                          |
//! |-------------------------------------------------|--------------------|-------------------------------|
//! | `<prefix>.packets.<tenant>.<call_id>`           | `<PREFIX>_PACKETS` | every accepted packet         |
//! | `<prefix>.calls.completed.<tenant>.<call_id>`   | `<PREFIX>_WORK`    | transcription work items      |
//! | `<prefix>.calls.status.<tenant>.<call_id>`      | `<PREFIX>_STATUS`  | every call state change       |
//! | `<prefix>.dlq.transcribe.<tenant>.<call_id>`    | `<PREFIX>_DLQ`     | calls the AI gave up on       |
//! | `<prefix>.calls.progress.<tenant>.<call_id>`    | (none: core NATS)  | packet counts while streaming |
//!
//! The tenant is a token of its own, so one tenant's traffic is one wildcard away:
//! `nats sub 'pbx.calls.status.acme.*'`.

use std::{fmt, str::FromStr};

use crate::{CallKey, TenantId};

/// A validated subject prefix: one subject token, so it can also prefix stream names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 32 {
            return Err("the prefix must be 1 to 32 characters".into());
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "the prefix {s:?} may contain only letters, digits, '_' and '-' \
                 (it is a NATS subject token and part of stream names)"
            ));
        }
        Ok(Prefix(s.to_owned()))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Prefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The streams Switchboard provisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Packets,
    Work,
    Status,
    DeadLetters,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Packets,
        StreamKind::Work,
        StreamKind::Status,
        StreamKind::DeadLetters,
    ];

    fn suffix(self) -> &'static str {
        match self {
            StreamKind::Packets => "PACKETS",
            StreamKind::Work => "WORK",
            StreamKind::Status => "STATUS",
            StreamKind::DeadLetters => "DLQ",
        }
    }
}

/// Builds subjects and stream names for one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: Prefix,
}

impl Subjects {
    pub fn new(prefix: Prefix) -> Self {
        Self { prefix }
    }

    /// `PBX_PACKETS` for prefix `pbx`.
    pub fn stream_name(&self, kind: StreamKind) -> String {
        format!(
            "{}_{}",
            self.prefix.as_str().to_ascii_uppercase(),
            kind.suffix()
        )
    }

    /// The subjects a stream captures.
    pub fn stream_subjects(&self, kind: StreamKind) -> String {
        match kind {
            StreamKind::Packets => format!("{}.packets.*.*", self.prefix),
            StreamKind::Work => format!("{}.calls.completed.*.*", self.prefix),
            StreamKind::Status => self.all_status(),
            StreamKind::DeadLetters => format!("{}.dlq.>", self.prefix),
        }
    }

    pub fn packets(&self, call: &CallKey) -> String {
        format!("{}.packets.{call}", self.prefix)
    }

    pub fn call_completed(&self, call: &CallKey) -> String {
        format!("{}.calls.completed.{call}", self.prefix)
    }

    pub fn call_status(&self, call: &CallKey) -> String {
        format!("{}.calls.status.{call}", self.prefix)
    }

    pub fn all_status(&self) -> String {
        format!("{}.calls.status.*.*", self.prefix)
    }

    /// One tenant's status events (what an operator passes to `nats sub`).
    pub fn tenant_status(&self, tenant: &TenantId) -> String {
        format!("{}.calls.status.{tenant}.*", self.prefix)
    }

    /// Packet counts of a call while it streams: plain NATS, not kept in any stream (each
    /// one supersedes the last, and the next status event carries the counts durably).
    pub fn call_progress(&self, call: &CallKey) -> String {
        format!("{}.calls.progress.{call}", self.prefix)
    }

    pub fn all_progress(&self) -> String {
        format!("{}.calls.progress.*.*", self.prefix)
    }

    pub fn dlq_transcribe(&self, call: &CallKey) -> String {
        format!("{}.dlq.transcribe.{call}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix() {
        let s = Subjects::new("pbx".parse().unwrap());
        let id: CallKey = "acme.c1".parse().unwrap();
        assert_eq!(s.packets(&id), "pbx.packets.acme.c1");
        assert_eq!(s.call_completed(&id), "pbx.calls.completed.acme.c1");
        assert_eq!(s.call_status(&id), "pbx.calls.status.acme.c1");
        assert_eq!(s.call_progress(&id), "pbx.calls.progress.acme.c1");
        assert_eq!(s.dlq_transcribe(&id), "pbx.dlq.transcribe.acme.c1");
        assert_eq!(s.tenant_status(id.tenant()), "pbx.calls.status.acme.*");
        assert_eq!(s.all_status(), "pbx.calls.status.*.*");
        assert_eq!(s.stream_name(StreamKind::Packets), "PBX_PACKETS");
        let t = Subjects::new("t-ab12".parse().unwrap());
        assert_eq!(t.stream_name(StreamKind::Work), "T-AB12_WORK");
    }

    #[test]
    fn a_prefix_must_be_one_subject_token() {
        for bad in ["", "a.b", "a*", "a>", "a b"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad:?}");
        }
    }
}
