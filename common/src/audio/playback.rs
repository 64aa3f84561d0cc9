//! A call's WAV file streamed from Postgres (`GET /v1/call/{id}/audio.wav`): sized first, then
//! decoded packet by packet into chunks, so a long call is never held in memory. Both steps
//! read one snapshot (a `REPEATABLE READ` transaction), so packets arriving meanwhile, or a
//! compaction committing, cannot make the file disagree with its header.
//!
//! A packet-rows call is read row by row from the packets' primary key. A compacted call's
//! record is read in slices of its compressed audio ([`SLICE_BYTES`], `substring` of a value
//! stored uncompressed out of line, which Postgres reads chunk by chunk) and decompressed as a
//! stream on a blocking thread: only its packet lengths (4 bytes a packet) are held whole.

use bytes::Bytes;
use futures::TryStreamExt;
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::wav::{Layout, Renderer, WavError};
use crate::calls::packets::format_from_columns;

/// Bytes of a compacted call's compressed audio read at a time.
const SLICE_BYTES: i32 = 256 * 1024;

/// Bytes gathered before a chunk is handed to the client.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks buffered between the reader and the client at most: a slow client slows the
/// reader, it does not fill memory.
const CHUNKS_IN_FLIGHT: usize = 4;

/// How long a client may take no chunk before the download is abandoned: it holds a Postgres
/// connection (and a snapshot) while it lasts.
const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The longest one download may last, however steadily the client reads: an hour-long call
/// is 57.6 MB at 8 kHz, which takes this long only below 70 KB/s.
pub const DOWNLOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Why a call's audio cannot be played.
#[derive(Debug, thiserror::Error)]
pub enum PlaybackError {
    #[error("no such call")]
    NotFound,
    /// Compacted, and the record is gone (`AUDIO_RETENTION_DAYS`).
    #[error("the call's audio has expired")]
    Expired,
    #[error(transparent)]
    Wav(#[from] WavError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A WAV file on its way: its layout (so its length is known), then its bytes after the
/// header, in chunks. A chunk that is an error ends the file short.
#[derive(Debug)]
pub struct Playback {
    pub layout: Layout,
    pub chunks: mpsc::Receiver<Result<Bytes, PlaybackError>>,
}

/// Opens the audio of `call_id` (a call key) for playback, at most `limit` bytes of WAV.
pub async fn open(pool: &PgPool, call_id: &str, limit: u64) -> Result<Playback, PlaybackError> {
    let (ready, layout) = oneshot::channel();
    let (sender, chunks) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let pool = pool.clone();
    let call_id = call_id.to_owned();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + DOWNLOAD_LIMIT;
        let prepared = async {
            let mut tx = pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            let source = prepare(&mut tx, &call_id, limit).await?;
            Ok::<_, PlaybackError>((tx, source))
        }
        .await;
        match prepared {
            Err(e) => {
                let _ = ready.send(Err(e));
            }
            Ok((tx, source)) => {
                let layout = source.layout();
                if ready.send(Ok(layout)).is_ok() {
                    let client = Client { sender, deadline };
                    source.stream(tx, layout, client).await;
                }
            }
        }
    });
    let layout = layout.await.map_err(|_| {
        PlaybackError::Database(sqlx::Error::Protocol("the playback task ended".into()))
    })??;
    Ok(Playback { layout, chunks })
}

/// Where the call's audio is, and its layout.
enum Source {
    Rows {
        call_id: String,
        created_at: OffsetDateTime,
        layout: Layout,
    },
    Record {
        call_id: String,
        created_at: OffsetDateTime,
        shape: RecordShape,
        layout: Layout,
    },
}

/// What of a compacted call's record is held whole: each packet's length and the sequences
/// received (not its audio).
#[derive(sqlx::FromRow)]
struct RecordShape {
    encoding: String,
    lengths: Vec<i32>,
    lowers: Vec<i64>,
    uppers: Vec<i64>,
}

impl Source {
    fn layout(&self) -> Layout {
        match self {
            Source::Rows { layout, .. } | Source::Record { layout, .. } => *layout,
        }
    }

