//! Turns a checked [`Definition`] into an engine [`Workflow`] this instance can run: the
//! input schema compiled, secrets read from the environment, each step an HTTP step with
//! its retry policies, timeout and `when` test.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::call::{Call, Endpoint, HttpStep};
use super::spec::{self, CallSpec, Definition, Environment, Refusal, WhenSpec};
use crate::engine::{Handler, InputError, RetryPolicy, RunView, Source, StepDef, Workflow};

/// Compiles `definition` as version `version` of `name`, or refuses it with the field.
pub fn compile(
    name: &str,
    version: i32,
    definition: &Definition,
    env: &Environment,
    client: &reqwest::Client,
) -> Result<Workflow, Refusal> {
    definition.check_shape()?;
    let mut endpoints = HashMap::new();
    for (endpoint_name, endpoint) in &definition.endpoints {
        let field = format!("endpoints.{endpoint_name}");
        let base_url = check_base_url(&format!("{field}.base_url"), &endpoint.base_url, env.allow_http)?;
        let secret = |var_field: &str, var: &Option<String>| -> Result<Option<(String, String)>, Refusal> {
            let Some(var) = var else {
                return Ok(None);
            };
            match (env.var)(var) {
                Some(value) if !value.is_empty() => Ok(Some((var.clone(), value))),
                _ => Err(Refusal::new(
                    format!("{field}.{var_field}"),
                    format!("environment variable {var} is not set on this instance"),
                )),
            }
        };
        let signing_key = match secret("secret_env", &endpoint.secret_env)? {
            Some((var, value)) => Some(spec::signing_key(&format!("{field}.secret_env"), &var, &value)?),
            None => None,
        };
        let token = secret("token_env", &endpoint.token_env)?.map(|(_, value)| value);
        let timeout = match &endpoint.timeout {
            Some(text) => spec::duration(&format!("{field}.timeout"), text)?,
            None => spec::DEFAULT_TIMEOUT,
        };
        let compiled = Endpoint {
            name: endpoint_name.clone(),
            base_url,
            signing_key,
            token,
        };
        endpoints.insert(endpoint_name.clone(), (Arc::new(compiled), timeout));
    }
    let call = |field: &str, spec: &CallSpec| -> Result<Call, Refusal> {
        let (endpoint, default_timeout) = endpoints
            .get(&spec.endpoint)
            .ok_or_else(|| Refusal::new(format!("{field}.endpoint"), "unknown endpoint"))?;
        let timeout = match &spec.timeout {
            Some(text) => spec::duration(&format!("{field}.timeout"), text)?,
            None => *default_timeout,
        };
        Ok(Call {
            endpoint: Arc::clone(endpoint),
            path: spec.path.clone(),
            timeout,
        })
    };

    let mut builder = Workflow::builder(name, version)
        .source(Source::Defined)
        .description(definition.description.clone());
    if let Some(schema) = &definition.input_schema {
        let validator = jsonschema::validator_for(schema)
            .map_err(|e| Refusal::new("input_schema", format!("not a valid JSON Schema: {e}")))?;
        builder = builder.input_check(move |input| match validator.validate(input) {
            Ok(()) => Ok(()),
            Err(error) => Err(input_error(&error)),
        });
    } else {
        builder = builder.input_check(|input| {
            if input.is_object() {
                Ok(())
            } else {
                Err(InputError::new(".", "the input must be a JSON object"))
            }
        });
    }
    if let Some(pointer) = definition.subject.clone() {
        builder = builder.subject(move |input| match input.pointer(&pointer)? {
            Value::String(text) => Some(text.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        });
    }
    for (i, step) in definition.steps.iter().enumerate() {
        let field = format!("steps[{i}]");
        let mut def = match (&step.invoke, &step.wait, &step.sleep, &step.sleep_until) {
            (Some(invoke), ..) => {
                let invoke = call(&format!("{field}.invoke"), invoke)?;
                http_step(&field, step, invoke, &call, client, env)?
            }
            (None, Some(wait), ..) => {
                let timeout = spec::wait_duration(&format!("{field}.wait.timeout"), &wait.timeout, env.max_wait)?;
                StepDef::signal(step.name.clone(), wait.signal.clone(), timeout)
                    .on_timeout(wait.on_timeout.unwrap_or_default())
            }
            (None, None, Some(sleep), _) => {
                let duration = spec::wait_duration(&format!("{field}.sleep"), sleep, env.max_wait)?;
                StepDef::sleep(step.name.clone(), duration)
            }
            (None, None, None, Some(until)) => StepDef::sleep_until(step.name.clone(), until.pointer.clone()),
            (None, None, None, None) => {
                return Err(Refusal::new(format!("{field}.invoke"), "a step needs `invoke`"));
            }
        };
        if let Some(when) = step.when.clone() {
            def = def.when(move |view| holds(&when, view));
        }
        builder = builder.step(def);
    }
    builder.build().map_err(|e| Refusal::new("name", e.to_string()))
}

/// The HTTP step of a definition's step with `invoke`.
fn http_step(
    field: &str,
    step: &spec::StepSpec,
    invoke: Call,
    call: &dyn Fn(&str, &CallSpec) -> Result<Call, Refusal>,
    client: &reqwest::Client,
    env: &Environment,
) -> Result<StepDef, Refusal> {
    let compensate = match &step.compensate {
        Some(spec) => Some(call(&format!("{field}.compensate"), spec)?),
        None => None,
    };
    // The engine's timeout is a backstop a little after the call's own, so the call's
    // timeout (with what the attempt saw) is the one recorded.
    let longest = compensate
        .as_ref()
        .map_or(invoke.timeout, |c| c.timeout.max(invoke.timeout));
    let target = match &compensate {
        Some(c) => format!("{}; undo: {}", invoke.describe(), c.describe()),
        None => invoke.describe(),
    };
    let has_compensation = compensate.is_some();
    let http = HttpStep {
        client: client.clone(),
        invoke,
        compensate,
        asynchronous: step.asynchronous.is_some(),
    };
    let mut def = if has_compensation {
        StepDef::with_handler(step.name.clone(), Handler::compensable(http))
    } else {
        StepDef::with_handler(step.name.clone(), Handler::new(http))
    }
    .timeout(longest + Duration::from_secs(1))
    .target(target);
    if let Some(retry) = &step.retry {
        def = def.retry(retry.policy(RetryPolicy::default()));
    }
    if let Some(retry) = &step.compensation_retry {
        def = def.compensation_retry(retry.policy(RetryPolicy::attempts(5)));
    }
    if let Some(asynchronous) = &step.asynchronous {
        let field = format!("{field}.async");
        let timeout = spec::wait_duration(&format!("{field}.timeout"), &asynchronous.timeout, env.max_wait)?;
        let beat = match &asynchronous.heartbeat_timeout {
            Some(text) => Some(spec::wait_duration(
                &format!("{field}.heartbeat_timeout"),
                text,
                timeout,
            )?),
            None => None,
        };
        def = def
            .asynchronous(timeout, beat)
            .on_timeout(asynchronous.on_timeout.unwrap_or_default());
    }
    Ok(def)
}

/// Whether a `when` test holds on the input and the outputs recorded so far.
fn holds(when: &WhenSpec, view: &RunView<'_>) -> bool {
    let found = resolve(&when.pointer, view);
    match (&when.equals, when.exists) {
        (Some(expected), _) => found == Some(expected),
        (None, Some(exists)) => found.is_some() == exists,
        (None, None) => false,
    }
}

fn resolve<'a>(pointer: &str, view: &RunView<'a>) -> Option<&'a Value> {
    if let Some(rest) = pointer.strip_prefix("/input") {
        return view.input_value().pointer(rest);
    }
    let rest = pointer.strip_prefix("/steps/")?;
    let (step, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let inner = tail.strip_prefix("output")?;
    view.output_value(step)?.pointer(inner)
}

