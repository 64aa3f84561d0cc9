//! The clients of the telephony protocols `pbx simulate --protocol` speaks, each byte for byte
//! as the real PBX sends it (the shapes are `wire::media`, shared with ingest's adapters):
//!
//! - [`http`]: the JSON API (`POST /v1/call/stream/{id}`, then `complete`): per-packet receipts.
//! - [`twilio`]: Twilio Media Streams, JSON text frames on a WebSocket, the key in the `start`.
//! - [`audiosocket`]: Asterisk AudioSocket, kind-length-payload frames on plain TCP.
//! - [`l16`]: jambonz `listen` / FreeSWITCH `mod_audio_fork`, a metadata text frame then binary
//!   PCM on a WebSocket.
//!
//! The three media protocols share one driver ([`send`]): a [`Stream`] says what to put on the
//! wire (units of audio in order, a DTMF digit, and whether the connection ends properly or is
//! dropped), a [`Session`] says how each protocol frames it. Nothing here knows about loss or
//! reordering: the simulator decides those and hands over the frames as they are to be sent,
//! so the bytes sent and the audio the server must end up with come from the same list.

pub mod audiosocket;
pub mod http;
pub mod l16;
pub mod twilio;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use futures::{SinkExt, StreamExt, stream::SplitSink};
use indicatif::ProgressBar;
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle, time::Instant};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        self, Message,
        handshake::client::Request,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use wire::audio::AudioFormat;

/// How long a connection may take to open, and a proper close to be answered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol `pbx simulate` streams calls with.
#[derive(clap::ValueEnum, Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The JSON API: one POST a packet, then `complete`.
    #[default]
    Http,
    /// Twilio Media Streams: µ-law 8 kHz in JSON text frames on a WebSocket.
    Twilio,
    /// Asterisk AudioSocket: signed-linear frames on TCP.
    Audiosocket,
    /// jambonz / mod_audio_fork: signed-linear binary frames on a WebSocket.
    L16,
}

impl Protocol {
    /// As written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Twilio => "twilio",
            Protocol::Audiosocket => "audiosocket",
            Protocol::L16 => "l16",
        }
    }

    /// A streaming protocol, whose connection's end completes the call.
    pub fn is_media(self) -> bool {
        self != Protocol::Http
    }

    /// Whether its audio is a byte stream the PBX may cut anywhere (AudioSocket, L16) rather
    /// than numbered frames (Twilio, HTTP).
    pub fn is_byte_stream(self) -> bool {
        matches!(self, Protocol::Audiosocket | Protocol::L16)
    }
}

/// Where the media protocols connect, and what they identify themselves with.
pub struct Target {
    /// Ingest's base URL as `ws://` or `wss://`.
    pub ws_base: String,
    /// The PBX's API key (Twilio carries it in `start`, L16 in `Authorization`).
    pub key: Option<String>,
    /// The AudioSocket listener, `host:port`.
    pub audiosocket_addr: String,
    /// The Twilio account every simulated call belongs to (`AC` and 32 hex digits).
    pub account_sid: String,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Target {
    /// `ingest_base` may be http(s):// or ws(s)://.
    pub fn new(
        ingest_base: &str,
        key: Option<&str>,
        audiosocket_addr: &str,
        account_sid: String,
    ) -> Self {
        Target {
            ws_base: ingest_base
                .trim_end_matches('/')
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1),
            key: key.map(str::to_owned),
            audiosocket_addr: audiosocket_addr.to_owned(),
            account_sid,
        }
    }

    fn key(&self, protocol: &str) -> anyhow::Result<&str> {
        self.key.as_deref().with_context(|| {
            format!("{protocol} sends the PBX's key: set PBX_API_KEY (or --api-key)")
        })
    }
}

/// One call's media stream, as it goes on the wire.
pub struct Stream {
    pub call_id: String,
    pub format: AudioFormat,
    /// In the order sent (duplicates included).
    pub units: Vec<Unit>,
    /// A DTMF digit, sent after this many units.
    pub dtmf: Option<(usize, char)>,
    /// `Some(n)`: the connection is dropped after `n` units, with no end frame.
    pub disconnect_after: Option<usize>,
    /// A second connection for the same call sends the same units at the same time.
    pub duplicate: bool,
    /// Twilio's stream sids: the first connection's and the duplicate's.
    pub stream_sids: [String; 2],
}

impl Stream {
    /// The units actually sent: all of them, or those before the disconnect.
    pub fn sent(&self) -> &[Unit] {
        let n = self
            .disconnect_after
            .unwrap_or(self.units.len())
            .min(self.units.len());
        &self.units[..n]
    }
}

