//! Commands against a deployed stack (`--stack NAME`): apply, delete, start, status, builds,
//! cancel. The stack's table, bucket, state machine, scheduler role and trigger function come
//! from its CloudFormation outputs.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kiln::aws::control::{start_input, Control};
use kiln::model::build::Build;
use kiln::ports::PipelineRecord;

use crate::{exit, Output};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Connects to the stack and runs `f` with it; a stack that cannot be read is a usage error.
fn with_control(
    stack: &str,
    stderr: &mut dyn Write,
    f: impl FnOnce(&tokio::runtime::Runtime, Control, &mut dyn Write) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    let rt = runtime()?;
    match rt.block_on(Control::connect(stack)) {
        Ok(c) => f(&rt, c, stderr),
        Err(e) => {
            writeln!(stderr, "--stack {stack}: {e}")?;
            Ok(exit::INVALID)
        }
    }
}

/// `kiln validate PIPELINE.yaml… --stack NAME`: the files' checks, and each pipeline's SSM
/// parameters against what the deployed stack grants (exit 2 with each position otherwise).
pub fn validate(
    files: &[std::path::PathBuf],
    stack: &str,
    output: Output,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let rt = runtime()?;
    let grants = rt.block_on(async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        kiln::aws::control::stack_grants(&config, stack).await
    });
    let grants = match grants {
        Ok(g) => g,
        Err(e) => {
            writeln!(stderr, "--stack {stack}: {e}")?;
            return Ok(exit::INVALID);
        }
    };
    let results = kiln::report::check_pipelines_for_stack(files, &grants);
    let ok = kiln::report::write(&results, output == Output::Json, stdout, stderr)?;
    Ok(if ok { exit::OK } else { exit::INVALID })
}

/// `kiln apply PIPELINE.yaml --stack NAME`.
pub fn apply(
    file: &Path,
    stack: &str,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let Some(loaded) = crate::run::load_or_report(file, false, stdout, stderr)? else {
        return Ok(exit::INVALID);
    };
    with_control(stack, stderr, |rt, control, stderr| {
        match rt.block_on(control.apply(&PipelineRecord::from(&loaded))) {
            Ok(applied) => {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&applied)?)?;
                Ok(exit::OK)
            }
            Err(e) if e.kind == kiln::errors::ErrorKind::InvalidPipeline => {
                writeln!(stderr, "{}: {e}", file.display())?;
                Ok(exit::INVALID)
            }
            Err(e) => {
                writeln!(stderr, "kiln apply: {e}")?;
                Ok(exit::FAILED)
            }
        }
    })
}

/// `kiln delete PIPELINE --stack NAME`.
pub fn delete(
    pipeline: &str,
    stack: &str,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    with_control(stack, stderr, |rt, control, stderr| {
        match rt.block_on(control.delete(pipeline)) {
            Ok(()) => {
                writeln!(stdout, "deleted the schedule and rules of {pipeline}")?;
                Ok(exit::OK)
            }
            Err(e) => {
                writeln!(stderr, "kiln delete: {e}")?;
                Ok(exit::FAILED)
            }
        }
    })
}

/// `kiln start PIPELINE --stack NAME [--wait]`.
pub fn start(
    pipeline: &str,
    stack: &str,
    wait: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    with_control(stack, stderr, |rt, control, stderr| {
        if rt
            .block_on(kiln::ports::Store::pipeline(&control.ports, pipeline))?
            .is_none()
        {
            writeln!(
                stderr,
                "pipeline `{pipeline}` is not applied to stack {stack}; run `kiln apply PIPELINE.yaml --stack {stack}`"
            )?;
            return Ok(exit::INVALID);
        }
        let user = std::env::var("USER").unwrap_or_else(|_| "kiln start".into());
        let name = format!("{pipeline}-manual-{}", uuid::Uuid::new_v4().simple());
        let name: String = name.chars().take(80).collect();
        let input = start_input(pipeline, "manual", &format!("kiln start by {user}"));
        let (arn, _) = match rt.block_on(control.start(&name, &input)) {
            Ok(r) => r,
            Err(e) => {
                writeln!(stderr, "kiln start: {e}")?;
                return Ok(exit::FAILED);
            }
        };
        writeln!(stdout, "{arn}")?;
        if !wait {
            return Ok(exit::OK);
        }
        loop {
            let (status, output) = rt.block_on(control.execution(&arn))?;
            if status != "RUNNING" {
                writeln!(stdout, "{status}")?;
                if let Some(o) = output {
                    writeln!(stdout, "{o}")?;
                }
                return Ok(if status == "SUCCEEDED" {
                    exit::OK
                } else {
                    exit::FAILED
                });
            }
            std::thread::sleep(Duration::from_secs(5));
        }
    })
}

/// `kiln status BUILD --stack NAME`.
pub fn status(
    build: &str,
    stack: &str,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    with_control(stack, stderr, |rt, control, stderr| {
        match rt.block_on(control.find_build(build)) {
            Ok(b) => {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&b)?)?;
                Ok(exit::OK)
            }
            Err(e) => {
                writeln!(stderr, "{e}")?;
                Ok(exit::INVALID)
            }
        }
    })
}

/// `kiln builds list --stack NAME`.
pub fn builds(
    stack: &str,
    pipeline: Option<&str>,
    output: Output,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    with_control(stack, stderr, |rt, control, _stderr| {
        let all: Vec<Build> = rt
            .block_on(control.ports.all_builds())?
            .into_iter()
            .filter(|b| pipeline.is_none_or(|p| b.pipeline == p))
            .collect();
        crate::local_cmds::write_builds(&all, output, stdout)?;
        Ok(exit::OK)
    })
}

/// `kiln cancel BUILD --stack NAME`.
pub fn cancel(
    build: &str,
    stack: &str,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    with_control(stack, stderr, |rt, control, stderr| {
        let who = std::env::var("USER").unwrap_or_else(|_| "kiln cancel".into());
        let result = rt.block_on(async {
            let b = control.find_build(build).await?;
            control.cancel(&b, &who).await
        });
        match result {
            Ok(b) => {
                writeln!(stdout, "build {} {}", b.id, b.status.as_str())?;
                Ok(exit::OK)
            }
            Err(e) if e.kind == kiln::errors::ErrorKind::InvalidPipeline => {
                writeln!(stderr, "kiln cancel: {e}")?;
                Ok(exit::INVALID)
            }
            Err(e) => {
                writeln!(stderr, "kiln cancel: {e}")?;
                Ok(exit::FAILED)
            }
        }
    })
}
