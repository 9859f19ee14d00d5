//! The bad-input corpus (`tests/data/bad/`): each file breaks one rule (one breaks several). The
//! first line names the message we promise; the snapshot pins every message and its position.

use std::path::PathBuf;

use crate::support::{relative, repo};

fn corpus() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/data/bad"))
        .expect("tests/data/bad")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn diagnostics_for(file: &std::path::Path) -> kiln::diag::Diagnostics {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let result = if name.starts_with("p-") {
        kiln::model::load(file).map(|_| ())
    } else {
        kiln::component::load_file(file).map(|_| ())
    };
    result.expect_err(&format!("{name} must be rejected"))
}

#[test]
fn the_corpus_has_at_least_forty_files() {
    assert!(corpus().len() >= 40, "{}", corpus().len());
}

#[test]
fn every_bad_file_is_rejected_with_the_promised_message_at_a_real_position() {
    for file in corpus() {
        // GIVEN a malformed file with its promise on the first line
        let text = std::fs::read_to_string(&file).expect("readable");
        let promise = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks `# expect:`", file.display()));
        // WHEN validated
        let diags = diagnostics_for(&file);
        // THEN one problem carries the promised message, and every problem has a line and column
        assert!(
            diags.0.iter().any(|d| d.to_string().contains(promise)),
            "{}: expected `{promise}` in\n{diags}",
            file.display()
        );
        for d in &diags.0 {
            assert!(
                d.line >= 1 && d.column >= 1,
                "{}: no position in {d}",
                file.display()
            );
        }
    }
}

#[test]
fn every_bad_file_reports_exactly_the_snapshotted_problems() {
    for file in corpus() {
        let name = file
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let rendered = relative(&diagnostics_for(&file).to_string());
        insta::assert_snapshot!(name, rendered);
    }
}

#[test]
fn all_problems_come_in_one_pass() {
    // GIVEN a file with three unrelated mistakes WHEN validated THEN all three are reported
    let diags = diagnostics_for(&repo().join("tests/data/bad/p-many-errors.yaml"));
    let text = diags.to_string();
    for want in [
        "not a version",
        "unknown field `owner`",
        "`BIG` is not an instance type",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
}
