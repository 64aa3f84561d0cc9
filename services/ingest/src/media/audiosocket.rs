//! Asterisk AudioSocket: a TCP listener on `AUDIOSOCKET_ADDR` (off when empty), for the
//! dialplan's `AudioSocket(uuid,host:port)` and `Dial(AudioSocket/host:port/uuid/c(slin))`.
//!
//! Frames are one byte of kind, two bytes of big-endian length, the payload: `0x01` the call's
//! UUID (the first frame; the call id is its hyphenated text), `0x10` signed-linear 16-bit
//! little-endian 8 kHz audio and `0x11`-`0x18` the higher-rate slin kinds (any length; the
//! call's rate is its first audio frame's), `0x03` a DTMF digit, `0x00` hang-up, `0xff` an
//! error (the call is completed with it in its history). A closed socket completes the call.
//!
//! AudioSocket carries no credentials: the listener's `AUDIOSOCKET_API_KEY` (a `pbx` key)
//! names the tenant of every call it takes, checked again on every connection (a revoked key
//! stops new calls within 2 s). Who may connect is for the network to decide: see
//! docs/telephony.md.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{AudioFormat, CallId, auth::Principal};
use tokio::{
    io::{AsyncReadExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use wire::media::audiosocket::{self as kind, HEADER_BYTES, audio_rate, uuid_text};

use super::{CallStream, End, Protocol, Reframer, now_secs};
use crate::routes::AppState;

/// Accepts AudioSocket connections until `shutdown`, each served on a task of its own (at
/// most `INGEST_MAX_CONNECTIONS` at once).
pub async fn serve(
    app: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "AudioSocket listening");
    let slots = Arc::new(Semaphore::new(app.config.max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return Ok(()),
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error.message = %e, "AudioSocket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "AudioSocket connection refused: INGEST_MAX_CONNECTIONS reached");
            continue;
        };
        socket.set_nodelay(true).ok();
        let task = app.media.track(serve_call(app.clone(), socket, peer));
        tokio::spawn(async move {
            task.await;
            drop(slot);
        });
    }
}

/// One frame.
struct Frame {
    kind: u8,
    payload: Vec<u8>,
}

async fn read_frame(reader: &mut BufReader<TcpStream>) -> std::io::Result<Frame> {
    let mut header = [0u8; HEADER_BYTES];
    reader.read_exact(&mut header).await?;
    let length = u16::from_be_bytes([header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: header[0],
        payload,
    })
}

/// The call a connection carries, once its first audio frame has given the rate.
struct Call {
    stream: CallStream,
    reframer: Reframer,
    started: f64,
}

async fn serve_call(app: AppState, socket: TcpStream, peer: SocketAddr) {
    let mut reader = BufReader::new(socket);
    let idle = app.config.call_idle_timeout();
    let (call_id, principal) = match identify(&app, &mut reader, idle).await {
        Ok(identified) => identified,
        Err(why) => {
            tracing::warn!(%peer, why, "AudioSocket connection refused");
            metrics::counter!("switchboard_ingest_media_streams_total", "protocol" => "audiosocket", "event" => "refused")
                .increment(1);
            return;
        }
    };
    let shutdown = app.media.shutdown().clone();
    let mut call: Option<Call> = None;
    let end = loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(idle, read_frame(&mut reader)) => frame,
            () = shutdown.cancelled() => break End::Lost,
        };
        let Ok(Ok(frame)) = frame else {
            break End::Lost;
        };
        match frame.kind {
            kind::HANGUP => break End::Ended,
            kind::ERROR => {
                let code = frame
                    .payload
                    .first()
                    .map_or("none".into(), |c| format!("{c:#04x}"));
                break End::Error(format!(
                    "the PBX reported an AudioSocket error (code {code})"
                ));
            }
            kind::DTMF => {
                metrics::counter!("switchboard_ingest_media_dtmf_total", "protocol" => "audiosocket")
                    .increment(1);
                let digit = String::from_utf8_lossy(&frame.payload).into_owned();
                tracing::info!(call.id = %call_id, digit, "DTMF");
            }
            kind::UUID => tracing::warn!(call.id = %call_id, "a second UUID frame: ignored"),
            other => match audio_rate(other) {
                Some(rate) => {
                    if let Err(why) =
                        audio(&app, &mut call, &principal, &call_id, rate, &frame.payload).await
                    {
                        tracing::warn!(%peer, call.id = %call_id, why, "AudioSocket call refused");
                        break End::Lost;
                    }
                }
                None => {
                    tracing::warn!(call.id = %call_id, kind = other, "an unknown AudioSocket frame kind: ignored")
                }
            },
        }
    };
    if let Some(Call {
        mut stream,
        mut reframer,
        started,
    }) = call
    {
        if let Some((sequence, data, offset)) = reframer.flush() {
            stream.packet(sequence, data, started + offset).await;
        }
        stream.finish(end).await;
    }
}

/// Reads the UUID frame and checks the listener's key.
async fn identify(
    app: &AppState,
    reader: &mut BufReader<TcpStream>,
    within: Duration,
) -> Result<(CallId, Arc<Principal>), String> {
    let frame = tokio::time::timeout(within, read_frame(reader))
        .await
        .map_err(|_| "no UUID frame in time".to_owned())?
        .map_err(|e| format!("closed before its UUID frame ({e})"))?;
    if frame.kind != kind::UUID || frame.payload.len() != 16 {
        return Err(format!(
            "the first frame must be the UUID (kind 0x01, 16 bytes), not kind {:#04x} of {} bytes",
            frame.kind,
            frame.payload.len()
        ));
    }
    let uuid: [u8; 16] = frame
        .payload
        .as_slice()
        .try_into()
        .expect("checked: 16 bytes");
    let call_id = CallId::try_from(uuid_text(&uuid)).map_err(|e| e.to_string())?;
    let principal = super::authorize(app, app.config.audiosocket_api_key.as_deref())
        .await
        .map_err(|refused| format!("AUDIOSOCKET_API_KEY: {refused}"))?;
    Ok((call_id, principal))
}

/// An audio frame: opens the call on the first (its rate is the call's), then packets.
async fn audio(
    app: &AppState,
    call: &mut Option<Call>,
    principal: &Principal,
    call_id: &CallId,
    rate: u32,
    payload: &[u8],
) -> Result<(), String> {
    let format = AudioFormat::slin(rate).map_err(|e| e.to_string())?;
    if call.is_none() {
        let stream = CallStream::open(
            app,
            principal.call(call_id.clone()),
            format,
            Protocol::AudioSocket,
        )
        .await
        .map_err(|e| e.to_string())?;
        *call = Some(Call {
            stream,
            reframer: Reframer::new(format),
            started: now_secs(),
        });
    }
    let call = call.as_mut().expect("opened above");
    if call.stream.format() != format {
        metrics::counter!("switchboard_ingest_media_packets_total", "protocol" => "audiosocket", "outcome" => "format_conflict")
            .increment(1);
        tracing::warn!(
            call.id = %call_id,
            rate,
            call_format = %call.stream.format(),
            "an audio frame at another rate than the call's first: dropped"
        );
        return Ok(());
    }
    for (sequence, data, offset) in call.reframer.push(payload) {
        call.stream
            .packet(sequence, data, call.started + offset)
            .await;
    }
    Ok(())
}
