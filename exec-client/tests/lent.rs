//! Vecs lent over a sealed segment, with `LentAware` as the global allocator
//! (as in the `mora-exec` binary): values read in place, dropping frees
//! nothing, growing moves to the heap, writes stay private to this process.

use mora_common::segment::SegmentWriter;
use mora_exec::lent::{self, LentAware};

#[global_allocator]
static ALLOCATOR: LentAware = LentAware;

#[test]
fn a_lent_vec_views_the_segment_and_outlives_nothing_it_should_not() {
    let values: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5).collect();
    let mut w = SegmentWriter::create("mora-lent-test", (values.len() * 4) as u64).unwrap();
    for (dst, v) in w.as_mut_slice().chunks_exact_mut(4).zip(&values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    let segment = w.seal().unwrap();
    let reader = segment.map().unwrap();

    assert!(lent::available(), "LentAware is this test's global allocator");
    let (base, len) = segment.map_copy_on_write().unwrap().leak();
    assert!(lent::register(base, len));

    // Misaligned or ragged ranges are refused; the caller copies those.
    assert!(unsafe { lent::lend::<f32>(base.wrapping_add(2), 8) }.is_none());
    assert!(unsafe { lent::lend::<f32>(base, 6) }.is_none());
    let outside = Box::into_raw(Box::new([0u8; 16])).cast::<u8>();
    assert!(unsafe { lent::lend::<f32>(outside, 16) }.is_none(), "only registered regions are lent");
    drop(unsafe { Box::from_raw(outside.cast::<[u8; 16]>()) });

    let first = unsafe { lent::lend::<f32>(base, 1024 * 4) }.unwrap();
    assert_eq!(first.as_ptr().cast::<u8>(), base, "in place, not a copy");
    assert_eq!(&first[..], &values[..1024]);
    drop(first); // frees nothing
    assert_eq!(unsafe { std::slice::from_raw_parts(base.cast::<f32>(), 1024) }, &values[..1024]);

    let mut grown = unsafe { lent::lend::<f32>(base.wrapping_add(1024 * 4), 1024 * 4) }.unwrap();
    grown.push(-1.0); // reallocates: the values move to the heap
    assert_ne!(grown.as_ptr().cast::<u8>(), base.wrapping_add(1024 * 4));
    assert_eq!(&grown[..1024], &values[1024..2048]);
    assert_eq!(grown[1024], -1.0);

    let mut written = unsafe { lent::lend::<f32>(base.wrapping_add(2048 * 4), 1024 * 4) }.unwrap();
    written[0] = 42.0; // copy-on-write: this process's page only
    assert_eq!(written[0], 42.0);
    let shared = reader.as_slice();
    assert_eq!(&shared[2048 * 4..2048 * 4 + 4], &values[2048].to_le_bytes(), "the segment itself is unchanged");
}
