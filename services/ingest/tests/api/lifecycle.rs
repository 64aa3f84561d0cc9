//! Data lifecycle: compaction of final calls, the time partitions, and retention. The final
//! states are the transcriber's to set; here the test moves calls there through the same
//! `common::calls::transition` it uses, and the running ingest's compactor does the rest.

use std::time::Duration;

use common::{
    CallKey, CallState, Reason,
    calls::{self, Changes},
    partitions,
    testing::{TestEnv, eventually, random_suffix},
};
use ingest::sweeper::{self, Policy};
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::helpers::{TestApp, spawn_app, spawn_app_with, status_and_body};

/// Streams packets 0, 1, 3 (out of order: 3 before 1), 4 and 6 of a new call, with data of
/// several bytes per character, and completes it with a declared total of 8.
async fn lossy_call(app: &TestApp) -> String {
    let id = format!("life-{}", random_suffix());
    for (seq, data) in [
        (0, "héllo"),
        (3, "wörld"),
        (1, "thère"),
        (4, "€uro"),
        (6, "six"),
    ] {
        assert_eq!(app.post_packet(&id, seq, data).await.status(), 202);
    }
    let done = app.complete(&id, Some(json!({"total_packets": 8}))).await;
    assert_eq!(done.status(), 200);
    id
}

/// The stored key of the test tenant's call `id`.
pub(crate) fn key(id: &str) -> String {
    format!("{}.{id}", common::testing::TEST_TENANT)
}

/// Moves a `COMPLETED` call to `to` (`ARCHIVED` or `FAILED`) as the transcriber would.
pub(crate) async fn finish(pool: &PgPool, id: &str, to: CallState) {
    let id = CallKey::try_from(key(id)).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let claim = Changes {
        attempts: calls::Attempts::Increment,
        ..Changes::default()
    };
    calls::transition(
        &mut tx,
        &id,
        CallState::Completed,
        CallState::ProcessingAi,
        Reason::AiClaimed,
        claim,
    )
    .await
    .unwrap()
    .expect("claimed");
    let (reason, changes) = match to {
        CallState::Archived => (
            Reason::AiSucceeded,
            Changes {
                transcript: Some("done".into()),
                ..Changes::default()
            },
        ),
        _ => (Reason::AiPermanentError, Changes::default()),
    };
    calls::transition(&mut tx, &id, CallState::ProcessingAi, to, reason, changes)
        .await
        .unwrap()
        .expect("finished");
    tx.commit().await.unwrap();
}

