//! Measurements that go with a benchmark run: block-device read counters,
//! resident memory, wall-clock timestamps and a description of the machine
//! and build.
//!
//! Everything here reads Linux `/proc` (and `/etc/os-release`) and never
//! panics on what it reads: a missing or malformed file gives `None`, or
//! "unknown" / `null` in [`environment`]. The parsing is done by pure
//! functions over the file text so that it can be tested on literal samples.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Bytes per sector in `/proc/diskstats` (always 512, whatever the device's
/// own sector size).
const DISKSTATS_SECTOR_BYTES: u64 = 512;

/// Git commit of the workspace at build time, set by `build.rs`.
const GIT_COMMIT: &str = match option_env!("TPDE_GIT_COMMIT") {
    Some(v) => v,
    None => "unknown",
};

/// `rustc --version` at build time, set by `build.rs`.
const RUSTC_VERSION: &str = match option_env!("TPDE_RUSTC_VERSION") {
    Some(v) => v,
    None => "unknown",
};

/// Read counters of one block device, from /proc/diskstats.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiskCounters {
    /// Device name as in /proc/diskstats, e.g. "nvme0n1" or "vda1".
    pub device: String,
    /// Reads completed.
    pub reads: u64,
    /// Bytes read (sectors read × 512).
    pub read_bytes: u64,
    /// Milliseconds spent reading (summed over all reads, so it can exceed
    /// wall time when reads overlap).
    pub read_ms: u64,
}

impl DiskCounters {
    /// Counters accumulated since `earlier` (saturating).
    ///
    /// The device name is `self`'s; a counter that went backwards (device
    /// reset, counter wrap) gives 0 rather than a huge number.
    pub fn since(&self, earlier: &DiskCounters) -> DiskCounters {
        DiskCounters {
            device: self.device.clone(),
            reads: self.reads.saturating_sub(earlier.reads),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            read_ms: self.read_ms.saturating_sub(earlier.read_ms),
        }
    }
}

/// The /proc/diskstats name of the block device holding the file system of
/// `path`.
///
/// `stat(path).st_dev` is split into major:minor and the /proc/diskstats
/// line with the same major:minor is reported, so a file system on a
/// partition maps to the partition itself (e.g. "vda1", not "vda"). `None`
/// when `path` cannot be stat'ed or no block device matches, e.g. on
/// overlay, tmpfs or btrfs (anonymous device numbers).
pub fn disk_of(path: &Path) -> Option<String> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = dev_major_minor(dev);
    let text = std::fs::read_to_string("/proc/diskstats").ok()?;
    parse_diskstats_name(&text, major, minor)
}

/// Current counters of `device` (reads completed = field 4, sectors read =
/// field 6 × 512 bytes, time reading ms = field 7 of /proc/diskstats lines).
///
/// `None` when /proc/diskstats is unreadable, has no line for `device`, or
/// that line is malformed.
pub fn disk_counters(device: &str) -> Option<DiskCounters> {
    let text = std::fs::read_to_string("/proc/diskstats").ok()?;
    parse_diskstats(&text, device)
}

/// Peak resident set size of this process (VmHWM of /proc/self/status), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&text, "VmHWM")
}

/// Current resident set size (VmRSS), bytes.
pub fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&text, "VmRSS")
}

/// A wall-clock time as RFC 3339 UTC with milliseconds, e.g.
/// "2026-11-24T14:05:09.123Z".
///
/// Sub-millisecond digits are truncated (times before 1970 round towards
/// the past, so the printed instant is never later than `t`). Years outside
/// 0000–9999, which RFC 3339 cannot express, are printed with as many
/// digits (and sign) as they need.
pub fn utc_rfc3339(t: SystemTime) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).map_or(i64::MIN, |s| -s);
            match d.subsec_nanos() {
                0 => (secs, 0),
                n => (secs.saturating_sub(1), 1_000_000_000 - n),
            }
        }
    };
    format_rfc3339(secs, nanos / 1_000_000)
}

