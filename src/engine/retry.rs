//! Retry policies: how many attempts a step (or its compensation) gets and how long to wait
//! between them.
//!
//! Delays are a pure function of the policy, the attempt number and a jitter sample, so the
//! state machine stays deterministic and tests need no clock. (Iterator-style backoff crates
//! keep their own random state and count attempts in memory; a durable retry must compute the
//! delay of attempt *n* from what was persisted, after any number of restarts.)

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often and how patiently a step or compensation is retried.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "duration_ms")]
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this.
    pub backoff_factor: f64,
    /// No delay is ever longer than this.
    #[serde(with = "duration_ms")]
    pub max_delay: Duration,
    /// Share of each delay that is randomized, 0.0..=1.0: the delay is drawn from
    /// `[base * (1 - jitter), base]`, so many runs failing together do not retry together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// Three attempts, 200 ms then 400 ms apart (less up to 20% jitter), never over 30 s.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_delay: Duration::from_millis(200),
            backoff_factor: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The default policy with `max_attempts` attempts.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            ..Self::default()
        }
    }

    /// Sets the delay before the second attempt.
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Sets the growth factor of successive delays.
    pub fn backoff_factor(mut self, factor: f64) -> Self {
        self.backoff_factor = factor.max(1.0);
        self
    }

    /// Sets the cap on any single delay.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Sets the randomized share of each delay (clamped to 0..=1).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// Whether another attempt is allowed after `attempts_made` attempts.
    pub fn allows_another(&self, attempts_made: u32) -> bool {
        attempts_made < self.max_attempts
    }

    /// The delay after failed attempt number `attempt` (1-based) before the next one.
    /// `jitter_sample` is a uniform sample from `[0, 1)`.
    pub fn delay_after(&self, attempt: u32, jitter_sample: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_delay.as_secs_f64() * self.backoff_factor.max(1.0).powi(exponent);
        let capped = base.min(self.max_delay.as_secs_f64());
        let sample = jitter_sample.clamp(0.0, 1.0);
        let jittered = capped * (1.0 - self.jitter.clamp(0.0, 1.0) * sample);
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_and_are_capped() {
        let policy = RetryPolicy::attempts(10)
            .initial_delay(Duration::from_millis(100))
            .backoff_factor(2.0)
            .max_delay(Duration::from_secs(1))
            .jitter(0.0);
        let delays: Vec<u128> = (1..=6).map(|a| policy.delay_after(a, 0.5).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_only_shortens_within_its_share() {
        let policy = RetryPolicy::default()
            .initial_delay(Duration::from_secs(1))
            .jitter(0.25);
        assert_eq!(policy.delay_after(1, 0.0), Duration::from_secs(1));
        assert_eq!(policy.delay_after(1, 1.0), Duration::from_millis(750));
        for i in 0..100 {
            let d = policy.delay_after(1, f64::from(i) / 100.0);
            assert!(d >= Duration::from_millis(750) && d <= Duration::from_secs(1), "{d:?}");
        }
    }

    #[test]
    fn attempts_budget() {
        let policy = RetryPolicy::attempts(3);
        assert!(policy.allows_another(1));
        assert!(policy.allows_another(2));
        assert!(!policy.allows_another(3));
        assert!(!RetryPolicy::none().allows_another(1));
        assert_eq!(RetryPolicy::attempts(0).max_attempts, 1);
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay_after(u32::MAX, 0.0), policy.max_delay);
    }
}
