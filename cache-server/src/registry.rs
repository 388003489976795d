//! The cache: which models are resident, who holds them, and which go when
//! room is needed.
//!
//! State machine of one entry (key: content identity of its weight files,
//! dtype, device):
//!
//! ```text
//!  absent ──acquire/load (fits after evictions)──► loading ──ok──► resident
//!    ▲                                               │                │
//!    └──────────────────────── error ────────────────┘                │
//!    └──── evicting: budget, keep-alive expiry, evict, clear ─────────┘
//! ```
//!
//! Who moves an entry: an acquire or load request moves absent → loading
//! (after the fit check and any evictions it needs) and its load task moves
//! loading → resident, or back to absent on error. Eviction (resident →
//! absent) happens only to an entry with no lease and no pin, and only by one
//! of: a load that needs the room (least recently used first, fewest
//! evictions), the keep-alive reaper, the last lease ending under keep-alive 0,
//! or an admin `evict`/`clear`.
//!
//! Invariants: on each device (the host, each GPU), bytes resident plus bytes
//! reserved by loads in progress never exceed that device's budget; an entry
//! with an open lease is never evicted; a resident model's memory is freed
//! only when it is evicted *and* its last lease has ended (each lease holds
//! the model, so GPU memory a client maps is never freed under it). Leases
//! are guards owned by the connection that took them, so a client that exits
//! or crashes without releasing them releases them all when its connection
//! closes. Every decision is taken under one mutex over all entries, because
//! eviction and the budget span entries; the mutex is never held across I/O.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use mora_common::manifest::WeightDType;
use mora_common::model::ResolveError;
use mora_common::segment::Segment;
use mora_common::protocol::{
    Device, ErrorKind, ErrorReply, GpuStatus, LeaseId, ModelState, ModelStatus, Selector,
};
use mora_common::units::human_bytes;
use mora_common::units::KeepAlive;
use mora_common::{Manifest, ModelSource, ResolvedModel};

use crate::checkpoint::{self, CheckpointError, Storage, Target};
use crate::gpu::GpuMemory;
use crate::identity::{ContentId, IdentifyError, IdentityMemo, ResolutionMemo};
use crate::metrics::{DeviceUsage, Eviction, Metrics, Refusal};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub content: Vec<ContentId>,
    pub dtype: WeightDType,
    pub device: Device,
}

/// A model whose weights are in a sealed segment or on a GPU. Its storage
/// is freed when the last `Arc` goes: the entry's and each lease's.
pub struct Resident {
    pub manifest: Manifest,
    pub storage: Storage,
    pub load_ms: u64,
    /// The model's `tokenizer.json` prepared for clients, in host memory
    /// whatever the device (`checkpoint::prepare_tokenizer`).
    pub tokenizer: Option<Segment>,
}

/// How the cache is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes resident plus reserved in host memory. Each GPU has its
    /// own budget ([`crate::gpu::GpuDevice::budget`]).
    pub budget: u64,
    /// Keep-alive of an entry whose requests name none.
    pub default_keep_alive: KeepAlive,
}

type LoadResult = Option<Result<Arc<Resident>, ErrorReply>>;

enum State {
    Loading(watch::Receiver<LoadResult>, Arc<Progress>),
    Resident(Arc<Resident>),
}

/// How far a load has got: bytes written into its segment, of `total`.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: u64,
}

/// Where an acquire that has to wait for a load shows that load's progress,
/// so the connection can report it while the acquire is pending.
#[derive(Default)]
pub struct ProgressSlot(Mutex<Option<Arc<Progress>>>);

impl ProgressSlot {
    /// (bytes done, total) of the load being waited for, if any.
    pub fn get(&self) -> Option<(u64, u64)> {
        let p = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        Some((p.done.load(Ordering::Relaxed), p.total))
    }

    fn set(&self, p: Arc<Progress>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    }
}

struct Entry {
    names: Vec<String>,
    dir: PathBuf,
    state: State,
    /// Reserved while loading, the segment's length once resident.
    bytes: u64,
    tensors: u64,
    leases: HashMap<LeaseId, i32>,
    pinned: bool,
    keep_alive: KeepAlive,
    loads: u64,
    hits: u64,
    /// Orders eviction (least recently used first) and shows in `ps`.
    last_used: Instant,
    last_used_unix_ms: u64,
    /// Starts the keep-alive clock: the last use, or the unpin that made the
    /// entry evictable again, whichever came later.
    idle_since: Instant,
}

impl Entry {
    fn evictable(&self) -> bool {
        matches!(self.state, State::Resident(_)) && self.leases.is_empty() && !self.pinned
    }

    fn name(&self) -> &str {
        self.names.first().map(String::as_str).unwrap_or("?")
    }

    fn touch(&mut self) {
        self.last_used = Instant::now();
        self.last_used_unix_ms = now_unix_ms();
        self.idle_since = self.last_used;
    }

    fn add_name(&mut self, name: &str) {
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_string());
        }
    }

    fn expires_in(&self) -> Option<Duration> {
        if !self.evictable() {
            return None;
        }
        match self.keep_alive {
            KeepAlive::Forever => None,
            KeepAlive::For(d) => Some(d.saturating_sub(self.idle_since.elapsed())),
        }
    }
}

struct Inner {
    entries: HashMap<Key, Entry>,
    /// Here so that every eviction, whoever makes it, is counted.
    metrics: Arc<Metrics>,
}

impl Inner {
    fn used(&self, device: Device) -> u64 {
        self.entries.iter().filter(|(k, _)| k.device == device).map(|(_, e)| e.bytes).sum()
    }

