//! The load a scenario runs under: calls streamed as a PBX streams them (one packet after the
//! other per call, paced at 20 ms frames, every call at once), retried as the README tells a
//! PBX to (on `503` after `Retry-After`, on a lost connection at once), then completed with
//! their total. Every answer is recorded: the books are checked against what was acknowledged.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::task::JoinHandle;
use wire::api::{PacketReceipt, PacketStatus};

/// Bytes per packet: 20 ms of 8 kHz 8-bit audio, as a PBX sends.
pub const PACKET_BYTES: usize = 160;
/// A request with no answer by then counts as a hang (ingest's deadline is 5 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A packet still not acknowledged after this long is an error.
const GIVE_UP_AFTER: Duration = Duration::from_secs(240);

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub id_prefix: String,
    pub calls: u32,
    pub packets: u32,
    /// Packets per second per call; 0 sends each packet as soon as the last is answered.
    pub rate: u32,
    /// How packets are sent.
    pub mode: Mode,
    /// The first call's number (numbers are unique across a scenario's loads: the fake AI
    /// tells calls apart by them).
    pub first_number: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One packet after the other per call, each retried until acknowledged (a PBX).
    Paced,
    /// Every packet sent when it is due, with up to this many of the call's packets awaiting
    /// their answers (a PBX streaming in real time with a small window; a packet waits for a
    /// free place), once, with no retry: offered load that does not slow down with ingest.
    Window(usize),
}

impl LoadPlan {
    pub fn call_id(&self, number: u32) -> String {
        format!("{}-{number}", self.id_prefix)
    }
}

/// The packet's bytes: the call's number and the sequence first (the fake AI reads the call
/// from them), then a pattern.
pub fn packet_data(call: u32, sequence: u32) -> String {
    let mut bytes = Vec::with_capacity(PACKET_BYTES);
    bytes.extend_from_slice(&call.to_le_bytes());
    bytes.extend_from_slice(&sequence.to_le_bytes());
    bytes.extend((8..PACKET_BYTES).map(|i| (sequence as usize + i) as u8));
    STANDARD.encode(bytes)
}

/// What one call saw.
#[derive(Debug, Default)]
pub struct CallRecord {
    pub call_id: String,
    pub number: u32,
    /// Acknowledged sequences with when their 202 came (since the load began).
    pub acked: Vec<(i64, Duration)>,
    pub completed: bool,
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Answers {
    pub accepted: u64,
    pub duplicate: u64,
    /// Answered `duplicate` after an earlier try of the same packet got no answer or a 503:
    /// stored by a request whose answer was lost.
    pub retried_duplicates: u64,
    pub answers_503: u64,
    pub without_retry_after: u64,
    pub slowest_503: Duration,
    pub connection_errors: u64,
    pub timeouts: u64,
    /// Any other answer, by status and error code: a broken promise.
    pub other: BTreeMap<String, u64>,
    /// Latency of the 202s, in microseconds.
    pub latency: Option<Histogram<u64>>,
}

impl Answers {
    fn record_latency(&mut self, elapsed: Duration) {
        let h = self
            .latency
            .get_or_insert_with(|| Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds"));
        h.saturating_record(elapsed.as_micros() as u64);
    }

    pub fn p99_ms(&self) -> f64 {
        self.latency
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0)
    }

    pub fn max_ms(&self) -> f64 {
        self.latency
            .as_ref()
            .map_or(0.0, |h| h.max() as f64 / 1000.0)
    }
}

#[derive(Debug)]
pub struct LoadReport {
    pub plan: LoadPlan,
    pub calls: Vec<CallRecord>,
    pub answers: Answers,
}

impl LoadReport {
    pub fn errors(&self) -> Vec<String> {
        self.calls.iter().flat_map(|c| c.errors.clone()).collect()
    }

