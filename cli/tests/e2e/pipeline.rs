//! The main job end to end: ingest, transcriber and notifier as separate OS processes (the
//! real binaries) against real Postgres and NATS with a unique prefix, the simulated AI at its
//! default 25% failure rate with short latencies, and `pbx simulate` over 100 calls with loss,
//! duplicates and reordering. Then SIGTERM to all three: each exits cleanly within its deadline.

use std::{process::Stdio, time::Duration};

use common::testing::eventually;
use tokio::io::AsyncBufReadExt;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_lossy_calls_go_through_three_real_processes_and_nothing_is_lost() {
    let (env, log_dir) = test_env("e2e").await;
    let keys = keys(&env).await;
    let mut ingest = Service::start("ingest", &env, &[], &log_dir);
    let mut transcriber = Service::start(
        "transcriber",
        &env,
        &[
            ("AI_LATENCY_MS", "5-30".into()),
            ("TRANSCRIBE_BACKOFF_BASE_MS", "20".into()),
            ("TRANSCRIBE_BACKOFF_MAX_MS", "200".into()),
            ("TRANSCRIBE_MAX_ATTEMPTS", "15".into()),
        ],
        &log_dir,
    );
    let mut notifier = Service::start("notifier", &env, &[], &log_dir);
    let client = authorized(&keys.pbx);
    for service in [&ingest, &transcriber, &notifier] {
        wait_ready(service, &client).await;
    }

    let output = pbx(&keys)
        .args([
            "--ingest-url",
            &ingest.url(),
            "--notifier-url",
            &notifier.url(),
            "simulate",
            "--calls",
            "100",
            "--packets",
            "40",
            "--concurrency",
            "20",
            "--rate",
            "0",
            "--loss",
            "0.05",
            "--duplicates",
            "0.05",
            "--reorder",
            "0.05",
            "--seed",
            "42",
            "--timeout-secs",
            "120",
            "--json",
        ])
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
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON summary");
    assert_eq!(summary["calls"], 100);
    assert_eq!(
        summary["final_states"],
        serde_json::json!({"ARCHIVED": 100}),
        "{summary}"
    );
    assert_eq!(summary["unfinished"], 0);
    assert_eq!(summary["lost_packets"], 0);
    assert_eq!(
        summary["missing_mismatches"], 0,
        "reported missing ranges match the drops"
    );
    assert!(
        summary["packets_dropped_by_simulator"].as_u64().unwrap() > 0,
        "the run had losses"
    );
    assert!(
        summary["duplicates_reported"].as_u64().unwrap() > 0,
        "the run had duplicates"
    );
    // Every accepted packet is in Postgres.
    let stored = common::audio::count_stored(&env.pool).await.unwrap();
    assert_eq!(stored as u64, summary["packets_accepted"].as_u64().unwrap());
    let retried: i64 = sqlx::query_scalar("SELECT count(*) FROM calls WHERE ai_attempts > 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(retried > 0, "a 25% failure rate made some calls retry");

    // SIGTERM: each exits cleanly within its deadline.
    for (service, deadline) in [
        (&mut ingest, Duration::from_secs(10)),
        (&mut transcriber, Duration::from_secs(25)),
        (&mut notifier, Duration::from_secs(10)),
    ] {
        let (took, clean) = service.terminate();
        let log = std::fs::read_to_string(&service.log).unwrap_or_default();
        assert!(
            clean,
            "{} exited with an error; its log:\n{log}",
            service.name
        );
        assert!(took < deadline, "{} took {took:?} to stop", service.name);
        assert!(
            log.contains("stopped"),
            "{} logged its clean stop",
            service.name
        );
    }
    std::fs::remove_dir_all(&log_dir).ok();
}

/// Two of each service, as separate processes on one database and prefix: ingest,
/// transcriber and notifier hold nothing another replica needs. Two `pbx simulate` runs stream
/// through different ingests and follow their calls on the other run's notifier; every call
/// ends `ARCHIVED` exactly once, nothing is lost, both transcribers did work, and the final
/// calls are compacted by whichever ingest got to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_every_service_share_the_work_and_lose_nothing() {
    let (env, log_dir) = test_env("replicas").await;
    let keys = keys(&env).await;
    let fast_ai = [
        ("AI_LATENCY_MS", "20-60".to_string()),
        ("AI_FAILURE_RATE", "0.1".into()),
        ("TRANSCRIBE_BACKOFF_BASE_MS", "20".into()),
        ("TRANSCRIBE_BACKOFF_MAX_MS", "200".into()),
        ("TRANSCRIBE_MAX_ATTEMPTS", "15".into()),
        ("TRANSCRIBE_CONCURRENCY", "8".into()),
    ];
    let ingests = [
        Service::start("ingest", &env, &[], &log_dir),
        Service::start("ingest", &env, &[], &log_dir),
    ];
    let transcribers = [
        Service::start("transcriber", &env, &fast_ai, &log_dir),
        Service::start("transcriber", &env, &fast_ai, &log_dir),
    ];
    let notifiers = [
        Service::start("notifier", &env, &[], &log_dir),
        Service::start("notifier", &env, &[], &log_dir),
    ];
    let client = authorized(&keys.pbx);
    for service in ingests.iter().chain(&transcribers).chain(&notifiers) {
        wait_ready(service, &client).await;
    }

    let simulate = |ingest: &Service, notifier: &Service, prefix: &str| {
        pbx(&keys)
            .args([
                "--ingest-url",
                &ingest.url(),
                "--notifier-url",
                &notifier.url(),
                "simulate",
                "--calls",
                "40",
                "--packets",
                "30",
                "--concurrency",
                "10",
                "--rate",
                "0",
                "--loss",
                "0.05",
                "--duplicates",
                "0.05",
                "--seed",
                "7",
                "--id-prefix",
                prefix,
                "--timeout-secs",
                "120",
                "--json",
            ])
            .output()
    };
    let (a, b) = tokio::join!(
        simulate(&ingests[0], &notifiers[1], "rep-a"),
        simulate(&ingests[1], &notifiers[0], "rep-b")
    );
    let mut accepted = 0;
    for output in [a.unwrap(), b.unwrap()] {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "pbx simulate failed: {stdout}");
        let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            summary["final_states"],
            serde_json::json!({"ARCHIVED": 40}),
            "{summary}"
        );
        assert_eq!(summary["lost_packets"], 0, "{summary}");
        assert_eq!(summary["missing_mismatches"], 0, "{summary}");
        accepted += summary["packets_accepted"].as_i64().unwrap();
    }

    let archived_twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT call_id FROM call_transitions WHERE to_state = 'ARCHIVED' \
         GROUP BY call_id HAVING count(*) > 1) twice",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(archived_twice, 0);
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT worker) FROM transcription_attempts WHERE outcome = 'succeeded'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(workers, 2, "both transcribers transcribed calls");
    eventually(
        "every final call compacted",
        Duration::from_secs(30),
        || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM calls WHERE audio_compacted_at IS NULL")
                    .fetch_one(&env.pool)
                    .await
                    .unwrap();
            (left == 0).then_some(())
        },
    )
    .await;
    assert_eq!(
        common::audio::count_stored(&env.pool).await.unwrap(),
        accepted
    );
    drop((ingests, transcribers, notifiers));
    std::fs::remove_dir_all(&log_dir).ok();
}

