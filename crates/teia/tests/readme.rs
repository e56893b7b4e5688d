//! The README's quickstarts, run as written, in the README's order, on one machine.
//!
//! Each ```` ```sh ```` block that starts with `# terminal N` is typed into terminal N: a
//! `bash` reading its commands from a pipe, as a shell reads a terminal, so that a
//! `teia node` started there reads the lines typed next. Each ```` ```text terminal=N ````
//! block is a transcript of terminal N: a line starting with `> ` is typed, `^C` sends
//! SIGINT to what runs in the foreground, and any other line must be printed next (in
//! order, anywhere in a line; `…` stands for anything, `<name>` for a word that later
//! commands use where they say `<name>`). Lines starting with `cargo ` are skipped: the
//! `teia` tested is the one just built, first on `PATH`.
//!
//! Commands run in a folder of their own with the clone's `crates/` linked in, under a
//! `HOME` of their own, with LAN discovery off, and (as root) in a network namespace of
//! their own, so that the README's fixed ports meet no other test. A one-shot command
//! must succeed; a node, `teia send` or the like keeps the terminal until it stops, and
//! every one must have stopped by the end of the README.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long one expected line, or one command, may take before the test fails: generous,
/// for a loaded machine (an evaluation of two projects included).
const PATIENCE: Duration = Duration::from_secs(180);

/// How long an expected line may take once what runs in its terminal has ended.
const AFTER_END: Duration = Duration::from_secs(5);

/// What a command prints when it ends, with its exit status.
const DONE: &str = "__readme_command_done ";

/// Commands that keep running (and reading the terminal) until stopped.
const LONG_RUNNING: [&str; 6] = [
    "teia node",
    "teia send",
    "teia rendezvous",
    "teia index",
    "teia worker",
    "PORT=3001 node",
];

#[test]
fn the_readme_quickstarts_work_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let blocks = blocks(&readme);
    assert!(
        blocks.iter().filter(|b| b.terminal.is_some()).count() >= 10,
        "the README's quickstarts were not found"
    );
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        work.join("crates"),
    )
    .unwrap();
    let namespace = Namespace::make();
    let mut run = Run {
        terminals: HashMap::new(),
        words: HashMap::new(),
        work,
        home,
        namespace,
    };
    for block in &blocks {
        match (&block.kind, &block.terminal) {
            (Kind::Commands, Some(terminal)) => {
                for command in &block.lines {
                    run.command(terminal, command);
                }
            }
            (Kind::Transcript, Some(terminal)) => {
                for line in &block.lines {
                    run.transcript_line(terminal, line);
                }
            }
            _ => {}
        }
    }
    for (name, terminal) in &mut run.terminals {
        terminal.wait_done(name);
        eprintln!("terminal {name} showed:\n{}", terminal.shown());
    }
}

/// What a fenced block of the README is.
enum Kind {
    /// ```` ```sh ````: commands.
    Commands,
    /// ```` ```text ````: what a terminal shows, and what is typed in it.
    Transcript,
    /// Anything else.
    Other,
}

/// One fenced block: its kind, the terminal it belongs to, its lines (comments and blank
/// lines of command blocks left out).
struct Block {
    kind: Kind,
    terminal: Option<String>,
    lines: Vec<String>,
}

/// The README's fenced blocks, in order.
fn blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        let mut words = info.split_whitespace();
        let block = match words.next() {
            Some("sh") => {
                let terminal = body
                    .first()
                    .and_then(|first| first.strip_prefix("# terminal "))
                    .map(|t| t.trim().to_owned());
                Block {
                    kind: Kind::Commands,
                    terminal,
                    lines: body
                        .iter()
                        .map(|l| l.trim())
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned)
                        .collect(),
                }
            }
            Some("text") => Block {
                kind: Kind::Transcript,
                terminal: words
                    .find_map(|w| w.strip_prefix("terminal="))
                    .map(str::to_owned),
                lines: body.iter().map(|l| (*l).to_owned()).collect(),
            },
            _ => Block {
                kind: Kind::Other,
                terminal: None,
                lines: Vec::new(),
            },
        };
        blocks.push(block);
    }
    blocks
}

/// The README's terminals and the words their output gave.
struct Run {
    terminals: HashMap<String, Terminal>,
    words: HashMap<String, String>,
    work: std::path::PathBuf,
    home: std::path::PathBuf,
    namespace: Option<Namespace>,
}

impl Run {
    fn terminal(&mut self, name: &str) -> &mut Terminal {
        if !self.terminals.contains_key(name) {
            let terminal = Terminal::open(&self.work, &self.home, self.namespace.as_ref());
            self.terminals.insert(name.to_owned(), terminal);
        }
        self.terminals.get_mut(name).unwrap()
    }

