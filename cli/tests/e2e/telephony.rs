//! Each PBX protocol end to end: `pbx simulate --protocol ...` streams calls with the
//! protocol's awkward cases (reordered and repeated frames, a second stream of a call, odd-sized
//! frames, dropped connections) through the three real services, whose transcriber sends every
//! call to an OpenAI-compatible speech-to-text server run here. That server checks each file is
//! a valid 16-bit mono WAV and keeps its samples; the test then checks they are exactly the
//! audio the simulator sent (its `--save-audio` files), sample for sample, for every call.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use axum::{Json, Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use serde_json::{Value, json};
use wire::audio::parse_wav;

use crate::support::*;

/// What the speech-to-text server received: by file name (`<call id>.wav`), the rate and
/// samples of each valid WAV, and the problems with any other request.
#[derive(Default)]
struct Received {
    files: HashMap<String, (u32, Vec<i16>)>,
    problems: Vec<String>,
}

type Shared = Arc<Mutex<Received>>;

/// An OpenAI-compatible `POST /v1/audio/transcriptions`: a multipart body whose `file` part is
/// read (by its `filename` and the WAV's own lengths: one fixed layout needs no multipart
/// parser) and checked. A file that is not a valid WAV is answered 400, so the call fails and
/// the test sees it.
async fn transcribe(State(received): State<Shared>, body: Bytes) -> (StatusCode, Json<Value>) {
    let text = String::from_utf8_lossy(&body);
    let name = text
        .split("filename=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned);
    let wav = body.windows(4).position(|w| w == b"RIFF").and_then(|at| {
        let len = u32::from_le_bytes(body.get(at + 40..at + 44)?.try_into().ok()?) as usize;
        body.get(at..at + 44 + len)
    });
    let mut received = received.lock().unwrap();
    match (name, wav.map(parse_wav)) {
        (Some(name), Some(Ok((rate, samples)))) => {
            let answer = format!("{} samples at {rate} Hz", samples.len());
            received.files.insert(name, (rate, samples));
            (StatusCode::OK, Json(json!({ "text": answer })))
        }
        (name, wav) => {
            let problem = format!("{name:?}: {:?}", wav.map(|w| w.map(|_| ())));
            received.problems.push(problem.clone());
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": problem}})),
            )
        }
    }
}

async fn start_stt() -> (String, Shared) {
    let received = Shared::default();
    let app = Router::new()
        .route("/v1/audio/transcriptions", post(transcribe))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// Runs `pbx simulate` with `args` through ingest, transcriber (sending to the test's
/// speech-to-text server) and notifier, then checks every call is `ARCHIVED` and was sent to
/// the server as exactly the audio the simulator says it sent.
async fn simulate_through_the_services(test: &str, args: &[&str]) {
    let (env, log_dir) = test_env(test).await;
    let keys = keys(&env).await;
    let (stt, received) = start_stt().await;
    let audiosocket = free_port();
    let ingest = Service::start(
        "ingest",
        &env,
        &[
            ("AUDIOSOCKET_ADDR", format!("127.0.0.1:{audiosocket}")),
            ("AUDIOSOCKET_API_KEY", keys.pbx.clone()),
        ],
        &log_dir,
    );
    let transcriber = Service::start(
        "transcriber",
        &env,
        &[
            ("AI_PROVIDER", "openai".into()),
            ("AI_BASE_URL", stt),
            ("TRANSCRIBE_BACKOFF_BASE_MS", "20".into()),
        ],
        &log_dir,
    );
    let notifier = Service::start("notifier", &env, &[], &log_dir);
    let client = authorized(&keys.pbx);
    for service in [&ingest, &transcriber, &notifier] {
        wait_ready(service, &client).await;
    }
    let saved = log_dir.join("sent");
    let output = pbx(&keys)
        .args([
            "--ingest-url",
            &ingest.url(),
            "--notifier-url",
            &notifier.url(),
        ])
        .args([
            "simulate",
            "--audiosocket-addr",
            &format!("127.0.0.1:{audiosocket}"),
        ])
        .args(["--save-audio", saved.to_str().unwrap()])
        .args(["--seed", "7", "--timeout-secs", "120", "--json"])
        .args(args)
        .output()
        .await
        .expect("pbx runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pbx simulate failed ({}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_str(&stdout).expect("a JSON summary");
    let calls = summary["calls"].as_u64().unwrap() as usize;
    assert_eq!(
        summary["final_states"],
        json!({"ARCHIVED": calls}),
        "{summary}"
    );
    assert_eq!(summary["audio_mismatches"], 0, "{summary}");
    assert_eq!(summary["audio_checked"], calls, "{summary}");

    let received = received.lock().unwrap();
    assert!(received.problems.is_empty(), "{:?}", received.problems);
    let sent = sent_audio(&saved);
    assert_eq!(sent.len(), calls, "one saved file a call");
    for (name, (rate, samples)) in &sent {
        let (got_rate, got) = received
            .files
            .get(name)
            .unwrap_or_else(|| panic!("{name} never reached the speech-to-text server"));
        assert_eq!(got_rate, rate, "{name}");
        assert!(!samples.is_empty(), "{name} carries audio");
        assert!(
            got == samples,
            "{name}: the samples differ from what was sent"
        );
    }
    std::fs::remove_dir_all(&log_dir).ok();
}

/// The simulator's `--save-audio` files, by file name.
fn sent_audio(dir: &Path) -> HashMap<String, (u32, Vec<i16>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let wav = parse_wav(&std::fs::read(&path).unwrap()).unwrap();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                wav,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_media_streams_reach_the_speech_provider_sample_exact() {
    simulate_through_the_services(
        "twilio",
        &[
            "--protocol",
            "twilio",
            "--calls",
            "8",
            "--packets",
            "100",
            "--rate",
            "0",
            "--loss",
            "0.05",
            "--duplicates",
            "0.05",
            "--reorder",
            "0.1",
            "--duplicate-stream",
            "0.5",
            "--disconnect",
            "0.25",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audiosocket_calls_reach_the_speech_provider_sample_exact() {
    simulate_through_the_services(
        "audiosocket",
        &[
            "--protocol",
            "audiosocket",
            "--calls",
            "6",
            "--packets",
            "100",
            "--rate",
            "0",
            "--sample-rate",
            "16000",
            "--odd-frames",
            "--disconnect",
            "0.3",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l16_websockets_reach_the_speech_provider_sample_exact() {
    simulate_through_the_services(
        "l16",
        &[
            "--protocol",
            "l16",
            "--calls",
            "6",
            "--packets",
            "100",
            "--rate",
            "0",
            "--sample-rate",
            "8000",
            "--odd-frames",
            "--duplicate-stream",
            "0.5",
            "--disconnect",
            "0.3",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_audio_reaches_the_speech_provider_sample_exact() {
    simulate_through_the_services(
        "http-audio",
        &[
            "--protocol",
            "http",
            "--encoding",
            "alaw",
            "--calls",
            "6",
            "--packets",
            "100",
            "--rate",
            "0",
            "--loss",
            "0.05",
            "--duplicates",
            "0.05",
            "--reorder",
            "0.1",
        ],
    )
    .await;
}