/// `pbx watch` against the real notifier binary, which is killed and started again on the
/// same port in the middle: pbx reconnects by itself with the resume URL it builds
/// (`since` and `stream`), and a call sent after the restart shows up in its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbx_watch_follows_calls_across_a_notifier_restart() {
    let (env, log_dir) = test_env("watch").await;
    let keys = keys(&env).await;
    let ingest = Service::start("ingest", &env, &[], &log_dir);
    let mut notifier = Service::start("notifier", &env, &[], &log_dir);
    let client = authorized(&keys.pbx);
    wait_ready(&ingest, &client).await;
    wait_ready(&notifier, &client).await;

    let mut watch = pbx(&keys)
        .args(["--notifier-url", &notifier.url(), "watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("pbx watch starts");
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let send = |call: &'static str| {
        let (client, url) = (client.clone(), ingest.url());
        async move {
            let status = client
                .post(format!("{url}/v1/call/stream/{call}"))
                .json(&serde_json::json!({"sequence": 0, "data": "hello", "timestamp": 1.0}))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 202);
        }
    };
    // Reads pbx's frames until one mentions `call`.
    async fn seen(lines: &mut tokio::io::Lines<impl tokio::io::AsyncBufRead + Unpin>, call: &str) {
        let deadline = Duration::from_secs(60);
        tokio::time::timeout(deadline, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(&format!("\"call_id\":\"{call}\"")) {
                    return;
                }
            }
            panic!("pbx watch ended before showing {call}");
        })
        .await
        .unwrap_or_else(|_| panic!("pbx watch did not show {call} within {deadline:?}"));
    }

    send("before-restart").await;
    seen(&mut lines, "before-restart").await;

    let port = notifier.port;
    notifier.child.kill().unwrap();
    notifier.child.wait().unwrap();
    let notifier = Service::start_on("notifier", port, &env, &[], &log_dir);
    wait_ready(&notifier, &client).await;

    send("after-restart").await;
    seen(&mut lines, "after-restart").await;
    assert!(
        watch.try_wait().unwrap().is_none(),
        "pbx watch is still running after the restart"
    );
    watch.kill().await.ok();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut watch.stderr.take().unwrap(), &mut stderr)
        .await
        .ok();
    assert!(
        !stderr.contains("400"),
        "pbx's resume was refused: {stderr}"
    );
    std::fs::remove_dir_all(&log_dir).ok();
}

