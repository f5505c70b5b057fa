//! The schedules page (`/schedules`): every schedule with its expression in words, when it
//! fires next, what its latest runs did, and the operator's Enable, Disable and Fire now.
//!
//! Cost: a page is two statements however many schedules it shows (a page of schedules by
//! name, then the latest runs of all of them together: [`Engine::list_schedules`]) and pure
//! formatting, so hundreds of schedules stay fast and refreshing the page live costs little.
//! Size: like a run's page, it is rendered with [`Budget::FULL`] and again with halved budgets
//! (fewer schedules, fewer runs each, shorter texts) while over [`PAGE_LIMIT`](super::run::PAGE_LIMIT).
//!
//! [`Engine::list_schedules`]: crate::engine::Engine::list_schedules

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::response::{Html, Redirect};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use uuid::Uuid;

use super::Dashboard;
use super::error::{PageError, encode_query_value};
use super::format;
use super::run::{ActionForm, checked, render_within_limit};
use super::session::{Operator, Viewer};
use crate::engine::scheduler::expr::parse_time_zone;
use crate::engine::scheduler::{
    CatchUp, FireRow, Origin, Overlap, RECENT_RUNS, ScheduleError, ScheduleListing, ScheduleView, is_valid_name,
};
use crate::http::error::ApiError;
use crate::http::extract::{Params, PathText};

/// The longest search text.
pub const MAX_QUERY_CHARS: usize = 100;

/// How much a page shows. The page is rendered with [`Budget::FULL`] and, while it is over
/// [`PAGE_LIMIT`](super::run::PAGE_LIMIT), again with halved budgets: the limit holds whatever the schedules hold
/// (last errors and operator names can be long, and grow up to six times when escaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Schedules per page.
    pub schedules: usize,
    /// Latest runs shown per schedule.
    pub recent: usize,
    /// Characters of a last error or a description.
    pub text: usize,
    /// Characters of an operator's name.
    pub name: usize,
}

impl Budget {
    /// What a page shows when it fits.
    pub const FULL: Budget = Budget {
        schedules: 50,
        recent: RECENT_RUNS,
        text: 400,
        name: 60,
    };

    /// Half of everything, down to a floor that still tells what each schedule does.
    pub fn halved(self) -> Self {
        Self {
            schedules: (self.schedules / 2).max(10),
            recent: (self.recent / 2).max(3),
            text: (self.text / 2).max(100),
            name: (self.name / 2).max(20),
        }
    }
}

/// The schedules page (rendered by the handler, which checks its size).
#[derive(Template)]
#[template(path = "schedules.html", config = "dashboard/askama.toml")]
pub struct SchedulesPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the forms.
    pub csrf: String,
    /// What an action just did, or why it did nothing.
    pub notice: Option<Notice>,
    /// The schedules of this page.
    pub schedules: Vec<ScheduleLine>,
    /// The search text.
    pub q: String,
    /// Whether a search or a later page is shown (not every schedule from the first).
    pub filtered: bool,
    /// The next page, if any.
    pub older: Option<String>,
    /// Back to the first page (shown on later pages).
    pub first: Option<String>,
    /// The list's query (`?q=..&after=..`, or empty), kept by the forms' actions so that an
    /// action lands back on the same page.
    pub back: String,
}

