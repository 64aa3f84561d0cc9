//! What the end-to-end tests share: the real binaries started as OS processes against the
//! test's own database and prefix, the keys `pbx` is given, and waiting for readiness.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::testing::{TestEnv, eventually, random_suffix};

/// The workspace's binaries live next to this test's `deps/` folder.
pub fn binary(name: &str) -> PathBuf {
    if name == "pbx" {
        return PathBuf::from(env!("CARGO_BIN_EXE_pbx"));
    }
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --bins`; scripts/test does)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Service {
    pub name: &'static str,
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Service {
    pub fn start(
        name: &'static str,
        env: &TestEnv,
        extra: &[(&str, String)],
        log_dir: &std::path::Path,
    ) -> Self {
        Self::start_on(name, free_port(), env, extra, log_dir)
    }

    /// Starts `name` listening on `port` (a restart reuses its predecessor's).
    pub fn start_on(
        name: &'static str,
        port: u16,
        env: &TestEnv,
        extra: &[(&str, String)],
        log_dir: &std::path::Path,
    ) -> Self {
        let log = log_dir.join(format!("{name}-{}.log", random_suffix()));
        let mut command = Command::new(binary(name));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &env.config.database_url)
            .env("NATS_URL", &env.config.nats_url)
            .env("SWITCHBOARD_PREFIX", env.config.prefix.as_str())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env(
                format!("{}_ADDR", name.to_ascii_uppercase()),
                format!("127.0.0.1:{port}"),
            )
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit());
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        Service {
            name,
            child,
            port,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGTERM, then the time it took to exit and whether it exited cleanly.
    pub fn terminate(&mut self) -> (Duration, bool) {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {}", self.name);
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return (started.elapsed(), exit.success());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} ignored SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A test's own database and prefix, and a folder for its services' logs.
pub async fn test_env(test: &str) -> (TestEnv, PathBuf) {
    common::tls::install_crypto_provider();
    let env = TestEnv::new().await;
    let log_dir = std::env::temp_dir().join(format!("switchboard-{test}-{}", env.config.prefix));
    std::fs::create_dir_all(&log_dir).unwrap();
    (env, log_dir)
}

/// A `pbx` and a `supervisor` key of the test tenant: what `pbx` is given, as an operator
/// would give it (`PBX_API_KEY`, `PBX_SUPERVISOR_KEY`).
pub struct Keys {
    pub pbx: String,
    pub supervisor: String,
}

pub async fn keys(env: &TestEnv) -> Keys {
    Keys {
        pbx: env.api_key(common::Role::Pbx).await,
        supervisor: env.api_key(common::Role::Supervisor).await,
    }
}

/// The `pbx` command with the test's keys in its environment.
pub fn pbx(keys: &Keys) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("pbx"));
    command
        .env("PBX_API_KEY", &keys.pbx)
        .env("PBX_SUPERVISOR_KEY", &keys.supervisor);
    command
}

/// An HTTP client sending `key`, as a PBX would.
pub fn authorized(key: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(common::testing::bearer_headers(key))
        .build()
        .unwrap()
}

pub async fn wait_ready(service: &Service, client: &reqwest::Client) {
    eventually(
        &format!("{} to be ready", service.name),
        Duration::from_secs(60),
        || async {
            let ready = client.get(format!("{}/readyz", service.url())).send().await;
            ready.is_ok_and(|r| r.status() == 200).then_some(())
        },
    )
    .await;
}
