//! The dashboard in a real headless Chromium (Debian's `chromium`, driven over the DevTools
//! protocol by chromiumoxide): an operator logs in, finds a compensated registration by its
//! email, opens it, retries it and sees the new run; a run triggered meanwhile appears on the
//! list without a reload; then it fires a schedule from the schedules page, and opens the
//! workflows page.
//!
//! Screenshots are written to `target/screenshots/`; with `SAGAFLOW_UPDATE_DOCS=1` the three
//! shown in the README are copied to `docs/` as well. The test fails, loudly, when Chromium
//! is missing or cannot start: `.ci/run` installs it.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use common::server::{self, ADMIN_TOKEN, TestServer};
use futures::StreamExt;

const WIDTH: u32 = 1360;
const HEIGHT: u32 = 900;

/// Chromium, if this machine has it. `SAGAFLOW_CHROMIUM` names it explicitly. Without it, the
/// test fails when `SAGAFLOW_REQUIRE_BROWSER=1` (as `.ci/run` sets, after installing Chromium)
/// and otherwise says loudly that it did not run, so that `cargo test` stays true on a
/// machine with only Rust and PostgreSQL.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SAGAFLOW_CHROMIUM").map(PathBuf::from) {
        assert!(
            path.exists(),
            "SAGAFLOW_CHROMIUM names {}, which does not exist",
            path.display()
        );
        return Some(path);
    }
    let found = [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        let required = std::env::var("SAGAFLOW_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "Chromium not found (Debian: apt-get install chromium; or set SAGAFLOW_CHROMIUM) and \
             SAGAFLOW_REQUIRE_BROWSER=1"
        );
        eprintln!(
            "\n*** WARNING: the dashboard's browser test did NOT run: no Chromium on this machine \
             (apt-get install chromium, or set SAGAFLOW_CHROMIUM). .ci/run installs it and requires it. ***\n"
        );
    }
    found
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).expect("screenshots directory");
    dir
}

async fn screenshot(page: &Page, name: &str, docs_name: Option<&str>) {
    let path = screenshots_dir().join(name);
    page.save_screenshot(
        ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .full_page(true)
            .build(),
        &path,
    )
    .await
    .expect("screenshot");
    if let (Some(docs_name), Some(_)) = (docs_name, std::env::var_os("SAGAFLOW_UPDATE_DOCS")) {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).expect("docs directory");
        std::fs::copy(&path, docs.join(docs_name)).expect("copy the screenshot to docs/");
    }
}

