//! The tasks the service starts, owned in one place so that shutdown stops them all: each
//! runs until it ends or the service's cancellation token fires, and [`Tasks::shutdown`]
//! cancels and joins them.
//!
//! Bounds: finished tasks are reaped at each start, so the set holds the tasks running
//! (bounded by the service's own limits: streams served, downloads, dial-backs); shutdown
//! waits at most its grace, then aborts what is left.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use teia_node::sync::lock;

/// The service's running tasks and the token that stops them.
pub(crate) struct Tasks {
    cancel: CancellationToken,
    running: Mutex<JoinSet<()>>,
}

impl Tasks {
    pub(crate) fn new() -> Self {
        Self {
            cancel: CancellationToken::new(),
            running: Mutex::new(JoinSet::new()),
        }
    }

    /// Starts `task`, to be stopped at shutdown; after shutdown, starts nothing.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let mut running = lock(&self.running);
        while running.try_join_next().is_some() {}
        if cancel.is_cancelled() {
            return;
        }
        running.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// Cancels every task and waits for them, `grace` at most; aborts those still running.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        self.cancel.cancel();
        let mut running = std::mem::take(&mut *lock(&self.running));
        let joined = tokio::time::timeout(grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!(
                left = running.len(),
                "file-sharing tasks aborted at shutdown"
            );
            running.abort_all();
            while running.join_next().await.is_some() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct OnDrop(Arc<AtomicUsize>);

    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn shutdown_stops_and_joins_every_task_and_starts_no_more() {
        let tasks = Tasks::new();
        let stopped = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            // Counted when the task's future is dropped, as cancellation does.
            let guard = OnDrop(Arc::clone(&stopped));
            tasks.spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        // Cancelled tasks end at once: a shutdown that had to wait out its grace (an hour)
        // would not end within the 30 s given.
        tokio::time::timeout(
            Duration::from_secs(30),
            tasks.shutdown(Duration::from_secs(3600)),
        )
        .await
        .expect("joined, not timed out");
        assert_eq!(stopped.load(Ordering::SeqCst), 10);
        tasks.spawn(async { panic!("started after shutdown") });
        assert!(lock(&tasks.running).is_empty());
    }
}
