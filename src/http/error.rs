//! The one place where errors become HTTP responses: `{"error": {"code", "message"}}` with
//! the status of docs/contract.md §5. Internal errors are logged with their detail and answered with
//! a generic message.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::store::DomainError;
use crate::engine::EngineError;
use crate::engine::scheduler::{ExprError, ScheduleError};

/// An error answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// 401: no token, or a wrong one.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 403: a valid token without the right (the API token on an operator action).
    #[error("this action needs the admin token")]
    Forbidden,
    /// 404: no such thing.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// What was looked for (`run`, `workflow`, ...).
        what: &'static str,
        /// Its id as given.
        id: String,
    },
    /// 404: no such route.
    #[error("no route for {0}")]
    NoRoute(String),
    /// 405: the route exists, not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the request conflicts with the state of things.
    #[error("{message}")]
    Conflict {
        /// Machine-readable code.
        code: &'static str,
        /// What conflicts.
        message: String,
    },
    /// 413: the body is over the limit.
    #[error("request body over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 408: the client did not send its body in time.
    #[error("the request body did not arrive within {}", humantime::format_duration(*.after))]
    SlowBody {
        /// The deadline.
        after: std::time::Duration,
    },
    /// 431: more header fields or bytes than a request may carry.
    #[error("request headers over the limit of {fields} fields or {bytes} bytes")]
    HeadersTooLarge {
        /// The most fields.
        fields: usize,
        /// The most bytes.
        bytes: usize,
    },
    /// 429: too many failed authentications from this client address; try again later.
    #[error("too many failed attempts from this address; try again in {retry_after_s} s")]
    Throttled {
        /// Seconds until the address may try again (`Retry-After`).
        retry_after_s: u64,
    },
    /// 422: valid JSON (or parameters) failing the schema; names the field.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field or parameter.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// 503: a change that must lock the hot path's tables could not get the lock in time;
    /// nothing changed, and it may be sent again after `Retry-After`.
    #[error("{message}")]
    Busy {
        /// What was busy.
        message: String,
        /// Seconds after which to try again (`Retry-After`).
        retry_after_s: u64,
    },
    /// 503: the database is unreachable.
    #[error("the database is unavailable")]
    Unavailable,
    /// 503: the answer was not ready within the request deadline.
    #[error("no answer within {}; the request may still take effect", humantime::format_duration(*.after))]
    AnswerTimeout {
        /// The deadline.
        after: std::time::Duration,
    },
    /// 500: anything else; the detail goes to the log only.
    #[error("internal error")]
    Internal(String),
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `malformed_json`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `idempotency_conflict`, `not_allowed`, `already_retried`,
    /// `duplicate`, `in_flight`, `payload_too_large`, `invalid_input`, `request_timeout`,
    /// `headers_too_large`, `throttled`, `busy`, `unavailable`, `timeout`, `internal`.
    pub code: String,
    /// For people.
    pub message: String,
    /// The offending field (422 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// A 422 about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound { .. } | Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::SlowBody { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Busy { .. } | Self::Unavailable | Self::AnswerTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound { .. } | Self::NoRoute(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict { code, .. } => code,
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::Invalid { .. } => "invalid_input",
            Self::SlowBody { .. } => "request_timeout",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::Throttled { .. } => "throttled",
            Self::Busy { .. } => "busy",
            Self::Unavailable => "unavailable",
            Self::AnswerTimeout { .. } => "timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// The error body.
    pub fn body(&self) -> ErrorBody {
        let message = match self {
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error answering a request");
                "internal error; see the server log".to_string()
            }
            other => other.to_string(),
        };
        let field = match self {
            Self::Invalid { field, .. } => Some(field.clone()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message,
                field,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::Throttled { retry_after_s } | Self::Busy { retry_after_s, .. } = self
            && let Ok(value) = HeaderValue::from_str(&retry_after_s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => Self::Unavailable,
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::UnknownWorkflow(name) => Self::NotFound {
                what: "workflow",
                id: name,
            },
            EngineError::InvalidInput(e) => Self::Invalid {
                field: e.field,
                message: e.message,
            },
            EngineError::InvalidIdempotencyKey => {
                Self::invalid("Idempotency-Key", "must be 1 to 255 printable characters")
            }
            e @ (EngineError::IdempotencyConflict { .. } | EngineError::IdempotencyKeyTaken { .. }) => Self::Conflict {
                code: "idempotency_conflict",
                message: e.to_string(),
            },
            e @ EngineError::ReservedIdempotencyKey => Self::invalid("Idempotency-Key", e.to_string()),
            EngineError::RunNotFound(id) => Self::NotFound {
                what: "run",
                id: id.to_string(),
            },
            e @ EngineError::NotAllowed { .. } => Self::Conflict {
                code: "not_allowed",
                message: e.to_string(),
            },
            e @ EngineError::AlreadyRetried { .. } => Self::Conflict {
                code: "already_retried",
                message: e.to_string(),
            },
            EngineError::RunKeyNotFound { key, .. } => Self::NotFound {
                what: "run with idempotency key",
                id: key,
            },
            e @ EngineError::InvalidNote => Self::invalid("note", e.to_string()),
            e @ EngineError::BulkLimit { .. } => Self::invalid("limit", e.to_string()),
            e @ EngineError::WorkflowPauseState { paused, .. } => Self::Conflict {
                code: if paused { "already_paused" } else { "not_paused" },
                message: e.to_string(),
            },
            e @ EngineError::NothingToResolve { .. } => Self::Conflict {
                code: "nothing_to_resolve",
                message: e.to_string(),
            },
            e @ EngineError::CannotRestartFrom { .. } => Self::Conflict {
                code: "cannot_restart_from",
                message: e.to_string(),
            },
            e @ EngineError::RunFinished { .. } => Self::Conflict {
                code: "run_finished",
                message: e.to_string(),
            },
            e @ EngineError::UnknownSignal { .. } => Self::Conflict {
                code: "unknown_signal",
                message: e.to_string(),
            },
            EngineError::StepNotFound { step, .. } => Self::NotFound { what: "step", id: step },
            e @ EngineError::NotAsynchronous { .. } => Self::Conflict {
                code: "not_asynchronous",
                message: e.to_string(),
            },
            e @ EngineError::StaleAttempt { .. } => Self::Conflict {
                code: "stale_attempt",
                message: e.to_string(),
            },
            e @ EngineError::AlreadyCompleted { .. } => Self::Conflict {
                code: "already_completed",
                message: e.to_string(),
            },
            EngineError::Database(e) => e.into(),
            e @ (EngineError::Definition(_) | EngineError::PlanChanged { .. } | EngineError::Internal(_)) => {
                Self::Internal(e.to_string())
            }
        }
    }
}

