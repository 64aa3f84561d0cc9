//! The Postgres pool and the one embedded migrator.

use std::time::Duration;

use anyhow::Context;
use sqlx::{
    AssertSqlSafe, Connection, PgConnection, PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// The schema, from `migrations/`, embedded in every binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How long a request waits for a free connection before it is answered 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to `url`, creating the database first if it does not exist.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = without_tls_on_loopback(
        url.parse()
            .context("DATABASE_URL is not a valid Postgres URL")?,
        url,
    );
    create_database_if_missing(&options).await?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", redact(url)))
}

/// No TLS to a Postgres on this machine unless `sslmode` asks for it. Without an `sslmode`,
/// Postgres clients `prefer` TLS, and Debian's Postgres offers it (`ssl = on`, a snakeoil
/// certificate): on loopback that encrypts nothing worth hiding and halved ingest's
/// throughput here (docs/benchmarks.md). Any other host keeps `prefer`; an explicit
/// `sslmode` (in the URL or `PGSSLMODE`) is always obeyed.
fn without_tls_on_loopback(options: PgConnectOptions, url: &str) -> PgConnectOptions {
    let loopback = matches!(options.get_host(), "127.0.0.1" | "localhost" | "::1")
        || options.get_host().starts_with('/');
    let asked = url.contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    if loopback && !asked {
        options.ssl_mode(sqlx::postgres::PgSslMode::Disable)
    } else {
        options
    }
}

/// Runs the pending migrations. sqlx holds a Postgres advisory lock while it does, so
/// replicas starting together take turns.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("running database migrations")
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .context("cannot connect to Postgres (maintenance database `postgres`) to check that the database exists")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(AssertSqlSafe(sql)).execute(&mut admin).await {
            Ok(_) => tracing::info!(db.name = %name, "created database"),
            // Another replica created it between our check and our CREATE.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating database {name:?}"));
            }
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tls_is_left_out_on_loopback_only_when_sslmode_does_not_ask_for_it() {
        use sqlx::postgres::{PgConnectOptions, PgSslMode};
        let mode = |url: &str| {
            let options: PgConnectOptions = url.parse().unwrap();
            format!(
                "{:?}",
                super::without_tls_on_loopback(options, url).get_ssl_mode()
            )
        };
        let disable = format!("{:?}", PgSslMode::Disable);
        assert_eq!(mode("postgres://u@127.0.0.1:5432/db"), disable);
        assert_eq!(mode("postgres://u@localhost/db"), disable);
        assert_ne!(mode("postgres://u@db.internal:5432/db"), disable);
        assert_eq!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            format!("{:?}", PgSslMode::Require)
        );
    }

    #[test]
    fn redact_hides_the_password() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://h/db"), "postgres://h/db");
    }
}
