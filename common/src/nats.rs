//! Connecting to NATS, provisioning the JetStream streams, and acknowledged publishing.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        context::PublishError,
        stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
    },
};
use bytes::Bytes;

use crate::{
    config::StreamSettings,
    subjects::{StreamKind, Subjects},
};

/// How long a publish waits for JetStream's acknowledgement before the caller is told NATS
/// is unavailable (ingest then answers 503).
pub const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Unacknowledged publishes allowed at once. async-nats defaults to 5,000 and then fails
/// publishes; ingest may have more packets in flight under load, so we allow more and wait
/// (backpressure) rather than fail.
const MAX_ACKS_IN_FLIGHT: usize = 50_000;

/// Status events the status stream keeps per call.
pub const STATUS_EVENTS_PER_CALL: i64 = 64;

/// The header that carries a request id from ingest through JetStream to the workers.
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";

/// Connects to NATS. After the first connection the client reconnects forever in the
/// background; publishes made while it is away fail after [`PUBLISH_ACK_TIMEOUT`].
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    credentials(url)
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {}: is nats-server running with JetStream (-js)?",
                crate::db::redact(url)
            )
        })
}

/// The options carrying the credentials of `url`: `nats://user:password@host` or
/// `nats://token@host`. async-nats (0.51) parses them out of a URL but does not send them, so
/// they are handed over explicitly. URL-encoded characters (`%40` for `@`) are decoded.
fn credentials(url: &str) -> async_nats::ConnectOptions {
    let Ok(addr) = url.parse::<async_nats::ServerAddr>() else {
        return async_nats::ConnectOptions::new();
    };
    match (addr.username().map(decode), addr.password().map(decode)) {
        (Some(user), Some(password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        (Some(token), None) => async_nats::ConnectOptions::with_token(token),
        _ => async_nats::ConnectOptions::new(),
    }
}

/// Percent-decoding of a URL's user or password. Written by hand: it is eight lines, and the
/// crate that does it is not otherwise a dependency of ours.
fn decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JetStream context with our timeouts and in-flight limits.
pub fn jetstream(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(PUBLISH_ACK_TIMEOUT)
        .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client)
}

/// The configuration Switchboard wants for each stream.
fn stream_config(
    kind: StreamKind,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> stream::Config {
    let base = stream::Config {
        name: subjects.stream_name(kind),
        subjects: vec![subjects.stream_subjects(kind)],
        storage: StorageType::File,
        num_replicas: settings.replicas,
        discard: DiscardPolicy::Old,
        ..Default::default()
    };
    match kind {
        StreamKind::Packets => stream::Config {
            description: Some("Every accepted audio packet, by call".into()),
            max_age: settings.packets_max_age(),
            max_bytes: settings.packets_max_bytes,
            duplicate_window: Duration::from_secs(120),
            ..base
        },
        StreamKind::Work => stream::Config {
            description: Some("Completed calls waiting for the transcriber (work queue)".into()),
            retention: RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(600),
            ..base
        },
        StreamKind::Status => stream::Config {
            description: Some("Every call state change".into()),
            max_age: settings.status_retention(),
            // The latest events of each call (a call has a dozen at most, retries included),
            // so the stream answers "the state of every call" and "what changed since N".
            max_messages_per_subject: STATUS_EVENTS_PER_CALL,
            duplicate_window: Duration::from_secs(120),
            ..base
        },
        StreamKind::DeadLetters => stream::Config {
            description: Some("Calls the AI pipeline gave up on".into()),
            max_age: settings.dlq_max_age(),
            duplicate_window: Duration::from_secs(120),
            ..base
        },
    }
}

/// Creates every stream, or updates it to the configuration above so that a changed setting
/// takes effect on the next start. Safe to run from several processes at once.
pub async fn ensure_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> anyhow::Result<()> {
    provision(js, subjects, settings, true).await
}

/// Creates the streams that are missing (someone deleted them) and leaves the others as they
/// are: for the periodic repairs, which must not flip a stream's limits back and forth
/// between processes started with different settings (updates are for start-up).
pub async fn create_missing_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> anyhow::Result<()> {
    provision(js, subjects, settings, false).await
}

async fn provision(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
    update_existing: bool,
) -> anyhow::Result<()> {
    for kind in StreamKind::ALL {
        let config = stream_config(kind, subjects, settings);
        let name = config.name.clone();
        match js.get_stream(&name).await {
            Ok(_) if !update_existing => {}
            Ok(_) => {
                js.update_stream(config)
                    .await
                    .with_context(|| format!("updating stream {name}"))?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                        if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                match js.create_stream(config.clone()).await {
                    Ok(_) => {}
                    // Another process created it a moment ago.
                    Err(_) if js.get_stream(&name).await.is_ok() => {}
                    Err(e) => return Err(e).with_context(|| format!("creating stream {name}")),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("looking up stream {name}")),
        }
    }
    Ok(())
}

/// Publishes `payload` with `Nats-Msg-Id: msg_id` and waits for JetStream's acknowledgement.
/// A duplicate inside the stream's window is acknowledged without being stored again.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    payload: Bytes,
    request_id: Option<&str>,
) -> Result<(), PublishError> {
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    if let Some(id) = request_id {
        headers.insert(REQUEST_ID_HEADER, id);
    }
    let ack = js.publish_with_headers(subject, headers, payload).await?;
    ack.await.map(|_| ())
}

/// Whether the client is connected to a server right now.
pub fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}