/// The machine and build a benchmark ran on, as a JSON object.
///
/// Keys (a value that cannot be read is "unknown" for strings and `null`
/// for numbers):
/// - `tpde_version`: this crate's version (CARGO_PKG_VERSION);
/// - `git_commit`: `git rev-parse HEAD` of the workspace at build time, with
///   "-dirty" appended when tracked files had uncommitted changes (or git
///   could not tell); "unknown" without git or a repository;
/// - `rustc`: `rustc --version` at build time;
/// - `build_profile`: "debug" when built with debug assertions, else "release";
/// - `os`: PRETTY_NAME of /etc/os-release (or /usr/lib/os-release);
/// - `kernel`: uname release and machine, e.g. "6.1.0-18-amd64 x86_64";
/// - `cpu_model`: the first "model name" of /proc/cpuinfo;
/// - `cpu_flags`: the first "flags" line of /proc/cpuinfo ("Features" on
///   arm64), as one string;
/// - `logical_cores`: `{"available_parallelism": n, "cpuinfo_processors": m}`,
///   the CPUs this process may use (affinity, cgroup quota) and the
///   "processor" lines of /proc/cpuinfo;
/// - `ram_bytes`: MemTotal of /proc/meminfo;
/// - `last_level_cache_bytes`: [`last_level_cache_bytes`];
/// - `gpu`: `null`, or `{"driver": "550.54.15"}` from
///   /proc/driver/nvidia/version when that file exists;
/// - `hostname`: /proc/sys/kernel/hostname.
pub fn environment() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let or_unknown = |s: Option<String>| s.unwrap_or_else(|| "unknown".to_string());

    let cpuinfo = read("/proc/cpuinfo").map(|t| parse_cpuinfo(&t));
    let os = read("/etc/os-release")
        .or_else(|| read("/usr/lib/os-release"))
        .and_then(|t| parse_os_release(&t));
    let gpu = read("/proc/driver/nvidia/version").map(
        |t| json!({ "driver": parse_nvidia_version(&t).unwrap_or_else(|| "unknown".to_string()) }),
    );
    let hostname = read("/proc/sys/kernel/hostname")
        .map(|t| t.trim().to_string())
        .filter(|h| !h.is_empty());
    let available = std::thread::available_parallelism().ok().map(|n| n.get());

    json!({
        "tpde_version": env!("CARGO_PKG_VERSION"),
        "git_commit": GIT_COMMIT,
        "rustc": RUSTC_VERSION,
        "build_profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "os": or_unknown(os),
        "kernel": or_unknown(kernel()),
        "cpu_model": or_unknown(cpuinfo.as_ref().and_then(|c| c.model.clone())),
        "cpu_flags": or_unknown(cpuinfo.as_ref().and_then(|c| c.flags.clone())),
        "logical_cores": {
            "available_parallelism": available,
            "cpuinfo_processors": cpuinfo.as_ref().and_then(|c| c.processors),
        },
        "ram_bytes": read("/proc/meminfo").and_then(|t| parse_meminfo(&t)),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "gpu": gpu,
        "hostname": or_unknown(hostname),
    })
}

/// Bytes of CPU 0's last-level cache: the largest data or unified cache
/// the kernel lists in /sys/devices/system/cpu/cpu0/cache (its `size`,
/// such as "32768K"); `None` where it lists none.
pub fn last_level_cache_bytes() -> Option<u64> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let p = e.ok()?.path();
        let kind = std::fs::read_to_string(p.join("type")).ok()?;
        if kind.trim() == "Instruction" {
            return None;
        }
        parse_cache_size(&std::fs::read_to_string(p.join("size")).ok()?)
    })
    .max()
}

/// A sysfs cache size ("32K", "1024K", "32M", "512") in bytes.
fn parse_cache_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Splits a Linux `dev_t` into (major, minor), as glibc's `major()` /
/// `minor()` do.
fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// The name on the /proc/diskstats line whose major:minor is `major:minor`.
fn parse_diskstats_name(text: &str, major: u64, minor: u64) -> Option<String> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let ma = fields.next()?.parse::<u64>().ok()?;
        let mi = fields.next()?.parse::<u64>().ok()?;
        let name = fields.next()?;
        (ma == major && mi == minor).then(|| name.to_string())
    })
}

