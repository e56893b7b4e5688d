//! LAN discovery on real processes: nodes with no rendezvous they can reach and no
//! `--peer` find each other by UDP broadcast, kept on this machine (127.255.255.255).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;

/// A node with LAN discovery on `port`, broadcasting on loopback, and a rendezvous that
/// cannot be reached (so that only the LAN can bring it a peer).
fn lan_node(name: &str, namespace: &str, port: &str) -> NodeProcess {
    NodeProcess::start_with(
        std::process::Command::new(env!("CARGO_BIN_EXE_teia")),
        tempfile::tempdir().unwrap(),
        name,
        namespace,
        &[
            "--rendezvous",
            "127.0.0.1:1",
            "--lan-port",
            port,
            "--lan-broadcast",
            "127.255.255.255",
        ],
    )
}

#[test]
fn nodes_with_no_rendezvous_and_no_peer_find_each_other_on_the_lan() {
    let port = free_udp_port().to_string();
    let mut alice = lan_node("alice", "lab", &port);
    // Bob starts later: he hears alice's answer to his query (her first announcement went
    // out before he listened).
    let bob = lan_node("bob", "lab", &port);
    alice.wait_link("bob@lab");
    bob.wait_link("alice@lab");
    let hello = alice.msg("@bob@lab", "found you");
    assert_eq!(bob.wait_message(&hello)["src"], "alice@lab");
    // A third, started last, joins them both.
    let carol = lan_node("carol", "lab", &port);
    carol.wait_link("alice@lab");
    carol.wait_link("bob@lab");
}
