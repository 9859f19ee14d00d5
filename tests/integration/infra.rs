//! The AWS stack as the tools that deploy it see it: cfn-lint and `sam validate --lint` on the
//! template; cfn-lint, checkov and parliament on the template CloudFormation runs (expanded by
//! aws-sam-translator, `infra/expand.py`); asl-validator on the definition; and the template wired
//! to the definition and to the functions that exist.

use std::path::PathBuf;
use std::process::Command;

use crate::rehearsal::{expand, python};
use crate::support::{repo, run_ok};

fn tool(var: &str, fallback: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(fallback));
    assert!(
        p.is_file(),
        "{} not found: run `make setup` (or set {var})",
        p.display()
    );
    p
}

#[test]
fn cfn_lint_passes_on_the_template() {
    let mut cmd = Command::new(tool("KILN_CFN_LINT", ".venv/python/bin/cfn-lint"));
    cmd.arg(repo().join("infra/template.yaml"));
    run_ok(cmd);
}

#[test]
fn cfn_lint_passes_on_the_expanded_template() {
    // GIVEN the template as CloudFormation expands it (aws-sam-translator, definition inlined)
    let dir = tempfile::tempdir().expect("dir");
    let expanded = expand(dir.path());
    // WHEN cfn-lint reads it (its cycle rule skips AWS::Serverless::* in the SAM file), with
    // the recursion room the nested definition needs (infra/cfn_lint.py)
    let mut cmd = Command::new(tool("KILN_PYTHON", ".venv/python/bin/python"));
    cmd.arg(repo().join("infra/cfn_lint.py")).arg(&expanded);
    // THEN it reports nothing: no dependency cycle, no bad property
    run_ok(cmd);
}

#[test]
fn checkov_finds_nothing_in_the_expanded_template() {
    // GIVEN the expanded template WHEN checkov reads it with the waivers of infra/checkov.yaml
    let dir = tempfile::tempdir().expect("dir");
    let expanded = expand(dir.path());
    let mut cmd = Command::new(tool("KILN_CHECKOV", ".venv/checkov/bin/checkov"));
    cmd.arg("--config-file")
        .arg(repo().join("infra/checkov.yaml"))
        .args(["--framework", "cloudformation", "-f"])
        .arg(&expanded);
    // THEN it fails no check
    run_ok(cmd);
}

#[test]
fn parliament_finds_nothing_in_the_stack_policies() {
    // GIVEN every role policy of the expanded template, as plain policy documents
    let dir = tempfile::tempdir().expect("dir");
    let expanded = expand(dir.path());
    let policies = dir.path().join("policies");
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("infra/policies.py"))
        .arg(&expanded)
        .arg(&policies);
    run_ok(cmd);
    assert!(
        std::fs::read_dir(&policies).expect("policies").count() >= 10,
        "every role's policies"
    );
    // WHEN parliament reads them with the waivers of infra/parliament.yaml
    let mut cmd = Command::new(tool("KILN_PARLIAMENT", ".venv/checkov/bin/parliament"));
    cmd.arg("--config")
        .arg(repo().join("infra/parliament.yaml"))
        .arg("--directory")
        .arg(&policies)
        .args(["--include_policy_extension", "json"]);
    // THEN it reports nothing (it exits 1 on any finding, and prints it)
    let out = cmd.output().expect("parliament");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

#[test]
fn sam_validate_lint_passes_on_the_template() {
    let mut cmd = Command::new(tool("KILN_SAM", ".venv/sam/bin/sam"));
    cmd.args(["validate", "--lint", "--template-file"])
        .arg(repo().join("infra/template.yaml"))
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("SAM_CLI_TELEMETRY", "0");
    run_ok(cmd);
}

#[test]
fn asl_validator_passes_on_the_definition() {
    let mut cmd = Command::new(tool(
        "KILN_ASL_VALIDATOR",
        ".venv/node/node_modules/.bin/asl-validator",
    ));
    cmd.arg("--json-path")
        .arg(repo().join("infra/statemachine/pipeline.asl.json"));
    run_ok(cmd);
}

#[test]
fn the_template_substitutes_every_function_the_definition_names_and_builds_each_package() {
    let template = std::fs::read_to_string(repo().join("infra/template.yaml")).expect("template");
    assert!(template.contains("DefinitionUri: statemachine/pipeline.asl.json"));
    for f in kiln::stages::handler::Function::ALL {
        // GIVEN each stage function WHEN looked up in the template THEN its ARN is substituted,
        // its package is built by cargo-lambda, and the package exists in functions/
        assert!(
            template.contains(&format!("{}: !GetAtt", f.substitution())),
            "{} is not substituted",
            f.substitution()
        );
        assert!(
            template.contains(&format!("BuildProperties: {{ Binary: {} }}", f.name())),
            "{} is not built",
            f.name()
        );
        assert!(
            repo()
                .join("functions")
                .join(f.name())
                .join("src/main.rs")
                .is_file(),
            "functions/{} is missing",
            f.name()
        );
    }
}

#[test]
fn kiln_simulate_bills_the_functions_memory_the_template_gives_them() {
    let template = std::fs::read_to_string(repo().join("infra/template.yaml")).expect("template");
    let sizes: Vec<&str> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("MemorySize:"))
        .map(str::trim)
        .collect();
    assert_eq!(
        sizes,
        vec![kiln::simulate::LAMBDA_MEMORY_MB.to_string()],
        "one MemorySize for every function, the one kiln simulate bills"
    );
}
