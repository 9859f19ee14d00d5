//! Paths and helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The AWSTOE fixture corpus: `../shared/fixtures/awstoe` beside the repository, or
/// `$KILN_FIXTURES`.
pub fn awstoe_fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/fixtures/awstoe"))
}

/// Runs the `kiln` command line in-process; returns (exit code, stdout, stderr).
pub fn kiln(args: &[&str]) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = kiln_cli::run(
        std::iter::once("kiln").chain(args.iter().copied()),
        &mut out,
        &mut err,
    );
    (
        code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// A binary built by `cargo build` next to this test binary (`target/<profile>/NAME`).
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        bin.display()
    );
    bin
}

/// Makes paths in tool output relative to the repository, for stable snapshots.
pub fn relative(text: &str) -> String {
    text.replace(&format!("{}/", repo().display()), "")
}
