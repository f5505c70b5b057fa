//! The HTTP-step workload's participant: an axum server in the bench's process that answers
//! every call at once, so the phase measures sagaflow's cost per HTTP step, not a service's.

use anyhow::Result;
use axum::Router;
use axum::extract::Json;
use axum::http::Uri;
use serde_json::{Value, json};

/// A participant listening on a free loopback port.
pub struct Participant {
    /// Its base URL (`http://127.0.0.1:<port>/saga`).
    pub base_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Participant {
    /// Starts it.
    pub async fn start() -> Result<Self> {
        let app = Router::new().fallback(|uri: Uri, Json(_request): Json<Value>| async move {
            Json(json!({"ok": true, "path": uri.path()}))
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}/saga", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { base_url, task })
    }

    /// A three-step saga calling it, each step with a compensation.
    pub fn definition(&self) -> Value {
        let step = |name: &str| {
            json!({"name": name,
                   "invoke": {"endpoint": "participant", "path": format!("/{name}")},
                   "compensate": {"endpoint": "participant", "path": format!("/{name}/undo")}})
        };
        json!({
            "description": "The bench's HTTP-step saga",
            "endpoints": {"participant": {"base_url": self.base_url, "timeout": "10s"}},
            "steps": [step("reserve"), step("charge"), step("ship")]
        })
    }
}

impl Drop for Participant {
    fn drop(&mut self) {
        self.task.abort();
    }
}
