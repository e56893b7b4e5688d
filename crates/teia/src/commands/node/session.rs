//! The chat's interfaces on a running node: the interactive shell, plain text lines, or
//! JSON lines with `--json`; the session that runs commands and shows events.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use teia_core::overlay::{Cast, Event, Refusal};
use teia_files::{Files, FilesEvent};
use teia_node::chat::{Chat, ChatEvent};
use teia_node::node::{NodeEvent, NodeHandle};
use teia_node::rendezvous::RegistrarEvent;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::chat::{self, ChatCommand};
use crate::commands::{files, shutdown_signal};
use crate::logging::LogControl;
use crate::present::{clean, fmt_rtt, short};

/// Messages said in this session remembered until their chat `Sent` comes back.
const SAID_HERE_KEPT: usize = 256;

use super::describe::{describe, describe_chat};
use super::{resolve, Feeds, Services, Style, INPUT_LINES};

/// Non-interactive interface: commands from stdin lines, events and output on stdout; the
/// end of stdin stops the node when `stop_at_end`, else it runs until a signal.
pub(super) async fn lines(
    handle: NodeHandle,
    services: Services,
    mut feeds: Feeds,
    style: Style,
    stop_at_end: bool,
    log: LogControl,
) -> anyhow::Result<()> {
    let (tx, mut input) = mpsc::channel::<String>(INPUT_LINES);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let stop = services.stop;
    let mut session = Session {
        handle,
        chat: services.chat,
        files: services.files,
        progress_shown: Default::default(),
        bars: None,
        style,
        log,
        watching: false,
        registered: false,
        connected: std::collections::HashSet::new(),
        said_here: std::collections::VecDeque::new(),
        http: services.http,
        print: Box::new(|line: String| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }),
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut input_open = true;
    let mut stopping = false;
    loop {
        tokio::select! {
            () = &mut signal, if !stopping => {
                stopping = true;
                stop.stop().await;
            }
            event = feeds.node.recv() => match event {
                Some(event @ NodeEvent::Stopped) => {
                    session.show(&event).await;
                    return Ok(());
                }
                None => return Ok(()),
                Some(event) => session.show(&event).await,
            },
            Some(event) = feeds.chat.recv() => session.show_chat(&event).await,
            Some(event) = feeds.files.recv() => session.show_files(&event),
            line = input.recv(), if input_open && !stopping => match line {
                Some(line) => {
                    if !session.command(&line).await {
                        stopping = true;
                        stop.stop().await;
                    }
                }
                None => {
                    input_open = false;
                    if stop_at_end {
                        stopping = true;
                        stop.stop().await;
                    }
                }
            },
        }
    }
}

