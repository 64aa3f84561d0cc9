//! The time partitions of `packets` and `call_audio` (migration 8): listing them, adding
//! them ahead of time, and retiring old ones without ever making ingest wait.
//!
//! Both tables are partitioned by the call's creation time (`call_created_at`), in
//! partitions `PARTITION_INTERVAL_SECS` wide, aligned on the Unix epoch (so on UTC days when
//! the interval divides a day). A partition is added by the migration's
//! `switchboard_add_partition` (a table `LIKE` the parent, then `ATTACH PARTITION`: a SHARE
//! UPDATE EXCLUSIVE lock on the parent, which inserts do not wait for) and retired by
//! `DETACH PARTITION .. CONCURRENTLY` then `DROP TABLE` of the detached table (neither takes
//! a lock inserts wait for). Every DDL statement here runs with a short `lock_timeout`: a
//! pass that cannot get its lock at once gives up and tries again next time, rather than
//! queueing in front of ingest's statements.

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection};
use time::OffsetDateTime;

/// The partitioned tables.
pub const TABLES: [&str; 2] = ["packets", "call_audio"];

/// How long a DDL statement of this module waits for a lock before giving up.
const LOCK_TIMEOUT_MS: u64 = 200;

/// One partition: its table name and the range of `call_created_at` it holds `[lower, upper)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub lower: OffsetDateTime,
    pub upper: OffsetDateTime,
    /// A `DETACH .. CONCURRENTLY` was interrupted: the partition is half detached.
    pub detach_pending: bool,
}

/// The partitions of `table`, oldest first.
pub async fn list(conn: &mut PgConnection, table: &str) -> Result<Vec<Partition>, sqlx::Error> {
    let rows: Vec<(String, OffsetDateTime, OffsetDateTime, bool)> = sqlx::query_as(
        "SELECT c.relname::text, m[1]::timestamptz, m[2]::timestamptz, i.inhdetachpending \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid, \
              regexp_match(pg_get_expr(c.relpartbound, c.oid), \
                           'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS m \
         WHERE i.inhparent = $1::regclass ORDER BY 2",
    )
    .bind(table)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, lower, upper, detach_pending)| Partition {
            name,
            lower,
            upper,
            detach_pending,
        })
        .collect())
}

/// The start of the partition `at` falls in, for partitions `interval` wide.
pub fn floor(at: OffsetDateTime, interval: Duration) -> OffsetDateTime {
    let width = interval.as_secs().max(1) as i64;
    let secs = at.unix_timestamp().div_euclid(width) * width;
    OffsetDateTime::from_unix_timestamp(secs).expect("a floored timestamp is in range")
}

/// How far back [`add_ahead`] makes sure partitions exist: a transaction that began that long
/// ago may still be creating a call (a call's `created_at` is its transaction's start).
pub const BEHIND: Duration = Duration::from_secs(600);

/// Adds the partitions of every table so that `call_created_at` from [`BEHIND`] before `now`
/// up to `until` has one: from the end of the newest partition (or the start of the partition
/// of `now - BEHIND`, if that is later), `interval` wide. Returns the (table, partition) pairs
/// added.
pub async fn add_ahead(
    conn: &mut PgConnection,
    now: OffsetDateTime,
    until: OffsetDateTime,
    interval: Duration,
) -> Result<Vec<(&'static str, String)>, sqlx::Error> {
    let mut added = Vec::new();
    set_lock_timeout(conn).await?;
    let from = floor(now - BEHIND, interval);
    for table in TABLES {
        let existing = list(conn, table).await?;
        let mut lower = existing
            .iter()
            .map(|p| p.upper)
            .max()
            .filter(|newest| *newest > from)
            .unwrap_or(from);
        while lower <= until {
            let upper = floor(lower, interval) + interval;
            let name: Option<String> =
                sqlx::query_scalar("SELECT switchboard_add_partition($1, $2, $3)")
                    .bind(table)
                    .bind(lower)
                    .bind(upper)
                    .fetch_one(&mut *conn)
                    .await?;
            added.extend(name.map(|n| (table, n)));
            lower = upper;
        }
    }
    Ok(added)
}

/// What retiring one partition removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub table: &'static str,
    pub name: String,
    /// Live rows (exact for `call_audio`, whose rows are one small row per call; the
    /// planner's estimate for `packets`, not to scan a day of packets to count them).
    pub rows: u64,
    /// Its size on disk, indexes and TOAST included.
    pub bytes: u64,
}

/// How long `DETACH .. CONCURRENTLY` may wait for the transactions using the table to end. It
/// holds only a SHARE UPDATE EXCLUSIVE lock on the table while it waits, which inserts and
/// reads do not wait for, so it may wait long; with the short timeout of the other statements
/// it would give up whenever a compaction batch is running.
const DETACH_TIMEOUT_MS: u64 = 30_000;

