//! A node's and its chat's events as JSON objects and as lines of text.

use serde_json::{json, Value};
use teia_core::overlay::{Cast, Direction, Event};
use teia_node::chat::ChatEvent;
use teia_node::node::NodeEvent;
use teia_node::rendezvous::RegistrarEvent;
use teia_node::router::SendOutcome;

use crate::present::{clean, fmt_rtt, short};

/// An event as a JSON object and as a line of text. Everything a peer chose (ids, payloads,
/// reasons) goes through [`clean`] in the text, so a peer never controls the terminal; the
/// JSON keeps it exact.
pub(super) fn describe(event: &NodeEvent) -> (Value, String) {
    match event {
        NodeEvent::Ready {
            peer_id,
            listen,
            key,
        } => (
            json!({"event":"ready","peer_id":peer_id,"listen":listen.map(|a| a.to_string()),
                   "key":key.map(|k| k.to_string())}),
            match listen {
                Some(addr) => {
                    format!("teia node {peer_id}, accepting links on {addr}; /help lists commands")
                }
                None => format!("teia node {peer_id}, not accepting links; /help lists commands"),
            },
        ),
        NodeEvent::Stopped => (json!({"event":"stopped"}), "… stopped".into()),
        NodeEvent::Rendezvous(RegistrarEvent::Registered(r)) => (
            json!({"event":"registered","ttl":r.ttl,"observed_ip":r.observed_ip}),
            format!("… registered at the rendezvous for {} s", r.ttl),
        ),
        NodeEvent::Rendezvous(RegistrarEvent::Failed { error, retry_in }) => (
            json!({"event":"rendezvous_error","error":error,"retry_in_ms":retry_in.as_millis() as u64}),
            format!(
                "! rendezvous: {} (retrying in {} s)",
                clean(error),
                retry_in.as_secs()
            ),
        ),
        NodeEvent::DiscoverFailed(error) => (
            json!({"event":"rendezvous_error","error":error}),
            format!("! rendezvous: {}", clean(error)),
        ),
        NodeEvent::Overlay(event) => describe_overlay(event),
    }
}

/// An event as `--json` shows it; none for the queries and hits of services (the session
/// does not show them).
pub(super) fn event_json(event: &NodeEvent) -> Option<Value> {
    match event {
        NodeEvent::Overlay(Event::Query { .. } | Event::QueryHit { .. }) => None,
        event => Some(describe(event).0),
    }
}

/// A chat event as a JSON object and as a line of text.
pub(super) fn describe_chat(event: &ChatEvent) -> (Value, String) {
    match event {
        ChatEvent::Message(message) => describe_message(
            &message.msg_id,
            &message.src,
            &message.dst,
            message.cast,
            &message.payload,
        ),
        ChatEvent::Outcome(SendOutcome::Acked {
            msg_id,
            from,
            elapsed,
        }) => describe_acked(msg_id, from, *elapsed),
        ChatEvent::Outcome(SendOutcome::Undelivered {
            msg_id,
            dst,
            reason,
        }) => describe_undelivered(msg_id, dst, reason),
        ChatEvent::Sent {
            msg_id,
            dst,
            payload,
        } => (
            json!({"event":"sent","msg_id":msg_id,"dst":dst,"payload":payload}),
            format!("… sent to {} ({})", clean(dst), short(msg_id)),
        ),
    }
}

fn describe_message(
    msg_id: &str,
    src: &str,
    dst: &str,
    cast: Cast,
    payload: &Value,
) -> (Value, String) {
    let cast_name = match cast {
        Cast::Unicast => "unicast",
        Cast::Namespace => "namespace",
        Cast::Broadcast => "broadcast",
    };
    let text = match payload {
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    };
    let shown = match cast {
        Cast::Unicast => format!("[{}] {text}", clean(src)),
        _ => format!("[{} → {}] {text}", clean(src), clean(dst)),
    };
    (
        json!({"event":"message","msg_id":msg_id,"src":src,"dst":dst,"cast":cast_name,"payload":payload}),
        shown,
    )
}

fn describe_acked(msg_id: &str, from: &str, elapsed: std::time::Duration) -> (Value, String) {
    (
        json!({"event":"ack","msg_id":msg_id,"from":from,"rtt_ms":elapsed.as_secs_f64() * 1000.0}),
        format!(
            "✓ {} delivered to {} in {} ms",
            short(msg_id),
            clean(from),
            elapsed.as_millis()
        ),
    )
}

fn describe_undelivered(msg_id: &str, dst: &str, reason: &str) -> (Value, String) {
    (
        json!({"event":"undelivered","msg_id":msg_id,"dst":dst,"reason":reason}),
        format!(
            "! {} not delivered to {}: {}",
            short(msg_id),
            clean(dst),
            clean(reason)
        ),
    )
}

