//! Serving the application on a socket with limits a slow or hostile client cannot outlast:
//! a cap on open connections, a deadline for a request's headers (which also closes a
//! keep-alive connection left idle), one for its body and one for its answer.
//!
//! `axum::serve` sets none of these, so the accept loop is our own, on hyper-util's
//! connection builder and its graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::error::ApiError;
use super::extract::BODY_LIMIT;

/// How long clients get, and how many may be connected at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// From a connection's first byte, or from the end of its previous answer, until the
    /// request's headers have arrived. hyper starts this clock whenever it waits for a
    /// request, so it is also how long an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// From the headers to the last byte of the body.
    pub body_timeout: Duration,
    /// From the request to the answer's headers (a trigger may wait up to 30 s by itself).
    pub request_timeout: Duration,
    /// Connections open at once; past it, new connections wait in the listen backlog until
    /// one closes.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// The most header fields, and header bytes, a request may carry. hyper itself refuses more
/// than twice as many fields or about 400 KB with a bare 431 before the application sees
/// the request; between our limits and hyper's the answer is the API's error shape.
const MAX_HEADERS: usize = 100;
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves `app` on `listener` within `limits` until `stop` is cancelled, then lets the
/// requests in flight finish (connections are closed as soon as they are idle).
pub async fn serve(listener: TcpListener, app: Router, limits: HttpLimits, stop: CancellationToken) {
    let app = app.layer(axum::middleware::from_fn(move |request, next| {
        within_limits(limits, request, next)
    }));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(2 * MAX_HEADERS);
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // pause rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = app
            .clone()
            .map_request(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The client's address, as the accept loop saw it (none when the application is driven
/// without a socket, as in-process tests may).
pub fn peer_of(request_extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    request_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr)
}

/// Refuses oversized headers in the API's error shape, reads the body within its deadline and
/// limit, and answers within the request deadline.
async fn within_limits(limits: HttpLimits, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        return closing(
            ApiError::HeadersTooLarge {
                fields: MAX_HEADERS,
                bytes: MAX_HEADER_BYTES,
            }
            .into_response(),
        );
    }
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, BODY_LIMIT + 1)).await {
        Err(_) => {
            return closing(
                ApiError::SlowBody {
                    after: limits.body_timeout,
                }
                .into_response(),
            );
        }
        // Over the limit (the extractors would say so as well), or the client went away.
        Ok(Err(e)) => {
            let too_large =
                std::error::Error::source(&e).is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            return closing(if too_large {
                ApiError::PayloadTooLarge { limit: BODY_LIMIT }.into_response()
            } else {
                ApiError::MalformedJson(format!("the request body could not be read: {e}")).into_response()
            });
        }
        Ok(Ok(bytes)) => bytes,
    };
    let request = Request::from_parts(parts, Body::from(body));
    match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => closing(
            ApiError::AnswerTimeout {
                after: limits.request_timeout,
            }
            .into_response(),
        ),
    }
}

/// Asks the client to close the connection after this answer: after a refusal at this level
/// the connection's state is not worth trusting.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
