//! The `teia` binary: parses the command line, sets up logging and runs one command.

mod chat;
mod cli;
mod commands;
mod logging;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let log = match logging::init(cli.log.as_deref(), cli.log_file.as_deref()) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    match commands::run(cli.command, log) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