    async fn stream(self, mut tx: Transaction<'static, Postgres>, layout: Layout, client: Client) {
        match self {
            Source::Rows {
                call_id,
                created_at,
                ..
            } => {
                if let Err(e) = stream_rows(&mut tx, &call_id, created_at, layout, &client).await {
                    let _ = client.sender.send(Err(e)).await;
                }
            }
            Source::Record {
                call_id,
                created_at,
                shape,
                layout,
            } => {
                let slices = Slices {
                    handle: tokio::runtime::Handle::current(),
                    tx,
                    call_id,
                    created_at,
                    offset: 1,
                    buffer: Vec::new(),
                    at: 0,
                };
                let _ = tokio::task::spawn_blocking(move || {
                    stream_record(slices, &shape, layout, &client)
                })
                .await;
            }
        }
    }
}

async fn prepare(
    tx: &mut Transaction<'static, Postgres>,
    call_id: &str,
    limit: u64,
) -> Result<Source, PlaybackError> {
    #[derive(sqlx::FromRow)]
    struct Call {
        created_at: OffsetDateTime,
        audio_encoding: String,
        sample_rate: Option<i32>,
        start: i64,
        expected: i64,
        compacted: bool,
    }
    let call: Call = sqlx::query_as(
        "SELECT created_at, audio_encoding, sample_rate, sequence_start AS start, \
                GREATEST(COALESCE(total_packets, 0), \
                         COALESCE(last_sequence + 1 - sequence_start, 0)) AS expected, \
                audio_compacted_at IS NOT NULL AS compacted \
         FROM calls WHERE call_id = $1",
    )
    .bind(call_id)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(PlaybackError::NotFound)?;
    let format = format_from_columns(&call.audio_encoding, call.sample_rate)?;
    if !format.is_sound() {
        return Err(WavError::NotAudio.into());
    }
    let measure = |received: i64, bytes: i64, first: Option<i64>| {
        Layout::measure(
            format,
            call.start,
            call.expected,
            received,
            bytes.max(0) as u64,
            first.map(|b| b.max(0) as u64),
            limit,
        )
    };
    if call.compacted {
        let shape = record_shape(tx, call_id, call.created_at).await?;
        // Checked before anything is answered: the client gets an error, not a file cut short.
        if shape.encoding != "base64" {
            return Err(PlaybackError::Database(sqlx::Error::Decode(
                format!("the compacted audio of {call_id} holds text, not audio").into(),
            )));
        }
        let bytes = shape.lengths.iter().map(|&l| i64::from(l)).sum();
        let first = shape.lengths.first().map(|&l| i64::from(l));
        let layout = measure(shape.lengths.len() as i64, bytes, first)?;
        return Ok(Source::Record {
            call_id: call_id.to_owned(),
            created_at: call.created_at,
            shape,
            layout,
        });
    }
    // The decoded size of canonical base64 (ingest accepts no other for audio), without
    // decoding: 3 bytes per 4 characters, less one per `=`.
    let (received, bytes, first): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), \
                COALESCE(sum(octet_length(data) / 4 * 3 \
                             - (octet_length(data) - octet_length(rtrim(data, '=')))), 0)::int8, \
                (SELECT octet_length(f.data) / 4 * 3 - (octet_length(f.data) - octet_length(rtrim(f.data, '='))) \
                 FROM packets f WHERE f.call_id = $1 AND f.call_created_at = $2 \
                 ORDER BY f.sequence LIMIT 1)::int8 \
         FROM packets WHERE call_id = $1 AND call_created_at = $2",
    )
    .bind(call_id)
    .bind(call.created_at)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Source::Rows {
        call_id: call_id.to_owned(),
        created_at: call.created_at,
        layout: measure(received, bytes, first)?,
    })
}

/// A compacted call's packet lengths and received sequences (not its audio); `Expired` when
/// its record is gone.
async fn record_shape(
    tx: &mut Transaction<'static, Postgres>,
    call_id: &str,
    created_at: OffsetDateTime,
) -> Result<RecordShape, PlaybackError> {
    sqlx::query_as(
        "SELECT a.encoding, a.lengths, \
                ARRAY(SELECT lower(r) FROM unnest(a.received) r) AS lowers, \
                ARRAY(SELECT upper(r) FROM unnest(a.received) r) AS uppers \
         FROM call_audio a WHERE a.call_id = $1 AND a.call_created_at = $2",
    )
    .bind(call_id)
    .bind(created_at)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(PlaybackError::Expired)
}

