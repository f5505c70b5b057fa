//! A workflow definition as `PUT /v1/workflow-definitions/{name}` takes it (docs/contract.md
//! §8), and the checks that refuse one that cannot work, each naming its field
//! (`steps[2].invoke.path`) before anything is stored.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The largest definition accepted, in bytes of JSON.
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;
/// The longest timeout or retry delay a definition may ask for.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Attempts per phase at most.
const MAX_ATTEMPTS: u32 = 100;
/// The timeout of a call whose endpoint and step name none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A workflow defined as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// What the workflow is for.
    #[serde(default)]
    pub description: String,
    /// JSON Schema every input must satisfy (none: any JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// JSON pointer into the input: what the runs list shows and `q` searches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The services its steps call, by name.
    pub endpoints: BTreeMap<String, EndpointSpec>,
    /// The plan, in order.
    pub steps: Vec<StepSpec>,
}

/// A service steps call: a base URL, a timeout, and where its secrets are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Calls go to this URL with the step's path appended.
    pub base_url: String,
    /// Per-call timeout (humantime, e.g. `10s`) unless a call sets its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The environment variable holding the Standard Webhooks signing secret (`whsec_...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// The environment variable holding a bearer token sent as `Authorization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

/// One step: what to call to do it and to undo it, how to retry, when to skip it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// The step's name, unique in the plan.
    pub name: String,
    /// The call that does the step (every step has one, except a wait, a sleep or a
    /// sleep until).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke: Option<CallSpec>,
    /// With `invoke`: a 202 answer means the participant completes the step later
    /// (`POST /v1/runs/{id}/steps/{step}/complete`), within these limits.
    #[serde(default, rename = "async", skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<AsyncSpec>,
    /// A step that waits for a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitSpec>,
    /// A step that sleeps this long (humantime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<String>,
    /// A step that sleeps until the time at a pointer of the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_until: Option<SleepUntilSpec>,
    /// The call that undoes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<CallSpec>,
    /// Retries of the invoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Retries of the compensation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_retry: Option<RetrySpec>,
    /// Run the step only when this holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<WhenSpec>,
}

/// How long an asynchronous step may take to be completed, and how often it must heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncSpec {
    /// The longest from the attempt's start to its completion (humantime; required).
    pub timeout: String,
    /// The longest between heartbeats, if the participant must heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout: Option<String>,
    /// `fail` (default) or `continue` when it is not completed in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<crate::engine::OnTimeout>,
}

/// A wait for a signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitSpec {
    /// The signal's name.
    pub signal: String,
    /// The longest the step waits (humantime; required).
    pub timeout: String,
    /// `fail` (default: the step fails permanently, the run compensates) or `continue` (the
    /// step succeeds with a null output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<crate::engine::OnTimeout>,
}

/// A sleep until a time of the input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepUntilSpec {
    /// A JSON pointer into the input to an RFC 3339 time (`/order/settle_at`).
    pub pointer: String,
}

/// A call of an endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallSpec {
    /// The endpoint's name (a key of `endpoints`).
    pub endpoint: String,
    /// The path appended to its base URL, starting with `/`.
    pub path: String,
    /// This call's timeout, instead of the endpoint's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A retry policy; unset fields keep the engine's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt (humantime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<String>,
    /// Cap on any delay (humantime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
    /// Growth of each further delay, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_factor: Option<f64>,
    /// Randomized share of each delay, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

/// A test on the input and the outputs recorded so far: `pointer` into
/// `{"input": ..., "steps": {"<name>": {"output": ...}}}` equals a value, or exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenSpec {
    /// `/input/...` or `/steps/<earlier step>/output...`.
    pub pointer: String,
    /// The step runs when the value there equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
    /// The step runs when a value is there (`true`) or is not (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
}

/// Why a definition was refused: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Refusal {
    /// The JSON path of the offending field (`steps[2].invoke.path`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Refusal {
    /// A refusal of `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads a variable a definition names for a secret (the process environment by default).
pub type Vars = std::sync::Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What the instance allows a definition to reach, and where it reads secrets.
#[derive(Clone)]
pub struct Environment {
    /// Plain `http` base URLs beyond loopback are allowed (`--allow-http-endpoints`).
    pub allow_http: bool,
    /// Reads an environment variable (the process's, or a test's).
    pub var: Vars,
    /// The ceiling on waits (`--max-wait`): no wait of a definition may be longer.
    pub max_wait: Duration,
}

