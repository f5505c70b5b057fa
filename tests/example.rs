//! The README's order saga, run for real: the Python participant of `examples/order-saga`
//! (standard library only, verifying every signature) driven by a real server through the
//! definition in `examples/order-saga/order.json`.
//!
//! Needs `python3`. Without it the test fails when `SAGAFLOW_REQUIRE_PYTHON=1` (as `.ci/run`
//! sets) and otherwise says loudly that it did not run, so that `cargo test` stays true on a
//! machine with only Rust and PostgreSQL.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::server::{self, read};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SECRET: &str = "whsec_c2FnYWZsb3ctZXhhbXBsZS1zZWNyZXQtMzItYnl0ZXMh";
const WRONG: &str = "whsec_bm90LXRoZS1wYXJ0aWNpcGFudHMtc2VjcmV0LWF0LWFsbA==";

struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python3() -> bool {
    let found = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let required = std::env::var("SAGAFLOW_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
        assert!(!required, "python3 not found and SAGAFLOW_REQUIRE_PYTHON=1");
        eprintln!("\n*** WARNING: the example participant test did NOT run: no python3 on this machine. ***\n");
    }
    found
}

async fn participant(port: u16) -> Python {
    let child = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/order-saga/participant.py"
        ))
        .arg(port.to_string())
        .env("SAGAFLOW_SECRET_SHOP", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 participant.py");
    let python = Python(child);
    common::eventually(Duration::from_secs(20), "the participant to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    python
}

fn definition(port: u16, secret_env: &str) -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/order-saga/order.json"))
        .expect("order.json");
    let mut definition: Value = serde_json::from_str(&text).expect("json");
    definition["endpoints"]["shop"]["base_url"] = json!(format!("http://127.0.0.1:{port}/saga"));
    definition["endpoints"]["shop"]["secret_env"] = json!(secret_env);
    definition
}

#[tokio::test]
async fn the_example_order_saga_completes_compensates_and_refuses_a_wrong_signature() {
    if !python3() {
        return;
    }
    let port = common::process::free_port();
    let _participant = participant(port).await;
    let server = server::start_with(|config| {
        config.defined.vars = Some(Arc::new(|name: &str| match name {
            "SAGAFLOW_SECRET_SHOP" => Some(SECRET.to_string()),
            "WRONG_SECRET" => Some(WRONG.to_string()),
            _ => None,
        }))
    })
    .await;
    for (name, secret_env) in [("order", "SAGAFLOW_SECRET_SHOP"), ("order-wrong-key", "WRONG_SECRET")] {
        let (status, body) = read(
            server
                .admin(Method::PUT, &format!("/v1/workflow-definitions/{name}"))
                .json(&definition(port, secret_env))
                .send()
                .await
                .expect("put"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let run = |name: &'static str, order: Value| {
        let server = &server;
        async move {
            let (status, body) = read(
                server
                    .api(Method::POST, &format!("/v1/workflows/{name}/runs?wait_ms=15000"))
                    .json(&json!({"order": order}))
                    .send()
                    .await
                    .expect("trigger"),
            )
            .await;
            assert!(status.is_success(), "{status}: {body}");
            server.wait_terminal(body["id"].as_str().expect("id")).await
        }
    };

    let shipped = run(
        "order",
        json!({"id": "1001", "email": "ada@example.com", "needs_shipping": true}),
    )
    .await;
    assert_eq!(shipped["status"], "completed", "{shipped}");
    assert_eq!(shipped["output"], json!({"shipment": "S-1001"}));
    assert_eq!(
        shipped["steps"][1]["output"],
        json!({"charge": "C-1001", "for": "R-1001"})
    );

    let declined = run(
        "order",
        json!({"id": "1002", "email": "bob@example.com", "card": "declined"}),
    )
    .await;
    assert_eq!(declined["status"], "compensated", "{declined}");
    assert!(
        declined["error"]["message"]
            .as_str()
            .expect("message")
            .contains("card_declined")
    );
    assert_eq!(declined["steps"][0]["status"], "compensated");

    let refused = run("order-wrong-key", json!({"id": "1003", "email": "eve@example.com"})).await;
    assert_eq!(refused["status"], "compensated", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .expect("message")
            .contains("bad_signature"),
        "{refused}"
    );
    server.stop().await;
}

/// The README's waiting order: paid by a signal addressed by the order's key (delivered twice,
/// consumed once) and shipped; an order nobody pays has its stock released at the deadline
/// (shortened here from the file's 30 s to 1 s).
#[tokio::test]
async fn the_example_waiting_order_ships_once_paid_and_releases_its_stock_when_not() {
    if !python3() {
        return;
    }
    let port = common::process::free_port();
    let _participant = participant(port).await;
    let server = server::start_with(|config| {
        config.defined.vars = Some(Arc::new(|name: &str| {
            (name == "SAGAFLOW_SECRET_SHOP").then(|| SECRET.to_string())
        }))
    })
    .await;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/order-saga/order-waits.json"
    ))
    .expect("order-waits.json");
    let mut definition: Value = serde_json::from_str(&text).expect("json");
    definition["endpoints"]["shop"]["base_url"] = json!(format!("http://127.0.0.1:{port}/saga"));
    definition["steps"][1]["wait"]["timeout"] = json!("1s");
    let (status, body) = read(
        server
            .admin(Method::PUT, "/v1/workflow-definitions/order-waits")
            .json(&definition)
            .send()
            .await
            .expect("put"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let trigger = |key: &'static str, id: &'static str| {
        let server = &server;
        async move {
            let (status, body) = read(
                server
                    .api(Method::POST, "/v1/workflows/order-waits/runs")
                    .header("idempotency-key", key)
                    .json(&json!({"order": {"id": id, "email": format!("{id}@example.com")}}))
                    .send()
                    .await
                    .expect("trigger"),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["id"].as_str().expect("id").to_string()
        }
    };
    let paid = trigger("order-2001", "2001").await;
    let unpaid = trigger("order-2002", "2002").await;
    // Signalled at once: kept even if the run has not reached its wait yet.
    let webhook = "/v1/workflows/order-waits/runs/by-key/order-2001/signals/payment.succeeded";
    for expected in [StatusCode::ACCEPTED, StatusCode::OK] {
        let (status, body) = read(
            server
                .api(Method::POST, webhook)
                .header("idempotency-key", "evt_1")
                .json(&json!({"amount": 4200}))
                .send()
                .await
                .expect("signal"),
        )
        .await;
        assert_eq!(status, expected, "{body}");
    }
    let shipped = server.wait_terminal(&paid).await;
    assert_eq!(shipped["status"], "completed", "{shipped}");
    assert_eq!(shipped["steps"][1]["output"], json!({"amount": 4200}));
    assert_eq!(shipped["output"], json!({"shipment": "S-2001"}));
    let released = server.wait_terminal(&unpaid).await;
    assert_eq!(released["status"], "compensated", "{released}");
    assert_eq!(released["error"]["step"], "await-payment");
    assert_eq!(released["steps"][0]["status"], "compensated");
    server.stop().await;
}
