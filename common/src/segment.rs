//! Sealed shared-memory segments: one memfd per resident model.
//!
//! The daemon creates a segment, fills it through a writable mapping, drops
//! that mapping and seals the memfd against writing, shrinking and growing.
//! From then on nobody, the daemon included, can change its bytes, so a
//! client may map it read-only and trust that what it reads stays put.
//! The kernel keeps the memory alive while any descriptor or mapping of it
//! exists: a client's mapping stays valid even if the daemon exits.
//!
//! This module holds all of Mora's `unsafe` for shared memory.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::mm::{madvise, mmap, munmap, Advice, MapFlags, ProtFlags};

/// The seals every segment carries once filled.
pub const REQUIRED_SEALS: SealFlags = SealFlags::WRITE.union(SealFlags::SHRINK).union(SealFlags::GROW);

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("cannot create a {len}-byte shared-memory segment: {source}")]
    Create { len: u64, source: io::Error },
    #[error("cannot map a {len}-byte segment: {source}")]
    Map { len: u64, source: io::Error },
    #[error("cannot seal the segment: {0}")]
    Seal(io::Error),
    #[error("received segment is not sealed against writes (seals {found:?}): refusing to map it")]
    NotSealed { found: SealFlags },
    #[error("received segment is {actual} bytes, the daemon announced {expected}")]
    WrongSize { expected: u64, actual: u64 },
    #[error("cannot inspect the received segment: {0}")]
    Inspect(io::Error),
}

/// A sealed, read-only segment: the daemon's handle on a resident model.
#[derive(Debug)]
pub struct Segment {
    fd: OwnedFd,
    len: u64,
}

/// A segment being filled. Sealing it consumes the writable mapping.
pub struct SegmentWriter {
    fd: OwnedFd,
    map: RawMapping,
}

/// A segment being filled by `pwrite` through its descriptor, with no
/// mapping: the kernel allocates each page as a write fills it, without
/// zeroing it first, which a writable mapping cannot avoid
/// (docs/decisions.md). Writes at distinct offsets may come from any thread.
#[derive(Debug)]
pub struct SegmentFile {
    fd: OwnedFd,
    len: u64,
}

/// A read-only view of a sealed segment. Unmapped on drop.
pub struct Mapping {
    map: RawMapping,
}

struct RawMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a RawMapping is a plain region of shared memory owned by the value;
// moving it to another thread moves the only handle that unmaps it.
unsafe impl Send for RawMapping {}
// SAFETY: shared access only reads the region (Mapping) and the writer needs
// `&mut self` to write, so no data race can be expressed in safe code.
unsafe impl Sync for RawMapping {}

impl RawMapping {
    /// `flags`: MAP_SHARED or MAP_PRIVATE, with MAP_POPULATE to pre-fault
    /// every page in the `mmap` call itself.
    fn new(fd: BorrowedFd<'_>, len: u64, prot: ProtFlags, flags: MapFlags) -> Result<Self, SegmentError> {
        let size = usize::try_from(len).map_err(|_| SegmentError::Map {
            len,
            source: io::Error::other("larger than the address space"),
        })?;
        // SAFETY: we ask the kernel for a fresh mapping (null hint, no FIXED),
        // so no existing memory is replaced; the fd is a memfd of at least
        // `len` bytes (created or checked by the caller), and MAP_SHARED of a
        // sealed or private-to-us memfd cannot be truncated underneath us
        // (SEAL_SHRINK on received segments; we own unsealed ones).
        let ptr = unsafe { mmap(std::ptr::null_mut(), size, prot, flags, fd, 0) }
            .map_err(|e| SegmentError::Map { len, source: e.into() })?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| SegmentError::Map {
            len,
            source: io::Error::other("kernel returned a null mapping"),
        })?;
        Ok(RawMapping { ptr, len: size })
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned and nothing else
        // unmaps them; every slice borrowed from this mapping borrows `self`,
        // so none outlives this call.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An unsealed, sealable memfd of `len` bytes (at least 1), reading as zeroes.
fn new_memfd(name: &str, len: u64) -> Result<(OwnedFd, u64), SegmentError> {
    let len = len.max(1);
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| SegmentError::Create { len, source: e.into() })?;
    ftruncate(&fd, len).map_err(|e| SegmentError::Create { len, source: e.into() })?;
    Ok((fd, len))
}

/// Attempts at sealing a segment before its load fails.
const SEAL_TRIES: u32 = 10;

/// Seals a filled memfd: from here on its bytes cannot change. The kernel
/// refuses `F_SEAL_WRITE` (`EBUSY`) while a writable mapping of the file
/// exists, or while one of its pages holds a reference beyond the file's
/// own, which it waits up to 150 ms to see go. On a busy
/// machine a page that compaction or reclaim is moving can be held longer
/// (a mapped fill failed this way once in a full test run on 2 cores), so
/// an `EBUSY` is tried again, up to [`SEAL_TRIES`] times over about a
/// second, rather than failing the load at once.
fn seal_memfd(fd: OwnedFd, len: u64) -> Result<Segment, SegmentError> {
    let mut tries = 1;
    loop {
        match fcntl_add_seals(&fd, REQUIRED_SEALS | SealFlags::SEAL) {
            Ok(()) => return Ok(Segment { fd, len }),
            Err(rustix::io::Errno::BUSY) if tries < SEAL_TRIES => {
                std::thread::sleep(std::time::Duration::from_millis(20 * u64::from(tries)));
                tries += 1;
            }
            Err(e) => return Err(SegmentError::Seal(e.into())),
        }
    }
}