impl Environment {
    /// The process environment.
    pub fn process(allow_http: bool) -> Self {
        Self {
            allow_http,
            var: std::sync::Arc::new(|name| std::env::var(name).ok()),
            max_wait: crate::engine::EngineConfig::default().max_wait,
        }
    }
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("allow_http", &self.allow_http)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

/// Parses a definition, naming the field of the first problem.
pub fn parse(body: &Value) -> Result<Definition, Refusal> {
    serde_path_to_error::deserialize::<_, Definition>(body).map_err(|error| {
        let path = error.path().to_string();
        let message = error.into_inner().to_string();
        let field = match message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            Some(missing) if path == "." => missing.to_string(),
            Some(missing) => format!("{path}.{missing}"),
            None => path,
        };
        Refusal::new(field, message)
    })
}

/// A wait's duration: humantime, above zero, at most `ceiling` (the instance's `--max-wait`).
pub fn wait_duration(field: &str, text: &str, ceiling: Duration) -> Result<Duration, Refusal> {
    let parsed = humantime::parse_duration(text).map_err(|e| {
        Refusal::new(
            field,
            format!("`{text}` is not a duration (e.g. `30m`, `2h`, `7days`): {e}"),
        )
    })?;
    if parsed.is_zero() || parsed > ceiling {
        return Err(Refusal::new(
            field,
            format!(
                "`{text}` must be above zero and at most {} (the ceiling on waits, --max-wait)",
                humantime::format_duration(ceiling)
            ),
        ));
    }
    Ok(parsed)
}

/// A duration of a definition: humantime, above zero, at most a day.
pub fn duration(field: &str, text: &str) -> Result<Duration, Refusal> {
    let parsed = humantime::parse_duration(text).map_err(|e| {
        Refusal::new(
            field,
            format!("`{text}` is not a duration (e.g. `200ms`, `10s`, `5m`): {e}"),
        )
    })?;
    if parsed.is_zero() || parsed > MAX_DURATION {
        return Err(Refusal::new(
            field,
            format!("`{text}` must be above zero and at most 24h"),
        ));
    }
    Ok(parsed)
}

/// A decoded Standard Webhooks secret: `whsec_` and the base64 of the key.
pub fn signing_key(field: &str, var: &str, value: &str) -> Result<Vec<u8>, Refusal> {
    match crate::signing::decode_secret(value) {
        Some(key) => Ok(key),
        None => Err(Refusal::new(
            field,
            format!(
                "environment variable {var} must hold a Standard Webhooks secret: `whsec_` and the base64 of at least 16 bytes"
            ),
        )),
    }
}

