//! Commands over SSM Run Command: one AWS-RunShellScript per stage fetches kiln-agent, the
//! documents and their parameter values from the artifacts bucket through presigned URLs (the
//! instance needs no AWS CLI), runs the phases, and puts the agent's JSON report and full logs
//! back (SSM output is truncated at 24,000 characters). The command text holds only URLs and
//! fixed code: every value from the pipeline reaches the agent as a file.

use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_ssm::error::ProvideErrorMetadata as _;
use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter};

use super::{sdk_error, AwsPorts};
use crate::component::PhaseName;
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{CommandId, InstanceId};
use crate::ports::{CommandPlan, CommandStatus, Commands, PortResult};

/// Where `make deploy` puts the agent binaries: `agent/kiln-agent-<arch>` (x86_64, aarch64).
pub const AGENT_KEY: &str = "agent/kiln-agent";

const URL_LIFETIME: Duration = Duration::from_secs(6 * 3600);

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

/// Single-quotes a URL the SDK generated (it never contains a quote; refuse if it did).
fn quoted(url: &str) -> Result<String, StageError> {
    if url.contains('\'') {
        return Err(internal("a presigned URL contains a quote"));
    }
    Ok(format!("'{url}'"))
}

impl AwsPorts {
    pub(crate) async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), StageError> {
        self.s3
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .map_err(|e| sdk_error("PutObject", e))?;
        Ok(())
    }

    /// For runs without a deployed stack: creates the artifacts bucket when missing and uploads
    /// this machine's kiln-agent (as `agent/kiln-agent-<arch>`) unless the bucket has one.
    pub async fn prepare_artifacts(&self, agent: &std::path::Path) -> Result<(), StageError> {
        if self
            .s3
            .head_bucket()
            .bucket(&self.settings.bucket)
            .send()
            .await
            .is_err()
        {
            let mut create = self.s3.create_bucket().bucket(&self.settings.bucket);
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
        let key = format!("{AGENT_KEY}-{}", std::env::consts::ARCH);
        let present = self
            .s3
            .head_object()
            .bucket(&self.settings.bucket)
            .key(&key)
            .send()
            .await
            .is_ok();
        if !present {
            self.upload_agent(agent, std::env::consts::ARCH).await?;
        }
        Ok(())
    }

    /// Uploads a kiln-agent binary as `agent/kiln-agent-<arch>` (x86_64 or aarch64), where the
    /// customize and test commands fetch it; returns the key.
    pub async fn upload_agent(
        &self,
        agent: &std::path::Path,
        arch: &str,
    ) -> Result<String, StageError> {
        let key = format!("{AGENT_KEY}-{arch}");
        let body = std::fs::read(agent).map_err(|e| {
            StageError::new(
                ErrorKind::InvalidPipeline,
                format!("read {}: {e}", agent.display()),
            )
        })?;
        self.put(&key, body).await?;
        Ok(key)
    }

    async fn get_url(&self, key: &str) -> Result<String, StageError> {
        let cfg = PresigningConfig::expires_in(URL_LIFETIME).map_err(internal)?;
        Ok(self
            .s3
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| sdk_error("presign GetObject", e))?
            .uri()
            .to_string())
    }

    async fn put_url(&self, key: &str) -> Result<String, StageError> {
        let cfg = PresigningConfig::expires_in(URL_LIFETIME).map_err(internal)?;
        Ok(self
            .s3
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| sdk_error("presign PutObject", e))?
            .uri()
            .to_string())
    }

    /// Uploads the plan's files and returns the shell script that runs it.
    pub async fn command_script(&self, plan: &CommandPlan) -> Result<Vec<String>, StageError> {
        let prefix = format!("builds/{}/{}", plan.build, kind(plan));
        let mut docs = Vec::new();
        for (i, c) in plan.components.iter().enumerate() {
            let key = format!("{prefix}/docs/{i}.json");
            self.put(&key, serde_json::to_vec(&c.document).map_err(internal)?)
                .await?;
            docs.push((format!("docs/{i}.json"), self.get_url(&key).await?));
        }
        let params: Vec<&std::collections::BTreeMap<String, String>> =
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
        let mut s = vec![
            "set -eu".to_string(),
            format!("KILN_RUN=/var/lib/kiln/{}/{}", plan.build, kind(plan)),
            "mkdir -p \"$KILN_RUN/docs\" && cd \"$KILN_RUN\"".into(),
            "fetch() { if command -v curl >/dev/null 2>&1; then curl -fsSL --retry 5 -o \"$1\" \"$2\"; else wget -q -O \"$1\" \"$2\"; fi; }".into(),
            "send() { if command -v curl >/dev/null 2>&1; then curl -fsS --retry 3 -X PUT --upload-file \"$1\" \"$2\"; else wget -q --method=PUT --body-file=\"$1\" -O /dev/null \"$2\"; fi; }".into(),
            format!(
                "case \"$(uname -m)\" in aarch64|arm64) fetch kiln-agent {} ;; *) fetch kiln-agent {} ;; esac",
                quoted(&self.get_url(&format!("{AGENT_KEY}-aarch64")).await?)?,
                quoted(&self.get_url(&format!("{AGENT_KEY}-x86_64")).await?)?
            ),
            "chmod +x kiln-agent".into(),
            format!("fetch params.json {}", quoted(&self.get_url(&format!("{prefix}/params.json")).await?)?),
            format!("fetch workdir {}", quoted(&self.get_url(&format!("{prefix}/workdir")).await?)?),
        ];
        for (file, url) in &docs {
            s.push(format!("fetch {file} {}", quoted(url)?));
        }
        let doc_list: Vec<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
        s.push("set +e".into());
        s.push(format!(
            "./kiln-agent run --documents {} --phases {} --parameters-file params.json --work-dir \"$(cat workdir)\" --report report.json --log-dir logs --state-file /var/lib/kiln-agent/{}-{}.json --quiet",
            doc_list.join(","),
            phases.join(","),
            plan.build,
            kind(plan)
        ));
        s.push("code=$?".into());
        s.push(format!(
            "send report.json {} || true",
            quoted(&self.put_url(&format!("{prefix}/report.json")).await?)?
        ));
        s.push(format!(
            "tar czf logs.tgz logs 2>/dev/null && send logs.tgz {} || true",
            quoted(&self.put_url(&format!("{prefix}/logs.tgz")).await?)?
        ));
        // 194 asks SSM to reboot the instance and run this command again; the agent resumes.
        s.push("exit $code".into());
        Ok(s)
    }

    /// The failure the agent's report describes, if the report reached the bucket.
    async fn report_failure(&self, comment: &str) -> Option<(String, String)> {
        let (build, kind) = comment.strip_prefix("kiln ")?.split_once(' ')?;
        let key = format!("builds/{build}/{kind}/report.json");
        let out = self
            .s3
            .get_object()
            .bucket(&self.settings.bucket)
            .key(&key)
            .send()
            .await
            .ok()?;
        let bytes = out.body.collect().await.ok()?.into_bytes();
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
                .parameters("executionTimeout", vec!["172800".to_string()])
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
