//! Issue 28 item 3 (test review F3): the presigned URLs in the commands kiln sends to its
//! instances are fetched, after a build of the deployed stack, as the instance fetches them (curl,
//! nothing but the URL signing the request) through the rehearsal's authorizing,
//! signature-checking server. S3 authorizes a presigned request as its signer at the moment it is
//! used: the customize and test functions' roles. Neither function reads `agent/*` itself, so this
//! is the only test in which those grants are used, and the only one that fails without them (on
//! AWS every build would then fail at customize, curl answering 403).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use kiln::engine::Status;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::rehearsal::{moto_pipeline, python, runtime, Rehearsal};
use crate::support::{repo, run_ok};

/// One URL of a command: the stage it belongs to, GET or PUT (the SDK's `x-id`), the object key,
/// and the function whose credentials signed it (its access key in `X-Amz-Credential`).
#[derive(Debug, Clone)]
struct Presigned {
    stage: String,
    method: &'static str,
    key: String,
    signer: String,
    url: String,
}

/// The single-quoted URLs of a command's shell text (`commands.rs` quotes each presigned URL).
fn urls_of(text: &str) -> Vec<String> {
    text.split('\'')
        .skip(1)
        .step_by(2)
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .map(str::to_string)
        .collect()
}

/// `name=value` of a URL's query.
fn query_value(url: &str, name: &str) -> Option<String> {
    url.split_once('?')?
        .1
        .split('&')
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
        .map(|v| v.replace("%2F", "/"))
}

/// The object key of a path-style URL (`/bucket/key`).
fn key_of(url: &str, bucket: &str) -> String {
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, p)| p.split('?').next().unwrap_or_default())
        .unwrap_or_default();
    path.strip_prefix(&format!("{bucket}/"))
        .unwrap_or(path)
        .to_string()
}

