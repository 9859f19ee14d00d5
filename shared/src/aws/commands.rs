//! Commands over SSM Run Command: one AWS-RunShellScript per stage fetches kiln-agent, the
//! documents and their parameter values from the artifacts bucket through presigned URLs (the
//! instance needs no AWS CLI), runs the phases, and puts the agent's JSON report and full logs
//! back (SSM output is truncated at 24,000 characters). The command text holds only URLs and
//! fixed code: every value from the pipeline reaches the agent as a file.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ssm::error::ProvideErrorMetadata as _;
use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter};

use super::objects::Method;
use super::{sdk_error, AwsPorts};
use crate::component::PhaseName;
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{CommandId, InstanceId};
use crate::model::pipeline::SanitizeItem;
use crate::ports::{CommandPlan, CommandStatus, Commands, PortResult};

/// Where `make deploy` puts the agent binaries: `agent/kiln-agent-<arch>` (x86_64, aarch64).
pub const AGENT_KEY: &str = "agent/kiln-agent";

/// How long presigned URLs live when the plan names no timeout.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// The environment variable with the pinned agent digests: `x86_64=<hex>,aarch64=<hex>` (the
/// stack's `AgentSha256` parameter).
pub const AGENT_SHA256_ENV: &str = "KILN_AGENT_SHA256";

/// The architectures kiln-agent is built for, as `uname -m` names them on the instance.
const ARCHES: [(&str, &str); 2] = [("x86_64", "x86_64"), ("aarch64", "aarch64|arm64")];

/// `x86_64=<hex>,aarch64=<hex>`, as the stack's parameter writes it.
pub fn parse_agent_pins(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut pins = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (arch, hex) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not ARCH=SHA256"))?;
        if !ARCHES.iter().any(|(a, _)| *a == arch) {
            return Err(format!("unknown architecture `{arch}` (x86_64 or aarch64)"));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(format!("`{hex}` is not a SHA-256 in lowercase hex"));
        }
        pins.insert(arch.to_string(), hex.to_string());
    }
    Ok(pins)
}

fn read_agent(path: &std::path::Path) -> Result<Vec<u8>, StageError> {
    std::fs::read(path).map_err(|e| {
        StageError::new(
            ErrorKind::InvalidPipeline,
            format!("read {}: {e}", path.display()),
        )
    })
}

/// How long the URLs of a plan live: its stage's timeout and five minutes (a command cannot
/// outlive its stage, so a reboot-resume never finds them expired), at most S3's seven days.
fn url_lifetime(plan: &CommandPlan) -> Duration {
    if plan.timeout_minutes == 0 {
        return DEFAULT_LIFETIME;
    }
    Duration::from_secs((u64::from(plan.timeout_minutes) + 5) * 60)
        .min(Duration::from_secs(7 * 24 * 3600))
}

/// Refuses a build id that is not a ULID: it is the one value from the state machine's input
/// that the command text holds (in paths).
fn checked_build(plan: &CommandPlan) -> Result<&str, StageError> {
    let id = plan.build.as_str();
    if id.len() == 26
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
    {
        Ok(id)
    } else {
        Err(StageError::new(
            ErrorKind::InvalidPipeline,
            format!(
                "refusing the build id {id:?}: a build id is a ULID (26 characters of 0-9 and A-Z)"
            ),
        )
        .with_code("InvalidBuildId"))
    }
}

fn kind(plan: &CommandPlan) -> &'static str {
    if plan.phases.contains(&PhaseName::Test) {
        "test"
    } else {
        "customize"
    }
}

fn internal(e: impl std::fmt::Display) -> StageError {
    StageError::new(ErrorKind::Internal, e.to_string())
}

/// Single-quotes a URL the SDK generated, after checking it is one: http(s), and only the
/// characters of a presigned URL (no quote, space or newline can reach the shell).
fn quoted(url: &str) -> Result<String, StageError> {
    let shaped = crate::model::ids::regex_is_match(
        r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/[A-Za-z0-9._~/%+=&?-]*$",
        url,
    );
    if !shaped {
        return Err(internal("a presigned URL has characters a URL does not"));
    }
    Ok(format!("'{url}'"))
}

