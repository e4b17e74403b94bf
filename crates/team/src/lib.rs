//! A fixed team of threads for short parallel jobs: the engine's forward
//! pass, and the fetch of one expert from its shard (`tpde_pack`).
//!
//! A token's forward pass is a few hundred short parallel loops (one per
//! matrix product, tens of microseconds each). A work-stealing pool puts
//! its idle workers to sleep between them, and waking a sleeping thread
//! costs up to half a millisecond on a virtual machine: `perf` showed a
//! quarter of the time in the scheduler. The team's helpers instead spin
//! for a short while after each job (then yield, then sleep), so that the
//! next job starts at once; and each job is split statically, one part per
//! member, which suits products whose rows all cost the same.

pub mod affinity;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A job: called once per member with (member, members).
type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Incremented for each job; helpers run the job when it changes.
    epoch: AtomicU64,
    /// The current job (valid while `pending > 0` or the caller runs it).
    job: Mutex<Option<JobPtr>>,
    /// Helpers that have not finished the current job.
    pending: AtomicUsize,
    /// A helper's job panicked.
    panicked: AtomicBool,
    /// Helpers asleep, and their wake-up.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    /// Nanoseconds of spinning, and of spinning and yielding, before sleep.
    spin_ns: AtomicU64,
    idle_ns: AtomicU64,
}

/// A job reference with its lifetime erased: [`Team::run`] does not return
/// before every helper is done with it.
#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync`, and outlives every use (see `Team::run`).
unsafe impl Send for JobPtr {}

/// By default, helpers spin this long after a job, then yield this long,
/// then sleep ([`Team::set_patience`]).
const SPIN: Duration = Duration::from_micros(100);
const YIELD: Duration = Duration::from_millis(2);

pub struct Team {
    shared: Arc<Shared>,
    members: usize,
    /// One job at a time (a second caller waits).
    running: Mutex<()>,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

impl Team {
    /// A team of `members` threads: the caller of [`Team::run`] and
    /// `members - 1` helpers.
    pub fn new(members: usize) -> Team {
        let members = members.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            spin_ns: AtomicU64::new(SPIN.as_nanos() as u64),
            idle_ns: AtomicU64::new((SPIN + YIELD).as_nanos() as u64),
        });
        let helpers = (1..members)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tpde-team-{i}"))
                    .spawn(move || helper(&s, i, members))
                    .expect("spawn a team thread")
            })
            .collect();
        Team {
            shared,
            members,
            running: Mutex::new(()),
            helpers,
        }
    }

    /// The team shared by the engine: as many members as the rayon pool
    /// has threads (`tpde --threads`).
    pub fn global() -> &'static Team {
        static T: OnceLock<Team> = OnceLock::new();
        T.get_or_init(|| Team::new(rayon::current_num_threads()))
    }

    pub fn members(&self) -> usize {
        self.members
    }

    /// How long helpers spin, then spin or yield, after a job before they
    /// sleep. A runtime whose jobs come between disk reads (layers
    /// streamed per token) spins less, leaving the cores to the loader.
    pub fn set_patience(&self, spin: Duration, yield_too: Duration) {
        self.shared.spin_ns.store(spin.as_nanos() as u64, Relaxed);
        self.shared
            .idle_ns
            .store((spin + yield_too).as_nanos() as u64, Relaxed);
    }

    /// Calls `f(member, members)` once on each member, the caller being
    /// member 0, and returns when all are done. A panic in any of them is
    /// raised here. Jobs do not nest: `f` must not call `run` (a second
    /// caller waits for the first job to end).
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.members == 1 {
            f(0, 1);
            return;
        }
        let _one = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased; this function waits below
        // until `pending` is 0, after which no helper touches the job.
        let ptr = JobPtr(unsafe {
            std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(f)
        });
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(ptr);
        s.pending.store(self.members - 1, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, self.members)));
        let mut spins = 0u32;
        while s.pending.load(Acquire) > 0 {
            backoff(&mut spins);
        }
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a team thread panicked");
        }
    }
}

/// One step of waiting for another thread: a pause for the first spins,
/// then a yield of the processor. A waiter that only spins keeps the
/// thread it waits for off its processor when the scheduler put both on
/// one (a thread woken from a disk read, say): that one then waits for the
/// spinner's time slice to end, a whole tick (4 ms on this project's
/// machines, against a fetch of a millisecond).
pub fn backoff(spins: &mut u32) {
    const SPINS: u32 = 1 << 10;
    if *spins < SPINS {
        *spins += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn helper(s: &Shared, me: usize, members: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for the next job: spin, then yield, then sleep.
        let t = Instant::now();
        let mut k = 0u32;
        loop {
            if s.stop.load(Relaxed) {
                return;
            }
            let e = s.epoch.load(Acquire);
            if e != seen {
                seen = e;
                break;
            }
            k = k.wrapping_add(1);
            if k.is_multiple_of(64) {
                let idle = t.elapsed().as_nanos() as u64;
                if idle > s.idle_ns.load(Relaxed) {
                    let g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
                    s.sleepers.fetch_add(1, SeqCst);
                    if s.epoch.load(SeqCst) == seen && !s.stop.load(SeqCst) {
                        drop(s.wake.wait(g).unwrap_or_else(|p| p.into_inner()));
                    }
                    s.sleepers.fetch_sub(1, SeqCst);
                    continue;
                } else if idle > s.spin_ns.load(Relaxed) {
                    std::thread::yield_now();
                    continue;
                }
            }
            std::hint::spin_loop();
        }
        let job = *s.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(JobPtr(f)) = job {
            // SAFETY: `Team::run` keeps the job alive until `pending` is 0.
            let f = unsafe { &*f };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(me, members))).is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.pending.fetch_sub(1, Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// The part `[a, b)` of `0..len` that member `i` of `n` takes, in whole
/// multiples of `align` (the last part takes the rest).
pub fn part(len: usize, i: usize, n: usize, align: usize) -> (usize, usize) {
    let units = len.div_ceil(align);
    let a = (units * i / n * align).min(len);
    let b = (units * (i + 1) / n * align).min(len);
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_runs_each_job_once() {
        for members in [1, 2, 3, 5] {
            let team = Team::new(members);
            for round in 0..200u64 {
                let hits: Vec<AtomicU64> = (0..members).map(|_| AtomicU64::new(0)).collect();
                team.run(&|i, n| {
                    assert_eq!(n, members);
                    hits[i].fetch_add(round + 1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == round + 1));
            }
        }
    }

    #[test]
    fn a_sleeping_team_wakes_for_the_next_job() {
        let team = Team::new(2);
        let sum = AtomicU64::new(0);
        team.run(&|i, _| {
            sum.fetch_add(i as u64 + 1, Relaxed);
        });
        std::thread::sleep(SPIN + YIELD + Duration::from_millis(20));
        team.run(&|i, _| {
            sum.fetch_add(i as u64 + 1, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 6);
    }

    #[test]
    fn a_panic_in_a_helper_reaches_the_caller() {
        let team = Team::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The team still works.
        let n = AtomicU64::new(0);
        team.run(&|_, _| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 2);
    }

    #[test]
    fn parts_cover_the_range_in_aligned_pieces() {
        for len in [0, 1, 7, 64, 100, 1000] {
            for n in 1..6 {
                let mut at = 0;
                for i in 0..n {
                    let (a, b) = part(len, i, n, 4);
                    assert_eq!(a, at);
                    assert!(b >= a && (b == len || b % 4 == 0));
                    at = b;
                }
                assert_eq!(at, len);
            }
        }
    }
}