/// A piece of audio as one frame carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Twilio: the chunk number (from 1). Byte streams: the unit's position.
    pub sequence: i64,
    /// In the stream's format (µ-law for Twilio, PCM16 LE otherwise).
    pub bytes: Vec<u8>,
    /// When it is due, in frame periods from the stream's start.
    pub due: f64,
}

/// What a media stream did.
pub struct Sent {
    /// Units sent on the first connection.
    pub units: usize,
    /// When the first connection ended (properly or dropped).
    pub ended_at: std::time::Instant,
}

/// A media protocol's framing on one connection. Dropping it without [`Session::end`] drops
/// the connection with no end frame: a PBX that crashed or lost its network.
trait Session: Sized {
    /// Connects and sends what precedes the audio. `copy` is 0 for the call's first
    /// connection, 1 for a duplicate.
    async fn open(target: &Target, stream: &Stream, copy: usize) -> anyhow::Result<Self>;
    async fn audio(&mut self, unit: &Unit) -> anyhow::Result<()>;
    async fn dtmf(&mut self, digit: char) -> anyhow::Result<()>;
    /// Ends the call as the PBX does when the caller hangs up, and closes.
    async fn end(self) -> anyhow::Result<()>;
}

/// Sends `stream` with `protocol` (not HTTP), paced at one unit every `period` (as fast as
/// possible without one), counting its units on `bar`.
pub async fn send(
    protocol: Protocol,
    target: &Target,
    stream: &Stream,
    period: Option<Duration>,
    bar: &ProgressBar,
) -> anyhow::Result<Sent> {
    match protocol {
        Protocol::Twilio => send_with::<twilio::Session>(target, stream, period, bar).await,
        Protocol::Audiosocket => {
            send_with::<audiosocket::Session>(target, stream, period, bar).await
        }
        Protocol::L16 => send_with::<l16::Session>(target, stream, period, bar).await,
        Protocol::Http => anyhow::bail!("HTTP calls are sent by protocols::http"),
    }
}

/// The first connection, and the duplicate if the stream has one: it connects once the first
/// has sent its first unit (so the server knows which came first), then sends the same units
/// on the same schedule. Whatever happens to the duplicate is the server's right (refusing a
/// second stream is fine): only the first connection's errors count.
async fn send_with<S: Session>(
    target: &Target,
    stream: &Stream,
    period: Option<Duration>,
    bar: &ProgressBar,
) -> anyhow::Result<Sent> {
    let start = Instant::now();
    let (first_sent, first_rx) = oneshot::channel();
    let pacing = Pacing { start, period };
    let primary = drive::<S>(target, stream, 0, pacing, Some(first_sent), Some(bar));
    if !stream.duplicate {
        return primary.await;
    }
    let duplicate = async {
        if first_rx.await.is_ok() {
            drive::<S>(target, stream, 1, pacing, None, None).await.ok();
        }
    };
    let (sent, ()) = futures::join!(primary, duplicate);
    sent
}

#[derive(Clone, Copy)]
struct Pacing {
    start: Instant,
    period: Option<Duration>,
}

impl Pacing {
    async fn wait(self, due: f64) {
        if let Some(period) = self.period {
            tokio::time::sleep_until(self.start + period.mul_f64(due)).await;
        }
    }
}

