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

/// The GPUs this process can see, in ordinal order. Fails when CUDA is not
/// usable (no driver, no device, a build without CUDA).
pub fn visible() -> Result<Vec<GpuInfo>, String> {
    imp::visible()
}

/// Turns a user's device spec into the device the wire names.
pub fn resolve(spec: DeviceSpec) -> Result<Device, String> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(match visible() {
            Ok(gpus) if !gpus.is_empty() => Device::Cuda(gpus[0].uuid),
            _ => Device::Cpu,
        }),
        DeviceSpec::Cuda(n) => {
            if !CUDA_BUILD {
                return Err(format!(
                    "device cuda:{n} needs a CUDA build, and this one was built without the `cuda` feature \
                     (build with scripts/build-cuda.sh, or use device \"cpu\" or \"auto\")"
                ));
            }
            let gpus = visible().map_err(|e| format!("device cuda:{n}: CUDA is not usable here: {e}"))?;
            gpus.iter().find(|g| g.ordinal == n).map(|g| Device::Cuda(g.uuid)).ok_or_else(|| {
                format!(
                    "device cuda:{n}: this process sees {} GPU(s){} (check CUDA_VISIBLE_DEVICES)",
                    gpus.len(),
                    if gpus.is_empty() { String::new() } else { format!(", cuda:0 to cuda:{}", gpus.len() - 1) }
                )
            })
        }
    }
}

/// The ordinal under which this process sees the GPU `uuid`.
pub fn ordinal_of(uuid: GpuUuid) -> Result<u32, String> {
    let gpus = visible()?;
    gpus.iter().find(|g| g.uuid == uuid).map(|g| g.ordinal).ok_or_else(|| {
        let seen: Vec<String> = gpus.iter().map(|g| format!("cuda:{} = {}", g.ordinal, g.uuid)).collect();
        format!(
            "GPU {uuid} is not visible to this process (it sees {}); check CUDA_VISIBLE_DEVICES",
            if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
        )
    })
}

#[cfg(feature = "cuda")]
mod imp {
    use super::GpuInfo;
    use crate::protocol::GpuUuid;
    use cudarc::driver::result;

    pub fn visible() -> Result<Vec<GpuInfo>, String> {
        result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
        let mut out = Vec::new();
        for ordinal in 0..count {
            let dev = result::device::get(ordinal).map_err(|e| format!("cuDeviceGet({ordinal}) failed: {e}"))?;
            let uuid = result::device::get_uuid(dev).map_err(|e| format!("cuDeviceGetUuid failed: {e}"))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
            // SAFETY: `dev` came from cuDeviceGet above.
            let total = unsafe { result::device::total_mem(dev) }.map_err(|e| format!("cuDeviceTotalMem failed: {e}"))?;
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
    use super::GpuInfo;

    pub fn visible() -> Result<Vec<GpuInfo>, String> {
        Err("this build has no CUDA support (the `cuda` feature is off)".into())
    }
}

#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_cuda_resolves_auto_to_the_cpu_and_refuses_cuda() {
        assert_eq!(resolve(DeviceSpec::Auto), Ok(Device::Cpu));
        assert_eq!(resolve(DeviceSpec::Cpu), Ok(Device::Cpu));
        let e = resolve(DeviceSpec::Cuda(0)).unwrap_err();
        assert!(e.contains("cuda:0") && e.contains("without the `cuda` feature"), "{e}");
        assert!(!e.contains('\n'));
        let e = ordinal_of(GpuUuid([7; 16])).unwrap_err();
        assert!(e.contains("no CUDA support"), "{e}");
    }
}
