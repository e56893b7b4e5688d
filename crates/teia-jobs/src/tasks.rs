//! The tasks an engine starts (its workers, the cluster's periodic duties, the `jobs`
//! streams it serves), owned in one [`JoinSet`] and stopped together by one
//! [`CancellationToken`].
//!
//! A task is started either *dropped at the stop* ([`TaskSet::spawn`]: it ends at its next
//! await once the stop is asked) or *finishing on its own* ([`TaskSet::spawn_finishing`]:
//! it watches [`TaskSet::stopping`] and ends its current work first, as a worker that must
//! not record the result of a module killed by the stop).
//!
//! **Bounds**: the set holds the tasks running now; finished ones are reaped each time one
//! is started, so serving many streams does not grow it. [`TaskSet::shutdown`] waits for
//! the tasks at most the grace it is given, then aborts those still running. A task started
//! after the stop was asked is not started.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use teia_node::sync::lock;

/// The engine's tasks and the token that stops them.
#[derive(Default)]
pub(crate) struct TaskSet {
    /// Cancelled once the stop is asked.
    stop: CancellationToken,
    /// The tasks running (and those finished since the last reaping).
    running: Mutex<JoinSet<()>>,
}

impl TaskSet {
    /// Whether the stop was asked.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Returns once the stop is asked.
    pub(crate) async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Starts `task`, dropped at its next await once the stop is asked; false (not
    /// started) when the stop was asked already.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> bool {
        let stop = self.stop.clone();
        self.spawn_finishing(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = task => {}
            }
        })
    }

    /// Starts `task`, which watches [`TaskSet::stopping`] and ends on its own; false (not
    /// started) when the stop was asked already.
    pub(crate) fn spawn_finishing(&self, task: impl Future<Output = ()> + Send + 'static) -> bool {
        let mut running = lock(&self.running);
        if self.stop.is_cancelled() {
            return false;
        }
        while running.try_join_next().is_some() {}
        running.spawn(task);
        true
    }

    /// Asks the stop: the tasks started with [`TaskSet::spawn`] end at their next await,
    /// the others when their current work is done.
    pub(crate) fn stop(&self) {
        let _running = lock(&self.running);
        self.stop.cancel();
    }

    /// Asks the stop, and waits up to `grace` for every task to end; those still running
    /// then are aborted (and waited for).
    pub(crate) async fn shutdown(&self, grace: Duration) {
        let mut running = {
            let mut running = lock(&self.running);
            self.stop.cancel();
            std::mem::take(&mut *running)
        };
        let joined = tokio::time::timeout(grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!(
                left = running.len(),
                "job engine tasks did not end within {grace:?}; aborted"
            );
            running.shutdown().await;
        }
    }
}
