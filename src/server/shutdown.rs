//! Graceful shutdown, one pattern for every listener and background task: the trigger
//! (an OS signal, or whatever the caller of `run` chooses) → each listener's health turns
//! NOT_SERVING → listeners stop accepting → in-flight work drains within a grace period → the
//! tasks that must come after it (the last usage report, which must carry what the drained
//! responses metered) run. [`Shutdown`] is the trigger and the set of tasks it drains; a
//! [`Signal`] is what each task waits on. Depends on nothing in the crate.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Owns every task of a running keygate and stops them together.
pub struct Shutdown {
    notify: watch::Sender<bool>,
    /// Set once the tasks of [`Shutdown::spawn`] have finished (or the grace period passed).
    drained: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Tasks of [`Shutdown::spawn_last`]: waited for after the others.
    last: Vec<JoinHandle<()>>,
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
            drained: watch::channel(false).0,
            tasks: Vec::new(),
            last: Vec::new(),
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

    /// A future that resolves once the in-flight work has drained: every task of
    /// [`Shutdown::spawn`] has finished, or the grace period has passed.
    pub fn drained(&self) -> impl Future<Output = ()> + Send + 'static + use<> {
        let mut rx = self.drained.subscribe();
        async move {
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    /// Spawns `task`; [`Shutdown::drain`] waits for it.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Spawns `task`, which [`Shutdown::drain`] waits for after the others, at most another
    /// grace period: for work that must see everything the in-flight requests did (it waits
    /// on [`Shutdown::drained`], not on the signal).
    pub fn spawn_last(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.last.push(tokio::spawn(task));
    }

    /// Begins shutdown and waits for every task to finish, at most the grace period; then for
    /// the tasks of [`Shutdown::spawn_last`], at most another.
    pub async fn drain(self) {
        self.notify.send_replace(true);
        let drain = futures::future::join_all(self.tasks);
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "in-flight requests did not finish within the grace period");
        }
        self.drained.send_replace(true);
        let last = futures::future::join_all(self.last);
        if tokio::time::timeout(self.grace, last).await.is_err() {
            tracing::warn!(grace = ?self.grace, "shutdown tasks did not finish within the grace period");
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

    #[tokio::test(start_paused = true)]
    async fn last_tasks_run_after_the_others_have_drained() {
        let mut shutdown = Shutdown::new(Duration::from_secs(10));
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, o) = (shutdown.recv(), order.clone());
        shutdown.spawn(async move {
            stop.await;
            // In-flight work that takes a while to drain.
            tokio::time::sleep(Duration::from_secs(3)).await;
            o.lock().unwrap().push("drained request");
        });
        let (drained, o) = (shutdown.drained(), order.clone());
        shutdown.spawn_last(async move {
            drained.await;
            o.lock().unwrap().push("last report");
        });
        let started = tokio::time::Instant::now();
        shutdown.drain().await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(*order.lock().unwrap(), ["drained request", "last report"]);
    }

    #[tokio::test(start_paused = true)]
    async fn last_tasks_run_even_when_the_drain_runs_out_of_grace() {
        let mut shutdown = Shutdown::new(Duration::from_secs(10));
        shutdown.spawn(std::future::pending());
        let (drained, (tx, mut ran)) = (shutdown.drained(), tokio::sync::oneshot::channel());
        shutdown.spawn_last(async move {
            drained.await;
            let _ = tx.send(tokio::time::Instant::now());
        });
        let started = tokio::time::Instant::now();
        shutdown.drain().await;
        let at = ran.try_recv().expect("the last task ran");
        assert_eq!(at - started, Duration::from_secs(10));
    }
}
