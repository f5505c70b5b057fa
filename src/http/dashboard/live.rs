//! Live updates: one connection per process LISTENing on [`changes::CHANNEL`] (runs) and
//! [`schedules::CHANNEL`] (schedule definitions), fanned out to every open page as
//! server-sent events.
//!
//! The engine announces changed run ids at most every 100 ms (see `engine::changes`), and
//! every change of a schedule (create, replace, enable, disable, delete) in its transaction;
//! the hub holds one dedicated connection (not from the pool) that listens, and a broadcast
//! channel hands each announcement to the pages' event streams. Each stream says `ready` once
//! the listener is up, then `changed` with the ids (or `schedules`, or `*`: refresh
//! everything; also sent when the listener reconnects or a slow page missed announcements).
//! Pages refetch themselves.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use futures::StreamExt;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Dashboard;
use super::error::PageError;
use super::session::Operator;
use crate::engine::changes;
use crate::engine::scheduler::store as schedules;
use crate::http::error::ApiError;
use crate::http::extract::Params;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These runs.
    Runs(Arc<[Uuid]>),
    /// A schedule's definition or state (its payload, the name, is not needed: the schedules
    /// page shows them all).
    Schedules,
    /// Possibly anything: refresh everything shown.
    All,
}

/// What a page shows, hence which changes it hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watcher {
    /// The runs list: any run.
    Runs,
    /// A run's page: that run.
    Run(Uuid),
    /// The schedules page: schedules, and any run (a tick or a fire-now starts one, and the
    /// latest runs' statuses are shown).
    Schedules,
}

impl Change {
    /// Reads a `sagaflow_changes` payload: a comma list of run ids, or `*`. Anything else is
    /// taken as "everything" (refreshing too much is harmless; missing a change is not).
    pub fn parse(payload: &str) -> Self {
        let ids: Option<Vec<Uuid>> = payload.split(',').map(|id| Uuid::parse_str(id.trim()).ok()).collect();
        match ids {
            Some(ids) if !ids.is_empty() && payload.trim() != "*" => Self::Runs(ids.into()),
            _ => Self::All,
        }
    }

    /// A notification on `channel`; schedules' payloads are names, read as "schedules".
    pub fn from_notification(channel: &str, payload: &str) -> Self {
        if channel == schedules::CHANNEL {
            Self::Schedules
        } else {
            Self::parse(payload)
        }
    }

    /// Whether a page showing what `watcher` watches must refresh.
    pub fn concerns(&self, watcher: Watcher) -> bool {
        match (self, watcher) {
            (Self::All, _) | (Self::Runs(_), Watcher::Runs | Watcher::Schedules) => true,
            (Self::Runs(ids), Watcher::Run(run)) => ids.contains(&run),
            (Self::Schedules, watcher) => watcher == Watcher::Schedules,
        }
    }

