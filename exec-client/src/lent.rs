//! CPU tensors that view the daemon's segment in place instead of copying it.
//!
//! A candle CPU tensor owns a `Vec`. Copying a model out of the lent segment
//! costs a warm run most of its time (the kernel faults in and zeroes a fresh
//! page for every 4 KiB copied) and gives every client a private copy of
//! every model. Instead, `mora-exec` installs [`LentAware`] as its global
//! allocator and hands candle `Vec`s whose buffers lie in the mapped segment:
//!
//! - the segment is mapped copy-on-write (`MAP_PRIVATE`, readable and
//!   writable), so its pages are the daemon's pages until something writes,
//!   and a write (candle never writes a weight) copies one page privately
//!   instead of faulting or reaching the daemon's memory, which the seals
//!   forbid anyway;
//! - the mapping is registered here and never unmapped: it lives until the
//!   process exits, as the lease does;
//! - [`LentAware`] frees nothing inside a registered region (dropping such a
//!   `Vec` is a no-op) and grows one by copying it to the heap.
//!
//! Within its contract a `Vec`'s buffer must come from the global allocator:
//! here it does, since the global allocator is the one that defines which
//! blocks are its own. Where `LentAware` is not the global allocator (a
//! program using this library with its own), [`lend`] refuses and the caller
//! copies, as before. Each region is lent once: the caller keeps the tensor
//! it built and clones it (sharing its storage) for later requests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Regions a process can register: one per model mapped, so far more than a
/// workflow has.
const SLOTS: usize = 64;

static INSTALLED: AtomicBool = AtomicBool::new(false);
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ENDS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
static REGISTER: Mutex<()> = Mutex::new(());

/// The system allocator, except that blocks inside registered segment
/// mappings are never freed. Install it with
/// `#[global_allocator] static A: LentAware = LentAware;`.
pub struct LentAware;

fn is_lent(p: *mut u8) -> bool {
    let a = p as usize;
    let n = COUNT.load(Ordering::Acquire);
    (0..n).any(|i| STARTS[i].load(Ordering::Relaxed) <= a && a < ENDS[i].load(Ordering::Relaxed))
}

// SAFETY: every block this allocator frees or resizes came from `System`
// (checked by address: registered regions never come from `System`, which
// cannot hand out addresses inside a live mapping); blocks inside registered
// regions are never freed, and a resize copies them to a fresh `System` block.
unsafe impl GlobalAlloc for LentAware {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !is_lent(ptr) {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !is_lent(ptr) {
            return System.realloc(ptr, layout, new_size);
        }
        let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
        }
        new
    }
}

/// Registers `[base, base + len)`, a mapping that stays mapped until the
/// process exits, as memory the global allocator owns. False when
/// [`LentAware`] is not this process's global allocator or every slot is taken:
/// the caller then copies.
pub fn register(base: *mut u8, len: usize) -> bool {
    if !INSTALLED.load(Ordering::Relaxed) || len == 0 {
        return false;
    }
    let _guard = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
    let i = COUNT.load(Ordering::Relaxed);
    if i == SLOTS {
        return false;
    }
    STARTS[i].store(base as usize, Ordering::Relaxed);
    ENDS[i].store(base as usize + len, Ordering::Relaxed);
    COUNT.store(i + 1, Ordering::Release);
    true
}

/// A `Vec` of the `len / size_of::<T>()` values at `ptr`, inside a region
/// [`register`] accepted; `None` when `ptr` is misaligned for `T` or `len` is
/// not a whole number of values.
///
/// # Safety
/// `[ptr, ptr + len)` lies inside a registered region, holds initialised
/// values of `T` (any bit pattern must be a valid `T`), and is lent once: no
/// other `Vec` or reference to it exists while the returned one lives.
pub unsafe fn lend<T>(ptr: *mut u8, len: usize) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if size == 0 || !len.is_multiple_of(size) || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) || !is_lent(ptr) {
        return None;
    }
    if len == 0 {
        return Some(Vec::new());
    }
    let n = len / size;
    // SAFETY: per the caller, the block is the global allocator's (registered),
    // aligned for T, initialised for n values, and owned by this Vec alone;
    // its "allocation" size is n * size_of::<T>(), so capacity n matches.
    Some(Vec::from_raw_parts(ptr.cast::<T>(), n, n))
}

/// True when [`register`] can accept a region now.
pub fn available() -> bool {
    INSTALLED.load(Ordering::Relaxed) && COUNT.load(Ordering::Relaxed) < SLOTS
}
