//! Test helpers (feature `testing`): every test gets its own Postgres database and its own
//! NATS prefix (so its own subjects and streams), against the real servers named by
//! `DATABASE_URL` and `NATS_URL`. Tests therefore run in parallel without seeing each other.
//! Both are removed when the [`TestEnv`] is dropped, even if the test panicked.
//!
//! Each service crate has a `testing` module of its own (its feature `testing`) with the one
//! test configuration and the one way to start it, as a [`Running`]; every test that needs
//! that service, in any crate, starts it there.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{self, message::StreamMessage};
use rand::{Rng, distr::Alphanumeric};
use sqlx::PgPool;
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    CallId, CallKey, Role, TenantId, auth,
    config::{CommonConfig, LogFormat, StreamSettings},
    db, nats,
    subjects::{StreamKind, Subjects},
};

/// The tenant a test acts as unless it says otherwise.
pub const TEST_TENANT: &str = "acme";

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// `Authorization: Bearer <key>`, as default headers for an HTTP client.
pub fn bearer_headers(key: &str) -> axum::http::HeaderMap {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        axum::http::header::AUTHORIZATION,
        format!("Bearer {key}").parse().expect("a valid header"),
    );
    headers
}

/// One test's private database and NATS prefix.
pub struct TestEnv {
    pub config: CommonConfig,
    pub pool: PgPool,
    db_name: String,
    admin_url: String,
}

impl TestEnv {
    /// A fresh, migrated database `sb_test_<random>` and prefix `t<random>`, with streams
    /// provisioned.
    pub async fn new() -> Self {
        Self::with_nats_url(&std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.into()))
            .await
    }

    /// Like [`TestEnv::new`], against a NATS server of the test's own.
    pub async fn with_nats_url(nats_url: &str) -> Self {
        let base =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let suffix = random_suffix();
        let db_name = format!("sb_test_{suffix}");
        let config = CommonConfig {
            database_url: with_database(&base, &db_name),
            database_max_connections: 8,
            nats_url: nats_url.to_owned(),
            prefix: format!("t{suffix}").parse().expect("valid prefix"),
            log_format: LogFormat::Text,
            streams: StreamSettings::default(),
        };
        let pool = db::connect(&config.database_url, 8)
            .await
            .expect("test database: is Postgres running? (scripts/test starts it)");
        db::migrate(&pool).await.expect("migrations apply");
        let env = Self {
            admin_url: with_database(&base, "postgres"),
            config,
            pool,
            db_name,
        };
        let js = env.jetstream().await;
        nats::ensure_streams(&js, &env.subjects(), &env.config.streams)
            .await
            .expect("streams provisioned: is nats-server running with -js?");
        env
    }

    pub fn database_name(&self) -> &str {
        &self.db_name
    }

    /// [`TEST_TENANT`].
    pub fn tenant(&self) -> TenantId {
        TenantId::parse(TEST_TENANT).expect("a valid tenant")
    }

    /// The key `call_id` of [`TEST_TENANT`] is stored under (`acme.<call_id>`).
    pub fn key(&self, call_id: &str) -> CallKey {
        CallKey::new(
            self.tenant(),
            CallId::parse(call_id).expect("a valid call id"),
        )
    }

    /// A new API key of [`TEST_TENANT`] with `role`.
    pub async fn api_key(&self, role: Role) -> String {
        self.api_key_for(TEST_TENANT, role).await
    }

    /// A new API key of `tenant` (created if new) with `role`.
    pub async fn api_key_for(&self, tenant: &str, role: Role) -> String {
        let tenant = TenantId::parse(tenant).expect("a valid tenant");
        auth::create_key(&self.pool, &tenant, role)
            .await
            .expect("key created")
            .1
    }

    /// `Authorization: Bearer <a new key of TEST_TENANT with role>`, as default headers for a
    /// test's HTTP client.
    pub async fn auth_headers(&self, role: Role) -> axum::http::HeaderMap {
        bearer_headers(&self.api_key(role).await)
    }

    /// A pool on the server's maintenance database, for what a test does to its own
    /// database from outside (e.g. refusing connections to play an outage).
    pub async fn admin_pool(&self) -> PgPool {
        PgPool::connect(&self.admin_url)
            .await
            .expect("maintenance database")
    }

    pub fn subjects(&self) -> Subjects {
        Subjects::new(self.config.prefix.clone())
    }

    pub async fn nats(&self) -> async_nats::Client {
        nats::connect(&self.config.nats_url, "switchboard-test")
            .await
            .expect("NATS reachable")
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        nats::jetstream(self.nats().await)
    }

    /// Every message currently stored in one of this test's streams, oldest first.
    pub async fn stream_messages(&self, kind: StreamKind) -> Vec<StreamMessage> {
        let js = self.jetstream().await;
        let mut stream = js
            .get_stream(self.subjects().stream_name(kind))
            .await
            .expect("stream exists");
        let state = stream.info().await.expect("stream info").state.clone();
        let mut messages = Vec::new();
        if state.messages == 0 {
            return messages;
        }
        for seq in state.first_sequence..=state.last_sequence {
            // Gaps are messages removed by retention; skip them.
            if let Ok(message) = stream.get_raw_message(seq).await {
                messages.push(message);
            }
        }
        messages
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let db_name = self.db_name.clone();
        let nats_url = self.config.nats_url.clone();
        let subjects = self.subjects();
        // Drop cannot await; clean up on a thread with its own runtime and wait for it. The
        // pools stay alone: their sockets belong to the test's runtime, which is blocked
        // here. `DROP DATABASE .. WITH (FORCE)` ends their sessions from the server side.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(admin) = PgPool::connect(&admin_url).await {
                    let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&admin)
                        .await
                        .ok();
                    admin.close().await;
                }
                let connect = nats::connect(&nats_url, "switchboard-test-cleanup");
                if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), connect).await
                {
                    let js = nats::jetstream(client);
                    for kind in StreamKind::ALL {
                        js.delete_stream(subjects.stream_name(kind)).await.ok();
                    }
                }
            });
        });
        cleanup.join().ok();
    }
}