/// Polls the page until `check` holds for its HTML, or fails after 15 s saying `what`.
async fn until(page: &Page, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let html = page.content().await.expect("page content");
        if check(&html) {
            return html;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; page:\n{html}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn path_of(page: &Page) -> String {
    let url = page.url().await.expect("url").unwrap_or_default();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    after_scheme
        .find('/')
        .map_or("/".to_string(), |i| after_scheme[i..].to_string())
}

/// Clicks an element. A live page may swap the element for a fresh copy between finding and
/// clicking it (DevTools then no longer knows the node): it is found again, a few times.
async fn click(page: &Page, selector: &str) {
    let mut tries = 0;
    loop {
        let clicked = match page.find_element(selector).await {
            Ok(element) => element.click().await.map(|_| ()),
            Err(e) => Err(e),
        };
        match clicked {
            Ok(()) => return,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("click {selector}: {e}; again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("click {selector}: {e}"),
        }
    }
}

/// Clicks, then waits until the browser is on another page and has loaded it.
async fn click_and_wait(page: &Page, selector: &str) {
    let before = path_of(page).await;
    click(page, selector).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ready = page
            .evaluate("document.readyState")
            .await
            .ok()
            .and_then(|r| r.into_value::<String>().ok());
        if path_of(page).await != before && ready.as_deref() == Some("complete") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clicking {selector} on {before} led nowhere"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fill(page: &Page, selector: &str, text: &str) {
    page.find_element(selector)
        .await
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
        .click()
        .await
        .expect("focus")
        .type_str(text)
        .await
        .expect("type");
}

async fn set_viewport(page: &Page, width: u32, height: u32) {
    page.execute(SetDeviceMetricsOverrideParams::new(width, height, 1.0, false))
        .await
        .expect("set the window size");
}

/// Where the open "Fire now…" confirmation of `schedule` is, as the page lays it out: whether
/// it is inside the window, whether the topmost element at each corner of its text is the
/// text (not clipped nor covered), which element is on top at its button's centre, and the
/// text itself.
async fn confirmation_seen(page: &Page, schedule: &str) -> serde_json::Value {
    let script = format!(
        r#"(() => {{
            const box = document.querySelector('#fire-{schedule} .confirm-box');
            const text = box.querySelector('p');
            const b = box.getBoundingClientRect(), t = text.getBoundingClientRect();
            const button = document.querySelector('#confirm-fire-{schedule}').getBoundingClientRect();
            const corners = [[t.left + 2, t.top + 2], [t.right - 2, t.top + 2], [t.left + 2, t.bottom - 2], [t.right - 2, t.bottom - 2]];
            const top = document.elementFromPoint(button.left + button.width / 2, button.top + button.height / 2);
            return JSON.stringify({{
                in_view: b.width > 0 && b.left >= 0 && b.top >= 0 && b.right <= innerWidth && b.bottom <= innerHeight,
                text_visible: corners.every(([x, y]) => {{ const e = document.elementFromPoint(x, y); return !!e && text.contains(e); }}),
                button_on_top: top ? top.id : null,
                text: text.innerText,
                box: [b.left, b.top, b.right, b.bottom], window: [innerWidth, innerHeight],
            }});
        }})()"#
    );
    let json = page
        .evaluate(script)
        .await
        .expect("evaluate")
        .into_value::<String>()
        .expect("a JSON string");
    serde_json::from_str(&json).expect("JSON")
}

/// Runs for the pictures and the story: a registration whose last step fails all its
/// attempts (compensated), completed ones, and a duplicate email (compensated at once).
async fn seed(server: &TestServer) -> (String, String, String) {
    let ada = server.identity("ada@example.com").await;
    let failed = server.register(&ada, "ada@example.com").await;
    assert_eq!(failed["status"], "compensated", "{failed}");
    for email in ["grace@example.com", "alan@example.com", "edsger@example.com"] {
        let identity = server.identity(email).await;
        let run = server.register(&identity, email).await;
        assert_eq!(run["status"], "completed", "{run}");
    }
    let again = server.identity("grace.again@example.com").await;
    let duplicate = server.register(&again, "grace@example.com").await;
    assert_eq!(duplicate["status"], "compensated", "{duplicate}");
    let id = |run: &serde_json::Value| run["id"].as_str().expect("id").to_string();
    (id(&failed), id(&duplicate), again)
}

