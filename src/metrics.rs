//! Prometheus metrics: one process-wide registry, counted where things
//! happen, served in the text format on the `[metrics] listen` address.
//!
//! Labels name workloads, secret paths, backends and gRPC methods — never
//! a value. Their number is bounded by the policy an admin wrote.
#![forbid(unsafe_code)]

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
pub use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    pub workload: String,
    pub secret: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenyLabels {
    pub workload: String,
    pub secret: String,
    /// The gRPC method refused, or `open` for a file.
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: crate::audit::EventKind,
}

impl prometheus_client::encoding::EncodeLabelValue for crate::audit::EventKind {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Every metric keyhole exports.
pub struct Metrics {
    registry: Registry,
    pub reads: Family<SecretLabels, Counter>,
    pub denials: Family<DenyLabels, Counter>,
    pub stale_serves: Family<SecretLabels, Counter>,
    pub open_seconds: Histogram,
    pub rotations: Counter,
    pub propagation_seconds: Histogram,
    pub backend_requests: Family<BackendLabels, Counter>,
    pub backend_errors: Family<BackendLabels, Counter>,
    pub backend_seconds: Family<BackendLabels, Histogram>,
    pub backend_last_ok_age: Family<BackendLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub backend_cached: Family<BackendLabels, Gauge>,
    pub mounts: Gauge,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    pub audit_lines: Family<EventLabels, Counter>,
    pub alert_runs: Family<ResultLabels, Counter>,
    pub alerts_suppressed: Counter,
    /// Live per-container leases (dynamic credentials and certificates).
    pub leases: Gauge,
    pub lease_revocations: Family<ResultLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~2.6 s
    Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
}

fn request_histogram() -> Histogram {
    // 100 µs .. ~26 s
    Histogram::new(exponential_buckets(0.000_1, 4.0, 10))
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            reads: Family::default(),
            denials: Family::default(),
            stale_serves: Family::default(),
            open_seconds: latency_histogram(),
            rotations: Counter::default(),
            propagation_seconds: latency_histogram(),
            backend_requests: Family::default(),
            backend_errors: Family::default(),
            backend_seconds: Family::new_with_constructor(request_histogram),
            backend_last_ok_age: Family::default(),
            backend_cached: Family::default(),
            mounts: Gauge::default(),
            grpc_requests: Family::default(),
            audit_lines: Family::default(),
            alert_runs: Family::default(),
            alerts_suppressed: Counter::default(),
            leases: Gauge::default(),
            lease_revocations: Family::default(),
            registry: Registry::with_prefix("keyhole"),
        };
        let r = &mut m.registry;
        r.register("reads", "Files opened through a mount, allowed", m.reads.clone());
        r.register("denials", "Opens and admin calls refused", m.denials.clone());
        r.register("stale_serves", "Opens served a cached value while its backend fails", m.stale_serves.clone());
        r.register_with_unit(
            "open_duration",
            "Time to check and open a file in a mount",
            Unit::Seconds,
            m.open_seconds.clone(),
        );
        r.register("rotations", "Secret values changed (put, rotate, or changed at a backend)", m.rotations.clone());
        r.register_with_unit(
            "propagation_duration",
            "Time from a change to every live mount showing it",
            Unit::Seconds,
            m.propagation_seconds.clone(),
        );
        r.register("backend_requests", "Requests made to a backend", m.backend_requests.clone());
        r.register("backend_errors", "Backend requests that failed (not counting not-found)", m.backend_errors.clone());
        r.register_with_unit(
            "backend_request_duration",
            "Backend request latency",
            Unit::Seconds,
            m.backend_seconds.clone(),
        );
        r.register_with_unit(
            "backend_last_ok_age",
            "Time since a backend last answered (the age of its cached values)",
            Unit::Seconds,
            m.backend_last_ok_age.clone(),
        );
        r.register("backend_cached_secrets", "Values cached from a backend", m.backend_cached.clone());
        r.register("mounts", "Live FUSE mounts", m.mounts.clone());
        r.register("grpc_requests", "gRPC calls by method and status code", m.grpc_requests.clone());
        r.register("audit_lines", "Audit lines written, by event", m.audit_lines.clone());
        r.register("alert_hook_runs", "Runs of the [alerts] on_deny hook, by result", m.alert_runs.clone());
        r.register("alerts_suppressed", "Denials not sent to the alert hook (rate limit)", m.alerts_suppressed.clone());
        r.register("leases", "Live per-container leases (dynamic credentials, certificates)", m.leases.clone());
        r.register("lease_revocations", "Lease revocations tried, by result (ok, failed)", m.lease_revocations.clone());
        m
    }

    /// The text exposition (OpenMetrics), as of now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Invariant: writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode metrics");
        out
    }
}