/// A schedule on the page.
#[derive(Debug, Clone)]
pub struct ScheduleLine {
    /// Its name (letters, digits, `.`, `-`, `_`: safe in ids and paths).
    pub name: String,
    /// The cron expression as written.
    pub expression: String,
    /// The expression in words, with the time zone.
    pub description: String,
    /// The IANA time zone.
    pub time_zone: String,
    /// The workflow each tick starts.
    pub workflow: String,
    /// Whether ticks fire.
    pub enabled: bool,
    /// The overlap policy (`skip` or `allow`).
    pub overlap: &'static str,
    /// What it means.
    pub overlap_text: &'static str,
    /// The catch-up policy.
    pub catch_up: &'static str,
    /// What it means.
    pub catch_up_text: &'static str,
    /// Where it was defined, when that matters to an operator (a declared schedule is
    /// re-declared at every start).
    pub origin_text: &'static str,
    /// The next fire times.
    pub upcoming: Vec<Tick>,
    /// When the next tick is, from now ("in 2 h 05 min", "due now", "overdue by 3 min").
    pub next_in: String,
    /// The next tick is more than a minute late: no scheduler may be running.
    pub overdue: bool,
    /// The latest runs it started, newest first.
    pub recent: Vec<RecentRun>,
    /// When its last tick started a run.
    pub last_fire: String,
    /// Why its last tick could not start a run, until one could.
    pub last_error: String,
    /// A run it started is unfinished and its overlap policy is `skip`: a fire-now will be
    /// refused (as far as its latest runs tell).
    pub busy: bool,
}

/// A fire time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    /// In the schedule's time zone, as its expression reads.
    pub local: String,
    /// In UTC, like every other time on the dashboard.
    pub utc: String,
    /// For `<time datetime>`.
    pub iso: String,
}

/// A run a schedule started.
#[derive(Debug, Clone)]
pub struct RecentRun {
    /// Full id.
    pub id: String,
    /// The end of the id.
    pub short_id: String,
    /// Its status now.
    pub status: &'static str,
    /// The tick it was for, in the schedule's time zone (for a fire-now: when it was asked).
    pub when: String,
    /// Who fired it, for a fire-now (empty for a tick).
    pub fired_by: String,
    /// The details, on hover.
    pub title: String,
}

/// What an action did, shown once the browser is back on the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `good` or `bad` (a CSS class).
    pub tone: &'static str,
    /// The schedule acted on.
    pub schedule: String,
    /// What happened.
    pub text: &'static str,
    /// The run a fire-now started: id and short id.
    pub run: Option<(String, String)>,
}

/// What an action reports in the redirect's query (`done=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Enabled.
    Enabled,
    /// Disabled.
    Disabled,
    /// Fired now: this run started.
    Fired(Uuid),
    /// Fire-now refused: a run is in flight and the overlap policy is `skip`.
    InFlight,
}

impl Done {
    fn code(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::Fired(_) => "fired",
            Self::InFlight => "in_flight",
        }
    }
}

/// The notice of a redirect's query. Codes this page never sends, names no schedule can have
/// and run ids that are not UUIDs show no notice (as on a run's page: a hand-edited address
/// is no error worth a page).
fn notice(params: &Params) -> Result<Option<Notice>, ApiError> {
    Ok(notice_of(
        params.text("done", 20)?.as_deref(),
        params.text("schedule", 200)?.as_deref(),
        params.text("run", 100)?.as_deref(),
    ))
}

/// See [`notice`].
fn notice_of(done: Option<&str>, schedule: Option<&str>, run: Option<&str>) -> Option<Notice> {
    let schedule = schedule.filter(|name| is_valid_name(name))?.to_string();
    let run = run
        .and_then(|id| Uuid::parse_str(id).ok())
        .map(|id| (id.to_string(), format::short_id(id)));
    let (tone, text, run) = match done {
        Some("enabled") => (
            "good",
            "enabled: it fires from its next tick after now (ticks missed while it was disabled are not caught up).",
            None,
        ),
        Some("disabled") => (
            "good",
            "disabled: no tick fires until it is enabled again. A run in flight goes on.",
            None,
        ),
        Some("fired") if run.is_some() => ("good", "fired: a run started now, recorded as fired by you.", run),
        Some("in_flight") => (
            "bad",
            "not fired: a run it started is still in flight and its overlap policy is skip (one run at a time). \
             Nothing was started; fire it again once that run has finished.",
            None,
        ),
        _ => return None,
    };
    Some(Notice {
        tone,
        schedule,
        text,
        run,
    })
}

