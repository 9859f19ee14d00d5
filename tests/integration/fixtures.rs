//! Real-world AWSTOE documents written by others: what the MANIFEST calls valid validates, what
//! it calls invalid is rejected for the reason it gives.

use std::collections::BTreeMap;

use crate::support::awstoe_fixtures;

/// (file, expected) rows of MANIFEST.tsv.
fn manifest() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(awstoe_fixtures().join("MANIFEST.tsv"))
        .expect("the fixture MANIFEST.tsv is readable");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
    let file_col = header
        .iter()
        .position(|h| *h == "file")
        .expect("file column");
    let expected_col = header
        .iter()
        .position(|h| *h == "expected")
        .expect("expected column");
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (cols[file_col].to_string(), cols[expected_col].to_string())
        })
        .collect()
}

#[test]
fn every_document_the_manifest_calls_valid_validates() {
    // GIVEN the fixture corpus WHEN each `valid` row is validated THEN none has a problem
    let rows = manifest();
    let valid: Vec<&String> = rows
        .iter()
        .filter(|(_, e)| *e == "valid")
        .map(|(f, _)| f)
        .collect();
    assert!(
        valid.len() >= 60,
        "expected the full corpus, found {} valid rows",
        valid.len()
    );
    let failures: Vec<String> = valid
        .iter()
        .filter_map(|f| {
            kiln::component::load_file(&awstoe_fixtures().join(f))
                .err()
                .map(|d| d.to_string())
        })
        .collect();
    assert!(
        failures.is_empty(),
        "valid fixtures rejected:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_document_the_manifest_calls_invalid_is_rejected_for_its_reason() {
    // GIVEN the rows marked invalid, with the reason from their notes
    let reasons = [
        ("toadslop__reboot.yaml", "duplicate step name `RebootStep`"),
        (
            "toadslop__set-file-encoding.yaml",
            "duplicate step name `SettingFileEncodingProperty`",
        ),
        (
            "toadslop__test.yaml",
            "`Source` is both a parameter and a constant",
        ),
        ("toadslop__test.yaml", "chains to phase `validate`"),
    ];
    let rows = manifest();
    let invalid: Vec<&String> = rows
        .iter()
        .filter(|(_, e)| *e == "invalid")
        .map(|(f, _)| f)
        .collect();
    assert_eq!(invalid.len(), 3, "the corpus changed: {invalid:?}");
    for (file, reason) in reasons {
        // WHEN validated THEN rejected, naming the problem
        let err = kiln::component::load_file(&awstoe_fixtures().join(file))
            .expect_err(file)
            .to_string();
        assert!(
            err.contains(reason),
            "{file}: expected `{reason}` in\n{err}"
        );
    }
}

#[test]
fn the_cli_validates_the_whole_corpus_in_one_call_and_reports_only_the_invalid() {
    let dir = awstoe_fixtures();
    let mut files: Vec<String> = manifest()
        .into_iter()
        .filter(|(_, e)| e != "unclear")
        .map(|(f, _)| dir.join(f).display().to_string())
        .collect();
    files.sort();
    let mut args = vec!["component", "validate", "--output", "json"];
    args.extend(files.iter().map(String::as_str));
    let (code, stdout, _) = crate::support::kiln(&args);
    assert_eq!(code, 2);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let invalid: Vec<&str> = report["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|f| f["valid"] == false)
        .filter_map(|f| f["file"].as_str())
        .collect();
    assert_eq!(invalid.len(), 3, "{invalid:?}");
    assert!(invalid.iter().all(|f| f.contains("toadslop__")));
}
