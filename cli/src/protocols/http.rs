//! The JSON API as a PBX uses it: one `POST /v1/call/stream/{id}` a packet (retrying 503s and
//! 429s as told), then `POST /v1/call/{id}/complete` declaring the call's total. The only
//! protocol with a receipt for every packet, so the only one whose acceptances are counted
//! here rather than inferred.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use indicatif::ProgressBar;
use wire::{api::PacketStatus, audio::AudioFormat};

use crate::api::Ingest;

/// One packet as sent.
pub struct Packet {
    pub sequence: i64,
    /// Words (text) or base64 audio.
    pub data: String,
    /// Sent a second time straight after.
    pub twice: bool,
}

/// What ingest answered for one call.
#[derive(Debug, Default)]
pub struct Receipts {
    /// Sequences ingest accepted (stored for the first time).
    pub accepted: BTreeSet<i64>,
    pub duplicates_reported: u64,
    pub sent: u64,
    pub latencies: Vec<Duration>,
    /// When the call was completed.
    pub completed_at: Option<Instant>,
}

/// Sends `packets` in order, one every `period` (as fast as possible without one), then
/// completes the call with `total_packets`.
pub async fn stream_call(
    ingest: &Ingest,
    call_id: &str,
    packets: &[Packet],
    format: AudioFormat,
    period: Option<Duration>,
    total_packets: i64,
    bar: &ProgressBar,
) -> anyhow::Result<Receipts> {
    let mut receipts = Receipts::default();
    let start = tokio::time::Instant::now();
    for (i, packet) in packets.iter().enumerate() {
        if let Some(period) = period {
            tokio::time::sleep_until(start + period * i as u32).await;
        }
        let (sequence, data) = (packet.sequence, packet.data.as_str());
        let timestamp = sequence as f64 * 0.02;
        for _ in 0..(1 + packet.twice as usize) {
            let (outcome, latency) = ingest
                .packet(call_id, sequence, data, timestamp, format)
                .await?;
            receipts.sent += 1;
            receipts.latencies.push(latency);
            match outcome {
                PacketStatus::Accepted => {
                    receipts.accepted.insert(sequence);
                }
                PacketStatus::Duplicate => receipts.duplicates_reported += 1,
            }
            bar.inc(1);
        }
    }
    ingest.complete(call_id, total_packets).await?;
    receipts.completed_at = Some(Instant::now());
    Ok(receipts)
}
