//! The resident models and the leases held on them.
//!
//! An entry is keyed by what its bytes are: the canonical paths of its weight
//! files (a Hugging Face snapshot's files canonicalize to content-addressed
//! blobs), the dtype and the device. Two requests for the same key share one
//! load: the first runs it, the others wait for it.
//!
//! Invariant: an entry with an open lease is never removed. Leases are guards
//! owned by the connection that took them, so a client that exits or crashes
//! without releasing them releases them all when its connection closes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::sync::OnceCell;

use mora_common::manifest::WeightDType;
use mora_common::model::ResolveError;
use mora_common::protocol::{Device, ErrorKind, ErrorReply, LeaseId, ModelStatus};
use mora_common::segment::Segment;
use mora_common::{Manifest, ModelSource, ResolvedModel};

use crate::checkpoint::{self, CheckpointError};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub weights: Vec<PathBuf>,
    pub dtype: WeightDType,
    pub device: Device,
}

/// A model whose weights are in a sealed segment.
pub struct Resident {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub segment: Segment,
    pub load_ms: u64,
}

pub struct Entry {
    key: Key,
    resident: OnceCell<Arc<Resident>>,
    leases: AtomicU64,
    loads: AtomicU64,
    hits: AtomicU64,
    last_used_unix_ms: AtomicU64,
}

/// What an acquire hands back: the resident model and the lease holding it.
pub struct Grant {
    pub resident: Arc<Resident>,
    pub lease: Lease,
    pub loaded_now: bool,
}

/// Holds its entry resident. Dropping it ends the lease.
pub struct Lease {
    id: LeaseId,
    entry: Arc<Entry>,
}

impl Lease {
    pub fn id(&self) -> LeaseId {
        self.id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.entry.leases.fetch_sub(1, Ordering::AcqRel);
        self.entry.touch();
    }
}

impl Entry {
    fn touch(&self) {
        self.last_used_unix_ms.store(now_unix_ms(), Ordering::Relaxed);
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

#[derive(Default)]
pub struct Registry {
    entries: DashMap<Key, Arc<Entry>>,
    next_lease: AtomicU64,
}

fn resolve_error(e: ResolveError) -> ErrorReply {
    let kind = match e {
        ResolveError::NotInCache { .. } | ResolveError::NoSuchDir(_) => ErrorKind::NotFound,
        ResolveError::BadRepoId(_) | ResolveError::BadRevision(_) => ErrorKind::BadRequest,
        _ => ErrorKind::InvalidModel,
    };
    ErrorReply { kind, message: e.to_string() }
}

fn checkpoint_error(name: &str, e: CheckpointError) -> ErrorReply {
    let kind = match e {
        CheckpointError::Segment(_) | CheckpointError::Io { .. } => ErrorKind::Internal,
        _ => ErrorKind::InvalidModel,
    };
    ErrorReply { kind, message: format!("cannot load {name}: {e}") }
}

fn internal(message: String) -> ErrorReply {
    ErrorReply { kind: ErrorKind::Internal, message }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves `source`, makes it resident in `dtype` (loading it unless it
    /// already is, or is being loaded by another request) and takes a lease.
    pub async fn acquire(&self, source: ModelSource, dtype: WeightDType, device: Device) -> Result<Grant, ErrorReply> {
        let resolved = tokio::task::spawn_blocking(move || {
            let resolved = source.resolve()?;
            let weights = resolved
                .weights
                .iter()
                .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
                .collect::<Vec<_>>();
            Ok::<_, ResolveError>((resolved, weights))
        })
        .await
        .map_err(|e| internal(format!("model resolution failed: {e}")))?;
        let (resolved, weights) = resolved.map_err(resolve_error)?;
        let key = Key { weights, dtype, device };
        let entry = self
            .entries
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    key,
                    resident: OnceCell::new(),
                    leases: AtomicU64::new(0),
                    loads: AtomicU64::new(0),
                    hits: AtomicU64::new(0),
                    last_used_unix_ms: AtomicU64::new(now_unix_ms()),
                })
            })
            .clone();

        let mut loaded_now = false;
        let resident = entry
            .resident
            .get_or_try_init(|| {
                loaded_now = true;
                load(resolved, dtype)
            })
            .await?
            .clone();
        if loaded_now {
            entry.loads.fetch_add(1, Ordering::Relaxed);
        }
        // Lease before anything else can observe the entry as idle.
        entry.leases.fetch_add(1, Ordering::AcqRel);
        entry.hits.fetch_add(1, Ordering::Relaxed);
        entry.touch();
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Grant { resident, lease: Lease { id, entry }, loaded_now })
    }

    /// Every resident model, largest first.
    pub fn list(&self) -> Vec<ModelStatus> {
        let mut out: Vec<ModelStatus> = self
            .entries
            .iter()
            .filter_map(|e| {
                let entry = e.value();
                let r = entry.resident.get()?;
                Some(ModelStatus {
                    name: r.name.clone(),
                    dir: r.dir.clone(),
                    dtype: entry.key.dtype,
                    device: entry.key.device,
                    bytes: r.segment.len(),
                    tensors: r.manifest.tensors.len() as u64,
                    leases: entry.leases.load(Ordering::Acquire),
                    loads: entry.loads.load(Ordering::Relaxed),
                    hits: entry.hits.load(Ordering::Relaxed),
                    last_used_unix_ms: entry.last_used_unix_ms.load(Ordering::Relaxed),
                    load_ms: r.load_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        out
    }
}

async fn load(resolved: ResolvedModel, dtype: WeightDType) -> Result<Arc<Resident>, ErrorReply> {
    let name = resolved.name.clone();
    tracing::info!(model = %name, %dtype, dir = %resolved.dir.display(), "loading");
    let result = tokio::task::spawn_blocking(move || {
        let loaded = checkpoint::load(&resolved, dtype).map_err(|e| checkpoint_error(&resolved.name, e))?;
        Ok::<_, ErrorReply>((resolved, loaded))
    })
    .await
    .map_err(|e| internal(format!("loading {name} failed: {e}")))?;
    let (resolved, loaded) = match result {
        Ok(ok) => ok,
        Err(e) => {
            tracing::warn!(model = %name, error = %e.message, "load refused");
            return Err(e);
        }
    };
    let secs = loaded.elapsed.as_secs_f64().max(1e-9);
    tracing::info!(
        model = %name,
        tensors = loaded.manifest.tensors.len(),
        mib = format_args!("{:.1}", loaded.segment.len() as f64 / (1024.0 * 1024.0)),
        ms = loaded.elapsed.as_millis() as u64,
        gb_per_s = format_args!("{:.2}", loaded.bytes_read as f64 / secs / 1e9),
        "resident"
    );
    Ok(Arc::new(Resident {
        name: resolved.name,
        dir: resolved.dir,
        manifest: loaded.manifest,
        segment: loaded.segment,
        load_ms: loaded.elapsed.as_millis() as u64,
    }))
}