/// One connection's life: open, the units in order (the DTMF digit among them), then the end
/// frame, or a drop after the planned unit.
async fn drive<S: Session>(
    target: &Target,
    stream: &Stream,
    copy: usize,
    pacing: Pacing,
    mut first_sent: Option<oneshot::Sender<()>>,
    bar: Option<&ProgressBar>,
) -> anyhow::Result<Sent> {
    let mut session = S::open(target, stream, copy).await?;
    let units = stream.sent();
    for (i, unit) in units.iter().enumerate() {
        pacing.wait(unit.due).await;
        session.audio(unit).await?;
        if let Some(first) = first_sent.take() {
            first.send(()).ok();
        }
        if let Some(bar) = bar {
            bar.inc(1);
        }
        if let Some((after, digit)) = stream.dtmf
            && after == i + 1
        {
            session.dtmf(digit).await?;
        }
    }
    if stream.disconnect_after.is_some() {
        drop(session);
    } else {
        session.end().await?;
    }
    Ok(Sent {
        units: units.len(),
        ended_at: std::time::Instant::now(),
    })
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A client WebSocket whose incoming frames are read and thrown away by a task of its own (so
/// pings are answered and the server's buffers never fill), keeping the server's Close frame:
/// the reason when ingest refuses a stream (a wrong key, an unsupported format). Dropped, it
/// ends with no Close frame.
struct WebSocket {
    sink: SplitSink<Socket, Message>,
    reader: JoinHandle<()>,
    /// The server's Close frame, once it came (written by `reader`).
    closed_by_server: Arc<Mutex<Option<CloseFrame>>>,
}

impl WebSocket {
    async fn connect(request: Request) -> anyhow::Result<Self> {
        let url = request.uri().to_string();
        let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
        let unreachable = || format!("cannot open {url}: is ingest running? try ./scripts/up");
        let (socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow::anyhow!("no answer in {CONNECT_TIMEOUT:?}"))
            .with_context(unreachable)?
            .map_err(|e| match e {
                tungstenite::Error::Http(response) => refused_upgrade(&url, &response),
                e => anyhow::Error::new(e).context(unreachable()),
            })?;
        let (sink, mut incoming) = socket.split();
        let closed_by_server: Arc<Mutex<Option<CloseFrame>>> = Arc::default();
        let close = closed_by_server.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = incoming.next().await {
                if let Message::Close(frame) = message {
                    *close.lock().expect("not poisoned") = frame;
                }
            }
        });
        Ok(WebSocket {
            sink,
            reader,
            closed_by_server,
        })
    }

    async fn send(&mut self, message: Message) -> anyhow::Result<()> {
        let Err(e) = self.sink.send(message).await else {
            return Ok(());
        };
        // The reader may not have recorded the server's Close frame yet.
        self.read_to_end(Duration::from_secs(1)).await;
        let why = self
            .refusal()
            .unwrap_or_else(|| "the server closed the WebSocket".into());
        Err(anyhow::Error::new(e).context(why))
    }

    /// Waits up to `within` for the server to end the connection. (A finished reader is never
    /// polled again: a `JoinHandle` must not be polled after it returned.)
    async fn read_to_end(&mut self, within: Duration) {
        if !self.reader.is_finished() {
            tokio::time::timeout(within, &mut self.reader).await.ok();
        }
    }

    /// Why the server closed the stream, if it did with anything but a normal close.
    fn refusal(&self) -> Option<String> {
        let close = self.closed_by_server.lock().expect("not poisoned");
        let frame = close.as_ref()?;
        (frame.code != CloseCode::Normal)
            .then(|| format!("ingest closed the stream: {} {}", frame.code, frame.reason))
    }

    /// A normal close (code 1000), then the server's own (for a while). An error only if the
    /// server had closed the stream with another code: it refused it.
    async fn close(mut self) -> anyhow::Result<()> {
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        // A connection the server already dropped is closed too.
        self.sink.send(Message::Close(Some(normal))).await.ok();
        self.read_to_end(CLOSE_TIMEOUT).await;
        match self.refusal() {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }
}

/// An upgrade ingest answered with an HTTP error, as one line: `ingest refused ...: 401
/// unauthorized: ...`.
fn refused_upgrade(
    url: &str,
    response: &tungstenite::http::Response<Option<Vec<u8>>>,
) -> anyhow::Error {
    let body = response.body().as_deref().unwrap_or_default();
    let detail = match serde_json::from_slice::<wire::api::ErrorBody>(body) {
        Ok(wire::api::ErrorBody { error }) => format!("{}: {}", error.code, error.message),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    anyhow::anyhow!(
        "ingest refused the WebSocket at {url}: {} {detail}",
        response.status().as_u16()
    )
}

impl Drop for WebSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A two-protocol test stream: call `CA1`, units of `frames` numbered from 1, the digit 5
    /// after the first, ended properly.
    pub fn stream(frames: Vec<Vec<u8>>) -> Stream {
        Stream {
            call_id: "CA1".into(),
            format: AudioFormat::MULAW,
            units: frames
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| Unit {
                    sequence: i as i64 + 1,
                    bytes,
                    due: i as f64,
                })
                .collect(),
            dtmf: Some((1, '5')),
            disconnect_after: None,
            duplicate: false,
            stream_sids: ["MZ1".into(), "MZ2".into()],
        }
    }

    #[test]
    fn a_disconnected_stream_sends_only_the_units_before_the_drop() {
        let mut s = stream(vec![vec![1], vec![2], vec![3]]);
        assert_eq!(s.sent().len(), 3);
        s.disconnect_after = Some(2);
        assert_eq!(s.sent().len(), 2);
        s.disconnect_after = Some(9);
        assert_eq!(s.sent().len(), 3);
    }
}
