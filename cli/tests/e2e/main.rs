//! End to end: ingest, transcriber and notifier as separate OS processes (the real binaries)
//! against real Postgres and NATS, driven by `pbx` as an operator would.
//!
//! - `pipeline`: the main job under loss, duplicates and reordering; two replicas of every
//!   service; `pbx watch` across a restart; `pbx bench` and `bench-live`.
//! - `telephony`: each PBX protocol (JSON API with audio, Twilio, AudioSocket, L16) through the
//!   three services to `ARCHIVED`, with a speech-to-text server that checks every WAV it is
//!   sent is exactly the audio the PBX sent.

mod pipeline;
mod support;
mod telephony;