/// The process's metrics. Counting is a few atomic adds, whether or not
/// anything scrapes them.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The read counter of one workload's secret, to keep and add to.
pub fn reads_of(workload: &str, secret: &str) -> Counter {
    METRICS.reads.get_or_create(&secret_labels(workload, secret)).clone()
}

pub fn secret_labels(workload: &str, secret: &str) -> SecretLabels {
    SecretLabels { workload: workload.to_owned(), secret: secret.to_owned() }
}

pub fn backend_labels(backend: &str) -> BackendLabels {
    BackendLabels { backend: backend.to_owned() }
}

/// A backend request that took from `started` until now.
pub fn backend_request(backend: &str, started: Instant, failed: bool) {
    let l = backend_labels(backend);
    METRICS.backend_requests.get_or_create(&l).inc();
    METRICS.backend_seconds.get_or_create(&l).observe(started.elapsed().as_secs_f64());
    if failed {
        METRICS.backend_errors.get_or_create(&l).inc();
    }
}

/// Count an audit line; denials and stale serves are counted from here,
/// so every path that audits one (FUSE or gRPC) is counted alike.
pub fn audited(e: &crate::audit::Event<'_>) {
    METRICS.audit_lines.get_or_create(&EventLabels { event: e.event }).inc();
    counted(e);
}

/// Count an event in the metrics that stand for it (denials, stale
/// serves, rotations): one written in full ([`audited`]), or one the audit
/// log held back to sum up later ([`crate::audit::AuditLog::read`],
/// [`crate::audit::AuditLog::deny`]).
pub fn counted(e: &crate::audit::Event<'_>) {
    use crate::audit::EventKind;
    let (workload, secret) = (e.workload.unwrap_or_default(), e.path.unwrap_or_default());
    match e.event {
        EventKind::Deny => denied(e),
        EventKind::StaleServe => {
            METRICS.stale_serves.get_or_create(&secret_labels(workload, secret)).inc();
        }
        EventKind::Put | EventKind::Rotate if e.reason.is_none() => {
            METRICS.rotations.inc();
        }
        _ => {}
    }
}

/// Count one denial: written in full (from [`audited`]) or summed up in
/// a `deny_summary` line later (from [`crate::audit::AuditLog::deny`]).
pub fn denied(e: &crate::audit::Event<'_>) {
    let (workload, secret) = (e.workload.unwrap_or_default(), e.path.unwrap_or_default());
    let method = e.method.unwrap_or("open").to_owned();
    let l = DenyLabels { workload: workload.to_owned(), secret: secret.to_owned(), method };
    METRICS.denials.get_or_create(&l).inc();
}

/// Time since `t`, in seconds (0 if the clock went back).
pub fn age(t: std::time::SystemTime) -> f64 {
    t.elapsed().unwrap_or(Duration::ZERO).as_secs_f64()
}

/// Bring the gauges up to date from the broker, then render.
fn scrape(broker: &crate::broker::Broker) -> String {
    METRICS.mounts.set(broker.mount_count() as i64);
    for v in broker.backends() {
        let l = backend_labels(&v.cfg.name);
        let (_, last_ok, _) = v.health.snapshot();
        METRICS.backend_last_ok_age.get_or_create(&l).set(last_ok.map_or(f64::INFINITY, age));
        METRICS.backend_cached.get_or_create(&l).set(v.cached_count() as i64);
    }
    METRICS.render()
}

/// A bound metrics listener.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Serve `GET /metrics` until the broker stops.
pub async fn serve(broker: std::sync::Arc<crate::broker::Broker>, listener: crate::api::listen::MetricsListener) {
    use axum::routing::get;
    let b = broker.clone();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let b = b.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || scrape(&b)).await.unwrap_or_default();
                ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            }
        }),
    );
    let mut stopping = broker.stopping();
    let shutdown = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    // Connections held to the broker's budget and deadlines (see
    // crate::api::listen).
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    if let Err(e) = served {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}

/// One lease revocation tried, with its result (`ok`, `failed`).
pub fn lease_revoked(result: &str) {
    METRICS.lease_revocations.get_or_create(&ResultLabels { result: result.to_owned() }).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.reads.get_or_create(&secret_labels("web", "db/pw")).inc();
        m.open_seconds.observe(0.001);
        let text = m.render();
        assert!(text.contains("keyhole_reads_total{workload=\"web\",secret=\"db/pw\"} 1"), "{text}");
        assert!(text.contains("keyhole_open_duration_seconds_bucket"), "{text}");
        assert!(text.contains("# TYPE keyhole_reads counter"), "{text}");
        assert!(text.contains("keyhole_rotations_total 0"), "plain counters show from the start: {text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn audit_lines_are_labelled_by_the_events_wire_name() {
        let m = Metrics::new();
        m.audit_lines.get_or_create(&EventLabels { event: crate::audit::EventKind::StaleExpired }).inc();
        let text = m.render();
        assert!(text.contains("keyhole_audit_lines_total{event=\"stale_expired\"} 1"), "{text}");
    }
}
