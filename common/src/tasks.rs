//! The background tasks a service cannot work without (ingest's packet writer, outbox relay
//! and idle reaper; the transcriber's worker; the notifier's followers). If one of them ends
//! before shutdown, returns an error or panics, the process must not stay up looking healthy
//! while doing nothing: `/readyz` turns 503 naming the task, the root shutdown token fires,
//! and the service's `run_until_stopped` returns the error, so the process exits non-zero and
//! the orchestrator restarts it.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
};

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::http::Check;

/// Whether every critical task is still running: shared with `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct TaskHealth {
    failure: Arc<Mutex<Option<String>>>,
}

impl TaskHealth {
    /// The readiness check `background_tasks`.
    pub fn check(&self) -> Check {
        let failure = self.failure.lock().expect("task health lock").clone();
        Check::new("background_tasks", failure.map_or(Ok(()), Err))
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("task health lock").clone()
    }

    fn record(&self, failure: String) {
        let mut slot = self.failure.lock().expect("task health lock");
        if slot.is_none() {
            *slot = Some(failure);
        }
    }
}

/// Spawns and watches a service's critical tasks.
pub struct CriticalTasks {
    health: TaskHealth,
    /// The service's root shutdown token: fired when a task fails.
    shutdown: CancellationToken,
    handles: Vec<JoinHandle<()>>,
}

impl CriticalTasks {
    pub fn new(health: TaskHealth, shutdown: CancellationToken) -> Self {
        Self {
            health,
            shutdown,
            handles: Vec::new(),
        }
    }

    /// Runs `task`. It is expected to run until shutdown; ending earlier is a failure.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (health, shutdown) = (self.health.clone(), self.shutdown.clone());
        self.handles.push(tokio::spawn(async move {
            let failure = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(Ok(())) if shutdown.is_cancelled() => return,
                Ok(Ok(())) => format!("{name} stopped on its own"),
                Ok(Err(e)) => format!("{name} failed: {e:#}"),
                Err(panic) => format!("{name} panicked: {}", panic_message(&*panic)),
            };
            tracing::error!(task = name, error.message = %failure, "a critical background task ended; stopping the service");
            metrics::counter!("switchboard_critical_task_failures_total", "task" => name)
                .increment(1);
            health.record(failure);
            shutdown.cancel();
        }));
    }

    /// Waits for every task; the first failure, if any, as an error.
    pub async fn join(self) -> anyhow::Result<()> {
        for handle in self.handles {
            handle.await.ok();
        }
        match self.health.failure() {
            Some(failure) => Err(anyhow::anyhow!(failure)),
            None => Ok(()),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Runs `pass` every `interval` (a late tick waits, ticks never pile up) until `shutdown` is
/// cancelled. A pass reports what it did itself: failures are its own to log, and the next
/// tick simply tries again. The loop of every periodic background job (outbox relay,
/// reconciler).
pub async fn every<F, Fut>(
    interval: std::time::Duration,
    shutdown: CancellationToken,
    mut pass: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        pass().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panicking_task_fails_readiness_stops_the_service_and_is_reported() {
        let health = TaskHealth::default();
        let shutdown = CancellationToken::new();
        let mut tasks = CriticalTasks::new(health.clone(), shutdown.clone());
        let stop = shutdown.clone();
        tasks.spawn("steady", async move {
            stop.cancelled().await;
            Ok(())
        });
        tasks.spawn("fragile", async { panic!("boom") });
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled())
            .await
            .expect("the failure fires the shutdown token");
        assert!(!health.check().ok);
        let error = tasks.join().await.unwrap_err().to_string();
        assert!(error.contains("fragile panicked: boom"), "{error}");
    }

    #[tokio::test]
    async fn a_task_that_ends_early_or_errs_is_a_failure_but_not_after_shutdown() {
        for (task, expected) in [
            (None, "quits stopped on its own"),
            (Some("no database"), "quits failed: no database"),
        ] {
            let health = TaskHealth::default();
            let shutdown = CancellationToken::new();
            let mut tasks = CriticalTasks::new(health.clone(), shutdown.clone());
            tasks.spawn("quits", async move {
                match task {
                    None => Ok(()),
                    Some(e) => Err(anyhow::anyhow!(e)),
                }
            });
            let error = tasks.join().await.unwrap_err().to_string();
            assert_eq!(error, expected);
            assert!(shutdown.is_cancelled());
            assert_eq!(health.check().error.as_deref(), Some(expected));
        }
        // Ending because the service is stopping is what tasks are meant to do.
        let health = TaskHealth::default();
        let shutdown = CancellationToken::new();
        let mut tasks = CriticalTasks::new(health.clone(), shutdown.clone());
        shutdown.cancel();
        tasks.spawn("polite", async { Ok(()) });
        tasks.join().await.unwrap();
        assert!(health.check().ok);
    }
}