    fn evict(&mut self, key: &Key, why: Eviction) -> Option<(String, u64)> {
        let e = self.entries.remove(key)?;
        tracing::info!(model = %e.name(), bytes = e.bytes, reason = why.describe(), "evicted");
        self.metrics.evicted(key.device, why);
        Some((e.name().to_string(), e.bytes))
    }

    /// Evicts each key; returns the names evicted and the bytes freed.
    fn evict_all(&mut self, keys: Vec<Key>, why: Eviction) -> (Vec<String>, u64) {
        let mut names = Vec::new();
        let mut freed = 0;
        for k in keys {
            if let Some((n, b)) = self.evict(&k, why) {
                names.push(n);
                freed += b;
            }
        }
        (names, freed)
    }
}

/// What an acquire hands back: the resident model and the lease holding it.
pub struct Grant {
    pub resident: Arc<Resident>,
    pub lease: Lease,
    pub name: String,
    /// This request's own resolution of the model (its small files live here).
    pub dir: PathBuf,
    pub loaded_now: bool,
}

/// Holds its entry resident. Dropping it ends the lease.
pub struct Lease {
    id: LeaseId,
    key: Key,
    inner: Arc<Mutex<Inner>>,
    /// The memory the client maps: freed only once no lease holds it, even
    /// if the entry were gone (dropped after the lease is deregistered).
    _resident: Arc<Resident>,
}

impl Lease {
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Where the leased model is held.
    pub fn device(&self) -> Device {
        self.key.device
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = lock(&self.inner);
        let Some(e) = inner.entries.get_mut(&self.key) else { return };
        e.leases.remove(&self.id);
        e.touch();
        if e.evictable() && e.keep_alive == KeepAlive::For(Duration::ZERO) {
            inner.evict(&self.key.clone(), Eviction::LastLease);
        }
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock leaves entries consistent (every update
    // is a single assignment), so recover rather than take the daemon down.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

fn resolve_error(e: ResolveError) -> ErrorReply {
    let kind = match e {
        ResolveError::NotInCache { .. } | ResolveError::NoSuchDir(_) | ResolveError::NoSubfolder { .. } => ErrorKind::NotFound,
        ResolveError::BadRepoId(_) | ResolveError::BadRevision(_) | ResolveError::BadSubfolder(_) | ResolveError::BadVariant(_) => {
            ErrorKind::BadRequest
        }
        _ => ErrorKind::InvalidModel,
    };
    ErrorReply { kind, message: e.to_string() }
}

fn checkpoint_error(name: &str, e: CheckpointError) -> ErrorReply {
    let kind = match e {
        CheckpointError::Segment(_) | CheckpointError::Io { .. } | CheckpointError::Gpu(_) | CheckpointError::Write(_) => ErrorKind::Internal,
        _ => ErrorKind::InvalidModel,
    };
    ErrorReply { kind, message: format!("cannot load {name}: {e}") }
}

fn internal(message: String) -> ErrorReply {
    ErrorReply { kind: ErrorKind::Internal, message }
}

fn refused(message: String) -> ErrorReply {
    ErrorReply { kind: ErrorKind::Refused, message }
}

/// Picks which idle models to evict to free `need` bytes: the fewest
/// evictions that free enough, and among those the least recently used.
/// `candidates` is ordered least recently used first, as (id, bytes).
/// Returns `None` when all of them together are not enough.
pub fn choose_victims<T: Clone>(candidates: &[(T, u64)], need: u64) -> Option<Vec<T>> {
    if need == 0 {
        return Some(Vec::new());
    }
    let top = |items: &[(T, u64)], k: usize| -> u64 {
        let mut sizes: Vec<u64> = items.iter().map(|(_, b)| *b).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.iter().take(k).sum()
    };
    let k = (1..=candidates.len()).find(|&k| top(candidates, k) >= need)?;
    let mut chosen = Vec::new();
    let mut freed = 0u64;
    for (i, (id, bytes)) in candidates.iter().enumerate() {
        let slots = k - chosen.len();
        if slots == 0 || freed >= need {
            break;
        }
        if freed + bytes + top(&candidates[i + 1..], slots - 1) >= need {
            chosen.push(id.clone());
            freed += bytes;
        }
    }
    Some(chosen)
}

pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    limits: Limits,
    gpus: Option<Arc<dyn GpuMemory>>,
    identity: IdentityMemo,
    resolutions: ResolutionMemo,
    next_lease: AtomicU64,
    metrics: Arc<Metrics>,
}

/// What a scrape reads: the same figures as `ps`, under the same lock.
impl crate::metrics::CacheState for Registry {
    fn usage(&self) -> Vec<DeviceUsage> {
        Registry::usage(self)
    }

    fn gpus(&self) -> Vec<GpuStatus> {
        self.gpu_status()
    }
}

/// How a request wants the entry it touches to be configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wants {
    pub keep_alive: Option<KeepAlive>,
    pub pin: bool,
}

impl Registry {
    /// A registry that holds weights in host memory only.
    pub fn new(limits: Limits) -> Self {
        Self::with_gpus(limits, None)
    }

    /// A registry that also holds weights on the GPUs `gpus` offers.
    pub fn with_gpus(limits: Limits, gpus: Option<Arc<dyn GpuMemory>>) -> Self {
        let ordinals = gpus.iter().flat_map(|g| g.devices()).map(|d| (d.info.uuid, d.info.ordinal)).collect();
        let metrics = Arc::new(Metrics::new(ordinals));
        Registry {
            inner: Arc::new(Mutex::new(Inner { entries: HashMap::new(), metrics: metrics.clone() })),
            limits,
            gpus,
            identity: IdentityMemo::new(),
            resolutions: ResolutionMemo::new(),
            next_lease: AtomicU64::new(0),
            metrics,
        }
    }

