//! `kiln validate --stack`: the stack's roles read parent parameters only from AWS's public
//! parameters and under the stack's ImageParameterPrefix, publish image ids only under it, and
//! its builder profile reads no parameter (security review M-4, M-5). A pipeline that names a
//! parameter outside these would fail every build in AWS, at launch, distribution or customize:
//! `kiln validate --stack` names each with its position before it is applied, reading the grants
//! as the administrator sees the deployed stack (CloudFormation DescribeStacks).

use crate::rehearsal::{moto_pipeline, Rehearsal, STACK};
use crate::support::repo;

/// The moto pipeline with `edit` applied, written to `dir` (component paths made absolute).
fn pipeline_file(
    dir: &std::path::Path,
    name: &str,
    edit: impl Fn(String) -> String,
) -> (String, String) {
    let text = edit(moto_pipeline()).replace(
        "../../../../examples/aws-al2023/components/harden.yaml",
        &repo()
            .join("examples/aws-al2023/components/harden.yaml")
            .display()
            .to_string(),
    );
    let file = dir.join(name);
    std::fs::write(&file, &text).expect("write");
    (file.display().to_string(), text)
}

/// `file:line:` of the first line of `text` containing `needle` (1-based).
fn position(file: &str, text: &str, needle: &str) -> String {
    let line = text
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle} not in the pipeline"))
        + 1;
    format!("{file}:{line}:")
}

#[test]
fn validate_against_the_deployed_stack_names_each_parameter_its_roles_may_not_use() {
    // GIVEN the deployed stack (ImageParameterPrefix /images/, its default)
    let r = Rehearsal::deploy();
    let dir = tempfile::tempdir().expect("dir");

    // WHEN a pipeline whose parameters are all within the stack's grants is validated against
    // it (AWS's public parent, image ids under /images/, no SecureString): the positive control
    let (ok, _) = pipeline_file(dir.path(), "ok.yaml", |t| t);
    let (code, out, err) = r.kiln(&["validate", &ok, "--stack", STACK]);
    // THEN it is valid
    assert_eq!(code, 0, "{out}{err}");

    // WHEN the parent, a published image id and a component's SecureString are outside them
    let (bad, text) =
        pipeline_file(dir.path(), "bad.yaml", |t| {
            t.replace(
            "ssmParameter: /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
            "ssmParameter: /prod/base/ami",
        )
        .replacen(
            "ssmParameter: /images/al2023-moto/latest",
            "ssmParameter: /prod/app/ami",
            1,
        )
        .replace("SshPort: \"22\"", "SshPort: \"{{ ssm-secure:/prod/ssh/port }}\"")
        });
    let (code, out, err) = r.kiln(&["validate", &bad, "--stack", STACK]);
    // THEN it exits 2, naming each at its position in the file
    assert_eq!(code, 2, "{out}{err}");
    for (needle, says) in [
        (
            "ssmParameter: /prod/base/ami",
            "reads parent parameters only under /aws/service/ and /images/",
        ),
        (
            "ssmParameter: /prod/app/ami",
            "publishes image ids only under /images/",
        ),
        (
            "ssm-secure:/prod/ssh/port",
            "builder profile may read no parameter",
        ),
    ] {
        let at = position(&bad, &text, needle);
        assert!(
            err.lines().any(|l| l.starts_with(&at) && l.contains(says)),
            "no `{says}` at {at}:\n{err}"
        );
    }
    // AND without --stack the same file is valid (the checks are the stack's, not the file's)
    let (code, out, err) = r.kiln(&["validate", &bad]);
    assert_eq!(code, 0, "{out}{err}");

    // WHEN the stack does not exist
    let (code, _, err) = r.kiln(&["validate", &ok, "--stack", "not-a-stack"]);
    // THEN it is a usage error naming it
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not-a-stack"), "{err}");
}
