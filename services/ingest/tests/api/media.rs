//! The telephony adapters, spoken to byte for byte as the PBXs speak them (Twilio Media
//! Streams, Asterisk AudioSocket, L16 WebSockets), with their awkward cases: frames out of
//! order, repeated and of odd sizes, a second stream of the same call, a lost connection, bad
//! credentials. Every call is then played back through `GET /v1/call/{id}/audio.wav`, which
//! must give exactly the samples that were sent.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::{AudioFormat, Role, testing::eventually};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};
use wire::{
    audio::{mulaw_to_linear, parse_wav},
    media::audiosocket,
};

use crate::helpers::{TestApp, call_id, spawn_app, spawn_app_with, status_and_body};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A deterministic signal: `n` samples of a tone with some harmonics.
fn samples(n: usize, seed: u32) -> Vec<i16> {
    (0..n)
        .map(|i| {
            let t = i as f64 / 8_000.0;
            let f = 180.0 + f64::from(seed % 7) * 20.0;
            let v = (2.0 * std::f64::consts::PI * f * t).sin() * 9_000.0
                + (2.0 * std::f64::consts::PI * 3.0 * f * t).sin() * 2_000.0;
            v as i16
        })
        .collect()
}

fn ws_url(app: &TestApp, path: &str) -> String {
    app.url(path).replacen("http://", "ws://", 1)
}

async fn play(app: &TestApp, call: &str) -> (u32, Vec<i16>) {
    let response = app.get(&format!("/v1/call/{call}/audio.wav")).await;
    assert_eq!(response.status(), 200, "audio.wav of {call}");
    assert_eq!(response.headers()["content-type"], "audio/wav");
    let length: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), length);
    parse_wav(&body).expect("a valid WAV file")
}

async fn wait_state(app: &TestApp, call: &str, state: &str) -> Value {
    eventually(
        &format!("{call} to be {state}"),
        Duration::from_secs(20),
        || async {
            let response = app.get(&format!("/v1/call/{call}")).await;
            if response.status() != 200 {
                return None;
            }
            let body: Value = response.json().await.unwrap();
            (body["state"] == state).then_some(body)
        },
    )
    .await
}

// --- Twilio -------------------------------------------------------------------------------

fn twilio_start(call_sid: &str, key: &str, tracks: &[&str]) -> Value {
    json!({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ00000000000000000000000000000001",
        "start": {
            "accountSid": "AC00000000000000000000000000000001",
            "streamSid": "MZ00000000000000000000000000000001",
            "callSid": call_sid, "tracks": tracks,
            "customParameters": {"key": key},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        }
    })
}