    /// The daemon's counters ([`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What each device (the host, then each GPU) holds now.
    pub fn usage(&self) -> Vec<DeviceUsage> {
        let gpus = self.gpus.iter().flat_map(|g| g.devices()).map(|d| Device::Cuda(d.info.uuid));
        let devices: Vec<Device> = std::iter::once(Device::Cpu).chain(gpus).collect();
        let inner = lock(&self.inner);
        devices
            .into_iter()
            .map(|device| {
                let mut u = DeviceUsage {
                    device,
                    budget: self.budget(device),
                    resident_bytes: 0,
                    loading_bytes: 0,
                    models_resident: 0,
                    models_loading: 0,
                    leases: 0,
                };
                for e in inner.entries.iter().filter(|(k, _)| k.device == device).map(|(_, e)| e) {
                    match e.state {
                        State::Resident(_) => {
                            u.resident_bytes += e.bytes;
                            u.models_resident += 1;
                        }
                        State::Loading(..) => {
                            u.loading_bytes += e.bytes;
                            u.models_loading += 1;
                        }
                    }
                    u.leases += e.leases.len() as u64;
                }
                u
            })
            .collect()
    }

    /// Most bytes held on `device` (zero for a GPU the daemon does not have).
    pub fn budget(&self, device: Device) -> u64 {
        match device {
            Device::Cpu => self.limits.budget,
            Device::Cuda(uuid) => self
                .gpus
                .as_ref()
                .and_then(|g| g.devices().iter().find(|d| d.info.uuid == uuid))
                .map_or(0, |d| d.budget),
        }
    }

    /// Refuses a device this daemon cannot hold weights on, naming the ones it can.
    fn check_device(&self, device: Device) -> Result<(), ErrorReply> {
        let Device::Cuda(uuid) = device else { return Ok(()) };
        let bad = |message: String| Err(ErrorReply { kind: ErrorKind::BadRequest, message });
        let Some(gpus) = &self.gpus else {
            return bad(if mora_common::gpu::CUDA_BUILD {
                format!("cannot hold weights on GPU {uuid}: the daemon found no usable GPU when it started (see its log)")
            } else {
                format!(
                    "cannot hold weights on GPU {uuid}: this mora-cache was built without CUDA \
                     (stop it with `mora-cache stop` and start a CUDA build, or use device \"cpu\")"
                )
            });
        };
        if gpus.devices().iter().any(|d| d.info.uuid == uuid) {
            return Ok(());
        }
        let seen: Vec<String> = gpus.devices().iter().map(|d| format!("{} (its cuda:{})", d.info.uuid, d.info.ordinal)).collect();
        bad(format!(
            "cannot hold weights on GPU {uuid}: the daemon does not see it (it sees {}); \
             start the daemon with the same CUDA_VISIBLE_DEVICES as its clients",
            if seen.is_empty() { "none".into() } else { seen.join(", ") }
        ))
    }

    /// The GPUs on offer, with their budgets and use.
    pub fn gpu_status(&self) -> Vec<GpuStatus> {
        let Some(gpus) = &self.gpus else { return Vec::new() };
        let inner = lock(&self.inner);
        gpus.devices()
            .iter()
            .map(|d| GpuStatus {
                uuid: d.info.uuid,
                ordinal: d.info.ordinal,
                name: d.info.name.clone(),
                budget: d.budget,
                used: inner.used(Device::Cuda(d.info.uuid)),
            })
            .collect()
    }

