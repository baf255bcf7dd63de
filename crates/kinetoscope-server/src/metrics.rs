//! Prometheus metrics: what an operator watches to size the queue and spot a slow or leaking worker.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `completed`, or the error code a job failed with.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    pub device: String,
}

pub struct Metrics {
    registry: Registry,
    /// Jobs queued or running in the whole store (every node's), by model.
    pub queue_depth: Family<ModelLabel, Gauge>,
    /// Jobs this process found with a lapsed lease (their worker died or lost the store) and queued again.
    pub lease_expiries: Counter,
    pub workers_ready: Gauge,
    pub jobs: Family<Outcome, Counter>,
    pub job_seconds: Histogram,
    pub step_seconds: Histogram,
    pub resident_bytes: Gauge,
    /// Sampled after every denoising step on each GPU worker's device.
    pub gpu_memory_bytes: Family<DeviceLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kinetoscope");
        let queue_depth = Family::<ModelLabel, Gauge>::default();
        registry.register("queue_depth", "Jobs queued or running, by model", queue_depth.clone());
        let lease_expiries = Counter::default();
        registry.register("lease_expiries", "Running jobs whose lease lapsed, queued again", lease_expiries.clone());
        let workers_ready = Gauge::default();
        registry.register("workers_ready", "Workers with their model loaded", workers_ready.clone());
        let jobs = Family::<Outcome, Counter>::default();
        registry.register("jobs", "Jobs finished, by outcome (completed or the error code)", jobs.clone());
        let job_seconds = Histogram::new(exponential_buckets(0.25, 2.0, 16));
        registry.register("job_duration_seconds", "Time from a job's start to its end", job_seconds.clone());
        let step_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register("step_duration_seconds", "Time of one denoising step", step_seconds.clone());
        let resident_bytes = Gauge::default();
        registry.register("resident_memory_bytes", "Resident memory of the server process", resident_bytes.clone());
        let gpu_memory_bytes = Family::<DeviceLabel, Gauge>::default();
        registry.register("gpu_memory_used_bytes", "GPU memory in use on a worker's device", gpu_memory_bytes.clone());
        Metrics {
            registry,
            queue_depth,
            lease_expiries,
            workers_ready,
            jobs,
            job_seconds,
            step_seconds,
            resident_bytes,
            gpu_memory_bytes,
        }
    }
}

impl Metrics {
    /// The text exposition format, with the gauges sampled now.
    pub fn render(&self, queue_depth: &[(String, usize)]) -> String {
        self.queue_depth.clear();
        for (model, depth) in queue_depth {
            self.queue_depth.get_or_create(&ModelLabel { model: model.clone() }).set(*depth as i64);
        }
        if let Some(bytes) = resident_memory_bytes() {
            self.resident_bytes.set(bytes as i64);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

/// Resident set size from /proc (Linux); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
