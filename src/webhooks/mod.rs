//! Outbound webhooks (DESIGN.md §10): admins subscribe a URL to run outcomes
//! (`run.completed`, `run.compensated`, `run.cancelled`, `run.failed`, `run.wait_overdue`) and
//! to released outbox events (`event.<name>`), optionally for some workflows only.
//!
//! - A delivery is written by a database trigger in the transaction of the change it reports
//!   (`migrations/0014_webhooks.sql`): it exists exactly when that change committed, whatever
//!   path made it, and the engine's hot path does not know webhooks exist.
//! - [`Webhooks::start`] runs the delivery worker of this instance (every instance runs one):
//!   it claims due deliveries with `SKIP LOCKED`, in order per run, signs each as Standard
//!   Webhooks with its stable `webhook-id`, and retries a refused one with backoff until its
//!   retry window ends, then marks it `failed` (dashboard and metrics).
//! - `run.wait_overdue` is the one delivery that reports no change but the lack of one: the
//!   worker looks, every few seconds, for waits past their deadline that no worker ended.
//!
//! All SQL is in [`store`].

pub mod store;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::defined::Vars;
use crate::engine::RetryPolicy;
use crate::signing;

pub use store::Delivery;

/// The run outcomes a subscription may ask for (besides `event.<name>`).
pub const RUN_EVENTS: [&str; 5] = [
    "run.completed",
    "run.compensated",
    "run.cancelled",
    "run.failed",
    "run.wait_overdue",
];

/// The most deliveries a list answers.
pub const MAX_LISTED: i64 = 200;

/// Metric names.
pub mod metrics_names {
    /// Delivery attempts by subscription and outcome (`delivered`, `retry`, `failed`).
    pub const DELIVERIES: &str = "sagaflow_webhook_deliveries_total";
}

db_enum! {
/// Where a delivery is.
#[derive(utoipa::ToSchema)]
pub enum DeliveryStatus in "webhook_delivery_status" {
    /// Not accepted yet: due at `next_attempt_at`.
    Pending = "pending",
    /// The receiver answered 2xx.
    Delivered = "delivered",
    /// Its retry window ended without a 2xx: redeliver it by hand.
    Failed = "failed",
}
}

/// A subscription as an admin sends it (`POST /v1/webhooks`, `PUT /v1/webhooks/{name}`).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionBody {
    /// 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit (optional in a PUT: the
    /// path names it).
    #[serde(default)]
    pub name: Option<String>,
    /// Where deliveries are POSTed: `https`, or `http` to loopback (or anywhere with
    /// `--allow-http-endpoints`).
    pub url: String,
    /// What it receives: some of [`RUN_EVENTS`], and `event.<name>` for released outbox
    /// events (e.g. `event.customer.created`).
    pub events: Vec<String>,
    /// Only runs of these workflows (and events of their runs); every workflow when absent.
    #[serde(default)]
    pub workflows: Option<Vec<String>>,
    /// The environment variable holding the Standard Webhooks secret (`whsec_` and base64).
    pub secret_env: String,
    /// Whether deliveries are made (default true). A disabled subscription gets no new
    /// deliveries; its pending ones wait.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

/// A checked subscription, ready to store.
#[derive(Debug, Clone)]
pub(crate) struct NewSubscription {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) events: Vec<String>,
    pub(crate) workflows: Option<Vec<String>>,
    pub(crate) secret_env: String,
    pub(crate) enabled: bool,
}

/// A stored subscription.
#[derive(Debug, Clone, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct Subscription {
    /// Its name.
    pub name: String,
    /// Where deliveries go.
    pub url: String,
    /// What it receives.
    pub events: Vec<String>,
    /// Only these workflows (null: every one).
    pub workflows: Option<Vec<String>>,
    /// The environment variable holding its secret (never the secret).
    pub secret_env: String,
    /// Whether deliveries are made.
    pub enabled: bool,
    /// When it was created.
    pub created_at: chrono::DateTime<Utc>,
    /// When it last changed.
    pub updated_at: chrono::DateTime<Utc>,
}