/// A URL fetched as the command script fetches it (`fetch`: `curl -o`; `send`: `curl -X PUT
/// --upload-file`), trusting the rehearsal's TLS certificate only: (HTTP status, body).
fn curl(r: &Rehearsal, dir: &Path, method: &str, url: &str) -> (u16, Vec<u8>) {
    let out = dir.join("answer");
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--cacert"])
        .arg(r.moto.certificate())
        .arg("-o")
        .arg(&out)
        .args(["-w", "%{http_code}"]);
    if method == "PUT" {
        let upload = dir.join("upload.json");
        std::fs::write(&upload, b"{\"from\": \"the presigned test\"}").expect("upload file");
        cmd.args(["-X", "PUT", "--upload-file"]).arg(&upload);
    }
    let done = cmd.arg(url).output().expect("curl runs");
    let status = String::from_utf8_lossy(&done.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        status != 0,
        "curl {method} {url}: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    (status, std::fs::read(&out).unwrap_or_default())
}

/// The decisions the server made while `f` ran.
fn decided<T>(r: &Rehearsal, f: impl FnOnce() -> T) -> (T, Vec<Json>) {
    let mark = r.decisions().len();
    let out = f();
    (out, r.decisions().split_off(mark))
}

fn is(d: &Json, role: &str, action: &str, resource: &str, result: &str) -> bool {
    d["role"]
        .as_str()
        .is_some_and(|r| r.contains(&format!("-{role}Role-")))
        && d["action"] == action
        && d["resource"] == resource
        && d["result"] == result
}

#[test]
fn every_presigned_url_of_a_build_works_as_its_signing_role_and_not_without_its_grant() {
    // GIVEN the deployed stack, and a build of the moto pipeline run through it
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    let outcome = r.execute(&rt, "al2023-moto", "presigned-1");
    assert_eq!(
        outcome.status,
        Status::Succeeded,
        "{:?} {:?}",
        outcome.error,
        outcome.cause
    );
    r.assert_all_allowed();
    // (and the build's requests were evaluated on what they name: the copy reads the source
    // image's key in the build region as well as the copy's key; the launches name the real
    // security group, no placeholder)
    let decisions = r.decisions();
    assert!(
        decisions.iter().any(|d| d["operation"] == "CopyImage"
            && d["action"] == "kms:Decrypt"
            && d["resource"] == "arn:aws:kms:us-east-1:123456789012:key/alias-kiln-images"
            && d["result"] == "Allowed"),
        "CopyImage did not read the source image's key"
    );
    let launched: Vec<&str> = decisions
        .iter()
        .filter(|d| d["operation"] == "RunInstances")
        .filter_map(|d| d["resource"].as_str())
        .filter(|a| a.contains(":subnet/") || a.contains(":security-group/"))
        .collect();
    assert!(
        launched.len() >= 4
            && launched
                .iter()
                .all(|a| a.contains(":subnet/subnet-") || a.contains(":security-group/sg-"))
            && !launched.iter().any(|a| a.ends_with("-default")),
        "{launched:?}"
    );
    let bucket = r.outputs["ArtifactsBucketName"].clone();
    // AND the commands the stack sent, as SSM holds them (ListCommands as the administrator),
    // each URL's signer found by its access key among the functions' credentials
    let signers: BTreeMap<String, String> = r
        .functions
        .values()
        .filter_map(|f| {
            let key = f
                .env
                .iter()
                .find(|(k, _)| k == "AWS_ACCESS_KEY_ID")?
                .1
                .clone();
            let logical = f.function_name.split('-').nth(1)?.to_string();
            Some((key, logical))
        })
        .collect();
    let ssm = aws_sdk_ssm::Client::new(&r.admin(&rt));
    let listed = rt
        .block_on(ssm.list_commands().send())
        .expect("ListCommands");
    let mut urls = Vec::new();
    let mut pinned = BTreeMap::new();
    for c in listed.commands() {
        let stage = c
            .comment()
            .unwrap_or_default()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        let text = c
            .parameters()
            .and_then(|p| p.get("commands"))
            .map(|v| v.join("\n"))
            .unwrap_or_default();
        if let Some(want) = text.split("want=").nth(1) {
            pinned.insert(
                stage.clone(),
                want.split(';').next().unwrap_or_default().to_string(),
            );
        }
        for url in urls_of(&text) {
            let method = match query_value(&url, "x-id").as_deref() {
                Some("GetObject") => "GET",
                Some("PutObject") => "PUT",
                other => panic!("a URL of the {stage} command that is neither a GET nor a PUT ({other:?}): {url}"),
            };
            let credential = query_value(&url, "X-Amz-Credential").expect("a presigned URL");
            let access_key = credential.split('/').next().unwrap_or_default();
            let signer = signers
                .get(access_key)
                .unwrap_or_else(|| panic!("{url} is signed by no function's key"))
                .clone();
            urls.push(Presigned {
                stage: stage.clone(),
                method,
                key: key_of(&url, &bucket),
                signer,
                url,
            });
        }
    }
    // (the agent, the parameters, the working directory, the documents, the sanitize record
    // for the test stage; the report, the logs, the sanitize record from customize)
    let count = |stage: &str, method: &str| {
        urls.iter()
            .filter(|u| u.stage == stage && u.method == method)
            .count()
    };
    assert_eq!(count("customize", "GET"), 4, "{urls:#?}");
    assert_eq!(count("customize", "PUT"), 3, "{urls:#?}");
    assert_eq!(count("test", "GET"), 5, "{urls:#?}");
    assert_eq!(count("test", "PUT"), 2, "{urls:#?}");
    for u in &urls {
        let expected = if u.stage == "customize" {
            "CustomizeFunction"
        } else {
            "TestImageFunction"
        };
        assert_eq!(u.signer, expected, "{u:#?}");
    }
    let arch = std::env::consts::ARCH;
    let agent_key = format!("agent/kiln-agent-{arch}");

    // WHEN each URL is fetched as the instance fetches it
    let dir = tempfile::tempdir().expect("dir");
    for u in &urls {
        let ((status, body), lines) = decided(&r, || curl(&r, dir.path(), u.method, &u.url));
        // THEN it succeeds, authorized as the role that signed it
        assert_eq!(
            status,
            200,
            "{} {} of the {} command: {}; decisions {lines:#?}",
            u.method,
            u.key,
            u.stage,
            String::from_utf8_lossy(&body)
        );
        let action = if u.method == "GET" {
            "s3:GetObject"
        } else {
            "s3:PutObject"
        };
        let resource = format!("arn:aws:s3:::{bucket}/{}", u.key);
        assert!(
            lines
                .iter()
                .any(|d| is(d, &u.signer, action, &resource, "Allowed")),
            "{} {}: no Allowed decision for {}'s role: {lines:#?}",
            u.method,
            u.key,
            u.signer
        );
        // AND the agent fetched is the one the command pins
        if u.key == agent_key {
            assert_eq!(
                hex::encode(Sha256::digest(&body)),
                pinned[&u.stage],
                "{}'s agent",
                u.stage
            );
        }
    }
    let the = |stage: &str, method: &str, key: &str| {
        urls.iter()
            .find(|u| u.stage == stage && u.method == method && u.key.ends_with(key))
            .unwrap_or_else(|| panic!("no {method} of {key} in the {stage} command"))
            .clone()
    };

    // WHEN the customize role loses its `agent/*` read (as a template without it deploys)
    let revoke = |role: &str, resource: &str| {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/rehearsal/roles.py"))
            .args(["revoke", role, resource])
            .envs(r.moto.env());
        run_ok(cmd)
    };
    revoke(
        "CustomizeFunctionRole",
        &format!("arn:aws:s3:::{bucket}/agent/*"),
    );
    let agent = the("customize", "GET", &agent_key);
    let ((status, body), lines) = decided(&r, || curl(&r, dir.path(), "GET", &agent.url));
    // THEN the instance's download of the agent is refused as S3 refuses it, by the evaluator's
    // denial of that very read for that role
    let text = String::from_utf8_lossy(&body);
    assert!(
        status == 403 && text.contains("<Code>AccessDenied</Code>"),
        "{status} {text}"
    );
    let agent_arn = format!("arn:aws:s3:::{bucket}/{agent_key}");
    assert!(
        lines.last().is_some_and(|d| is(
            d,
            "CustomizeFunction",
            "s3:GetObject",
            &agent_arn,
            "ImplicitlyDenied"
        )),
        "{lines:#?}"
    );
    // AND the test stage's URL for the same object, signed by a role that kept the grant, still
    // works (the refusal is the grant's, not the object's)
    let other = the("test", "GET", &agent_key);
    let ((status, _), _) = decided(&r, || curl(&r, dir.path(), "GET", &other.url));
    assert_eq!(status, 200, "the test stage's agent URL");

    // WHEN the test role loses its write of the build's objects
    revoke(
        "TestImageFunctionRole",
        &format!("arn:aws:s3:::{bucket}/builds/*"),
    );
    let report = the("test", "PUT", "/report.json");
    let ((status, body), lines) = decided(&r, || curl(&r, dir.path(), "PUT", &report.url));
    // THEN the instance's upload of its report is refused
    let text = String::from_utf8_lossy(&body);
    assert!(
        status == 403 && text.contains("<Code>AccessDenied</Code>"),
        "{status} {text}"
    );
    assert!(
        lines.last().is_some_and(|d| is(
            d,
            "TestImageFunction",
            "s3:PutObject",
            &format!("arn:aws:s3:::{bucket}/{}", report.key),
            "ImplicitlyDenied"
        )),
        "{lines:#?}"
    );
    eprintln!(
        "presigned: {} URLs fetched as their signers (customize {}+{}, test {}+{}), 2 refusals after a grant was removed",
        urls.len(),
        count("customize", "GET"),
        count("customize", "PUT"),
        count("test", "GET"),
        count("test", "PUT")
    );
}
