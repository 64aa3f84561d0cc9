//! L16 over a WebSocket, as jambonz's `listen` verb and FreeSWITCH's `mod_audio_fork` send it:
//! a WebSocket to ingest's [`L16_PATH`] offering the `audio.jambonz.org` subprotocol, with
//! the PBX's key as `Authorization: Bearer`; one text frame of JSON metadata (the call's id and
//! sample rate); then binary frames of signed 16-bit little-endian PCM; then a normal close.
//! Neither sends DTMF on the audio socket (jambonz reports digits to its application), so a
//! DTMF here sends nothing.

use anyhow::Context;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use wire::media::{L16_PATH, L16_SUBPROTOCOLS, L16Metadata};

use super::{Stream, Target, Unit, WebSocket};

/// The metadata frame: jambonz's `callSid` and `sampleRate`.
pub fn metadata(stream: &Stream) -> L16Metadata {
    L16Metadata {
        call_sid: Some(stream.call_id.clone()),
        sample_rate: stream.format.sample_rate(),
        ..L16Metadata::default()
    }
}

/// One L16 WebSocket.
pub struct Session {
    socket: WebSocket,
}

impl super::Session for Session {
    async fn open(target: &Target, stream: &Stream, _copy: usize) -> anyhow::Result<Self> {
        let key = target.key("--protocol l16")?;
        let mut request = format!("{}{L16_PATH}", target.ws_base).into_client_request()?;
        let headers = request.headers_mut();
        headers.insert(
            "authorization",
            format!("Bearer {key}").parse().context("the PBX key")?,
        );
        headers.insert(
            "sec-websocket-protocol",
            L16_SUBPROTOCOLS[0].parse().expect("a valid header"),
        );
        let mut socket = WebSocket::connect(request).await?;
        let metadata = serde_json::to_string(&metadata(stream))?;
        socket.send(Message::Text(metadata.into())).await?;
        Ok(Session { socket })
    }

    async fn audio(&mut self, unit: &Unit) -> anyhow::Result<()> {
        self.socket
            .send(Message::Binary(unit.bytes.clone().into()))
            .await
    }

    async fn dtmf(&mut self, _digit: char) -> anyhow::Result<()> {
        Ok(())
    }

    async fn end(self) -> anyhow::Result<()> {
        self.socket.close().await
    }
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    use super::*;
    use crate::protocols::{Protocol, send, tests::stream};

    /// Against a local WebSocket server that checks the upgrade as ingest does: the metadata,
    /// then the PCM as binary frames, then a Close.
    #[tokio::test]
    // tungstenite's handshake callback returns its (large) error response by value.
    #[allow(clippy::result_large_err)]
    async fn a_stream_offers_the_subprotocol_and_key_then_metadata_pcm_and_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let check = |request: &Request, mut response: Response| {
                let header = |name| request.headers()[name].to_str().unwrap().to_owned();
                assert_eq!(header("authorization"), "Bearer sbk_x");
                assert_eq!(header("sec-websocket-protocol"), "audio.jambonz.org");
                response.headers_mut().insert(
                    "sec-websocket-protocol",
                    "audio.jambonz.org".parse().unwrap(),
                );
                Ok(response)
            };
            let mut socket = tokio_tungstenite::accept_hdr_async(tcp, check)
                .await
                .unwrap();
            let mut got = Vec::new();
            while let Some(Ok(message)) = futures::StreamExt::next(&mut socket).await {
                got.push(message);
            }
            got
        });
        let target = Target::new(&base, Some("sbk_x"), "unused", String::new());
        let mut stream = stream(vec![vec![1, 0, 2, 0], vec![3]]);
        stream.call_id = "sim-1-0".into();
        stream.format = wire::audio::AudioFormat::slin(16_000).unwrap();
        let bar = indicatif::ProgressBar::hidden();
        send(Protocol::L16, &target, &stream, None, &bar)
            .await
            .unwrap();
        let got = server.await.unwrap();
        assert_eq!(got.len(), 4, "{got:?}");
        let Message::Text(metadata) = &got[0] else {
            panic!("metadata first: {got:?}")
        };
        let metadata: serde_json::Value = serde_json::from_str(metadata).unwrap();
        assert_eq!(
            metadata,
            serde_json::json!({"callSid": "sim-1-0", "sampleRate": 16000})
        );
        assert_eq!(got[1], Message::Binary(vec![1, 0, 2, 0].into()));
        assert_eq!(got[2], Message::Binary(vec![3].into()));
        assert!(matches!(got[3], Message::Close(_)));
    }

    #[tokio::test]
    async fn an_upgrade_ingest_refuses_fails_with_its_status_and_message() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = tcp.read(&mut request).await;
            let body = r#"{"error":{"code":"unauthorized","message":"the API key is not valid"}}"#;
            let response = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(response.as_bytes()).await.unwrap();
        });
        let target = Target::new(&base, Some("sbk_wrong"), "unused", String::new());
        let mut stream = stream(vec![vec![1, 0]]);
        stream.format = wire::audio::AudioFormat::slin(8_000).unwrap();
        let bar = indicatif::ProgressBar::hidden();
        let refused = send(Protocol::L16, &target, &stream, None, &bar).await;
        let why = format!("{:#}", refused.err().expect("refused"));
        assert!(
            why.contains("refused") && why.contains("401 unauthorized: the API key is not valid"),
            "{why}"
        );
    }
}
