//! Pinning a pool's threads one to a CPU.
//!
//! On this project's two-vCPU virtual machine a worker woken for new work
//! was often queued behind another busy worker on the same CPU while the
//! second CPU sat idle (a per-job trace of the loader showed whole steps
//! decoded by one thread). Pinned one to a CPU, each wakes where it can
//! run. Pinning has a cost too: a pinned thread cannot leave a CPU that
//! another process keeps busy (the loader's decode threads, at nice +5,
//! fell to a quarter of their speed that way, so they are not pinned);
//! pack's workers, at the default priority, measured faster pinned beside
//! a busy process and the same on a quiet machine.

/// The CPUs the calling thread may run on, in increasing order; empty where
/// this cannot be asked (then nothing is pinned).
pub fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a plain bit set the call fills; its size is passed.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: as above; pid 0 is the calling thread.
        if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
            return Vec::new();
        }
        // SAFETY: reads bits of the set, below its capacity.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Vec::new()
    }
}

/// Which CPU each of `threads` threads is pinned to: thread `i` to the
/// `i`-th of `allowed`, when there are exactly as many threads as CPUs,
/// and more than one (the case measured: every CPU has its worker); `None`
/// otherwise, and the scheduler places them (fewer threads than CPUs
/// would all sit on the first ones, whatever else runs there).
pub fn plan(threads: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    (threads > 1 && threads == allowed.len()).then(|| allowed.to_vec())
}

/// Pins the calling thread to `cpu`; false where that is refused or not
/// possible here.
pub fn pin_current_thread(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: `set` is a plain bit set; `cpu` is below its capacity
        // (checked above); pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_go_one_to_a_cpu_only_when_there_are_enough_cpus() {
        assert_eq!(plan(2, &[0, 1]), Some(vec![0, 1]));
        assert_eq!(plan(2, &[3, 5]), Some(vec![3, 5]));
        assert_eq!(plan(2, &[0, 1, 2]), None, "fewer threads than CPUs");
        assert_eq!(plan(3, &[0, 1]), None, "more threads than CPUs");
        assert_eq!(plan(1, &[0]), None, "one thread");
        assert_eq!(plan(0, &[0, 1]), None);
        assert_eq!(plan(1, &[]), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty(), "sched_getaffinity answered no CPU");
        let last = *allowed.last().expect("checked");
        let seen = std::thread::spawn(move || {
            if !pin_current_thread(last) {
                return None;
            }
            // SAFETY: a plain system call with no arguments.
            Some((allowed_cpus(), unsafe { libc::sched_getcpu() }))
        })
        .join()
        .expect("thread");
        let Some(seen) = seen else {
            // Allowed by the API (a sandbox may refuse): said, not hidden.
            eprintln!("sched_setaffinity was refused here: pinning not checked");
            return;
        };
        assert_eq!(seen.0, vec![last]);
        assert_eq!(seen.1, last as i32);
        // The caller's own set is untouched.
        assert_eq!(allowed_cpus(), allowed);
    }
}