pub(crate) async fn wait_compacted(app: &TestApp, id: &str) {
    eventually("the call compacted", Duration::from_secs(20), || async {
        let compacted: bool = sqlx::query_scalar(
            "SELECT audio_compacted_at IS NOT NULL FROM calls WHERE call_id = $1",
        )
        .bind(key(id))
        .fetch_one(&app.env.pool)
        .await
        .unwrap();
        compacted.then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_final_call_is_compacted_and_reads_the_same_afterwards() {
    let app = spawn_app().await;
    let id = lossy_call(&app).await;
    let before = app.call(&id).await;
    let audio_before = common::audio::load(&app.env.pool, &key(&id)).await.unwrap();
    let bytes_before = common::audio::size_bytes(&app.env.pool, &key(&id))
        .await
        .unwrap();
    // A completed call is not final: it keeps its rows.
    assert_eq!(app.stored_packets(&id).await.len(), 5);

    finish(&app.env.pool, &id, CallState::Archived).await;
    wait_compacted(&app, &id).await;

    assert_eq!(app.stored_packets(&id).await, vec![], "the rows are gone");
    let (packets, received): (i32, String) =
        sqlx::query_as("SELECT packets, received::text FROM call_audio WHERE call_id = $1")
            .bind(key(&id))
            .fetch_one(&app.env.pool)
            .await
            .unwrap();
    assert_eq!((packets, received.as_str()), (5, "{[0,2),[3,5),[6,7)}"));
    // The read API's counts and missing ranges, and the audio, are what they were.
    let after = app.call(&id).await;
    for field in [
        "packets_received",
        "missing_packets",
        "missing",
        "total_packets",
    ] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert_eq!(
        after["missing"],
        json!([{"from": 2, "to": 2}, {"from": 5, "to": 5}, {"from": 7, "to": 7}])
    );
    let audio_after = common::audio::load(&app.env.pool, &key(&id)).await.unwrap();
    assert_eq!(audio_after, audio_before);
    assert!(!audio_after.unwrap().expired);
    assert_eq!(
        common::audio::size_bytes(&app.env.pool, &key(&id))
            .await
            .unwrap(),
        bytes_before
    );

    // A PBX retrying a packet of the compacted call still gets `duplicate` (the stored copy is
    // cut out of the record), different data under its sequence still a conflict, and a
    // sequence never received still a refusal: the call is over.
    let (status, body) = status_and_body(app.post_packet(&id, 4, "€uro").await).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("duplicate")),
        "{body}"
    );
    let (status, body) = status_and_body(app.post_packet(&id, 4, "other").await).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = status_and_body(app.post_packet(&id, 5, "late").await).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(common::audio::count_stored(&app.env.pool).await.unwrap(), 5);
}

#[tokio::test]
async fn only_final_calls_are_compacted_and_a_failed_one_too() {
    let app = spawn_app().await;
    let streaming = format!("life-{}", random_suffix());
    assert_eq!(app.post_packet(&streaming, 0, "a").await.status(), 202);
    let completed = lossy_call(&app).await;
    let failed = lossy_call(&app).await;
    finish(&app.env.pool, &failed, CallState::Failed).await;

    wait_compacted(&app, &failed).await;
    // One more full pass, to be sure the compactor saw the others and left them.
    ingest::compactor::compact_once(&app.env.pool, None, &[])
        .await
        .unwrap();
    assert_eq!(app.stored_packets(&streaming).await.len(), 1);
    assert_eq!(app.stored_packets(&completed).await.len(), 5);
    assert_eq!(app.stored_packets(&failed).await, vec![]);
    let uncompacted = app
        .count("SELECT count(*) FROM calls WHERE audio_compacted_at IS NULL")
        .await;
    assert_eq!(uncompacted, 2);
}

/// The test's retention policy, on day-wide partitions.
fn policy(audio_days: Option<f64>, call_days: Option<f64>) -> Policy {
    let days = |d: f64| Duration::from_secs_f64(d * 86_400.0);
    Policy {
        interval: Duration::from_secs(86_400),
        audio_retention: match (audio_days, call_days) {
            (Some(a), Some(c)) => Some(days(a.min(c))),
            (a, c) => a.or(c).map(days),
        },
        call_retention: call_days.map(days),
        grace: sweeper::PACKETS_GRACE,
    }
}

/// One sweeper pass as of `now` (the service's own sweeper may be mid-pass: try again).
async fn sweep(pool: &PgPool, policy: Policy, now: OffsetDateTime) -> sweeper::Swept {
    eventually("a sweeper pass", Duration::from_secs(20), || async {
        sweeper::sweep(pool, policy, now).await.unwrap()
    })
    .await
}

async fn partition_names(pool: &PgPool, table: &str) -> Vec<String> {
    let mut conn = pool.acquire().await.unwrap();
    partitions::list(&mut conn, table)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

#[tokio::test]
async fn partitions_are_added_ahead_and_kept_while_they_hold_anything() {
    let app = spawn_app().await;
    let pool = &app.env.pool;
    let id = lossy_call(&app).await;
    // "Today" is the day the call began on, by the database's clock.
    let now = call_created_at(pool, &id).await;
    let day = Duration::from_secs(86_400);
    let today = partitions::floor(now, day);
    // At start-up, ingest made sure the next three days have partitions, for both tables.
    for table in partitions::TABLES {
        let mut conn = pool.acquire().await.unwrap();
        let list = partitions::list(&mut conn, table).await.unwrap();
        let newest = list.iter().map(|p| p.upper).max().unwrap();
        assert!(newest > now + day * 3, "{table}: {list:?}");
        assert!(
            list.iter()
                .any(|p| p.lower == today && p.upper == today + day)
        );
    }

    // Ten days on: partitions up to thirteen days ahead exist, today's packets partition is
    // kept while its call is not compacted, and dropped once it is; no audio is dropped (no
    // retention).
    let later = now + day * 10;
    let swept = sweep(pool, policy(None, None), later).await;
    let packets_today = format!("packets_p{}_000000", yyyymmdd(today));
    assert!(
        partition_names(pool, "packets")
            .await
            .contains(&packets_today),
        "the uncompacted call keeps its partition"
    );
    let newest = partition_names(pool, "packets").await.pop().unwrap();
    assert_eq!(
        newest,
        format!(
            "packets_p{}_000000",
            yyyymmdd(partitions::floor(later + day * 3, day))
        )
    );
    // From the day of ten minutes before `later` to three days past it, for both tables (the
    // days between are in the past by then: no call can begin in them any more).
    let first = partitions::floor(later - partitions::BEHIND, day);
    let days = ((partitions::floor(later + day * 3, day) - first).whole_days() + 1) as usize;
    assert_eq!(swept.added.len(), 2 * days, "{:?}", swept.added);

    finish(pool, &id, CallState::Archived).await;
    wait_compacted(&app, &id).await;
    // What a drop interrupted between its DETACH and its DROP leaves: dropped next pass.
    sqlx::query("CREATE TABLE packets_p20200101_000000 (LIKE packets)")
        .execute(pool)
        .await
        .unwrap();
    let swept = sweep(pool, policy(None, None), later).await;
    let names: Vec<_> = swept.dropped.iter().map(|d| d.name.as_str()).collect();
    assert!(names.contains(&packets_today.as_str()), "{names:?}");
    assert!(names.contains(&"packets_p20200101_000000"), "{names:?}");
    assert!(
        names.iter().all(|n| n.starts_with("packets_")),
        "no audio dropped: {names:?}"
    );
    assert!(
        !partition_names(pool, "packets")
            .await
            .contains(&packets_today)
    );
    // The call reads as before: its audio is in its record.
    let audio = common::audio::load(pool, &key(&id)).await.unwrap().unwrap();
    assert_eq!(audio.packets.len(), 5);
    assert!(!audio.expired);
}

/// When the call began, by the database's clock (what its partitions are filed by).
async fn call_created_at(pool: &PgPool, id: &str) -> OffsetDateTime {
    sqlx::query_scalar("SELECT created_at FROM calls WHERE call_id = $1")
        .bind(key(id))
        .fetch_one(pool)
        .await
        .unwrap()
}

fn yyyymmdd(at: OffsetDateTime) -> String {
    format!("{:04}{:02}{:02}", at.year(), u8::from(at.month()), at.day())
}

#[tokio::test]
async fn retention_removes_exactly_the_audio_and_calls_past_it() {
    let app = spawn_app().await;
    let pool = &app.env.pool;
    let archived = lossy_call(&app).await;
    let now = call_created_at(pool, &archived).await;
    let day = Duration::from_secs(86_400);
    let tomorrow = partitions::floor(now, day) + day;
    finish(pool, &archived, CallState::Archived).await;
    let streaming = format!("life-{}", random_suffix());
    assert_eq!(
        app.post_packet(&streaming, 0, "still here").await.status(),
        202
    );
    wait_compacted(&app, &archived).await;
    let policy = policy(Some(1.0), Some(2.0));
    let calls_left = || async {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT split_part(call_id, '.', 2) FROM calls ORDER BY call_id")
                .fetch_all(pool)
                .await
                .unwrap();
        ids
    };
    let mut both = vec![archived.clone(), streaming.clone()];
    both.sort();

    // A day of audio retention: the audio stays until its whole partition (today) is a day
    // old...
    let audio_today = format!("call_audio_p{}_000000", yyyymmdd(tomorrow - day));
    let swept = sweep(pool, policy, tomorrow + day - Duration::from_secs(60)).await;
    assert!(
        swept.dropped.iter().all(|d| d.name != audio_today),
        "{:?}",
        swept.dropped
    );
    assert!(
        !common::audio::load(pool, &key(&archived))
            .await
            .unwrap()
            .unwrap()
            .expired
    );
    // ...and goes once it is: the call is still there, its audio marked expired.
    let swept = sweep(pool, policy, tomorrow + day + Duration::from_secs(1)).await;
    let dropped: Vec<_> = swept
        .dropped
        .iter()
        .map(|d| (d.name.as_str(), d.rows))
        .collect();
    assert!(dropped.contains(&(audio_today.as_str(), 1)), "{dropped:?}");
    let audio = common::audio::load(pool, &key(&archived))
        .await
        .unwrap()
        .unwrap();
    assert!(audio.expired && audio.packets.is_empty());
    assert_eq!(app.call(&archived).await["packets_received"], 5);
    // The streaming call's packets are in today's packets partition, as old: a call not
    // final keeps its rows (and their partition) however old it is.
    assert_eq!(app.stored_packets(&streaming).await.len(), 1);
    assert_eq!(calls_left().await, both);

    // Two days of call retention: a final call stays until it is two days old, then goes
    // with its history; a call still streaming is never deleted.
    let swept = sweep(pool, policy, now + day * 2 - Duration::from_secs(60)).await;
    assert_eq!(swept.calls_deleted, 0);
    assert_eq!(calls_left().await, both);
    let swept = sweep(pool, policy, now + day * 2 + Duration::from_secs(60)).await;
    assert_eq!(swept.calls_deleted, 1);
    assert_eq!(calls_left().await, vec![streaming.clone()]);
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM call_transitions WHERE call_id = $1")
            .bind(key(&archived))
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(history, 0);
    assert_eq!(app.get(&format!("/v1/call/{archived}")).await.status(), 404);
    assert_eq!(app.stored_packets(&streaming).await.len(), 1);
}

#[tokio::test]
async fn a_final_call_past_the_audio_retention_loses_its_rows_without_a_record() {
    // AUDIO_COMPACTION=false: the service's compactor leaves the calls to this test's passes
    // (had it run, the pass below would find nothing to do).
    let app = spawn_app_with(TestEnv::new().await, |c| c.audio_compaction = false).await;
    let pool = &app.env.pool;
    let old = lossy_call(&app).await;
    finish(pool, &old, CallState::Failed).await;
    let young = lossy_call(&app).await;
    finish(pool, &young, CallState::Archived).await;
    // Retention of zero: every call so far began before the cutoff.
    let done = ingest::compactor::compact_once(pool, Some(Duration::ZERO), &[])
        .await
        .unwrap();
    assert_eq!((done.calls, done.expired, done.expired_packets), (2, 2, 10));
    assert_eq!(done.packets, 0);
    for id in [&old, &young] {
        assert_eq!(app.stored_packets(id).await, vec![]);
        let audio = common::audio::load(pool, &key(id)).await.unwrap().unwrap();
        assert!(audio.expired, "{id}");
        assert_eq!(app.call(id).await["packets_received"], 5);
    }
    assert_eq!(app.count("SELECT count(*) FROM call_audio").await, 0);
}
