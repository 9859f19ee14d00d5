//! What validation costs: reading and checking every AWSTOE fixture document with kiln, against
//! only parsing the same YAML with yaml-rust2's loader (the baseline), in one run.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn corpus() -> Vec<(PathBuf, String)> {
    let dir = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/awstoe"));
    let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            (p, text)
        })
        .collect();
    files.sort();
    files
}

/// Best of `rounds` timings of `f` over the corpus.
fn best(rounds: u32, mut f: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let files = corpus();
    let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
    let rounds = 30;
    let baseline = best(rounds, || {
        for (_, text) in &files {
            black_box(yaml_rust2::YamlLoader::load_from_str(text).ok());
        }
    });
    let kiln = best(rounds, || {
        for (path, text) in &files {
            black_box(kiln::component::load_str(path, text).ok());
        }
    });
    let per_doc = kiln.as_secs_f64() * 1e6 / files.len() as f64;
    println!(
        "validate: {} documents, {} KiB, best of {rounds}",
        files.len(),
        bytes / 1024
    );
    println!(
        "  baseline yaml-rust2 load : {:>9.3} ms",
        baseline.as_secs_f64() * 1e3
    );
    println!(
        "  kiln parse + validate    : {:>9.3} ms ({per_doc:.1} µs/document)",
        kiln.as_secs_f64() * 1e3
    );
    println!(
        "  ratio kiln / baseline    : {:>9.2}x",
        kiln.as_secs_f64() / baseline.as_secs_f64()
    );
}