fn describe_overlay(event: &Event) -> (Value, String) {
    match event {
        Event::Query {
            query_id, src, service, ..
        } => (
            json!({"event":"query","query_id":query_id,"src":src,"service":service}),
            format!("* query from {}", clean(src)),
        ),
        Event::QueryHit { query_id, src, .. } => (
            json!({"event":"query_hit","query_id":query_id,"src":src}),
            format!("* answer from {}", clean(src)),
        ),
        // The node's runtime answers these itself; described should one get here.
        Event::SpliceAsked { peer, with, .. } => (
            json!({"event":"splice_asked","peer":peer,"with":with}),
            format!("* {} asks to be spliced with {}", clean(peer), clean(with)),
        ),
        Event::SpliceGranted { relay, with, .. } => (
            json!({"event":"splice_granted","relay":relay,"with":with}),
            format!("* {} splices us with {}", clean(relay), clean(with)),
        ),
        Event::SpliceRefused {
            relay,
            with,
            reason,
            ..
        } => (
            json!({"event":"splice_refused","relay":relay,"with":with,"reason":reason.code()}),
            format!(
                "* {} will not splice us with {}: {}",
                clean(relay),
                clean(with),
                clean(&reason.to_string())
            ),
        ),
        Event::LinkUp {
            peer,
            addr,
            inbound,
            features,
        } => (
            json!({"event":"link_up","peer":peer,"addr":addr.to_string(),"inbound":inbound,"features":features}),
            format!("* {} connected ({addr})", clean(peer)),
        ),
        Event::LinkDown { peer, reason } => (
            json!({"event":"link_down","peer":peer,"reason":reason}),
            format!("* {} disconnected ({})", clean(peer), clean(reason)),
        ),
        Event::Message {
            msg_id,
            src,
            dst,
            cast,
            payload,
            ..
        } => describe_message(msg_id, src, dst, *cast, payload),
        Event::Acked {
            msg_id,
            from,
            elapsed,
        } => describe_acked(msg_id, from, *elapsed),
        Event::Undelivered {
            msg_id,
            dst,
            reason,
        } => describe_undelivered(msg_id, dst, reason),
        Event::Relayed {
            msg_id,
            via,
            ok,
            reason,
        } => (
            json!({"event":"relay","msg_id":msg_id,"via":via,"ok":ok,"reason":reason}),
            format!(
                "… {} {} by {}",
                short(msg_id),
                if *ok { "relayed" } else { "not relayed" },
                clean(via)
            ),
        ),
        Event::RemoteError {
            code,
            reference,
            detail,
            from,
        } => (
            json!({"event":"error","code":code,"ref":reference,"detail":detail,"from":from}),
            format!(
                "! error from {}: {}{}",
                clean(from),
                clean(code),
                detail
                    .as_deref()
                    .map(|d| format!(" ({})", clean(d)))
                    .unwrap_or_default()
            ),
        ),
        Event::Metrics {
            peer,
            rtt_ms,
            sent,
            received,
        } => (
            json!({"event":"metrics","peer":peer,"rtt_ms":rtt_ms,"sent":sent,"received":received}),
            format!(
                "… {}: rtt {} sent {sent} received {received}",
                clean(peer),
                fmt_rtt(rtt_ms.map(|r| r as f64))
            ),
        ),
        Event::KeyMismatch {
            peer,
            pinned,
            offered,
            addr,
        } => (
            json!({"event":"key_mismatch","peer":peer,"pinned":pinned.to_string(),
                   "offered":offered.to_string(),"addr":addr.map(|a| a.to_string())}),
            format!(
                "! refused {}: it offered key {offered}, but {pinned} is pinned for it (/trust to change)",
                clean(peer)
            ),
        ),
        Event::Refused {
            peer,
            addr,
            refusal,
            detail,
        } => (
            json!({"event":"refused","peer":peer,"addr":addr.to_string(),
                   "reason":format!("{refusal}: {detail}"),"code":refusal.code()}),
            format!(
                "! refused {} ({addr}): {refusal}: {}",
                clean(peer.as_deref().unwrap_or("a connection")),
                clean(detail)
            ),
        ),
        Event::DialGaveUp {
            addr,
            attempts,
            reason,
            asked,
        } => (
            json!({"event":"dial_gave_up","addr":addr.to_string(),"attempts":attempts,
                   "reason":reason,"asked":asked}),
            format!(
                "! gave up dialing {addr} after {attempts} attempts: {}",
                clean(reason)
            ),
        ),
        Event::Forged {
            from,
            src,
            msg_id,
            reason,
        } => (
            json!({"event":"forged","from":from,"src":src,"msg_id":msg_id,
                   "reason":reason.to_string()}),
            format!(
                "! dropped a message from {} claiming to come from {}: {}",
                clean(from),
                clean(src),
                clean(&reason.to_string())
            ),
        ),
        Event::DialFailed {
            addr,
            error,
            retry_in,
            asked,
        } => (
            json!({"event":"dial_failed","addr":addr.to_string(),"error":error,
                   "retry_in_ms":retry_in.map(|r| r.as_millis() as u64),"asked":asked}),
            format!("! cannot reach {addr}: {}", clean(error)),
        ),
        Event::Traffic {
            direction,
            peer,
            kind,
            msg_id,
            src,
            dst,
        } => {
            let dir = match direction {
                Direction::In => "in",
                Direction::Out => "out",
            };
            (
                json!({"event":"traffic","dir":dir,"peer":peer,"type":kind,"msg_id":msg_id,"src":src,"dst":dst}),
                format!(
                    "{} {:<12} {} {}→{}",
                    if dir == "in" { "«" } else { "»" },
                    clean(kind),
                    clean(peer),
                    clean(src.as_deref().unwrap_or("-")),
                    clean(dst.as_deref().unwrap_or("-"))
                ),
            )
        }
    }
}