    /// Leases open now on models held on a GPU: memory that clients map and
    /// that would vanish under them if the daemon exited.
    pub fn gpu_leases(&self) -> usize {
        let inner = lock(&self.inner);
        inner.entries.iter().filter(|(k, _)| matches!(k.device, Device::Cuda(_))).map(|(_, e)| e.leases.len()).sum()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Resolves `source`, makes it resident in `dtype` (loading it unless it
    /// already is, or is being loaded by another request, evicting idle models
    /// if room is needed) and takes a lease for `pid`. Counts a hit, or the
    /// refusal.
    pub async fn acquire(
        self: &Arc<Self>,
        source: ModelSource,
        dtype: WeightDType,
        device: Device,
        wants: Wants,
        pid: i32,
        progress: &ProgressSlot,
    ) -> Result<Grant, ErrorReply> {
        let granted = self.acquire_uncounted(source, dtype, device, wants, pid, progress).await;
        match &granted {
            Ok(g) if !g.loaded_now => self.metrics.hit(device),
            Ok(_) => {}
            Err(e) => {
                if let Some(why) = Refusal::of_kind(e.kind) {
                    self.metrics.refused(why);
                }
            }
        }
        granted
    }

    async fn acquire_uncounted(
        self: &Arc<Self>,
        source: ModelSource,
        dtype: WeightDType,
        device: Device,
        wants: Wants,
        pid: i32,
        progress: &ProgressSlot,
    ) -> Result<Grant, ErrorReply> {
        self.check_device(device)?;
        let this = self.clone();
        let (resolved, key) = tokio::task::spawn_blocking(move || this.identify(source, dtype, device))
            .await
            .map_err(|e| internal(format!("model resolution failed: {e}")))??;
        let mut plan: Option<checkpoint::Plan> = None;
        let mut triggered = false;
        loop {
            if plan.is_none() && !self.is_known(&key) {
                // Headers are read without the lock; the fit check needs them.
                let r = resolved.clone();
                plan = Some(
                    tokio::task::spawn_blocking(move || {
                        checkpoint::plan(&r, dtype, device).map_err(|e| checkpoint_error(&r.name, e))
                    })
                    .await
                    .map_err(|e| internal(format!("reading headers failed: {e}")))??,
                );
            }
            let waiting = {
                let mut inner = lock(&self.inner);
                match inner.entries.get_mut(&key) {
                    Some(e) => {
                        e.add_name(&resolved.name);
                        match &e.state {
                            State::Resident(r) => {
                                let resident = r.clone();
                                return Ok(self.grant(e, &key, resident, &resolved, wants, pid, false));
                            }
                            State::Loading(rx, p) => {
                                progress.set(p.clone());
                                Some(rx.clone())
                            }
                        }
                    }
                    None => match plan.take() {
                        // Evicted since we looked: read the headers and retry.
                        None => None,
                        Some(p) => {
                            self.admit(&mut inner, &resolved.name, device, p.bytes())?;
                            let (tx, rx) = watch::channel(None);
                            let p_state = Arc::new(Progress { done: AtomicU64::new(0), total: p.bytes() });
                            progress.set(p_state.clone());
                            inner.entries.insert(
                                key.clone(),
                                Entry {
                                    names: vec![resolved.name.clone()],
                                    dir: resolved.dir.clone(),
                                    state: State::Loading(rx.clone(), p_state.clone()),
                                    bytes: p.bytes(),
                                    tensors: p.manifest.tensors.len() as u64,
                                    leases: HashMap::new(),
                                    pinned: false,
                                    keep_alive: wants.keep_alive.unwrap_or(self.limits.default_keep_alive),
                                    loads: 0,
                                    hits: 0,
                                    last_used: Instant::now(),
                                    last_used_unix_ms: now_unix_ms(),
                                    idle_since: Instant::now(),
                                },
                            );
                            // The load runs in its own task, so the entry leaves
                            // `loading` whatever happens to this request.
                            tokio::spawn(Self::load(
                                self.inner.clone(),
                                self.gpus.clone(),
                                key.clone(),
                                resolved.name.clone(),
                                p,
                                p_state,
                                tx,
                            ));
                            triggered = true;
                            Some(rx)
                        }
                    },
                }
            };
            let Some(waiting) = waiting else { continue };
            let mut rx = waiting;
            let outcome = rx
                .wait_for(|r| r.is_some())
                .await
                .map(|r| r.clone().expect("waited for Some"))
                .unwrap_or_else(|_| Err(internal("the load task vanished".into())));
            let resident = outcome?;
            let mut inner = lock(&self.inner);
            if let Some(e) = inner.entries.get_mut(&key) {
                if let State::Resident(r) = &e.state {
                    if Arc::ptr_eq(r, &resident) {
                        return Ok(self.grant(e, &key, resident, &resolved, wants, pid, triggered));
                    }
                }
            }
            // Evicted between the load and this lease (keep-alive 0 and a
            // racing release, say): go round again.
        }
    }

    fn is_known(&self, key: &Key) -> bool {
        lock(&self.inner).entries.contains_key(key)
    }

    #[allow(clippy::too_many_arguments)]
    fn grant(
        &self,
        e: &mut Entry,
        key: &Key,
        resident: Arc<Resident>,
        resolved: &ResolvedModel,
        wants: Wants,
        pid: i32,
        loaded_now: bool,
    ) -> Grant {
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed) + 1;
        e.leases.insert(id, pid);
        e.hits += 1;
        e.touch();
        if let Some(k) = wants.keep_alive {
            e.keep_alive = k;
        }
        if wants.pin {
            e.pinned = true;
        }
        let held = Arc::clone(&resident);
        Grant {
            resident,
            lease: Lease { id, key: key.clone(), inner: self.inner.clone(), _resident: held },
            name: resolved.name.clone(),
            dir: resolved.dir.clone(),
            loaded_now,
        }
    }

    fn identify(&self, source: ModelSource, dtype: WeightDType, device: Device) -> Result<(ResolvedModel, Key), ErrorReply> {
        let (resolved, content) = self.resolutions.identify(&source, &self.identity).map_err(|e| match e {
            IdentifyError::Resolve(e) => resolve_error(e),
            IdentifyError::Read { path, source } => {
                ErrorReply { kind: ErrorKind::InvalidModel, message: format!("cannot read {}: {source}", path.display()) }
            }
        })?;
        Ok((resolved, Key { content, dtype, device }))
    }

    /// Makes room for `need` bytes on `device`, evicting idle unpinned
    /// models if that is enough, or refuses with the figures.
    fn admit(&self, inner: &mut Inner, name: &str, device: Device, need: u64) -> Result<(), ErrorReply> {
        let budget = self.budget(device);
        let used = inner.used(device);
        if used + need <= budget {
            return Ok(());
        }
        let mut candidates: Vec<(&Key, &Entry)> =
            inner.entries.iter().filter(|(k, e)| k.device == device && e.evictable()).collect();
        candidates.sort_by_key(|(_, e)| e.last_used);
        let order: Vec<(Key, u64)> = candidates.iter().map(|(k, e)| ((*k).clone(), e.bytes)).collect();
        let to_free = (used + need).saturating_sub(budget);
        let Some(victims) = choose_victims(&order, to_free).filter(|_| need <= budget) else {
            let held: Vec<&Entry> = inner
                .entries
                .iter()
                .filter(|(k, e)| k.device == device && !e.evictable())
                .map(|(_, e)| e)
                .collect();
            let held_bytes: u64 = held.iter().map(|e| e.bytes).sum();
            let mut names: Vec<String> = held
                .iter()
                .map(|e| match e.state {
                    State::Loading(..) => format!("{} (loading)", e.name()),
                    _ => e.name().to_string(),
                })
                .collect();
            names.sort();
            let held_part = if names.is_empty() {
                String::new()
            } else {
                format!("; {} held by pinned, leased or loading models: {}", human_bytes(held_bytes), names.join(", "))
            };
            return Err(ErrorReply {
                kind: ErrorKind::NoRoom,
                message: format!(
                    "cannot load {name}: needs {}; budget {}{}{held_part} ({}, or unpin or release models)",
                    human_bytes(need),
                    human_bytes(budget),
                    match device {
                        Device::Cpu => String::new(),
                        Device::Cuda(uuid) => format!(" on GPU {uuid}"),
                    },
                    match device {
                        Device::Cpu => "raise --max-memory",
                        Device::Cuda(_) => "lower --gpu-reserve or raise --max-gpu-memory",
                    },
                ),
            });
        };
        if !victims.is_empty() {
            tracing::info!(model = %name, evicting = victims.len(), "making room");
        }
        for k in victims {
            inner.evict(&k, Eviction::Budget);
        }
        Ok(())
    }

    async fn load(
        inner: Arc<Mutex<Inner>>,
        gpus: Option<Arc<dyn GpuMemory>>,
        key: Key,
        name: String,
        plan: checkpoint::Plan,
        progress: Arc<Progress>,
        tx: watch::Sender<LoadResult>,
    ) {
        let (dtype, device) = (key.dtype, key.device);
        tracing::info!(model = %name, %dtype, %device, bytes = plan.bytes(), "loading");
        let n = name.clone();
        let result = tokio::task::spawn_blocking(move || {
            let target = match (device, &gpus) {
                (Device::Cpu, _) => Target::Host,
                (Device::Cuda(uuid), Some(g)) => Target::Gpu(g.as_ref(), uuid),
                (Device::Cuda(uuid), None) => return Err(internal(format!("no GPU {uuid} to load {n} on"))),
            };
            checkpoint::load_plan(&n, plan, target, &progress.done).map_err(|e| checkpoint_error(&n, e))
        })
            .await
            .unwrap_or_else(|e| Err(internal(format!("loading {name} failed: {e}"))));
        let mut guard = lock(&inner);
        let outcome = match result {
            Ok(loaded) => {
                let secs = loaded.elapsed.as_secs_f64().max(1e-9);
                tracing::info!(
                    model = %name,
                    tensors = loaded.manifest.tensors.len(),
                    %device,
                    mib = format_args!("{:.1}", loaded.storage.len() as f64 / (1024.0 * 1024.0)),
                    ms = loaded.elapsed.as_millis() as u64,
                    gb_per_s = format_args!("{:.2}", loaded.bytes_read as f64 / secs / 1e9),
                    "resident"
                );
                let resident = Arc::new(Resident {
                    load_ms: loaded.elapsed.as_millis() as u64,
                    manifest: loaded.manifest,
                    storage: loaded.storage,
                    tokenizer: loaded.tokenizer,
                });
                match guard.entries.get_mut(&key) {
                    Some(e) => {
                        e.bytes = resident.storage.len();
                        e.state = State::Resident(resident.clone());
                        e.loads += 1;
                        e.touch();
                        guard.metrics.loaded(device, resident.storage.len(), loaded.elapsed);
                        Ok(resident)
                    }
                    None => {
                        guard.metrics.load_failed(device);
                        Err(internal(format!("{name} was dropped while loading")))
                    }
                }
            }
            Err(e) => {
                tracing::warn!(model = %name, error = %e.message, "load refused");
                guard.entries.remove(&key);
                guard.metrics.load_failed(device);
                Err(e)
            }
        };
        drop(guard);
        tx.send_replace(Some(outcome));
    }

    fn matching<'a>(inner: &'a mut Inner, target: &Selector) -> Vec<(Key, &'a mut Entry)> {
        inner
            .entries
            .iter_mut()
            .filter(|(k, e)| {
                e.names.iter().any(|n| mora_common::pipeline::selects(&target.name, n)) && target.dtype.is_none_or(|d| d == k.dtype)
            })
            .map(|(k, e)| (k.clone(), e))
            .collect()
    }