/// What went wrong with a webhook call.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A field of the body is wrong; nothing was stored.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No subscription of that name.
    #[error("no webhook named `{0}`")]
    NotFound(String),
    /// A subscription of that name exists (create).
    #[error("a webhook named `{0}` exists already; PUT /v1/webhooks/{0} replaces it")]
    Exists(String),
    /// No delivery of that id for the subscription.
    #[error("webhook `{name}` has no delivery {id}")]
    DeliveryNotFound {
        /// The subscription.
        name: String,
        /// The delivery.
        id: i64,
    },
    /// The change was the first subscription to want a webhook trigger, or the last to stop
    /// wanting it, and switching the trigger could not lock `runs` or `outbox_events` within
    /// its `lock_timeout` (writers held them); nothing changed.
    #[error(
        "switching the webhook triggers waited {SWITCH_LOCK_TIMEOUT_S} s for writers of `runs` or `outbox_events` and gave up; nothing changed, try again"
    )]
    Busy,
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// How long a change of the subscriptions waits to switch the webhook triggers (the
/// `lock_timeout` of migration 0020's switch), in seconds.
pub const SWITCH_LOCK_TIMEOUT_S: u64 = 5;

/// A failed change of the subscriptions: [`WebhookError::Busy`] when the trigger switch ran
/// out of `lock_timeout` (55P03, `lock_not_available`), else the database error as it is.
fn switch_failed(error: sqlx::Error) -> WebhookError {
    match error.as_database_error().and_then(|e| e.code()) {
        Some(code) if code == "55P03" => WebhookError::Busy,
        _ => WebhookError::Database(error),
    }
}

fn invalid(field: &str, message: impl Into<String>) -> WebhookError {
    WebhookError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// How deliveries are made.
#[derive(Clone)]
pub struct WebhookConfig {
    /// How long a delivery is retried before it is marked failed (`--webhook-retry-window`).
    pub retry_window: Duration,
    /// The backoff between attempts of one delivery.
    pub backoff: RetryPolicy,
    /// One attempt's time limit.
    pub attempt_timeout: Duration,
    /// How often an idle worker looks for due deliveries.
    pub poll: Duration,
    /// How long past its deadline a wait no worker ended is reported `run.wait_overdue`.
    pub overdue_grace: Duration,
    /// Plain `http` beyond loopback is allowed (`--allow-http-endpoints`).
    pub allow_http: bool,
    /// Where `secret_env` is read.
    pub vars: Vars,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            retry_window: Duration::from_secs(24 * 3600),
            backoff: RetryPolicy {
                max_attempts: u32::MAX,
                initial_delay: Duration::from_secs(5),
                backoff_factor: 3.0,
                max_delay: Duration::from_secs(3600),
                jitter: 0.2,
            },
            attempt_timeout: Duration::from_secs(10),
            poll: Duration::from_millis(250),
            overdue_grace: Duration::from_secs(60),
            allow_http: false,
            vars: Arc::new(|name| std::env::var(name).ok()),
        }
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("retry_window", &self.retry_window)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("poll", &self.poll)
            .finish()
    }
}

/// The webhooks of one instance: subscriptions, deliveries and this instance's delivery worker.
#[derive(Clone)]
pub struct Webhooks {
    pool: PgPool,
    config: WebhookConfig,
    client: reqwest::Client,
}

/// What one attempt of a delivery came to.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptOutcome {
    /// Whether the receiver accepted it (2xx).
    pub delivered: bool,
    /// The HTTP status it answered, if it answered.
    pub status: Option<u16>,
    /// Why it was not accepted.
    pub error: Option<String>,
}

impl Webhooks {
    /// The webhooks on `pool`; records the retry window the triggers give new deliveries.
    pub async fn new(pool: PgPool, config: WebhookConfig) -> Result<Self, WebhookError> {
        store::set_retry_window(&pool, config.retry_window).await?;
        let client = reqwest::Client::builder()
            .timeout(config.attempt_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| invalid("client", e.to_string()))?;
        Ok(Self { pool, config, client })
    }

