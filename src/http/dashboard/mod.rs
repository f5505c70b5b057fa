//! The operator dashboard: server-rendered HTML on the same axum server as the API.
//!
//! - [`session`]: login sessions (kept on the server, named by signed cookies) and CSRF
//!   tokens; the extractors that require a login. [`store`]: their SQL.
//! - [`login`]: the login form and logout.
//! - [`runs`]: the runs list with its filters, counts and overview charts.
//! - [`run`]: a run's page, and the Retry and Cancel actions.
//! - [`schedules`]: the schedules page, and the Enable, Disable and Fire now actions.
//! - [`actions`]: every operator action across runs and schedules (the audit trail).
//! - [`bulk`]: bulk retry and cancel of the runs list's filter, previewed, then confirmed.
//! - [`waiting`]: the runs that wait (for a signal, a completion or time), overdue flagged.
//! - [`timeline`] and [`charts`]: SVG geometry computed from runs and their logs (pure).
//! - [`live`]: one LISTEN per process fanned out to pages as server-sent events.
//! - [`assets`]: the stylesheet and script, embedded in the binary.
//! - [`error`]: where the dashboard's errors become pages; [`format`]: text for people.
//!
//! Templates are `dashboard/templates/*.html`, compiled into the binary by askama, which
//! escapes everything they print. Pages carry a strict Content-Security-Policy (scripts and
//! styles from this origin only), so even a missed escape could not run a script.

pub mod actions;
pub mod assets;
pub mod bulk;
pub mod charts;
pub mod error;
pub mod format;
pub mod live;
pub mod login;
pub mod run;
pub mod runs;
pub mod schedules;
pub mod session;
pub mod store;
pub mod timeline;
pub mod waiting;
pub mod webhooks;
pub mod workflows;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};

use super::AppState;

/// What the dashboard's handlers share.
pub struct Dashboard {
    /// The application (engine, pool, tokens, shutdown).
    pub app: Arc<AppState>,
    /// Signs sessions and CSRF tokens.
    pub keys: session::Keys,
    /// Live updates.
    pub hub: live::Hub,
    /// Per-status counts of recent list filters (see [`runs::COUNT_CACHE`]).
    pub counts: TtlCache<runs::CountKey, Vec<(crate::engine::RunStatus, i64)>>,
    /// The overview of the last hour (see [`charts::OVERVIEW_CACHE`]).
    pub overview: TtlCache<(), Arc<charts::Overview>>,
}

/// The dashboard's routes, ready to be merged into [`crate::http::app`].
pub fn router(app: Arc<AppState>) -> Router<Arc<AppState>> {
    let dashboard = Arc::new(Dashboard {
        keys: session::Keys::new(&app.tokens, &app.dashboard_secret),
        hub: live::Hub::new(app.pool.clone(), app.shutdown.clone()),
        counts: TtlCache::new(runs::COUNT_CACHE, 64),
        overview: TtlCache::new(charts::OVERVIEW_CACHE, 1),
        app,
    });
    Router::new()
        .route("/", get(runs::page))
        .route("/login", get(login::form).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/logout-everywhere", post(login::logout_everywhere))
        .route("/runs/{id}", get(run::page))
        .route("/runs/{id}/retry", post(run::retry))
        .route("/runs/{id}/cancel", post(run::cancel))
        .route("/runs/{id}/pause", post(run::pause))
        .route("/runs/{id}/resume", post(run::resume))
        .route("/runs/{id}/restart", post(run::restart))
        .route("/runs/{id}/steps/{step}/resolve", post(run::resolve))
        .route("/schedules", get(schedules::page))
        .route("/workflows", get(workflows::page))
        .route("/workflows/{name}/pause", post(workflows::pause))
        .route("/workflows/{name}/resume", post(workflows::resume))
        .route("/waiting", get(waiting::page))
        .route("/actions", get(actions::page))
        .route("/webhooks", get(webhooks::page))
        .route("/webhooks/{name}/test", post(webhooks::test))
        .route("/webhooks/{name}/deliveries/{id}/redeliver", post(webhooks::redeliver))
        .route("/bulk", post(bulk::preview))
        .route("/bulk/confirm", post(bulk::confirm))
        .route("/schedules/{name}/enable", post(schedules::enable))
        .route("/schedules/{name}/disable", post(schedules::disable))
        .route("/schedules/{name}/fire", post(schedules::fire))
        .route("/live/changes", get(live::changes))
        .route("/static/{*file}", get(assets::serve))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(dashboard)
}

/// What browsers may do with the dashboard's pages: scripts, styles and images from this
/// origin only, no framing, forms posting here only, nothing sniffed, pages not cached.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name: HeaderName, value: &'static str| {
        headers.entry(name).or_insert_with(|| HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "same-origin");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::CACHE_CONTROL, "no-store");
    response
}

/// A small map whose entries expire: what keeps repeated expensive reads (counts, the
/// overview) to one per period per instance, however many pages refresh.
pub struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// A cache keeping values for `ttl`, with room for `capacity` keys.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The value of `key` if it is fresh.
    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    /// Stores a value (dropping expired entries, or everything when full of fresh ones).
    pub fn put(&self, key: K, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_values_expire_and_the_cache_stays_bounded() {
        let cache = TtlCache::new(Duration::from_millis(30), 2);
        cache.put(1, "a");
        assert_eq!(cache.get(&1), Some("a"));
        cache.put(2, "b");
        cache.put(3, "c");
        assert!(cache.entries.lock().expect("lock").len() <= 2);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&3), None);
    }
}