/// Counters of `device` from /proc/diskstats text. Accepts the 14-field
/// (kernel < 4.18), 18-field (discards) and 20-field (flushes) formats: only
/// fields 1–7 are used. `None` when the device has no line or its line has
/// fewer than 7 fields or a non-numeric one among them.
fn parse_diskstats(text: &str, device: &str) -> Option<DiskCounters> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(device))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(DiskCounters {
        device: device.to_string(),
        reads: num(3)?,
        read_bytes: num(5)?.checked_mul(DISKSTATS_SECTOR_BYTES)?,
        read_ms: num(6)?,
    })
}

/// The value of a "`key`:   1234 kB" line (the format of /proc/self/status
/// and /proc/meminfo), in bytes. `None` when the key is absent, the value is
/// not a number, the unit is not "kB", or the bytes overflow u64.
fn parse_status_kib(text: &str, key: &str) -> Option<u64> {
    let value = text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then_some(v)
    })?;
    let mut parts = value.split_whitespace();
    let kib = parts.next()?.parse::<u64>().ok()?;
    if parts.next() != Some("kB") || parts.next().is_some() {
        return None;
    }
    kib.checked_mul(1024)
}

/// MemTotal of /proc/meminfo text, in bytes.
fn parse_meminfo(text: &str) -> Option<u64> {
    parse_status_kib(text, "MemTotal")
}

/// What [`environment`] takes from /proc/cpuinfo.
#[derive(Debug, Default, PartialEq, Eq)]
struct CpuInfo {
    /// First "model name".
    model: Option<String>,
    /// First "flags" (x86) or, failing that, "Features" (arm64).
    flags: Option<String>,
    /// Number of "processor" lines, `None` when there are none.
    processors: Option<usize>,
}

/// Reads "model name", "flags"/"Features" and the "processor" count from
/// /proc/cpuinfo text.
fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    let mut features = None;
    let mut processors = 0usize;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "processor" => processors += 1,
            "model name" if info.model.is_none() => info.model = Some(value.to_string()),
            "flags" if info.flags.is_none() => info.flags = Some(value.to_string()),
            "Features" if features.is_none() => features = Some(value.to_string()),
            _ => {}
        }
    }
    info.flags = info.flags.or(features);
    info.processors = (processors > 0).then_some(processors);
    info
}

/// PRETTY_NAME of os-release text, without its quotes.
fn parse_os_release(text: &str) -> Option<String> {
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("PRETTY_NAME="))?
        .trim();
    let unquoted = ['"', '\'']
        .iter()
        .find_map(|&q| value.strip_prefix(q)?.strip_suffix(q))
        .unwrap_or(value);
    (!unquoted.is_empty()).then(|| unquoted.to_string())
}

/// The driver version in /proc/driver/nvidia/version text: the first
/// dotted number on the "NVRM version:" line (e.g. "550.54.15"), or that
/// whole line when it holds none.
fn parse_nvidia_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("NVRM version:"))?
        .trim();
    let version = line.split_whitespace().find(|w| {
        w.starts_with(|c: char| c.is_ascii_digit())
            && w.contains('.')
            && w.chars().all(|c| c.is_ascii_digit() || c == '.')
    });
    let found = version.unwrap_or(line);
    (!found.is_empty()).then(|| found.to_string())
}

/// "release machine" from uname(2), e.g. "6.1.0-18-amd64 x86_64".
fn kernel() -> Option<String> {
    // SAFETY: `utsname` is plain old data (arrays of c_char), so all-zero is
    // a valid value, and `uname` only writes into the struct we pass.
    let uts = unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut uts) != 0 {
            return None;
        }
        uts
    };
    Some(format!(
        "{} {}",
        c_chars(&uts.release),
        c_chars(&uts.machine)
    ))
}

