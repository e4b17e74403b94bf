//! A memory budget for one thread's work: the global allocator of the
//! `tpde` binary counts what a thread inside [`within`] allocates, and ends
//! the process with a one-line error when the count passes the budget.
//!
//! For work whose memory a model file decides and that has no bound of its
//! own: a chat template can double a string in a loop (minijinja's `~` has
//! no limit), and the rendering has no way to fail an allocation. Without
//! the budget such a template exhausts the machine's memory and the
//! process is killed or aborts; with it, `tpde run` prints the error
//! naming the file and exits with status 2 (nothing is written anywhere
//! but standard error).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting the allocations of threads inside
/// [`within`].
pub struct Budgeted;

/// A thread's budget: bytes it has allocated (less what it freed) since
/// [`within`] began, the most it may, and the line to print past that.
#[derive(Clone, Copy)]
struct Budget {
    used: usize,
    limit: usize,
    line: *const u8,
    line_len: usize,
}

thread_local! {
    // A constant initializer and a `Copy` value: reading it never allocates
    // or registers a destructor, so the allocator may.
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// Counts `grow` more bytes against this thread's budget, if it has one.
fn charge(grow: usize) {
    // `try_with`: a thread being torn down has no budget any more.
    let _ = BUDGET.try_with(|b| {
        if let Some(mut budget) = b.get() {
            budget.used = budget.used.saturating_add(grow);
            if budget.used > budget.limit {
                over(&budget);
            }
            b.set(Some(budget));
        }
    });
}

/// Counts `shrink` bytes freed (never below 0). Memory allocated before
/// the budget began and freed inside it is credited while the count is
/// above 0: the work it bounds (a template's rendering) frees only what it
/// allocated, besides a few caches.
fn refund(shrink: usize) {
    let _ = BUDGET.try_with(|b| {
        if let Some(mut budget) = b.get() {
            budget.used = budget.used.saturating_sub(shrink);
            b.set(Some(budget));
        }
    });
}

/// Writes the budget's line to standard error and exits with status 2,
/// inside the allocator: no allocation, no lock, no unwinding (the work
/// holds nothing that needs cleaning up).
fn over(budget: &Budget) -> ! {
    // SAFETY: `line` points at `line_len` bytes that `within` keeps alive
    // while the budget is set; `write` and `_exit` are async-signal-safe.
    unsafe {
        libc::write(2, budget.line.cast(), budget.line_len);
        libc::_exit(2)
    }
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting around it neither allocates nor touches the memory.
unsafe impl GlobalAlloc for Budgeted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        refund(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match new_size.checked_sub(layout.size()) {
            Some(grow) => charge(grow),
            None => refund(layout.size() - new_size),
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f` with this thread allowed `limit` bytes more than it holds now.
/// Past that, the process writes `message` (one line: "tpde: error: " and
/// what it is given) to standard error and exits with status 2, at once.
/// Only the thread that calls `within` is counted (the work must not hand
/// allocations to other threads), and a `within` inside another replaces
/// the outer budget until it returns (what it allocates is not charged to
/// the outer one). Without [`Budgeted`] as the global allocator, `f` runs
/// without a bound.
pub fn within<T>(limit: usize, message: &str, f: impl FnOnce() -> T) -> T {
    // Built before the budget starts, and kept until it ends.
    let line = format!("tpde: error: {}\n", message.replace('\n', " "));
    let budget = Budget {
        used: 0,
        limit,
        line: line.as_ptr(),
        line_len: line.len(),
    };
    struct Restore(Option<Budget>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUDGET.with(|b| b.set(self.0));
        }
    }
    let _restore = Restore(BUDGET.with(|b| b.replace(Some(budget))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_counts_this_thread_and_restores_the_one_before() {
        // The test binary's allocator is `Budgeted` too: the limits are
        // far above what the test allocates.
        const LIMIT: usize = 1 << 30;
        let got = within(LIMIT, "unused", || {
            let before = BUDGET.with(|b| b.get().map(|x| x.used)).unwrap();
            charge(1000);
            refund(before + 5000);
            charge(3000);
            BUDGET.with(|b| b.get().map(|x| (x.used, x.limit)))
        });
        assert_eq!(got, Some((3000, LIMIT)), "refunds stop at 0");
        assert!(BUDGET.with(|b| b.get()).is_none(), "no budget after");
        within(LIMIT, "outer", || {
            within(LIMIT / 2, "inner", || {
                assert_eq!(BUDGET.with(|b| b.get().map(|x| x.limit)), Some(LIMIT / 2));
            });
            assert_eq!(BUDGET.with(|b| b.get().map(|x| x.limit)), Some(LIMIT));
        });
        // Another thread has none.
        within(LIMIT, "here", || {
            std::thread::spawn(|| assert!(BUDGET.with(|b| b.get()).is_none()))
                .join()
                .unwrap();
        });
        // What the thread allocates inside counts.
        let used = within(LIMIT, "counted", || {
            let v = vec![1u8; 1 << 20];
            let used = BUDGET.with(|b| b.get().map(|x| x.used)).unwrap();
            drop(v);
            used
        });
        assert!(used >= 1 << 20, "{used}");
    }
}
