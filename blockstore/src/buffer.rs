//! Page-aligned I/O buffers, recycled per queue.
//!
//! O_DIRECT needs buffers aligned to the device's logical block size, and
//! guest buffers carry no such promise, so data is staged in buffers of our
//! own. A [`BufferPool`] keeps freed buffers by power-of-two size class, so
//! after warm-up the data path allocates nothing per request.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer: the 4 KiB block size, which satisfies O_DIRECT
/// on every filesystem we run on.
pub const BUFFER_ALIGN: usize = 4096;

/// A zero-initialised, 4 KiB-aligned heap buffer.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(capacity: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(capacity, BUFFER_ALIGN)
            .expect("buffer sizes are powers of two no larger than request_bytes_max");
        // SAFETY: the layout has a non-zero size (capacity >= BUFFER_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            capacity,
            len: capacity,
        }
    }

    /// Sets the length in use, at most the capacity.
    fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity);
        self.len = len;
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes in use, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, BUFFER_ALIGN)
            .expect("layout was valid at allocation");
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// Recycles [`AlignedBuf`]s by size class.
#[derive(Debug)]
pub struct BufferPool {
    classes: Vec<Vec<AlignedBuf>>,
    kept_per_class_max: usize,
}

impl BufferPool {
    /// A pool for buffers of up to `bytes_max` bytes that keeps at most
    /// `kept_per_class_max` idle buffers of each size.
    pub fn new(bytes_max: usize, kept_per_class_max: usize) -> BufferPool {
        let classes = class_of(bytes_max) + 1;
        BufferPool {
            classes: (0..classes).map(|_| Vec::new()).collect(),
            kept_per_class_max,
        }
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        let class = class_of(len);
        let mut buf = self
            .classes
            .get_mut(class)
            .and_then(Vec::pop)
            .unwrap_or_else(|| AlignedBuf::new(BUFFER_ALIGN << class));
        buf.set_len(len);
        buf
    }

    /// Returns a buffer for reuse.
    pub fn put(&mut self, buf: AlignedBuf) {
        let class = class_of(buf.capacity);
        if let Some(list) = self.classes.get_mut(class) {
            if list.len() < self.kept_per_class_max {
                list.push(buf);
            }
        }
    }
}

fn class_of(len: usize) -> usize {
    let blocks = len.div_ceil(BUFFER_ALIGN).max(1);
    blocks.next_power_of_two().trailing_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_recycled() {
        let mut pool = BufferPool::new(1 << 20, 4);
        let mut buf = pool.get(8192);
        assert_eq!(buf.as_slice().as_ptr() as usize % BUFFER_ALIGN, 0);
        assert_eq!(buf.as_mut_slice().len(), 8192);
        let addr = buf.as_slice().as_ptr();
        pool.put(buf);
        let again = pool.get(5000);
        assert_eq!(again.as_slice().as_ptr(), addr);
        assert_eq!(again.as_slice().len(), 5000);
    }
}
