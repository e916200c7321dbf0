//! The node's metrics, served as Prometheus text (format 0.0.4) at `GET /metrics`, built on the
//! `prometheus-client` crate.
//!
//! Two kinds:
//!
//! - **Events**, counted where they happen: jobs by module and outcome, job latency by phase,
//!   redirects, Redis commands, connections, module loads, snapshots and leader changes.
//!   Each is a `prometheus-client` counter or histogram: an atomic add, plus a read-locked map
//!   lookup for labelled ones.
//! - **State**, read when scraped: the bucket cache, jobs running and forwarded (counts the node
//!   keeps for its status too), the group committer's counts, and what the cluster knows of its
//!   flocks and peers. A part of the node that has such state adds a [`Source`]; a scrape calls
//!   each one, so state costs nothing between scrapes.
//!
//! Cardinality is bounded: no label names a bucket; modules are labelled by name for the first
//! [`MODULE_LABELS_MAX`] names this node has seen and as `other` after that; flocks (at most the
//! flock count) and peers (the members) label only scrape-time state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use grex_client::proto::LATENCY_BOUNDS_S;

use crate::error::ErrorCode;

/// Module names labelled as themselves; later ones are `other`.
pub const MODULE_LABELS_MAX: usize = 64;
/// The label of modules past [`MODULE_LABELS_MAX`].
const OTHER: &str = "other";
/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A phase of a job, timed separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting in its executor's queue.
    Queue,
    /// Running in the sandbox (or as a built-in operation), with its bucket's load.
    Run,
    /// Waiting for its change set to commit (replicated and durable), or its read to be confirmed.
    Commit,
    /// From arrival at this node's executor path to its answer.
    Total,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Queue => "queue",
            Phase::Run => "run",
            Phase::Commit => "commit",
            Phase::Total => "total",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobLabels {
    module: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    module: Arc<str>,
    phase: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CommandLabels {
    command: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

/// A client protocol, for connection counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (and HTTPS).
    Http,
    /// QUIC clients.
    Quic,
    /// The Redis protocol.
    Resp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Quic => "quic",
            Protocol::Resp => "resp",
        }
    }
}

/// One value read at scrape time.
#[derive(Clone, Debug)]
pub struct Sample {
    name: &'static str,
    help: &'static str,
    counter: bool,
    labels: Vec<(&'static str, String)>,
    value: f64,
}

/// What a [`Source`] adds to a scrape. Names are given without the `grex_` prefix every metric
/// gets.
#[derive(Default, Debug)]
pub struct Samples(Vec<Sample>);

impl Samples {
    /// A gauge: a value that goes up and down.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: &[(&'static str, String)], value: f64) {
        self.0.push(Sample { name, help, counter: false, labels: labels.to_vec(), value });
    }