/// A service a test started, serving on 127.0.0.1 until [`Running::stop`], or until it is
/// dropped (which cancels it without waiting).
pub struct Running {
    pub name: &'static str,
    pub port: u16,
    /// Cancelling it is the SIGTERM of the service.
    pub shutdown: CancellationToken,
    /// The service's `run_until_stopped`; `None` once [`Running::stop`] has waited for it.
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Spawns `run` (a built app's `run_until_stopped`) with a fresh shutdown token.
    pub fn spawn<F>(name: &'static str, port: u16, run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(shutdown.clone()));
        Self {
            name,
            port,
            shutdown,
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the service as SIGTERM would and waits for it to exit cleanly; panics if it
    /// fails or takes longer than `within`. Returns how long it took.
    pub async fn stop(&mut self, within: Duration) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let name = self.name;
            tokio::time::timeout(within, task)
                .await
                .unwrap_or_else(|_| panic!("{name} stops within {within:?}"))
                .unwrap_or_else(|e| panic!("{name} panicked: {e}"))
                .unwrap_or_else(|e| panic!("{name} stops cleanly: {e:#}"));
        }
        started.elapsed()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ten random lowercase letters and digits.
pub fn random_suffix() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(10)
        .map(|c| (c as char).to_ascii_lowercase())
        .collect()
}

/// `url` with its database name replaced.
fn with_database(url: &str, db_name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db_name}?{q}"),
        None => format!("{root}/{db_name}"),
    }
}

/// A `nats-server -js` of the test's own, on a free port with its own store, that the test
/// can stop and start again (same port, same store) to play a NATS outage.
pub struct NatsServer {
    port: u16,
    store: std::path::PathBuf,
    child: Option<std::process::Child>,
    /// More arguments for `nats-server` (e.g. `--user`, `--pass`).
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`NatsServer::start`], with more arguments for `nats-server`.
    pub fn start_with(extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let store = std::env::temp_dir().join(format!("switchboard-nats-{}", random_suffix()));
        let mut server = Self {
            port,
            store,
            child: None,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.resume();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Starts it again on the same port and store, and waits until it accepts connections.
    pub fn resume(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on PATH (scripts/test installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.store).ok();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn with_database_replaces_only_the_database() {
        use super::with_database as w;
        assert_eq!(
            w("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(w("postgres://u@h", "x"), "postgres://u@h/x");
        assert_eq!(
            w("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
