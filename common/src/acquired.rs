//! The one check every client makes of an `Acquired` reply before it uses
//! any of it: `mora-exec`'s host mapping and CUDA import, and the Python
//! package's, alike.
//!
//! A client trusts nothing the daemon lends until this has passed: the
//! memory is of the device it asked for, the descriptors are the ones the
//! reply announces, a host segment is sealed and of the announced size, and
//! every tensor of the manifest lies inside the memory, aligned as that
//! device needs, named once. Only then may a client map the segment or open
//! the handle and view tensors through the manifest.

use std::os::fd::OwnedFd;

use crate::manifest::{DEVICE_TENSOR_ALIGN, TENSOR_ALIGN};
use crate::protocol::{Acquired, Device, GpuUuid, IpcHandle, SegmentDescriptor};
use crate::segment::Segment;

/// The memory an acquire lent, checked.
pub enum LentMemory {
    /// A sealed memfd of the announced size, ready to map.
    Host(Segment),
    /// A CUDA IPC handle of an allocation on this GPU (by UUID).
    Gpu { handle: IpcHandle, gpu: GpuUuid },
}

/// An `Acquired` reply that passed [`check`].
pub struct Lent {
    /// The reply itself: lease, name, directory, manifest, load figures.
    pub reply: Acquired,
    /// Bytes of the lent memory.
    pub len: u64,
    pub memory: LentMemory,
    /// The prepared tokenizer's descriptor, when the reply announces one. A
    /// client that cannot read it reads `tokenizer.json` itself: it is never
    /// an error.
    pub tokenizer: Option<(OwnedFd, u64)>,
}