/// Interactive shell: line editing and history, incoming messages printed above the line
/// being typed.
pub(super) async fn shell(
    handle: NodeHandle,
    services: Services,
    mut feeds: Feeds,
    log: LogControl,
) -> anyhow::Result<()> {
    use rustyline::ExternalPrinter;
    let mut editor = rustyline::DefaultEditor::new().context("cannot open the terminal")?;
    let printer = editor
        .create_external_printer()
        .context("cannot print on the terminal")?;
    let printer = Arc::new(std::sync::Mutex::new(printer));
    let (tx, mut input) = mpsc::channel::<Option<String>>(INPUT_LINES);
    std::thread::spawn(move || loop {
        match editor.readline("> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if tx.blocking_send(Some(line)).is_err() {
                    return;
                }
            }
            Err(e) => {
                if matches!(e, rustyline::error::ReadlineError::Interrupted) {
                    crate::commands::interrupted();
                }
                let _ = tx.blocking_send(None);
                return;
            }
        }
    });
    let mut session = Session {
        handle,
        chat: services.chat,
        files: services.files,
        progress_shown: Default::default(),
        style: Style::Text,
        log,
        watching: false,
        registered: false,
        connected: std::collections::HashSet::new(),
        said_here: std::collections::VecDeque::new(),
        http: services.http,
        bars: Some(files::ShellBars::new(Arc::new({
            let printer = Arc::clone(&printer);
            move |line: String| {
                if let Ok(mut printer) = printer.lock() {
                    let _ = printer.print(format!("{line}\n"));
                }
            }
        }))),
        print: Box::new(move |line: String| {
            if let Ok(mut printer) = printer.lock() {
                let _ = printer.print(format!("{line}\n"));
            }
        }),
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return Ok(()),
            event = feeds.node.recv() => match event {
                Some(NodeEvent::Stopped) | None => return Ok(()),
                Some(event) => session.show(&event).await,
            },
            Some(event) = feeds.chat.recv() => session.show_chat(&event).await,
            Some(event) = feeds.files.recv() => session.show_files(&event),
            line = input.recv() => match line.flatten() {
                Some(line) => {
                    if !session.command(&line).await {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
        }
    }
}

struct Session {
    handle: NodeHandle,
    /// The chat service: what the user says goes through it.
    chat: Chat,
    files: Files,
    /// The last tenth of each download's progress shown in text.
    progress_shown: std::collections::HashMap<teia_files::proto::tree::Hash, u64>,
    /// The shell's progress bars (interactive shell only).
    bars: Option<files::ShellBars>,
    style: Style,
    log: LogControl,
    watching: bool,
    /// Registered at the rendezvous (so renewals are not shown again in text).
    registered: bool,
    /// Peers shown connected in text (a link replaced by a simultaneous one is not shown
    /// again); at most one per link.
    connected: std::collections::HashSet<String>,
    print: Box<dyn FnMut(String) + Send>,
    /// Messages this session said and showed, whose chat `Sent` is not shown again (at most
    /// [`SAID_HERE_KEPT`]).
    said_here: std::collections::VecDeque<String>,
    /// Where the HTTP API answers and the dashboard's link, said after the node's `ready`.
    http: Option<super::jobs::HttpFacts>,
}

impl Session {
    fn emit(&mut self, json: Value, text: String) {
        let line = match self.style {
            Style::Json => json.to_string(),
            Style::Text => text,
        };
        (self.print)(line);
    }

    fn output(&mut self, command: &str, data: Value, text: String) {
        self.emit(
            json!({"event":"output","command":command,"data":data}),
            text,
        );
    }

    fn usage(&mut self, error: &str) {
        self.emit(json!({"event":"usage","error":error}), format!("! {error}"));
    }

    /// Runs one input line; false when the session should end.
    async fn command(&mut self, line: &str) -> bool {
        let command = match chat::parse(line) {
            Ok(Some(command)) => command,
            Ok(None) => return true,
            Err(error) => {
                self.usage(&error);
                return true;
            }
        };
        if let Err(e) = self.execute(command.clone()).await {
            self.emit(
                json!({"event":"command_error","error":format!("{e:#}")}),
                format!("! {e:#}"),
            );
        }
        command != ChatCommand::Quit
    }

    async fn execute(&mut self, command: ChatCommand) -> anyhow::Result<()> {
        match command {
            ChatCommand::Msg { dst, text } | ChatCommand::Pub { dst, text } => {
                // Said here before its outcome can be shown; the chat's `Sent` of it, for
                // the other interfaces, is not shown again.
                let dst = self.destination(dst).await?;
                let msg_id = self.chat.say(&dst, Value::String(text)).await?;
                self.emit(
                    json!({"event":"sent","msg_id":msg_id,"dst":dst}),
                    format!("… sent to {dst} ({})", short(&msg_id)),
                );
                if self.said_here.len() >= SAID_HERE_KEPT {
                    self.said_here.pop_front();
                }
                self.said_here.push_back(msg_id);
            }
            ChatCommand::Connect(target) => {
                let addr = match target.parse::<SocketAddr>() {
                    Ok(addr) => addr,
                    Err(_) if teia_core::overlay::is_peer_id(&target) => {
                        let known = self.handle.snapshot().await?.known;
                        known
                            .into_iter()
                            .find(|(peer, _)| *peer == target)
                            .map(|(_, addr)| addr)
                            .with_context(|| {
                                format!("{target} is not known yet; use /connect HOST:PORT")
                            })?
                    }
                    Err(_) => resolve(&target).await?,
                };
                self.handle.connect(addr).await?;
                self.output(
                    "connect",
                    json!({"addr":addr.to_string()}),
                    format!("… connecting to {addr}"),
                );
            }
            ChatCommand::Peers(filter) => self.peers(filter).await?,
            ChatCommand::Routes => self.routes().await?,
            ChatCommand::Conn => self.conn().await?,
            ChatCommand::Rtt => self.rtt().await?,
            ChatCommand::Watch => {
                self.watching = !self.watching;
                self.handle.watch(self.watching).await?;
                let state = if self.watching { "on" } else { "off" };
                self.output(
                    "watch",
                    json!({"watching":self.watching}),
                    format!("… watch {state}"),
                );
            }
            ChatCommand::Reconnect => {
                self.handle.reconnect().await?;
                self.output("reconnect", json!({}), "… redialing known peers".into());
            }
            ChatCommand::Log(level) => {
                self.log.set(&level)?;
                self.output(
                    "log",
                    json!({"level":level}),
                    format!("… log level {level}"),
                );
            }
            ChatCommand::Metrics(Some(peer)) => {
                self.handle.request_metrics(&peer).await?;
            }
            ChatCommand::Metrics(None) => {
                let snapshot = self.handle.snapshot().await?;
                let c = snapshot.counters;
                self.output(
                    "metrics",
                    json!({"sent":c.sent,"received":c.received,"forwarded":c.forwarded,
                           "duplicates":c.duplicates,"errors":c.errors,"delivered":c.delivered,
                           "dropped":c.dropped,"forged":c.forged}),
                    format!(
                        "sent {} received {} forwarded {} duplicates dropped {} errors {} delivered {} queue drops {} forged refused {}",
                        c.sent, c.received, c.forwarded, c.duplicates, c.errors, c.delivered, c.dropped, c.forged
                    ),
                );
            }
            ChatCommand::Id => {
                let key = self.handle.snapshot().await?.key;
                let key = key.map(|k| k.to_string());
                self.output(
                    "id",
                    json!({"key":key}),
                    format!("… key {}", key.as_deref().unwrap_or("(none)")),
                );
            }
            ChatCommand::Trust { peer, key } => {
                let key = teia_core::identity::PublicKey::parse(&key)?;
                self.handle.trust(&peer, key).await?;
                self.output(
                    "trust",
                    json!({"peer":peer,"key":key.to_string()}),
                    format!("… {peer} pinned to key {key}"),
                );
            }
            ChatCommand::Forget(peer) => {
                let old = self.handle.forget(&peer).await?;
                let text = match &old {
                    Some(key) => format!("… {} unpinned (was {key})", clean(&peer)),
                    None => format!("… {} had no pinned key", clean(&peer)),
                };
                self.output(
                    "forget",
                    json!({"peer":peer,"was":old.map(|k| k.to_string())}),
                    text,
                );
            }
            ChatCommand::Files(command) => {
                let (name, data, text) = files::run(&self.files, command).await?;
                self.output(name, data, text);
            }
            ChatCommand::Help => self.output("help", json!(chat::HELP), chat::HELP.to_owned()),
            ChatCommand::Quit => self.output("quit", json!({}), "… bye".into()),
        }
        Ok(())
    }

    async fn peers(&mut self, filter: Option<String>) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let matches = |peer: &str| match filter.as_deref() {
            None | Some("*") => true,
            Some(ns) => peer.ends_with(&format!("@{}", ns.trim_start_matches('#'))),
        };
        let links: Vec<&teia_core::overlay::NeighbourInfo> = snapshot
            .neighbours
            .iter()
            .filter(|n| matches(&n.peer))
            .collect();
        let connected: Vec<&str> = links.iter().map(|n| n.peer.as_str()).collect();
        let known: Vec<(String, String)> = snapshot
            .known
            .iter()
            .filter(|(peer, _)| matches(peer) && !connected.contains(&peer.as_str()))
            .map(|(peer, addr)| (peer.clone(), addr.to_string()))
            .collect();
        let mut text = String::from("connected:");
        let mut links_json = Vec::new();
        for n in &links {
            let security = match (n.encrypted, n.key) {
                (true, Some(key)) => format!("encrypted, key {}…", key.fingerprint()),
                _ => "plaintext (course peer)".to_owned(),
            };
            text.push_str(&format!("\n  {:<30} {security}", clean(&n.peer)));
            links_json.push(json!({"peer":n.peer,"encrypted":n.encrypted,
                "key":n.key.map(|k| k.to_string()),
                "fingerprint":n.key.map(|k| k.fingerprint())}));
        }
        text.push_str("\nknown, not connected:");
        for (peer, addr) in &known {
            text.push_str(&format!("\n  {} ({addr})", clean(peer)));
        }
        let known_json: Vec<Value> = known
            .iter()
            .map(|(peer, addr)| json!({"peer":peer,"addr":addr}))
            .collect();
        self.output(
            "peers",
            json!({"connected":connected,"links":links_json,"known":known_json}),
            text,
        );
        Ok(())
    }

    async fn routes(&mut self) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let mut text = String::from("neighbours:");
        let mut neighbours = Vec::new();
        for n in &snapshot.neighbours {
            let rtt = n.rtt.map(|r| r.as_secs_f64() * 1000.0);
            text.push_str(&format!("\n  {:<30} rtt {}", n.peer, fmt_rtt(rtt)));
            neighbours.push(json!({"peer":n.peer,"addr":n.addr.to_string(),"rtt_ms":rtt}));
        }
        text.push_str("\nroutes:");
        let mut routes = Vec::new();
        for r in &snapshot.routes {
            text.push_str(&format!(
                "\n  {:<30} via {:<30} {} hops, {} s old",
                clean(&r.dst),
                clean(&r.next_hop),
                r.hops,
                r.age.as_secs()
            ));
            routes.push(
                json!({"dst":r.dst,"next_hop":r.next_hop,"hops":r.hops,"age_s":r.age.as_secs()}),
            );
        }
        let c = snapshot.counters;
        text.push_str(&format!(
            "\ncounters: sent {} received {} forwarded {} duplicates {} errors {}",
            c.sent, c.received, c.forwarded, c.duplicates, c.errors
        ));
        self.output(
            "routes",
            json!({"neighbours":neighbours,"routes":routes,
                   "counters":{"sent":c.sent,"received":c.received,"forwarded":c.forwarded,
                               "duplicates":c.duplicates,"errors":c.errors}}),
            text,
        );
        Ok(())
    }

    async fn conn(&mut self) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let mut text = String::from("connections:");
        let mut list = Vec::new();
        for n in &snapshot.neighbours {
            let direction = if n.inbound { "in" } else { "out" };
            text.push_str(&format!(
                "\n  {:<30} {:<22} {:<3} sent {} received {}{}",
                n.peer,
                n.addr,
                direction,
                n.sent,
                n.received,
                if n.teia { "" } else { " (course peer)" }
            ));
            list.push(
                json!({"peer":n.peer,"addr":n.addr.to_string(),"direction":direction,
                             "sent":n.sent,"received":n.received,"teia":n.teia}),
            );
        }
        self.output("conn", Value::Array(list), text);
        Ok(())
    }

    async fn rtt(&mut self) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let mut text = String::from("round-trip times:");
        let mut list = Vec::new();
        for n in &snapshot.neighbours {
            let rtt = n.rtt.map(|r| r.as_secs_f64() * 1000.0);
            text.push_str(&format!("\n  {:<30} {}", n.peer, fmt_rtt(rtt)));
            list.push(json!({"peer":n.peer,"rtt_ms":rtt}));
        }
        self.output("rtt", Value::Array(list), text);
        Ok(())
    }

    /// Where `/msg` sends: a bare name is resolved among the peers this node knows (linked,
    /// routed, learnt or pinned); a full peer id nobody here knows is sent anyway (the
    /// network may find it) but said at once, with the peers known, in text.
    async fn destination(&mut self, dst: String) -> anyhow::Result<String> {
        if dst == "*" || dst.starts_with('#') {
            return Ok(dst);
        }
        let snapshot = self.handle.snapshot().await?;
        let mut known: Vec<String> = snapshot
            .neighbours
            .iter()
            .map(|n| n.peer.clone())
            .chain(snapshot.routes.iter().map(|r| r.dst.clone()))
            .chain(snapshot.known.iter().map(|(peer, _)| peer.clone()))
            .chain(snapshot.pins.iter().map(|(peer, _)| peer.clone()))
            .filter(|peer| teia_wire::fields::is_peer_id(peer))
            .collect();
        known.sort();
        known.dedup();
        let listed = || {
            let shown: Vec<String> = known.iter().take(8).map(|p| clean(p)).collect();
            match (shown.is_empty(), known.len() > shown.len()) {
                (true, _) => "no peer is known yet".to_owned(),
                (false, false) => format!("known: {}", shown.join(", ")),
                (false, true) => format!("known: {}, … (/peers lists them)", shown.join(", ")),
            }
        };
        if !dst.contains('@') {
            let named: Vec<&String> = known
                .iter()
                .filter(|peer| peer.split_once('@').is_some_and(|(name, _)| name == dst))
                .collect();
            return match named.as_slice() {
                [one] => Ok((*one).clone()),
                [] => bail!("no known peer is named {}; {}", clean(&dst), listed()),
                several => bail!(
                    "{} is the name of several peers: {}; write name@namespace",
                    clean(&dst),
                    several
                        .iter()
                        .map(|p| clean(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        }
        if self.style == Style::Text && !known.contains(&dst) {
            self.emit(
                json!({}),
                format!(
                    "! {} is not a peer this node knows ({}); sending anyway: it arrives if the \
                     network finds it before --send-deadline",
                    clean(&dst),
                    listed()
                ),
            );
        }
        Ok(dst)
    }

    /// Shows a chat event; a direct message is then marked shown, so a restart does not
    /// hand it over again.
    async fn show_chat(&mut self, event: &ChatEvent) {
        if let ChatEvent::Sent { msg_id, .. } = event {
            if let Some(at) = self.said_here.iter().position(|id| id == msg_id) {
                self.said_here.remove(at);
                return;
            }
        }
        let (json, text) = describe_chat(event);
        self.emit(json, text);
        if let ChatEvent::Message(message) = event {
            if message.cast == Cast::Unicast {
                let _ = self.chat.shown(&message.msg_id).await;
            }
        }
    }

    /// Shows a node event. A renewed registration is shown in text only the first time.
    async fn show(&mut self, event: &NodeEvent) {
        // Queries and hits of services this node does not run: nothing for the chat.
        if let NodeEvent::Overlay(Event::Query { .. } | Event::QueryHit { .. }) = event {
            return;
        }
        let (json, text) = describe(event);
        let renewal = matches!(event, NodeEvent::Rendezvous(RegistrarEvent::Registered(_)))
            && std::mem::replace(&mut self.registered, true);
        if matches!(event, NodeEvent::Rendezvous(RegistrarEvent::Failed { .. })) {
            self.registered = false;
        }
        // Two nodes that found each other at once both dial: one link stays, nothing to say.
        let simultaneous = matches!(
            event,
            NodeEvent::Overlay(Event::Refused {
                refusal: Refusal::Duplicate,
                ..
            })
        );
        // Peers learnt from a rendezvous, LAN discovery or a peer list that cannot be reached
        // are summarised in the log; only what the user asked for is said in the chat.
        let learnt = matches!(
            event,
            NodeEvent::Overlay(
                Event::DialFailed { asked: false, .. } | Event::DialGaveUp { asked: false, .. }
            )
        );
        let again = match event {
            NodeEvent::Overlay(Event::LinkUp { peer, .. }) => !self.connected.insert(peer.clone()),
            NodeEvent::Overlay(Event::LinkDown { peer, .. }) => {
                self.connected.remove(peer);
                false
            }
            _ => false,
        };
        if !((renewal || simultaneous || again || learnt) && self.style == Style::Text) {
            self.emit(json, text);
        }
        if let (NodeEvent::Ready { .. }, Some(http)) = (event, self.http.clone()) {
            self.emit(
                json!({"event":"http_listening","addr":http.addr.to_string(),
                       "dashboard":http.dashboard}),
                format!(
                    "… HTTP API on http://{} (teia eval, teia job, curl); dashboard: {}",
                    http.addr, http.dashboard
                ),
            );
        }
    }
}

impl Session {
    /// Shows a file-sharing event. In text, a download's progress is shown at each tenth
    /// only, so it does not crowd out the chat: in the shell as an `indicatif` bar.
    fn show_files(&mut self, event: &FilesEvent) {
        if let Some(bars) = &mut self.bars {
            match event {
                FilesEvent::Progress(info) => return bars.progress(info),
                FilesEvent::Done { info, .. } => bars.done(&info.hash),
                FilesEvent::Failed { hash, .. } => bars.done(hash),
                _ => {}
            }
        }
        if let (Style::Text, FilesEvent::Progress(info)) = (self.style, event) {
            let tenth = info.bytes.saturating_mul(10) / info.size.unwrap_or(u64::MAX).max(1);
            let last = self.progress_shown.entry(info.hash).or_insert(0);
            if tenth <= *last {
                return;
            }
            *last = tenth;
            if self.progress_shown.len() > 64 {
                self.progress_shown.clear();
            }
        }
        let (json, text) = files::describe(event);
        self.emit(json, text);
    }
}