    /// Evicts the selected models, refusing (with the reason) if any of them
    /// is leased, pinned or loading.
    pub fn evict(&self, target: &Selector) -> Result<(Vec<String>, u64), ErrorReply> {
        let mut inner = lock(&self.inner);
        let selected = Self::matching(&mut inner, target);
        if selected.is_empty() {
            self.metrics.refused(Refusal::NotFound);
            return Err(ErrorReply { kind: ErrorKind::NotFound, message: format!("no resident model is named {}", target.name) });
        }
        for (k, e) in &selected {
            if !e.leases.is_empty() {
                self.metrics.refused(Refusal::Leased);
                let mut pids: Vec<i32> = e.leases.values().copied().collect();
                pids.sort_unstable();
                pids.dedup();
                let pids: Vec<String> = pids.iter().map(i32::to_string).collect();
                return Err(refused(format!(
                    "cannot evict {} ({}): leased by pid {}",
                    e.name(),
                    k.dtype,
                    pids.join(", ")
                )));
            }
            if e.pinned {
                self.metrics.refused(Refusal::Pinned);
                return Err(refused(format!("cannot evict {} ({}): it is pinned; unpin it first", e.name(), k.dtype)));
            }
            if matches!(e.state, State::Loading(..)) {
                self.metrics.refused(Refusal::Loading);
                return Err(refused(format!("cannot evict {} ({}): it is still loading", e.name(), k.dtype)));
            }
        }
        let keys: Vec<Key> = selected.into_iter().map(|(k, _)| k).collect();
        Ok(inner.evict_all(keys, Eviction::Requested))
    }

