use std::time::{Duration, Instant};

use common::{CallState, testing::eventually};
use futures::{StreamExt, future::join_all};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{event, next, notifier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dealt_with_while_a_fast_client_gets_every_event() {
    const EVENTS: usize = 3008;
    const BATCH: usize = 32;
    let n = notifier(|c| {
        c.client_queue = 64;
        c.send_timeout_secs = 1;
    })
    .await;
    // The slow client: a tiny receive buffer, and it never reads.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(n.url.parse().unwrap()).await.unwrap();
    let request = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}/ws", n.url).into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", n.key).parse().unwrap(),
        );
        request
    };
    let (mut slow, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let mut fast = n.connect("").await;
    assert_eq!(next(&mut fast).await["type"], "snapshot");

    // 3008 events with 4 KiB transcripts: 12 MB, far more than socket buffers hold. The test
    // publishes in batches smaller than the client queue and waits for the fast client to
    // have each batch: a client that keeps up never lags, however slow its neighbour.
    let padding = "x".repeat(4096);
    let mut received = 0;
    let mut last_seq = 0;
    for batch in 0..EVENTS / BATCH {
        for i in 0..BATCH {
            let mut e = event(
                &format!("call-{}", batch * BATCH + i),
                1,
                CallState::Archived,
            );
            e.transcript = Some(padding.clone());
            n.publish(&e).await;
        }
        while received < (batch + 1) * BATCH {
            let frame = next(&mut fast).await;
            assert_eq!(
                frame["type"], "status",
                "the fast client never lags: {}",
                frame["type"]
            );
            let seq = frame["seq"].as_u64().unwrap();
            assert!(seq > last_seq, "in order");
            last_seq = seq;
            received += 1;
        }
    }
    assert_eq!(received, EVENTS);

    // The slow client was told it lagged or was closed; it did not get 12 MB queued for it.
    eventually(
        "the slow client to be dealt with",
        Duration::from_secs(15),
        || async {
            let lagged = n.metric("switchboard_notifier_lagged_total").await;
            let closed = n
                .metric("switchboard_notifier_slow_clients_closed_total")
                .await;
            (lagged + closed >= 1.0).then_some(())
        },
    )
    .await;
    let mut statuses = 0;
    let mut dealt_with = false;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
        match frame {
            Ok(Message::Text(text)) if text.contains("\"type\":\"lagged\"") => dealt_with = true,
            Ok(Message::Text(text)) if text.contains("\"type\":\"status\"") => statuses += 1,
            Ok(Message::Close(_)) | Err(_) => {
                dealt_with = true;
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(
        dealt_with,
        "the slow client was neither told it lagged nor closed"
    );
    assert!(
        statuses < EVENTS,
        "the slow client cannot have been sent everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sockets_each_receive_an_event() {
    const SOCKETS: usize = 1000;
    let n = notifier(|_| {}).await;
    let mut sockets = Vec::with_capacity(SOCKETS);
    for _ in 0..SOCKETS / 100 {
        sockets.extend(join_all((0..100).map(|_| n.connect(""))).await);
    }
    join_all(
        sockets
            .iter_mut()
            .map(|ws| async move { assert_eq!(next(ws).await["type"], "snapshot") }),
    )
    .await;

    let published = Instant::now();
    n.publish(&event("fanout-1", 1, CallState::InProgress))
        .await;
    let latencies = join_all(sockets.iter_mut().map(|ws| async move {
        let frame = next(ws).await;
        assert_eq!(frame["call_id"], "fanout-1");
        published.elapsed()
    }))
    .await;

    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
    // The benchmark figure for docs/benchmarks.md (run with --release --nocapture).
    println!(
        "fan-out to {SOCKETS} sockets: publish-to-receive p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5),
        pct(0.99),
        ms[ms.len() - 1]
    );
    assert_eq!(ms.len(), SOCKETS);
}
