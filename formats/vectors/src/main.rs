//! `gen-vectors`: regenerates the committed test vectors of the current
//! format version in place (`formats/vectors/v<FORMAT_VERSION>/<case>/`);
//! vectors of older versions are frozen. Run it with
//! `cargo run -p tpde-vectors --bin gen-vectors` after an intended change of
//! the container bytes, and bump `FORMAT_VERSION` if the format changed.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let out =
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("v{}", tpde_format::FORMAT_VERSION));
    match tpde_vectors::generate(out) {
        Ok(()) => {
            for (name, _) in tpde_vectors::inputs() {
                println!("{}", out.join(name).display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-vectors: error: {e}");
            ExitCode::from(2)
        }
    }
}
