//! The ordered parallel pipeline shared by pack, verify and unpack.

use crate::error::Result;
use rayon::prelude::*;

/// Most bytes of source data in flight per window.
pub const WINDOW_BYTES: u64 = 4 << 20;

/// Runs `work` on every job in parallel, in windows of at most
/// [`WINDOW_BYTES`] (by `len`), and `commit` on each result strictly in job
/// order. The commit of one window runs while the next window is worked on,
/// so in-order steps (digests, sequential writes) overlap parallel ones.
/// Stops at the first error. At most two windows of results are alive.
pub fn ordered<J, R>(
    jobs: &[J],
    len: impl Fn(&J) -> u64,
    work: impl Fn(&J) -> Result<R> + Sync,
    mut commit: impl FnMut(&J, R) -> Result<()> + Send,
) -> Result<()>
where
    J: Sync,
    R: Send,
{
    let threads = rayon::current_num_threads().max(1);
    let mut windows = Vec::new();
    let mut i = 0;
    while i < jobs.len() {
        let mut j = i;
        let mut bytes = 0;
        while j < jobs.len() && (j == i || (bytes < WINDOW_BYTES && j - i < 8 * threads)) {
            bytes += len(&jobs[j]);
            j += 1;
        }
        windows.push(i..j);
        i = j;
    }
    let mut pending: Option<(std::ops::Range<usize>, Vec<R>)> = None;
    let mut commit_all = |p: Option<(std::ops::Range<usize>, Vec<R>)>| -> Result<()> {
        if let Some((range, outs)) = p {
            for (job, out) in jobs[range].iter().zip(outs) {
                commit(job, out)?;
            }
        }
        Ok(())
    };
    for range in windows {
        let prev = pending.take();
        let (done, committed) = rayon::join(
            || {
                jobs[range.clone()]
                    .par_iter()
                    .map(&work)
                    .collect::<Result<Vec<R>>>()
            },
            || commit_all(prev),
        );
        committed?;
        pending = Some((range, done?));
    }
    commit_all(pending)
}
