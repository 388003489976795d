//! Naming GPUs: from what a user writes (`cuda:0`, `auto`) to the UUID the
//! wire carries.
//!
//! Every process resolves its own specs, in its own `CUDA_VISIBLE_DEVICES`:
//! `cuda:1` in a client is whatever GPU that client sees as its second, and
//! the daemon finds that GPU by UUID among those it sees.

use crate::protocol::{Device, DeviceSpec, GpuUuid};

/// One GPU this process can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Its ordinal in this process's numbering.
    pub ordinal: u32,
    pub uuid: GpuUuid,
    pub name: String,
    /// Memory on the device, in bytes.
    pub total: u64,
}

/// Whether this build can use GPUs at all.
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// Why this process cannot list its GPUs: CUDA is not usable in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("this build has no CUDA support (the `cuda` feature is off)")]
    NoCudaBuild,
    /// A driver call failed; `call` names it (`cuDeviceGet(1)`).
    #[cfg(feature = "cuda")]
    #[error("{call} failed: {source}")]
    Driver { call: String, source: cudarc::driver::DriverError },
}

/// Why a device spec, or a GPU's UUID, names no GPU this process can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device cuda:{ordinal} needs a CUDA build, and this one was built without the `cuda` feature \
         (build with scripts/build-cuda.sh, or use device \"cpu\" or \"auto\")"
    )]
    NoCudaBuild { ordinal: u32 },
    #[error("device cuda:{ordinal}: CUDA is not usable here: {source}")]
    Unusable { ordinal: u32, source: DiscoveryError },
    /// `seen`: how many GPUs this process sees.
    #[error("device cuda:{ordinal}: this process sees {seen} GPU(s){} (check CUDA_VISIBLE_DEVICES)", ordinal_range(*.seen))]
    NoSuchOrdinal { ordinal: u32, seen: usize },
    /// `seen`: the GPUs this process sees, by ordinal.
    #[error("GPU {uuid} is not visible to this process (it sees {}); check CUDA_VISIBLE_DEVICES", seen_list(.seen))]
    NotVisible { uuid: GpuUuid, seen: Vec<(u32, GpuUuid)> },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// `, cuda:0 to cuda:N` for `n` GPUs; nothing for none.
fn ordinal_range(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", cuda:0 to cuda:{}", n - 1)
    }
}

/// `cuda:0 = UUID, ...`, or `none`.
fn seen_list(seen: &[(u32, GpuUuid)]) -> String {
    if seen.is_empty() {
        return "none".to_string();
    }
    seen.iter().map(|(ordinal, uuid)| format!("cuda:{ordinal} = {uuid}")).collect::<Vec<_>>().join(", ")
}

/// The GPUs this process can see, in ordinal order. Fails when CUDA is not
/// usable (no driver, no device, a build without CUDA).
pub fn visible() -> Result<Vec<GpuInfo>, DiscoveryError> {
    imp::visible()
}

/// Turns a user's device spec into the device the wire names.
pub fn resolve(spec: DeviceSpec) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(match visible() {
            Ok(gpus) if !gpus.is_empty() => Device::Cuda(gpus[0].uuid),
            _ => Device::Cpu,
        }),
        DeviceSpec::Cuda(n) => {
            if !CUDA_BUILD {
                return Err(DeviceError::NoCudaBuild { ordinal: n });
            }
            let gpus = visible().map_err(|source| DeviceError::Unusable { ordinal: n, source })?;
            gpus.iter()
                .find(|g| g.ordinal == n)
                .map(|g| Device::Cuda(g.uuid))
                .ok_or(DeviceError::NoSuchOrdinal { ordinal: n, seen: gpus.len() })
        }
    }
}

/// The ordinal under which this process sees the GPU `uuid`.
pub fn ordinal_of(uuid: GpuUuid) -> Result<u32, DeviceError> {
    let gpus = visible()?;
    gpus.iter().find(|g| g.uuid == uuid).map(|g| g.ordinal).ok_or_else(|| DeviceError::NotVisible {
        uuid,
        seen: gpus.iter().map(|g| (g.ordinal, g.uuid)).collect(),
    })
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{DiscoveryError, GpuInfo};
    use crate::protocol::GpuUuid;
    use cudarc::driver::{result, DriverError};

    /// The error of the driver call `call`.
    fn failed(call: impl Into<String>) -> impl FnOnce(DriverError) -> DiscoveryError {
        let call = call.into();
        move |source| DiscoveryError::Driver { call, source }
    }

    pub fn visible() -> Result<Vec<GpuInfo>, DiscoveryError> {
        result::init().map_err(failed("cuInit"))?;
        let count = result::device::get_count().map_err(failed("cuDeviceGetCount"))?;
        let mut out = Vec::new();
        for ordinal in 0..count {
            let dev = result::device::get(ordinal).map_err(failed(format!("cuDeviceGet({ordinal})")))?;
            let uuid = result::device::get_uuid(dev).map_err(failed("cuDeviceGetUuid"))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
            // SAFETY: `dev` came from cuDeviceGet above.
            let total = unsafe { result::device::total_mem(dev) }.map_err(failed("cuDeviceTotalMem"))?;
            out.push(GpuInfo {
                ordinal: ordinal as u32,
                uuid: GpuUuid(uuid.bytes.map(|b| b as u8)),
                name,
                total: total as u64,
            });
        }
        Ok(out)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{DiscoveryError, GpuInfo};

    pub fn visible() -> Result<Vec<GpuInfo>, DiscoveryError> {
        Err(DiscoveryError::NoCudaBuild)
    }
}

#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_cuda_resolves_auto_to_the_cpu_and_refuses_cuda() {
        assert_eq!(resolve(DeviceSpec::Auto), Ok(Device::Cpu));
        assert_eq!(resolve(DeviceSpec::Cpu), Ok(Device::Cpu));
        let e = resolve(DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("cuda:0") && e.contains("without the `cuda` feature"), "{e}");
        assert!(!e.contains('\n'));
        let e = ordinal_of(GpuUuid([7; 16])).unwrap_err().to_string();
        assert!(e.contains("no CUDA support"), "{e}");
    }

    #[test]
    fn a_gpu_not_seen_is_named_with_those_that_are() {
        let e = DeviceError::NoSuchOrdinal { ordinal: 2, seen: 0 };
        assert_eq!(e.to_string(), "device cuda:2: this process sees 0 GPU(s) (check CUDA_VISIBLE_DEVICES)");
        let e = DeviceError::NoSuchOrdinal { ordinal: 2, seen: 2 };
        assert_eq!(e.to_string(), "device cuda:2: this process sees 2 GPU(s), cuda:0 to cuda:1 (check CUDA_VISIBLE_DEVICES)");
        let (a, b) = (GpuUuid([7; 16]), GpuUuid([8; 16]));
        let e = DeviceError::NotVisible { uuid: a, seen: Vec::new() };
        assert_eq!(e.to_string(), format!("GPU {a} is not visible to this process (it sees none); check CUDA_VISIBLE_DEVICES"));
        let e = DeviceError::NotVisible { uuid: a, seen: vec![(0, b), (1, a)] };
        assert_eq!(
            e.to_string(),
            format!("GPU {a} is not visible to this process (it sees cuda:0 = {b}, cuda:1 = {a}); check CUDA_VISIBLE_DEVICES")
        );
    }
}