/// The list's parameters, kept in its links and by its forms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    /// Search text: a part of the name or the workflow.
    pub q: Option<String>,
    /// The last name of the previous page.
    pub after: Option<String>,
}

impl ListParams {
    /// Reads `q` and `after` (a schedule's name: anything else is no page of this list).
    pub fn read(params: &Params) -> Result<Self, ApiError> {
        Self::new(params.text("q", MAX_QUERY_CHARS)?, params.text("after", 200)?)
    }

    /// Checks `after`: a schedule's name, or no page of this list.
    fn new(q: Option<String>, after: Option<String>) -> Result<Self, ApiError> {
        if after.as_deref().is_some_and(|name| !is_valid_name(name)) {
            return Err(ApiError::invalid(
                "after",
                "must be a schedule's name (the last one of the previous page)",
            ));
        }
        Ok(Self { q, after })
    }

    /// The query keeping this list, with `extra` pairs: `?q=..&after=..`, or empty.
    fn query(&self, after: Option<&str>, extra: &[(&str, &str)]) -> String {
        let pairs = [("q", self.q.as_deref()), ("after", after)];
        let query: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.map(|v| (*k, v)))
            .chain(extra.iter().copied())
            .map(|(k, v)| format!("{k}={}", encode_query_value(v)))
            .collect();
        if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        }
    }

    /// This list's page starting after `after`.
    fn href(&self, after: Option<&str>) -> String {
        format!("/schedules{}", self.query(after, &[]))
    }

    /// Where an action on `schedule` lands: this list, the notice, the schedule in view.
    pub fn after_action(&self, schedule: &str, done: Done) -> String {
        let run = match done {
            Done::Fired(run) => Some(run.to_string()),
            _ => None,
        };
        let mut extra = vec![("done", done.code()), ("schedule", schedule)];
        if let Some(run) = &run {
            extra.push(("run", run));
        }
        format!(
            "/schedules{}#schedule-{schedule}",
            self.query(self.after.as_deref(), &extra)
        )
    }
}

/// `GET /schedules`.
pub async fn page(
    viewer: Viewer,
    State(dashboard): State<Arc<Dashboard>>,
    params: Params,
) -> Result<Html<String>, PageError> {
    let list = ListParams::read(&params)?;
    let notice = notice(&params)?;
    let engine = &dashboard.app.engine;
    // One more than a page: whether there is a next page.
    let listing = ScheduleListing {
        contains: list.q.clone(),
        after: list.after.clone(),
        limit: Budget::FULL.schedules as i64 + 1,
        recent: Budget::FULL.recent,
    };
    let views = engine.list_schedules(&listing).await?;
    let now = engine.clock().now();
    render_within_limit("the schedules page", Budget::FULL, Budget::halved, |budget| {
        build(&viewer, &views, &list, notice.clone(), now, budget).render()
    })
}

/// Lays out the page (pure: the handler only loads). `views` may hold more schedules than the
/// budget shows: the rest are the next page.
pub fn build(
    viewer: &Viewer,
    views: &[ScheduleView],
    list: &ListParams,
    notice: Option<Notice>,
    now: DateTime<Utc>,
    budget: Budget,
) -> SchedulesPage {
    let shown = &views[..views.len().min(budget.schedules)];
    let older = (views.len() > shown.len())
        .then(|| shown.last().map(|last| list.href(Some(&last.schedule.name))))
        .flatten();
    SchedulesPage {
        operator: viewer.session.operator.clone(),
        csrf: viewer.csrf.clone(),
        notice,
        schedules: shown.iter().map(|view| line(view, now, budget)).collect(),
        q: list.q.clone().unwrap_or_default(),
        filtered: list.q.is_some() || list.after.is_some(),
        older,
        first: list.after.as_ref().map(|_| list.href(None)),
        back: list.query(list.after.as_deref(), &[]),
    }
}