async fn stream_rows(
    tx: &mut Transaction<'static, Postgres>,
    call_id: &str,
    created_at: OffsetDateTime,
    layout: Layout,
    client: &Client,
) -> Result<(), PlaybackError> {
    let mut rows = sqlx::query_as::<_, (i64, String)>(
        "SELECT sequence, data FROM packets WHERE call_id = $1 AND call_created_at = $2 \
         ORDER BY sequence",
    )
    .bind(call_id)
    .bind(created_at)
    .fetch(&mut **tx);
    let mut renderer = Renderer::new(layout);
    let mut out = Vec::with_capacity(CHUNK_BYTES * 2);
    while let Some((sequence, data)) = rows.try_next().await? {
        match super::decode_base64(&data) {
            Some(bytes) => renderer.packet(sequence, &bytes, &mut out),
            None => renderer.unreadable(sequence, &mut out),
        }
        if out.len() >= CHUNK_BYTES && !send(client, &mut out).await {
            return Ok(());
        }
    }
    renderer.finish(&mut out);
    send(client, &mut out).await;
    Ok(())
}

/// Hands `out` to the client; `false` once the client has gone, or has taken nothing for
/// [`STALLED_AFTER`].
async fn send(client: &Client, out: &mut Vec<u8>) -> bool {
    let chunk = Bytes::from(std::mem::replace(out, Vec::with_capacity(CHUNK_BYTES * 2)));
    let until = client
        .deadline
        .min(tokio::time::Instant::now() + STALLED_AFTER);
    match tokio::time::timeout_at(until, client.sender.send(Ok(chunk))).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            tracing::warn!("a WAV download stalled or passed its time limit: abandoned");
            false
        }
    }
}

/// Where chunks go, and until when.
struct Client {
    sender: mpsc::Sender<Result<Bytes, PlaybackError>>,
    deadline: tokio::time::Instant,
}

/// A compacted call's compressed audio as a `Read`: slice after slice from Postgres, within
/// the playback's snapshot (on a blocking thread, so each slice is waited for with
/// `block_on`).
struct Slices {
    handle: tokio::runtime::Handle,
    tx: Transaction<'static, Postgres>,
    call_id: String,
    created_at: OffsetDateTime,
    /// Where the next slice starts (1-based, as `substring` counts).
    offset: i64,
    buffer: Vec<u8>,
    at: usize,
}

impl std::io::Read for Slices {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buffer.len() {
            let slice: Option<Vec<u8>> = self
                .handle
                .block_on(
                    sqlx::query_scalar(
                        "SELECT substring(audio FROM $3::int8::int4 FOR $4) FROM call_audio \
                         WHERE call_id = $1 AND call_created_at = $2",
                    )
                    .bind(&self.call_id)
                    .bind(self.created_at)
                    .bind(self.offset)
                    .bind(SLICE_BYTES)
                    .fetch_optional(&mut *self.tx),
                )
                .map_err(std::io::Error::other)?;
            self.buffer = slice.unwrap_or_default();
            self.at = 0;
            self.offset += self.buffer.len() as i64;
        }
        let n = out.len().min(self.buffer.len() - self.at);
        out[..n].copy_from_slice(&self.buffer[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A compacted call's audio, decompressed as it is read (on a blocking thread), cut into its
/// packets by their lengths, rendered and sent.
fn stream_record(slices: Slices, shape: &RecordShape, layout: Layout, client: &Client) {
    use std::io::Read as _;
    let handle = slices.handle.clone();
    let corrupt = |what: String| PlaybackError::Database(sqlx::Error::Decode(what.into()));
    let result = (|| {
        let sequences = shape
            .lowers
            .iter()
            .zip(&shape.uppers)
            .flat_map(|(lower, upper)| *lower..*upper);
        let mut decoder = zstd::stream::read::Decoder::new(slices)
            .map_err(|e| corrupt(format!("audio that does not decompress ({e})")))?;
        let mut renderer = Renderer::new(layout);
        let mut piece = Vec::new();
        let mut out = Vec::with_capacity(CHUNK_BYTES * 2);
        for (sequence, &length) in sequences.zip(&shape.lengths) {
            piece.resize(usize::try_from(length).unwrap_or(0), 0);
            decoder
                .read_exact(&mut piece)
                .map_err(|e| corrupt(format!("audio shorter than its lengths ({e})")))?;
            renderer.packet(sequence, &piece, &mut out);
            if out.len() >= CHUNK_BYTES && !handle.block_on(send(client, &mut out)) {
                return Ok(());
            }
        }
        renderer.finish(&mut out);
        handle.block_on(send(client, &mut out));
        Ok(())
    })();
    if let Err(e) = result {
        let _ = client.sender.blocking_send(Err(e));
    }
}
