//! Throttling of failed authentications per client address: after `max_failures` failed
//! bearer tokens or dashboard logins within `window`, the address is refused (429 with
//! `Retry-After`) for `window`, whatever it sends, the right token included, so guessing
//! online is slow and a success cannot be told apart while blocked.
//!
//! The count is per instance, kept in memory: behind a proxy every client shares the proxy's
//! address, and several instances each allow their own `max_failures`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How many failures an address may have, and for how long it is refused afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures within `window` that block an address.
    pub max_failures: u32,
    /// How long failures are counted, and how long a block lasts.
    pub window: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            max_failures: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// Which authentication failed (the metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// A bearer token on the API.
    Bearer,
    /// The dashboard's login form.
    Login,
}

impl AuthKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bearer => "bearer",
            Self::Login => "login",
        }
    }
}

/// Failed authentications counted per failure, and requests refused while blocked.
pub const AUTH_FAILURES: &str = "sagaflow_auth_failures_total";
/// Requests refused because their address is blocked.
pub const AUTH_THROTTLED: &str = "sagaflow_auth_throttled_total";

/// Addresses tracked at most: past it, addresses that are not blocked are forgotten first.
const CAPACITY: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

/// The failures of every address seen recently.
#[derive(Debug)]
pub struct AuthThrottle {
    config: ThrottleConfig,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl AuthThrottle {
    /// A throttle with these limits.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds until it may try again)` while `address` is blocked.
    pub fn check(&self, address: IpAddr, kind: AuthKind) -> Result<(), u64> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match entries.get(&address).and_then(|e| e.blocked_until) {
            Some(until) if until > now => {
                metrics::counter!(AUTH_THROTTLED, "kind" => kind.as_str()).increment(1);
                Err((until - now).as_secs().max(1))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication from `address`, blocking it once it reaches the limit.
    pub fn failed(&self, address: IpAddr, kind: AuthKind) {
        metrics::counter!(AUTH_FAILURES, "kind" => kind.as_str()).increment(1);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if entries.len() >= CAPACITY && !entries.contains_key(&address) {
            let window = self.config.window;
            entries.retain(|_, e| e.blocked_until.is_some_and(|u| u > now) || now - e.window_start < window);
            if entries.len() >= CAPACITY {
                entries.retain(|_, e| e.blocked_until.is_some_and(|u| u > now));
            }
        }
        let entry = entries.entry(address).or_insert(Entry {
            window_start: now,
            failures: 0,
            blocked_until: None,
        });
        if now - entry.window_start >= self.config.window {
            *entry = Entry {
                window_start: now,
                failures: 0,
                blocked_until: None,
            };
        }
        entry.failures += 1;
        if entry.failures >= self.config.max_failures && entry.blocked_until.is_none_or(|u| u <= now) {
            entry.blocked_until = Some(now + self.config.window);
            // The next failure after the block starts a new count.
            entry.window_start = now + self.config.window;
            entry.failures = 0;
            tracing::warn!(
                %address,
                kind = kind.as_str(),
                failures = self.config.max_failures,
                blocked_for_s = self.config.window.as_secs(),
                "too many failed authentications: address blocked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_address_is_blocked_at_the_limit_and_released_after_the_window() {
        let throttle = AuthThrottle::new(ThrottleConfig {
            max_failures: 3,
            window: Duration::from_secs(60),
        });
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().expect("ip"), "::1".parse().expect("ip"));
        for _ in 0..2 {
            throttle.failed(a, AuthKind::Bearer);
            assert_eq!(throttle.check(a, AuthKind::Bearer), Ok(()));
        }
        throttle.failed(a, AuthKind::Login);
        assert_eq!(throttle.check(a, AuthKind::Bearer), Err(60));
        // Others are not affected.
        assert_eq!(throttle.check(b, AuthKind::Bearer), Ok(()));
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(throttle.check(a, AuthKind::Login), Err(15));
        tokio::time::advance(Duration::from_secs(16)).await;
        assert_eq!(throttle.check(a, AuthKind::Bearer), Ok(()));
        // Failures spread wider than the window never block.
        for _ in 0..10 {
            throttle.failed(b, AuthKind::Bearer);
            throttle.failed(b, AuthKind::Bearer);
            tokio::time::advance(Duration::from_secs(61)).await;
            assert_eq!(throttle.check(b, AuthKind::Bearer), Ok(()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded() {
        let throttle = AuthThrottle::new(ThrottleConfig {
            max_failures: 2,
            window: Duration::from_secs(60),
        });
        let blocked: IpAddr = "10.0.0.1".parse().expect("ip");
        throttle.failed(blocked, AuthKind::Bearer);
        throttle.failed(blocked, AuthKind::Bearer);
        for i in 0..(CAPACITY as u32 + 500) {
            throttle.failed(
                IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i)),
                AuthKind::Bearer,
            );
        }
        let tracked = throttle.entries.lock().expect("lock").len();
        assert!(tracked <= CAPACITY, "{tracked}");
        // A blocked address is the last to be forgotten.
        assert!(throttle.check(blocked, AuthKind::Bearer).is_err());
    }
}
