//! Flags out of range and text from files: refused or escaped before any
//! work, with the one-line error of every bad input.

use crate::util::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_thread_count_no_machine_needs_is_refused_at_once() {
    let (_d, _src, out) = packed(&mixed_model(3), &[]);
    // Without the bound the thread pool's builder waited forever once a
    // thread failed to start: a child that is still running is a failure.
    let mut child = Command::new(tpde_bin())
        .args(["--threads", "100000", "inspect"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tpde");
    let t = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("tpde --threads 100000 still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("output");
    assert_clean_error(&o, 2, "--threads 100000", "at most 1024");
    // The bound itself is allowed.
    let o = tpde(&[&"--threads", &"2", &"inspect", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_zstd_level_out_of_range_is_refused_before_packing() {
    let d = tmp();
    let src = write(d.path(), "model.safetensors", &mixed_model(4));
    let out = d.path().join("model.tpde");
    for level in ["100", "-2147483648"] {
        let o = tpde(&[&"pack", &src, &"-o", &out, &format!("--zstd-level={level}")]);
        assert_clean_error(
            &o,
            2,
            "model.safetensors",
            &format!("zstd level {level} out of range"),
        );
        assert!(!o.status.success() && !stderr(&o).contains("internal error"));
        assert!(!out.exists());
    }
    assert_eq!(entries(d.path()), ["model.safetensors"]);
}

#[test]
fn inspect_escapes_control_characters_from_the_file() {
    let mut r = Rng(5);
    let name = "w\u{1b}]0;title\u{7}\nfake row";
    let bytes = safetensors(
        &[T::new(name, "F32", &[4, 4], floats("F32", 16, 0.1, &mut r))],
        None,
    );
    let (_d, _src, out) = packed(&bytes, &[]);
    let o = tpde(&[&"inspect", &out, &"--tensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "terminal commands from the file reach the terminal: {text:?}"
    );
    let line = text
        .lines()
        .find(|l| l.contains(r"w\u{1b}]0;title\u{7}\nfake row"))
        .unwrap_or_else(|| panic!("the name, escaped, on one line: {text}"));
    assert!(line.contains("F32"), "{line}");
    // JSON keeps the name as it is (escaped by JSON itself).
    let o = tpde(&[&"inspect", &out, &"--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .any(|t| t["name"] == name));
}

#[test]
fn unpack_refuses_a_symbolic_link_as_destination_before_any_work() {
    let (d, _src, out) = packed(&mixed_model(6), &[]);
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for (name, target) in [("dangling", d.path().join("nowhere")), ("to-empty", empty)] {
        let link = d.path().join(name);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let before = entries(d.path());
        // Named as it is, and with a trailing slash (which would follow it).
        for dest in [link.clone(), d.path().join(format!("{name}/"))] {
            let o = tpde(&[&"unpack", &out, &"-o", &dest]);
            assert_clean_error(&o, 2, name, "symbolic link");
            assert_eq!(entries(d.path()), before, "nothing new next to it");
            assert_eq!(std::fs::read_link(&link).unwrap(), target);
        }
    }
}