/// A schedule as the page shows it.
pub fn line(view: &ScheduleView, now: DateTime<Utc>, budget: Budget) -> ScheduleLine {
    let s = &view.schedule;
    // A zone no longer understood (the time zone database changed) still shows, in UTC.
    let tz = parse_time_zone(&s.time_zone).unwrap_or(Tz::UTC);
    let upcoming: Vec<Tick> = view
        .upcoming
        .iter()
        .map(|&at| Tick {
            local: format!("{} {}", at.with_timezone(&tz).format("%a"), in_zone(at, &tz)),
            utc: format::time(at),
            iso: format::machine_time(at),
        })
        .collect();
    let (next_in, overdue) = match view.upcoming.first() {
        None => (String::new(), false),
        Some(&next) if next > now => (format!("in {}", format::between(now, next)), false),
        // The scheduler fires a due tick within moments; much later, none may be running.
        Some(&next) if now - next <= chrono::Duration::minutes(1) => ("due now".to_string(), false),
        Some(&next) => (format!("overdue by {}", format::between(next, now)), true),
    };
    let recent: Vec<RecentRun> = view
        .recent_runs
        .iter()
        .take(budget.recent)
        .map(|fire| recent_run(fire, &tz, budget))
        .collect();
    let (overlap_text, catch_up_text) = policies(s.overlap, s.catch_up);
    ScheduleLine {
        name: s.name.clone(),
        expression: s.expression.clone(),
        description: format::clip(&view.description, budget.text),
        time_zone: s.time_zone.clone(),
        workflow: s.workflow.clone(),
        enabled: s.enabled,
        overlap: match s.overlap {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
        },
        overlap_text,
        catch_up: match s.catch_up {
            CatchUp::None => "none",
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
        },
        catch_up_text,
        origin_text: match s.origin {
            Origin::Api => "",
            Origin::File => "declared in the schedules file: changes made here last until the next start",
            Origin::Builtin => "built in: yours to change or disable",
        },
        upcoming,
        next_in,
        overdue,
        busy: s.overlap == Overlap::Skip && view.recent_runs.iter().any(|f| !f.status.is_terminal()),
        recent,
        last_fire: s.last_fire_at.map(|at| in_zone(at, &tz)).unwrap_or_default(),
        last_error: s
            .last_error
            .as_deref()
            .map(|e| format::clip(e, budget.text))
            .unwrap_or_default(),
    }
}

/// The policies in words.
fn policies(overlap: Overlap, catch_up: CatchUp) -> (&'static str, &'static str) {
    (
        match overlap {
            Overlap::Skip => "a tick is skipped while a run it started is in flight",
            Overlap::Allow => "every tick starts a run, even while another is in flight",
        },
        match catch_up {
            CatchUp::None => "ticks missed while no instance ran are not fired",
            CatchUp::Latest => "of the ticks missed while no instance ran, the latest fires once",
            CatchUp::All => "every tick missed while no instance ran fires, oldest first (up to a bound)",
        },
    )
}

/// An instant in the schedule's time zone, labelled with it: every time on the schedules
/// page is in its schedule's zone (the UTC time is in the element's title), so none reads
/// as if it were in another.
fn in_zone(at: DateTime<Utc>, tz: &Tz) -> String {
    at.with_timezone(tz).format("%Y-%m-%d %H:%M:%S %Z").to_string()
}

fn recent_run(fire: &FireRow, tz: &Tz, budget: Budget) -> RecentRun {
    let when = in_zone(fire.tick, tz);
    let fired_by = if fire.manual {
        format::clip(&fire.fired_by, budget.name)
    } else {
        String::new()
    };
    let mut title = if fire.manual {
        format!("fired now by {fired_by} at {}", format::time(fire.tick))
    } else {
        format!("tick of {}", format::time(fire.tick))
    };
    match fire.finished_at {
        Some(end) => title.push_str(&format!("; finished {}", format::time(end))),
        None => title.push_str("; not finished"),
    }
    RecentRun {
        id: fire.run_id.to_string(),
        short_id: format::short_id(fire.run_id),
        status: fire.status.as_str(),
        when,
        fired_by,
        title,
    }
}

