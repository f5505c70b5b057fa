//! The operator dashboard over a real listener and a real PostgreSQL: every page and action,
//! each refusal (no login, bad CSRF token, wrong token, bad parameters), escaping, page size
//! bounds and live updates.

mod common;

use std::time::Duration;

use common::server::{self, ADMIN_TOKEN, API_TOKEN, TestServer, read, registration};
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use sagaflow::http::auth::Tokens;
use sagaflow::http::dashboard::session::Keys;
use serde_json::{Value, json};

/// A browser-like client: no redirects followed, cookies handled by hand.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// What a response says.
struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    async fn of(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.expect("body");
        Self { status, headers, body }
    }

    fn location(&self) -> &str {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The value a `Set-Cookie` gives to `name`, with its attributes.
    fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(str::to_string)
    }

    /// The CSRF token of the page's forms.
    fn csrf(&self) -> String {
        hidden(&self.body, "csrf").expect("a form with a CSRF token")
    }
}

fn hidden(body: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = body.find(&marker)? + marker.len();
    let end = body[start..].find('"')? + start;
    Some(body[start..end].to_string())
}

/// The text a browser shows for some HTML (entities decoded).
fn text_of(html: &str) -> String {
    html.replace("&#60;", "<")
        .replace("&lt;", "<")
        .replace("&#62;", ">")
        .replace("&gt;", ">")
        .replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The words a browser shows for some HTML: tags dropped, entities decoded, whitespace
/// collapsed.
fn words_of(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text_of(&text).split_whitespace().collect::<Vec<_>>().join(" ")
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_string()
}

/// A logged-in browser.
struct Session {
    client: reqwest::Client,
    cookie: String,
    csrf: String,
}

impl Session {
    async fn get(&self, server: &TestServer, path: &str) -> Page {
        Page::of(
            self.client
                .get(server.url(path))
                .header("cookie", &self.cookie)
                .send()
                .await
                .expect("get"),
        )
        .await
    }

    async fn post(&self, server: &TestServer, path: &str, fields: &[(&str, &str)]) -> Page {
        Page::of(
            self.client
                .post(server.url(path))
                .header("cookie", &self.cookie)
                .form(fields)
                .send()
                .await
                .expect("post"),
        )
        .await
    }
}

/// The login form: its nonce cookie and CSRF token.
async fn login_form(server: &TestServer, client: &reqwest::Client) -> (String, String) {
    let page = Page::of(client.get(server.url("/login")).send().await.expect("login form")).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let cookie = page.set_cookie("sagaflow_login").expect("login nonce cookie");
    (cookie_pair(&cookie), page.csrf())
}

async fn post_login(server: &TestServer, client: &reqwest::Client, cookie: &str, fields: &[(&str, &str)]) -> Page {
    Page::of(
        client
            .post(server.url("/login"))
            .header("cookie", cookie)
            .form(fields)
            .send()
            .await
            .expect("login"),
    )
    .await
}

async fn login(server: &TestServer, operator: &str) -> Session {
    let client = client();
    let (nonce, csrf) = login_form(server, &client).await;
    let page = post_login(
        server,
        &client,
        &nonce,
        &[
            ("token", ADMIN_TOKEN),
            ("operator", operator),
            ("csrf", &csrf),
            ("next", "/"),
        ],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let cookie = cookie_pair(&page.set_cookie("sagaflow_session").expect("session cookie"));
    let mut session = Session {
        client,
        cookie,
        csrf: String::new(),
    };
    session.csrf = session.get(server, "/").await.csrf();
    session
}

/// A registration that ends `compensated` (its email already has an account); returns
/// (completed run, compensated run).
async fn compensated_registration(server: &TestServer, email: &str) -> (Value, Value) {
    let first = server.identity(email).await;
    let done = server.register(&first, email).await;
    assert_eq!(done["status"], "completed", "{done}");
    let second = server.identity(&format!("second.{email}")).await;
    let failed = server.register(&second, email).await;
    assert_eq!(failed["status"], "compensated", "{failed}");
    (done, failed)
}

/// Stores `definition` as the workflow `name` (a new one: 201).
async fn define(server: &TestServer, name: &str, definition: &Value) {
    let (status, body) = read(
        server
            .admin(Method::PUT, &format!("/v1/workflow-definitions/{name}"))
            .json(definition)
            .send()
            .await
            .expect("put"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Triggers a run of `workflow` and returns its id.
async fn trigger(server: &TestServer, workflow: &str, input: &Value) -> String {
    let (status, run) = read(
        server
            .api(Method::POST, &format!("/v1/workflows/{workflow}/runs"))
            .json(input)
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert!(status.is_success(), "{status}: {run}");
    id_of(&run)
}

fn id_of(run: &Value) -> String {
    run["id"].as_str().expect("run id").to_string()
}

async fn api_run(server: &TestServer, id: &str) -> Value {
    let (status, body) = read(
        server
            .api(Method::GET, &format!("/v1/runs/{id}"))
            .send()
            .await
            .expect("get run"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn api_events(server: &TestServer, id: &str) -> Vec<Value> {
    let (_, body) = read(
        server
            .api(Method::GET, &format!("/v1/runs/{id}/events"))
            .send()
            .await
            .expect("events"),
    )
    .await;
    body["events"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn every_page_and_action_needs_a_login() {
    let server = server::start().await;
    let (_, failed) = compensated_registration(&server, "nologin@example.com").await;
    let id = id_of(&failed);
    let client = client();
    let before = server.row_counts().await;

    // Pages send the browser to the login form, which brings it back.
    let page = Page::of(client.get(server.url("/")).send().await.expect("get")).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), "/login?next=/");
    let page = Page::of(
        client
            .get(server.url(&format!("/runs/{id}?done=x")))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), format!("/login?next=/runs/{id}%3Fdone%3Dx"));

    // Actions and the live feed: 401, nothing done.
    for path in [
        format!("/runs/{id}/retry"),
        format!("/runs/{id}/cancel"),
        "/logout".into(),
    ] {
        let page = Page::of(
            client
                .post(server.url(&path))
                .form(&[("csrf", "whatever")])
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(page.body.contains("not logged in"), "{path}: {}", page.body);
    }
    let page = Page::of(client.get(server.url("/live/changes")).send().await.expect("get")).await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);

    // A bearer token is not a session: the dashboard is for browsers.
    let page = Page::of(
        client
            .post(server.url(&format!("/runs/{id}/retry")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);

    assert_eq!(server.row_counts().await, before, "a refused action writes nothing");
    assert!(api_run(&server, &id).await["retried_by"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn logging_in_checks_the_token_the_form_and_the_name() {
    let server = server::start().await;
    let client = client();
    let (nonce, csrf) = login_form(&server, &client).await;

    let attempt = |token: &'static str, operator: String, csrf: String, cookie: String| {
        let client = client.clone();
        let server = &server;
        async move {
            post_login(
                server,
                &client,
                &cookie,
                &[
                    ("token", token),
                    ("operator", &operator),
                    ("csrf", &csrf),
                    ("next", "/runs/x"),
                ],
            )
            .await
        }
    };

    // A wrong token, the API token, a stale or missing form token, a bad name: the form again,
    // no session.
    let cases = [
        (
            "not-the-token",
            "ada".to_string(),
            csrf.clone(),
            nonce.clone(),
            StatusCode::UNAUTHORIZED,
            "not the admin token",
        ),
        (
            API_TOKEN,
            "ada".to_string(),
            csrf.clone(),
            nonce.clone(),
            StatusCode::FORBIDDEN,
            "the API token",
        ),
        (
            ADMIN_TOKEN,
            "ada".to_string(),
            "forged".to_string(),
            nonce.clone(),
            StatusCode::FORBIDDEN,
            "stale",
        ),
        (
            ADMIN_TOKEN,
            "ada".to_string(),
            csrf.clone(),
            String::new(),
            StatusCode::FORBIDDEN,
            "stale",
        ),
        (
            ADMIN_TOKEN,
            "x".repeat(201),
            csrf.clone(),
            nonce.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Operator name",
        ),
    ];
    for (token, operator, case_csrf, case_cookie, status, message) in cases {
        // Each attempt on a form of its own: a form can be submitted once.
        let (fresh_nonce, fresh_csrf) = login_form(&server, &client).await;
        let case_csrf = if case_csrf == csrf { fresh_csrf } else { case_csrf };
        let case_cookie = if case_cookie == nonce { fresh_nonce } else { case_cookie };
        let page = attempt(token, operator, case_csrf, case_cookie).await;
        assert_eq!(page.status, status, "{token}: {}", page.body);
        assert!(page.body.contains(message), "{token}: {}", page.body);
        assert!(page.set_cookie("sagaflow_session").is_none(), "{token}: no session");
        assert!(page.body.contains("name=\"csrf\""), "the form is shown again");
    }

    // Not a form at all.
    let page = Page::of(
        client
            .post(server.url("/login"))
            .header("cookie", &nonce)
            .json(&json!({"token": ADMIN_TOKEN, "csrf": csrf}))
            .send()
            .await
            .expect("login"),
    )
    .await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.body.contains("expected the login form"), "{}", page.body);
    assert!(page.set_cookie("sagaflow_session").is_none());

    // A form already submitted (here, with a wrong token) is stale, even with the right one.
    let page = attempt("not-the-token", "ada".into(), csrf.clone(), nonce.clone()).await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{}", page.body);
    let page = attempt(ADMIN_TOKEN, "ada".into(), csrf.clone(), nonce.clone()).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert!(page.body.contains("stale"), "{}", page.body);
    assert!(
        page.set_cookie("sagaflow_session").is_none(),
        "a replayed form opens no session"
    );

    // The admin token: a session cookie that scripts cannot read and other sites cannot send.
    let (nonce, csrf) = login_form(&server, &client).await;
    let page = attempt(ADMIN_TOKEN, " grace ".into(), csrf.clone(), nonce.clone()).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(page.location(), "/runs/x");
    let cookie = page.set_cookie("sagaflow_session").expect("session");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(
        page.set_cookie("sagaflow_login")
            .expect("cleared")
            .contains("Max-Age=0")
    );

    // Logged in, the login form moves on; `next` never leaves the site.
    let session = cookie_pair(&cookie);
    let page = Page::of(
        client
            .get(server.url("/login?next=/runs/y"))
            .header("cookie", &session)
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(page.location(), "/runs/y");
    let (nonce, csrf) = login_form(&server, &client).await;
    let page = post_login(
        &server,
        &client,
        &nonce,
        &[("token", ADMIN_TOKEN), ("csrf", &csrf), ("next", "//evil.example/")],
    )
    .await;
    assert_eq!(page.location(), "/");

    // Over HTTPS (a proxy says so), cookies are Secure.
    let (nonce, csrf) = login_form(&server, &client).await;
    let page = Page::of(
        client
            .post(server.url("/login"))
            .header("cookie", &nonce)
            .header("x-forwarded-proto", "https")
            .form(&[("token", ADMIN_TOKEN), ("csrf", csrf.as_str())])
            .send()
            .await
            .expect("login"),
    )
    .await;
    assert!(
        page.set_cookie("sagaflow_session")
            .expect("session")
            .contains("; Secure")
    );

    // The name is the one recorded on actions, and shown.
    let page = Page::of(
        client
            .get(server.url("/"))
            .header("cookie", &session)
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("signed in as <strong>grace</strong>"),
        "{}",
        page.body
    );
    server.stop().await;
}

#[tokio::test]
async fn forged_expired_and_foreign_sessions_are_refused() {
    let server = server::start().await;
    let client = client();
    let secret: Vec<u8> = sqlx::query_scalar("SELECT secret FROM dashboard_secret")
        .fetch_one(server.pool())
        .await
        .expect("the stored secret");
    let secret: [u8; 32] = secret.try_into().expect("32 bytes");
    let ours = Keys::new(&Tokens::new(API_TOKEN, ADMIN_TOKEN), &secret);
    let theirs = Keys::new(&Tokens::new(API_TOKEN, "another-admin-token"), &secret);
    let id_of = |session: &Session| {
        let (_, value) = session.cookie.split_once('=').expect("name=value");
        value.split_once('.').expect("id.signature").0.to_string()
    };
    let genuine = login(&server, "ops").await;
    let genuine_id = id_of(&genuine);
    let expired = login(&server, "ops").await;
    sqlx::query("UPDATE dashboard_sessions SET expires_at = now() - interval '1 second' WHERE id_hash = sha256($1)")
        .bind(id_of(&expired).as_bytes())
        .execute(server.pool())
        .await
        .expect("expire one session");
    assert_eq!(expired.get(&server, "/").await.status, StatusCode::SEE_OTHER);
    let cookies = [
        // Signed with the right key, even, but naming no session the server opened.
        format!("sagaflow_session={}", ours.seal("never-opened")),
        // An open session's id signed under another admin token.
        format!("sagaflow_session={}", theirs.seal(&genuine_id)),
        "sagaflow_session=garbage".to_string(),
        format!("{}x", genuine.cookie),
        expired.cookie.clone(),
    ];
    for cookie in cookies {
        let page = Page::of(
            client
                .get(server.url("/"))
                .header("cookie", &cookie)
                .send()
                .await
                .expect("get"),
        )
        .await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{cookie}");
        assert!(page.location().starts_with("/login"), "{cookie}");
    }
    // A genuine open one works.
    let page = genuine.get(&server, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn logging_out_needs_the_form_token_and_ends_the_session() {
    let server = server::start().await;
    let session = login(&server, "ops").await;
    let page = session.post(&server, "/logout", &[("csrf", "forged")]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.set_cookie("sagaflow_session").is_none());
    let other = login(&server, "ops").await;
    let page = session.post(&server, "/logout", &[("csrf", &session.csrf)]).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), "/login");
    assert!(
        page.set_cookie("sagaflow_session")
            .expect("cleared")
            .contains("Max-Age=0")
    );
    // Ended on the server: a copy of the cookie kept from before opens nothing, on this
    // instance or any other; another session is not affected.
    let page = session.get(&server, "/").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(page.location().starts_with("/login"));
    assert_eq!(other.get(&server, "/").await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn the_runs_list_finds_a_compensated_registration_by_email() {
    let server = server::start().await;
    let (done, failed) = compensated_registration(&server, "ada@example.com").await;
    let other = server.identity("bob@example.com").await;
    server.register(&other, "bob@example.com").await;
    let session = login(&server, "ops").await;

    // Everything, newest first, with the columns operators need.
    let page = session.get(&server, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    let positions: Vec<usize> = ["bob@example.com", &id_of(&failed), &id_of(&done)]
        .iter()
        .map(|s| page.body.find(s).unwrap_or_else(|| panic!("{s} listed")))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "newest first: {positions:?}");
    for header in [
        "Customer email",
        "Progress",
        "Current or failed step",
        "Retries",
        "Started",
        "Duration",
    ] {
        assert!(page.body.contains(header), "column {header}");
    }
    assert!(page.body.contains("5 of 5 steps"));
    // The compensated one failed its first step; the clean ones did not retry.
    assert!(page.body.contains("reached step 1 of 5"));
    assert!(page.body.contains("title=\"5 attempts of 5 started steps\">none</td>"));
    assert!(page.body.contains("failed at validate-customer-account-creation"));
    assert!(
        page.body.contains("compensated <strong>1</strong>"),
        "counts per status"
    );
    assert!(page.body.contains("completed <strong>2</strong>"));
    assert!(page.body.contains("all <strong>3</strong>"));
    // The overview of the last hour.
    assert!(page.body.contains("Throughput"));
    assert!(page.body.contains("3 finished"));
    assert!(page.body.contains("p50"));

    // Search by email (any case), then narrow to compensated runs.
    let page = session.get(&server, "/?q=ADA%40example.com").await;
    assert!(page.body.contains(&id_of(&failed)) && page.body.contains(&id_of(&done)));
    assert!(!page.body.contains("bob@example.com"));
    assert!(page.body.contains("all <strong>2</strong>"), "counts follow the search");
    let page = session.get(&server, "/?q=ada%40example.com&status=compensated").await;
    assert!(page.body.contains(&id_of(&failed)));
    assert!(!page.body.contains(&format!("data-run=\"{}\"", id_of(&done))));
    // By run id, and by time range.
    let page = session.get(&server, &format!("/?q={}", id_of(&done))).await;
    assert_eq!(page.body.matches("data-run=").count(), 1);
    let page = session
        .get(&server, "/?range=1h&workflow=create-customer-account")
        .await;
    assert_eq!(page.body.matches("data-run=").count(), 3);
    let page = session.get(&server, "/?to=2000-01-01T00:00:00Z").await;
    assert_eq!(page.body.matches("data-run=").count(), 0);
    assert!(page.body.contains("No run matches these filters"));

    // Bad parameters: a 422 page naming the parameter.
    for (query, field) in [
        ("status=bogus", "status"),
        ("range=2h", "range"),
        ("cursor=garbage", "cursor"),
        ("from=yesterday", "from"),
    ] {
        let page = session.get(&server, &format!("/?{query}")).await;
        assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert!(page.body.contains(&format!("{field}:")), "{query}: {}", page.body);
    }
    server.stop().await;
}

#[tokio::test]
async fn the_runs_list_pages_with_a_cursor() {
    let server = server::start().await;
    // 55 runs that fail validation at once (no such identity).
    for i in 0..55 {
        let response = server
            .api(Method::POST, "/v1/workflows/create-customer-account/runs")
            .json(&registration("authid_missing", &format!("p{i}@example.com")))
            .send()
            .await
            .expect("trigger");
        assert!(response.status().is_success());
    }
    let session = login(&server, "ops").await;
    let first = session.get(&server, "/").await;
    assert_eq!(first.body.matches("data-run=").count(), 50);
    assert!(first.body.contains("p54@example.com"), "newest first");
    assert!(!first.body.contains("Newest runs"));
    let older = first.body.split("rel=\"next\"").next().expect("page");
    let href = older.rsplit("href=\"").next().expect("link").trim_end_matches("\" ");
    let href = href.trim_end_matches('"').replace("&amp;", "&");
    assert!(href.starts_with("/?cursor="), "{href}");
    let second = session.get(&server, &href).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    assert_eq!(second.body.matches("data-run=").count(), 5);
    assert!(second.body.contains("p0@example.com"));
    assert!(second.body.contains("Newest runs"));
    assert!(!second.body.contains("rel=\"next\""));
    server.stop().await;
}

#[tokio::test]
async fn a_run_page_tells_what_happened_and_when() {
    // set-auth-app-metadata fails three times (all its attempts): the customer created
    // before is compensated.
    let server = server::start_with(|c| c.faults = Some("fail:set-auth-app-metadata:3".into())).await;
    let identity = server.identity("story@example.com").await;
    let run = server.register(&identity, "story@example.com").await;
    assert_eq!(run["status"], "compensated", "{run}");
    let id = id_of(&run);
    let session = login(&server, "ops").await;

    let page = session.get(&server, &format!("/runs/{id}")).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let body = &page.body;
    assert!(body.contains("story@example.com"));
    assert!(body.contains("Failed at <span class=\"mono\">set-auth-app-metadata</span>"));
    assert!(body.contains("ran out of attempts"));
    // Every step of the plan, with its outcome.
    for step in [
        "validate-customer-account-creation",
        "create-customers",
        "customers-created",
        "emit-customer-created",
        "set-auth-app-metadata",
    ] {
        assert!(body.contains(step), "{step}");
    }
    assert!(body.contains(">compensated</span>"), "create-customers was undone");
    // The timeline: one bar per attempt (4 steps once, the failing one 3 times) and per
    // compensation.
    let events = api_events(&server, &id).await;
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(body.matches("class=\"bar ok\"").count(), count("step_succeeded"));
    assert_eq!(body.matches("class=\"bar failed\"").count(), 3);
    assert_eq!(
        body.matches("class=\"bar comp\"").count(),
        count("step_compensation_succeeded")
    );
    assert!(count("step_compensation_succeeded") >= 1);
    assert!(body.contains("set-auth-app-metadata · attempt 3 · failed after"));
    // The whole log, in order.
    assert_eq!(body.matches("<tr class=\"tone-").count(), events.len());
    let kinds: Vec<usize> = ["run_created", "step_failed", "compensation_started", "run_compensated"]
        .iter()
        .map(|k| body.find(&format!(">{k}<")).unwrap_or_else(|| panic!("{k} logged")))
        .collect();
    assert!(kinds.windows(2).all(|w| w[0] < w[1]), "log in order");
    // The input, readable and collapsible; no output (not completed).
    assert!(body.contains("<details class=\"json\" id=\"input\" open>"));
    assert!(text_of(body).contains("\"authIdentityId\": \"authid_"));
    assert!(body.contains("No output"));
    // Retry is offered (with a confirmation), Cancel is not.
    assert!(body.contains("Retry as a new run…"));
    assert!(body.contains("id=\"confirm-retry-button\""));
    assert!(!body.contains("confirm-cancel"));
    // Not live: the run is over.
    assert!(!body.contains("data-live-source"));

    // A completed run: nothing to do.
    let other = server.identity("fine@example.com").await;
    let done = server.register(&other, "fine@example.com").await;
    assert_eq!(done["status"], "completed", "{done}");
    let page = session.get(&server, &format!("/runs/{}", id_of(&done))).await;
    assert!(!page.body.contains("confirm-retry") && !page.body.contains("confirm-cancel"));
    assert!(page.body.contains("<details class=\"json\" id=\"output\" open>"));
    assert!(page.body.contains("cus_"), "the output: the customer");

    // Unknown and malformed ids.
    for path in [format!("/runs/{}", uuid::Uuid::now_v7()), "/runs/not-a-run".to_string()] {
        let page = session.get(&server, &path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
        assert!(page.body.contains("not found"));
    }
    server.stop().await;
}

#[tokio::test]
async fn steps_never_reached_are_shown_as_such() {
    let server = server::start().await;
    let (_, failed) = compensated_registration(&server, "reach@example.com").await;
    let session = login(&server, "ops").await;
    let page = session.get(&server, &format!("/runs/{}", id_of(&failed))).await;
    assert_eq!(page.body.matches(">not reached</span>").count(), 4, "{}", page.body);
    assert!(page.body.contains("Customer with this email already has an account"));
    assert!(page.body.contains("The error was permanent"));
    server.stop().await;
}

#[tokio::test]
async fn retrying_from_the_dashboard_starts_a_linked_run() {
    let server = server::start().await;
    let (done, failed) = compensated_registration(&server, "retry@example.com").await;
    let id = id_of(&failed);
    let session = login(&server, "grace@example.com").await;
    let path = format!("/runs/{id}/retry");

    // Without this session's form token: refused, nothing done.
    let before = server.row_counts().await;
    let other = login(&server, "mallory").await;
    for fields in [vec![], vec![("csrf", "forged")], vec![("csrf", other.csrf.as_str())]] {
        let page = session.post(&server, &path, &fields).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{fields:?}");
        assert!(page.body.contains("nothing was done"));
    }
    assert_eq!(server.row_counts().await, before);
    assert!(api_run(&server, &id).await["retried_by"].is_null());

    // With it: the new run, at once.
    let page = session.post(&server, &path, &[("csrf", &session.csrf)]).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let location = page.location().to_string();
    let new_id = location
        .strip_prefix("/runs/")
        .and_then(|rest| rest.strip_suffix("?done=retried"))
        .expect("redirect to the new run")
        .to_string();
    assert_ne!(new_id, id);
    let page = session.get(&server, &location).await;
    assert!(page.body.contains("Retry started"));
    assert!(
        page.body
            .contains("id=\"started-how\">started by an operator&#39;s retry or restart</span>"),
        "what started it, in words"
    );
    assert!(
        page.body
            .contains(&format!("href=\"/runs/{id}\" class=\"mono\" id=\"retry-of\""))
    );
    let old = api_run(&server, &id).await;
    assert_eq!(old["retried_by"], new_id.as_str());
    let events = api_events(&server, &id).await;
    let retry = events.iter().find(|e| e["kind"] == "operator_retry").expect("logged");
    assert_eq!(
        retry["detail"]["by"], "grace@example.com",
        "the operator's name is recorded"
    );
    let page = session.get(&server, &format!("/runs/{id}")).await;
    assert!(page.body.contains("id=\"retried-by\""));
    assert!(page.body.contains("id=\"started-how\">triggered over the API</span>"));
    assert!(!page.body.contains("confirm-retry"), "retried once only");

    // A second retry of the same run, a retry of a completed run, of an unknown run: refused.
    let page = session.post(&server, &path, &[("csrf", &session.csrf)]).await;
    assert_eq!(page.status, StatusCode::CONFLICT);
    assert!(page.body.contains("already retried"), "{}", page.body);
    let page = session
        .post(
            &server,
            &format!("/runs/{}/retry", id_of(&done)),
            &[("csrf", &session.csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::CONFLICT);
    assert!(
        page.body.contains("cannot retry a run that is completed"),
        "{}",
        page.body
    );
    let page = session
        .post(
            &server,
            &format!("/runs/{}/retry", uuid::Uuid::now_v7()),
            &[("csrf", &session.csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    let page = session
        .post(&server, "/runs/not-a-run/retry", &[("csrf", &session.csrf)])
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    let runs = server.row_counts().await.into_iter().find(|(table, _)| table == "runs");
    assert_eq!(runs.map(|(_, n)| n), Some(3), "the refused retries started nothing");
    server.stop().await;
}

#[tokio::test]
async fn cancelling_from_the_dashboard() {
    // No worker: the run stays pending, so the cancel cannot race its completion.
    let server = server::start_with(|c| c.run_worker = false).await;
    let identity = server.identity("cancel@example.com").await;
    let (status, run) = read(
        server
            .api(Method::POST, "/v1/workflows/create-customer-account/runs")
            .json(&registration(&identity, "cancel@example.com"))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let id = id_of(&run);
    let session = login(&server, "ops").await;

    let page = session.get(&server, &format!("/runs/{id}")).await;
    assert!(page.body.contains("id=\"confirm-cancel-button\""));
    assert!(
        page.body
            .contains(&format!("data-live-source=\"/live/changes?run={id}\""))
    );
    assert!(page.body.contains("not reached yet"));

    let page = session
        .post(&server, &format!("/runs/{id}/cancel"), &[("csrf", "forged")])
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert_eq!(api_run(&server, &id).await["cancel_requested"], false);

    let page = session
        .post(&server, &format!("/runs/{id}/cancel"), &[("csrf", &session.csrf)])
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(page.location(), format!("/runs/{id}?done=cancel"));
    assert_eq!(api_run(&server, &id).await["cancel_requested"], true);
    let events = api_events(&server, &id).await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "cancel_requested" && e["detail"]["by"] == "ops")
    );
    let page = session.get(&server, page.location()).await;
    assert!(page.body.contains("Cancel requested"));
    assert!(page.body.contains("cancel requested</span>"));
    assert!(!page.body.contains("confirm-cancel"), "asked once");
    server.stop().await;

    // A finished run cannot be cancelled.
    let server = server::start().await;
    let identity = server.identity("done@example.com").await;
    let done = server.register(&identity, "done@example.com").await;
    let session = login(&server, "ops").await;
    let page = session
        .post(
            &server,
            &format!("/runs/{}/cancel", id_of(&done)),
            &[("csrf", &session.csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::CONFLICT);
    assert!(
        page.body.contains("cannot cancel a run that is completed"),
        "{}",
        page.body
    );
    server.stop().await;
}

#[tokio::test]
async fn data_from_users_is_shown_as_text() {
    const XSS: &str = "<script>alert(1)</script>";
    let server = server::start().await;
    let identity = server.identity("xss@example.com").await;
    let (status, run) = read(
        server
            .api(Method::POST, "/v1/workflows/create-customer-account/runs?wait_ms=10000")
            .header("Idempotency-Key", "<script>alert(2)</script>")
            .json(&json!({
                "authIdentityId": identity,
                "customerData": {
                    "email": "xss@example.com",
                    "first_name": XSS,
                    "last_name": "\"><img src=x onerror=alert(3)>",
                    "metadata": {"note": XSS}
                }
            }))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{run}");
    let id = id_of(&run);
    let session = login(&server, XSS).await;

    let pages = [
        session.get(&server, &format!("/runs/{id}")).await,
        session.get(&server, "/?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E").await,
        session.get(&server, "/?q=%3Cscript%3Ealert(2)%3C%2Fscript%3E").await,
    ];
    for page in &pages {
        assert_eq!(page.status, StatusCode::OK);
        assert!(!page.body.contains("<script>alert"), "{}", page.body);
        assert!(!page.body.contains("<img src=x"), "{}", page.body);
        assert!(text_of(&page.body).contains("<script>alert("), "shown as text");
        // Even a missed escape could not run: scripts from this origin only.
        let csp = page
            .headers
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
    }
    // The customer's name in the input and output, the key, the operator's name.
    let run_page = text_of(&pages[0].body);
    assert!(run_page.contains("\"first_name\": \"<script>alert(1)</script>\""));
    assert!(run_page.contains("<img src=x onerror=alert(3)>"));
    assert!(run_page.contains("<script>alert(2)</script>"), "the idempotency key");
    assert!(
        pages[2].body.contains(&format!("data-run=\"{id}\"")),
        "found by its key"
    );
    assert!(text_of(&pages[1].body).contains("signed in as <strong><script>alert(1)</script></strong>"));
    server.stop().await;
}

#[tokio::test]
async fn no_page_grows_past_200_kb() {
    let server = server::start().await;
    // Quotes and angle brackets: what grows most when escaped. An input as large as the API
    // takes, a larger output and error, 31 steps with large outputs and errors, and a log of
    // 5,000 entries with large details: each part over its budget, together far over 200 KB.
    let blob = |kb: usize| "\"<".repeat(kb * 512);
    let id = uuid::Uuid::now_v7();
    let pool = server.pool();
    sqlx::query(
        "INSERT INTO runs (id, workflow, workflow_version, status, input, output, error, subject, trigger,
                           log_seq, finished_at)
         VALUES ($1, 'create-customer-account', 1, 'failed', $2, $3, $4, $5, 'api', 5000, now())",
    )
    .bind(id)
    .bind(json!({"blob": blob(64)}))
    .bind(json!({"blob": blob(256)}))
    .bind(json!({"step": "create-customers", "message": blob(256), "retryable": true}))
    .bind(format!("{}@example.com", "\"<".repeat(2500)))
    .execute(pool)
    .await
    .expect("run");
    sqlx::query(
        "INSERT INTO run_steps (run_id, idx, name, status, attempts, output, error)
         SELECT $1, i, 'step-' || i, 'compensation_failed', 2000, $2, $3 FROM generate_series(0, 30) i",
    )
    .bind(id)
    .bind(json!({"blob": blob(64)}))
    .bind(json!({"message": blob(16), "retryable": true}))
    .execute(pool)
    .await
    .expect("steps");
    sqlx::query(
        "INSERT INTO run_events (run_id, seq, kind, step, attempt, detail)
         SELECT $1, s, CASE WHEN s % 2 = 1 THEN 'step_started'::event_kind ELSE 'step_failed'::event_kind END,
                'step-' || (s % 31), (s + 1) / 2, jsonb_build_object('error', repeat('\"<', 1000))
         FROM generate_series(1, 5000) s",
    )
    .bind(id)
    .execute(pool)
    .await
    .expect("events");
    // And a full first page of runs with long subjects.
    sqlx::query(
        "INSERT INTO runs (id, workflow, workflow_version, status, input, subject, trigger, finished_at)
         SELECT gen_random_uuid(), 'create-customer-account', 1, 'compensated', '{}', repeat('\"<', 2500), 'api', now()
         FROM generate_series(1, 60)",
    )
    .execute(pool)
    .await
    .expect("runs");

    let session = login(&server, "ops").await;
    let page = session.get(&server, &format!("/runs/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.len() < 200 * 1024, "run page: {} bytes", page.body.len());
    assert!(page.body.contains("entries not shown"));
    assert!(page.body.contains("(cut at "));
    assert!(page.body.contains("later attempts not drawn"));
    let page = session.get(&server, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.len() < 200 * 1024, "runs list: {} bytes", page.body.len());
    assert_eq!(page.body.matches("data-run=").count(), 50);
    server.stop().await;
}

/// Reads server-sent events until one satisfies `want`.
async fn next_event(response: &mut reqwest::Response, buffer: &mut String, want: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if want(&event) {
                return event;
            }
            continue;
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("an event in time")
            .expect("stream")
            .expect("stream still open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn live_updates_announce_changed_runs() {
    let server = server::start().await;
    let session = login(&server, "ops").await;

    let page = session.get(&server, "/live/changes?run=not-a-uuid").await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);

    let mut stream = session
        .client
        .get(server.url("/live/changes"))
        .header("cookie", &session.cookie)
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(
        stream.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut buffer = String::new();
    next_event(&mut stream, &mut buffer, |e| e.contains("event: ready")).await;

    // A run triggered after `ready` is announced, by id.
    let identity = server.identity("live@example.com").await;
    let run = server.register(&identity, "live@example.com").await;
    let id = id_of(&run);
    let event = next_event(&mut stream, &mut buffer, |e| e.contains(&id)).await;
    assert!(event.contains("event: changed"), "{event}");

    // A run's page hears about its run only.
    let mut own = session
        .client
        .get(server.url(&format!("/live/changes?run={id}")))
        .header("cookie", &session.cookie)
        .send()
        .await
        .expect("stream");
    let mut own_buffer = String::new();
    next_event(&mut own, &mut own_buffer, |e| e.contains("event: ready")).await;
    let other = server.identity("other@example.com").await;
    let other_run = id_of(&server.register(&other, "other@example.com").await);
    next_event(&mut stream, &mut buffer, |e| e.contains(&other_run)).await;
    // By the time the list's stream heard of the other run, the run page's stream has had
    // the same announcement and dropped it: nothing about the other run arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, own.chunk()).await {
        let text = String::from_utf8_lossy(&chunk);
        assert!(!text.contains(&other_run), "{text}");
    }

    // Shutting down ends the streams rather than waiting for them.
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        started.elapsed()
    );
    drop(own);
}

#[tokio::test]
async fn static_files_are_embedded_and_revalidated() {
    let server = server::start().await;
    let client = client();
    let css = Page::of(
        client
            .get(server.url("/static/dashboard.css"))
            .send()
            .await
            .expect("css"),
    )
    .await;
    assert_eq!(css.status, StatusCode::OK);
    assert_eq!(css.headers["content-type"], "text/css; charset=utf-8");
    let etag = css.headers["etag"].to_str().expect("etag").to_string();
    let again = Page::of(
        client
            .get(server.url("/static/dashboard.css"))
            .header("if-none-match", &etag)
            .send()
            .await
            .expect("css"),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    let js = Page::of(client.get(server.url("/static/live.js")).send().await.expect("js")).await;
    assert_eq!(js.headers["content-type"], "text/javascript; charset=utf-8");
    assert!(js.body.contains("EventSource"));
    let missing = Page::of(client.get(server.url("/static/nope.js")).send().await.expect("404")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let escape = Page::of(
        client
            .get(server.url("/static/../Cargo.toml"))
            .send()
            .await
            .expect("404"),
    )
    .await;
    assert_eq!(escape.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn the_json_api_is_unchanged_by_the_dashboard() {
    let server = server::start().await;
    let (status, spec) = read(
        server
            .client
            .get(server.url("/openapi.json"))
            .send()
            .await
            .expect("spec"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let paths: Vec<&String> = spec["paths"].as_object().expect("paths").keys().collect();
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with("/v1/") || *p == "/healthz" || *p == "/metrics"),
        "{paths:?}"
    );
    // Unknown routes still answer the API's JSON 404.
    let (status, body) = read(server.client.get(server.url("/nope")).send().await.expect("404")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    server.stop().await;
}

#[tokio::test]
async fn counts_stop_at_their_cap() {
    let server = server::start().await;
    sqlx::query(
        "INSERT INTO runs (id, workflow, workflow_version, status, input, subject, trigger, finished_at)
         SELECT gen_random_uuid(), 'create-customer-account', 1, 'completed', '{}', 'c' || i || '@example.com',
                'api', now()
         FROM generate_series(1, 10050) i",
    )
    .execute(server.pool())
    .await
    .expect("runs");
    let session = login(&server, "ops").await;
    let page = session.get(&server, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("completed <strong>10,000+</strong>"), "capped count");
    assert!(page.body.contains("all <strong>10,000+</strong>"));
    assert!(page.body.contains("failed <strong>0</strong>"), "exact below the cap");
    // Narrowed by a search, the count is exact again.
    let page = session.get(&server, "/?q=c77%40example.com").await;
    assert!(page.body.contains("completed <strong>1</strong>"));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// The schedules page
// ---------------------------------------------------------------------------------------

/// A schedule that ticks once a year (none fires during a test) and runs the retention sweep,
/// with `extra` fields.
fn yearly(name: &str, extra: Value) -> Value {
    let mut body = json!({"name": name, "expression": "0 0 1 1 *", "workflow": "retention-sweep"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

async fn create_schedule(server: &TestServer, body: Value) {
    let (status, created) = read(
        server
            .admin(Method::POST, "/v1/schedules")
            .json(&body)
            .send()
            .await
            .expect("create schedule"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
}

async fn api_schedule(server: &TestServer, name: &str) -> Value {
    let (status, body) = read(
        server
            .api(Method::GET, &format!("/v1/schedules/{name}"))
            .send()
            .await
            .expect("get schedule"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// What a refused schedule action must leave as it was: every schedule's state, the runs
/// they started, and the runs.
async fn schedule_state(server: &TestServer) -> (Vec<(String, bool, Option<String>, String)>, i64, i64) {
    let schedules =
        sqlx::query_as("SELECT name, enabled, next_fire_at::text, updated_at::text FROM schedules ORDER BY name")
            .fetch_all(server.pool())
            .await
            .expect("schedules");
    let fires = sqlx::query_scalar("SELECT count(*) FROM schedule_fires")
        .fetch_one(server.pool())
        .await
        .expect("fires");
    let runs = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(server.pool())
        .await
        .expect("runs");
    (schedules, fires, runs)
}

/// The HTML of a schedule's row.
fn schedule_row<'a>(body: &'a str, name: &str) -> &'a str {
    let start = body
        .find(&format!("<tr id=\"schedule-{name}\""))
        .unwrap_or_else(|| panic!("no row for {name}:\n{body}"));
    let end = body[start..].find("</tr>").map_or(body.len(), |i| start + i);
    &body[start..end]
}

/// The run id in an action's redirect (`...&run=ID#...`).
fn fired_run(location: &str) -> String {
    location
        .split_once("&run=")
        .and_then(|(_, rest)| rest.split('#').next())
        .unwrap_or_else(|| panic!("no run in {location}"))
        .to_string()
}

#[tokio::test]
async fn the_schedules_page_and_its_actions_need_a_login() {
    let server = server::start().await;
    create_schedule(&server, yearly("nightly", json!({}))).await;
    let client = client();
    let before = schedule_state(&server).await;

    let page = Page::of(client.get(server.url("/schedules?q=x")).send().await.expect("get")).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), "/login?next=/schedules%3Fq%3Dx");
    for action in ["enable", "disable", "fire"] {
        let page = Page::of(
            client
                .post(server.url(&format!("/schedules/nightly/{action}")))
                .form(&[("csrf", "whatever")])
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{action}");
        assert!(page.body.contains("not logged in"), "{action}: {}", page.body);
        // The admin token is for the API, not the dashboard's forms.
        let page = Page::of(
            client
                .post(server.url(&format!("/schedules/nightly/{action}")))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{action} with a bearer token");
    }
    let page = Page::of(
        client
            .get(server.url("/live/changes?view=schedules"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert_eq!(schedule_state(&server).await, before, "a refused action writes nothing");
    server.stop().await;
}

#[tokio::test]
async fn the_schedules_page_shows_what_each_schedule_does_and_did() {
    let server = server::start().await;
    create_schedule(
        &server,
        json!({"name": "nightly", "expression": "30 6 * * 1-5", "time_zone": "Europe/Paris",
               "workflow": "retention-sweep", "input": {"older_than": "90d"},
               "overlap": "allow", "catch_up": "all"}),
    )
    .await;
    create_schedule(&server, yearly("paused", json!({"enabled": false}))).await;
    let mut fired = Vec::new();
    for _ in 0..2 {
        let (status, run) = read(
            server
                .admin(Method::POST, "/v1/schedules/nightly/fire")
                .header("X-Sagaflow-Operator", "ops-api")
                .send()
                .await
                .expect("fire"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{run}");
        fired.push(id_of(&server.wait_terminal(&id_of(&run)).await));
    }
    sqlx::query("UPDATE schedules SET last_error = 'unknown workflow `gone`' WHERE name = 'nightly'")
        .execute(server.pool())
        .await
        .expect("last error");
    let session = login(&server, "ops").await;

    let runs = session.get(&server, "/").await;
    assert!(
        runs.body.contains("<a href=\"/schedules\">Schedules</a>"),
        "linked from the navigation"
    );
    let page = session.get(&server, "/schedules").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("data-live-source=\"/live/changes?view=schedules\""));
    assert!(page.body.contains("id=\"schedules-list\" data-live"), "a live region");

    let nightly = schedule_row(&page.body, "nightly");
    for shown in [
        "30 6 * * 1-5",
        "at 06:30 on Monday to Friday (Europe/Paris)",
        "time zone Europe/Paris",
        "runs <span class=\"mono\">retention-sweep</span>",
        ">enabled</span>",
        "overlap: allow",
        "catch-up: all",
        "every tick missed while no instance ran fires",
        "Last tick not started:</strong> <span class=\"message\">unknown workflow `gone`</span>",
        "id=\"toggle-nightly\">Disable<",
        "id=\"confirm-fire-nightly\"",
    ] {
        assert!(nightly.contains(shown), "{shown} not in:\n{nightly}");
    }
    // Five fire times, at 06:30 Paris time, the next one with how long until it.
    assert_eq!(nightly.matches("<time datetime=").count(), 5, "{nightly}");
    assert_eq!(nightly.matches(" 06:30:00 CE").count(), 5, "{nightly}");
    assert!(nightly.contains("</time> <span class=\"sub\">in "), "{nightly}");
    // Its runs, newest first, each a status badge linking to the run.
    let newest = nightly
        .find(&format!("href=\"/runs/{}\" class=\"badge s-completed\"", fired[1]))
        .expect("the newest run");
    let older = nightly
        .find(&format!("href=\"/runs/{}\" class=\"badge s-completed\"", fired[0]))
        .expect("the older run");
    assert!(newest < older, "newest first");
    assert_eq!(nightly.matches("fired by ops-api").count(), 2);

    let paused = schedule_row(&page.body, "paused");
    assert!(paused.contains(">disabled</span>") && paused.contains("none while disabled"));
    assert!(paused.contains("id=\"toggle-paused\">Enable<") && paused.contains("no run yet"));
    assert!(paused.contains("although the schedule is disabled"));
    let builtin = schedule_row(&page.body, "retention-sweep");
    assert!(builtin.contains("built in"), "{builtin}");

    // A search by part of the name or workflow, ignoring case; the page after a name.
    let page = session.get(&server, "/schedules?q=NIGHT").await;
    assert_eq!(page.body.matches("<tr id=\"schedule-").count(), 1);
    assert!(page.body.contains("id=\"schedule-nightly\"") && page.body.contains("value=\"NIGHT\""));
    let page = session.get(&server, "/schedules?q=retention").await;
    assert_eq!(page.body.matches("<tr id=\"schedule-").count(), 3, "all run the sweep");
    let page = session.get(&server, "/schedules?after=nightly").await;
    assert!(!page.body.contains("id=\"schedule-nightly\""));
    assert!(page.body.contains("id=\"schedule-paused\"") && page.body.contains("← First schedules"));
    let page = session.get(&server, "/schedules?q=nothing-like-it").await;
    assert!(page.body.contains("No schedule here."));

    // Parameters that are no page of this list.
    let page = session.get(&server, "/schedules?after=%3Cscript%3E").await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.body.contains("must be a schedule&#39;s name") || page.body.contains("must be a schedule's name"));
    let page = session.get(&server, &format!("/schedules?q={}", "q".repeat(101))).await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);
    server.stop().await;
}

#[tokio::test]
async fn enabling_disabling_and_firing_from_the_dashboard() {
    let server = server::start().await;
    create_schedule(&server, yearly("nightly", json!({"overlap": "allow"}))).await;
    let session = login(&server, "grace@example.com").await;

    // Disable, from a searched list: back on the same list, with the notice, at once.
    let page = session
        .post(
            &server,
            "/schedules/nightly/disable?q=night",
            &[("csrf", &session.csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(
        page.location(),
        "/schedules?q=night&done=disabled&schedule=nightly#schedule-nightly"
    );
    let schedule = api_schedule(&server, "nightly").await;
    assert_eq!(
        (schedule["enabled"].clone(), schedule["next_fire_at"].clone()),
        (json!(false), Value::Null)
    );
    let page = session.get(&server, page.location()).await;
    assert!(
        page.body
            .contains("Schedule <strong class=\"mono\">nightly</strong> disabled: no tick fires"),
        "{}",
        page.body
    );
    assert!(page.body.contains("value=\"night\""), "the search is kept");
    let row = schedule_row(&page.body, "nightly");
    assert!(row.contains(">Enable<"));
    // And so are the forms' actions: the next action lands on the same list.
    assert!(row.contains("action=\"/schedules/nightly/enable?q=night\""), "{row}");
    assert!(row.contains("action=\"/schedules/nightly/fire?q=night\""), "{row}");

    // Enable again: its next tick is back.
    let page = session
        .post(&server, "/schedules/nightly/enable", &[("csrf", &session.csrf)])
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(
        page.location(),
        "/schedules?done=enabled&schedule=nightly#schedule-nightly"
    );
    let schedule = api_schedule(&server, "nightly").await;
    assert_eq!(schedule["enabled"], true);
    assert!(schedule["next_fire_at"].is_string());
    let page = session.get(&server, page.location()).await;
    assert!(
        page.body
            .contains("nightly</strong> enabled: it fires from its next tick")
    );

    // Fire now: a run of the schedule, recorded as fired by the operator, shown at once.
    let page = session
        .post(&server, "/schedules/nightly/fire", &[("csrf", &session.csrf)])
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert!(
        page.location()
            .starts_with("/schedules?done=fired&schedule=nightly&run=")
    );
    let run = fired_run(page.location());
    let detail = api_run(&server, &run).await;
    assert_eq!(
        (detail["workflow"].as_str(), detail["trigger"].as_str()),
        (Some("retention-sweep"), Some("schedule"))
    );
    let schedule = api_schedule(&server, "nightly").await;
    assert_eq!(schedule["recent_runs"][0]["run_id"], run.as_str());
    assert_eq!(schedule["recent_runs"][0]["manual"], true);
    assert_eq!(schedule["recent_runs"][0]["fired_by"], "grace@example.com");
    let page = session.get(&server, page.location()).await;
    assert!(page.body.contains("nightly</strong> fired: a run started now"));
    assert!(
        page.body
            .contains(&format!("<a href=\"/runs/{run}\" class=\"mono\" id=\"fired-run\""))
    );
    let row = schedule_row(&page.body, "nightly");
    assert!(row.contains(&format!("href=\"/runs/{run}\"")), "{row}");
    assert!(row.contains("fired by grace@example.com"));
    server.stop().await;
}

#[tokio::test]
async fn refused_schedule_actions_write_nothing() {
    let server = server::start().await;
    create_schedule(&server, yearly("nightly", json!({"overlap": "allow"}))).await;
    create_schedule(&server, yearly("broken", json!({"enabled": false}))).await;
    create_schedule(&server, yearly("orphan", json!({"overlap": "allow"}))).await;
    // What a new release could leave behind: an expression no longer understood, a workflow
    // no longer registered.
    sqlx::query("UPDATE schedules SET expression = '61 * * * *' WHERE name = 'broken'")
        .execute(server.pool())
        .await
        .expect("break");
    sqlx::query("UPDATE schedules SET workflow = 'gone' WHERE name = 'orphan'")
        .execute(server.pool())
        .await
        .expect("orphan");
    let session = login(&server, "ops").await;
    let other = login(&server, "mallory").await;
    let before = schedule_state(&server).await;

    // Without this session's form token.
    for action in ["enable", "disable", "fire"] {
        let path = format!("/schedules/nightly/{action}");
        for fields in [vec![], vec![("csrf", "forged")], vec![("csrf", other.csrf.as_str())]] {
            let page = session.post(&server, &path, &fields).await;
            assert_eq!(page.status, StatusCode::FORBIDDEN, "{path} {fields:?}");
            assert!(page.body.contains("nothing was done"), "{}", page.body);
        }
        // A body that is not a form at all.
        let page = Page::of(
            session
                .client
                .post(server.url(&path))
                .header("cookie", &session.cookie)
                .header("content-type", "application/json")
                .body(format!("{{\"csrf\": \"{}\"}}", session.csrf))
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{path} with JSON");
    }
    assert_eq!(schedule_state(&server).await, before);

    // With it, but nothing to act on, or a list parameter that was tampered with.
    let cases = [
        (
            "/schedules/ghost/fire",
            StatusCode::NOT_FOUND,
            "schedule `ghost` not found",
        ),
        (
            "/schedules/ghost/enable",
            StatusCode::NOT_FOUND,
            "schedule `ghost` not found",
        ),
        (
            "/schedules/ghost/disable",
            StatusCode::NOT_FOUND,
            "schedule `ghost` not found",
        ),
        (
            "/schedules/no%20such/fire",
            StatusCode::NOT_FOUND,
            "schedule `no such` not found",
        ),
        (
            "/schedules/nightly/fire?after=%2Fevil",
            StatusCode::UNPROCESSABLE_ENTITY,
            "must be a schedule",
        ),
        (
            "/schedules/nightly/disable?after=%2Fevil",
            StatusCode::UNPROCESSABLE_ENTITY,
            "must be a schedule",
        ),
        // Enabling needs the next tick, from an expression no longer understood.
        (
            "/schedules/broken/enable",
            StatusCode::UNPROCESSABLE_ENTITY,
            "the minute field is 61, outside 0 to 59",
        ),
        (
            "/schedules/orphan/fire",
            StatusCode::NOT_FOUND,
            "workflow `gone` not found",
        ),
    ];
    for (path, status, says) in cases {
        let page = session.post(&server, path, &[("csrf", &session.csrf)]).await;
        assert_eq!(page.status, status, "{path}: {}", page.body);
        assert!(text_of(&page.body).contains(says), "{path}: {}", page.body);
        assert!(page.body.contains("<title>"), "{path}: an error page, not a raw error");
    }
    assert_eq!(schedule_state(&server).await, before, "refused actions wrote nothing");
    // A schedule no longer understood can still be switched off, and its page still shows it.
    let page = session.get(&server, "/schedules").await;
    assert!(schedule_row(&page.body, "broken").contains("not understood"));
    server.stop().await;
}

#[tokio::test]
async fn firing_while_a_run_is_in_flight_is_refused_with_a_notice() {
    // No worker: the first run stays pending, in flight.
    let server = server::start_with(|c| c.run_worker = false).await;
    create_schedule(&server, yearly("one-at-a-time", json!({"overlap": "skip"}))).await;
    let session = login(&server, "ops").await;
    let page = session
        .post(
            &server,
            "/schedules/one-at-a-time/fire?q=one",
            &[("csrf", &session.csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let first = fired_run(page.location());
    let page = session.get(&server, "/schedules").await;
    let row = schedule_row(&page.body, "one-at-a-time");
    assert!(row.contains("class=\"badge s-pending\""), "{row}");
    assert!(
        row.contains("this will be refused until that run finishes"),
        "warned beforehand"
    );
    let before = schedule_state(&server).await;

    let page = session
        .post(
            &server,
            "/schedules/one-at-a-time/fire?q=one",
            &[("csrf", &session.csrf)],
        )
        .await;
    assert_eq!(
        page.status,
        StatusCode::SEE_OTHER,
        "a notice, not an error page: {}",
        page.body
    );
    assert_eq!(
        page.location(),
        "/schedules?q=one&done=in_flight&schedule=one-at-a-time#schedule-one-at-a-time"
    );
    assert_eq!(schedule_state(&server).await, before, "nothing started");
    let page = session.get(&server, page.location()).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("<p class=\"alert bad\" role=\"status\" id=\"notice\">Schedule <strong class=\"mono\">one-at-a-time</strong> not fired: a run it started is still in flight"),
        "{}",
        page.body
    );
    let schedule = api_schedule(&server, "one-at-a-time").await;
    assert_eq!(schedule["recent_runs"].as_array().map(Vec::len), Some(1));
    assert_eq!(schedule["recent_runs"][0]["run_id"], first.as_str());
    server.stop().await;
}

#[tokio::test]
async fn schedules_show_user_data_as_text() {
    const XSS: &str = "<script>alert(1)</script>";
    let server = server::start().await;
    create_schedule(&server, yearly("nightly", json!({"overlap": "allow"}))).await;
    sqlx::query("UPDATE schedules SET last_error = $1 WHERE name = 'nightly'")
        .bind("\"><img src=x onerror=alert(3)>")
        .execute(server.pool())
        .await
        .expect("last error");
    let session = login(&server, XSS).await;
    let page = session
        .post(&server, "/schedules/nightly/fire", &[("csrf", &session.csrf)])
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);

    let pages = [
        session.get(&server, "/schedules").await,
        session
            .get(&server, "/schedules?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
            .await,
        // A notice naming no schedule that can exist is not shown at all.
        session
            .get(
                &server,
                "/schedules?done=enabled&schedule=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
            )
            .await,
    ];
    for page in &pages {
        assert_eq!(page.status, StatusCode::OK);
        assert!(!page.body.contains("<script>alert"), "{}", page.body);
        assert!(!page.body.contains("<img src=x"), "{}", page.body);
        assert!(text_of(&page.body).contains("signed in as <strong><script>alert(1)</script></strong>"));
    }
    let row = text_of(schedule_row(&pages[0].body, "nightly"));
    assert!(row.contains("fired by <script>alert(1)</script>"), "{row}");
    assert!(row.contains("\"><img src=x onerror=alert(3)>"), "{row}");
    assert!(text_of(&pages[1].body).contains("value=\"<script>alert(1)</script>\""));
    assert!(!pages[2].body.contains("id=\"notice\""));
    server.stop().await;
}

#[tokio::test]
async fn hundreds_of_schedules_page_under_200_kb() {
    let server = server::start().await;
    // 300 schedules with the longest names, long errors of what grows most when escaped, and
    // ten runs each fired by operators with long such names.
    sqlx::query(
        "INSERT INTO schedules (name, expression, time_zone, workflow, next_fire_at, last_error)
         SELECT 's' || lpad(i::text, 3, '0') || repeat('x', 96), '*/5 * * * *', 'America/New_York',
                'retention-sweep', now() + interval '1 day', repeat('\"<', 3000)
         FROM generate_series(1, 300) i",
    )
    .execute(server.pool())
    .await
    .expect("schedules");
    sqlx::query(
        "WITH fired AS (
             SELECT s.name, j, gen_random_uuid() AS run_id FROM schedules s, generate_series(1, 10) j
             WHERE s.name LIKE 's%x'),
         runs AS (
             INSERT INTO runs (id, workflow, workflow_version, status, input, trigger, finished_at)
             SELECT run_id, 'retention-sweep', 1, 'completed', '{}', 'schedule', now() FROM fired)
         INSERT INTO schedule_fires (schedule, tick, manual, run_id, fired_by)
         SELECT name, now() - j * interval '1 minute', true, run_id, repeat('\"<', 100) FROM fired",
    )
    .execute(server.pool())
    .await
    .expect("fires");
    let session = login(&server, "ops").await;

    let mut seen = std::collections::HashSet::new();
    let mut path = "/schedules".to_string();
    let mut pages = 0;
    loop {
        let started = std::time::Instant::now();
        let page = session.get(&server, &path).await;
        let took = started.elapsed();
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.body.len() < 200 * 1024, "{path}: {} bytes", page.body.len());
        pages += 1;
        let rows = page.body.matches("<tr id=\"schedule-").count();
        eprintln!("{path}: {rows} schedules, {} bytes, {took:?}", page.body.len());
        for chunk in page.body.split("data-schedule=\"").skip(1) {
            let name = chunk.split('"').next().unwrap_or_default().to_string();
            assert!(seen.insert(name.clone()), "{name} shown twice");
        }
        match hidden_href(&page.body, "rel=\"next\"") {
            // Whatever the budget, a page shows a useful number of schedules.
            Some(next) => {
                assert!(rows >= 10, "{path}: {rows} schedules");
                path = text_of(&next);
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 301, "every schedule, the built-in sweep too, once");
    assert!(pages > 1);
    server.stop().await;
}

/// The `href` of the link carrying `marker` after it.
fn hidden_href(body: &str, marker: &str) -> Option<String> {
    let end = body.find(marker)?;
    let start = body[..end].rfind("href=\"")? + "href=\"".len();
    Some(body[start..].split('"').next()?.to_string())
}

#[tokio::test]
async fn the_schedules_page_hears_about_schedules_and_runs() {
    let server = server::start().await;
    create_schedule(&server, yearly("nightly", json!({}))).await;
    let session = login(&server, "ops").await;
    let page = session.get(&server, "/live/changes?view=everything").await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);
    let page = session
        .get(
            &server,
            &format!("/live/changes?view=schedules&run={}", uuid::Uuid::now_v7()),
        )
        .await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);

    let open = |path: &'static str| {
        let request = session
            .client
            .get(server.url(path))
            .header("cookie", &session.cookie)
            .send();
        async move { request.await.expect("stream") }
    };
    let (mut schedules, mut runs) = (open("/live/changes?view=schedules").await, open("/live/changes").await);
    let (mut schedules_buffer, mut runs_buffer) = (String::new(), String::new());
    next_event(&mut schedules, &mut schedules_buffer, |e| e.contains("event: ready")).await;
    next_event(&mut runs, &mut runs_buffer, |e| e.contains("event: ready")).await;

    // A schedule changed elsewhere (here, through the API).
    let (status, _) = read(
        server
            .admin(Method::POST, "/v1/schedules/nightly/disable")
            .send()
            .await
            .expect("disable"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    next_event(&mut schedules, &mut schedules_buffer, |e| e.contains("data: schedules")).await;
    // And a run: the schedules page hears of it too; the runs list hears of it and not of the
    // schedule, which it does not show.
    let identity = server.identity("live.schedules@example.com").await;
    let run = id_of(&server.register(&identity, "live.schedules@example.com").await);
    next_event(&mut schedules, &mut schedules_buffer, |e| e.contains(&run)).await;
    next_event(&mut runs, &mut runs_buffer, |e| {
        assert!(!e.contains("data: schedules"), "the runs list heard of a schedule: {e}");
        e.contains(&run)
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn the_workflows_page_shows_every_version_with_its_steps_and_no_secret() {
    use common::participant::{Answer, Participant};
    const TOKEN: &str = "a-participant-token-that-must-never-show-9d1c";
    let participant = Participant::start().await;
    // The first reserve fails (its answer shows on the run's page); the second is held so
    // the run is unfinished while the page is read.
    participant.script(
        "/reserve",
        [
            Answer::Json(503, json!({"error": {"message": "warming up"}})),
            Answer::After(Duration::from_secs(3), Box::new(Answer::Json(200, json!({"ok": true})))),
        ],
    );
    let server = server::start_with(|config| {
        config.defined.vars = Some(std::sync::Arc::new(|name: &str| {
            (name == "SHOP_TOKEN").then(|| TOKEN.to_string())
        }))
    })
    .await;
    let definition = json!({
        "description": "Reserve, then ship",
        "endpoints": {"shop": {"base_url": participant.base_url(), "token_env": "SHOP_TOKEN"}},
        "steps": [
            {"name": "reserve", "invoke": {"endpoint": "shop", "path": "/reserve", "timeout": "10s"},
             "compensate": {"endpoint": "shop", "path": "/release"},
             "retry": {"max_attempts": 4, "initial_delay": "50ms", "jitter": 0.0}},
            {"name": "ship", "invoke": {"endpoint": "shop", "path": "/ship"}}
        ]
    });
    define(&server, "shop-order", &definition).await;
    let id = trigger(&server, "shop-order", &json!({"order": 1})).await;
    common::eventually(Duration::from_secs(10), "the second reserve attempt", || async {
        (participant.seen_at("/reserve").len() == 2).then_some(())
    })
    .await;

    let unauthenticated = Page::of(client().get(server.url("/workflows")).send().await.expect("get")).await;
    assert_eq!(unauthenticated.status, StatusCode::SEE_OTHER);
    let session = login(&server, "ops").await;
    let page = session.get(&server, "/workflows").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let text = words_of(&page.body);
    assert!(text.contains("shop-order v1 defined 1 unfinished run"), "{text}");
    assert!(text.contains("create-customer-account v1 built-in"), "{text}");
    assert!(
        text.contains("reserve shop POST /reserve; undo: shop POST /release 4 attempts, 50 ms then ×2, at most 30 s"),
        "{text}"
    );
    // ship: no compensation; the endpoint's default 30 s call timeout, and a second of backstop.
    assert!(text.contains("none 31 s"), "{text}");

    // The run's page shows what the failed attempt saw.
    let run_page = session.get(&server, &format!("/runs/{id}")).await;
    assert_eq!(run_page.status, StatusCode::OK);
    let shown = text_of(&run_page.body);
    assert!(shown.contains("\"status\":503"), "{shown}");
    assert!(shown.contains("warming up"), "{shown}");

    server.wait_terminal(&id).await;
    for path in ["/workflows".to_string(), format!("/runs/{id}"), "/".to_string()] {
        let page = session.get(&server, &path).await;
        assert!(!page.body.contains(TOKEN), "{path} shows the participant's token");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_waiting_page_lists_each_wait_with_its_deadline_and_flags_the_overdue() {
    let participant = common::participant::Participant::start().await;
    let server = server::start().await;
    let definition = json!({
        "endpoints": {"shop": {"base_url": participant.base_url()}},
        "steps": [{"name": "await-payment", "wait": {"signal": "payment.succeeded", "timeout": "1h"}}]
    });
    define(&server, "patient", &definition).await;
    let mut ids = Vec::new();
    for n in 0..2 {
        ids.push(trigger(&server, "patient", &json!({"n": n})).await);
    }
    common::eventually(Duration::from_secs(10), "both runs to wait", || async {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE wait_kind IS NOT NULL AND lease_owner IS NULL")
                .fetch_one(server.pool())
                .await
                .expect("count");
        (waiting == 2).then_some(())
    })
    .await;
    // As if its deadline had passed with no worker to end it (its due time left as it was).
    sqlx::query("UPDATE runs SET wait_deadline = now() - interval '5 minutes' WHERE id = $1::uuid")
        .bind(&ids[1])
        .execute(server.pool())
        .await
        .expect("tamper");

    let unauthenticated = Page::of(client().get(server.url("/waiting")).send().await.expect("get")).await;
    assert_eq!(unauthenticated.status, StatusCode::SEE_OTHER);
    let session = login(&server, "ops").await;
    let page = session.get(&server, "/waiting").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let text = words_of(&page.body);
    assert!(text.contains("2 runs waiting, 1 overdue"), "{text}");
    assert!(text.contains("await-payment signal payment.succeeded"), "{text}");
    assert!(text.contains("overdue by 5 min"), "{text}");
    assert!(text.contains("in 59 min") || text.contains("in 1 h 00 min"), "{text}");
    for id in &ids {
        assert!(page.body.contains(&format!("href=\"/runs/{id}\"")), "{id} not listed");
    }
    let list = words_of(&session.get(&server, "/").await.body);
    assert!(list.contains("waiting 2 1 overdue"), "{list}");
    let run = words_of(&session.get(&server, &format!("/runs/{}", ids[0])).await.body);
    assert!(
        run.contains("Waiting: Step await-payment waits for signal payment.succeeded until"),
        "{run}"
    );
    // A signal of a name the run waits for is consumed; the page says so, and lists it.
    let (status, body) = read(
        server
            .api(Method::POST, &format!("/v1/runs/{}/signals/payment.succeeded", ids[0]))
            .header("idempotency-key", "evt_42")
            .json(&json!({"paid": true}))
            .send()
            .await
            .expect("signal"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    server.wait_terminal(&ids[0]).await;
    let run = words_of(&session.get(&server, &format!("/runs/{}", ids[0])).await.body);
    assert!(run.contains("signal payment.succeeded"), "{run}");
    assert!(run.contains("evt_42 consumed by await-payment at"), "{run}");
    assert!(!run.contains("Waiting:"), "{run}");
    server.stop().await;
}

#[tokio::test]
async fn an_operator_resolves_a_failed_compensation_and_restarts_the_run_from_the_dashboard() {
    use common::participant::{Answer, Participant};
    let participant = Participant::start().await;
    participant.script(
        "/charge",
        [Answer::Json(422, json!({"error": {"message": "declined"}}))],
    );
    participant.script("/release", [Answer::Json(422, json!({"error": {"message": "lost"}}))]);
    let server = server::start().await;
    let definition = json!({
        "endpoints": {"shop": {"base_url": participant.base_url()}},
        "steps": [
            {"name": "reserve", "invoke": {"endpoint": "shop", "path": "/reserve"},
             "compensate": {"endpoint": "shop", "path": "/release"}},
            {"name": "charge", "invoke": {"endpoint": "shop", "path": "/charge"}}
        ]
    });
    define(&server, "shop", &definition).await;
    let id = trigger(&server, "shop", &json!({"order": 1})).await;
    assert_eq!(server.wait_terminal(&id).await["status"], "failed");

    let session = login(&server, "ada").await;
    let page = session.get(&server, &format!("/runs/{id}")).await;
    assert!(page.body.contains("id=\"resolve-button-reserve\""), "{}", page.body);
    let restart_options = words_of(&page.body);
    assert!(restart_options.contains("Restart from a step…"), "{restart_options}");
    let resolve = format!("/runs/{id}/steps/reserve/resolve");
    // No CSRF token, or no note: nothing happens.
    let forged = session.post(&server, &resolve, &[("note", "x")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let blank = session
        .post(&server, &resolve, &[("csrf", &session.csrf), ("note", " ")])
        .await;
    assert_eq!(blank.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", blank.body);
    assert_eq!(api_run(&server, &id).await["status"], "failed");

    let done = session
        .post(
            &server,
            &resolve,
            &[("csrf", &session.csrf), ("note", "released in the warehouse UI")],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.location(), format!("/runs/{id}?done=resolved"));
    assert_eq!(server.wait_terminal(&id).await["status"], "compensated");
    let page = words_of(&session.get(&server, &format!("/runs/{id}?done=resolved")).await.body);
    assert!(page.contains("Resolved by hand"), "{page}");
    assert!(page.contains("released in the warehouse UI"), "{page}");

    // The compensated run restarts from its first step, with an edited input.
    let restarted = session
        .post(
            &server,
            &format!("/runs/{id}/restart"),
            &[
                ("csrf", &session.csrf),
                ("from_step", "reserve"),
                ("input", "{\"order\": 2}"),
                ("note", "card updated"),
            ],
        )
        .await;
    assert_eq!(restarted.status, StatusCode::SEE_OTHER, "{}", restarted.body);
    let new = restarted
        .location()
        .trim_start_matches("/runs/")
        .trim_end_matches("?done=restarted")
        .to_string();
    let finished = server.wait_terminal(&new).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(
        (finished["input"].clone(), finished["retry_of"].clone()),
        (json!({"order": 2}), json!(id))
    );
    let bad_json = session
        .post(
            &server,
            &format!("/runs/{new}/restart"),
            &[("csrf", &session.csrf), ("from_step", "reserve"), ("input", "{")],
        )
        .await;
    assert_eq!(bad_json.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad_json.body);
    assert!(
        words_of(&bad_json.body).contains("the input is not JSON"),
        "{}",
        bad_json.body
    );
    let completed = session
        .post(
            &server,
            &format!("/runs/{new}/restart"),
            &[("csrf", &session.csrf), ("from_step", "reserve")],
        )
        .await;
    assert_eq!(
        completed.status,
        StatusCode::CONFLICT,
        "a completed run is not restarted: {}",
        completed.body
    );
    let page = session.get(&server, &format!("/runs/{new}")).await;
    assert!(
        !page.body.contains("id=\"restart-button\""),
        "a completed run offers no restart"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_bulk_retry_from_the_runs_list_shows_the_count_and_acts_only_once_confirmed() {
    let server = server::start_with(|c| c.faults = Some("fail:set-auth-app-metadata:9".into())).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let email = format!("bulk{i}@example.com");
        let identity = server.identity(&email).await;
        let run = server.register(&identity, &email).await;
        assert_eq!(run["status"], "compensated", "{run}");
        ids.push(id_of(&run));
    }
    let session = login(&server, "ops").await;
    let list = session.get(&server, "/?status=compensated&range=1h").await;
    assert!(list.body.contains("id=\"bulk-form\""), "{}", list.body);
    let from = hidden(&list.body, "from").expect("the range is carried as an absolute time");
    let fields = [
        ("csrf", session.csrf.as_str()),
        ("action", "retry"),
        ("status", "compensated"),
        ("from", from.as_str()),
    ];
    let forged = session.post(&server, "/bulk", &fields[1..]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let preview = session.post(&server, "/bulk", &fields).await;
    assert_eq!(preview.status, StatusCode::OK, "{}", preview.body);
    let text = words_of(&preview.body);
    assert!(text.contains("3 runs matching status = compensated"), "{text}");
    assert!(text.contains("Yes, retry 3 runs"), "{text}");
    for id in &ids {
        assert_eq!(
            api_run(&server, id).await["retried_by"],
            Value::Null,
            "a preview acts on nothing"
        );
    }
    let done = session.post(&server, "/bulk/confirm", &fields).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let text = words_of(&done.body);
    assert!(text.contains("3 runs retried"), "{text}");
    for id in &ids {
        let retried = api_run(&server, id).await["retried_by"].clone();
        assert!(retried.is_string(), "{id} was not retried");
        let new = server.wait_terminal(retried.as_str().expect("id")).await;
        assert_eq!(new["status"], "completed", "{new}");
    }
    let bad = session
        .post(
            &server,
            "/bulk",
            &[("csrf", session.csrf.as_str()), ("action", "explode")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    server.stop().await;
}

#[tokio::test]
async fn the_operator_actions_page_lists_every_action_with_who_and_the_note() {
    let server = server::start_with(|c| c.faults = Some("fail:set-auth-app-metadata:3".into())).await;
    let identity = server.identity("audit@example.com").await;
    let compensated = server.register(&identity, "audit@example.com").await;
    assert_eq!(compensated["status"], "compensated");
    let id = id_of(&compensated);
    let act = |path: String, operator: &'static str| {
        let request = server
            .admin(Method::POST, &path)
            .header("x-sagaflow-operator", operator);
        async move { read(request.send().await.expect("act")).await.0 }
    };
    let created = server
        .admin(Method::POST, "/v1/schedules")
        .header("x-sagaflow-operator", "barbara")
        .json(&json!({"name": "audited", "expression": "0 3 * * *", "workflow": "retention-sweep"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(
        act("/v1/schedules/retention-sweep/disable".into(), "ada").await,
        StatusCode::OK
    );
    assert_eq!(
        act("/v1/schedules/retention-sweep/enable".into(), "alan").await,
        StatusCode::OK
    );
    let audited = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM operator_actions")
            .fetch_one(server.pool())
            .await
            .expect("count")
    };
    assert_eq!(audited().await, 3);
    // A refused action is not an action: nothing recorded.
    assert_eq!(act(format!("/v1/runs/{id}/cancel"), "eve").await, StatusCode::CONFLICT);
    assert_eq!(audited().await, 3);

    let session = login(&server, "grace").await;
    let retried = session
        .post(&server, &format!("/runs/{id}/retry"), &[("csrf", &session.csrf)])
        .await;
    assert_eq!(retried.status, StatusCode::SEE_OTHER);
    let page = session.get(&server, "/actions").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let text = words_of(&page.body);
    // Newest first.
    let retry = text.find("grace run.retry").expect("the retry, by grace");
    let enable = text.find("alan schedule.enable").expect("the enable, by alan");
    let disable = text.find("ada schedule.disable").expect("the disable, by ada");
    let create = text
        .find("barbara schedule.create schedule audited")
        .expect("the create, by barbara");
    assert!(retry < enable && enable < disable && disable < create, "{text}");
    assert!(page.body.contains(&format!("href=\"/runs/{id}\"")), "the run is linked");
    assert!(!text.contains("eve run.cancel"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn an_operator_pauses_and_resumes_a_run_and_a_workflow_from_the_dashboard() {
    let server = server::start().await;
    let definition = json!({
        "endpoints": {"shop": {"base_url": "http://127.0.0.1:9"}},
        "steps": [{"name": "await-payment", "wait": {"signal": "paid", "timeout": "1h"}}]
    });
    define(&server, "patient", &definition).await;
    let run = trigger(&server, "patient", &json!({"n": 1})).await;
    common::eventually(Duration::from_secs(10), "the run to wait", || async {
        (api_run(&server, &run).await["waiting"]["name"] == "paid").then_some(())
    })
    .await;
    let session = login(&server, "ops").await;
    let page = session.get(&server, &format!("/runs/{run}")).await;
    assert!(page.body.contains("id=\"pause-button\""), "{}", page.body);
    assert!(!page.body.contains("id=\"resume-button\""));

    let forged = session
        .post(&server, &format!("/runs/{run}/pause"), &[("note", "x")])
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(
        api_run(&server, &run).await["status"],
        "running",
        "a forged pause does nothing"
    );
    let paused = session
        .post(
            &server,
            &format!("/runs/{run}/pause"),
            &[("csrf", session.csrf.as_str()), ("note", "payment provider incident")],
        )
        .await;
    assert_eq!(paused.status, StatusCode::SEE_OTHER, "{}", paused.body);
    let paused = session.get(&server, paused.location()).await;
    let text = words_of(&paused.body);
    assert!(text.contains("Pause requested"), "{text}");
    assert!(text.contains("Paused by an operator while running"), "{text}");
    assert!(paused.body.contains("id=\"resume-button\""));
    assert_eq!(api_run(&server, &run).await["status"], "paused");
    let again = session
        .post(
            &server,
            &format!("/runs/{run}/pause"),
            &[("csrf", session.csrf.as_str())],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "a paused run is not paused again");

    let resumed = session
        .post(
            &server,
            &format!("/runs/{run}/resume"),
            &[("csrf", session.csrf.as_str())],
        )
        .await;
    assert_eq!(resumed.status, StatusCode::SEE_OTHER, "{}", resumed.body);
    let resumed = session.get(&server, resumed.location()).await;
    assert!(words_of(&resumed.body).contains("Resumed"), "{}", resumed.body);
    let body = api_run(&server, &run).await;
    assert_eq!(
        (body["status"].clone(), body["waiting"]["name"].clone()),
        (json!("running"), json!("paid"))
    );

    // The workflow: paused from its page, a new run is held, the runs list says why.
    let workflows = session.get(&server, "/workflows").await;
    assert!(
        workflows.body.contains("id=\"pause-workflow-patient-v1\""),
        "{}",
        workflows.body
    );
    let forged = session.post(&server, "/workflows/patient/pause", &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let done = session
        .post(
            &server,
            "/workflows/patient/pause",
            &[("csrf", session.csrf.as_str()), ("note", "maintenance")],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.location(), "/workflows?done=paused");
    let done = session.get(&server, done.location()).await;
    let text = words_of(&done.body);
    assert!(text.contains("Workflow paused"), "{text}");
    assert!(text.contains("Paused by ops"), "{text}");
    assert!(text.contains("(maintenance)"), "{text}");
    let held = trigger(&server, "patient", &json!({"n": 2})).await;
    let list = session.get(&server, "/?workflow=patient").await;
    assert!(
        words_of(&list.body).contains("waiting: its workflow is paused"),
        "{}",
        list.body
    );
    let page = session.get(&server, &format!("/runs/{held}")).await;
    assert!(words_of(&page.body).contains("Its workflow is paused"), "{}", page.body);
    let missing = session
        .post(&server, "/workflows/no-such/pause", &[("csrf", session.csrf.as_str())])
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let done = session
        .post(&server, "/workflows/patient/resume", &[("csrf", session.csrf.as_str())])
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let done = session.get(&server, done.location()).await;
    assert!(words_of(&done.body).contains("Workflow resumed"), "{}", done.body);
    common::eventually(Duration::from_secs(10), "the held run to start and wait", || async {
        (api_run(&server, &held).await["waiting"]["name"] == "paid").then_some(())
    })
    .await;
    let actions = session.get(&server, "/actions").await;
    let text = words_of(&actions.body);
    for action in ["run.pause", "run.resume", "workflow.pause", "workflow.resume"] {
        assert!(text.contains(action), "{action} is audited: {text}");
    }
    assert!(text.contains("payment provider incident"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn the_webhooks_page_shows_subscriptions_and_deliveries_and_redelivers_a_failed_one() {
    const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let receiver = common::participant::Participant::start().await;
    // Down for longer than the window: the delivery fails; then the receiver is back.
    receiver.script(
        "/hook",
        (0..3).map(|_| common::participant::Answer::Json(503, json!({"down": true}))),
    );
    let server = server::start_with(|c| {
        c.defined.vars = Some(std::sync::Arc::new(|name: &str| {
            (name == "HOOK_SECRET").then(|| SECRET.to_string())
        }));
        // Two attempts (at once, then 400 ms later) fit in the window; the third would not.
        c.webhooks.retry_window = Duration::from_millis(700);
        c.webhooks.first_retry = Duration::from_millis(400);
    })
    .await;
    let (status, body) = read(
        server
            .admin(Method::POST, "/v1/webhooks")
            .json(&json!({"name": "crm", "url": format!("{}/hook", receiver.base_url()),
                           "events": ["run.completed"], "secret_env": "HOOK_SECRET"}))
            .send()
            .await
            .expect("subscribe"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let identity = server.identity("hook@example.com").await;
    let run = server.register(&identity, "hook@example.com").await;
    let session = login(&server, "ops").await;
    let page = common::eventually(Duration::from_secs(20), "the delivery to fail", || async {
        let page = session.get(&server, "/webhooks").await;
        words_of(&page.body).contains("1 failed").then_some(page)
    })
    .await;
    let text = words_of(&page.body);
    assert!(text.contains("crm") && text.contains("run.completed"), "{text}");
    assert!(
        page.body.contains(&format!("/runs/{}", id_of(&run))),
        "the delivery links its run"
    );
    assert!(text.contains("the receiver answered 503"), "{text}");
    let id: i64 = sqlx::query_scalar("SELECT id FROM webhook_deliveries")
        .fetch_one(server.pool())
        .await
        .expect("delivery");
    let path = format!("/webhooks/crm/deliveries/{id}/redeliver");
    let forged = session.post(&server, &path, &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let refused = receiver.seen_at("/hook").len();
    assert!((2..=3).contains(&refused), "{refused} attempts");
    let done = session.post(&server, &path, &[("csrf", session.csrf.as_str())]).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.location(), "/webhooks?done=redelivered");
    // Redelivered until accepted (the receiver refuses at most once more), same webhook-id.
    common::eventually(Duration::from_secs(20), "the redelivery to be accepted", || async {
        let status: String = sqlx::query_scalar("SELECT status::text FROM webhook_deliveries WHERE id = $1")
            .bind(id)
            .fetch_one(server.pool())
            .await
            .expect("status");
        (status == "delivered").then_some(())
    })
    .await;
    let ids: std::collections::BTreeSet<String> = receiver
        .seen_at("/hook")
        .iter()
        .map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let page = words_of(&session.get(&server, "/webhooks?done=redelivered").await.body);
    assert!(
        page.contains("Redelivery queued") && page.contains("0 failed"),
        "{page}"
    );
    let tested = session
        .post(&server, "/webhooks/crm/test", &[("csrf", session.csrf.as_str())])
        .await;
    assert_eq!(tested.status, StatusCode::SEE_OTHER, "{}", tested.body);
    let missing = session
        .post(
            &server,
            "/webhooks/crm/deliveries/999999/redeliver",
            &[("csrf", session.csrf.as_str())],
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let actions = words_of(&session.get(&server, "/actions").await.body);
    assert!(
        actions.contains("webhook.redeliver") && actions.contains("webhook.test"),
        "{actions}"
    );
    server.stop().await;
}

/// Two instances starting at once on a fresh database both create the dashboard's signing
/// secret: the second insert waits for the first and does nothing, and its statement's
/// snapshot does not show the row. It must read the secret the other instance created,
/// rather than fail the start.
#[tokio::test]
async fn a_secret_created_by_another_instance_at_the_same_moment_is_read_not_missed() {
    let db = common::test_db().await;
    let theirs = [7u8; 32];
    let mut other = db.pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO dashboard_secret (secret) VALUES ($1)")
        .bind(theirs.as_slice())
        .execute(&mut *other)
        .await
        .expect("the other instance's secret");
    let reading = tokio::spawn({
        let pool = db.pool.clone();
        async move { sagaflow::http::dashboard::store::secret(&pool).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !reading.is_finished(),
        "the insert waits for the other instance's transaction"
    );
    other.commit().await.expect("commit");
    let secret = reading
        .await
        .expect("task")
        .expect("the other instance's secret is read");
    assert_eq!(secret, theirs);
}