impl AwsPorts {
    pub(crate) async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), StageError> {
        self.objects().put(key, body).await
    }

    /// For runs without a deployed stack: creates the artifacts bucket when missing, pins this
    /// machine's kiln-agent and uploads it as `agent/kiln-agent-<arch>` unless the bucket holds
    /// that very binary already.
    pub async fn prepare_artifacts(&self, agent: &std::path::Path) -> Result<(), StageError> {
        if self
            .s3()
            .head_bucket()
            .bucket(&self.settings.bucket)
            .send()
            .await
            .is_err()
        {
            let mut create = self.s3().create_bucket().bucket(&self.settings.bucket);
            if self.settings.region != "us-east-1" {
                create = create.create_bucket_configuration(
                    aws_sdk_s3::types::CreateBucketConfiguration::builder()
                        .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                            self.settings.region.as_str(),
                        ))
                        .build(),
                );
            }
            create
                .send()
                .await
                .map_err(|e| sdk_error("CreateBucket", e))?;
        }
        let arch = std::env::consts::ARCH;
        let body = read_agent(agent)?;
        let sha = crate::digest::sha256_hex(&body);
        let key = format!("{AGENT_KEY}-{arch}");
        let present = self
            .s3()
            .head_object()
            .bucket(&self.settings.bucket)
            .key(&key)
            .send()
            .await
            .ok()
            .and_then(|h| h.metadata().and_then(|m| m.get("sha256")).cloned());
        if present.as_deref() != Some(sha.as_str()) {
            self.put_agent(body, &sha, arch).await?;
        }
        self.pin_agent(arch, &sha);
        Ok(())
    }

    /// Uploads a kiln-agent binary as `agent/kiln-agent-<arch>` (x86_64 or aarch64), where the
    /// customize and test commands fetch it, with its SHA-256 as metadata; returns the key and
    /// the digest (what the stack's `AgentSha256` pins).
    pub async fn upload_agent(
        &self,
        agent: &std::path::Path,
        arch: &str,
    ) -> Result<(String, String), StageError> {
        let body = read_agent(agent)?;
        let sha = crate::digest::sha256_hex(&body);
        let key = self.put_agent(body, &sha, arch).await?;
        Ok((key, sha))
    }

    /// Puts the agent's bytes with their digest as metadata; returns the key.
    async fn put_agent(&self, body: Vec<u8>, sha: &str, arch: &str) -> Result<String, StageError> {
        let key = format!("{AGENT_KEY}-{arch}");
        self.s3()
            .put_object()
            .bucket(&self.settings.bucket)
            .key(&key)
            .metadata("sha256", sha)
            .body(body.into())
            .send()
            .await
            .map_err(|e| sdk_error("PutObject", e))?;
        Ok(key)
    }

    async fn get_url(&self, key: &str, life: Duration) -> Result<String, StageError> {
        quoted(&self.objects().presign(Method::Get, key, life).await?)
    }

    async fn put_url(&self, key: &str, life: Duration) -> Result<String, StageError> {
        quoted(&self.objects().presign(Method::Put, key, life).await?)
    }

    /// Uploads the plan's files and returns the shell script that runs it. The script holds
    /// fixed code, the build id (checked to be a ULID), the pinned agent digests and quoted
    /// presigned URLs (checked to be URLs), nothing else: every value of the pipeline reaches
    /// the agent as a file. It runs the agent only if its SHA-256 is the pinned one, and leaves
    /// nothing of kiln on the instance (except across a reboot it asked for).
    pub async fn command_script(&self, plan: &CommandPlan) -> Result<Vec<String>, StageError> {
        let build = checked_build(plan)?;
        let kind = kind(plan);
        let life = url_lifetime(plan);
        let pins = self.agent_pins().map_err(|e| {
            StageError::new(ErrorKind::InvalidPipeline, e).with_code("AgentNotPinned")
        })?;
        if pins.is_empty() {
            return Err(StageError::new(
                ErrorKind::InvalidPipeline,
                format!("no kiln-agent is pinned: the stack's AgentSha256 parameter ({AGENT_SHA256_ENV}) is empty; `make deploy` sets it to the SHA-256 of the agent it uploads"),
            )
            .with_code("AgentNotPinned"));
        }
        let prefix = format!("builds/{build}/{kind}");
        let mut docs = Vec::new();
        for (i, c) in plan.components.iter().enumerate() {
            let key = format!("{prefix}/docs/{i}.json");
            self.put(&key, serde_json::to_vec(&c.document).map_err(internal)?)
                .await?;
            docs.push((format!("docs/{i}.json"), self.get_url(&key, life).await?));
        }
        let params: Vec<&BTreeMap<String, String>> =
            plan.components.iter().map(|c| &c.parameters).collect();
        self.put(
            &format!("{prefix}/params.json"),
            serde_json::to_vec(&params).map_err(internal)?,
        )
        .await?;
        self.put(
            &format!("{prefix}/workdir"),
            plan.working_directory.clone().into_bytes(),
        )
        .await?;
        let phases: Vec<&str> = plan.phases.iter().map(|p| p.as_str()).collect();
        let run_dir = format!("/var/lib/kiln/{build}/{kind}");
        let state_file = format!("/var/lib/kiln-agent/{build}-{kind}.json");
        let mut s = vec![
            "set -eu".to_string(),
            "umask 077".into(),
            format!("KILN_RUN={run_dir}"),
            "mkdir -p \"$KILN_RUN/docs\" && cd \"$KILN_RUN\"".into(),
            "fetch() { if command -v curl >/dev/null 2>&1; then curl -fsSL --retry 5 -o \"$1\" \"$2\"; else wget -q -O \"$1\" \"$2\"; fi; }".into(),
            "send() { if command -v curl >/dev/null 2>&1; then curl -fsS --retry 3 -X PUT --upload-file \"$1\" \"$2\" >/dev/null; else wget -q --method=PUT --body-file=\"$1\" -O /dev/null \"$2\"; fi; }".into(),
            // After a reboot the same text runs again: keep what was fetched.
            "once() { test -s \"$1\" || fetch \"$1\" \"$2\"; }".into(),
            "pinned() { echo \"$1  kiln-agent\" | sha256sum -c --status 2>/dev/null; }".into(),
        ];
        let mut arms = Vec::new();
        for (arch, names) in ARCHES {
            if let Some(sha) = pins.get(arch) {
                let url = self.get_url(&format!("{AGENT_KEY}-{arch}"), life).await?;
                arms.push(format!("{names}) want={sha}; url={url} ;;"));
            }
        }
        s.push(format!(
            "case \"$(uname -m)\" in {} *) echo \"kiln: no kiln-agent is pinned for $(uname -m)\" >&2; exit 1 ;; esac",
            arms.join(" ")
        ));
        s.push("pinned \"$want\" || fetch kiln-agent \"$url\"".into());
        s.push("if ! pinned \"$want\"; then rm -f kiln-agent; echo \"kiln: the kiln-agent in the artifacts bucket is not the pinned one (SHA-256 $want); not run\" >&2; exit 1; fi".into());
        s.push("chmod 0700 kiln-agent".into());
        s.push(format!(
            "once params.json {}",
            self.get_url(&format!("{prefix}/params.json"), life).await?
        ));
        s.push(format!(
            "once workdir {}",
            self.get_url(&format!("{prefix}/workdir"), life).await?
        ));
        for (file, url) in &docs {
            s.push(format!("once {file} {url}"));
        }
        let doc_list: Vec<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
        let mut run = format!(
            "./kiln-agent run --documents {} --phases {} --parameters-file params.json --work-dir \"$(cat workdir)\" --report report.json --log-dir logs --state-file {state_file} --quiet",
            doc_list.join(","),
            phases.join(","),
        );
        let record_key = format!("builds/{build}/customize/sanitized.json");
        if kind == "customize" {
            run.push_str(" --sanitize-record sanitized.json");
            if !plan.sanitize.is_empty() {
                run.push_str(&format!(
                    " --sanitize {}",
                    SanitizeItem::list(&plan.sanitize)
                ));
            }
        }
        if let Some(items) = &plan.verify_clean {
            s.push(format!(
                "once sanitized.json {}",
                self.get_url(&record_key, life).await?
            ));
            run.push_str(&format!(
                " --verify-clean sanitized.json --verify-absent /var/lib/kiln/{build}/customize,/var/lib/kiln-agent/{build}-customize.json"
            ));
            if !items.is_empty() {
                run.push_str(&format!(" --verify-items {}", SanitizeItem::list(items)));
            }
        }
        s.push("set +e".into());
        s.push(run);
        s.push("code=$?".into());
        s.push(format!(
            "send report.json {} || true",
            self.put_url(&format!("{prefix}/report.json"), life).await?
        ));
        s.push(format!(
            "tar czf logs.tgz logs 2>/dev/null && send logs.tgz {} || true",
            self.put_url(&format!("{prefix}/logs.tgz"), life).await?
        ));
        if kind == "customize" {
            // The record the test stage checks the image against; without it the test fails.
            s.push(format!(
                "test ! -f sanitized.json || send sanitized.json {} || code=1",
                self.put_url(&record_key, life).await?
            ));
        }
        // 194 asks SSM to reboot the instance and run this command again; the agent resumes.
        // Any other end: nothing of kiln stays on the instance (or in the image made from it).
        s.push(format!(
            "if [ \"$code\" != 194 ]; then cd / && rm -rf \"$KILN_RUN\" {state_file}; rmdir /var/lib/kiln/{build} /var/lib/kiln /var/lib/kiln-agent 2>/dev/null || true; fi"
        ));
        s.push("exit $code".into());
        Ok(s)
    }

    /// The failure the agent's report describes, if the report reached the bucket.
    async fn report_failure(&self, comment: &str) -> Option<(String, String)> {
        let (build, kind) = comment.strip_prefix("kiln ")?.split_once(' ')?;
        let key = format!("builds/{build}/{kind}/report.json");
        let bytes = self.objects().get(&key).await.ok()?;
        let report: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        crate::ports::report_failure(&report)
    }
}