/// A NUL-terminated (or full-length) C char array as a String, lossily.
fn c_chars(chars: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|c| u8::from_ne_bytes(c.to_ne_bytes()))
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `secs` since the Unix epoch plus `millis` as "YYYY-MM-DDThh:mm:ss.mmmZ".
fn format_rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// (year, month 1–12, day 1–31) of the proleptic Gregorian date `days` days
/// after 1970-01-01 (negative: before). Howard Hinnant's `civil_from_days`,
/// exact for every `days` with |days| ≤ 2^60.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097); // 400-year eras
    let doe = z.rem_euclid(146_097); // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of March-based year, [0, 365]
    let mp = (5 * doy + 2) / 153; // March = 0, [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = yoe + era * 400 + i64::from(m <= 2);
    // `m` and `d` are within 1..=31 by construction.
    (y, m as u32, d as u32)
}

/// Asks the kernel to drop `f`'s pages from the page cache
/// (`posix_fadvise(DONTNEED)`; clean pages only): the next read of it is
/// cold. Advice only; failures are ignored.
pub fn drop_page_cache(f: &std::fs::File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a plain system call on an open descriptor; it only advises the kernel.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Whether every byte of the `(offset, len)` ranges of `f` (opened from
/// `path`) is in the page cache now: `mincore` over a read-only mapping of
/// the file that is never touched (so a file cut short meanwhile cannot
/// fault the process). False when it cannot tell, or a range is past the
/// end of the file.
///
/// Linux (5.0 on) answers `mincore` on a file mapping only to a process
/// that owns the file or may write it; to others it reports every page
/// resident. For such a file this returns false.
pub fn in_page_cache(
    f: &std::fs::File,
    path: &std::path::Path,
    ranges: impl Iterator<Item = (u64, u64)>,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let Ok(meta) = f.metadata() else {
        return false;
    };
    let len = meta.len();
    if !mincore_answers(meta.uid(), path) {
        return false;
    }
    // SAFETY: `sysconf` reads a constant.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => return false,
    };
    let ranges: Vec<(u64, u64)> = ranges.filter(|&(_, n)| n > 0).collect();
    if ranges.is_empty() {
        return true;
    }
    let (Ok(map_len), true) = (usize::try_from(len), len > 0) else {
        return false;
    };
    // SAFETY: a new shared read-only mapping of an open file; its pages are
    // never read or written here, only asked about, and it is unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return false;
    }
    let mut pages = Vec::new();
    let mut all = true;
    for (offset, n) in ranges {
        let Some(end) = offset.checked_add(n).filter(|&e| e <= len) else {
            all = false;
            break;
        };
        let a = offset - offset % page;
        let b = end.div_ceil(page) * page;
        pages.resize(((b - a) / page) as usize, 0u8);
        // SAFETY: `[a, b)` lies inside the mapping (which covers the file's
        // last page whole), and `pages` has one byte per page of it.
        let r = unsafe {
            libc::mincore(
                map.cast::<u8>().add(a as usize).cast(),
                (b - a) as usize,
                pages.as_mut_ptr(),
            )
        };
        if r != 0 || pages.iter().any(|p| p & 1 == 0) {
            all = false;
            break;
        }
    }
    // SAFETY: the mapping made above, with its length.
    unsafe {
        libc::munmap(map, map_len);
    }
    all
}

