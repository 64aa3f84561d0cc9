//! The dashboard in a real headless Chromium: a call sent through the real ingest appears and
//! moves to its final state on the page, with no console errors; a screenshot is saved.

use std::time::Duration;

use clap::Parser;
use common::testing::{TestEnv, eventually};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{cdp::Browser, helpers::start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_call_move_to_its_final_state() {
    common::telemetry::init(common::config::LogFormat::Text);
    common::tls::install_crypto_provider();
    let env = TestEnv::new().await;
    let config = env.config.clone();
    let notifier = start(env, |_| {}).await;
    // Ingest and a transcriber (simulated AI, no failures, quick) on the same database and prefix.
    let stop = CancellationToken::new();
    let mut ingest = ingest::config::Cli::try_parse_from(["ingest"])
        .unwrap()
        .config;
    ingest.common = config.clone();
    ingest.addr = "127.0.0.1:0".parse().unwrap();
    let ingest = ingest::App::build(ingest).await.unwrap();
    let ingest_url = format!("http://127.0.0.1:{}", ingest.port());
    tokio::spawn(ingest.run_until_stopped(stop.clone()));
    let mut transcriber =
        transcriber::config::TranscriberConfig::try_parse_from(["transcriber"]).unwrap();
    transcriber.common = config;
    transcriber.addr = "127.0.0.1:0".parse().unwrap();
    transcriber.ai.failure_rate = 0.0;
    transcriber.ai.latency_ms = "400-400".parse().unwrap();
    let transcriber = transcriber::App::build(transcriber).await.unwrap();
    tokio::spawn(transcriber.run_until_stopped(stop.clone()));

    let browser = Browser::launch().await;
    let page = browser.open(&format!("http://{}/", notifier.url)).await;
    eventually("the page to connect", Duration::from_secs(15), || async {
        (page
            .eval("document.getElementById('conn-text').textContent")
            .await
            == json!("connected"))
        .then_some(())
    })
    .await;

    let client = reqwest::Client::new();
    for (seq, word) in ["thank", "you,", "that", "was", "great"].iter().enumerate() {
        let status = client
            .post(format!("{ingest_url}/v1/call/stream/browser-1"))
            .json(&json!({"sequence": seq, "data": word, "timestamp": 1.0}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 202);
    }
    let state_on_page = "document.querySelector('tr[data-call-id=\"browser-1\"] .state .badge')?.textContent ?? null";
    eventually(
        "the call to appear on the page",
        Duration::from_secs(15),
        || async { (page.eval(state_on_page).await == json!("IN_PROGRESS")).then_some(()) },
    )
    .await;
    client
        .post(format!("{ingest_url}/v1/call/browser-1/complete"))
        .send()
        .await
        .unwrap();
    eventually(
        "the call to reach ARCHIVED on the page",
        Duration::from_secs(30),
        || async { (page.eval(state_on_page).await == json!("ARCHIVED")).then_some(()) },
    )
    .await;
    let transcript = page
        .eval("document.querySelector('tr[data-call-id=\"browser-1\"] .transcript').textContent")
        .await;
    assert_eq!(transcript, json!("thank you, that was great"));
    let counts = page
        .eval("document.querySelector('.count[data-state=\"ARCHIVED\"] .n').textContent")
        .await;
    assert_eq!(counts, json!("1"));

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/screenshots/dashboard.png");
    page.screenshot(&path).await;
    println!(
        "dashboard screenshot: {}",
        path.canonicalize().unwrap().display()
    );
    let errors = page.console_errors();
    assert!(errors.is_empty(), "console errors on the page: {errors:?}");
    stop.cancel();
}
