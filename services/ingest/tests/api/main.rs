//! Ingest's integration tests: the real service against real Postgres and real NATS
//! JetStream, each test with its own database and subject prefix. One test binary, so the
//! suite links once.

mod auth;
mod bad_input;
mod completion;
mod concurrency;
mod hardening;
mod helpers;
mod lifecycle;
mod media;
mod operations;
mod outages;
mod packets;
mod schemathesis;
