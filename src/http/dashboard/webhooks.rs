//! The webhooks page (`/webhooks`): every subscription (where it delivers, what, for which
//! workflows) with **Send a test**, and the newest deliveries of all of them (status,
//! attempts, the receiver's last answer or error) with **Redeliver**. A delivery marked
//! failed (its retry window ended) is flagged: someone must look at the receiver.
//!
//! Cost: the subscriptions (few), one index scan of the newest [`LIMIT`] deliveries, one
//! count by status.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::response::{Html, Redirect};

use super::Dashboard;
use super::error::PageError;
use super::format;
use super::run::ActionForm;
use super::session::{Operator, Viewer};
use crate::http::error::ApiError;
use crate::http::extract::{Params, PathPair, PathText};
use crate::webhooks::{Delivery, DeliveryStatus, Subscription};

/// The most deliveries the page lists.
pub const LIMIT: i64 = 100;

/// The webhooks page.
#[derive(Template)]
#[template(path = "webhooks.html", config = "dashboard/askama.toml")]
pub struct WebhooksPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the forms.
    pub csrf: String,
    /// What an action just did.
    pub notice: Option<&'static str>,
    /// By name.
    pub subscriptions: Vec<SubscriptionLine>,
    /// Pending, delivered and failed deliveries, in all.
    pub counts: (i64, i64, i64),
    /// Newest first.
    pub deliveries: Vec<DeliveryLine>,
}

/// A subscription as the page shows it.
pub struct SubscriptionLine {
    /// Its name.
    pub name: String,
    /// Where it delivers.
    pub url: String,
    /// What it receives, comma-separated.
    pub events: String,
    /// For which workflows ("every workflow" when not filtered).
    pub workflows: String,
    /// Whether deliveries are made.
    pub enabled: bool,
}

/// A delivery as the page shows it.
pub struct DeliveryLine {
    /// Its id.
    pub id: i64,
    /// Its subscription.
    pub subscription: String,
    /// `run.completed`, `event.customer.created`...
    pub event_type: String,
    /// The run it reports on: full and short id.
    pub run: Option<(String, String)>,
    /// `pending`, `delivered`, `failed`.
    pub status: &'static str,
    /// Attempts so far.
    pub attempts: i32,
    /// The receiver's last answer or error, or when it was accepted.
    pub last: String,
    /// When it was written.
    pub created: String,
    /// Its stable `webhook-id`.
    pub webhook_id: String,
}

/// The page.
pub async fn page(
    viewer: Viewer,
    State(dashboard): State<Arc<Dashboard>>,
    params: Params,
) -> Result<Html<String>, PageError> {
    let notice = match params.text("done", 20)?.as_deref() {
        Some("redelivered") => Some("Redelivery queued: it is sent again at once, with the same webhook-id."),
        Some("tested") => Some("Test delivery sent: its outcome is the newest delivery below."),
        _ => None,
    };
    let webhooks = &dashboard.app.webhooks;
    let subscriptions = webhooks.list().await.map_err(ApiError::from)?;
    let (deliveries, counts) = webhooks.overview(LIMIT).await.map_err(ApiError::from)?;
    let page = WebhooksPage {
        operator: viewer.session.operator.clone(),
        csrf: viewer.csrf.clone(),
        notice,
        subscriptions: subscriptions.iter().map(subscription_line).collect(),
        counts,
        deliveries: deliveries.iter().map(delivery_line).collect(),
    };
    let html = page
        .render()
        .map_err(|e| ApiError::Internal(format!("rendering the webhooks page: {e}")))?;
    Ok(Html(html))
}

/// A subscription as the page shows it (pure).
pub fn subscription_line(s: &Subscription) -> SubscriptionLine {
    SubscriptionLine {
        name: s.name.clone(),
        url: format::clip(&s.url, 200),
        events: s.events.join(", "),
        workflows: match &s.workflows {
            Some(list) => format::clip(&list.join(", "), 300),
            None => "every workflow".to_string(),
        },
        enabled: s.enabled,
    }
}

/// A delivery as the page shows it (pure).
pub fn delivery_line(d: &Delivery) -> DeliveryLine {
    let last = match (d.status, d.delivered_at, &d.last_error) {
        (DeliveryStatus::Delivered, Some(at), _) => format!("accepted {}", format::time(at)),
        (_, _, Some(error)) => format::clip(error, 200),
        _ => "not attempted yet".to_string(),
    };
    DeliveryLine {
        id: d.id,
        subscription: d.subscription.clone(),
        event_type: d.event_type.clone(),
        run: d.run_id.map(|id| (id.to_string(), format::short_id(id))),
        status: d.status.as_str(),
        attempts: d.attempts,
        last,
        created: format::time(d.created_at),
        webhook_id: d.webhook_id.clone(),
    }
}

/// `POST /webhooks/{name}/deliveries/{id}/redeliver`.
pub async fn redeliver(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathPair, ApiError>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    super::run::checked(&operator, form)?;
    let PathPair(name, id) = path?;
    let id: i64 = id.parse().map_err(|_| ApiError::NotFound {
        what: "delivery",
        id: id.clone(),
    })?;
    dashboard
        .app
        .webhooks
        .redeliver(&name, id, &operator.session.operator)
        .await
        .map_err(ApiError::from)?;
    Ok(Redirect::to("/webhooks?done=redelivered"))
}

/// `POST /webhooks/{name}/test`.
pub async fn test(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    super::run::checked(&operator, form)?;
    let PathText(name) = path?;
    dashboard
        .app
        .webhooks
        .test(&name, &operator.session.operator)
        .await
        .map_err(ApiError::from)?;
    Ok(Redirect::to("/webhooks?done=tested"))
}