    /// Checks a subscription body (the path's `name` wins; a body naming another is refused).
    pub(crate) fn check(&self, name: &str, body: SubscriptionBody) -> Result<NewSubscription, WebhookError> {
        if let Some(named) = &body.name
            && named != name
        {
            return Err(invalid("name", format!("the body names `{named}`, the path `{name}`")));
        }
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !name_ok {
            return Err(invalid(
                "name",
                "1 to 64 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit",
            ));
        }
        let url = crate::defined::compile::check_base_url("url", &body.url, self.config.allow_http)
            .map_err(|r| invalid(&r.field, r.message))?;
        if body.events.is_empty() {
            return Err(invalid("events", "name at least one event type"));
        }
        let mut events: Vec<String> = Vec::new();
        for (i, event) in body.events.iter().enumerate() {
            let known = RUN_EVENTS.contains(&event.as_str())
                || event.strip_prefix("event.").is_some_and(|name| {
                    !name.is_empty()
                        && name.len() <= 200
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                });
            if !known {
                return Err(invalid(
                    &format!("events[{i}]"),
                    format!(
                        "`{}` is not one of {} or `event.<name>`",
                        clip(event, 80),
                        RUN_EVENTS.join(", ")
                    ),
                ));
            }
            if !events.contains(event) {
                events.push(event.clone());
            }
        }
        let workflows = match body.workflows {
            Some(list) if list.is_empty() => {
                return Err(invalid("workflows", "omit it for every workflow, or name one"));
            }
            Some(list) => {
                if let Some((i, _)) = list.iter().enumerate().find(|(_, w)| w.is_empty() || w.len() > 200) {
                    return Err(invalid(&format!("workflows[{i}]"), "1 to 200 characters"));
                }
                Some(list)
            }
            None => None,
        };
        let secret = (self.config.vars)(&body.secret_env)
            .ok_or_else(|| invalid("secret_env", format!("{} is not set", clip(&body.secret_env, 80))))?;
        if signing::decode_secret(&secret).is_none() {
            return Err(invalid(
                "secret_env",
                format!(
                    "{} must hold a Standard Webhooks secret: `whsec_` and the base64 of at least 16 bytes",
                    body.secret_env
                ),
            ));
        }
        Ok(NewSubscription {
            name: name.to_string(),
            url,
            events,
            workflows,
            secret_env: body.secret_env,
            enabled: body.enabled,
        })
    }

