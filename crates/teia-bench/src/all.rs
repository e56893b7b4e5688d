//! `teia-bench all`: every benchmark in turn, each in its own process with its defaults,
//! under a header that names the machine and the moment, so that one run gives the whole
//! table.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

/// Flags of `teia-bench all`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Benchmarks to leave out (all run by default).
    #[arg(long, value_enum)]
    skip: Vec<Part>,
}

/// One benchmark of the suite, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// `teia-bench rendezvous`.
    Rendezvous,
    /// `teia-bench overlay`.
    Overlay,
    /// `teia-bench files`.
    Files,
    /// `teia-bench jobs`.
    Jobs,
    /// `teia-bench web`.
    Web,
    /// `teia-bench eval` (the longest: real projects from PyPI included).
    Eval,
}

impl Part {
    const ALL: [Self; 6] = [
        Self::Rendezvous,
        Self::Overlay,
        Self::Files,
        Self::Jobs,
        Self::Web,
        Self::Eval,
    ];

    fn command(self) -> &'static str {
        match self {
            Self::Rendezvous => "rendezvous",
            Self::Overlay => "overlay",
            Self::Files => "files",
            Self::Jobs => "jobs",
            Self::Web => "web",
            Self::Eval => "eval",
        }
    }
}

/// The first `model name` of /proc/cpuinfo.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// What a command prints on one line, if it runs.
fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Runs the benchmarks not skipped, printing each one's output as it comes.
pub fn run(args: Args) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("cannot find this benchmark's binary")?;
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let date = output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let commit = output_of("git", &["rev-parse", "--short", "HEAD"])
        .map(|c| format!(", commit {c}"))
        .unwrap_or_default();
    let kernel = output_of("uname", &["-r"]).unwrap_or_default();
    println!(
        "teia-bench all: {date}{commit}; {cpus} CPUs ({}), Linux {kernel}",
        cpu_model()
    );
    let mut failed = Vec::new();
    for part in Part::ALL {
        if args.skip.contains(&part) {
            continue;
        }
        println!("\n## teia-bench {}\n", part.command());
        let started = Instant::now();
        let status = Command::new(&me)
            .arg(part.command())
            .status()
            .with_context(|| format!("cannot run teia-bench {}", part.command()))?;
        println!("({:.0} s)", started.elapsed().as_secs_f64());
        if !status.success() {
            failed.push(part.command());
        }
    }
    if !failed.is_empty() {
        bail!("these benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}
