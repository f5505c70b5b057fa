//! The change feed: which runs changed, announced on the `sagaflow_changes` channel for live
//! views (the dashboard's server-sent events).
//!
//! A NOTIFY inside a step's transaction would serialize every commit on PostgreSQL's notify
//! queue lock, so the engine never notifies on the hot path. Changed run ids are collected in
//! memory and published in one NOTIFY (its own, tiny transaction) at most every
//! [`COALESCE`]; a view is at most that much behind.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The channel views LISTEN on. The payload is a comma list of run ids, or `*` when too many
/// runs changed to list (the view then refreshes everything).
pub const CHANNEL: &str = "sagaflow_changes";
/// How long changes are gathered before one notification carries them all.
pub const COALESCE: Duration = Duration::from_millis(100);
/// PostgreSQL's payload limit is 8000 bytes; stay well under it.
const MAX_PAYLOAD: usize = 7000;

/// Run ids that changed since the last publication.
#[derive(Default)]
pub(crate) struct ChangeFeed {
    pending: Mutex<HashSet<Uuid>>,
    wake: Notify,
}

impl ChangeFeed {
    /// Records that a run changed (cheap: a set insert).
    pub(crate) fn touch(&self, run: Uuid) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.insert(run) && pending.len() == 1 {
            self.wake.notify_one();
        }
    }

    fn take(&self) -> HashSet<Uuid> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Publishes gathered changes until `stop`, then once more.
    pub(crate) async fn publish(&self, pool: PgPool, stop: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = self.wake.notified() => false,
            };
            if !stopping {
                tokio::time::sleep(COALESCE).await;
            }
            let changed = self.take();
            if !changed.is_empty() {
                let payload = payload(&changed);
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(&payload)
                    .execute(&pool)
                    .await
                {
                    tracing::debug!(error = %e, "publishing run changes failed");
                }
            }
            if stopping {
                return;
            }
        }
    }
}

fn payload(changed: &HashSet<Uuid>) -> String {
    let list = changed.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",");
    if list.len() > MAX_PAYLOAD {
        "*".to_string()
    } else {
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_list_ids_or_say_everything() {
        let few: HashSet<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let text = payload(&few);
        assert_eq!(text.split(',').count(), 3);
        let many: HashSet<Uuid> = (0..500).map(|_| Uuid::now_v7()).collect();
        assert_eq!(payload(&many), "*");
    }

    #[test]
    fn touching_gathers_each_run_once() {
        let feed = ChangeFeed::default();
        let run = Uuid::now_v7();
        feed.touch(run);
        feed.touch(run);
        assert_eq!(feed.take().len(), 1);
        assert!(feed.take().is_empty());
    }
}
