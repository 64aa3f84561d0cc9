//! One scenario's Switchboard: its own database and subject prefix on the run's servers, the
//! three release binaries as separate processes (logs under `.run/chaos/<scenario>/`), and the
//! fake AI provider. Processes can be killed (SIGKILL), stopped (SIGTERM) and started again.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use wire::subjects::{Prefix, Subjects};

use crate::{ai::FakeAi, infra};

/// A service binary run as its own process.
pub struct Service {
    pub name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn new(name: &str, bin: PathBuf, env: Vec<(String, String)>, port: u16, dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            bin,
            env,
            port,
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Starts the process and waits until its `/readyz` answers 200.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited ({status}) before it was ready; see {}",
                    self.name,
                    self.log.display()
                );
            }
            let ready = client
                .get(format!("{}/readyz", self.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within {within:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9`: no shutdown, no flush.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait: the graceful stop an orchestrator does.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                infra::signal(pid, "TERM")?;
            }
            child.wait().await?;
        }
        Ok(())
    }

    /// Resident memory now and at its peak (`VmRSS`, `VmHWM`), in bytes.
    pub fn memory(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
                .map(|kib| kib * 1024)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }
}

/// What differs between scenarios' stacks.
pub struct StackOptions {
    pub transcribers: usize,
    pub notifier: bool,
    /// Extra settings for every service (later ones win).
    pub env: Vec<(&'static str, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            transcribers: 1,
            notifier: false,
            env: Vec::new(),
        }
    }
}

/// The tenant every scenario's calls belong to; services run with authentication on, as in
/// production, and the scenarios use an `admin` key of it.
pub const TENANT: &str = "chaos";

/// The stored key of the chaos tenant's call `call_id` (`chaos.<call_id>`).
pub fn key(call_id: &str) -> String {
    format!("{TENANT}.{call_id}")
}

pub struct Stack {
    /// An `admin` key of [`TENANT`], made once ingest has migrated the database.
    pub api_key: String,
    pub database: String,
    pub prefix: String,
    pub subjects: Subjects,
    pub pool: PgPool,
    pub nats_url: String,
    pub ingest: Service,
    pub transcribers: Vec<Service>,
    pub notifier: Option<Service>,
    pub ai: FakeAi,
}

pub struct Servers<'a> {
    pub bin_dir: &'a Path,
    pub run_dir: &'a Path,
    pub postgres: &'a infra::Postgres,
    pub nats_url: String,
}

impl Stack {
    /// Creates the scenario's database, then starts ingest (which migrates it), the
    /// transcribers and the notifier, each ready before the next.
    pub async fn start(
        ctx: &Servers<'_>,
        name: &str,
        options: StackOptions,
    ) -> anyhow::Result<Self> {
        let database = format!("chaos_{name}");
        let prefix = format!("chaos{name}");
        let admin = PgPool::connect(&ctx.postgres.url("postgres")).await?;
        let drop = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
        sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(&admin)
            .await?;
        let create = format!("CREATE DATABASE {database}");
        sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&admin)
            .await?;
        admin.close().await;
        let dir = ctx.run_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let ai = FakeAi::start().await?;
        let database_url = ctx.postgres.url(&database);

        let mut base: Vec<(String, String)> = [
            ("DATABASE_URL", database_url.clone()),
            ("NATS_URL", ctx.nats_url.clone()),
            ("SWITCHBOARD_PREFIX", prefix.clone()),
            ("RUST_LOG", "warn".to_owned()),
            // A call stalled by a fault must not be completed by the idle reaper while its
            // PBX is still retrying (the longest fault here is 30 s).
            ("CALL_IDLE_TIMEOUT_SECS", "120".to_owned()),
            ("AI_PROVIDER", "openai".to_owned()),
            ("AI_BASE_URL", ai.base_url()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        base.extend(
            options
                .env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        let with = |pairs: &[(&str, String)]| {
            let mut env = base.clone();
            env.extend(pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            env
        };

        let port = infra::free_port()?;
        let mut ingest = Service::new(
            "ingest",
            ctx.bin_dir.join("ingest"),
            with(&[("INGEST_ADDR", format!("127.0.0.1:{port}"))]),
            port,
            &dir,
        );
        ingest.start().await?;
        let mut transcribers = Vec::new();
        for i in 0..options.transcribers {
            let port = infra::free_port()?;
            let mut t = Service::new(
                &format!("transcriber-{i}"),
                ctx.bin_dir.join("transcriber"),
                with(&[("TRANSCRIBER_ADDR", format!("127.0.0.1:{port}"))]),
                port,
                &dir,
            );
            t.start().await?;
            transcribers.push(t);
        }
        let notifier = if options.notifier {
            let port = infra::free_port()?;
            let mut n = Service::new(
                "notifier",
                ctx.bin_dir.join("notifier"),
                with(&[
                    ("NOTIFIER_ADDR", format!("127.0.0.1:{port}")),
                    ("NOTIFIER_INGEST_URL", ingest.url()),
                ]),
                port,
                &dir,
            );
            n.start().await?;
            Some(n)
        } else {
            None
        };
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url)
            .await?;
        let subjects = Subjects::new(prefix.parse::<Prefix>().map_err(anyhow::Error::msg)?);
        let tenant = common::TenantId::parse(TENANT).map_err(anyhow::Error::msg)?;
        let (_, api_key) = common::auth::create_key(&pool, &tenant, common::Role::Admin).await?;
        Ok(Self {
            api_key,
            database,
            prefix,
            subjects,
            pool,
            nats_url: ctx.nats_url.clone(),
            ingest,
            transcribers,
            notifier,
            ai,
        })
    }

    /// Stops every process and drops the scenario's database and streams.
    pub async fn stop(mut self, ctx: &Servers<'_>) -> anyhow::Result<()> {
        self.ingest.terminate().await.ok();
        for t in &mut self.transcribers {
            t.terminate().await.ok();
        }
        if let Some(n) = self.notifier.as_mut() {
            n.terminate().await.ok();
        }
        self.pool.close().await;
        let admin = PgPool::connect(&ctx.postgres.url("postgres")).await?;
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database);
        sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(&admin)
            .await?;
        admin.close().await;
        let js = common::nats::jetstream(
            common::nats::connect(&self.nats_url, "switchboard-chaos").await?,
        );
        for kind in wire::subjects::StreamKind::ALL {
            js.delete_stream(self.subjects.stream_name(kind)).await.ok();
        }
        Ok(())
    }
}