fn twilio_media(track: &str, chunk: usize, payload: &[u8]) -> Value {
    json!({
        "event": "media", "sequenceNumber": (chunk + 1).to_string(),
        "streamSid": "MZ00000000000000000000000000000001",
        "media": {"track": track, "chunk": chunk.to_string(),
                  "timestamp": ((chunk - 1) * 20).to_string(), "payload": STANDARD.encode(payload)}
    })
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

async fn twilio_socket(app: &TestApp) -> Socket {
    let (socket, response) = connect_async(ws_url(app, "/v1/media/twilio"))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    socket
}

/// 20 ms µ-law frames of a signal.
fn mulaw_frames(count: usize, seed: u32) -> Vec<Vec<u8>> {
    samples(count * 160, seed)
        .chunks(160)
        .map(|s| AudioFormat::MULAW.encode(s))
        .collect()
}

fn decoded(frames: &[Vec<u8>]) -> Vec<i16> {
    frames
        .iter()
        .flatten()
        .map(|&b| mulaw_to_linear(b))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_stream_out_of_order_repeated_and_doubled_plays_back_exactly() {
    let app = spawn_app().await;
    let key = app.env.api_key(Role::Pbx).await;
    let call = format!("CA{}", call_id().replace('-', ""));
    let frames = mulaw_frames(50, 1);
    // Two streams of the same call at once (a duplicated <Stream>), each sending chunks
    // 1..=50 with pairs swapped, chunk 7 twice, and a DTMF and a mark between.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut socket = twilio_socket(&app).await;
        send(
            &mut socket,
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        )
        .await;
        send(&mut socket, twilio_start(&call, &key, &["inbound"])).await;
        streams.push(socket);
    }
    let mut order: Vec<usize> = (1..=50).collect();
    for pair in order.chunks_mut(2).step_by(3) {
        pair.reverse();
    }
    order.insert(10, 7);
    for chunk in &order {
        for socket in &mut streams {
            send(socket, twilio_media("inbound", *chunk, &frames[chunk - 1])).await;
        }
        if *chunk == 20 {
            send(&mut streams[0], json!({"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "99", "dtmf": {"track": "inbound_track", "digit": "5"}})).await;
            send(&mut streams[1], json!({"event": "mark", "streamSid": "MZ1", "sequenceNumber": "99", "mark": {"name": "m"}})).await;
        }
    }
    for mut socket in streams {
        send(&mut socket, json!({"event": "stop", "sequenceNumber": "60", "streamSid": "MZ1", "stop": {"accountSid": "AC1", "callSid": call}})).await;
        socket.close(None).await.ok();
    }

    let body = wait_state(&app, &call, "COMPLETED").await;
    assert_eq!(body["encoding"], "mulaw");
    assert_eq!(body["sample_rate"], 8000);
    assert_eq!(
        body["first_sequence"], 1,
        "chunks count from 1: no phantom packet 0"
    );
    assert_eq!(body["total_packets"], 50);
    assert_eq!(body["packets_received"], 50);
    assert_eq!(body["missing_packets"], 0);
    let reasons: Vec<&str> = body["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["first_packet", "stream_ended"]);
    let (rate, played) = play(&app, &call).await;
    assert_eq!(rate, 8000);
    assert_eq!(played, decoded(&frames), "sample-exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_twilio_connection_completes_with_what_came_and_gaps_are_silence() {
    let app = spawn_app().await;
    let key = app.env.api_key(Role::Pbx).await;
    let call = format!("CA{}", call_id().replace('-', ""));
    let frames = mulaw_frames(10, 2);
    let mut socket = twilio_socket(&app).await;
    send(&mut socket, twilio_start(&call, &key, &["inbound"])).await;
    for chunk in [1, 2, 3, 5, 6] {
        send(
            &mut socket,
            twilio_media("inbound", chunk, &frames[chunk - 1]),
        )
        .await;
    }
    // Numbers as numbers are taken too (a PBX that is not quite Twilio).
    send(&mut socket, json!({"event": "media", "media": {"track": "inbound", "chunk": 7, "timestamp": 120, "payload": STANDARD.encode(&frames[6])}})).await;
    // Dropped: no stop, no close frame.
    drop(socket);

    let body = wait_state(&app, &call, "COMPLETED").await;
    assert_eq!(body["total_packets"], 7);
    assert_eq!(body["missing"], json!([{"from": 4, "to": 4}]));
    let last = body["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["reason"], "stream_lost");
    let (_, played) = play(&app, &call).await;
    let mut want = decoded(&frames[..3]);
    want.extend([0i16; 160]);
    want.extend(decoded(&frames[4..7]));
    assert_eq!(played, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_twilio_tracks_are_kept_apart() {
    let app = spawn_app().await;
    let key = app.env.api_key(Role::Pbx).await;
    let call = format!("CA{}", call_id().replace('-', ""));
    let inbound = mulaw_frames(3, 3);
    let outbound = mulaw_frames(3, 4);
    let mut socket = twilio_socket(&app).await;
    send(
        &mut socket,
        twilio_start(&call, &key, &["inbound", "outbound"]),
    )
    .await;
    for chunk in 1..=3 {
        send(
            &mut socket,
            twilio_media("inbound", chunk, &inbound[chunk - 1]),
        )
        .await;
        send(
            &mut socket,
            twilio_media("outbound", chunk, &outbound[chunk - 1]),
        )
        .await;
    }
    send(
        &mut socket,
        json!({"event": "stop", "stop": {"callSid": call}}),
    )
    .await;

    wait_state(&app, &call, "COMPLETED").await;
    wait_state(&app, &format!("{call}-outbound"), "COMPLETED").await;
    assert_eq!(play(&app, &call).await.1, decoded(&inbound));
    assert_eq!(
        play(&app, &format!("{call}-outbound")).await.1,
        decoded(&outbound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_stream_without_a_valid_key_is_closed_with_a_reason() {
    let app = spawn_app().await;
    let supervisor = app.env.api_key(Role::Supervisor).await;
    for (key, call) in [
        ("sbk_made_up", "CAnokey1"),
        (supervisor.as_str(), "CAnokey2"),
    ] {
        let mut socket = twilio_socket(&app).await;
        send(&mut socket, twilio_start(call, key, &["inbound"])).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap();
        match closed {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
        assert_eq!(app.get(&format!("/v1/call/{call}")).await.status(), 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_twilio_auth_token_set_the_upgrade_must_be_signed() {
    let app = spawn_app_with(common::testing::TestEnv::new().await, |c| {
        c.twilio_auth_token = Some("twilio-secret".into());
    })
    .await;
    let url = ws_url(&app, "/v1/media/twilio");
    let refused = connect_async(&url).await.unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "invalid_signature");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let mut request = url.as_str().into_client_request().unwrap();
    let host = request.headers()["host"].to_str().unwrap().to_owned();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"twilio-secret");
    let tag = ring::hmac::sign(&key, format!("wss://{host}/v1/media/twilio").as_bytes());
    request.headers_mut().insert(
        "x-twilio-signature",
        HeaderValue::from_str(&STANDARD.encode(tag.as_ref())).unwrap(),
    );
    let (_, response) = connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
}

// --- AudioSocket --------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn audiosocket_app() -> (TestApp, u16) {
    let env = common::testing::TestEnv::new().await;
    let key = env.api_key(Role::Pbx).await;
    let port = free_port();
    let app = spawn_app_with(env, |c| {
        c.audiosocket_addr = common::config::OptionalAddr(Some(([127, 0, 0, 1], port).into()));
        c.audiosocket_api_key = Some(key);
    })
    .await;
    (app, port)
}

fn new_uuid() -> ([u8; 16], String) {
    let bytes: [u8; 16] = rand::random();
    (bytes, audiosocket::uuid_text(&bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audiosocket_call_at_16_khz_in_odd_frames_plays_back_exactly() {
    let (app, port) = audiosocket_app().await;
    let (uuid, call) = new_uuid();
    let sent: Vec<u8> = AudioFormat::slin(16_000)
        .unwrap()
        .encode(&samples(16_000, 5));
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket
        .write_all(&audiosocket::frame(audiosocket::UUID, &uuid))
        .await
        .unwrap();
    // Frames of odd sizes: samples straddle frames.
    let mut at = 0;
    for size in [320usize, 1, 639, 7, 1000, 33].iter().cycle() {
        if at >= sent.len() {
            break;
        }
        let end = (at + size).min(sent.len());
        socket
            .write_all(&audiosocket::frame(0x12, &sent[at..end]))
            .await
            .unwrap();
        at = end;
        if at == 640 {
            socket
                .write_all(&audiosocket::frame(audiosocket::DTMF, b"#"))
                .await
                .unwrap();
        }
    }
    socket
        .write_all(&audiosocket::frame(audiosocket::HANGUP, &[]))
        .await
        .unwrap();

    let body = wait_state(&app, &call, "COMPLETED").await;
    assert_eq!(body["encoding"], "slin");
    assert_eq!(body["sample_rate"], 16_000);
    assert_eq!(body["total_packets"], 50, "one second in 20 ms packets");
    assert_eq!(
        body["history"].as_array().unwrap().last().unwrap()["reason"],
        "stream_ended"
    );
    let (rate, played) = play(&app, &call).await;
    assert_eq!(rate, 16_000);
    assert_eq!(played, samples(16_000, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audiosocket_error_frame_or_a_closed_socket_completes_the_call() {
    let (app, port) = audiosocket_app().await;
    let (uuid, errored) = new_uuid();
    let audio = AudioFormat::slin(8_000).unwrap().encode(&samples(480, 6));
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket
        .write_all(&audiosocket::frame(audiosocket::UUID, &uuid))
        .await
        .unwrap();
    socket
        .write_all(&audiosocket::frame(audiosocket::AUDIO, &audio))
        .await
        .unwrap();
    socket
        .write_all(&audiosocket::frame(audiosocket::ERROR, &[0x02]))
        .await
        .unwrap();
    let body = wait_state(&app, &errored, "COMPLETED").await;
    let last = body["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["reason"], "pbx_error");
    assert!(
        body["last_error"].as_str().unwrap().contains("0x02"),
        "{body}"
    );
    assert_eq!(play(&app, &errored).await.1, samples(480, 6));

    let (uuid, closed) = new_uuid();
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket
        .write_all(&audiosocket::frame(audiosocket::UUID, &uuid))
        .await
        .unwrap();
    socket
        .write_all(&audiosocket::frame(audiosocket::AUDIO, &audio[..321]))
        .await
        .unwrap();
    drop(socket);
    let body = wait_state(&app, &closed, "COMPLETED").await;
    assert_eq!(
        body["history"].as_array().unwrap().last().unwrap()["reason"],
        "stream_lost"
    );
    assert_eq!(
        play(&app, &closed).await.1,
        samples(160, 6),
        "the half sample is dropped"
    );
}

// --- L16 ----------------------------------------------------------------------------------

async fn l16_socket(app: &TestApp, auth: Option<&str>) -> Socket {
    let mut request = ws_url(app, "/v1/media/l16").into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("audio.jambonz.org"),
    );
    if let Some(auth) = auth {
        request
            .headers_mut()
            .insert("authorization", HeaderValue::from_str(auth).unwrap());
    }
    let (socket, response) = connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "audio.jambonz.org"
    );
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l16_stream_in_odd_binary_frames_plays_back_exactly_whichever_way_it_signs_in() {
    let app = spawn_app().await;
    let key = app.env.api_key(Role::Pbx).await;
    let basic = format!("Basic {}", STANDARD.encode(format!("jambonz:{key}")));
    let bearer = format!("Bearer {key}");
    for (i, auth) in [Some(bearer.as_str()), Some(basic.as_str()), None]
        .into_iter()
        .enumerate()
    {
        let call = call_id();
        let mut socket = l16_socket(&app, auth).await;
        let mut metadata = json!({"callSid": call, "sampleRate": 8000, "from": "+15550100"});
        if auth.is_none() {
            metadata["key"] = json!(key);
        }
        send(&mut socket, metadata).await;
        let sent = AudioFormat::slin(8_000)
            .unwrap()
            .encode(&samples(1_000, 10 + i as u32));
        for piece in sent.chunks(333) {
            socket
                .send(Message::Binary(piece.to_vec().into()))
                .await
                .unwrap();
        }
        socket.close(None).await.unwrap();
        let body = wait_state(&app, &call, "COMPLETED").await;
        assert_eq!(body["encoding"], "slin");
        assert_eq!(
            body["history"].as_array().unwrap().last().unwrap()["reason"],
            "stream_ended"
        );
        assert_eq!(
            play(&app, &call).await.1,
            samples(1_000, 10 + i as u32),
            "auth {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l16_upgrade_with_a_bad_key_is_refused_before_the_upgrade() {
    let app = spawn_app().await;
    let mut request = ws_url(&app, "/v1/media/l16").into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_static("Bearer sbk_made_up"),
    );
    match connect_async(request).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // No metadata key either: closed with 1008.
    let mut socket = l16_socket(&app, None).await;
    send(
        &mut socket,
        json!({"callSid": "l16-no-key", "sampleRate": 8000}),
    )
    .await;
    match tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .unwrap()
    {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

// --- The JSON API's formats and audio.wav ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_packets_declare_their_format_and_bad_audio_is_refused_by_field() {
    let app = spawn_app().await;
    let call = call_id();
    let frame = STANDARD.encode(AudioFormat::ALAW.encode(&samples(160, 7)));
    let packet = |sequence: i64, extra: Value| {
        let mut body = json!({"sequence": sequence, "data": frame, "timestamp": 1.0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let path = format!("/v1/call/stream/{call}");
    for (extra, field) in [
        (
            json!({"encoding": "alaw", "sample_rate": 16000}),
            "sample_rate",
        ),
        (json!({"encoding": "slin"}), "sample_rate"),
        (json!({"sample_rate": 8000}), "sample_rate"),
        (json!({"encoding": "opus"}), "encoding"),
    ] {
        let (status, body) =
            status_and_body(app.post_json(&path, packet(0, extra.clone())).await).await;
        assert_eq!(status, 422, "{extra}: {body}");
        assert_eq!(body["error"]["field"], field, "{extra}: {body}");
    }
    for data in ["not base64!", "QQ", "AB=="] {
        let body = json!({"sequence": 0, "data": data, "timestamp": 1.0, "encoding": "mulaw"});
        let (status, body) = status_and_body(app.post_json(&path, body).await).await;
        assert_eq!(
            (status, body["error"]["field"].as_str()),
            (422, Some("data")),
            "{data}: {body}"
        );
    }
    let odd = json!({"sequence": 0, "data": STANDARD.encode([1u8, 2, 3]), "timestamp": 1.0, "encoding": "slin", "sample_rate": 8000});
    assert_eq!(app.post_json(&path, odd).await.status(), 422);

    assert_eq!(
        app.post_json(&path, packet(0, json!({"encoding": "alaw"})))
            .await
            .status(),
        202
    );
    // Later packets may leave the format out, or repeat it; another is refused.
    assert_eq!(
        app.post_json(&path, packet(2, json!({}))).await.status(),
        202
    );
    // Left out, the data must still be the call's audio.
    let text = json!({"sequence": 1, "data": "hello there", "timestamp": 1.0});
    let (status, body) = status_and_body(app.post_json(&path, text).await).await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("data")),
        "{body}"
    );
    let (status, body) = status_and_body(
        app.post_json(&path, packet(3, json!({"encoding": "mulaw"})))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("format_conflict")),
        "{body}"
    );
    assert_eq!(body["error"]["field"], "encoding");

    let (rate, played) = play(&app, &call).await;
    assert_eq!(rate, 8000);
    let mut one = Vec::new();
    AudioFormat::ALAW
        .decode_into(&AudioFormat::ALAW.encode(&samples(160, 7)), &mut one)
        .unwrap();
    let want: Vec<i16> = [one.clone(), vec![0; 160], one].concat();
    assert_eq!(played, want, "a missing packet is a frame of silence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_wav_answers_clearly_when_there_is_no_audio() {
    let app = spawn_app().await;
    let text = call_id();
    assert_eq!(app.post_packet(&text, 0, "hello").await.status(), 202);
    let (status, body) =
        status_and_body(app.get(&format!("/v1/call/{text}/audio.wav")).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_audio")),
        "{body}"
    );
    let (status, body) = status_and_body(app.get("/v1/call/no-such-call/audio.wav").await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("call_not_found"))
    );
    let anonymous = reqwest::Client::new()
        .get(app.url(&format!("/v1/call/{text}/audio.wav")))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_call_plays_back_the_same_and_an_expired_one_says_so() {
    use crate::lifecycle::{finish, key, wait_compacted};
    let app = spawn_app().await;
    let call = call_id();
    let frames = mulaw_frames(30, 8);
    for (i, frame) in frames.iter().enumerate() {
        if i == 12 {
            continue; // lost
        }
        let body = json!({"sequence": i, "data": STANDARD.encode(frame), "timestamp": 1.0, "encoding": "mulaw"});
        assert_eq!(
            app.post_json(&format!("/v1/call/stream/{call}"), body)
                .await
                .status(),
            202
        );
    }
    assert_eq!(
        app.complete(&call, Some(json!({"total_packets": 32})))
            .await
            .status(),
        200
    );
    let before = play(&app, &call).await;
    let mut want = decoded(&frames[..12]);
    want.extend([0i16; 160]);
    want.extend(decoded(&frames[13..]));
    want.extend([0i16; 320]);
    assert_eq!(
        before.1, want,
        "the lost packet and the two never sent are silence"
    );

    finish(&app.env.pool, &call, common::CallState::Archived).await;
    wait_compacted(&app, &call).await;
    assert_eq!(
        play(&app, &call).await,
        before,
        "the same file from the compacted record"
    );

    sqlx::query("DELETE FROM call_audio WHERE call_id = $1")
        .bind(key(&call))
        .execute(&app.env.pool)
        .await
        .unwrap();
    let (status, body) =
        status_and_body(app.get(&format!("/v1/call/{call}/audio.wav")).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("audio_expired")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_downloads_are_bounded_so_packets_keep_their_connections() {
    // A pool of 4: one download at a time.
    let app = spawn_app_with(common::testing::TestEnv::new().await, |c| {
        c.common.database_max_connections = 4;
    })
    .await;
    let call = call_id();
    // 24,000 samples a packet, 400 packets: a 19 MB file, far more than the socket buffers.
    let data = STANDARD.encode(
        AudioFormat::slin(48_000)
            .unwrap()
            .encode(&samples(24_000, 9)),
    );
    for sequence in 0..400 {
        let body = json!({"sequence": sequence, "data": data, "timestamp": 1.0, "encoding": "slin", "sample_rate": 48000});
        assert_eq!(
            app.post_json(&format!("/v1/call/stream/{call}"), body)
                .await
                .status(),
            202
        );
    }
    let path = format!("/v1/call/{call}/audio.wav");
    let slow = app.get(&path).await;
    assert_eq!(slow.status(), 200);
    // Not read yet: the first download holds its place.
    let (status, body) = status_and_body(app.get(&path).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("overloaded")),
        "{body}"
    );
    // Packets still go in meanwhile.
    assert_eq!(app.post_packet(&call_id(), 0, "hello").await.status(), 202);
    let file = slow.bytes().await.unwrap();
    assert_eq!(file.len(), 44 + 400 * 24_000 * 2);
    // Once it is done, the next one is served.
    let again = eventually("the next download", Duration::from_secs(10), || async {
        let response = app.get(&path).await;
        (response.status() == 200).then_some(response)
    })
    .await;
    assert_eq!(again.bytes().await.unwrap(), file);
}