/// Whether the kernel tells this process the truth about the page cache of
/// the file at `path`, owned by `uid` (its `can_do_mincore`: the owner, a
/// process with the capability to act as one, or one that may write it).
fn mincore_answers(uid: u32, path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: `geteuid` reads the process's credentials.
    let euid = unsafe { libc::geteuid() };
    if euid == uid || euid == 0 {
        return true;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path; the call only checks permissions.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn page_cache_residency_of_ranges() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::File::create(&path)
            .and_then(|mut f| {
                f.write_all(&vec![7u8; 3 * 4096 + 100])?;
                f.sync_all()
            })
            .unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let cached =
            |f: &std::fs::File, r: &[(u64, u64)]| in_page_cache(f, &path, r.iter().copied());
        // Read through once: its pages are cached.
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        let len = all.len() as u64;
        assert!(cached(&f, &[(0, len)]));
        assert!(cached(&f, &[(4000, 200), (len - 1, 1)]));
        assert!(cached(&f, &[]));
        assert!(cached(&f, &[(len, 0)]), "empty ranges");
        assert!(!cached(&f, &[(0, len + 1)]), "past the end");
        assert!(!cached(&f, &[(u64::MAX, 2)]), "overflow");
        let empty_path = dir.path().join("empty");
        let empty = std::fs::File::create(&empty_path).unwrap();
        assert!(in_page_cache(&empty, &empty_path, std::iter::empty()));
        assert!(!in_page_cache(&empty, &empty_path, [(0, 1)].into_iter()));
        // Dropped from the cache (clean pages after the fsync): not resident.
        drop_page_cache(&f);
        let c = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        // SAFETY: `statfs` fills a zeroed struct from a NUL-terminated path.
        #[allow(clippy::unnecessary_cast)] // (the field's type varies by target)
        let tmpfs = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == libc::TMPFS_MAGIC as i64
        };
        if tmpfs {
            eprintln!(
                "note: {} is on tmpfs, whose pages cannot be dropped; the uncached case is not checked",
                dir.path().display()
            );
        } else {
            assert!(!cached(&f, &[(0, len)]), "dropped pages are not resident");
        }
        // The kernel answers for our own file; for another owner's file we
        // may not write (root's /etc/passwd) it would claim every page, so
        // the probe does not ask. Root may do both: nothing to check then.
        // SAFETY: `geteuid` reads the process's credentials.
        let euid = unsafe { libc::geteuid() };
        assert!(mincore_answers(euid, &path));
        if euid == 0 {
            eprintln!(
                "note: running as root, for whom the kernel answers for every file; \
                 another owner's file is not checked"
            );
        } else {
            assert!(!mincore_answers(0, std::path::Path::new("/etc/passwd")));
        }
    }

    /// /proc/diskstats with the 20-field (5.5+), 18-field (4.18+) and
    /// 14-field (older) formats, and some malformed lines.
    const DISKSTATS: &str = "\
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 1248326 60205 409100122 2360166 173212 136496 246709680 990217 0 264128 3390588 142465 154 221138912 39305 10008 899
 254       1 vda1 1247000 60000 409000000 2360000 173000 136000 246000000 990000 0 264000 3390000 142000 150 221000000 39000
 259       0 nvme0n1 52311 1024 8388608 4096 10 0 80 3 0 900 4100
 259       1 nvme0n1p1 x y z
 253
 not a line at all

 254      16 vdb 1 2
