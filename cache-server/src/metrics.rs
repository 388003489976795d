//! What the daemon measures, for `serve --metrics`, in Prometheus' text
//! format (through `prometheus-client`; the `scrape` module serves it).
//!
//! Counters are incremented where their events happen: loads in the
//! registry's load task, hits and refusals where a request is answered,
//! evictions in the registry's one eviction function. Gauges that describe
//! the cache (bytes resident, models, leases, budgets) are not kept at all:
//! they are read at each scrape through [`CacheState`], which the registry
//! implements under its lock, so they can never drift from what `ps` shows.
//!
//! The registry uses this module (it counts, and fills [`DeviceUsage`]);
//! this module names nothing of the registry, only the [`CacheState`] trait
//! it reads through.
//!
//! Every label takes its values from a small fixed set: a device (`cpu`,
//! `cuda:N` in the daemon's own numbering), a result, a reason. Model names
//! never become labels; `mora-cache ps` is where models are named.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;

use mora_common::protocol::{Device, ErrorKind, GpuStatus, GpuUuid, PROTOCOL_VERSION};

/// Upper bounds of the load-duration buckets, in seconds: a small model
/// from the page cache (tens of milliseconds) to a large one from a slow
/// disk (minutes).
pub const LOAD_SECONDS_BUCKETS: [f64; 15] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0];

/// Why a model was evicted: the `reason` label of `mora_evictions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// A load needed the room.
    Budget,
    /// Idle longer than its keep-alive.
    KeepAlive,
    /// Its last lease ended under keep-alive 0.
    LastLease,
    /// `mora-cache evict`.
    Requested,
    /// `mora-cache clear`.
    Clear,
}

impl Eviction {
    pub const ALL: [Eviction; 5] =
        [Eviction::Budget, Eviction::KeepAlive, Eviction::LastLease, Eviction::Requested, Eviction::Clear];

    pub fn as_str(self) -> &'static str {
        match self {
            Eviction::Budget => "budget",
            Eviction::KeepAlive => "keep_alive",
            Eviction::LastLease => "last_lease",
            Eviction::Requested => "requested",
            Eviction::Clear => "clear",
        }
    }

    /// For the daemon's log.
    pub fn describe(self) -> &'static str {
        match self {
            Eviction::Budget => "making room for a load",
            Eviction::KeepAlive => "keep-alive expired",
            Eviction::LastLease => "keep-alive 0: last lease ended",
            Eviction::Requested => "evict requested",
            Eviction::Clear => "clear requested",
        }
    }
}

