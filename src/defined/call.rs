//! An HTTP step: each attempt is one signed POST to a participant's endpoint, and its answer
//! is read exactly as docs/contract.md §8 says (2xx an output; 400/401/403/404/409/410/422
//! permanent; 408/425/429/5xx, timeouts and connection failures retryable, honouring
//! `Retry-After`; redirects and bodies that are not JSON permanent).
//!
//! Nothing here touches the database: the call holds no transaction and no pooled
//! connection, and the worker's heartbeat keeps renewing the run's lease while it waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use crate::engine::{Compensate, Completed, Step, StepContext, StepError};

/// The largest request body sagaflow sends (the input and the outputs so far).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The largest answer read: a 2xx answer is the step's output, recorded in the database.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// How much of an error answer is kept for operators.
const EXCERPT_BYTES: usize = 256;

/// A participant service, with its secrets read from the environment (never stored).
pub(crate) struct Endpoint {
    /// Its name in the definition.
    pub(crate) name: String,
    /// Calls go to this URL followed by the path.
    pub(crate) base_url: String,
    /// The Standard Webhooks signing key, if it has one.
    pub(crate) signing_key: Option<Vec<u8>>,
    /// A bearer token sent as `Authorization`, if it has one.
    pub(crate) token: Option<String>,
}

/// One call of an endpoint.
pub(crate) struct Call {
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) path: String,
    pub(crate) timeout: Duration,
}

impl Call {
    /// How operators see the call: `shop POST /stock/reserve`.
    pub(crate) fn describe(&self) -> String {
        format!("{} POST {}", self.endpoint.name, self.path)
    }
}

/// A step whose invoke (and compensation, if any) are HTTP calls.
pub(crate) struct HttpStep {
    pub(crate) client: reqwest::Client,
    pub(crate) invoke: Call,
    pub(crate) compensate: Option<Call>,
    /// Declared `async`: a 202 answer means the participant completes the step later.
    pub(crate) asynchronous: bool,
}

#[async_trait]
impl Step for HttpStep {
    type Output = Value;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        let body = request_body(ctx, None);
        let (status, answer) = call(&self.client, &self.invoke, ctx, body).await?;
        if self.asynchronous && status == reqwest::StatusCode::ACCEPTED {
            // Accepted, not done: the participant completes this attempt later, naming it.
            ctx.complete_later(answer.clone());
        }
        Ok(answer)
    }
}

#[async_trait]
impl Compensate for HttpStep {
    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<Value>) -> Result<(), StepError> {
        let Some(compensate) = &self.compensate else {
            return Ok(());
        };
        let body = request_body(ctx, Some(done));
        call(&self.client, compensate, ctx, body).await.map(|_| ())
    }
}

/// `{"input", "steps": {"<name>": {"output"}}}`, and for a compensation the step's own
/// `output` or `partial`.
fn request_body(ctx: &StepContext<'_>, done: Option<Completed<Value>>) -> Value {
    let view = ctx.view();
    let steps: Map<String, Value> = view
        .outputs()
        .map(|(name, output)| (name.to_string(), json!({ "output": output })))
        .collect();
    let mut body = json!({"input": view.input_value(), "steps": steps});
    match done {
        Some(Completed::Output(output)) => body["output"] = output,
        Some(Completed::Partial(partial)) => body["partial"] = partial,
        None => {}
    }
    body
}