    /// Creates a subscription (refused if the name is taken).
    pub async fn create(&self, body: SubscriptionBody, operator: &str) -> Result<Subscription, WebhookError> {
        let name = body.name.clone().ok_or_else(|| invalid("name", "required"))?;
        let checked = self.check(&name, body)?;
        let mut tx = self.pool.begin().await?;
        let created = store::insert(&mut tx, &checked)
            .await
            .map_err(switch_failed)?
            .ok_or_else(|| WebhookError::Exists(name.clone()))?;
        audit(
            &mut tx,
            operator,
            "webhook.create",
            &name,
            serde_json::json!({"events": created.events}),
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    /// Creates or replaces the subscription `name`; whether it was created.
    pub async fn replace(
        &self,
        name: &str,
        body: SubscriptionBody,
        operator: &str,
    ) -> Result<(Subscription, bool), WebhookError> {
        let checked = self.check(name, body)?;
        let mut tx = self.pool.begin().await?;
        let (stored, created) = store::upsert(&mut tx, &checked).await.map_err(switch_failed)?;
        let action = if created { "webhook.create" } else { "webhook.replace" };
        audit(
            &mut tx,
            operator,
            action,
            name,
            serde_json::json!({"events": stored.events, "enabled": stored.enabled}),
        )
        .await?;
        tx.commit().await?;
        Ok((stored, created))
    }

    /// Deletes a subscription with its deliveries.
    pub async fn delete(&self, name: &str, operator: &str) -> Result<(), WebhookError> {
        let mut tx = self.pool.begin().await?;
        if !store::delete(&mut tx, name).await.map_err(switch_failed)? {
            return Err(WebhookError::NotFound(name.to_string()));
        }
        audit(&mut tx, operator, "webhook.delete", name, serde_json::json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every subscription.
    pub async fn list(&self) -> Result<Vec<Subscription>, WebhookError> {
        Ok(store::list(&self.pool).await?)
    }

    /// One subscription.
    pub async fn get(&self, name: &str) -> Result<Subscription, WebhookError> {
        store::get(&self.pool, name)
            .await?
            .ok_or_else(|| WebhookError::NotFound(name.to_string()))
    }

    /// A subscription's newest deliveries, newest first.
    pub async fn deliveries(&self, name: &str, limit: i64) -> Result<Vec<Delivery>, WebhookError> {
        self.get(name).await?;
        Ok(store::deliveries(&self.pool, name, limit.clamp(1, MAX_LISTED)).await?)
    }

    /// The newest deliveries of every subscription, and the counts by status.
    pub async fn overview(&self, limit: i64) -> Result<(Vec<Delivery>, (i64, i64, i64)), WebhookError> {
        Ok((
            store::recent_deliveries(&self.pool, limit.clamp(1, MAX_LISTED)).await?,
            store::counts(&self.pool).await?,
        ))
    }

    /// Makes a delivery (failed, or any other) due again at once with a fresh retry window and
    /// backoff (its attempts count from here); it keeps its `webhook-id`.
    pub async fn redeliver(&self, name: &str, id: i64, operator: &str) -> Result<Delivery, WebhookError> {
        let mut tx = self.pool.begin().await?;
        let again = store::redeliver(&mut tx, name, id, self.config.retry_window)
            .await?
            .ok_or_else(|| WebhookError::DeliveryNotFound {
                name: name.to_string(),
                id,
            })?;
        audit(
            &mut tx,
            operator,
            "webhook.redeliver",
            name,
            serde_json::json!({"delivery": id, "webhook_id": again.webhook_id}),
        )
        .await?;
        tx.commit().await?;
        Ok(again)
    }

    /// Sends a `webhook.test` delivery to the subscription now (whatever its events or
    /// whether it is enabled) and answers what the receiver said. It is recorded like any
    /// delivery; a refused one is retried like any other.
    pub async fn test(&self, name: &str, operator: &str) -> Result<(Delivery, AttemptOutcome), WebhookError> {
        let subscription = self.get(name).await?;
        let webhook_id = new_webhook_id();
        let body = serde_json::json!({
            "type": "webhook.test",
            "id": webhook_id,
            "timestamp": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "data": {"webhook": name, "by": operator},
        })
        .to_string();
        let mut tx = self.pool.begin().await?;
        let id = store::enqueue_test(
            &mut tx,
            name,
            &webhook_id,
            &body,
            self.config.retry_window,
            self.lease(),
        )
        .await?;
        audit(
            &mut tx,
            operator,
            "webhook.test",
            name,
            serde_json::json!({"delivery": id}),
        )
        .await?;
        tx.commit().await?;
        let claimed = store::Claimed {
            id,
            webhook_id,
            subscription: name.to_string(),
            event_type: "webhook.test".into(),
            body,
            attempts: 1,
            url: subscription.url,
            secret_env: subscription.secret_env,
        };
        let outcome = self.attempt(&claimed).await?;
        let delivery = store::delivery(&self.pool, name, id)
            .await?
            .ok_or_else(|| WebhookError::DeliveryNotFound {
                name: name.to_string(),
                id,
            })?;
        Ok((delivery, outcome))
    }

    /// How far a claimed attempt pushes the next one: long enough for the attempt to end, so
    /// only a worker that died mid-attempt leaves it to another.
    fn lease(&self) -> Duration {
        self.config.attempt_timeout * 2
    }

    /// Starts this instance's delivery worker; it stops when `stop` is cancelled.
    pub fn start(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.work(stop).await })
    }

    async fn work(self, stop: CancellationToken) {
        let mut last_sweep = tokio::time::Instant::now() - Duration::from_secs(3600);
        let sweep_every = Duration::from_secs(5).min(self.config.overdue_grace);
        loop {
            if last_sweep.elapsed() >= sweep_every {
                last_sweep = tokio::time::Instant::now();
                if let Err(e) = store::enqueue_overdue(&self.pool, self.config.overdue_grace).await {
                    warn!(error = %e, "looking for overdue waits failed");
                }
            }
            let claimed = match store::claim(&self.pool, 16, self.lease()).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    warn!(error = %e, "claiming webhook deliveries failed");
                    Vec::new()
                }
            };
            if claimed.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(self.config.poll) => continue,
                }
            }
            let attempts = claimed.iter().map(|c| self.attempt(c));
            for result in futures::future::join_all(attempts).await {
                if let Err(e) = result {
                    warn!(error = %e, "recording a webhook delivery failed; it is due again after its lease");
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// One attempt of a claimed delivery, recorded.
    async fn attempt(&self, d: &store::Claimed) -> Result<AttemptOutcome, WebhookError> {
        let sent = self.send(d).await;
        let outcome = match sent {
            Ok(status) if (200..300).contains(&status) => {
                store::delivered(&self.pool, d.id, status).await?;
                metrics::counter!(metrics_names::DELIVERIES, "subscription" => d.subscription.clone(), "outcome" => "delivered").increment(1);
                debug!(webhook_id = %d.webhook_id, status, "webhook delivered");
                return Ok(AttemptOutcome {
                    delivered: true,
                    status: Some(status),
                    error: None,
                });
            }
            Ok(status) => (Some(status), format!("the receiver answered {status}")),
            Err(error) => (None, error),
        };
        let (status, error) = outcome;
        let jitter = rand::random::<f64>();
        let delay = self
            .config
            .backoff
            .delay_after(u32::try_from(d.attempts).unwrap_or(u32::MAX).max(1), jitter);
        let retry_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        let gave_up = store::attempt_failed(&self.pool, d.id, status, &error, retry_at).await?;
        let what = if gave_up { "failed" } else { "retry" };
        metrics::counter!(metrics_names::DELIVERIES, "subscription" => d.subscription.clone(), "outcome" => what)
            .increment(1);
        if gave_up {
            warn!(webhook_id = %d.webhook_id, subscription = %d.subscription, event = %d.event_type, %error,
                  "webhook delivery failed for good: its retry window ended");
        } else {
            info!(webhook_id = %d.webhook_id, subscription = %d.subscription, %error, %retry_at, "webhook delivery refused; retrying");
        }
        Ok(AttemptOutcome {
            delivered: false,
            status,
            error: Some(error),
        })
    }

    /// POSTs the body, signed; the status the receiver answered, or why there was none.
    async fn send(&self, d: &store::Claimed) -> Result<u16, String> {
        let secret = (self.config.vars)(&d.secret_env).ok_or_else(|| format!("{} is not set", d.secret_env))?;
        let key = signing::decode_secret(&secret)
            .ok_or_else(|| format!("{} does not hold a Standard Webhooks secret", d.secret_env))?;
        let timestamp = Utc::now().timestamp().to_string();
        let signature = signing::sign(&key, &d.webhook_id, &timestamp, d.body.as_bytes())
            .ok_or_else(|| "the secret cannot key HMAC-SHA256".to_string())?;
        let response = self
            .client
            .post(&d.url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.webhook_id)
            .header("webhook-timestamp", &timestamp)
            .header("webhook-signature", signature)
            .header("user-agent", concat!("sagaflow/", env!("CARGO_PKG_VERSION")))
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| clip(&e.to_string(), 300))?;
        Ok(response.status().as_u16())
    }
}

/// A new `webhook-id`, in the form the triggers write (`msg_` and 32 hex digits).
fn new_webhook_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// At most `max` characters of `text`.
fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// Records an admin's change to a subscription in the operator audit trail.
async fn audit(
    conn: &mut sqlx::PgConnection,
    operator: &str,
    action: &str,
    name: &str,
    mut detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    detail["webhook"] = serde_json::json!(name);
    let record = crate::engine::store::OperatorAction::by(operator.into(), action, detail);
    crate::engine::store::record_action(conn, &record).await
}