    /// A counter kept elsewhere (a total since start); its name gets `_total`.
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: &[(&'static str, String)], value: f64) {
        self.0.push(Sample { name, help, counter: true, labels: labels.to_vec(), value });
    }
}

/// A part of the node whose state is read at each scrape.
pub type Source = Box<dyn Fn(&mut Samples) + Send + Sync>;

/// The sources, as one collector of the registry.
#[derive(Clone, Default)]
struct Sources(Arc<Mutex<Vec<Source>>>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut samples = Samples::default();
        for source in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            source(&mut samples);
        }
        // One descriptor per name, its samples together (in the order first seen).
        let mut order: Vec<&'static str> = Vec::new();
        let mut by_name: HashMap<&'static str, Vec<&Sample>> = HashMap::new();
        for sample in &samples.0 {
            by_name.entry(sample.name).or_insert_with(|| {
                order.push(sample.name);
                Vec::new()
            });
            by_name.get_mut(sample.name).expect("inserted").push(sample);
        }
        for name in order {
            let group = &by_name[name];
            let first = group[0];
            if first.counter {
                let mut metric =
                    encoder.encode_descriptor(name, first.help, None, ConstCounter::new(0.0).metric_type())?;
                for sample in group {
                    ConstCounter::new(sample.value).encode(metric.encode_family(&sample.labels)?)?;
                }
            } else {
                let mut metric =
                    encoder.encode_descriptor(name, first.help, None, ConstGauge::new(0.0).metric_type())?;
                for sample in group {
                    ConstGauge::new(sample.value).encode(metric.encode_family(&sample.labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    sources: Sources,
    modules: RwLock<HashMap<String, Arc<str>>>,
    other: Arc<str>,
    jobs: Family<JobLabels, Counter>,
    job_seconds: Family<PhaseLabels, Histogram>,
    redirects: Counter,
    scan_jobs: Family<ResultLabels, Counter>,
    resp_commands: Family<CommandLabels, Counter>,
    resp_commands_seen: RwLock<HashMap<String, Arc<str>>>,
    connections: Family<ProtocolLabels, Counter>,
    connections_open: Family<ProtocolLabels, Gauge>,
    compile_seconds: Histogram,
    snapshots_sent: Counter,
    snapshots_received: Counter,
    leader_changes: Counter,
    /// Every job's end-to-end latency, whatever its module, in the buckets of
    /// [`LATENCY_BOUNDS_S`] (the node's load as `grex top` and the dashboard show it).
    latency: [AtomicU64; LATENCY_BOUNDS_S.len() + 1],
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency buckets: 50 µs to about 1.6 s, doubling ([`LATENCY_BOUNDS_S`]).
fn latency_buckets() -> impl Iterator<Item = f64> {
    LATENCY_BOUNDS_S.into_iter()
}

impl Metrics {
    /// Every metric at zero, every source still to come.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("grex");
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register("jobs", "Jobs that ended, by module and outcome (ok, or the error code)", jobs.clone());
        let job_seconds = Family::<PhaseLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "job_seconds",
            "Job latency by module and phase: queue (waiting for its executor), run (in the sandbox), commit \
             (replicated and durable, or a read confirmed) and total",
            job_seconds.clone(),
        );
        let redirects = Counter::default();
        registry.register(
            "job_redirects",
            "Redirects a forwarded job followed (a stale view of a flock's leader)",
            redirects.clone(),
        );
        let scan_jobs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "scan_jobs",
            "Jobs run by scans on this node, one per bucket, by result (ok or error); not counted in grex_jobs",
            scan_jobs.clone(),
        );
        let resp_commands = Family::<CommandLabels, Counter>::default();
        registry.register(
            "resp_commands",
            "Redis-protocol commands by command and result (ok or error)",
            resp_commands.clone(),
        );
        let connections = Family::<ProtocolLabels, Counter>::default();
        registry.register("connections", "Client connections accepted, by protocol", connections.clone());
        let connections_open = Family::<ProtocolLabels, Gauge>::default();
        registry.register("connections_open", "Client connections open now, by protocol", connections_open.clone());
        let compile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "module_load_seconds",
            "Time to make a module runnable on this node when a job first needs it: compiled, or loaded from its \
             compiled code on disk",
            compile_seconds.clone(),
        );
        let snapshots_sent = Counter::default();
        registry.register(
            "snapshots_sent",
            "Flock and meta snapshots this node sent to a peer",
            snapshots_sent.clone(),
        );
        let snapshots_received = Counter::default();
        registry.register(
            "snapshots_installed",
            "Snapshots this node received and installed",
            snapshots_received.clone(),
        );
        let leader_changes = Counter::default();
        registry.register(
            "leader_changes",
            "Changes of a group's leader as this node saw them",
            leader_changes.clone(),
        );
        let sources = Sources::default();
        registry.register_collector(Box::new(sources.clone()));
        Metrics {
            registry,
            sources,
            modules: RwLock::new(HashMap::new()),
            other: Arc::from(OTHER),
            jobs,
            job_seconds,
            redirects,
            scan_jobs,
            resp_commands,
            resp_commands_seen: RwLock::new(HashMap::new()),
            connections,
            connections_open,
            compile_seconds,
            snapshots_sent,
            snapshots_received,
            leader_changes,
            latency: Default::default(),
            scrape: Mutex::new(()),
        }
    }

    /// Adds state read at each scrape.
    pub fn add_source(&self, source: Source) {
        self.sources.0.lock().unwrap_or_else(|p| p.into_inner()).push(source);
    }

    /// The label of a module name: itself while fewer than [`MODULE_LABELS_MAX`] names are
    /// labelled, else `other`.
    fn module_label(&self, module: &str) -> Arc<str> {
        interned(&self.modules, module, MODULE_LABELS_MAX).unwrap_or_else(|| self.other.clone())
    }

    /// A job ended.
    pub fn job(&self, module: &str, outcome: Result<(), ErrorCode>, phases: &[(Phase, Duration)]) {
        let module = self.module_label(module);
        let outcome = match outcome {
            Ok(()) => "ok",
            Err(code) => code.as_str(),
        };
        self.jobs.get_or_create(&JobLabels { module: module.clone(), outcome }).inc();
        for &(phase, took) in phases {
            if phase == Phase::Total {
                let bucket = LATENCY_BOUNDS_S.partition_point(|&bound| bound < took.as_secs_f64());
                self.latency[bucket].fetch_add(1, Ordering::Relaxed);
            }
            self.job_seconds
                .get_or_create(&PhaseLabels { module: module.clone(), phase: phase.as_str() })
                .observe(took.as_secs_f64());
        }
    }

    /// Jobs by end-to-end latency since the start, in the buckets of [`LATENCY_BOUNDS_S`] (see
    /// [`grex_client::NodeStats::latency`]).
    pub fn latency_counts(&self) -> Vec<u64> {
        self.latency.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

    /// A forwarded job followed a redirect.
    pub fn redirected(&self) {
        self.redirects.inc();
    }

    /// A scan's job on one bucket ended.
    pub fn scan_job(&self, ok: bool) {
        self.scan_jobs.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" } }).inc();
    }

    /// A Redis-protocol command was answered (`command` in upper case, as the table names it).
    pub fn resp_command(&self, command: &str, ok: bool) {
        // The names come from the command table (bounded); an unknown command counts as one name.
        let command = interned(&self.resp_commands_seen, command, 256).unwrap_or_else(|| self.other.clone());
        self.resp_commands.get_or_create(&CommandLabels { command, result: if ok { "ok" } else { "error" } }).inc();
    }

    /// A client connection was accepted; it counts as open until the guard drops.
    pub fn connection(self: &Arc<Self>, protocol: Protocol) -> ConnectionGuard {
        let labels = ProtocolLabels { protocol: protocol.as_str() };
        self.connections.get_or_create(&labels).inc();
        self.connections_open.get_or_create(&labels).inc();
        ConnectionGuard { metrics: self.clone(), protocol }
    }

    /// A module was made runnable (compiled, or its compiled code loaded).
    pub fn module_loaded(&self, took: Duration) {
        self.compile_seconds.observe(took.as_secs_f64());
    }

    /// A snapshot went to a peer.
    pub fn snapshot_sent(&self) {
        self.snapshots_sent.inc();
    }

    /// A snapshot from a peer was installed.
    pub fn snapshot_installed(&self) {
        self.snapshots_received.inc();
    }

    /// A group's leader changed, as this node saw it.
    pub fn leader_changed(&self) {
        self.leader_changes.inc();
    }

    /// Every metric, as Prometheus text.
    pub fn render(&self) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = String::with_capacity(16 << 10);
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Looks up `name` in a bounded interner, adding it while there is room.
fn interned(table: &RwLock<HashMap<String, Arc<str>>>, name: &str, max: usize) -> Option<Arc<str>> {
    if let Some(label) = table.read().unwrap_or_else(|p| p.into_inner()).get(name) {
        return Some(label.clone());
    }
    let mut table = table.write().unwrap_or_else(|p| p.into_inner());
    if let Some(label) = table.get(name) {
        return Some(label.clone());
    }
    if table.len() >= max {
        return None;
    }
    let label: Arc<str> = Arc::from(name);
    table.insert(name.to_owned(), label.clone());
    Some(label)
}

/// An open client connection, counted in `grex_connections_open` until dropped.
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    protocol: Protocol,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.connections_open.get_or_create(&ProtocolLabels { protocol: self.protocol.as_str() }).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn jobs_are_counted_by_module_and_outcome_and_modules_past_the_cap_are_other() {
        let metrics = Metrics::new();
        metrics.job("counter", Ok(()), &[(Phase::Total, Duration::from_millis(2))]);
        metrics.job("counter", Ok(()), &[(Phase::Total, Duration::from_millis(3))]);
        metrics.job("counter", Err(ErrorCode::JobTimeout), &[]);
        for i in 0..MODULE_LABELS_MAX {
            metrics.job(&format!("m{i}"), Ok(()), &[]);
        }
        let text = metrics.render();
        assert_eq!(value(&text, r#"grex_jobs_total{module="counter",outcome="ok"}"#), Some(2.0), "{text}");
        assert_eq!(value(&text, r#"grex_jobs_total{module="counter",outcome="job_timeout"}"#), Some(1.0));
        assert_eq!(value(&text, r#"grex_job_seconds_count{module="counter",phase="total"}"#), Some(2.0));
        assert_eq!(value(&text, r#"grex_job_seconds_sum{module="counter",phase="total"}"#), Some(0.005));
        // counter took one label, m0..m62 the rest; m63 is the 65th name.
        assert_eq!(value(&text, r#"grex_jobs_total{module="m62",outcome="ok"}"#), Some(1.0));
        assert_eq!(value(&text, r#"grex_jobs_total{module="other",outcome="ok"}"#), Some(1.0));
        assert!(!text.contains("m63"));
    }

    #[test]
    fn sources_are_read_at_each_scrape_and_connections_close() {
        let metrics = Arc::new(Metrics::new());
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = calls.clone();
        metrics.add_source(Box::new(move |samples| {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            samples.gauge("flock_term", "term", &[("flock", "3".into())], 7.0);
            samples.gauge("flock_term", "term", &[("flock", "4".into())], 8.0);
            samples.counter("cache_hits", "hits", &[], n as f64);
        }));
        let open = metrics.connection(Protocol::Resp);
        let text = metrics.render();
        assert_eq!(value(&text, r#"grex_flock_term{flock="3"}"#), Some(7.0), "{text}");
        assert_eq!(value(&text, r#"grex_flock_term{flock="4"}"#), Some(8.0));
        assert_eq!(value(&text, "grex_cache_hits_total"), Some(1.0));
        assert_eq!(value(&text, r#"grex_connections_open{protocol="resp"}"#), Some(1.0));
        drop(open);
        let text = metrics.render();
        assert_eq!(value(&text, "grex_cache_hits_total"), Some(2.0));
        assert_eq!(value(&text, r#"grex_connections_open{protocol="resp"}"#), Some(0.0));
        assert_eq!(value(&text, r#"grex_connections_total{protocol="resp"}"#), Some(1.0));
        assert_eq!(text.matches("# TYPE grex_flock_term gauge").count(), 1);
    }
}