/// Why a request was answered with an error: the `reason` label of
/// `mora_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Does not fit in its device's budget, even after every possible eviction.
    Budget,
    /// An evict of a model a client holds a lease on.
    Leased,
    /// An evict of a pinned model.
    Pinned,
    /// An evict of a model still loading.
    Loading,
    /// The model is not on disk, or (evict, pin) not resident.
    NotFound,
    /// The files are not a checkpoint the daemon can load.
    InvalidModel,
    /// A malformed request, a lease the connection does not hold, a device
    /// the daemon does not have.
    BadRequest,
    /// The daemon failed for a reason of its own (I/O, memory).
    Internal,
    /// A connection closed at the hello: another uid, another protocol
    /// version, not a Mora client, or no hello in time.
    Handshake,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::Budget,
        Refusal::Leased,
        Refusal::Pinned,
        Refusal::Loading,
        Refusal::NotFound,
        Refusal::InvalidModel,
        Refusal::BadRequest,
        Refusal::Internal,
        Refusal::Handshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Budget => "budget",
            Refusal::Leased => "leased",
            Refusal::Pinned => "pinned",
            Refusal::Loading => "loading",
            Refusal::NotFound => "not_found",
            Refusal::InvalidModel => "invalid_model",
            Refusal::BadRequest => "bad_request",
            Refusal::Internal => "internal",
            Refusal::Handshake => "handshake",
        }
    }

    /// The reason an error of `kind` stands for. `None` for
    /// [`ErrorKind::Refused`], whose reason (leased, pinned, loading) only
    /// the code that refuses knows, and counts itself.
    pub fn of_kind(kind: ErrorKind) -> Option<Refusal> {
        match kind {
            ErrorKind::NotFound => Some(Refusal::NotFound),
            ErrorKind::InvalidModel => Some(Refusal::InvalidModel),
            ErrorKind::BadRequest => Some(Refusal::BadRequest),
            ErrorKind::Internal => Some(Refusal::Internal),
            ErrorKind::NoRoom => Some(Refusal::Budget),
            ErrorKind::Refused => None,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    device: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvictionLabels {
    device: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    protocol: String,
    cuda: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    device: String,
    uuid: String,
    name: String,
}

fn load_histogram() -> Histogram {
    Histogram::new(LOAD_SECONDS_BUCKETS)
}

/// The daemon's counters, and the gauge of connected clients. Always kept
/// (they cost an atomic add per event); exposed only with `--metrics`.
#[derive(Debug)]
pub struct Metrics {
    /// The GPUs the daemon holds weights on, with its ordinal for each.
    gpus: Vec<(GpuUuid, u32)>,
    loads: Family<LoadLabels, Counter>,
    loaded_bytes: Family<DeviceLabels, Counter>,
    load_seconds: Family<DeviceLabels, Histogram, fn() -> Histogram>,
    hits: Family<DeviceLabels, Counter>,
    evictions: Family<EvictionLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    clients: Gauge,
}

/// Counts a client as connected while it lives.
pub struct Connected(Gauge);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Counters for a daemon holding weights in host memory and on `gpus`
    /// (UUID and the daemon's ordinal). Every series exists from the start,
    /// at zero, so that a rate over the first event is right.
    pub fn new(gpus: Vec<(GpuUuid, u32)>) -> Metrics {
        let m = Metrics {
            gpus,
            loads: Family::default(),
            loaded_bytes: Family::default(),
            load_seconds: Family::new_with_constructor(load_histogram as fn() -> Histogram),
            hits: Family::default(),
            evictions: Family::default(),
            refusals: Family::default(),
            clients: Gauge::default(),
        };
        // `get_or_create` makes the series, at zero; the guard it returns goes at once.
        let devices = std::iter::once(Device::Cpu).chain(m.gpus.iter().map(|(uuid, _)| Device::Cuda(*uuid)));
        for device in devices {
            let device = m.label(device);
            for result in ["ok", "error"] {
                let _ = m.loads.get_or_create(&LoadLabels { device: device.clone(), result });
            }
            let _ = m.loaded_bytes.get_or_create(&DeviceLabels { device: device.clone() });
            let _ = m.load_seconds.get_or_create(&DeviceLabels { device: device.clone() });
            let _ = m.hits.get_or_create(&DeviceLabels { device: device.clone() });
            for why in Eviction::ALL {
                let _ = m.evictions.get_or_create(&EvictionLabels { device: device.clone(), reason: why.as_str() });
            }
        }
        for why in Refusal::ALL {
            let _ = m.refusals.get_or_create(&ReasonLabels { reason: why.as_str() });
        }
        m
    }

    /// A device as a label value: `cpu`, or `cuda:N` with the daemon's
    /// ordinal (its `CUDA_VISIBLE_DEVICES`; `mora_gpu_info` maps it to the
    /// UUID).
    pub fn label(&self, device: Device) -> String {
        match device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(uuid) => match self.gpus.iter().find(|(u, _)| *u == uuid) {
                Some((_, ordinal)) => format!("cuda:{ordinal}"),
                // Not a GPU the daemon serves: such requests are refused
                // before anything is counted for a device.
                None => uuid.to_string(),
            },
        }
    }

    /// A load from disk finished: `bytes` are now resident.
    pub fn loaded(&self, device: Device, bytes: u64, took: Duration) {
        let device = self.label(device);
        self.loads.get_or_create(&LoadLabels { device: device.clone(), result: "ok" }).inc();
        self.loaded_bytes.get_or_create(&DeviceLabels { device: device.clone() }).inc_by(bytes);
        self.load_seconds.get_or_create(&DeviceLabels { device }).observe(took.as_secs_f64());
    }

    /// A load from disk failed; nothing stayed resident.
    pub fn load_failed(&self, device: Device) {
        self.loads.get_or_create(&LoadLabels { device: self.label(device), result: "error" }).inc();
    }

    /// A request was answered with a model that it did not load itself.
    pub fn hit(&self, device: Device) {
        self.hits.get_or_create(&DeviceLabels { device: self.label(device) }).inc();
    }

    pub fn evicted(&self, device: Device, why: Eviction) {
        self.evictions.get_or_create(&EvictionLabels { device: self.label(device), reason: why.as_str() }).inc();
    }

    pub fn refused(&self, why: Refusal) {
        self.refusals.get_or_create(&ReasonLabels { reason: why.as_str() }).inc();
    }

    /// Counts a client as connected until the guard is dropped.
    pub fn connected(&self) -> Connected {
        self.clients.inc();
        Connected(self.clients.clone())
    }
}

/// What one device holds now, as [`CacheState::usage`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    pub device: Device,
    pub budget: u64,
    /// Bytes of resident models.
    pub resident_bytes: u64,
    /// Bytes reserved by loads in progress.
    pub loading_bytes: u64,
    pub models_resident: u64,
    pub models_loading: u64,
    pub leases: u64,
}

/// The state of the cache a scrape reads its gauges from: the registry
/// implements it, reading its entries under its lock at each call, so the
/// gauges always agree with `mora-cache ps`.
pub trait CacheState: Send + Sync {
    /// What each device (the host, then each GPU) holds now.
    fn usage(&self) -> Vec<DeviceUsage>;
    /// The GPUs the daemon holds weights on, in its ordinal order.
    fn gpus(&self) -> Vec<GpuStatus>;
}