/// Chromium's fresh profile, removed however the test ends.
struct Profile(PathBuf);

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_failed_registration_and_retries_it() {
    // set-auth-app-metadata fails its three attempts once: the first registration is
    // compensated, and its retry later succeeds.
    let Some(chromium) = chromium() else { return };
    let server = server::start_with(|c| c.faults = Some("fail:set-auth-app-metadata:3".into())).await;
    let (failed, duplicate, again) = seed(&server).await;

    let profile = Profile(std::env::temp_dir().join(format!("sagaflow-chromium-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&profile.0);
    let config = BrowserConfig::builder()
        .chrome_executable(chromium)
        .no_sandbox()
        .user_data_dir(&profile.0)
        .window_size(WIDTH, HEIGHT)
        .viewport(Viewport {
            width: WIDTH,
            height: HEIGHT,
            device_scale_factor: Some(1.0),
            emulating_mobile: false,
            is_landscape: true,
            has_touch: false,
        })
        .args([
            "disable-gpu",
            "disable-background-networking",
            "disable-component-update",
            "disable-sync",
            "no-first-run",
        ])
        .launch_timeout(Duration::from_secs(60))
        .request_timeout(Duration::from_secs(30))
        .build()
        .expect("browser configuration");
    let (mut browser, mut handler) = Browser::launch(config)
        .await
        .unwrap_or_else(|e| panic!("Chromium could not start: {e}"));
    let events = tokio::spawn(async move {
        // Drives the DevTools connection; an event it cannot read is not fatal.
        while let Some(event) = handler.next().await {
            let _ = event;
        }
    });

    // Any page first asks for the login.
    let page = browser.new_page(server.url("/")).await.expect("new page");
    page.wait_for_navigation().await.expect("navigation");
    assert!(path_of(&page).await.starts_with("/login"), "{}", path_of(&page).await);
    fill(&page, "input[name=token]", ADMIN_TOKEN).await;
    fill(&page, "input[name=operator]", "grace@example.com").await;
    click_and_wait(&page, "button[type=submit]").await;
    assert_eq!(path_of(&page).await, "/");
    let html = until(&page, "the runs list", |html| html.matches("data-run=").count() == 5).await;
    assert!(html.contains("signed in as <strong>grace@example.com</strong>"));
    // The live feed is connected (the page says so once the server is listening).
    until(&page, "live updates", |html| html.contains("● live")).await;
    screenshot(&page, "runs-list.png", Some("dashboard-runs.png")).await;

    // Search the compensated registration by its email.
    fill(&page, "input[name=q]", "ada@example.com").await;
    click_and_wait(&page, "form.filters button[type=submit]").await;
    assert_eq!(path_of(&page).await, "/?q=ada%40example.com&workflow=&status=&range=");
    let html = until(&page, "the search result", |html| {
        html.matches("data-run=").count() == 1
    })
    .await;
    assert!(html.contains(&failed) && html.contains(">compensated</span>"));
    screenshot(&page, "runs-search.png", None).await;

    // Open it: what happened, and when.
    click_and_wait(&page, &format!("tr[data-run='{failed}'] a.run-link")).await;
    assert_eq!(path_of(&page).await, format!("/runs/{failed}"));
    let html = until(&page, "the run page", |html| html.contains("Timeline")).await;
    assert!(html.contains("set-auth-app-metadata"));
    assert!(html.contains("class=\"bar failed\""), "failed attempts drawn");
    assert!(html.contains("class=\"bar comp\""), "compensations drawn");
    screenshot(&page, "run-compensated.png", Some("dashboard-run.png")).await;

    // Retry: confirm, and land on the new run.
    page.find_element("#retry-button")
        .await
        .expect("retry offered")
        .click()
        .await
        .expect("open the confirmation");
    click_and_wait(&page, "#confirm-retry-button").await;
    let path = path_of(&page).await;
    let new_run = path
        .strip_prefix("/runs/")
        .and_then(|p| p.strip_suffix("?done=retried"))
        .unwrap_or_else(|| panic!("landed on {path}"))
        .to_string();
    assert_ne!(new_run, failed);
    let html = until(&page, "the new run completed", |html| {
        html.contains("id=\"run-status\">completed<")
    })
    .await;
    assert!(html.contains("Retry started"));
    assert!(
        html.contains(&format!("href=\"/runs/{failed}\"")),
        "linked to the run it retries"
    );
    screenshot(&page, "run-retried.png", None).await;

    // The duplicate registration, restarted from its first step with the email corrected:
    // the input is edited in the confirmation, and the new run completes.
    page.goto(server.url(&format!("/runs/{duplicate}")))
        .await
        .expect("run page");
    page.wait_for_navigation().await.expect("navigation");
    until(&page, "the restart offered", |html| {
        html.contains("id=\"restart-button\"")
    })
    .await;
    click(&page, "#restart-button").await;
    let edited = serde_json::json!({"authIdentityId": again,
        "customerData": {"email": "grace.again@example.com", "first_name": "Grace", "last_name": "Again"}});
    page.evaluate(format!(
        "document.querySelector('#restart-input').value = {}",
        serde_json::to_string(&edited.to_string()).expect("json")
    ))
    .await
    .expect("edit the input");
    fill(&page, "#restart-note", "the customer corrected their email").await;
    click_and_wait(&page, "#confirm-restart-button").await;
    let path = path_of(&page).await;
    assert!(path.ends_with("?done=restarted"), "landed on {path}");
    let html = until(&page, "the restarted run completed", |html| {
        html.contains("id=\"run-status\">completed<")
    })
    .await;
    assert!(html.contains("Restarted: this is the new run"));
    assert!(
        html.contains(&format!("href=\"/runs/{duplicate}\"")),
        "linked to the run it restarts"
    );

    // A bulk retry of the list's compensated runs, seen and confirmed with its count.
    let late = server.identity("alan.again@example.com").await;
    let refused = server.register(&late, "alan@example.com").await;
    assert_eq!(refused["status"], "compensated", "{refused}");
    page.goto(server.url("/?status=compensated")).await.expect("list");
    page.wait_for_navigation().await.expect("navigation");
    until(&page, "the bulk form", |html| html.contains("id=\"bulk-button\"")).await;
    click_and_wait(&page, "#bulk-button").await;
    let html = until(&page, "the bulk preview", |html| {
        html.contains("id=\"confirm-bulk-button\"")
    })
    .await;
    assert!(html.contains("Yes, retry 1 run<"), "the count is in the confirmation");
    screenshot(&page, "bulk-retry.png", None).await;
    click_and_wait(&page, "#confirm-bulk-button").await;
    let html = until(&page, "the bulk result", |html| html.contains("id=\"bulk-done\"")).await;
    assert!(html.contains("<strong>1</strong> run retried"), "{html}");

    // The list updates itself: a registration triggered now appears without a reload.
    page.goto(server.url("/")).await.expect("list");
    page.wait_for_navigation().await.expect("navigation");
    until(&page, "live updates", |html| html.contains("● live")).await;
    let identity = server.identity("barbara@example.com").await;
    server.register(&identity, "barbara@example.com").await;
    until(&page, "the new registration listed live", |html| {
        html.contains("barbara@example.com")
    })
    .await;
    assert_eq!(path_of(&page).await, "/", "no navigation happened");

    // At 800 px the runs table fits its box (no column cut off behind a scroll bar) and no
    // run id wraps.
    set_viewport(&page, 800, HEIGHT).await;
    let fit = page
        .evaluate(
            r#"(() => {
                const box = document.querySelector('#runs-table .scroll');
                const ids = [...document.querySelectorAll('a.run-link')];
                return JSON.stringify({
                    overflow: box.scrollWidth - box.clientWidth,
                    page_overflow: document.documentElement.scrollWidth - innerWidth,
                    wider: [...document.querySelectorAll('body *')]
                        .filter(e => e.getBoundingClientRect().right > innerWidth + 1)
                        .slice(0, 5).map(e => e.tagName + '.' + e.className),
                    wrapped: ids.filter(a => a.getClientRects().length > 1).length,
                    ids: ids.length,
                });
            })()"#,
        )
        .await
        .expect("evaluate")
        .into_value::<String>()
        .expect("a JSON string");
    screenshot(&page, "runs-800.png", None).await;
    let fit: serde_json::Value = serde_json::from_str(&fit).expect("JSON");
    assert!(fit["ids"].as_u64().is_some_and(|n| n >= 3), "{fit}");
    assert_eq!(fit["overflow"], 0, "at 800 px the runs table is cut off: {fit}");
    assert_eq!(
        fit["page_overflow"], 0,
        "at 800 px the page is wider than the window: {fit}"
    );
    assert_eq!(fit["wrapped"], 0, "at 800 px run ids wrap: {fit}");
    set_viewport(&page, WIDTH, HEIGHT).await;

    // The schedules, from the navigation: fire the built-in sweep now, after confirming. (A
    // second schedule is there for the picture.)
    let weekdays = server
        .admin(reqwest::Method::POST, "/v1/schedules")
        .json(&serde_json::json!({
            "name": "weekday-sweep", "expression": "30 6 * * 1-5", "time_zone": "Europe/Paris",
            "workflow": "retention-sweep", "input": {"older_than": "90d"}, "overlap": "allow", "catch_up": "all"}))
        .send()
        .await
        .expect("create a schedule");
    assert_eq!(weekdays.status(), reqwest::StatusCode::CREATED);
    click_and_wait(&page, "header nav a[href='/schedules']").await;
    until(&page, "the schedules page", |html| {
        html.contains("id=\"schedule-retention-sweep\"")
    })
    .await;
    // The confirmation is wholly visible, text and button, at a narrow, a wide and a very
    // wide window (inside the table it once widened the last column past its scroll box,
    // which clipped it), and clicking outside it closes it.
    for width in [800, 1400, 1920] {
        set_viewport(&page, width, HEIGHT).await;
        click(&page, "#fire-button-retention-sweep").await;
        let seen = confirmation_seen(&page, "retention-sweep").await;
        assert_eq!(
            seen["in_view"], true,
            "at {width} px the confirmation leaves the window: {seen}"
        );
        assert_eq!(
            seen["text_visible"], true,
            "at {width} px its text is covered or clipped: {seen}"
        );
        assert_eq!(
            seen["button_on_top"], "confirm-fire-retention-sweep",
            "at {width} px its button is covered: {seen}"
        );
        assert!(
            seen["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("Start a run of retention-sweep now")),
            "{seen}"
        );
        // Near the window's bottom left corner: on the backdrop, away from the dialog.
        page.click(chromiumoxide::layout::Point {
            x: 8.0,
            y: f64::from(HEIGHT) - 8.0,
        })
        .await
        .expect("click outside");
        let open = page
            .evaluate("document.querySelector('#fire-retention-sweep').open")
            .await
            .expect("evaluate")
            .into_value::<bool>()
            .expect("bool");
        assert!(!open, "at {width} px a click outside left the confirmation open");
    }
    set_viewport(&page, WIDTH, HEIGHT).await;
    click(&page, "#fire-button-retention-sweep").await;
    click_and_wait(&page, "#confirm-fire-retention-sweep").await;
    let path = path_of(&page).await;
    let fired = path
        .strip_prefix("/schedules?done=fired&schedule=retention-sweep&run=")
        .and_then(|rest| rest.split('#').next())
        .unwrap_or_else(|| panic!("landed on {path}"))
        .to_string();
    let html = until(&page, "the fired run listed, completed", |html| {
        html.contains("retention-sweep</strong> fired")
            && html.contains(&format!("href=\"/runs/{fired}\" class=\"badge s-completed\""))
    })
    .await;
    assert!(html.contains("fired by grace@example.com"), "the operator is recorded");
    screenshot(&page, "schedules.png", Some("dashboard-schedules.png")).await;

    // The workflows, from the navigation: every version with its steps.
    click_and_wait(&page, "header nav a[href='/workflows']").await;
    until(&page, "the workflows page", |html| {
        html.contains("id=\"workflow-create-customer-account-v1\"")
            && html.contains("set-auth-app-metadata")
            && html.contains("id=\"workflow-retention-sweep-v1\"")
    })
    .await;
    assert_eq!(path_of(&page).await, "/workflows");

    browser.close().await.expect("close Chromium");
    let _ = browser.wait().await;
    events.abort();
    server.stop().await;
}