    /// The first 202 at or after `since` (relative to the load's start).
    pub fn first_ack_after(&self, since: Duration) -> Option<Duration> {
        self.calls
            .iter()
            .flat_map(|c| c.acked.iter().map(|(_, at)| *at))
            .filter(|at| *at >= since)
            .min()
    }
}

pub struct Load {
    /// Packets acknowledged so far, while the load runs.
    acked: Arc<AtomicU64>,
    pub started: Instant,
    handle: JoinHandle<LoadReport>,
}

impl Load {
    /// Runs `plan` against ingest at `ingest_url`, sending `api_key` with every request.
    pub fn start(ingest_url: String, api_key: &str, plan: LoadPlan) -> Self {
        let acked = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {api_key}")
                .parse()
                .expect("a key is a valid header"),
        );
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(1024)
            .build()
            .expect("an HTTP client");
        let answers = Arc::new(Mutex::new(Answers::default()));
        let c = acked.clone();
        let handle = tokio::spawn(async move {
            let numbers = plan.first_number..plan.first_number + plan.calls;
            let calls = numbers.map(|number| {
                let sender = Sender {
                    client: client.clone(),
                    base: ingest_url.clone(),
                    acked: c.clone(),
                    answers: answers.clone(),
                    started,
                };
                let plan = plan.clone();
                tokio::spawn(async move { sender.call(&plan, number).await })
            });
            let calls: Vec<_> = futures::future::join_all(calls)
                .await
                .into_iter()
                .map(|r| r.expect("a call task does not panic"))
                .collect();
            let answers = std::mem::take(&mut *answers.lock().expect("not poisoned"));
            LoadReport {
                plan,
                calls,
                answers,
            }
        });
        Self {
            acked,
            started,
            handle,
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` packets are acknowledged (or the load ends).
    pub async fn until_acked(&self, n: u64) {
        while self.acked() < n && !self.handle.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn finish(self) -> LoadReport {
        self.handle.await.expect("the load does not panic")
    }
}

#[derive(Clone)]
struct Sender {
    client: reqwest::Client,
    base: String,
    acked: Arc<AtomicU64>,
    answers: Arc<Mutex<Answers>>,
    started: Instant,
}

enum Outcome {
    Answered(reqwest::StatusCode, String),
    NoAnswer,
}

impl Sender {
    async fn call(&self, plan: &LoadPlan, number: u32) -> CallRecord {
        let call_id = plan.call_id(number);
        let mut record = CallRecord {
            call_id: call_id.clone(),
            number,
            ..Default::default()
        };
        let url = format!("{}/v1/call/stream/{call_id}", self.base);
        let begun = Instant::now();
        let mut open = Vec::new();
        let window = match plan.mode {
            Mode::Window(k) => Some(Arc::new(tokio::sync::Semaphore::new(k))),
            Mode::Paced => None,
        };
        for sequence in 0..plan.packets {
            if plan.rate > 0 {
                let due = begun + Duration::from_secs_f64(sequence as f64 / plan.rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let body = json!({
                "sequence": sequence,
                "data": packet_data(number, sequence),
                "timestamp": time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9,
                // Declared as 16-bit PCM, so the transcriber passes the bytes through unchanged.
                "encoding": "slin",
                "sample_rate": 8000,
            });
            if let Some(window) = &window {
                let place = window.clone().acquire_owned().await.expect("never closed");
                let (sender, url) = (self.clone(), url.clone());
                open.push(tokio::spawn(async move {
                    let result = sender.packet_once(&url, &body).await;
                    drop(place);
                    (sequence, result)
                }));
                continue;
            }
            let result = self.packet(&url, &body).await;
            self.note(&mut record, sequence, result);
        }
        for task in open {
            let (sequence, result) = task.await.expect("a packet task does not panic");
            if let Ok(acked) = result {
                record.acked.push((i64::from(sequence), acked));
                self.acked.fetch_add(1, Ordering::SeqCst);
            }
        }
        let url = format!("{}/v1/call/{call_id}/complete", self.base);
        let body = json!({ "total_packets": plan.packets });
        match self.request(&url, &body, 200).await {
            Ok(_) => {
                record.completed = true;
            }
            Err(e) => record.errors.push(format!("{call_id} complete: {e}")),
        }
        record
    }

    fn note(&self, record: &mut CallRecord, sequence: u32, result: Result<(), String>) {
        match result {
            Ok(()) => {
                record
                    .acked
                    .push((i64::from(sequence), self.started.elapsed()));
                self.acked.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => record
                .errors
                .push(format!("{} packet {sequence}: {e}", record.call_id)),
        }
    }

    /// One try, as an open-loop load sends: when it was acknowledged, or nothing (a 503 or no
    /// answer is counted, another answer recorded as an error).
    async fn packet_once(&self, url: &str, body: &serde_json::Value) -> Result<Duration, ()> {
        let started = Instant::now();
        match self.client.post(url).json(body).send().await {
            Ok(response) if response.status() == 202 => {
                response.bytes().await.ok();
                let mut answers = self.answers.lock().expect("not poisoned");
                answers.record_latency(started.elapsed());
                answers.accepted += 1;
                Ok(self.started.elapsed())
            }
            Ok(response) if response.status() == 503 => {
                let with_retry_after = response.headers().contains_key("retry-after");
                response.bytes().await.ok();
                self.record_503(started.elapsed(), with_retry_after);
                Err(())
            }
            Ok(response) => {
                let key = response.status().as_u16().to_string();
                *self
                    .answers
                    .lock()
                    .expect("not poisoned")
                    .other
                    .entry(key)
                    .or_default() += 1;
                Err(())
            }
            Err(e) => {
                self.record_no_answer(e.is_timeout());
                Err(())
            }
        }
    }

    async fn packet(&self, url: &str, body: &serde_json::Value) -> Result<(), String> {
        let (text, retried, elapsed) = self.request(url, body, 202).await?;
        let receipt: PacketReceipt =
            serde_json::from_str(&text).map_err(|e| format!("202 with an unreadable body: {e}"))?;
        let mut answers = self.answers.lock().expect("not poisoned");
        answers.record_latency(elapsed);
        match receipt.status {
            PacketStatus::Accepted => answers.accepted += 1,
            PacketStatus::Duplicate => {
                answers.duplicate += 1;
                if retried {
                    answers.retried_duplicates += 1;
                }
            }
        }
        Ok(())
    }

    /// Sends until the answer is `expected` (its body, whether it took more than one try, and
    /// how long the last try took), retrying 503s and lost connections.
    async fn request(
        &self,
        url: &str,
        body: &serde_json::Value,
        expected: u16,
    ) -> Result<(String, bool, Duration), String> {
        let first = Instant::now();
        let mut retried = false;
        loop {
            let started = Instant::now();
            let outcome = match self.client.post(url).json(body).send().await {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    let text = response.text().await.unwrap_or_default();
                    if status == 503 {
                        self.record_503(started.elapsed(), retry_after.is_some());
                        let wait = Duration::from_secs(retry_after.unwrap_or(1).min(2));
                        tokio::time::sleep(wait).await;
                        Outcome::NoAnswer
                    } else {
                        Outcome::Answered(status, text)
                    }
                }
                Err(e) => {
                    self.record_no_answer(e.is_timeout());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Outcome::NoAnswer
                }
            };
            match outcome {
                Outcome::Answered(status, text) if status.as_u16() == expected => {
                    return Ok((text, retried, started.elapsed()));
                }
                Outcome::Answered(status, text) => {
                    let code = serde_json::from_str::<wire::api::ErrorBody>(&text)
                        .map(|b| b.error.code)
                        .unwrap_or_default();
                    let key = format!("{} {code}", status.as_u16());
                    *self
                        .answers
                        .lock()
                        .expect("not poisoned")
                        .other
                        .entry(key.clone())
                        .or_default() += 1;
                    return Err(format!("answered {key}: {text}"));
                }
                Outcome::NoAnswer => retried = true,
            }
            if first.elapsed() > GIVE_UP_AFTER {
                return Err(format!("no answer {expected} after {GIVE_UP_AFTER:?}"));
            }
        }
    }

    fn record_503(&self, elapsed: Duration, with_retry_after: bool) {
        let mut answers = self.answers.lock().expect("not poisoned");
        answers.answers_503 += 1;
        answers.slowest_503 = answers.slowest_503.max(elapsed);
        if !with_retry_after {
            answers.without_retry_after += 1;
        }
    }

    fn record_no_answer(&self, timeout: bool) {
        let mut answers = self.answers.lock().expect("not poisoned");
        if timeout {
            answers.timeouts += 1;
        } else {
            answers.connection_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_packet_carries_its_call_and_sequence_first() {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(super::packet_data(7, 300))
            .unwrap();
        assert_eq!(bytes.len(), super::PACKET_BYTES);
        assert_eq!(&bytes[..4], &7u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &300u32.to_le_bytes());
    }
}
