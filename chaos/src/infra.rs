//! The servers the faults are played on: a Postgres cluster and a `nats-server -js` of the
//! run's own, on free ports under `.run/chaos/`, so that stopping them never touches the
//! machine's shared instances. Both are driven with their own tools (`pg_ctl`, signals), as an
//! operator's outage would be.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(port: u16, what: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not accept connections on port {port} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A Postgres cluster of the run's own (fsync on: an immediate stop must be survived the way
/// production survives it).
pub struct Postgres {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Postgres {
    pub fn create(root: &Path) -> anyhow::Result<Self> {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .context("Postgres server binaries not found under /usr/lib/postgresql (apt-get install postgresql)")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql/*/bin")?;
        let dir = root.join("postgres");
        let pg = Self {
            bindir,
            dir,
            port: free_port()?,
            as_postgres: running_as_root(),
        };
        if pg.dir.exists() {
            // A run that was killed left its server running: stop it before its data goes.
            pg.stop();
            std::fs::remove_dir_all(&pg.dir)?;
        }
        std::fs::create_dir_all(&pg.dir)?;
        if pg.as_postgres {
            run(Command::new("chown").arg("postgres").arg(&pg.dir))?;
        }
        pg.tool("initdb")
            .arg("-D")
            .arg(pg.dir.join("data"))
            .args(["-U", "postgres", "--auth=trust"])
            .stdout(Stdio::null())
            .status()
            .context("initdb")?
            .success()
            .then_some(())
            .context("initdb failed")?;
        pg.start()?;
        Ok(pg)
    }

    fn tool(&self, name: &str) -> Command {
        let path = self.bindir.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400",
            self.port,
            self.dir.display()
        );
        run(self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-o", &options, "start"]))?;
        wait_for_port(self.port, "Postgres", Duration::from_secs(30))
    }

    /// `pg_ctl stop -m immediate`: every backend killed, no checkpoint; the next start
    /// replays the WAL (crash recovery).
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        run(self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"]))
    }

    pub fn stop(&self) {
        self.tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `nats-server -js` of the run's own: stopped with SIGTERM (as `systemctl stop` or a pod
/// deletion does) and started again on the same port and store.
pub struct Nats {
    port: u16,
    store: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
}

impl Nats {
    pub fn create(root: &Path) -> anyhow::Result<Self> {
        let store = root.join("nats");
        // A run that was killed left its server running: stop it before its store goes.
        if let Ok(pid) = std::fs::read_to_string(root.join("nats.pid")) {
            let pid = pid.trim();
            // Only if that process is still a nats-server on this store (pids are reused).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("nats-server") && cmdline.contains(&*store.to_string_lossy()) {
                signal(pid.parse()?, "KILL").ok();
            }
        }
        if store.exists() {
            std::fs::remove_dir_all(&store)?;
        }
        std::fs::create_dir_all(&store)?;
        let mut nats = Self {
            port: free_port()?,
            log: root.join("nats.log"),
            pid_file: root.join("nats.pid"),
            store,
            child: None,
        };
        nats.start()?;
        Ok(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("nats-server on PATH (apt-get install nats-server)")?;
        std::fs::write(&self.pid_file, child.id().to_string())?;
        self.child = Some(child);
        wait_for_port(self.port, "nats-server", Duration::from_secs(30))
    }

    /// SIGTERM, then waits for the process to end.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM")?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Sends a signal by name (`TERM`, `KILL`) with kill(1): no libc binding for one call.
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    run(Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