/// Detaches the partition `partition` of `table` concurrently (or finishes an interrupted
/// detach), returning what it holds. Must run outside a transaction (`DETACH .. CONCURRENTLY`
/// cannot run in one). The detached table is then [`drop_detached`], or [`reattach`]ed.
pub async fn detach(
    conn: &mut PgConnection,
    table: &'static str,
    partition: &Partition,
) -> Result<Dropped, sqlx::Error> {
    set_lock_timeout(conn).await?;
    let name = &partition.name;
    let count = if table == "call_audio" {
        format!("SELECT count(*)::int8 FROM {}", quote(name))
    } else {
        format!(
            "SELECT GREATEST(reltuples, 0)::int8 FROM pg_class WHERE oid = '{}'::regclass",
            quote(name)
        )
    };
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(count))
        .fetch_one(&mut *conn)
        .await?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
        .bind(quote(name))
        .fetch_one(&mut *conn)
        .await?;
    let detach = if partition.detach_pending {
        "FINALIZE"
    } else {
        "CONCURRENTLY"
    };
    // Separate statements: several in one query string would run as one transaction block,
    // where `DETACH .. CONCURRENTLY` cannot run.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET lock_timeout = {DETACH_TIMEOUT_MS}"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER TABLE {} DETACH PARTITION {} {detach}",
        quote(table),
        quote(name)
    )))
    .execute(&mut *conn)
    .await?;
    set_lock_timeout(conn).await?;
    Ok(Dropped {
        table,
        name: name.clone(),
        rows: rows.max(0) as u64,
        bytes: bytes.max(0) as u64,
    })
}

/// Drops a table [`detach`] detached.
pub async fn drop_detached(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {}", quote(name))))
        .execute(conn)
        .await
        .map(drop)
}

/// Attaches a table [`detach`] detached back, with its bounds.
pub async fn reattach(
    conn: &mut PgConnection,
    table: &str,
    partition: &Partition,
) -> Result<(), sqlx::Error> {
    let (lower, upper) = (bound(partition.lower), bound(partition.upper));
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ('{lower}') TO ('{upper}')",
        quote(table),
        quote(&partition.name)
    )))
    .execute(conn)
    .await
    .map(drop)
}

/// A partition bound as a timestamp literal (RFC 3339, which Postgres reads).
fn bound(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("a partition bound formats")
}

/// Whether every table has a partition holding `at`.
pub async fn covered(conn: &mut PgConnection, at: OffsetDateTime) -> Result<bool, sqlx::Error> {
    for table in TABLES {
        if !list(conn, table)
            .await?
            .iter()
            .any(|p| p.lower <= at && at < p.upper && !p.detach_pending)
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Tables named like a partition that are no longer attached to their table: what a drop
/// interrupted between its `DETACH` and its `DROP` left behind (a detached partition is
/// always one being retired).
pub async fn orphans(conn: &mut PgConnection) -> Result<Vec<(&'static str, String)>, sqlx::Error> {
    let mut found = Vec::new();
    for table in TABLES {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema() \
             WHERE c.relkind = 'r' AND NOT c.relispartition \
               AND c.relname ~ ('^' || $1 || '_p[0-9]{8}_[0-9]{6}$')",
        )
        .bind(table)
        .fetch_all(&mut *conn)
        .await?;
        found.extend(names.into_iter().map(|n| (table, n)));
    }
    Ok(found)
}

/// Drops a table [`orphans`] found, returning its size.
pub async fn drop_orphan(conn: &mut PgConnection, name: &str) -> Result<u64, sqlx::Error> {
    set_lock_timeout(conn).await?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
        .bind(quote(name))
        .fetch_one(&mut *conn)
        .await?;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {}", quote(name))))
        .execute(&mut *conn)
        .await?;
    Ok(bytes.max(0) as u64)
}

/// The database's clock: partitions are filed by it (a call's `created_at` is Postgres's
/// `now()`), so their upkeep reads time from it too.
pub async fn database_now(conn: &mut PgConnection) -> Result<OffsetDateTime, sqlx::Error> {
    sqlx::query_scalar("SELECT now()").fetch_one(conn).await
}

/// Whether any call that began in `[lower, upper)` still has packet rows (is not compacted):
/// its packets partition must stay. Answered from the partial index of uncompacted calls.
pub async fn has_uncompacted_calls(
    conn: &mut PgConnection,
    lower: OffsetDateTime,
    upper: OffsetDateTime,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM calls WHERE audio_compacted_at IS NULL \
                        AND created_at >= $1 AND created_at < $2)",
    )
    .bind(lower)
    .bind(upper)
    .fetch_one(conn)
    .await
}

async fn set_lock_timeout(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET lock_timeout = {LOCK_TIMEOUT_MS}"
    )))
    .execute(conn)
    .await
    .map(drop)
}

/// A table name as an SQL identifier. The names here are ours (`<table>_p<digits>_<digits>`),
/// but quoting costs nothing.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    #[test]
    fn partitions_start_on_multiples_of_their_width() {
        let day = Duration::from_secs(86_400);
        // 2026-11-26 13:45:10 UTC: its day starts at midnight UTC, its minute at 13:45.
        assert_eq!(floor(at(1_795_700_710), day), at(1_795_651_200));
        assert_eq!(
            floor(at(1_795_700_710), Duration::from_secs(60)),
            at(1_795_700_700)
        );
        // Before the epoch too.
        assert_eq!(floor(at(-3_600), day), at(-86_400));
    }
}