    /// Types `command` in terminal `name`, once what ran there before has ended; waits for
    /// it to succeed unless it keeps running.
    fn command(&mut self, name: &str, command: &str) {
        if command.starts_with("cargo ") {
            return;
        }
        let mut command = command.to_owned();
        for (word, value) in &self.words {
            command = command.replace(&format!("<{word}>"), value);
        }
        let long = LONG_RUNNING.iter().any(|l| command.starts_with(l));
        let terminal = self.terminal(name);
        terminal.wait_done(name);
        // What it prints is expected from here on.
        terminal.seen = terminal
            .seen
            .max(terminal.output.lines.lock().unwrap().len());
        terminal.type_line(&format!("{command}; printf '\\n{DONE}%s\\n' $?"));
        terminal.running = Some(command.clone());
        if !long {
            terminal.wait_done(name);
        }
    }

    /// Plays one transcript line in terminal `name`.
    fn transcript_line(&mut self, name: &str, line: &str) {
        let terminal = self.terminal(name);
        if let Some(typed) = line.strip_prefix("> ") {
            terminal.type_line(typed);
        } else if line == "^C" {
            terminal.interrupt();
        } else if !line.trim().is_empty() {
            let words = terminal.expect(name, line);
            self.words.extend(words);
        }
    }
}