impl Definition {
    /// Checks everything that does not need the environment or a schema compiler: names,
    /// references between fields, paths, durations, policies, pointers.
    pub fn check_shape(&self) -> Result<(), Refusal> {
        if self.steps.is_empty() {
            return Err(Refusal::new("steps", "a workflow needs at least one step"));
        }
        if let Some(subject) = &self.subject
            && !subject.starts_with('/')
        {
            return Err(Refusal::new(
                "subject",
                "a JSON pointer into the input, e.g. `/order/email`",
            ));
        }
        for (name, endpoint) in &self.endpoints {
            let field = format!("endpoints.{name}");
            if !valid_name(name) {
                return Err(Refusal::new(&field, "endpoint names use letters, digits, `-` and `_`"));
            }
            if let Some(timeout) = &endpoint.timeout {
                duration(&format!("{field}.timeout"), timeout)?;
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let field = format!("steps[{i}]");
            if !valid_name(&step.name) || step.name.len() > 100 {
                return Err(Refusal::new(
                    format!("{field}.name"),
                    "step names are 1 to 100 letters, digits, `-` and `_`",
                ));
            }
            if seen.contains(&step.name.as_str()) {
                return Err(Refusal::new(
                    format!("{field}.name"),
                    format!("two steps are named `{}`", step.name),
                ));
            }
            step.check_kind(&field)?;
            if let Some(invoke) = &step.invoke {
                self.check_call(&format!("{field}.invoke"), invoke)?;
            }
            if let Some(compensate) = &step.compensate {
                self.check_call(&format!("{field}.compensate"), compensate)?;
            }
            if let Some(retry) = &step.retry {
                retry.check(&format!("{field}.retry"))?;
            }
            if let Some(retry) = &step.compensation_retry {
                retry.check(&format!("{field}.compensation_retry"))?;
            }
            if let Some(when) = &step.when {
                when.check(&format!("{field}.when"), &seen)?;
            }
            seen.push(&step.name);
        }
        Ok(())
    }

    fn check_call(&self, field: &str, call: &CallSpec) -> Result<(), Refusal> {
        if !self.endpoints.contains_key(&call.endpoint) {
            let known: Vec<&str> = self.endpoints.keys().map(String::as_str).collect();
            return Err(Refusal::new(
                format!("{field}.endpoint"),
                format!("unknown endpoint `{}` (declared: {known:?})", call.endpoint),
            ));
        }
        let path = &call.path;
        let fine = path.starts_with('/')
            && !path.starts_with("//")
            && !path.contains(['?', '#', '\\', ' '])
            && !path.split('/').any(|segment| segment == "..")
            && path.chars().all(|c| c.is_ascii_graphic());
        if !fine {
            return Err(Refusal::new(
                format!("{field}.path"),
                "a path starting with `/`, without `..`, query, fragment or spaces",
            ));
        }
        if let Some(timeout) = &call.timeout {
            duration(&format!("{field}.timeout"), timeout)?;
        }
        Ok(())
    }
}

impl StepSpec {
    /// Exactly one of `invoke`, `wait`, `sleep` and `sleep_until`; `async` and `compensate`
    /// only with `invoke`. (Durations are checked against the ceiling when compiled.)
    fn check_kind(&self, field: &str) -> Result<(), Refusal> {
        let kinds = [
            self.invoke.is_some(),
            self.wait.is_some(),
            self.sleep.is_some(),
            self.sleep_until.is_some(),
        ];
        match kinds.iter().filter(|&&k| k).count() {
            0 => {
                return Err(Refusal::new(
                    format!("{field}.invoke"),
                    "a step needs `invoke` (or is a `wait`, a `sleep` or a `sleep_until`)",
                ));
            }
            1 => {}
            _ => {
                return Err(Refusal::new(
                    field,
                    "give exactly one of `invoke`, `wait`, `sleep` and `sleep_until`",
                ));
            }
        }
        if self.invoke.is_none() {
            for (present, name) in [
                (self.asynchronous.is_some(), "async"),
                (self.compensate.is_some(), "compensate"),
                (self.retry.is_some(), "retry"),
                (self.compensation_retry.is_some(), "compensation_retry"),
            ] {
                if present {
                    return Err(Refusal::new(
                        format!("{field}.{name}"),
                        "only a step with `invoke` has this (a wait is not an attempt to retry or undo)",
                    ));
                }
            }
        }
        if let Some(wait) = &self.wait
            && (wait.signal.is_empty() || wait.signal.len() > 200 || wait.signal.chars().any(char::is_control))
        {
            return Err(Refusal::new(
                format!("{field}.wait.signal"),
                "a signal name is 1 to 200 printable characters",
            ));
        }
        if let Some(until) = &self.sleep_until
            && !until.pointer.starts_with("/")
        {
            return Err(Refusal::new(
                format!("{field}.sleep_until.pointer"),
                "a JSON pointer into the input, e.g. `/order/settle_at`",
            ));
        }
        Ok(())
    }
}

impl RetrySpec {
    fn check(&self, field: &str) -> Result<(), Refusal> {
        if let Some(n) = self.max_attempts
            && !(1..=MAX_ATTEMPTS).contains(&n)
        {
            return Err(Refusal::new(
                format!("{field}.max_attempts"),
                format!("from 1 to {MAX_ATTEMPTS}"),
            ));
        }
        if let Some(d) = &self.initial_delay {
            duration(&format!("{field}.initial_delay"), d)?;
        }
        if let Some(d) = &self.max_delay {
            duration(&format!("{field}.max_delay"), d)?;
        }
        if let Some(f) = self.backoff_factor
            && !(1.0..=10.0).contains(&f)
        {
            return Err(Refusal::new(format!("{field}.backoff_factor"), "from 1 to 10"));
        }
        if let Some(j) = self.jitter
            && !(0.0..=1.0).contains(&j)
        {
            return Err(Refusal::new(format!("{field}.jitter"), "from 0 to 1"));
        }
        Ok(())
    }