impl SegmentWriter {
    /// Creates an unsealed memfd of `len` bytes (zero-filled) and maps it
    /// writable. `name` shows in `/proc/PID/fd` and `/proc/PID/maps`.
    pub fn create(name: &str, len: u64) -> Result<Self, SegmentError> {
        let (fd, len) = new_memfd(name, len)?;
        let map = RawMapping::new(fd.as_fd(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED)?;
        // Ask for transparent huge pages (taken where the machine allows them
        // for shared memory: `shmem_enabled` set to `advise` or more). Pages
        // are allocated as they are first written, by whichever thread writes
        // them, so a segment filled from several threads is also allocated
        // and zeroed by all of them (docs/decisions.md). A hint: the mapping
        // works the same without.
        // SAFETY: the range is exactly the mapping just made, which nothing
        // else uses yet; the advice does not change its contents (zeroes).
        unsafe {
            let _ = madvise(map.ptr.as_ptr().cast(), map.len, Advice::LinuxHugepage);
        }
        Ok(SegmentWriter { fd, map })
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and lives
        // as long as `self`; `&mut self` makes this the only live view.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.map.len) }
    }

    /// Unmaps the writable view and seals the memfd. After this the bytes
    /// cannot change for as long as the segment exists.
    pub fn seal(self) -> Result<Segment, SegmentError> {
        let SegmentWriter { fd, map } = self;
        let len = map.len as u64;
        // F_SEAL_WRITE is refused while a writable shared mapping exists.
        drop(map);
        seal_memfd(fd, len)
    }
}

impl SegmentFile {
    /// Creates an unsealed memfd of `len` bytes whose pages are allocated
    /// as they are written. `name` shows in `/proc/PID/fd`.
    pub fn create(name: &str, len: u64) -> Result<Self, SegmentError> {
        let (fd, len) = new_memfd(name, len)?;
        Ok(SegmentFile { fd, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes all of `buf` at `offset`, which must lie inside the segment.
    pub fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(io::Error::other(format!("write of {} bytes at {offset} overruns the {}-byte segment", buf.len(), self.len)));
        }
        while !buf.is_empty() {
            match rustix::io::pwrite(&self.fd, buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Seals the memfd: from here on its bytes cannot change.
    pub fn seal(self) -> Result<Segment, SegmentError> {
        seal_memfd(self.fd, self.len)
    }
}

/// Whether this kernel may give shared memory huge pages: the setting in
/// `shmem_enabled` is `advise` (only to mappings that ask, with
/// `MADV_HUGEPAGE`), `within_size`, `always` or `force`, rather than `never`
/// or `deny`. Then a segment is filled through a mapping that asks for them,
/// from several threads at once; otherwise with `pwrite`, whose pages the
/// kernel need not zero (docs/decisions.md).
pub fn shared_memory_huge_pages() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .map(|s| huge_pages_in(&s))
        .unwrap_or(false)
}

/// [`shared_memory_huge_pages`] for the contents of `shmem_enabled`, where
/// the setting in force is the one in brackets.
fn huge_pages_in(shmem_enabled: &str) -> bool {
    let chosen = shmem_enabled.split_whitespace().find_map(|w| w.strip_prefix('[')?.strip_suffix(']'));
    matches!(chosen, Some("advise" | "within_size" | "always" | "force"))
}

impl Segment {
    /// Adopts a descriptor received from the daemon, after checking that it
    /// is sealed and of the announced size.
    pub fn from_received(fd: OwnedFd, expected_len: u64) -> Result<Self, SegmentError> {
        let seals = fcntl_get_seals(&fd).map_err(|e| SegmentError::Inspect(e.into()))?;
        if !seals.contains(REQUIRED_SEALS) {
            return Err(SegmentError::NotSealed { found: seals });
        }
        let st = fstat(&fd).map_err(|e| SegmentError::Inspect(e.into()))?;
        let actual = st.st_size as u64;
        if actual != expected_len {
            return Err(SegmentError::WrongSize { expected: expected_len, actual });
        }
        Ok(Segment { fd, len: actual })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Maps the whole segment read-only.
    pub fn map(&self) -> Result<Mapping, SegmentError> {
        Ok(Mapping { map: RawMapping::new(self.fd.as_fd(), self.len, ProtFlags::READ, MapFlags::SHARED)? })
    }

    /// Maps the whole segment copy-on-write (`MAP_PRIVATE`, readable and
    /// writable): reads see the segment's own pages, and a write copies the
    /// page it touches into this process alone. The seals forbid shared
    /// writable mappings, not private ones.
    pub fn map_copy_on_write(&self) -> Result<Mapping, SegmentError> {
        Ok(Mapping { map: RawMapping::new(self.fd.as_fd(), self.len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE)? })
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Mapping {
    /// Gives up the mapping without unmapping it: it stays mapped until the
    /// process exits. Returns its address and length.
    pub fn leak(self) -> (*mut u8, usize) {
        let m = std::mem::ManuallyDrop::new(self);
        (m.map.ptr.as_ptr(), m.map.len)
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes of a segment sealed
        // against writes and shrinking (checked in `from_received`, or set by
        // `seal`), so the bytes neither change nor vanish while `self` lives.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.map.len) }
    }

    pub fn len(&self) -> usize {
        self.map.len
    }

    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_expected_under_every_setting_but_never_and_deny() {
        let line = |chosen: &str| {
            ["always", "within_size", "advise", "never", "deny", "force"]
                .map(|s| if s == chosen { format!("[{s}]") } else { s.to_string() })
                .join(" ")
                + "\n"
        };
        for (setting, huge) in [("always", true), ("within_size", true), ("advise", true), ("force", true), ("never", false), ("deny", false)] {
            assert_eq!(huge_pages_in(&line(setting)), huge, "{setting}");
        }
        // A kernel without shared-memory huge pages has no such file; an
        // unreadable one is taken as `never`.
        assert!(!huge_pages_in(""));
    }

    #[test]
    fn sealing_waits_for_a_writable_mapping_to_go_and_fails_if_it_stays() {
        // A mapping unmapped a little later: the seal is tried again until
        // it takes.
        let file = SegmentFile::create("mora-test", 4096).unwrap();
        let map = RawMapping::new(file.fd.as_fd(), 4096, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED).unwrap();
        let unmapper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(map);
        });
        let seg = file.seal().expect("sealed once the mapping was gone");
        unmapper.join().unwrap();
        assert!(rustix::io::pwrite(seg.fd(), b"x", 0).is_err());
        // A mapping that stays: the seal fails, with the kernel's reason.
        let file = SegmentFile::create("mora-test", 4096).unwrap();
        let _map = RawMapping::new(file.fd.as_fd(), 4096, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED).unwrap();
        let err = file.seal().map(|_| ()).unwrap_err();
        assert!(matches!(&err, SegmentError::Seal(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())), "{err}");
    }

    #[test]
    fn sealed_segment_keeps_its_bytes_and_refuses_writes() {
        let mut w = SegmentWriter::create("mora-test", 4096).unwrap();
        w.as_mut_slice()[..5].copy_from_slice(b"hello");
        let seg = w.seal().unwrap();
        let map = seg.map().unwrap();
        assert_eq!(&map.as_slice()[..5], b"hello");
        // A write through the descriptor is refused by the seal.
        let err = rustix::io::pwrite(seg.fd(), b"x", 0).unwrap_err();
        assert_eq!(err, rustix::io::Errno::PERM);
        assert!(rustix::fs::ftruncate(seg.fd(), 1).is_err());
    }

    #[test]
    fn received_segment_must_be_sealed_and_of_announced_size() {
        let unsealed = memfd_create("mora-test", MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&unsealed, 64).unwrap();
        assert!(matches!(Segment::from_received(unsealed, 64), Err(SegmentError::NotSealed { .. })));

        let seg = SegmentWriter::create("mora-test", 128).unwrap().seal().unwrap();
        let dup = seg.fd().try_clone_to_owned().unwrap();
        assert!(matches!(Segment::from_received(dup, 64), Err(SegmentError::WrongSize { .. })));
        let dup = seg.fd().try_clone_to_owned().unwrap();
        assert_eq!(Segment::from_received(dup, 128).unwrap().len(), 128);
    }

    #[test]
    fn a_written_segment_keeps_its_bytes_and_refuses_writes_once_sealed() {
        let f = SegmentFile::create("mora-test", 10_000).unwrap();
        f.write_all_at(b"tail", 9_996).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        assert!(f.write_all_at(b"over", 9_997).is_err());
        assert!(f.write_all_at(b"x", u64::MAX).is_err());
        let seg = f.seal().unwrap();
        assert_eq!(seg.len(), 10_000);
        let map = seg.map().unwrap();
        assert_eq!(&map.as_slice()[..4], b"head");
        assert_eq!(&map.as_slice()[9_996..], b"tail");
        assert!(map.as_slice()[4..9_996].iter().all(|&b| b == 0), "unwritten bytes read as zero");
        assert_eq!(rustix::io::pwrite(seg.fd(), b"x", 0).unwrap_err(), rustix::io::Errno::PERM);
        let dup = seg.fd().try_clone_to_owned().unwrap();
        assert_eq!(Segment::from_received(dup, 10_000).unwrap().len(), 10_000);
    }

    #[test]
    fn mapping_outlives_the_segment_descriptor() {
        let mut w = SegmentWriter::create("mora-test", 64).unwrap();
        w.as_mut_slice()[0] = 42;
        let seg = w.seal().unwrap();
        let map = seg.map().unwrap();
        drop(seg);
        assert_eq!(map.as_slice()[0], 42);
    }
}