impl From<ScheduleError> for ApiError {
    fn from(error: ScheduleError) -> Self {
        let message = error.to_string();
        match error {
            ScheduleError::InvalidName(_) | ScheduleError::NameMismatch { .. } => Self::invalid("name", message),
            ScheduleError::Expression(ExprError::Expression { .. }) | ScheduleError::NeverFires(_) => {
                Self::invalid("expression", message)
            }
            ScheduleError::Expression(ExprError::TimeZone { .. }) => Self::invalid("time_zone", message),
            ScheduleError::UnknownWorkflow(_) => Self::invalid("workflow", message),
            ScheduleError::InvalidInput { error, .. } => {
                let field = if error.field == "." {
                    "input".to_string()
                } else {
                    format!("input.{}", error.field)
                };
                Self::invalid(field, message)
            }
            ScheduleError::Duplicate(_) => Self::Conflict {
                code: "duplicate",
                message,
            },
            ScheduleError::InFlight(_) => Self::Conflict {
                code: "in_flight",
                message,
            },
            ScheduleError::NotFound(name) => Self::NotFound {
                what: "schedule",
                id: name,
            },
            ScheduleError::Engine(e) => e.into(),
            ScheduleError::Database(e) => e.into(),
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::Duplicate(message) => Self::Conflict {
                code: "duplicate",
                message,
            },
            DomainError::UnknownEvent(id) => Self::invalid("after", format!("no released event has id `{id}`")),
            DomainError::Database(e) => e.into(),
        }
    }
}
