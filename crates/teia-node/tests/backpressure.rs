//! Back-pressure, assembled in-process over real TCP on loopback: a publisher much faster
//! than its path (a relay, then a receiving application that reads its events slowly) loses
//! no PUB: the receiver's full queues hold the relay's reading back, the relay's full queue
//! holds the publisher's, and the publisher's `send` waits, hop by hop, instead of anything
//! being dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use teia_core::overlay::{Config as OverlayConfig, Event};
use teia_node::node::{start, NodeConfig, NodeEvent, NodeHandle};
use tokio::sync::mpsc;

/// Longest wait for one event; the machine may be busy.
const WAIT: Duration = Duration::from_secs(60);
/// PUBs published: with their size, far more than the receiver's event queue, the
/// queues and the sockets of the path hold together.
const PUBS: usize = 12_000;
/// Bytes of each PUB's payload.
const PAYLOAD: usize = 8 * 1024;

struct TestNode {
    handle: NodeHandle,
    listen: SocketAddr,
    events: mpsc::Receiver<NodeEvent>,
}

async fn node(name: &str, peers: Vec<SocketAddr>) -> TestNode {
    let mut overlay = OverlayConfig::new(format!("{name}@test"));
    overlay.identity = Some(teia_node::identity::ephemeral().unwrap());
    overlay.target_neighbours = 0;
    let started = start(NodeConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        peers,
        ..NodeConfig::new(overlay)
    })
    .await
    .unwrap();
    TestNode {
        listen: started.handle.listen_addr().unwrap(),
        handle: started.handle,
        events: started.events,
    }
}

/// Waits until `node` has a link up (its event says so).
async fn linked(node: &mut TestNode) {
    tokio::time::timeout(WAIT, async {
        loop {
            match node.events.recv().await.expect("node stopped") {
                NodeEvent::Overlay(Event::LinkUp { .. }) => return,
                _ => continue,
            }
        }
    })
    .await
    .expect("no link in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_faster_than_its_path_is_slowed_down_and_loses_nothing() {
    let mut sink = node("sink", Vec::new()).await;
    let mut relay = node("relay", vec![sink.listen]).await;
    linked(&mut sink).await;
    linked(&mut relay).await;
    let source = node("source", vec![relay.listen]).await;
    linked(&mut relay).await;
    let mut source_events = source.events;
    tokio::spawn(async move { while source_events.recv().await.is_some() {} });
    // The relay's own deliveries are not looked at.
    let mut relay_events = relay.events;
    tokio::spawn(async move { while relay_events.recv().await.is_some() {} });

    let publisher = source.handle.clone();
    let published = tokio::spawn(async move {
        let payload = "x".repeat(PAYLOAD);
        let mut ids = Vec::with_capacity(PUBS);
        for _ in 0..PUBS {
            ids.push(publisher.send("*", json!(payload)).await.unwrap());
        }
        ids
    });

    // The receiving application is slow: it pauses now and then while the publisher runs.
    let mut seen = HashSet::new();
    let arrived = tokio::time::timeout(WAIT * 2, async {
        while seen.len() < PUBS {
            match sink.events.recv().await.expect("sink stopped") {
                NodeEvent::Overlay(Event::Message { msg_id, src, .. }) if src == "source@test" => {
                    seen.insert(msg_id);
                    if seen.len() % 64 == 0 && !published.is_finished() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                _ => continue,
            }
        }
    })
    .await;
    if arrived.is_err() {
        let mut counters = Vec::new();
        for node in [&source.handle, &relay.handle, &sink.handle] {
            counters.push(node.snapshot().await.unwrap().counters);
        }
        panic!(
            "{} of {PUBS} PUBs arrived; counters: {counters:?}",
            seen.len()
        );
    }
    let ids = published.await.unwrap();
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>());
    let counters = source.handle.snapshot().await.unwrap().counters;
    assert_eq!(counters.dropped, 0, "the publisher dropped lines");
    let counters = relay.handle.snapshot().await.unwrap().counters;
    assert_eq!(counters.dropped, 0, "the relay dropped lines");
}