/// One signed POST; a 2xx answer is returned with its status and its JSON body (null when
/// empty), anything else is the attempt's error.
async fn call(
    client: &reqwest::Client,
    call: &Call,
    ctx: &StepContext<'_>,
    body: Value,
) -> Result<(reqwest::StatusCode, Value), StepError> {
    let what = call.describe();
    let body = serde_json::to_vec(&body)?;
    if body.len() > MAX_REQUEST_BYTES {
        return Err(StepError::permanent(format!(
            "the request to {what} would be {} bytes, over the limit of {MAX_REQUEST_BYTES} bytes (the input and the outputs so far)",
            body.len()
        )));
    }
    let url = format!("{}{}", call.endpoint.base_url.trim_end_matches('/'), call.path);
    let headers = headers(call, ctx, &body)?;
    let started = Instant::now();
    let sent = client
        .post(url)
        .timeout(call.timeout)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_timeout() => {
            let error = StepError::retryable(format!("{what} did not answer within {:?}", call.timeout))
                .with_detail(json!({"duration_ms": millis(started), "timed_out": true}));
            return Err(outcome_unknown(error, "the call timed out"));
        }
        // Never connected: the participant cannot have acted on it.
        Err(e) if e.is_connect() => {
            return Err(
                StepError::retryable(format!("{what} could not be reached: {}", error_chain(&e)))
                    .with_detail(json!({"duration_ms": millis(started)})),
            );
        }
        Err(e) => {
            let error = StepError::retryable(format!("the call to {what} failed: {}", error_chain(&e)))
                .with_detail(json!({"duration_ms": millis(started)}));
            return Err(outcome_unknown(
                error,
                "the connection failed after the request was sent",
            ));
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let answer = read_limited(response, MAX_RESPONSE_BYTES).await;
    let detail = |body: &[u8]| {
        json!({
            "status": status.as_u16(),
            "duration_ms": millis(started),
            "body": String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]),
        })
    };
    let bytes = match answer {
        Ok(bytes) => bytes,
        Err(Read::TooLarge(prefix)) => {
            let error = StepError::permanent(format!(
                "{what} answered {status} with a body over the limit of {MAX_RESPONSE_BYTES} bytes"
            ));
            return Err(error.with_detail(detail(&prefix)));
        }
        Err(Read::Failed(e)) => {
            let error = StepError::retryable(format!("reading the answer of {what} failed: {e}"))
                .with_detail(json!({"status": status.as_u16(), "duration_ms": millis(started)}));
            return Err(outcome_unknown(error, "the answer was cut off"));
        }
    };
    let code = status.as_u16();
    if status.is_success() {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((status, Value::Null));
        }
        return serde_json::from_slice(&bytes).map(|body| (status, body)).map_err(|e| {
            StepError::permanent(format!("{what} answered {status} with a body that is not JSON: {e}"))
                .with_detail(detail(&bytes))
        });
    }
    if status.is_redirection() {
        let to = location.map(|l| format!(" to {l}")).unwrap_or_default();
        return Err(
            StepError::permanent(format!("{what} answered {status}{to}: redirects are not followed"))
                .with_detail(detail(&bytes)),
        );
    }
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    let reason = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .map(|e| {
            match (
                e.get("code").and_then(Value::as_str),
                e.get("message").and_then(Value::as_str),
            ) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (None, Some(message)) => message.to_string(),
                _ => e.to_string(),
            }
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)]).into_owned());
    let message = format!("{what} answered {status}: {reason}");
    let retryable = matches!(code, 408 | 425 | 429) || status.is_server_error();
    let mut error = if retryable {
        StepError::retryable(message)
    } else {
        StepError::permanent(message)
    };
    if let Some(delay) = retry_after.filter(|_| retryable) {
        error = error.retry_after(delay);
    }
    if let Some(partial) = parsed.as_ref().and_then(|v| v.get("partial")).filter(|p| !p.is_null()) {
        error = error.with_partial(partial.clone());
    } else if status.is_server_error() {
        error = outcome_unknown(error, "the participant failed while handling the call");
    }
    Err(error.with_detail(detail(&bytes)))
}

/// A failure after which the participant may have done the work (a timeout, a 5xx, a
/// connection lost once the request was sent): it is recorded as partial work
/// `{"outcome_unknown": why}`, so that if the step gives up its compensation is still called
/// (with that `partial`) instead of leaving behind what the call may have done. A
/// compensation must therefore accept an undo of something that never happened. What a
/// participant reports as `partial` itself is kept as it is.
fn outcome_unknown(error: StepError, why: &str) -> StepError {
    if error.partial.is_some() {
        return error;
    }
    error.with_partial(json!({ "outcome_unknown": why }))
}

/// The headers of one attempt: its identity, its deadline, a trace, and the signature.
fn headers(call: &Call, ctx: &StepContext<'_>, body: &[u8]) -> Result<HeaderMap, StepError> {
    let key = ctx.idempotency_key();
    let deadline = Utc::now() + chrono::Duration::from_std(call.timeout).unwrap_or(chrono::Duration::MAX);
    let span: u64 = rand::random::<u64>() | 1;
    let mut pairs: Vec<(&'static str, String)> = vec![
        ("content-type", "application/json".into()),
        ("idempotency-key", key.clone()),
        ("sagaflow-run-id", ctx.run_id().to_string()),
        ("sagaflow-workflow", ctx.workflow().to_string()),
        ("sagaflow-workflow-version", ctx.version().to_string()),
        ("sagaflow-step", ctx.step().to_string()),
        ("sagaflow-phase", ctx.phase().as_str().to_string()),
        ("sagaflow-attempt", ctx.attempt().to_string()),
        (
            "sagaflow-deadline",
            deadline.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        // The run is the trace: every call of one run shares its trace id.
        ("traceparent", format!("00-{}-{span:016x}-01", ctx.run_id().simple())),
    ];
    if let Some(signing_key) = &call.endpoint.signing_key {
        let timestamp = Utc::now().timestamp().to_string();
        let signature = crate::signing::sign(signing_key, &key, &timestamp, body)
            .ok_or_else(|| StepError::permanent("the endpoint's signing key cannot key HMAC-SHA256"))?;
        pairs.push(("webhook-signature", signature));
        pairs.push(("webhook-id", key));
        pairs.push(("webhook-timestamp", timestamp));
    }
    if let Some(token) = &call.endpoint.token {
        pairs.push(("authorization", format!("Bearer {token}")));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let value = HeaderValue::from_str(&value)
            .map_err(|_| StepError::permanent(format!("header {name} cannot carry `{value}`")))?;
        headers.insert(HeaderName::from_static(name), value);
    }
    Ok(headers)
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(text: &str) -> Option<Duration> {
    if let Ok(seconds) = text.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(text.trim()).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

enum Read {
    /// Over the limit: what was read before it.
    TooLarge(Vec<u8>),
    Failed(reqwest::Error),
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Read> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(Read::TooLarge(Vec::new()));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Read::Failed)? {
        if bytes.len() + chunk.len() > limit {
            bytes.extend_from_slice(&chunk[..(limit - bytes.len()).min(chunk.len())]);
            return Err(Read::TooLarge(bytes));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

fn millis(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// An error with its causes (reqwest's own message is often just "error sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let later = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let parsed = parse_retry_after(&later).expect("date");
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
