//! The interactive chat shell, driven through a pseudo-terminal (`script` from util-linux)
//! as a person at a terminal would use it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::Write;
use std::process::Command;

use common::*;

#[test]
fn shell_chats_with_a_peer_and_quits() {
    let mut bob = NodeProcess::start("bob", "UnB", &[]);
    let data = tempfile::tempdir().unwrap();
    let teia = env!("CARGO_BIN_EXE_teia");
    let node = format!(
        "{teia} node --name alice --namespace UnB --listen-ip 127.0.0.1 --peer {} --data-dir {}",
        bob.addr(),
        data.path().display()
    );
    let mut script = Command::new("script");
    script
        .args(["-qfec", &node, "/dev/null"])
        .env("TEIA_NO_LAN", "1")
        .env_remove("RUST_LOG");
    let (alice, mut keys) = Process::spawn_capturing(script);
    let mut type_line = |line: &str| {
        keys.write_all(format!("{line}\r").as_bytes()).unwrap();
        keys.flush().unwrap();
    };
    let logs = alice.wait_for_log("teia: logs go to");
    assert!(logs.trim_end().ends_with("alice@UnB.log"), "{logs}");
    alice.wait_for_log("teia node alice@UnB");
    bob.wait_link("alice@UnB");

    type_line("/msg @bob@UnB oi do shell");
    bob.wait_event("the shell's message", |e| {
        e["event"] == "message" && e["payload"] == "oi do shell"
    });
    alice.wait_for_log("delivered to bob@UnB");

    bob.msg("@alice@UnB", "resposta");
    alice.wait_for_log("[bob@UnB] resposta");

    let from = alice.log_len();
    type_line("/routes");
    alice.wait_for_log_after("neighbours:", from);
    type_line("/frobnicate");
    alice.wait_for_log("unknown command /frobnicate");

    type_line("/quit");
    bob.wait_event("alice says bye", |e| {
        e["event"] == "link_down" && e["peer"] == "alice@UnB"
    });
    let screen = alice.lines().join("\n");
    let status = alice.wait_exit();
    assert!(status.success(), "{status}");
    assert!(
        !screen.contains(" INFO ") && !screen.contains(" WARN "),
        "log lines in the chat:\n{screen}"
    );
    let log = std::fs::read_to_string(data.path().join("nodes/alice@UnB.log")).unwrap();
    assert!(log.contains("link up"), "the log went to its file:\n{log}");
}