/// The gauges read from the cache at each scrape.
struct Gauges {
    cache: Arc<dyn CacheState>,
    /// For the device labels.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Gauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gauges")
    }
}

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = &self.metrics;
        let usage = self.cache.usage();
        let per_device = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: fn(&DeviceUsage) -> u64| {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for u in &usage {
                family.encode_family(&DeviceLabels { device: metrics.label(u.device) })?.encode_gauge(&value(u))?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        per_device(&mut encoder, "mora_resident_bytes", "Bytes of resident models.", |u| u.resident_bytes)?;
        per_device(&mut encoder, "mora_loading_bytes", "Bytes reserved by loads in progress.", |u| u.loading_bytes)?;
        per_device(
            &mut encoder,
            "mora_budget_bytes",
            "Most bytes resident plus loading the daemon holds on the device.",
            |u| u.budget,
        )?;
        per_device(&mut encoder, "mora_models_resident", "Models resident.", |u| u.models_resident)?;
        per_device(&mut encoder, "mora_models_loading", "Models being loaded.", |u| u.models_loading)?;
        per_device(&mut encoder, "mora_leases_open", "Leases held by clients now.", |u| u.leases)?;
        let gpus = self.cache.gpus();
        if !gpus.is_empty() {
            let mut family = encoder.encode_descriptor(
                "mora_gpu",
                "A GPU the daemon holds weights on: its device label, UUID and name.",
                None,
                MetricType::Info,
            )?;
            for g in gpus {
                family.encode_info(&GpuLabels {
                    device: metrics.label(Device::Cuda(g.uuid)),
                    uuid: g.uuid.to_string(),
                    name: g.name,
                })?;
            }
        }
        Ok(())
    }
}

/// The exposition of a daemon: its counters `m`, the gauges read from
/// `cache` at each scrape, build information.
pub fn exposition(m: &Arc<Metrics>, cache: Arc<dyn CacheState>) -> prometheus_client::registry::Registry {
    let mut r = prometheus_client::registry::Registry::default();
    r.register(
        "mora_build",
        "This daemon's version, protocol version and whether it was built with CUDA",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            protocol: PROTOCOL_VERSION.to_string(),
            cuda: if mora_common::gpu::CUDA_BUILD { "true" } else { "false" },
        }),
    );
    r.register("mora_clients_connected", "Client connections open now, past the hello", m.clients.clone());
    r.register("mora_loads", "Loads from disk finished, by result", m.loads.clone());
    r.register("mora_loaded_bytes", "Bytes made resident by loads from disk", m.loaded_bytes.clone());
    r.register("mora_load_duration_seconds", "Time a successful load took", m.load_seconds.clone());
    r.register(
        "mora_cache_hits",
        "Requests answered with a model they did not load: resident already, or loaded for another request",
        m.hits.clone(),
    );
    r.register("mora_evictions", "Models evicted, by reason", m.evictions.clone());
    r.register("mora_refusals", "Requests answered with an error, and connections refused at the hello, by reason", m.refusals.clone());
    r.register_collector(Box::new(Gauges { cache, metrics: m.clone() }));
    r
}

/// The exposition in Prometheus' text format (version 0.0.4).
pub fn encode(exposition: &prometheus_client::registry::Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, exposition)?;
    Ok(text)
}

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: GpuUuid = GpuUuid([0x42; 16]);

    /// A cache that holds what it is told.
    struct Stub(Vec<DeviceUsage>);

    impl CacheState for Stub {
        fn usage(&self) -> Vec<DeviceUsage> {
            self.0.clone()
        }
        fn gpus(&self) -> Vec<GpuStatus> {
            vec![GpuStatus { uuid: GPU, ordinal: 0, name: "Stub GPU".into(), budget: 1 << 20, used: 0 }]
        }
    }

    #[test]
    fn gauges_are_read_from_the_cache_state_at_each_scrape() {
        let cpu = DeviceUsage {
            device: Device::Cpu,
            budget: 1000,
            resident_bytes: 400,
            loading_bytes: 100,
            models_resident: 2,
            models_loading: 1,
            leases: 3,
        };
        let gpu = DeviceUsage { device: Device::Cuda(GPU), budget: 1 << 20, ..cpu.clone() };
        let m = Arc::new(Metrics::new(vec![(GPU, 0)]));
        let text = encode(&exposition(&m, Arc::new(Stub(vec![cpu, gpu])))).unwrap();
        for line in [
            "mora_resident_bytes{device=\"cpu\"} 400",
            "mora_loading_bytes{device=\"cpu\"} 100",
            "mora_budget_bytes{device=\"cpu\"} 1000",
            "mora_budget_bytes{device=\"cuda:0\"} 1048576",
            "mora_models_resident{device=\"cuda:0\"} 2",
            "mora_models_loading{device=\"cpu\"} 1",
            "mora_leases_open{device=\"cpu\"} 3",
            "mora_clients_connected 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
        assert!(text.contains(&format!("mora_gpu_info{{device=\"cuda:0\",uuid=\"{GPU}\",name=\"Stub GPU\"}} 1")), "{text}");
    }

    #[test]
    fn every_label_value_is_a_fixed_word() {
        for why in Eviction::ALL {
            assert!(why.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{why:?}");
        }
        for why in Refusal::ALL {
            assert!(why.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{why:?}");
        }
    }
}
