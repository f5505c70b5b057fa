//! A participant service for HTTP steps: a real HTTP server on port 0 that records every
//! request (path, headers, body, when) and answers each path from a script, or with
//! `{"path": ..., "n": ...}` when the script has nothing for it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the participant answers to one request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A status and a JSON body.
    Json(u16, Value),
    /// A status, headers and a raw body.
    Raw(u16, Vec<(&'static str, String)>, Vec<u8>),
    /// Waits, then answers.
    After(Duration, Box<Answer>),
}

/// One request the participant received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub raw: Bytes,
    pub body: Value,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    script: Mutex<HashMap<String, VecDeque<Answer>>>,
}

pub struct Participant {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Participant {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(answer).with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/saga", self.addr)
    }

    /// Answers the next requests to `path` (under `/saga`) with these, in order.
    pub fn script(&self, path: &str, answers: impl IntoIterator<Item = Answer>) {
        let mut script = self.shared.script.lock().expect("script");
        script.entry(format!("/saga{path}")).or_default().extend(answers);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().expect("seen").clone()
    }

    /// The requests to `path` (under `/saga`).
    pub fn seen_at(&self, path: &str) -> Vec<Seen> {
        let full = format!("/saga{path}");
        self.seen().into_iter().filter(|s| s.path == full).collect()
    }

    /// The paths requested, in order, without the `/saga` prefix.
    pub fn paths(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .map(|s| s.path.trim_start_matches("/saga").to_string())
            .collect()
    }
}

impl Drop for Participant {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, raw: Bytes) -> Response {
    let path = uri.path().to_string();
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let n = {
        let mut seen = shared.seen.lock().expect("seen");
        seen.push(Seen {
            path: path.clone(),
            headers,
            raw,
            body,
            at: Instant::now(),
        });
        seen.iter().filter(|s| s.path == path).count()
    };
    let scripted = shared
        .script
        .lock()
        .expect("script")
        .get_mut(&path)
        .and_then(VecDeque::pop_front);
    let mut answer = scripted.unwrap_or_else(|| Answer::Json(200, json!({"path": path, "n": n})));
    loop {
        match answer {
            Answer::After(wait, then) => {
                tokio::time::sleep(wait).await;
                answer = *then;
            }
            Answer::Json(status, body) => {
                return (StatusCode::from_u16(status).expect("status"), axum::Json(body)).into_response();
            }
            Answer::Raw(status, headers, body) => {
                let mut response = (StatusCode::from_u16(status).expect("status"), body).into_response();
                for (name, value) in headers {
                    if let Ok(value) = value.parse() {
                        response.headers_mut().insert(name, value);
                    }
                }
                return response;
            }
        }
    }
}