    /// Sets or clears the pin of the selected models.
    pub fn set_pinned(&self, target: &Selector, pinned: bool) -> Result<Vec<String>, ErrorReply> {
        let mut inner = lock(&self.inner);
        let selected = Self::matching(&mut inner, target);
        if selected.is_empty() {
            self.metrics.refused(Refusal::NotFound);
            let hint = if pinned { format!(": load it with `mora-cache load {} --pin`", target.name) } else { String::new() };
            return Err(ErrorReply {
                kind: ErrorKind::NotFound,
                message: format!("no resident model is named {}{hint}", target.name),
            });
        }
        let mut names = Vec::new();
        for (_, e) in selected {
            // Not a use: the eviction order stays, but an unpinned model gets
            // its whole keep-alive from now rather than expiring at once.
            if e.pinned && !pinned {
                e.idle_since = Instant::now();
            }
            e.pinned = pinned;
            names.push(e.name().to_string());
        }
        Ok(names)
    }

    /// Evicts every model with no lease and no pin.
    pub fn clear(&self) -> (Vec<String>, u64) {
        let mut inner = lock(&self.inner);
        let keys: Vec<Key> = inner.entries.iter().filter(|(_, e)| e.evictable()).map(|(k, _)| k.clone()).collect();
        inner.evict_all(keys, Eviction::Clear)
    }

    /// Evicts idle models whose keep-alive has run out; returns how long
    /// until the next one would, if any.
    pub fn reap(&self) -> Option<Duration> {
        let mut inner = lock(&self.inner);
        let expired: Vec<Key> =
            inner.entries.iter().filter(|(_, e)| e.expires_in() == Some(Duration::ZERO)).map(|(k, _)| k.clone()).collect();
        for k in expired {
            inner.evict(&k, Eviction::KeepAlive);
        }
        inner.entries.values().filter_map(Entry::expires_in).min()
    }

    /// Bytes resident or reserved on `device`.
    pub fn used(&self, device: Device) -> u64 {
        lock(&self.inner).used(device)
    }

