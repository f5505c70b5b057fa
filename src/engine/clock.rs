//! The engine's clock: wall-clock time and sleeping until a wall-clock instant, behind a
//! trait so tests can move time by hours without waiting for it.
//!
//! Every time the engine decides a run is due (at its insert, at a retry's backoff, at a
//! release, an operator's wake or a recovery) is read from this clock, and claims compare
//! due times with it; schedules fire by it too. Leases are the exception: their expiry is
//! judged by the database's clock, the one clock every instance shares, since a takeover
//! decided on a skewed clock would run a step twice at once.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// Wall-clock time for the engine and its scheduler.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// Resolves once this clock reads `deadline` or later (possibly a little after).
    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()>;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let wait = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that stands still until told to move (for tests). Sleepers wake when it is moved
/// past their deadline.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
    moved: watch::Sender<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Mutex::new(start),
            moved: watch::Sender::new(start),
        }
    }

    /// Sets the time (it may go backwards, as a wall clock can).
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = to;
        self.moved.send_replace(to);
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let to = self.now() + chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.set(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let mut moved = self.moved.subscribe();
        Box::pin(async move {
            // Ends when the clock reaches the deadline; if the clock is dropped, never.
            if moved.wait_for(|now| *now >= deadline).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_moved_past_their_deadline() {
        let start = Utc::now();
        let clock = ManualClock::new(start);
        let sleep = clock.sleep_until(start + chrono::Duration::minutes(5));
        let waiter = tokio::spawn(sleep);
        clock.advance(Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "woke before its deadline");
        clock.advance(Duration::from_secs(240));
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woke at its deadline")
            .expect("no panic");
        assert_eq!(clock.now(), start + chrono::Duration::minutes(5));
    }

    #[tokio::test]
    async fn a_deadline_already_passed_resolves_at_once() {
        let clock = ManualClock::new(Utc::now());
        let past = clock.now() - chrono::Duration::seconds(1);
        tokio::time::timeout(Duration::from_secs(1), clock.sleep_until(past))
            .await
            .expect("resolved");
        tokio::time::timeout(
            Duration::from_secs(1),
            SystemClock.sleep_until(Utc::now() - chrono::Duration::seconds(1)),
        )
        .await
        .expect("resolved");
    }
}
