//! The AWS stack as the tools that deploy it see it: cfn-lint and `sam validate --lint` on the
//! template, asl-validator on the definition, and the template wired to the definition and to
//! the functions that exist.

use std::path::PathBuf;
use std::process::Command;

use crate::support::repo;

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

fn run_ok(mut cmd: Command) {
    let out = cmd.output().expect("the tool runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cfn_lint_passes_on_the_template() {
    let mut cmd = Command::new(tool("KILN_CFN_LINT", ".venv/bin/cfn-lint"));
    cmd.arg(repo().join("infra/template.yaml"));
    run_ok(cmd);
}

#[test]
fn sam_validate_lint_passes_on_the_template() {
    let mut cmd = Command::new(tool("KILN_SAM", ".venv/bin/sam"));
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
