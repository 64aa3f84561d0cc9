//! The transcriber against real Postgres and real NATS JetStream, fed by a real ingest: each
//! test has its own database and subject prefix, and fast AI latencies.

mod failures;
mod helpers;
mod openai;
mod operations;
mod success;
mod workers;