impl Commands for AwsPorts {
    fn agent_online<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
    ) -> PortResult<'a, bool> {
        Box::pin(async move {
            let filter = InstanceInformationStringFilter::builder()
                .key("InstanceIds")
                .values(instance.as_str())
                .build()
                .map_err(internal)?;
            let out = self
                .ssm(region)
                .describe_instance_information()
                .filters(filter)
                .send()
                .await
                .map_err(|e| sdk_error("DescribeInstanceInformation", e))?;
            Ok(out
                .instance_information_list()
                .iter()
                .any(|i| i.ping_status().map(|p| p.as_str()) == Some("Online")))
        })
    }

    fn send<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        plan: &'a CommandPlan,
    ) -> PortResult<'a, CommandId> {
        Box::pin(async move {
            let script = self.command_script(plan).await?;
            let out = self
                .ssm(region)
                .send_command()
                .document_name("AWS-RunShellScript")
                .instance_ids(instance.as_str())
                .comment(format!("kiln {} {}", plan.build, kind(plan)))
                .parameters("commands", script)
                .parameters(
                    "executionTimeout",
                    vec![url_lifetime(plan)
                        .as_secs()
                        .saturating_sub(300)
                        .max(60)
                        .to_string()],
                )
                .send()
                .await
                .map_err(|e| sdk_error("SendCommand", e))?;
            out.command()
                .and_then(|c| c.command_id())
                .map(|c| CommandId(c.to_string()))
                .ok_or_else(|| internal("SendCommand returned no command id"))
        })
    }

    fn status<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        command: &'a CommandId,
    ) -> PortResult<'a, CommandStatus> {
        Box::pin(async move {
            let out = match self
                .ssm(region)
                .get_command_invocation()
                .command_id(command.as_str())
                .instance_id(instance.as_str())
                .send()
                .await
            {
                Ok(o) => o,
                // Right after SendCommand the invocation may not exist yet.
                Err(e) if e.code() == Some("InvocationDoesNotExist") => {
                    return Ok(CommandStatus::InProgress)
                }
                Err(e) => return Err(sdk_error("GetCommandInvocation", e)),
            };
            Ok(match out.status() {
                Some(CommandInvocationStatus::Success) => CommandStatus::Success,
                Some(
                    CommandInvocationStatus::Pending
                    | CommandInvocationStatus::InProgress
                    | CommandInvocationStatus::Delayed,
                )
                | None => CommandStatus::InProgress,
                Some(other) => {
                    let comment = self
                        .ssm(region)
                        .list_commands()
                        .command_id(command.as_str())
                        .send()
                        .await
                        .ok()
                        .and_then(|l| {
                            l.commands()
                                .first()
                                .and_then(|c| c.comment())
                                .map(str::to_string)
                        })
                        .unwrap_or_default();
                    match self.report_failure(&comment).await {
                        Some((message, output_tail)) => CommandStatus::Failed {
                            message,
                            output_tail,
                        },
                        None => CommandStatus::Failed {
                            message: format!(
                                "the command ended {} (exit code {})",
                                other.as_str(),
                                out.response_code()
                            ),
                            output_tail: out
                                .standard_error_content()
                                .unwrap_or_default()
                                .to_string(),
                        },
                    }
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_arch_and_lowercase_sha256() {
        let hex = "a".repeat(64);
        let pins = parse_agent_pins(&format!("x86_64={hex}, aarch64={hex}")).unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(parse_agent_pins("").unwrap().len(), 0);
        for bad in [
            format!("x86_64:{hex}"),
            format!("riscv64={hex}"),
            format!("x86_64={}", "A".repeat(64)),
            "x86_64=abc".to_string(),
        ] {
            assert!(parse_agent_pins(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_url_is_quoted_into_a_script() {
        let ok = "https://b.s3.us-east-1.amazonaws.com/builds/X/p.json?X-Amz-Expires=2100&X-Amz-Signature=ab%2F";
        assert_eq!(quoted(ok).unwrap(), format!("'{ok}'"));
        for bad in [
            "https://h/a'; reboot; '",
            "https://h/a b",
            "https://h/a\nreboot",
            "file:///etc/passwd",
            "https://h/$(reboot)",
        ] {
            assert!(quoted(bad).is_err(), "{bad}");
        }
    }
}