    /// The event's data: the ids, `schedules`, or `*`.
    fn data(&self) -> String {
        match self {
            Self::All => "*".into(),
            Self::Schedules => "schedules".into(),
            Self::Runs(ids) => ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

/// The process's one listener and its subscribers.
pub struct Hub {
    pool: PgPool,
    stop: CancellationToken,
    changes: broadcast::Sender<Change>,
    listening: watch::Sender<bool>,
    started: AtomicBool,
}

/// How long a new stream waits for the listener before answering anyway.
const READY_WAIT: Duration = Duration::from_secs(5);
/// Announcements a slow page may fall behind by before it is told to refresh everything.
const BACKLOG: usize = 256;

impl Hub {
    /// A hub listening on `pool`'s database once the first page subscribes, until `stop`.
    pub fn new(pool: PgPool, stop: CancellationToken) -> Self {
        Self {
            pool,
            stop,
            changes: broadcast::channel(BACKLOG).0,
            listening: watch::channel(false).0,
            started: AtomicBool::new(false),
        }
    }

    /// Subscribes to changes; returns once the listener is up (or after [`READY_WAIT`]), so
    /// that every change committed after this returns reaches the subscriber.
    pub async fn subscribe(&self) -> broadcast::Receiver<Change> {
        if !self.started.swap(true, Ordering::SeqCst) {
            tokio::spawn(listen(
                self.pool.clone(),
                self.changes.clone(),
                self.listening.clone(),
                self.stop.clone(),
            ));
        }
        let receiver = self.changes.subscribe();
        let mut listening = self.listening.subscribe();
        let _ = tokio::time::timeout(READY_WAIT, listening.wait_for(|up| *up)).await;
        receiver
    }
}

/// Listens until `stop`, reconnecting after failures; tells subscribers to refresh
/// everything whenever announcements may have been missed.
async fn listen(pool: PgPool, changes: broadcast::Sender<Change>, up: watch::Sender<bool>, stop: CancellationToken) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen_all([changes::CHANNEL, schedules::CHANNEL]).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let failure = match tokio::select! { _ = stop.cancelled() => return, c = connected => c } {
            Ok(mut listener) => {
                up.send_replace(true);
                let _ = changes.send(Change::All);
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = listener.try_recv() => next,
                    };
                    match next {
                        Ok(Some(notification)) => {
                            let change = Change::from_notification(notification.channel(), notification.payload());
                            let _ = changes.send(change);
                        }
                        // The connection was lost; the next call reconnects and listens again,
                        // but announcements in between are gone.
                        Ok(None) => {
                            let _ = changes.send(Change::All);
                        }
                        Err(e) => break e,
                    }
                }
            }
            Err(e) => e,
        };
        up.send_replace(false);
        tracing::warn!(error = %failure, "dashboard live updates: listening failed; retrying in 1 s");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// `GET /live/changes[?run=ID | ?view=schedules]`: server-sent events for a page (a run's page
/// passes its id and hears only about that run; the schedules page hears about schedules too).
pub async fn changes(
    _: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    params: Params,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, PageError> {
    let watcher = match (params.text("run", 100)?, params.text("view", 20)?.as_deref()) {
        (None, None) => Watcher::Runs,
        (None, Some("schedules")) => Watcher::Schedules,
        (None, Some(_)) => return Err(ApiError::invalid("view", "must be `schedules` (or absent: the runs)").into()),
        (Some(id), None) => {
            Watcher::Run(Uuid::parse_str(&id).map_err(|_| ApiError::invalid("run", "must be a run id (a UUID)"))?)
        }
        (Some(_), Some(_)) => return Err(ApiError::invalid("view", "cannot be given with `run`").into()),
    };
    let receiver = dashboard.hub.subscribe().await;
    let ready = futures::stream::once(async { Ok(Event::default().event("ready").data("listening")) });
    let updates = futures::stream::unfold(receiver, move |mut receiver| async move {
        loop {
            let change = match receiver.recv().await {
                Ok(change) => change,
                Err(broadcast::error::RecvError::Lagged(_)) => Change::All,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            if change.concerns(watcher) {
                // A run's page hears its own id only, not the runs announced with it.
                let data = match (watcher, &change) {
                    (Watcher::Run(run), Change::Runs(_)) => run.to_string(),
                    _ => change.data(),
                };
                let event = Event::default().event("changed").data(data);
                return Some((Ok(event), receiver));
            }
        }
    });
    let stop = dashboard.app.shutdown.clone();
    let stream = ready.chain(updates).take_until(stop.cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_read_leniently() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(Change::parse(&format!("{a},{b}")), Change::Runs(vec![a, b].into()));
        assert_eq!(Change::parse("*"), Change::All);
        assert_eq!(Change::parse(""), Change::All);
        assert_eq!(Change::parse(&format!("{a},garbage")), Change::All);
    }

    #[test]
    fn pages_hear_about_their_runs() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let change = Change::Runs(vec![a].into());
        assert!(change.concerns(Watcher::Runs));
        assert!(change.concerns(Watcher::Run(a)));
        assert!(!change.concerns(Watcher::Run(b)));
        assert!(change.concerns(Watcher::Schedules), "a schedule's run may have changed");
        assert!(Change::All.concerns(Watcher::Run(b)));
        assert_eq!(change.data(), a.to_string());
        assert_eq!(Change::All.data(), "*");
    }

    #[test]
    fn schedule_changes_reach_the_schedules_page_only() {
        let change = Change::from_notification(schedules::CHANNEL, "nightly");
        assert_eq!(change, Change::Schedules);
        assert!(change.concerns(Watcher::Schedules));
        assert!(!change.concerns(Watcher::Runs));
        assert!(!change.concerns(Watcher::Run(Uuid::now_v7())));
        assert_eq!(change.data(), "schedules");
        // The runs channel is read as before, whatever the payload.
        assert_eq!(Change::from_notification(changes::CHANNEL, "nightly"), Change::All);
    }
}
