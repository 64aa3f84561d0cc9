//! Schemathesis (property-based testing from the OpenAPI document) against a running ingest:
//! every generated request, valid or not, is answered without a 5xx, with a documented status,
//! content type, headers and body schema; every request the document calls valid is accepted;
//! every invalid one refused. `scripts/test` installs it (PyPI's `schemathesis`, pinned); the
//! `SCHEMATHESIS` variable or `PATH` finds it.

use std::time::Duration;

use crate::helpers::spawn_app_with;

/// Examples per operation and phase: about 2,000 requests in all, in well under a minute.
const MAX_EXAMPLES: &str = "100";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_schemathesis_generates_gets_a_documented_answer_and_no_5xx() {
    // Limits off: they answer 429, which says nothing about the API's shape.
    let app = spawn_app_with(common::testing::TestEnv::new().await, |c| {
        c.auth.packets_per_sec = 0;
        c.auth.requests_per_sec = 0;
        c.max_streaming_calls_per_tenant = 0;
    })
    .await;
    let key = app.env.api_key(common::Role::Admin).await;
    let program = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let settings = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let run = tokio::process::Command::new(&program)
        .args(["--config-file", settings])
        .args(["run", &app.url("/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--checks", "all", "--max-examples", MAX_EXAMPLES])
        // One worker: with more, hypothesis (2026-11, 6.170) can fail on a race in its own cache.
        .args(["--workers", "1", "--seed", "20261126"])
        .args(["--request-timeout", "10", "--no-color"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis finished within 10 minutes")
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program:?} ({e}): run the suite with scripts/test, which installs \
                 it, or `pip install schemathesis` and set SCHEMATHESIS"
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{stderr}"
    );
    // It really ran: every operation, and a few hundred cases at least.
    assert!(stdout.contains("Tested: 9"), "{stdout}");
    let generated: u64 = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" generated")?.0.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        generated >= 500,
        "only {generated} cases generated:\n{stdout}"
    );
    println!("{stdout}");
}
