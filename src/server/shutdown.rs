//! Graceful shutdown, one pattern for every listener and background task: the trigger
//! (an OS signal, or whatever the caller of `run` chooses) → each listener's health turns
//! NOT_SERVING → listeners stop accepting → in-flight work drains within a grace period.
//! [`Shutdown`] is the trigger and the set of tasks it drains; a [`Signal`] is what each task
//! waits on. Depends on nothing in the crate.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Owns every task of a running keygate and stops them together.
pub struct Shutdown {
    notify: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// Tells a task that shutdown has begun. Cheap to clone; one per task.
#[derive(Clone)]
pub struct Signal(watch::Receiver<bool>);

impl Signal {
    /// Resolves once shutdown has begun (at once if it already has, or if the
    /// [`Shutdown`] is gone).
    pub fn recv(&self) -> impl Future<Output = ()> + Send + 'static + use<> {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|begun| *begun).await;
        }
    }
}

impl Shutdown {
    /// In-flight work gets `grace` to finish once shutdown begins.
    pub fn new(grace: Duration) -> Self {
        Shutdown {
            notify: watch::channel(false).0,
            tasks: Vec::new(),
            grace,
        }
    }

    pub fn signal(&self) -> Signal {
        Signal(self.notify.subscribe())
    }

    /// A future that resolves once shutdown has begun.
    pub fn recv(&self) -> impl Future<Output = ()> + Send + 'static + use<> {
        self.signal().recv()
    }

    /// Spawns `task`; [`Shutdown::drain`] waits for it.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Begins shutdown and waits for every task to finish, at most the grace period.
    pub async fn drain(self) {
        self.notify.send_replace(true);
        let drain = futures::future::join_all(self.tasks);
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "in-flight requests did not finish within the grace period");
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_stops_every_task_and_gives_up_after_the_grace_period() {
        let mut shutdown = Shutdown::new(Duration::from_secs(10));
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..3 {
            let stop = shutdown.recv();
            let tx = done_tx.clone();
            shutdown.spawn(async move {
                stop.await;
                let _ = tx.send(());
            });
        }
        // A task that ignores the signal is waited for only the grace period.
        shutdown.spawn(std::future::pending());
        let started = tokio::time::Instant::now();
        let late = shutdown.signal();
        shutdown.drain().await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        for _ in 0..3 {
            done.try_recv().expect("each task saw the signal");
        }
        // A signal taken before the drain resolves after it too.
        late.recv().await;
    }
}