/// A schedule's name from the path: one no schedule can have is not found (and never reaches
/// the database), as in the API.
fn schedule_name(name: String) -> Result<String, ApiError> {
    if is_valid_name(&name) {
        Ok(name)
    } else {
        Err(ApiError::NotFound {
            what: "schedule",
            id: format::clip(&name, 100),
        })
    }
}

/// `POST /schedules/{name}/enable`.
pub async fn enable(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    params: Params,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    let PathText(name) = path?;
    set_enabled(operator, &dashboard, name, params, form, true).await
}

/// `POST /schedules/{name}/disable`.
pub async fn disable(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    params: Params,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    let PathText(name) = path?;
    set_enabled(operator, &dashboard, name, params, form, false).await
}

async fn set_enabled(
    operator: Operator,
    dashboard: &Dashboard,
    name: String,
    params: Params,
    form: Result<Form<ActionForm>, FormRejection>,
    enabled: bool,
) -> Result<Redirect, PageError> {
    // Everything is checked before anything is done.
    checked(&operator, form)?;
    let name = schedule_name(name)?;
    let list = ListParams::read(&params)?;
    dashboard
        .app
        .engine
        .set_schedule_enabled(&name, enabled, &operator.session.operator)
        .await?;
    tracing::info!(schedule = %name, enabled, operator = %operator.session.operator, "dashboard: schedule enabled or disabled");
    let done = if enabled { Done::Enabled } else { Done::Disabled };
    Ok(Redirect::to(&list.after_action(&name, done)))
}