/// A smoke run of `pbx bench` against the real ingest binary, open loop and closed loop: every
/// packet is answered 202 and stored, and the report says so. (Figures come from runs on a quiet
/// machine, recorded in docs/benchmarks.md, never from this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbx_bench_loads_ingest_and_reports_what_it_measured() {
    let (env, log_dir) = test_env("bench").await;
    let keys = keys(&env).await;
    let ingest = Service::start("ingest", &env, &[], &log_dir);
    wait_ready(&ingest, &authorized(&keys.pbx)).await;

    let mut accepted_total = 0;
    for extra in [&["--pattern", "lossy"][..], &["--closed"][..]] {
        let output = pbx(&keys)
            .args(["--ingest-url", &ingest.url(), "bench", "--calls", "4"])
            .args(["--rate", "200", "--duration", "1.5", "--json"])
            .args(extra)
            .output()
            .await
            .expect("pbx runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "pbx bench {extra:?} failed ({}): {stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
        assert!(report["accepted"].as_u64().unwrap() > 10, "{report}");
        assert_eq!(report["accepted"], report["sent"], "{report}");
        assert_eq!(report["errors"], serde_json::json!({}));
        assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
        accepted_total += report["accepted"].as_i64().unwrap();
    }
    let stored = common::audio::count_stored(&env.pool).await.unwrap();
    assert_eq!(stored, accepted_total, "every accepted packet is stored");
    std::fs::remove_dir_all(&log_dir).ok();
}

/// A smoke run of `pbx bench-live` against the real ingest and notifier binaries: every socket
/// gets every event (each a call started through ingest), and the report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbx_bench_live_fans_events_out_to_every_socket() {
    let (env, log_dir) = test_env("bench-live").await;
    let keys = keys(&env).await;
    let client = authorized(&keys.pbx);
    let ingest = Service::start("ingest", &env, &[], &log_dir);
    let notifier = Service::start("notifier", &env, &[], &log_dir);
    wait_ready(&ingest, &client).await;
    wait_ready(&notifier, &client).await;

    let output = pbx(&keys)
        .args([
            "--ingest-url",
            &ingest.url(),
            "--notifier-url",
            &notifier.url(),
        ])
        .args(["bench-live", "--sockets", "50", "--events", "3", "--json"])
        .output()
        .await
        .expect("pbx runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pbx bench-live failed ({}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(report["expected"], 150, "{report}");
    assert_eq!(report["delivered"], 150, "{report}");
    assert_eq!(report["per_event"].as_array().unwrap().len(), 3, "{report}");
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    std::fs::remove_dir_all(&log_dir).ok();
}