/// One terminal: a `bash` reading commands from a pipe, its output as lines.
struct Terminal {
    shell: Child,
    stdin: ChildStdin,
    output: Arc<Output>,
    /// Lines of output already matched by a transcript.
    seen: usize,
    /// Lines of output before the last end of a command.
    ended: usize,
    /// The command that has not said it ended yet.
    running: Option<String>,
    /// SIGINT was sent to it: it may end with 130.
    interrupted: bool,
}

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Terminal {
    fn open(work: &Path, home: &Path, namespace: Option<&Namespace>) -> Self {
        let teia = Path::new(env!("CARGO_BIN_EXE_teia")).parent().unwrap();
        let path = format!("{}:{}", teia.display(), std::env::var("PATH").unwrap());
        let mut command = match namespace {
            Some(namespace) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/proc/{}/ns/net", namespace.holder.id()))
                    .args(["--", "bash"]);
                command
            }
            None => Command::new("bash"),
        };
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut shell = command
            .current_dir(work)
            .env("HOME", home)
            .env("PATH", path)
            .env("TEIA_NO_LAN", "1")
            .env_remove("XDG_DATA_HOME")
            .env_remove("RUST_LOG")
            .env_remove("TEIA_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bash");
        let output = Arc::new(Output::default());
        for pipe in [
            Box::new(shell.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(shell.stderr.take().unwrap()),
        ] {
            let sink = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n') {
                    let Ok(line) = line else { break };
                    let text = String::from_utf8_lossy(&line).replace('\r', "");
                    sink.lines.lock().unwrap().push(text);
                    sink.changed.notify_all();
                }
            });
        }
        let stdin = shell.stdin.take().unwrap();
        Self {
            shell,
            stdin,
            output,
            seen: 0,
            ended: 0,
            running: None,
            interrupted: false,
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for the command running to end (it must succeed, or end by the SIGINT sent
    /// to it).
    fn wait_done(&mut self, name: &str) {
        let Some(command) = self.running.take() else {
            return;
        };
        let (index, line) =
            self.wait_for(name, &command, self.ended, false, |l| l.starts_with(DONE));
        self.ended = index + 1;
        let status = line.trim_start_matches(DONE).trim();
        let allowed: &[&str] = if self.interrupted {
            &["0", "130"]
        } else {
            &["0"]
        };
        assert!(
            allowed.contains(&status),
            "terminal {name}: `{command}` ended with {status}:\n{}",
            self.shown()
        );
        self.interrupted = false;
    }

    /// Waits until a line past those matched matches `expected`; returns its words.
    fn expect(&mut self, name: &str, expected: &str) -> Vec<(String, String)> {
        let pattern = Pattern::parse(expected);
        let mut words = Vec::new();
        let (index, _) = self.wait_for(name, expected, self.seen, true, |line| {
            match pattern.find(line) {
                Some(found) => {
                    words = found;
                    true
                }
                None => false,
            }
        });
        self.seen = index + 1;
        words
    }

    /// Waits until a line from index `from` on satisfies `wanted`; its index and text.
    /// With `output_ends`, gives up [`AFTER_END`] after what runs in the terminal ended (a
    /// line it printed cannot come later).
    fn wait_for(
        &self,
        name: &str,
        what: &str,
        mut from: usize,
        output_ends: bool,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> (usize, String) {
        let mut deadline = Instant::now() + PATIENCE;
        let mut lines = self.output.lines.lock().unwrap();
        loop {
            let ended = self.running.is_none()
                || lines
                    .get(self.ended..)
                    .unwrap_or_default()
                    .iter()
                    .any(|l| l.starts_with(DONE));
            if output_ends && ended {
                deadline = deadline.min(Instant::now() + AFTER_END);
            }
            if let Some(offset) = lines
                .get(from..)
                .unwrap_or_default()
                .iter()
                .position(|l| wanted(l))
            {
                return (from + offset, lines[from + offset].clone());
            }
            from = lines.len().max(from);
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "terminal {name}: no `{what}`; it showed:\n{}",
                lines.join("\n")
            );
            lines = self.output.changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// SIGINT to the processes the shell runs in the foreground, as Ctrl-C sends it.
    fn interrupt(&mut self) {
        let shell = self.shell.id();
        for pid in children(shell) {
            let status = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        }
        self.interrupted = true;
    }

    fn shown(&self) -> String {
        self.output.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // The shell leads a process group: whatever is left in it goes too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.shell.id())])
            .status();
        let _ = self.shell.wait();
    }
}

/// The processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// An expected line: text, `…` (anything) and `<name>` (a word, remembered).
struct Pattern {
    pieces: Vec<Piece>,
}

enum Piece {
    Text(String),
    Anything,
    Word(String),
}

impl Pattern {
    fn parse(line: &str) -> Self {
        let mut pieces = Vec::new();
        let mut rest = line;
        while !rest.is_empty() {
            let next = [rest.find('…'), rest.find('<')].into_iter().flatten().min();
            match next {
                Some(0) if rest.starts_with('…') => {
                    pieces.push(Piece::Anything);
                    rest = &rest['…'.len_utf8()..];
                }
                Some(0) => match rest.find('>') {
                    Some(end) if rest[1..end].chars().all(|c| c.is_ascii_lowercase()) => {
                        pieces.push(Piece::Word(rest[1..end].to_owned()));
                        rest = &rest[end + 1..];
                    }
                    _ => {
                        pieces.push(Piece::Text("<".to_owned()));
                        rest = &rest[1..];
                    }
                },
                Some(at) => {
                    pieces.push(Piece::Text(rest[..at].to_owned()));
                    rest = &rest[at..];
                }
                None => {
                    pieces.push(Piece::Text(rest.to_owned()));
                    rest = "";
                }
            }
        }
        Self { pieces }
    }

    /// The words of `line` if it matches (anywhere in it).
    fn find(&self, line: &str) -> Option<Vec<(String, String)>> {
        matches(&self.pieces, line, false)
    }
}

/// Whether `pieces` match a prefix of `text` (`anchored`) or a part of it.
fn matches(pieces: &[Piece], text: &str, anchored: bool) -> Option<Vec<(String, String)>> {
    let Some((first, rest)) = pieces.split_first() else {
        return Some(Vec::new());
    };
    let starts: Vec<usize> = if anchored {
        vec![0]
    } else {
        text.char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect()
    };
    match first {
        Piece::Anything => matches(rest, text, false),
        Piece::Text(literal) => starts.into_iter().find_map(|start| {
            text[start..]
                .strip_prefix(literal.as_str())
                .and_then(|after| matches(rest, after, true))
        }),
        Piece::Word(name) => starts.into_iter().find_map(|start| {
            let tail = &text[start..];
            let longest = tail.find(char::is_whitespace).unwrap_or(tail.len());
            (1..=longest)
                .rev()
                .filter(|end| tail.is_char_boundary(*end))
                .find_map(|end| {
                    let mut words = matches(rest, &tail[end..], true)?;
                    words.push((name.clone(), tail[..end].to_owned()));
                    Some(words)
                })
        }),
    }
}

/// A network namespace with only `lo` up, held by a process of its own; `None` when this
/// user may not make one (the quickstarts then use the machine's loopback).
struct Namespace {
    holder: Child,
}

impl Namespace {
    fn make() -> Option<Self> {
        let mut holder = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && echo up && exec sleep 100000",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut said = String::new();
        BufReader::new(holder.stdout.take()?)
            .read_line(&mut said)
            .ok()?;
        if said.trim() == "up" {
            Some(Self { holder })
        } else {
            let _ = holder.kill();
            let _ = holder.wait();
            eprintln!("no network namespace here: the quickstarts use this machine's loopback");
            None
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
