//! Seed 003 (the Node.js peer-exchange chat) with teia nodes, run against the seed's own code:
//! `tests/seed003/index.js` and `Peer.js` as the document prints them, run by `node`. A mixed
//! network of Node peers and teia nodes shows every line typed anywhere once everywhere, and
//! keeps doing so when the first nodes started are killed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{ChildStdin, Command};

use common::*;
use serde_json::Value;

/// A peer of the seed's chat: `PORT=port node index.js HOSTS…`.
struct NodePeer {
    process: Process,
    stdin: ChildStdin,
    port: u16,
}

impl NodePeer {
    fn start(hosts: &[String]) -> Self {
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed003/index.js");
        let mut command = Command::new("node");
        command
            .arg(script)
            .args(hosts)
            .env("PORT", port.to_string());
        let (process, stdin) = Process::spawn_capturing(command);
        process.wait_for_log(&format!("Listening on port:  {port}"));
        Self {
            process,
            stdin,
            port,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its name in the overlay.
    fn peer_id(&self) -> String {
        format!("127.0.0.1:{}@UnB", self.port)
    }

    fn type_line(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Lines it printed that contain `needle`.
    fn count(&self, needle: &str) -> usize {
        self.process
            .lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until it printed `count` lines containing `needle`.
    fn wait_count(&self, needle: &str, count: usize) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while self.count(needle) < count {
            assert!(
                std::time::Instant::now() < deadline,
                "node peer {}: fewer than {count} lines with {needle:?}:\n{}",
                self.port,
                self.process.lines().join("\n")
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Someone in the mixed network.
enum Member<'a> {
    Node(&'a mut NodePeer),
    Teia(&'a mut NodeProcess),
}

impl Member<'_> {
    fn say(&mut self, text: &str) {
        match self {
            Member::Node(peer) => peer.type_line(text),
            Member::Teia(node) => node.command(&format!("/msg #UnB {text}")),
        }
    }

    fn seen(&self, text: &str) -> usize {
        match self {
            Member::Node(peer) => peer.count(text),
            Member::Teia(node) => node.count(|e| is_message(e, text)),
        }
    }

    fn wait_seen(&self, text: &str) {
        match self {
            Member::Node(peer) => peer.wait_count(text, 1),
            Member::Teia(node) => {
                node.wait_event(&format!("message {text}"), |e| is_message(e, text));
            }
        }
    }
}

fn is_message(event: &Value, text: &str) -> bool {
    event["event"] == "message" && event["payload"].as_str().is_some_and(|p| p.contains(text))
}

/// Each member says a line of its own; every other member must show each line exactly
/// once. A second round of lines (a fence) is awaited before counting, so that a duplicate
/// on a slower path has had the time its path takes.
fn every_line_once_everywhere(members: &mut [Member<'_>], round: &str) {
    for fence in [false, true] {
        let tag = if fence { "fence" } else { "line" };
        let texts: Vec<String> = (0..members.len())
            .map(|i| format!("{round}-{tag}-from-{i}"))
            .collect();
        for (member, text) in members.iter_mut().zip(&texts) {
            member.say(text);
        }
        for (i, member) in members.iter().enumerate() {
            for (j, text) in texts.iter().enumerate() {
                if i != j {
                    member.wait_seen(text);
                }
            }
        }
    }
    for (i, member) in members.iter().enumerate() {
        for j in 0..members.len() {
            let text = format!("{round}-line-from-{j}");
            if i != j {
                assert_eq!(member.seen(&text), 1, "member {i} shows {text:?} not once");
            }
        }
    }
}

#[test]
fn a_mixed_network_of_node_peers_and_teia_nodes_shows_every_line_once() {
    let (_rdv_dir, rdv) = rendezvous();
    let rdv = rdv.addr.to_string();
    let mut t1 = NodeProcess::start("t1", "UnB", &["--rendezvous", &rdv]);

    // n1 dials t1, which becomes its home; once t1 has asked for n1's hosts again (n1
    // prints a second "Connected to"), n2 joins the network through n1 only.
    let mut n1 = NodePeer::start(&[t1.addr()]);
    t1.wait_link(&n1.peer_id());
    n1.wait_count("Connected to", 2);
    let mut n2 = NodePeer::start(&[n1.addr()]);
    n1.wait_count("[Added known host", 3);

    // t2 is asked to link n2 (--pex-peer), and learns n1 from it: n1 has a home, t1.
    let mut t2 = NodeProcess::start(
        "t2",
        "UnB",
        &[
            "--rendezvous",
            &rdv,
            "--peer",
            &t1.addr(),
            "--pex-peer",
            &n2.addr(),
        ],
    );
    t2.wait_link(&n2.peer_id());
    t2.process.wait_for_log(&format!(
        "t1@UnB is home to {}, directly linked with []",
        n1.addr()
    ));
    t1.process.wait_for_log(&format!(
        "t2@UnB is home to {}, directly linked with [{}]",
        n2.addr(),
        n1.addr()
    ));

    // n3 dials n2 and t1: t1 is its home, and t2 hears which peers n3 reaches directly.
    let mut n3 = NodePeer::start(&[n2.addr(), t1.addr()]);
    t1.wait_link(&n3.peer_id());
    t2.process.wait_for_log(&format!(
        "t1@UnB is home to {}, directly linked with [{}]",
        n3.addr(),
        n2.addr()
    ));

    let mut t3 = NodeProcess::joining("t3", "UnB", &rdv, &t1.addr());
    t3.wait_link("t1@UnB");
    t3.wait_link("t2@UnB");
    t3.process
        .wait_for_log(&format!("t2@UnB is home to {}", n2.addr()));

    every_line_once_everywhere(
        &mut [
            Member::Node(&mut n1),
            Member::Node(&mut n2),
            Member::Node(&mut n3),
            Member::Teia(&mut t1),
            Member::Teia(&mut t2),
            Member::Teia(&mut t3),
        ],
        "first",
    );

    // The first teia node and the first Node peer die: n3 (t1's) is adopted by one of the
    // others, and the rest go on.
    t1.kill9();
    n1.process.kill9();
    let n3_id = n3.peer_id();
    let adopted =
        |node: &NodeProcess| node.count(|e| e["event"] == "link_up" && e["peer"] == n3_id.as_str());
    let deadline = std::time::Instant::now() + PATIENCE;
    while adopted(&t2) + adopted(&t3) == 0 {
        assert!(std::time::Instant::now() < deadline, "n3 was not adopted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Its new home's view reaches the other teia node before anyone speaks.
    let (home, other) = if adopted(&t2) > 0 {
        ("t2@UnB", &t3)
    } else {
        ("t3@UnB", &t2)
    };
    other
        .process
        .wait_for_log(&format!("{home} is home to {}", n3.addr()));
    every_line_once_everywhere(
        &mut [
            Member::Node(&mut n2),
            Member::Node(&mut n3),
            Member::Teia(&mut t2),
            Member::Teia(&mut t3),
        ],
        "second",
    );
    assert_eq!(adopted(&t2) + adopted(&t3), 1, "n3 has one home");
}

#[test]
fn node_peers_live_in_their_namespace_and_take_private_messages() {
    // Namespaces of their own: other tests' nodes may share the local rendezvous.
    let mut t1 = NodeProcess::start("t1", "sala3", &["--pex-namespace", "lab3"]);
    let mut t2 = NodeProcess::start("t2", "lab3", &["--peer", &t1.addr()]);
    t2.wait_link("t1@sala3");
    let mut n1 = NodePeer::start(&[t1.addr()]);
    let n1_id = format!("127.0.0.1:{}@lab3", n1.port);
    t1.wait_link(&n1_id);

    // Its lines go to #lab3: t2, in lab3, shows them; t1, in sala3, only passes them on.
    n1.type_line("para o lab");
    let shown = t2.wait_event("n1's line", |e| is_message(e, "para o lab"));
    assert_eq!(shown["src"], n1_id.as_str());
    assert_eq!(shown["dst"], "#lab3");

    // What is sent to #lab3 and to everyone reaches it; #sala3 does not.
    t1.command("/msg #sala3 só sala3");
    t2.command("/msg #lab3 para lab");
    t2.command("/msg * para todos");
    n1.wait_count("[t2@lab3] para lab", 1);
    n1.wait_count("[t2@lab3] para todos", 1);

    // A private message is shown and acknowledged.
    let msg_id = t2.msg(&format!("@{n1_id}"), "só pra você");
    n1.wait_count("[t2@lab3 → you] só pra você", 1);
    t2.wait_ack(&msg_id);
    assert_eq!(n1.count("só sala3"), 0);
    assert_eq!(t1.count(|e| is_message(e, "para o lab")), 0);
}