";

    #[test]
    fn diskstats_counters_all_formats() {
        assert_eq!(
            parse_diskstats(DISKSTATS, "vda"),
            Some(DiskCounters {
                device: "vda".into(),
                reads: 1_248_326,
                read_bytes: 409_100_122 * 512,
                read_ms: 2_360_166,
            })
        );
        assert_eq!(
            parse_diskstats(DISKSTATS, "vda1"),
            Some(DiskCounters {
                device: "vda1".into(),
                reads: 1_247_000,
                read_bytes: 409_000_000 * 512,
                read_ms: 2_360_000,
            })
        );
        assert_eq!(
            parse_diskstats(DISKSTATS, "nvme0n1"),
            Some(DiskCounters {
                device: "nvme0n1".into(),
                reads: 52_311,
                read_bytes: 8_388_608 * 512,
                read_ms: 4096,
            })
        );
        assert_eq!(
            parse_diskstats(DISKSTATS, "loop0").map(|c| c.read_bytes),
            Some(0)
        );
    }

    #[test]
    fn diskstats_malformed_gives_none() {
        assert_eq!(parse_diskstats(DISKSTATS, "nvme0n1p1"), None); // non-numeric
        assert_eq!(parse_diskstats(DISKSTATS, "vdb"), None); // too few fields
        assert_eq!(parse_diskstats(DISKSTATS, "sda"), None); // absent
        assert_eq!(parse_diskstats("", "vda"), None);
        let huge = format!("8 0 sda 1 0 {} 5", u64::MAX);
        assert_eq!(parse_diskstats(&huge, "sda"), None); // bytes overflow
    }

    #[test]
    fn diskstats_name_by_major_minor() {
        assert_eq!(parse_diskstats_name(DISKSTATS, 254, 0), Some("vda".into()));
        assert_eq!(parse_diskstats_name(DISKSTATS, 254, 1), Some("vda1".into()));
        assert_eq!(
            parse_diskstats_name(DISKSTATS, 259, 0),
            Some("nvme0n1".into())
        );
        assert_eq!(parse_diskstats_name(DISKSTATS, 0, 35), None); // overlay
        assert_eq!(parse_diskstats_name("garbage\n1\n", 1, 0), None);
    }

    #[test]
    fn dev_t_split() {
        assert_eq!(dev_major_minor(0xfe00), (254, 0));
        assert_eq!(dev_major_minor(0x10301), (259, 1));
        // minor 256 on major 8: the minor's high bits live above bit 20.
        assert_eq!(dev_major_minor(0x0800 | (0x100 << 12)), (8, 256));
        // major 4096: its high bits live above bit 32.
        assert_eq!(dev_major_minor(0x1000 << 32), (4096, 0));
    }

    #[test]
    fn since_saturates() {
        let later = DiskCounters {
            device: "nvme0n1".into(),
            reads: 10,
            read_bytes: 4096,
            read_ms: 7,
        };
        let earlier = DiskCounters {
            device: "nvme0n1".into(),
            reads: 4,
            read_bytes: 8192,
            read_ms: 7,
        };
        assert_eq!(
            later.since(&earlier),
            DiskCounters {
                device: "nvme0n1".into(),
                reads: 6,
                read_bytes: 0,
                read_ms: 0,
            }
        );
    }

    const STATUS: &str = "\
Name:\ttelemetry-test
Umask:\t0022
State:\tR (running)
VmPeak:\t   12345 kB
VmHWM:\t    1956 kB
VmRSS:\t    1800 kB
VmRSSx:\t   99 kB
Threads:\t1
VmBad:\t   12 MB
VmEmpty:
VmJunk:\t abc kB
";

    #[test]
    fn status_kib() {
        assert_eq!(parse_status_kib(STATUS, "VmHWM"), Some(1956 * 1024));
        assert_eq!(parse_status_kib(STATUS, "VmRSS"), Some(1800 * 1024));
        assert_eq!(parse_status_kib(STATUS, "Threads"), None); // no unit
        assert_eq!(parse_status_kib(STATUS, "VmBad"), None); // wrong unit
        assert_eq!(parse_status_kib(STATUS, "VmEmpty"), None);
        assert_eq!(parse_status_kib(STATUS, "VmJunk"), None);
        assert_eq!(parse_status_kib(STATUS, "VmSwap"), None);
        assert_eq!(parse_status_kib("", "VmHWM"), None);
        let huge = format!("VmHWM: {} kB", u64::MAX);
        assert_eq!(parse_status_kib(&huge, "VmHWM"), None);
    }

    #[test]
    fn cache_sizes() {
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("1024K"), Some(1 << 20));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        for bad in ["", "K", "12Q", "-4K", "99999999999999999999G"] {
            assert_eq!(parse_cache_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn meminfo_total() {
        let text = "MemTotal:       16318412 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo(text), Some(16_318_412 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn cpuinfo_fields() {
        let x86 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu vme sse2 avx2\n\n\
                   processor\t: 1\nmodel name\t: other\nflags\t\t: other\n";
        assert_eq!(
            parse_cpuinfo(x86),
            CpuInfo {
                model: Some("Intel(R) Xeon(R) Processor".into()),
                flags: Some("fpu vme sse2 avx2".into()),
                processors: Some(2),
            }
        );
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm\n";
        assert_eq!(
            parse_cpuinfo(arm),
            CpuInfo {
                model: None,
                flags: Some("fp asimd evtstrm".into()),
                processors: Some(1),
            }
        );
        assert_eq!(parse_cpuinfo("::\nno colon\n"), CpuInfo::default());
    }

    #[test]
    fn os_release_pretty_name() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            parse_os_release(text),
            Some("Debian GNU/Linux 12 (bookworm)".into())
        );
        assert_eq!(
            parse_os_release("PRETTY_NAME='Alpine'\n"),
            Some("Alpine".into())
        );
        assert_eq!(
            parse_os_release("PRETTY_NAME=Plain\n"),
            Some("Plain".into())
        );
        assert_eq!(parse_os_release("PRETTY_NAME=\"\"\n"), None);
        assert_eq!(parse_os_release("PRETTY_NAME=\"\n"), Some("\"".into()));
        assert_eq!(parse_os_release("NAME=x\n"), None);
    }

    #[test]
    fn nvidia_driver_version() {
        let proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n\
                           GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n";
        assert_eq!(parse_nvidia_version(proprietary), Some("535.104.05".into()));
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder@U16)  Tue Mar  5 22:23:56 UTC 2024\n";
        assert_eq!(parse_nvidia_version(open), Some("550.54.15".into()));
        assert_eq!(
            parse_nvidia_version("NVRM version: something new\n"),
            Some("something new".into())
        );
        assert_eq!(parse_nvidia_version("NVRM version:\n"), None);
        assert_eq!(parse_nvidia_version(""), None);
    }

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(utc_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_rfc3339(at(951_825_600, 0)), "2000-02-29T12:00:00.000Z");
        assert_eq!(
            utc_rfc3339(at(1_795_529_109, 123)),
            "2026-11-24T14:05:09.123Z"
        );
        // 2100 is not a leap year; 2400 is.
        assert_eq!(
            utc_rfc3339(at(4_107_542_400, 0)),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            utc_rfc3339(at(13_574_649_599, 999)),
            "2400-02-29T23:59:59.999Z"
        );
        // Sub-millisecond digits are truncated.
        assert_eq!(
            utc_rfc3339(UNIX_EPOCH + Duration::from_nanos(1_999_999)),
            "1970-01-01T00:00:00.001Z"
        );
    }

    #[test]
    fn rfc3339_before_epoch() {
        assert_eq!(
            utc_rfc3339(UNIX_EPOCH - Duration::from_millis(500)),
            "1969-12-31T23:59:59.500Z"
        );
        assert_eq!(
            utc_rfc3339(UNIX_EPOCH - Duration::from_secs(2_208_988_800)),
            "1900-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn civil_from_days_walks_the_calendar() {
        // Day by day from 1600-01-01 to 2500-12-31 (day 193943) against the
        // leap rules.
        let is_leap = |y: i64| y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
        let month_len = |y: i64, m: u32| match m {
            2 if is_leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let start = -135_140; // 1600-01-01
        assert_eq!(civil_from_days(start), (1600, 1, 1));
        let mut expected = (1600i64, 1u32, 1u32);
        for days in start..=193_943 {
            assert_eq!(civil_from_days(days), expected, "day {days}");
            let (y, m, d) = expected;
            expected = if d < month_len(y, m) {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
        assert_eq!(expected, (2501, 1, 1));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn this_machine() {
        if let Some(dev) = disk_of(Path::new("/")) {
            let text = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
            assert!(
                text.lines()
                    .any(|l| l.split_whitespace().nth(2) == Some(dev.as_str())),
                "{dev} not in /proc/diskstats"
            );
            assert!(disk_counters(&dev).is_some(), "no counters for {dev}");
        }
        assert_eq!(disk_of(Path::new("/no/such/path")), None);

        let rss = rss_bytes().expect("VmRSS");
        let peak = peak_rss_bytes().expect("VmHWM");
        assert!(peak >= rss.saturating_sub(1 << 20), "peak {peak} rss {rss}");

        let env = environment();
        let obj = env.as_object().expect("environment() is an object");
        for key in [
            "tpde_version",
            "git_commit",
            "rustc",
            "build_profile",
            "os",
            "kernel",
            "cpu_model",
            "cpu_flags",
            "logical_cores",
            "ram_bytes",
            "last_level_cache_bytes",
            "gpu",
            "hostname",
        ] {
            assert!(obj.contains_key(key), "environment() lacks {key}: {env}");
        }
        assert_eq!(obj.len(), 13, "{env}");
        assert!(env["logical_cores"]["available_parallelism"].is_u64());
        assert!(env["git_commit"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(env["rustc"].as_str().is_some_and(|s| !s.is_empty()));
    }
}
