//! Logging: `tracing` with one JSON object per line in clusters (`--log-format json`, the
//! default) or human-readable lines locally; the level comes from `RUST_LOG` when set,
//! otherwise from `--log-level`.

use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Install the global subscriber. Fails when one is already installed.
pub fn init(
    format: LogFormat,
    level: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    }
}
