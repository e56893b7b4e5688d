//! The `teia` binary: parses the command line, sets up logging and runs one command.

mod chat;
mod cli;
mod commands;
mod logging;
mod present;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Descriptors inherited from whoever started teia (a lock, a socket) are no one else's
    // business: none reaches a task, an interpreter or a tool the node starts.
    close_fds::set_fds_cloexec(3, &[]);
    let cli = cli::Cli::parse();
    let log_file = cli
        .log_file
        .clone()
        .or_else(|| shell_log_file(&cli.command));
    if cli.log_file.is_none() {
        if let Some(path) = &log_file {
            eprintln!("teia: logs go to {}", path.display());
        }
    }
    let log = match logging::init(cli.log.as_deref(), log_file.as_deref()) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            return std::process::ExitCode::from(2);
        }
    };
    let result = commands::run(cli.command, log);
    if let Err(e) = &result {
        eprintln!("error: {}", report(e));
    }
    if commands::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        // Interrupted by Ctrl-C: 128 + SIGINT, as shells report it.
        return std::process::ExitCode::from(130);
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// Where an interactive chat shell logs when no `--log-file` is given: beside the node's
/// database, so that log lines never land in the middle of the chat.
fn shell_log_file(command: &cli::Command) -> Option<PathBuf> {
    let cli::Command::Node(args) = command else {
        return None;
    };
    if args.json || !std::io::stdin().is_terminal() {
        return None;
    }
    let dir = commands::data_dir(args.home.data_dir.clone()).ok()?;
    let path = commands::node_file(&dir, &args.home.peer_id(&args.name).ok()?, "log");
    std::fs::create_dir_all(path.parent()?).ok()?;
    Some(path)
}

/// An error and its causes on one line, each cause said once: a cause whose text an outer
/// message already contains is left out.
fn report(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}
