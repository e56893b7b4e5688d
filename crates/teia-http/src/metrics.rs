//! `GET /metrics`: the node in Prometheus' text format, behind the token's guard like every
//! route (a scraper sends `Authorization: Bearer TOKEN`). Each scrape reads the node's state
//! then (a snapshot of the overlay, the downloads, the engine's ledger): nothing is kept
//! between scrapes. Each bounded queue is shown beside its bound (`*_max`).

use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::App;

/// Labels of one series.
type Labels = Vec<(String, String)>;

/// A label's value as the text format needs it: `\`, `"` and line feeds escaped (the
/// encoder writes values as given, and a peer chooses its name).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let metric = Gauge::<i64>::default();
    metric.set(value);
    registry.register(name, help, metric);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric = Counter::<u64>::default();
    metric.inc_by(value);
    registry.register(name, help, metric);
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Everything the node counts, now.
pub(crate) async fn metrics(State(app): State<App>) -> Response {
    let mut registry = Registry::with_prefix("teia");
    if let Some(services) = &app.node {
        if let Ok(snapshot) = services.node.snapshot().await {
            let links = Family::<Labels, Gauge>::default();
            let rtt = Family::<Labels, Gauge<f64, AtomicU64>>::default();
            let lines = Family::<Labels, Counter>::default();
            for n in &snapshot.neighbours {
                let kind = if n.teia { "teia" } else { "course" };
                links
                    .get_or_create(&vec![
                        ("kind".into(), kind.into()),
                        ("encrypted".into(), n.encrypted.to_string()),
                    ])
                    .inc();
                let peer = ("peer".to_owned(), label(&n.peer));
                if let Some(r) = n.rtt {
                    rtt.get_or_create(&vec![peer.clone()]).set(r.as_secs_f64());
                }
                lines
                    .get_or_create(&vec![peer.clone(), ("direction".into(), "out".into())])
                    .inc_by(n.sent);
                lines
                    .get_or_create(&vec![peer, ("direction".into(), "in".into())])
                    .inc_by(n.received);
            }
            registry.register(
                "links",
                "Links to neighbours, by kind and encryption",
                links,
            );
            registry.register(
                "link_rtt_seconds",
                "Last measured round-trip time of each link",
                rtt,
            );
            registry.register("link_lines", "Lines written and read on each link", lines);
            let queues = Family::<Labels, Gauge>::default();
            for (peer, bytes) in &snapshot.queue_bytes_by_peer {
                queues
                    .get_or_create(&vec![("peer".to_owned(), label(peer))])
                    .set(count(*bytes));
            }
            registry.register(
                "link_queue_bytes",
                "Bytes in each link's write queue (bounded by teia_link_queue_bytes_max)",
                queues,
            );
            for (name, help, value) in [
                (
                    "link_queues_bytes",
                    "Bytes in all links' write queues",
                    snapshot.queued_bytes,
                ),
                (
                    "link_queues_bytes_max",
                    "Bytes all links' write queues may hold",
                    teia_node::node::TOTAL_QUEUE_BYTES,
                ),
                (
                    "link_queue_fullest_bytes",
                    "Bytes in the fullest link's write queue",
                    snapshot.fullest_queue_bytes,
                ),
                (
                    "link_queue_bytes_max",
                    "Bytes one link's write queue may hold",
                    teia_node::node::LINK_QUEUE_BYTES,
                ),
            ] {
                gauge(&mut registry, name, help, count(value));
            }
            gauge(
                &mut registry,
                "known_peers",
                "Peers known (rendezvous, peer lists, LAN), linked or not",
                count(snapshot.known.len()),
            );
            gauge(
                &mut registry,
                "routes",
                "Fresh cached routes",
                count(snapshot.routes.len()),
            );
            let c = snapshot.counters;
            for (name, help, value) in [
                ("lines_sent", "Lines written to neighbours", c.sent),
                ("lines_received", "Lines read from neighbours", c.received),
                (
                    "messages_forwarded",
                    "Messages forwarded for others",
                    c.forwarded,
                ),
                ("duplicates", "Duplicate messages dropped", c.duplicates),
                (
                    "protocol_errors",
                    "ERROR messages sent or received",
                    c.errors,
                ),
                (
                    "messages_delivered",
                    "Messages delivered to this node's services",
                    c.delivered,
                ),
                (
                    "lines_dropped",
                    "Lines dropped at a full write queue",
                    c.dropped,
                ),
                (
                    "forged",
                    "Messages refused: origin not authenticated",
                    c.forged,
                ),
            ] {
                counter(&mut registry, name, help, value);
            }
        }
        let downloads = services.files.downloads();
        gauge(
            &mut registry,
            "downloads",
            "Downloads running",
            count(downloads.len()),
        );
        gauge(
            &mut registry,
            "downloads_max",
            "Downloads that may run at once",
            count(teia_files::service::MAX_DOWNLOADS),
        );
        let rate = Gauge::<f64, AtomicU64>::default();
        rate.set(downloads.iter().map(|d| d.rate).sum());
        registry.register(
            "download_rate_bytes_per_second",
            "Bytes per second of all downloads, recently",
            rate,
        );
        gauge(
            &mut registry,
            "download_bytes_verified",
            "Bytes verified of the downloads running",
            downloads
                .iter()
                .map(|d| i64::try_from(d.bytes).unwrap_or(i64::MAX))
                .sum(),
        );
        if let Ok((folders, files)) = services.files.shared() {
            gauge(
                &mut registry,
                "shared_folders",
                "Folders shared",
                count(folders.len()),
            );
            gauge(
                &mut registry,
                "shared_files",
                "Files shared",
                count(files.len()),
            );
        }
        gauge(
            &mut registry,
            "approvals_pending",
            "Download requests waiting for the user",
            count(services.files.pending_approvals().len()),
        );
        let events = Family::<Labels, Counter>::default();
        for (kind, n) in services.live.counted() {
            events
                .get_or_create(&vec![("event".into(), label(&kind))])
                .inc_by(n);
        }
        let bytes = Family::<Labels, Counter>::default();
        let (jobs_in, jobs_out) = app.engine.transferred();
        let jobs = [(("jobs", "in"), jobs_in), (("jobs", "out"), jobs_out)];
        for ((service, direction), n) in services.live.bytes().into_iter().chain(jobs) {
            bytes
                .get_or_create(&vec![
                    ("service".into(), service.into()),
                    ("direction".into(), direction.into()),
                ])
                .inc_by(n);
        }
        registry.register(
            "service_bytes",
            "Bytes each service moved: files served (out) and fetched (in), chat payloads, \
             the job engine's projects, ledgers, script tasks and results",
            bytes,
        );
        registry.register(
            "events",
            "Events the node showed, by kind (link_up, dial_failed, message, download_done, ...)",
            events,
        );
        gauge(
            &mut registry,
            "event_streams",
            "Open /events streams",
            count(services.live.streams()),
        );
        gauge(
            &mut registry,
            "event_streams_buffer_max",
            "Events buffered for the slowest /events stream",
            count(crate::live::EVENTS_BUFFERED),
        );
        counter(
            &mut registry,
            "chat_history_dropped",
            "Chat entries shown but not kept on disk for the next start (the disk was behind)",
            services.live.history_dropped(),
        );
    }
    let totals = app.engine.totals();
    counter(
        &mut registry,
        "evaluations",
        "Evaluations submitted",
        totals.evaluations,
    );
    counter(
        &mut registry,
        "evaluation_projects",
        "Projects evaluated",
        totals.projects,
    );
    counter(
        &mut registry,
        "tests_passed",
        "Tests passed in evaluations",
        totals.passed,
    );
    counter(
        &mut registry,
        "tests_failed",
        "Tests failed or in error",
        totals.failed,
    );
    gauge(
        &mut registry,
        "evaluations_unfinished",
        "Evaluations not finished",
        i64::from(app.engine.unfinished()),
    );
    let modules = Family::<Labels, Gauge>::default();
    for (state, n) in app.engine.module_states() {
        modules
            .get_or_create(&vec![("state".into(), state.into())])
            .set(count(n));
    }
    registry.register(
        "modules",
        "Test modules of the evaluations kept, by state",
        modules,
    );
    counter(
        &mut registry,
        "sandbox_failures",
        "Tasks whose sandbox could not be made (they did not run)",
        app.engine.sandbox_failures(),
    );
    if let Some(master) = &app.master {
        gauge(
            &mut registry,
            "jobs_queued",
            "Script jobs queued",
            i64::from(master.waiting()),
        );
        gauge(
            &mut registry,
            "jobs_running",
            "Script jobs running",
            i64::from(master.running()),
        );
    }
    gauge(
        &mut registry,
        "http_connections_max",
        "HTTP connections served at once at most",
        count(crate::limits::MAX_CONNECTIONS),
    );
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
