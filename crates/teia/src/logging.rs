//! Log setup: `tracing` to standard error or a file, level from `--log`, else `RUST_LOG`,
//! else `info`; the level can be changed while running (`/log`).

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the log filter of the running process; knows where the log goes.
#[derive(Clone)]
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    file: Option<std::path::PathBuf>,
}

impl LogControl {
    /// The file logs go to (none: standard error).
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Replaces the filter (`debug`, `teia_node=trace,info`, ...).
    pub fn set(&self, filter: &str) -> anyhow::Result<()> {
        if !crate::chat::is_log_filter(filter) {
            anyhow::bail!(
                "invalid log level {filter:?}: use error, warn, info, debug, trace or off"
            );
        }
        let filter =
            EnvFilter::try_new(filter).with_context(|| format!("invalid log level {filter:?}"))?;
        self.filter
            .reload(filter)
            .context("cannot change the log level")
    }
}

/// Installs the global subscriber.
pub fn init(level: Option<&str>, file: Option<&Path>) -> anyhow::Result<LogControl> {
    let filter = match level {
        Some(level) if !crate::chat::is_log_filter(level) => {
            anyhow::bail!("invalid --log value {level:?}: use error, warn, info, debug, trace or off (or target=level,...)")
        }
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("invalid --log value {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Mutex::new(file));
            registry.with(layer).init();
        }
        None => {
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr);
            registry.with(layer).init();
        }
    }
    Ok(LogControl {
        filter: handle,
        file: file.map(Path::to_path_buf),
    })
}
