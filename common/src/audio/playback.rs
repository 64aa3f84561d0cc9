//! A call's WAV file streamed from Postgres (`GET /v1/call/{id}/audio.wav`): sized first, then
//! decoded packet by packet into chunks, so a long call is never held in memory. Both steps
//! read one snapshot (a `REPEATABLE READ` transaction), so packets arriving meanwhile, or a
//! compaction committing, cannot make the file disagree with its header.
//!
//! A packet-rows call is read row by row from the packets' primary key. A compacted call is
//! read as its one `call_audio` row (the compressed audio, a fraction of the WAV's size) and
//! decompressed as a stream on a blocking thread.

use bytes::Bytes;
use futures::TryStreamExt;
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::{
    Record,
    wav::{Layout, Renderer, WavError},
};
use crate::calls::packets::format_from_columns;

/// Bytes gathered before a chunk is handed to the client.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks buffered between the reader and the client at most: a slow client slows the
/// reader, it does not fill memory.
const CHUNKS_IN_FLIGHT: usize = 4;

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
                    source.stream(tx, layout, sender).await;
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
    Record(Box<Record>, Layout),
}

impl Source {
    fn layout(&self) -> Layout {
        match self {
            Source::Rows { layout, .. } | Source::Record(_, layout) => *layout,
        }
    }

    async fn stream(
        self,
        mut tx: Transaction<'static, Postgres>,
        layout: Layout,
        sender: mpsc::Sender<Result<Bytes, PlaybackError>>,
    ) {
        match self {
            Source::Rows {
                call_id,
                created_at,
                ..
            } => {
                if let Err(e) = stream_rows(&mut tx, &call_id, created_at, layout, &sender).await {
                    let _ = sender.send(Err(e)).await;
                }
            }
            Source::Record(record, layout) => {
                drop(tx);
                let _ =
                    tokio::task::spawn_blocking(move || stream_record(&record, layout, &sender))
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
        let record: Record = sqlx::query_as(concat!(
            "SELECT ",
            record_columns!(),
            " FROM call_audio a WHERE a.call_id = $1 AND a.call_created_at = $2"
        ))
        .bind(call_id)
        .bind(call.created_at)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(PlaybackError::Expired)?;
        let bytes = record.lengths.iter().map(|&l| i64::from(l)).sum();
        let first = record.lengths.first().map(|&l| i64::from(l));
        let layout = measure(record.lengths.len() as i64, bytes, first)?;
        return Ok(Source::Record(Box::new(record), layout));
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

async fn stream_rows(
    tx: &mut Transaction<'static, Postgres>,
    call_id: &str,
    created_at: OffsetDateTime,
    layout: Layout,
    sender: &mpsc::Sender<Result<Bytes, PlaybackError>>,
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
        let bytes = super::decode_base64(&data).ok_or(WavError::NotBase64(sequence))?;
        renderer.packet(sequence, &bytes, &mut out)?;
        if out.len() >= CHUNK_BYTES && !send(sender, &mut out).await {
            return Ok(());
        }
    }
    renderer.finish(&mut out);
    send(sender, &mut out).await;
    Ok(())
}

/// Hands `out` to the client; `false` once the client has gone.
async fn send(sender: &mpsc::Sender<Result<Bytes, PlaybackError>>, out: &mut Vec<u8>) -> bool {
    let chunk = Bytes::from(std::mem::replace(out, Vec::with_capacity(CHUNK_BYTES * 2)));
    sender.send(Ok(chunk)).await.is_ok()
}

/// A compacted call's audio, decompressed as a stream (on a blocking thread).
fn stream_record(
    record: &Record,
    layout: Layout,
    sender: &mpsc::Sender<Result<Bytes, PlaybackError>>,
) {
    let mut renderer = Renderer::new(layout);
    let mut out = Vec::with_capacity(CHUNK_BYTES * 2);
    let mut failed = None;
    let mut gone = false;
    let walked = if record.encoding == "base64" {
        record.for_each(|sequence, bytes| {
            if let Err(e) = renderer.packet(sequence, bytes, &mut out) {
                failed = Some(e);
                return false;
            }
            if out.len() >= CHUNK_BYTES {
                let chunk = Bytes::from(std::mem::take(&mut out));
                gone = sender.blocking_send(Ok(chunk)).is_err();
            }
            !gone
        })
    } else {
        Err(sqlx::Error::Decode(
            format!("call_audio of {} holds text, not audio", record.call_id).into(),
        ))
    };
    let result = match (walked, failed) {
        (Err(e), _) => Err(PlaybackError::Database(e)),
        (Ok(()), Some(e)) => Err(e.into()),
        (Ok(()), None) => Ok(()),
    };
    if gone {
        return;
    }
    match result {
        Ok(()) => {
            renderer.finish(&mut out);
            let _ = sender.blocking_send(Ok(Bytes::from(out)));
        }
        Err(e) => {
            let _ = sender.blocking_send(Err(e));
        }
    }
}
