//! `teia rdv`: one request to a rendezvous server, its answer printed.

use std::io::Write;

use anyhow::Context;
use teia_node::rendezvous::RendezvousClient;
use teia_wire::rendezvous::{parse_answer, parse_discover_answer, parse_register_answer, Request};

use super::seconds;
use crate::cli::{RdvCommand, RdvTarget};

/// Sends the request, prints the answer, and fails when the server answered an error.
pub async fn run(command: RdvCommand) -> anyhow::Result<()> {
    let (target, request) = match command {
        RdvCommand::Register {
            target,
            namespace,
            name,
            port,
            ttl,
        } => (
            target,
            Request::Register {
                namespace,
                name,
                port,
                ttl,
            },
        ),
        RdvCommand::Discover { target, namespace } => (target, Request::Discover { namespace }),
        RdvCommand::Unregister {
            target,
            namespace,
            name,
            port,
        } => (
            target,
            Request::Unregister {
                namespace,
                name,
                port,
            },
        ),
    };
    let RdvTarget {
        server,
        json,
        timeout,
    } = target;
    let timeout = seconds(timeout, "--timeout")?;
    let client = RendezvousClient::new(server).with_timeouts(timeout, timeout);
    let answer = client.request(&request).await?;
    let mut out = std::io::stdout().lock();
    if json {
        out.write_all(&answer)?;
        out.write_all(b"\n")?;
        parse_answer(&answer).context("the server refused the request")?;
        return Ok(());
    }
    match &request {
        Request::Register {
            namespace,
            name,
            port,
            ttl,
        } => {
            let registration = parse_register_answer(&answer, *ttl)
                .context("the server refused the registration")?;
            let seen = match (&registration.observed_ip, registration.observed_port) {
                (Some(ip), Some(p)) => format!(" (seen from {ip}:{p})"),
                (Some(ip), None) => format!(" (seen from {ip})"),
                _ => String::new(),
            };
            writeln!(
                out,
                "registered {name}@{namespace} on port {port} for {} s{seen}",
                registration.ttl
            )?;
        }
        Request::Discover { .. } => {
            let peers =
                parse_discover_answer(&answer).context("the server refused the discovery")?;
            writeln!(out, "{:<40} {:<22} {:>10}", "PEER", "ADDRESS", "EXPIRES IN")?;
            for peer in &peers {
                writeln!(
                    out,
                    "{:<40} {:<22} {:>9}s",
                    peer.peer_id(),
                    format!("{}:{}", peer.ip, peer.port),
                    peer.expires_in
                )?;
            }
            let total = parse_answer(&answer)
                .ok()
                .and_then(|a| a.get("total").and_then(serde_json::Value::as_u64));
            match total {
                Some(total) => writeln!(
                    out,
                    "{} of {total} peers (answer cut to one line)",
                    peers.len()
                )?,
                None => writeln!(out, "{} peers", peers.len())?,
            }
        }
        Request::Unregister { namespace, .. } => {
            let answer = parse_answer(&answer).context("the server refused the removal")?;
            let removed = answer.get("removed").and_then(serde_json::Value::as_u64);
            match removed {
                Some(n) => writeln!(out, "removed {n} record(s) from {namespace}")?,
                None => writeln!(out, "unregistered from {namespace}")?,
            }
        }
    }
    Ok(())
}