/// Why a reply cannot be used; each message names the model.
#[derive(Debug, thiserror::Error)]
pub enum LentError {
    /// Lent memory of another device than the one asked for.
    #[error("{model}: {message}")]
    WrongDevice { model: String, message: String },
    /// More or fewer descriptors than the reply announces.
    #[error("{0}")]
    Descriptors(String),
    /// A host segment not sealed, or not of the announced size.
    #[error("{model}: {source}")]
    Segment { model: String, source: crate::segment::SegmentError },
    /// The manifest describes memory of another size than lent.
    #[error("{model}: manifest describes {manifest} bytes, {what} has {len}")]
    Size { model: String, manifest: u64, what: &'static str, len: u64 },
    /// A tensor outside the memory, misaligned, of the wrong length, or
    /// named twice.
    #[error("{model}: bad manifest: {source}")]
    Manifest { model: String, source: crate::manifest::ManifestError },
}

/// Checks `reply` (with the descriptors `fds` that came with it) against
/// the device `requested`, and hands back what a client may use.
pub fn check(reply: Acquired, requested: Device, fds: Vec<OwnedFd>) -> Result<Lent, LentError> {
    let model = || reply.name.clone();
    reply
        .segment
        .check_device(requested)
        .map_err(|message| LentError::WrongDevice { model: model(), message })?;
    let (segment_fd, tokenizer_fd) = reply.descriptors(fds).map_err(LentError::Descriptors)?;
    let len = reply.segment.len();
    let (what, align) = match reply.segment {
        SegmentDescriptor::Memfd { .. } => ("segment", TENSOR_ALIGN),
        SegmentDescriptor::CudaIpc { .. } => ("the allocation", DEVICE_TENSOR_ALIGN),
    };
    let memory = match reply.segment {
        SegmentDescriptor::Memfd { .. } => {
            let fd = segment_fd.expect("`descriptors` gives a memfd segment its descriptor");
            LentMemory::Host(Segment::from_received(fd, len).map_err(|source| LentError::Segment { model: model(), source })?)
        }
        SegmentDescriptor::CudaIpc { handle, gpu, .. } => LentMemory::Gpu { handle, gpu },
    };
    if reply.manifest.segment_len != len {
        return Err(LentError::Size { model: model(), manifest: reply.manifest.segment_len, what, len });
    }
    reply.manifest.validate_aligned(align).map_err(|source| LentError::Manifest { model: model(), source })?;
    let tokenizer = tokenizer_fd.zip(reply.tokenizer);
    Ok(Lent { reply, len, memory, tokenizer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Manifest, TensorDType, TensorEntry};
    use crate::segment::SegmentWriter;

    /// A reply lending a sealed 256-byte segment with one f32 tensor of
    /// `elems` elements at `offset`, and the segment's descriptor.
    fn reply(elems: usize, offset: u64) -> (Acquired, Vec<OwnedFd>) {
        let segment = SegmentWriter::create("mora-test", 256).unwrap().seal().unwrap();
        let fd = segment.fd().try_clone_to_owned().unwrap();
        let tensor = TensorEntry { name: "w".into(), dtype: TensorDType::F32, shape: vec![elems], offset, len: 4 * elems as u64 };
        let acquired = Acquired {
            lease: 1,
            name: "tiny".into(),
            dir: "/nowhere".into(),
            manifest: Manifest { tensors: vec![tensor], segment_len: 256 },
            segment: SegmentDescriptor::Memfd { len: 256 },
            loaded_now: false,
            load_ms: 0,
            tokenizer: None,
        };
        (acquired, vec![fd])
    }

    #[test]
    fn a_sound_reply_lends_its_segment() {
        let (a, fds) = reply(16, 64);
        let lent = check(a, Device::Cpu, fds).unwrap();
        assert_eq!(lent.len, 256);
        assert!(matches!(lent.memory, LentMemory::Host(ref s) if s.len() == 256));
        assert!(lent.tokenizer.is_none());
    }

    #[test]
    fn a_reply_of_another_device_is_refused_naming_the_model() {
        let (a, fds) = reply(16, 64);
        let e = check(a, Device::Cuda(GpuUuid([7; 16])), fds).err().unwrap();
        assert!(matches!(e, LentError::WrongDevice { .. }), "{e}");
        assert!(e.to_string().starts_with("tiny: asked the daemon for weights in memory of GPU"), "{e}");
    }

    #[test]
    fn descriptors_other_than_announced_are_refused() {
        let (a, _) = reply(16, 64);
        let e = check(a, Device::Cpu, Vec::new()).err().unwrap();
        assert!(matches!(e, LentError::Descriptors(_)), "{e}");
        let (a, mut fds) = reply(16, 64);
        fds.push(fds[0].try_clone().unwrap());
        assert!(matches!(check(a, Device::Cpu, fds), Err(LentError::Descriptors(_))));
    }

    #[test]
    fn a_manifest_that_does_not_fit_the_segment_is_refused() {
        // A tensor past the end.
        let (a, fds) = reply(64, 64);
        let e = check(a, Device::Cpu, fds).err().unwrap();
        assert!(matches!(e, LentError::Manifest { .. }), "{e}");
        assert!(e.to_string().starts_with("tiny: bad manifest: tensor `w` ends at byte 320"), "{e}");
        // Misaligned for a host segment.
        let (a, fds) = reply(4, 8);
        assert!(matches!(check(a, Device::Cpu, fds), Err(LentError::Manifest { .. })));
        // A manifest of another size than the segment.
        let (mut a, fds) = reply(4, 0);
        a.manifest.segment_len = 128;
        let e = check(a, Device::Cpu, fds).err().unwrap();
        assert_eq!(e.to_string(), "tiny: manifest describes 128 bytes, segment has 256");
    }

    #[test]
    fn an_unsealed_segment_is_refused() {
        let (a, _) = reply(4, 0);
        let unsealed = rustix::fs::memfd_create("mora-test", rustix::fs::MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&unsealed, 256).unwrap();
        let e = check(a, Device::Cpu, vec![unsealed]).err().unwrap();
        assert!(matches!(e, LentError::Segment { .. }), "{e}");
    }
}
