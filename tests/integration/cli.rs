//! The command line as a user meets it: exit codes, text and JSON output, the schema.

use crate::support::{built_binary, kiln, relative};

#[test]
fn validate_exits_0_for_the_examples() {
    let (code, stdout, stderr) = kiln(&["validate", "../examples/hello/pipeline.yaml"].map(|p| {
        if p.starts_with("..") {
            leak(crate::support::repo().join(&p[3..]).display().to_string())
        } else {
            p
        }
    }));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .contains("pipeline `hello` 1.0.0: 1 component, 1 test, regions us-east-1, eu-west-1"),
        "{stdout}"
    );
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn data(p: &str) -> &'static str {
    leak(crate::support::repo().join(p).display().to_string())
}

#[test]
fn validate_exits_2_and_prints_file_line_column() {
    let (code, stdout, stderr) = kiln(&["validate", data("tests/data/bad/p-bad-region.yaml")]);
    assert_eq!(code, 2);
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(
        relative(&stderr),
        "tests/data/bad/p-bad-region.yaml:11:13: distribution[0].region: unknown region `us-esat-1`; did you mean `us-east-1`?\n1 of 1 file invalid, 1 problem\n"
    );
}

#[test]
fn json_output_lists_every_error_with_its_fields() {
    let (code, stdout, _) = kiln(&[
        "component",
        "validate",
        "--output",
        "json",
        data("tests/data/bad/c-on-failure.yaml"),
    ]);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON on stdout");
    assert_eq!(v["valid"], false);
    let e = &v["errors"][0];
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(12), Some(20))
    );
    assert_eq!(e["path"], "phases[0].steps[0].onFailure");
    assert_eq!(
        e["allowed"],
        serde_json::json!(["Abort", "Continue", "Ignore"])
    );
}

#[test]
fn a_missing_file_is_reported_not_a_crash() {
    let (code, _, stderr) = kiln(&["validate", "/nonexistent/pipeline.yaml"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/nonexistent/pipeline.yaml:0:0: cannot read file"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    assert_eq!(kiln(&["validate"]).0, 2);
    assert_eq!(kiln(&["frobnicate"]).0, 2);
    let (code, stdout, _) = kiln(&["validate", "--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Check pipeline files"), "{stdout}");
}

#[test]
fn the_pipeline_schema_describes_every_top_level_field() {
    let (code, stdout, _) = kiln(&["schema", "pipeline"]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&stdout).expect("json schema");
    let props = schema["properties"].as_object().expect("properties");
    for field in [
        "name",
        "version",
        "parent",
        "components",
        "tests",
        "workingDirectory",
        "blockDevices",
        "userData",
        "infrastructure",
        "distribution",
        "schedule",
        "lifecycle",
        "timeouts",
    ] {
        assert!(props.contains_key(field), "schema lacks {field}");
    }
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown fields are errors in editors too"
    );
}

#[test]
fn the_real_binaries_exit_with_the_documented_codes() {
    // GIVEN the built `kiln` and `kiln-agent` WHEN run on good and bad input THEN 0 and 2
    let kiln_bin = built_binary("kiln");
    let ok = std::process::Command::new(&kiln_bin)
        .arg("validate")
        .arg(data("examples/hello/pipeline.yaml"))
        .output()
        .expect("runs");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = std::process::Command::new(&kiln_bin)
        .arg("validate")
        .arg(data("tests/data/bad/p-cron-range.yaml"))
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(2));
    let agent = std::process::Command::new(built_binary("kiln-agent"))
        .arg("validate")
        .arg(data("tests/data/bad/c-duplicate-step.yaml"))
        .output()
        .expect("runs");
    assert_eq!(agent.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&agent.stderr).contains("duplicate step name `First`"));
}