    /// Every entry, largest first.
    pub fn list(&self) -> Vec<ModelStatus> {
        let inner = lock(&self.inner);
        let now = now_unix_ms();
        let mut out: Vec<ModelStatus> = inner
            .entries
            .iter()
            .map(|(k, e)| {
                let mut lease_pids: Vec<i32> = e.leases.values().copied().collect();
                lease_pids.sort_unstable();
                ModelStatus {
                    name: e.name().to_string(),
                    names: e.names.clone(),
                    state: match e.state {
                        State::Loading(..) => ModelState::Loading,
                        State::Resident(_) => ModelState::Resident,
                    },
                    dir: e.dir.clone(),
                    dtype: k.dtype,
                    device: k.device,
                    bytes: e.bytes,
                    tensors: e.tensors,
                    leases: e.leases.len() as u64,
                    lease_pids,
                    pinned: e.pinned,
                    keep_alive: e.keep_alive,
                    expires_unix_ms: e.expires_in().map(|d| now + d.as_millis() as u64),
                    loads: e.loads,
                    hits: e.hits,
                    last_used_unix_ms: e.last_used_unix_ms,
                    load_ms: match &e.state {
                        State::Resident(r) => r.load_ms,
                        State::Loading(..) => 0,
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_victim_suffices_when_one_is_big_enough() {
        // LRU order: a (oldest) .. d. Freeing 50 takes one eviction: the
        // oldest model that is big enough, not the three oldest small ones.
        let c = [("a", 20), ("b", 20), ("c", 60), ("d", 80)];
        assert_eq!(choose_victims(&c, 50), Some(vec!["c"]));
    }

    #[test]
    fn least_recently_used_goes_first_among_equals() {
        let c = [("old", 10), ("mid", 10), ("new", 10)];
        assert_eq!(choose_victims(&c, 10), Some(vec!["old"]));
        assert_eq!(choose_victims(&c, 15), Some(vec!["old", "mid"]));
    }

    #[test]
    fn fewest_evictions_then_oldest() {
        // Need 100: two evictions are necessary (no single one is enough);
        // {a, d} = 110 works and a is the oldest, so a goes with the one that
        // completes it.
        let c = [("a", 40), ("b", 30), ("c", 50), ("d", 70)];
        assert_eq!(choose_victims(&c, 100), Some(vec!["a", "d"]));
    }

    #[test]
    fn not_enough_candidates_is_none() {
        assert_eq!(choose_victims(&[("a", 10)], 11), None);
        assert_eq!(choose_victims::<&str>(&[], 1), None);
        assert_eq!(choose_victims::<&str>(&[], 0), Some(vec![]));
    }

    mod on_a_gpu {
        use super::super::*;
        use crate::checkpoint::tests::{f32_bytes, model_dir, write_safetensors};
        use crate::gpu::fake::FakeGpus;
        use mora_common::protocol::{GpuUuid, SegmentDescriptor};

        const GPU: GpuUuid = GpuUuid([0x42; 16]);

        /// A model directory with one f32 tensor of `n` values, its content
        /// unique to `tag` (equal contents would be one model to the cache).
        fn model(tag: &str, n: usize) -> (mora_test_support::Scratch, ModelSource) {
            let d = model_dir(&format!("reg-{tag}"));
            let seed = (tag.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % 1000) as f32;
            let values: Vec<f32> = (0..n).map(|i| i as f32 + seed).collect();
            write_safetensors(&d.join("model.safetensors"), &[("w", "F32", vec![n], f32_bytes(&values))]);
            let source = ModelSource::Dir { path: d.to_path_buf(), variant: None };
            (d, source)
        }

        fn registry(gpu_budget: u64, keep_alive: KeepAlive) -> (Arc<Registry>, Arc<FakeGpus>) {
            let gpus = Arc::new(FakeGpus::one(GPU, gpu_budget));
            let limits = Limits { budget: 1 << 30, default_keep_alive: keep_alive };
            (Arc::new(Registry::with_gpus(limits, Some(gpus.clone()))), gpus)
        }

        async fn acquire(r: &Arc<Registry>, m: &ModelSource, device: Device) -> Result<Grant, ErrorReply> {
            r.acquire(m.clone(), WeightDType::F32, device, Wants::default(), 1, &ProgressSlot::default()).await
        }

        fn name(m: &ModelSource) -> Selector {
            Selector { name: m.display_name(), dtype: None }
        }

        #[tokio::test]
        async fn an_exported_allocation_is_not_freed_while_a_lease_is_open() {
            let (r, gpus) = registry(1 << 20, KeepAlive::Forever);
            let (_dir_m, m) = model("lease", 1000);
            let label = m.clone().resolve().unwrap().name;
            let grant = acquire(&r, &m, Device::Cuda(GPU)).await.unwrap();
            assert!(matches!(grant.resident.storage.descriptor(), SegmentDescriptor::CudaIpc { gpu: GPU, .. }));
            assert_eq!(r.gpu_leases(), 1);
            // Neither an admin evict, nor clear, nor a load that needs the
            // room frees it.
            assert_eq!(r.evict(&name(&m)).unwrap_err().kind, ErrorKind::Refused);
            assert!(r.clear().0.is_empty());
            let (_dir_big, big) = model("lease-big", 300_000);
            assert_eq!(acquire(&r, &big, Device::Cuda(GPU)).await.err().unwrap().kind, ErrorKind::NoRoom);
            assert!(!gpus.freed(&label));
            drop(grant);
            assert_eq!(r.gpu_leases(), 0);
            assert!(!gpus.freed(&label), "an idle model stays resident under its keep-alive");
            r.evict(&name(&m)).unwrap();
            assert!(gpus.freed(&label));
        }

        #[tokio::test]
        async fn the_memory_goes_only_with_the_last_lease() {
            // Keep-alive 0: the entry is evicted when its last lease ends;
            // the allocation must survive every earlier release.
            let (r, gpus) = registry(1 << 20, KeepAlive::For(Duration::ZERO));
            let (_dir_m, m) = model("two-leases", 1000);
            let label = m.clone().resolve().unwrap().name;
            let a = acquire(&r, &m, Device::Cuda(GPU)).await.unwrap();
            let b = acquire(&r, &m, Device::Cuda(GPU)).await.unwrap();
            assert!(!a.loaded_now || !b.loaded_now);
            drop(a);
            assert!(!gpus.freed(&label));
            assert_eq!(r.gpu_leases(), 1);
            drop(b);
            assert!(gpus.freed(&label));
            assert!(r.list().is_empty());
        }

        #[tokio::test]
        async fn each_device_has_its_own_budget_and_evictions() {
            // Room on the GPU for one 4000-byte model (plus alignment), not two.
            let (r, _gpus) = registry(6000, KeepAlive::Forever);
            let (_dir_a, a) = model("budget-a", 1000);
            let (_dir_b, b) = model("budget-b", 1000);
            drop(acquire(&r, &a, Device::Cpu).await.unwrap());
            drop(acquire(&r, &a, Device::Cuda(GPU)).await.unwrap());
            drop(acquire(&r, &b, Device::Cuda(GPU)).await.unwrap());
            let held: Vec<(String, Device)> = r.list().into_iter().map(|m| (m.name, m.device)).collect();
            assert_eq!(held.len(), 2, "{held:?}");
            assert!(held.contains(&(a.display_name(), Device::Cpu)), "the host copy is not the GPU's to evict: {held:?}");
            assert!(held.contains(&(b.display_name(), Device::Cuda(GPU))), "{held:?}");
            assert_eq!(r.used(Device::Cuda(GPU)), 4096);
            let status = r.gpu_status();
            assert_eq!((status[0].uuid, status[0].used, status[0].budget), (GPU, 4096, 6000));
            let (_dir_too_big, too_big) = model("budget-big", 2000);
            let e = acquire(&r, &too_big, Device::Cuda(GPU)).await.err().unwrap();
            assert_eq!(e.kind, ErrorKind::NoRoom);
            assert!(e.message.contains(&format!("on GPU {GPU}")) && e.message.contains("--gpu-reserve"), "{}", e.message);
        }

        #[tokio::test]
        async fn a_gpu_the_daemon_does_not_see_is_a_bad_request_naming_the_ones_it_does() {
            let (r, gpus) = registry(1 << 20, KeepAlive::Forever);
            let (_dir_m, m) = model("other-gpu", 10);
            let other = GpuUuid([7; 16]);
            let e = acquire(&r, &m, Device::Cuda(other)).await.err().unwrap();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains(&other.to_string()) && e.message.contains(&format!("{GPU} (its cuda:0)")), "{}", e.message);
            assert!(gpus.events().is_empty());
            // A daemon without GPUs says why it has none.
            let plain = Arc::new(Registry::new(Limits { budget: 1 << 30, default_keep_alive: KeepAlive::Forever }));
            let e = acquire(&plain, &m, Device::Cuda(GPU)).await.err().unwrap();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.starts_with(&format!("cannot hold weights on GPU {GPU}")), "{}", e.message);
        }
    }

    /// The registry as a scrape sees it: its counters, and the gauges read
    /// through [`CacheState`](crate::metrics::CacheState).
    mod scraped {
        use super::super::*;
        use crate::checkpoint::tests::{f32_bytes, model_dir, write_safetensors};
        use crate::gpu::fake::FakeGpus;
        use crate::metrics::{encode, exposition};
        use mora_common::protocol::GpuUuid;

        const GPU: GpuUuid = GpuUuid([0x42; 16]);

        fn model(tag: &str, n: usize) -> (mora_test_support::Scratch, ModelSource) {
            let d = model_dir(&format!("metrics-{tag}"));
            let seed = tag.len() as f32 * 7.0;
            let values: Vec<f32> = (0..n).map(|i| i as f32 + seed).collect();
            write_safetensors(&d.join("model.safetensors"), &[("w", "F32", vec![n], f32_bytes(&values))]);
            let source = ModelSource::Dir { path: d.to_path_buf(), variant: None };
            (d, source)
        }

        /// The value of the sample written exactly as `series` (name and labels).
        fn sample(text: &str, series: &str) -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
                .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
                .parse()
                .unwrap()
        }

        #[tokio::test]
        async fn counters_move_with_the_registry_and_gauges_read_it() {
            let gpus = Arc::new(FakeGpus::one(GPU, 1 << 20));
            let limits = Limits { budget: 1 << 20, default_keep_alive: KeepAlive::Forever };
            let r = Arc::new(Registry::with_gpus(limits, Some(gpus)));
            let exposition = exposition(r.metrics(), r.clone());
            let text = encode(&exposition).unwrap();
            for (series, value) in [
                ("mora_resident_bytes{device=\"cpu\"}", 0.0),
                ("mora_budget_bytes{device=\"cpu\"}", (1u64 << 20) as f64),
                ("mora_budget_bytes{device=\"cuda:0\"}", (1u64 << 20) as f64),
                ("mora_loads_total{device=\"cuda:0\",result=\"ok\"}", 0.0),
                ("mora_evictions_total{device=\"cpu\",reason=\"keep_alive\"}", 0.0),
                ("mora_refusals_total{reason=\"handshake\"}", 0.0),
                ("mora_clients_connected", 0.0),
            ] {
                assert_eq!(sample(&text, series), value, "{series}");
            }
            assert!(text.contains(&format!("mora_gpu_info{{device=\"cuda:0\",uuid=\"{GPU}\",name=\"Fake GPU\"}} 1")), "{text}");
            assert!(text.contains(&format!("mora_build_info{{version=\"{}\",", env!("CARGO_PKG_VERSION"))), "{text}");

            let (_dir_m, m) = model("counted", 1000);
            let cold = acquire(&r, &m, Device::Cpu).await.unwrap();
            let warm = acquire(&r, &m, Device::Cpu).await.unwrap();
            let on_gpu = acquire(&r, &m, Device::Cuda(GPU)).await.unwrap();
            let client = r.metrics().connected();
            let text = encode(&exposition).unwrap();
            assert_eq!(sample(&text, "mora_loads_total{device=\"cpu\",result=\"ok\"}"), 1.0);
            assert_eq!(sample(&text, "mora_loads_total{device=\"cuda:0\",result=\"ok\"}"), 1.0);
            assert_eq!(sample(&text, "mora_cache_hits_total{device=\"cpu\"}"), 1.0);
            assert_eq!(sample(&text, "mora_load_duration_seconds_count{device=\"cpu\"}"), 1.0);
            let held = r.used(Device::Cpu) as f64;
            assert!(held >= 4000.0);
            assert_eq!(sample(&text, "mora_loaded_bytes_total{device=\"cpu\"}"), held);
            assert_eq!(sample(&text, "mora_resident_bytes{device=\"cpu\"}"), held);
            assert_eq!(sample(&text, "mora_models_resident{device=\"cpu\"}"), 1.0);
            assert_eq!(sample(&text, "mora_leases_open{device=\"cpu\"}"), 2.0);
            assert_eq!(sample(&text, "mora_leases_open{device=\"cuda:0\"}"), 1.0);
            assert_eq!(sample(&text, "mora_clients_connected"), 1.0);

            // A leased model is not evicted: a refusal; once idle it is.
            let selector = Selector { name: m.display_name(), dtype: None };
            assert!(r.evict(&selector).is_err());
            drop((cold, warm, on_gpu, client));
            r.evict(&selector).unwrap();
            let text = encode(&exposition).unwrap();
            assert_eq!(sample(&text, "mora_refusals_total{reason=\"leased\"}"), 1.0);
            assert_eq!(sample(&text, "mora_evictions_total{device=\"cpu\",reason=\"requested\"}"), 1.0);
            assert_eq!(sample(&text, "mora_evictions_total{device=\"cuda:0\",reason=\"requested\"}"), 1.0);
            assert_eq!(sample(&text, "mora_resident_bytes{device=\"cpu\"}"), 0.0);
            assert_eq!(sample(&text, "mora_leases_open{device=\"cpu\"}"), 0.0);
            assert_eq!(sample(&text, "mora_clients_connected"), 0.0);

            // Too big for the budget: refused before anything loads.
            let (_dir_big, big) = model("too-big", 300_000);
            assert!(acquire(&r, &big, Device::Cpu).await.is_err());
            let text = encode(&exposition).unwrap();
            assert_eq!(sample(&text, "mora_refusals_total{reason=\"budget\"}"), 1.0);
            assert_eq!(sample(&text, "mora_loads_total{device=\"cpu\",result=\"error\"}"), 0.0);
        }

        async fn acquire(r: &Arc<Registry>, m: &ModelSource, device: Device) -> Result<Grant, ErrorReply> {
            r.acquire(m.clone(), WeightDType::F32, device, Wants::default(), 1, &ProgressSlot::default()).await
        }
    }
}
