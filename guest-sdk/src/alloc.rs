//! A bump allocator for jobs (feature `bump-alloc`, on by default).
//!
//! A job's instance lives for one run and is then discarded, so a general-purpose allocator's
//! bookkeeping is wasted: this one hands out memory from a pointer that only moves up, growing the
//! linear memory when it runs out. Freeing the newest block, or growing it in place, is honoured
//! (the common `Vec` pattern); anything else is left until the instance is gone. The node's memory
//! limit bounds what a job can take.

#[cfg(all(target_arch = "wasm32", feature = "bump-alloc"))]
mod wasm {
    use core::alloc::{GlobalAlloc, Layout};
    use core::arch::wasm32;
    use core::cell::Cell;

    const PAGE_BYTES: usize = 65536;

    struct Bump {
        /// Next free byte; 0 until the first allocation.
        next: Cell<usize>,
        /// End of the memory the allocator may use.
        end: Cell<usize>,
        /// Start of the newest block, which can be freed or grown in place.
        last: Cell<usize>,
    }

    // Safety: a wasm32-unknown-unknown job runs on one thread.
    unsafe impl Sync for Bump {}

    unsafe extern "C" {
        static __heap_base: u8;
    }

    #[global_allocator]
    static ALLOCATOR: Bump = Bump { next: Cell::new(0), end: Cell::new(0), last: Cell::new(0) };

    impl Bump {
        fn reserve(&self, start: usize, size: usize) -> bool {
            let Some(need) = start.checked_add(size) else { return false };
            if need <= self.end.get() {
                return true;
            }
            let pages = (need - self.end.get()).div_ceil(PAGE_BYTES);
            if wasm32::memory_grow(0, pages) == usize::MAX {
                return false;
            }
            self.end.set(wasm32::memory_size(0) * PAGE_BYTES);
            true
        }

        fn init(&self) {
            if self.next.get() == 0 {
                // The linker defines `__heap_base`; only its address is taken.
                let base = (&raw const __heap_base) as usize;
                self.next.set(base);
                self.end.set(wasm32::memory_size(0) * PAGE_BYTES);
            }
        }
    }

    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.init();
            let start = self.next.get().next_multiple_of(layout.align());
            if !self.reserve(start, layout.size()) {
                return core::ptr::null_mut();
            }
            self.next.set(start + layout.size());
            self.last.set(start);
            start as *mut u8
        }

        unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
            if ptr as usize == self.last.get() {
                self.next.set(self.last.get());
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let start = ptr as usize;
            if start == self.last.get() {
                if !self.reserve(start, new_size) {
                    return core::ptr::null_mut();
                }
                self.next.set(start + new_size);
                return ptr;
            }
            // Safety: the caller's layout is valid; new_size was checked by the caller.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            // Safety: forwarded from the caller.
            let new = unsafe { self.alloc(new_layout) };
            if !new.is_null() {
                // Safety: both blocks are live and at least min(old, new) bytes long.
                unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            }
            new
        }
    }
}
