//! Faults: a pack killed at any moment, a full disk, destinations that must
//! not be touched, inputs that must stay read-only.

use crate::util::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

/// A model big enough that packing takes a noticeable time.
fn big_model(dir: &std::path::Path) -> std::path::PathBuf {
    let mut r = Rng(5);
    let mut tensors = Vec::new();
    for l in 0..24 {
        let data = floats("BF16", 1024 * 1024, 0.02, &mut r);
        tensors.push(T::new(
            &format!("model.layers.{l}.mlp.up_proj.weight"),
            "BF16",
            &[1024, 1024],
            data,
        ));
    }
    write(dir, "model.safetensors", &safetensors(&tensors, None))
}

#[test]
fn a_pack_killed_at_any_moment_leaves_nothing_or_the_previous_file() {
    let d = tmp();
    let src = big_model(d.path());
    let out = d.path().join("m.tpde");
    // How long does a whole pack take here?
    let t = Instant::now();
    let o = tpde(&[&"--threads", &"1", &"pack", &src, &"-o", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let full = t.elapsed();
    let previous = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();

    let mut rng = Rng(17);
    for round in 0..8 {
        let had_previous = round % 2 == 1;
        if had_previous {
            std::fs::write(&out, &previous).unwrap();
        }
        let mut child = Command::new(tpde_bin())
            .args(["--threads", "1", "pack"])
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let at = full.mul_f64(0.05 + 0.9 * (rng.below(1000) as f64 / 1000.0));
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if had_previous {
            assert_eq!(
                std::fs::read(&out).unwrap(),
                previous,
                "round {round}: previous file damaged"
            );
        } else if status.success() {
            // Finished before the kill: then it must be whole.
            let v = tpde(&[&"verify", &out]);
            assert!(v.status.success(), "round {round}");
            std::fs::remove_file(&out).unwrap();
        } else {
            assert!(
                !out.exists(),
                "round {round}: killed after {at:?} but a container exists"
            );
        }
        // Only the temporary file may be left behind, never a half container
        // under the destination name.
        for e in entries(d.path()) {
            assert!(
                e == "model.safetensors"
                    || e == "m.tpde"
                    || e.contains(tpde_pack::atomic::TMP_MARKER),
                "unexpected {e}"
            );
        }
        if out.exists() {
            std::fs::remove_file(&out).unwrap();
        }
    }
}

/// Runs tpde with a file-size limit, so writes past it fail like a full disk.
fn with_fsize_limit(args: &[&std::ffi::OsStr], limit: u64) -> std::process::Output {
    let mut c = Command::new(tpde_bin());
    c.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

#[test]
fn a_full_disk_during_pack_and_unpack_is_a_clean_error_with_no_output() {
    let (d, src, out) = packed(&mixed_model(31), &[]);
    let out2 = d.path().join("full.tpde");
    let o = with_fsize_limit(
        &[
            "pack".as_ref(),
            src.as_os_str(),
            "-o".as_ref(),
            out2.as_os_str(),
        ],
        20_000,
    );
    assert_clean_error(&o, 2, "cannot write", "File too large");
    assert!(!out2.exists());
    let restored = d.path().join("restored");
    let o = with_fsize_limit(
        &[
            "unpack".as_ref(),
            out.as_os_str(),
            "-o".as_ref(),
            restored.as_os_str(),
        ],
        20_000,
    );
    assert_clean_error(&o, 2, "model.safetensors", "File too large");
    assert!(!restored.exists());
    assert_eq!(
        entries(d.path()),
        vec!["model.safetensors", "model.tpde"],
        "no temporaries left"
    );
}

#[test]
fn inputs_are_never_modified() {
    let d = tmp();
    let src = write(d.path(), "model.safetensors", &mixed_model(41));
    let before = (
        std::fs::read(&src).unwrap(),
        std::fs::metadata(&src).unwrap().modified().unwrap(),
    );
    // Read-only permissions: pack must still work (it only reads).
    let mut perm = std::fs::metadata(&src).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&src, perm).unwrap();
    let out = d.path().join("m.tpde");
    let o = tpde(&[&"pack", &src, &"-o", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tpde(&[&"verify", &out, &"--source", &src]);
    assert!(o.status.success());
    assert_eq!(std::fs::read(&src).unwrap(), before.0);
    assert_eq!(
        std::fs::metadata(&src).unwrap().modified().unwrap(),
        before.1
    );
}

#[test]
fn unpack_refuses_a_non_empty_destination_and_the_container_itself_as_output() {
    let (d, src, out) = packed(&mixed_model(51), &[]);
    let busy = d.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), b"mine").unwrap();
    let o = tpde(&[&"unpack", &out, &"-o", &busy]);
    assert_clean_error(&o, 2, "busy", "not empty");
    assert_eq!(entries(&busy), vec!["keep.txt"]);
    // An existing empty folder is fine.
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = tpde(&[&"unpack", &out, &"-o", &empty]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha256(&empty.join("model.safetensors")), sha256(&src));
    // Packing onto the source is refused, and the source survives.
    let before = std::fs::read(&src).unwrap();
    let o = tpde(&[&"pack", &src, &"-o", &src]);
    assert_clean_error(&o, 2, "model.safetensors", "one of the inputs");
    assert_eq!(std::fs::read(&src).unwrap(), before);
}

#[test]
fn a_container_truncated_while_verify_reads_it_is_an_error_not_a_crash() {
    let d = tmp();
    let src = big_model(d.path());
    let out = d.path().join("m.tpde");
    let o = tpde(&[&"pack", &src, &"-o", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let full = std::fs::metadata(&out).unwrap().len();
    let mut rng = Rng(23);
    let mut caught = 0;
    for round in 0..4 {
        let copy = d.path().join(format!("c{round}.tpde"));
        std::fs::copy(&out, &copy).unwrap();
        let child = Command::new(tpde_bin())
            .args(["--threads", "1", "verify"])
            .arg(&copy)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Single-threaded verify of 48 MiB takes about 0.1 s here: cut early.
        std::thread::sleep(std::time::Duration::from_millis(2 + rng.below(15)));
        // Cut the data in half under the reader's feet.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            // On a page boundary: a read racing with a cut inside a page
            // could copy that page's zeroed tail (a mismatch, exit 1).
            .set_len((full / 2) & !4095)
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "round {round}: {err}");
        if !o.status.success() {
            // A read that fails is an I/O error (2), not a mismatch (1):
            // nothing was compared. Also 2 when the cut lands before the
            // container is even opened (its footer is gone).
            assert_eq!(o.status.code(), Some(2), "round {round}: {err}");
            assert!(
                err.starts_with("tpde: error: ") && err.trim_end().lines().count() == 1,
                "{err}"
            );
            caught += 1;
        }
    }
    assert!(
        caught > 0,
        "verify always finished before the truncation: the test proved nothing"
    );
}

/// Runs `tpde` with `args`, failing the test if it has not ended after 30 s
/// (opening a FIFO waits for a writer: a reader that does would hang here).
fn tpde_within_30s(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut child = Command::new(tpde_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= 30 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tpde {args:?} still running after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(p: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a plain system call with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

#[test]
fn a_fifo_is_refused_as_container_source_or_destination_without_blocking() {
    let (d, src, out) = packed(&moe_model(61), &[]);
    let fifo = d.path().join("fifo.tpde");
    mkfifo(&fifo);
    let f = fifo.as_os_str();
    let x = d.path().join("x.safetensors");
    let un = d.path().join("un");
    for args in [
        vec!["inspect".as_ref(), f],
        vec!["verify".as_ref(), f],
        vec!["unpack".as_ref(), f, "-o".as_ref(), un.as_os_str()],
        vec![
            "bench".as_ref(),
            f,
            "--stream-only".as_ref(),
            "--reps".as_ref(),
            "1".as_ref(),
        ],
        vec![
            "extract".as_ref(),
            f,
            "--layer".as_ref(),
            "0".as_ref(),
            "--expert".as_ref(),
            "0".as_ref(),
            "-o".as_ref(),
            x.as_os_str(),
        ],
        vec![
            "run".as_ref(),
            f,
            "-p".as_ref(),
            "hi".as_ref(),
            "-n".as_ref(),
            "1".as_ref(),
        ],
        // As the source to compare with.
        vec!["verify".as_ref(), out.as_os_str(), "--source".as_ref(), f],
    ] {
        let o = tpde_within_30s(&args);
        assert_clean_error(&o, 2, "fifo.tpde", "not a regular file (a FIFO)");
    }
    // As a destination: refused, and still a FIFO afterwards.
    let dest = d.path().join("out.fifo");
    mkfifo(&dest);
    let o = tpde_within_30s(&[
        "pack".as_ref(),
        src.as_os_str(),
        "-o".as_ref(),
        dest.as_os_str(),
    ]);
    assert_clean_error(&o, 2, "out.fifo", "not a regular file");
    let o = tpde_within_30s(&[
        "extract".as_ref(),
        out.as_os_str(),
        "--layer".as_ref(),
        "0".as_ref(),
        "--expert".as_ref(),
        "0".as_ref(),
        "-o".as_ref(),
        dest.as_os_str(),
    ]);
    assert_clean_error(&o, 2, "out.fifo", "not a regular file");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&dest).unwrap().file_type().is_fifo());
    // A folder as a file destination is refused before any work.
    let o = tpde(&[&"pack", &src, &"-o", &d.path()]);
    assert_clean_error(&o, 2, "", "destination is a folder");
    assert!(!entries(d.path()).iter().any(|e| e.contains(".tpde-tmp-")));
}

#[test]
fn extract_refuses_to_write_over_its_own_container() {
    let (d, _src, out) = packed(&moe_model(62), &[]);
    let before = std::fs::read(&out).unwrap();
    let hard = d.path().join("hard.tpde");
    std::fs::hard_link(&out, &hard).unwrap();
    let sym = d.path().join("sym.tpde");
    std::os::unix::fs::symlink(&out, &sym).unwrap();
    for dest in [&out, &hard, &sym] {
        let o = tpde(&[
            &"extract",
            &out,
            &"--layer",
            &"0",
            &"--expert",
            &"0",
            &"-o",
            dest,
        ]);
        let name = dest.file_name().unwrap().to_str().unwrap();
        assert_clean_error(&o, 2, name, "destination is one of the inputs");
        assert_eq!(std::fs::read(&out).unwrap(), before, "{name}");
    }
}

#[test]
fn argument_errors_are_one_line_with_the_usage_and_exit_code_2() {
    for (args, phrase) in [
        (
            vec!["verify"],
            "required arguments were not provided: <CONTAINER> (usage: tpde verify",
        ),
        (vec!["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (
            vec!["bench", "x.tpde", "--reps", "abc"],
            "invalid value 'abc' for '--reps <REPS>'",
        ),
        (
            vec!["bench", "x.tpde", "--ram", "12XB"],
            "unknown size unit",
        ),
        (
            vec![
                "extract",
                "x.tpde",
                "--layer",
                "1099511627776",
                "--expert",
                "0",
                "-o",
                "y",
            ],
            "1099511627776 is not in 0..=4294967295",
        ),
        (
            vec!["pack", "a", "-o", "b", "--force"],
            "unexpected argument '--force' found",
        ),
    ] {
        let a: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|x| x as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        let o = tpde(&a);
        assert_clean_error(&o, 2, "", phrase);
    }
    // Help and version are not errors.
    for flag in ["--help", "--version"] {
        let o = tpde(&[&flag]);
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        assert!(!o.stdout.is_empty(), "{flag}");
    }
}

#[test]
fn a_fifo_inside_a_source_folder_is_left_out_with_a_warning() {
    let d = tmp();
    let folder = d.path().join("model");
    std::fs::create_dir(&folder).unwrap();
    write(&folder, "model.safetensors", &mixed_model(62));
    mkfifo(&folder.join("pipe"));
    let out = d.path().join("m.tpde");
    let o = tpde(&[&"pack", &folder, &"-o", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.lines().any(|l| l.starts_with("tpde: warning: ")
            && l.contains("pipe is a FIFO, not a file: left out")),
        "{err}"
    );
    let un = d.path().join("un");
    let o = tpde(&[&"unpack", &out, &"-o", &un]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(entries(&un), ["model.safetensors"]);
}