/// The field a schema error is about, as the rest of the API names fields
/// (`order.email`, `.` for the whole input).
fn input_error(error: &jsonschema::ValidationError<'_>) -> InputError {
    let mut segments: Vec<String> = error
        .instance_path()
        .as_str()
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    if let jsonschema::error::ValidationErrorKind::Required { property } = error.kind()
        && let Some(name) = property.as_str()
    {
        segments.push(name.to_string());
    }
    let field = if segments.is_empty() {
        ".".to_string()
    } else {
        segments.join(".")
    };
    InputError::new(field, error.to_string())
}

/// A base URL a definition may call: `https`, or `http` to loopback unless plain HTTP is
/// allowed; no credentials, query or fragment in it.
pub(crate) fn check_base_url(field: &str, text: &str, allow_http: bool) -> Result<String, Refusal> {
    let url = reqwest::Url::parse(text).map_err(|e| Refusal::new(field, format!("`{text}` is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
        return Err(Refusal::new(
            field,
            "no credentials, query or fragment in a base URL (credentials go in `token_env`)",
        ));
    }
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback || allow_http => {}
        "http" => {
            return Err(Refusal::new(
                field,
                "plain http is allowed only to loopback; use https, or start the server with --allow-http-endpoints",
            ));
        }
        other => return Err(Refusal::new(field, format!("scheme `{other}` is not http or https"))),
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}
