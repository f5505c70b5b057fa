//! Logging: human-readable lines by default, one JSON object per line with `--log-format json`.
//! Spans carry the run id, workflow, step and attempt, so every line of a step attempt says
//! which run it belongs to. Lines are written to stderr by a thread of their own
//! (`tracing-appender`'s non-blocking writer), never by the runtime's threads: a stderr that
//! stops being read (a full pipe) then drops lines past the writer's queue instead of
//! stalling every run.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// For log pipelines.
    Json,
}

/// Keeps the log's writer thread: hold it until the process ends; dropping it writes the
/// lines still queued.
#[must_use = "dropping the guard stops the log's writer"]
pub struct LogGuard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

/// Installs the global subscriber. `RUST_LOG` overrides the default filter
/// (`info`, with sqlx's statement logging at `warn`). Calling it twice installs nothing more.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_span_events(FmtSpan::NONE)
            .try_init(),
    };
    LogGuard(guard)
}

/// Whether log lines are coloured: only on a terminal, and not when `NO_COLOR` is set to
/// anything (<https://no-color.org>), so a log file or a pipe gets plain text.
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
