//! Prometheus metrics (`GET /metrics`, text format).
//!
//! Two sources: what the HTTP layer measures itself (requests, errors by
//! their stable short name, latencies, time to first token, images) and the
//! engine's own counters (queue depth, batch size, steps, generated tokens
//! by modality and by adapter, hot-set hits/misses/evictions), copied in at
//! scrape time. Engine totals are monotonic, so they are exported as counters by
//! adding the difference since the last scrape.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::engine::EngineStats;

/// Latency buckets in seconds: 1 ms .. 60 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Attached to every error response (in its extensions) so that the request
/// middleware can count errors by their stable short name.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    request_seconds: HistogramVec,
    first_token_seconds: HistogramVec,
    queue_seconds: HistogramVec,
    forward_seconds: HistogramVec,
    tokens_by_modality: IntCounterVec,
    tokens_by_adapter: IntCounterVec,
    images: IntCounter,
    queue_depth: IntGauge,
    running: IntGauge,
    batch_size: IntGauge,
    batch_rows: IntGauge,
    finished: IntCounter,
    failed: IntCounter,
    step_seconds: Gauge,
    engine_steps: IntCounter,
    hot_hits: IntCounter,
    hot_misses: IntCounter,
    hot_evictions: IntCounter,
    /// Engine totals seen at the last scrape.
    seen: Mutex<BTreeMap<String, u64>>,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric name");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    let h = HistogramVec::new(opts, labels).expect("valid metric name");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry (one per server, so tests running several servers
    /// in one process do not share counts).
    pub fn new() -> Self {
        let r = Registry::new();
        let step_seconds = Gauge::new(
            "molora_last_step_seconds",
            "Wall time of the latest engine step",
        )
        .expect("valid metric name");
        r.register(Box::new(step_seconds.clone()))
            .expect("metric registered once");
        Self {
            requests: counter_vec(
                &r,
                "molora_requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
            ),
            errors: counter_vec(
                &r,
                "molora_errors_total",
                "Error responses by their stable type",
                &["type"],
            ),
            request_seconds: histogram(
                &r,
                "molora_request_seconds",
                "Generation request latency",
                &["endpoint", "mode"],
            ),
            first_token_seconds: histogram(
                &r,
                "molora_time_to_first_token_seconds",
                "Submission to first token",
                &["mode"],
            ),
            queue_seconds: histogram(
                &r,
                "molora_queue_seconds",
                "Time a request waited for the batch",
                &["mode"],
            ),
            forward_seconds: histogram(
                &r,
                "molora_forward_seconds",
                "Forward time of a request's steps",
                &["mode"],
            ),
            tokens_by_modality: counter_vec(
                &r,
                "molora_tokens_total",
                "Generated tokens by modality",
                &["modality"],
            ),
            tokens_by_adapter: counter_vec(
                &r,
                "molora_adapter_tokens_total",
                "Generated tokens by the adapter that served them most",
                &["adapter"],
            ),
            images: counter(&r, "molora_images_total", "Generated images"),
            queue_depth: gauge(
                &r,
                "molora_queue_depth",
                "Requests waiting for a batch slot",
            ),
            running: gauge(
                &r,
                "molora_running_sequences",
                "Sequences in the running batch",
            ),
            batch_size: gauge(
                &r,
                "molora_batch_size",
                "Sequences in the latest engine step",
            ),
            batch_rows: gauge(
                &r,
                "molora_batch_rows",
                "Token rows the latest engine step fed (all passes)",
            ),
            finished: counter(
                &r,
                "molora_requests_finished_total",
                "Requests the engine finished",
            ),
            failed: counter(
                &r,
                "molora_requests_failed_total",
                "Requests the engine failed",
            ),
            step_seconds,
            engine_steps: counter(&r, "molora_engine_steps_total", "Engine steps run"),
            hot_hits: counter(
                &r,
                "molora_hot_set_hits_total",
                "Adapter acquisitions served from the hot set",
            ),
            hot_misses: counter(
                &r,
                "molora_hot_set_misses_total",
                "Adapter acquisitions that loaded a slot",
            ),
            hot_evictions: counter(
                &r,
                "molora_hot_set_evictions_total",
                "Adapters evicted from the hot set",
            ),
            seen: Mutex::new(BTreeMap::new()),
            registry: r,
        }
    }

    pub fn observe_request(&self, route: &str, status: u16, error: Option<&'static str>) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        if let Some(kind) = error {
            self.errors.with_label_values(&[kind]).inc();
        }
    }

    /// One finished generation (any endpoint).
    pub fn observe_generation(&self, endpoint: &str, done: &GenerationTimes<'_>) {
        let mode = done.mode;
        self.request_seconds
            .with_label_values(&[endpoint, mode])
            .observe(done.wall.as_secs_f64());
        if let Some(t) = done.first_token {
            self.first_token_seconds
                .with_label_values(&[mode])
                .observe(t.as_secs_f64());
        }
        self.queue_seconds
            .with_label_values(&[mode])
            .observe(done.queue_ms / 1e3);
        self.forward_seconds
            .with_label_values(&[mode])
            .observe(done.forward_ms / 1e3);
        self.images.inc_by(done.images as u64);
    }

    /// The text exposition, with the engine's numbers copied in first.
    pub fn render(&self, stats: &EngineStats) -> String {
        self.queue_depth.set(stats.queue_depth as i64);
        self.running.set(stats.running as i64);
        self.batch_size.set(stats.last_batch_size as i64);
        self.step_seconds.set(stats.last_step_ms / 1e3);
        self.advance("steps", stats.steps, &self.engine_steps);
        self.advance("hits", stats.hot_set_hits, &self.hot_hits);
        self.advance("misses", stats.hot_set_misses, &self.hot_misses);
        self.advance("evictions", stats.hot_set_evictions, &self.hot_evictions);
        self.advance("finished", stats.requests_finished, &self.finished);
        self.advance("failed", stats.requests_failed, &self.failed);
        self.batch_rows.set(stats.last_batch_rows as i64);
        for (modality, n) in &stats.tokens_by_modality {
            self.advance(
                &format!("modality/{modality}"),
                *n,
                &self.tokens_by_modality.with_label_values(&[modality]),
            );
        }
        for (adapter, n) in &stats.tokens_by_adapter {
            self.advance(
                &format!("adapter/{adapter}"),
                *n,
                &self.tokens_by_adapter.with_label_values(&[adapter]),
            );
        }
        let mut out = vec![];
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("cannot encode metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn advance(&self, key: &str, total: u64, counter: &IntCounter) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let last = seen.insert(key.to_string(), total).unwrap_or(0);
        counter.inc_by(total.saturating_sub(last));
    }
}

/// What `observe_generation` records.
#[derive(Debug, Clone)]
pub struct GenerationTimes<'a> {
    pub mode: &'a str,
    pub wall: Duration,
    pub first_token: Option<Duration>,
    pub queue_ms: f64,
    pub forward_ms: f64,
    pub images: usize,
}
