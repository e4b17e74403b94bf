//! Records the build's provenance for `telemetry::environment()`:
//!
//! - `TPDE_GIT_COMMIT`: `git rev-parse HEAD` of the repository holding this
//!   crate, with "-dirty" appended when `git status --porcelain
//!   --untracked-files=no` lists changes (or fails, so "clean" is only
//!   claimed when git confirmed it); "unknown" without git or a repository.
//! - `TPDE_RUSTC_VERSION`: `$RUSTC --version`, "unknown" if that fails.
//!
//! Never fails the build. Reruns when build.rs, `.git/HEAD`, `.git/index`,
//! the branch HEAD points to, or `packed-refs` change (those that exist).
//! Editing a tracked file without touching the index does not rerun it, so
//! the "-dirty" mark can lag until the next commit, `git add` or checkout.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");

    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let root = manifest_dir.as_deref().and_then(repo_root);
    if let Some(root) = &root {
        for path in watched_git_files(root) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    let commit = root.as_deref().and_then(git_commit);
    println!(
        "cargo:rustc-env=TPDE_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );

    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let version = run(Command::new(rustc).arg("--version"));
    println!(
        "cargo:rustc-env=TPDE_RUSTC_VERSION={}",
        version.as_deref().unwrap_or("unknown")
    );
}

/// The nearest directory at or above `dir` that holds a `.git` (a directory,
/// or a file as in worktrees and submodules).
fn repo_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| d.join(".git").exists())
        .map(Path::to_path_buf)
}

/// Existing files whose change means HEAD or the work tree's state moved:
/// HEAD, index, the ref HEAD points to, packed-refs.
fn watched_git_files(root: &Path) -> Vec<PathBuf> {
    let dot_git = root.join(".git");
    // A `.git` file reads "gitdir: <path>" (worktrees, submodules).
    let git_dir = if dot_git.is_file() {
        match std::fs::read_to_string(&dot_git) {
            Ok(text) => match text.trim().strip_prefix("gitdir:") {
                Some(p) => root.join(p.trim()),
                None => return Vec::new(),
            },
            Err(_) => return Vec::new(),
        }
    } else {
        dot_git
    };
    // Refs live in the common directory when `git_dir` is a worktree's.
    let common_dir = std::fs::read_to_string(git_dir.join("commondir"))
        .map(|p| git_dir.join(p.trim()))
        .unwrap_or_else(|_| git_dir.clone());

    let mut files = vec![git_dir.join("HEAD"), git_dir.join("index")];
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD")) {
        if let Some(r) = head.trim().strip_prefix("ref:") {
            files.push(common_dir.join(r.trim()));
        }
    }
    files.push(common_dir.join("packed-refs"));
    files.retain(|f| f.is_file());
    files
}

/// HEAD's commit id, "-dirty" appended unless git reports a clean tree.
fn git_commit(root: &Path) -> Option<String> {
    let git = || {
        let mut c = Command::new("git");
        // Keep `git status` from rewriting the index, which would make the
        // next build rerun this script.
        c.arg("-C").arg(root).env("GIT_OPTIONAL_LOCKS", "0");
        c
    };
    let head = run(git().args(["rev-parse", "HEAD"]))?;
    if head.is_empty() || !head.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let clean = run(git().args(["status", "--porcelain", "--untracked-files=no"]))
        .is_some_and(|s| s.is_empty());
    Some(if clean { head } else { format!("{head}-dirty") })
}

/// The first line of the command's trimmed stdout (empty when there is none)
/// when it ran and exited 0. A rustc-env value must be one line; for
/// `git status` only emptiness matters, which the first line tells.
fn run(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    Some(text.lines().next().unwrap_or("").trim().to_string())
}