    /// The policy, starting from `base` (the engine's default for the phase).
    pub fn policy(&self, base: crate::engine::RetryPolicy) -> crate::engine::RetryPolicy {
        let mut policy = base;
        if let Some(n) = self.max_attempts {
            policy.max_attempts = n;
        }
        if let Some(d) = self
            .initial_delay
            .as_deref()
            .and_then(|d| humantime::parse_duration(d).ok())
        {
            policy = policy.initial_delay(d);
        }
        if let Some(d) = self
            .max_delay
            .as_deref()
            .and_then(|d| humantime::parse_duration(d).ok())
        {
            policy = policy.max_delay(d);
        }
        if let Some(f) = self.backoff_factor {
            policy = policy.backoff_factor(f);
        }
        if let Some(j) = self.jitter {
            policy = policy.jitter(j);
        }
        policy
    }
}

impl WhenSpec {
    fn check(&self, field: &str, earlier: &[&str]) -> Result<(), Refusal> {
        let pointer = &self.pointer;
        let fine = pointer == "/input"
            || pointer.starts_with("/input/")
            || pointer
                .strip_prefix("/steps/")
                .and_then(|rest| {
                    let (step, tail) = rest.split_once('/').unwrap_or((rest, ""));
                    let output = tail == "output" || tail.starts_with("output/");
                    (earlier.contains(&step) && output).then_some(())
                })
                .is_some();
        if !fine {
            return Err(Refusal::new(
                format!("{field}.pointer"),
                format!(
                    "`{pointer}` points nowhere: use `/input/...` or `/steps/<an earlier step>/output/...` (earlier steps: {earlier:?})"
                ),
            ));
        }
        if self.equals.is_some() == self.exists.is_some() {
            return Err(Refusal::new(field, "give exactly one of `equals` and `exists`"));
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `value` with every object's keys sorted, so that two definitions that differ only in key
/// order or whitespace have the same content (and so the same version).
pub fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> = map.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn order() -> Value {
        json!({
            "endpoints": {"shop": {"base_url": "http://127.0.0.1:4000/saga", "timeout": "10s"}},
            "steps": [
                {"name": "reserve", "invoke": {"endpoint": "shop", "path": "/reserve"},
                 "compensate": {"endpoint": "shop", "path": "/release"}},
                {"name": "ship", "invoke": {"endpoint": "shop", "path": "/ship"},
                 "when": {"pointer": "/steps/reserve/output/ok", "equals": true}}
            ]
        })
    }

    fn refused(mut edit: impl FnMut(&mut Value)) -> Refusal {
        let mut body = order();
        edit(&mut body);
        match parse(&body) {
            Ok(definition) => definition.check_shape().expect_err("refused"),
            Err(refusal) => refusal,
        }
    }

    #[test]
    fn a_sound_definition_passes() {
        parse(&order()).expect("parses").check_shape().expect("sound");
    }

    #[test]
    fn every_refusal_names_its_field() {
        type Edit = Box<dyn FnMut(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|b| b["steps"][1]["invoke"]["endpoint"] = json!("bank")),
                "steps[1].invoke.endpoint",
            ),
            (Box::new(|b| b["steps"][1]["name"] = json!("reserve")), "steps[1].name"),
            (
                Box::new(|b| b["steps"][0]["compensate"]["path"] = json!("/../admin")),
                "steps[0].compensate.path",
            ),
            (
                Box::new(|b| b["steps"][0]["invoke"]["path"] = json!("reserve")),
                "steps[0].invoke.path",
            ),
            (
                Box::new(|b| b["steps"][1]["when"]["pointer"] = json!("/steps/nope/output")),
                "steps[1].when.pointer",
            ),
            (
                Box::new(|b| b["steps"][1]["when"]["pointer"] = json!("/steps/ship/output")),
                "steps[1].when.pointer",
            ),
            (
                Box::new(|b| b["endpoints"]["shop"]["timeout"] = json!("ten seconds")),
                "endpoints.shop.timeout",
            ),
            (
                Box::new(|b| b["steps"][0]["retry"] = json!({"initial_delay": "0s"})),
                "steps[0].retry.initial_delay",
            ),
            (
                Box::new(|b| b["steps"][0]["retry"] = json!({"max_attempts": 0})),
                "steps[0].retry.max_attempts",
            ),
            (
                Box::new(|b| b["steps"][0]["invoke"]["verb"] = json!("GET")),
                "steps[0].invoke.verb",
            ),
            (Box::new(|b| b["steps"] = json!([])), "steps"),
            (Box::new(|b| b["subject"] = json!("order.email")), "subject"),
            (
                Box::new(|b| {
                    b.as_object_mut().map(|o| o.remove("endpoints"));
                }),
                "endpoints",
            ),
        ];
        for (mut edit, field) in cases {
            let refusal = refused(&mut edit);
            assert_eq!(refusal.field, field, "{refusal}");
        }
    }

    #[test]
    fn key_order_does_not_change_the_content() {
        let a = json!({"b": 1, "a": {"y": [1, {"d": 1, "c": 2}], "x": 2}});
        let b: Value = serde_json::from_str(r#"{"a": {"x": 2, "y": [1, {"c": 2, "d": 1}]}, "b": 1}"#).expect("json");
        assert_eq!(canonical(&a).to_string(), canonical(&b).to_string());
    }
}