/// `POST /schedules/{name}/fire`: starts a run now, recorded as fired by the operator. A
/// refusal because a run is in flight lands back on the list with a notice saying so: it is an
/// expected answer, not an error.
pub async fn fire(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    params: Params,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    checked(&operator, form)?;
    let PathText(name) = path?;
    let name = schedule_name(name)?;
    let list = ListParams::read(&params)?;
    let by = &operator.session.operator;
    let done = match dashboard.app.engine.fire_schedule(&name, by).await {
        Ok(triggered) => {
            tracing::info!(schedule = %name, run_id = %triggered.run_id, operator = %by, "dashboard: schedule fired now");
            Done::Fired(triggered.run_id)
        }
        Err(ScheduleError::InFlight(_)) => Done::InFlight,
        Err(e) => return Err(e.into()),
    };
    Ok(Redirect::to(&list.after_action(&name, done)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RunStatus;
    use crate::engine::scheduler::ScheduleRow;

    fn view(name: &str, upcoming: Vec<DateTime<Utc>>, fires: Vec<FireRow>) -> ScheduleView {
        let now = Utc::now();
        ScheduleView {
            schedule: ScheduleRow {
                name: name.into(),
                expression: "0 3 * * *".into(),
                time_zone: "Europe/Paris".into(),
                workflow: "retention-sweep".into(),
                input: serde_json::json!({}),
                enabled: !upcoming.is_empty(),
                overlap: Overlap::Skip,
                catch_up: CatchUp::Latest,
                origin: Origin::File,
                next_fire_at: upcoming.first().copied(),
                last_fire_at: None,
                last_run_id: None,
                last_error: Some("x".repeat(1_000)),
                created_at: now,
                updated_at: now,
            },
            description: "at 03:00 every day (Europe/Paris)".into(),
            upcoming,
            recent_runs: fires,
        }
    }

    fn fire(status: RunStatus, manual: bool) -> FireRow {
        let at = DateTime::parse_from_rfc3339("2026-07-01T01:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        FireRow {
            tick: at,
            manual,
            fired_by: "grace".repeat(40),
            fired_at: at,
            run_id: Uuid::now_v7(),
            status,
            finished_at: status.is_terminal().then_some(at),
        }
    }

    #[test]
    fn notices_come_from_known_codes_only() {
        let run = Uuid::now_v7();
        let fired = notice_of(Some("fired"), Some("nightly"), Some(&run.to_string())).expect("a notice");
        assert_eq!((fired.tone, fired.schedule.as_str()), ("good", "nightly"));
        assert_eq!(fired.run, Some((run.to_string(), format::short_id(run))));
        let refused = notice_of(Some("in_flight"), Some("nightly"), None).expect("a notice");
        assert_eq!(refused.tone, "bad");
        assert!(refused.text.contains("still in flight"));
        for ignored in [
            (Some("exploded"), Some("nightly"), None),
            (Some("enabled"), Some("<script>"), None),
            (Some("enabled"), None, None),
            (None, Some("nightly"), None),
            (Some("fired"), Some("nightly"), Some("not-a-uuid")),
        ] {
            assert_eq!(notice_of(ignored.0, ignored.1, ignored.2), None, "{ignored:?}");
        }
    }

    #[test]
    fn actions_land_back_on_the_same_page_with_their_notice() {
        let list = ListParams::new(Some("sweep & co".into()), Some("b.2".into())).expect("valid");
        let run = Uuid::now_v7();
        assert_eq!(
            list.after_action("c-3", Done::Fired(run)),
            format!("/schedules?q=sweep%20%26%20co&after=b.2&done=fired&schedule=c-3&run={run}#schedule-c-3")
        );
        assert_eq!(
            ListParams::default().after_action("n", Done::InFlight),
            "/schedules?done=in_flight&schedule=n#schedule-n"
        );
        assert!(matches!(
            ListParams::new(None, Some("no such/name".into())),
            Err(ApiError::Invalid { field, .. }) if field == "after"
        ));
    }

    #[test]
    fn lines_say_when_and_cut_what_is_long() {
        let now = DateTime::parse_from_rfc3339("2026-07-01T00:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let next = now + chrono::Duration::minutes(125);
        let v = view(
            "nightly",
            vec![next, next + chrono::Duration::days(1)],
            vec![fire(RunStatus::Running, true), fire(RunStatus::Completed, false)],
        );
        let l = line(&v, now, Budget::FULL);
        assert_eq!(l.next_in, "in 2 h 05 min");
        assert!(!l.overdue);
        // 02:05 UTC is 04:05 in Paris in summer.
        assert_eq!(l.upcoming[0].local, "Wed 2026-07-01 04:05:00 CEST");
        assert_eq!(l.upcoming[0].utc, "2026-07-01 02:05:00 UTC");
        assert!(l.busy, "a run in flight under overlap skip");
        assert_eq!(l.recent[0].fired_by.chars().count(), Budget::FULL.name);
        assert!(l.recent[0].title.starts_with("fired now by grace"));
        // Every time on the line names its zone: the ticks', the latest runs', the last fire's.
        assert!(
            l.recent.iter().all(|r| r.when.ends_with(" CEST")),
            "{:?}",
            l.recent[0].when
        );
        assert!(l.recent[1].fired_by.is_empty() && l.recent[1].title.starts_with("tick of"));
        assert_eq!(l.last_error.chars().count(), Budget::FULL.text);
        assert!(l.origin_text.contains("schedules file"));

        let late = line(&v, next + chrono::Duration::minutes(10), Budget::FULL);
        assert_eq!((late.next_in.as_str(), late.overdue), ("overdue by 10 min 00 s", true));
        let due = line(&v, next + chrono::Duration::seconds(5), Budget::FULL);
        assert_eq!((due.next_in.as_str(), due.overdue), ("due now", false));
        let disabled = line(&view("off", vec![], vec![]), now, Budget::FULL);
        assert!(disabled.next_in.is_empty() && !disabled.enabled && !disabled.busy);
    }

    #[test]
    fn budgets_halve_down_to_a_floor() {
        let mut b = Budget::FULL;
        for _ in 0..20 {
            b = b.halved();
        }
        assert_eq!(b, b.halved(), "the floor is reached");
        assert!(b.schedules >= 10 && b.recent >= 3 && b.text >= 100);
    }
}
