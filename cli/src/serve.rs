//! Pipelines applied to the embedded store and run on their schedules: `kiln apply` (without
//! `--stack`), `kiln delete`, `kiln serve`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln::local::store::ScheduleRow;
use kiln::local::LocalCloud;
use kiln::model::cron::Cron;
use kiln::ports::{PipelineRecord, Store};
use serde_json::json;

use crate::run::{Backend, How};
use crate::{exit, Output};

/// The next time `row`'s schedule fires after `now`, in UTC (RFC 3339).
fn next_run(cron: &str, timezone: &str, now: DateTime<Utc>) -> Option<String> {
    let tz: chrono_tz::Tz = timezone.parse().ok()?;
    let cron = Cron::parse(cron).ok()?;
    cron.next_after(&now.with_timezone(&tz)).map(|t| {
        t.with_timezone(&Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    })
}

/// `kiln apply PIPELINE.yaml`: the definition into the embedded store (versions are immutable),
/// its schedule recorded (and enabled) for `kiln serve`.
pub fn apply(
    file: &Path,
    cloud: &LocalCloud,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let Some(loaded) = crate::run::load_or_report(file, false, stdout, stderr)? else {
        return Ok(exit::INVALID);
    };
    let record = PipelineRecord::from(&loaded);
    let p = &record.pipeline;
    if let Err(e) = futures::executor::block_on(cloud.store.put_pipeline(&record)) {
        writeln!(stderr, "{}: {e}", file.display())?;
        return Ok(exit::INVALID);
    }
    match p
        .schedule
        .as_ref()
        .and_then(|s| s.cron.clone().map(|c| (c, s.timezone.clone())))
    {
        Some((cron, timezone)) => {
            let next = next_run(&cron, &timezone, Utc::now());
            cloud.store.put_schedule(&ScheduleRow {
                pipeline: p.name.clone(),
                cron: cron.clone(),
                timezone: timezone.clone(),
                enabled: true,
                disabled_reason: None,
                next_run: next.clone(),
            })?;
            writeln!(
                stdout,
                "applied {} {}: {cron} in {timezone}, next run {}",
                p.name,
                p.version,
                next.as_deref().unwrap_or("never")
            )?;
        }
        None => {
            cloud.store.delete_schedule(&p.name)?;
            writeln!(
                stdout,
                "applied {} {}: no schedule (start it with `kiln run`)",
                p.name, p.version
            )?;
        }
    }
    Ok(exit::OK)
}

/// `kiln delete PIPELINE`: its schedule removed (builds and images stay).
pub fn delete(
    pipeline: &str,
    cloud: &LocalCloud,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    if cloud.store.delete_schedule(pipeline)? {
        writeln!(stdout, "deleted the schedule of {pipeline}")?;
        Ok(exit::OK)
    } else {
        writeln!(
            stderr,
            "{pipeline} has no schedule here; see `kiln serve --list`"
        )?;
        Ok(exit::INVALID)
    }
}

/// Applies every applied pipeline's lifecycle; false when one failed (said on stderr).
fn run_lifecycles(
    cloud: &LocalCloud,
    runtime: &tokio::runtime::Runtime,
    stderr: &mut dyn Write,
) -> anyhow::Result<bool> {
    let ports = kiln::ports::PortsProvider::ports(cloud);
    let report = runtime.block_on(kiln::stages::lifecycle::run_all(&ports))?;
    for a in report["actions"].as_array().into_iter().flatten() {
        writeln!(
            stderr,
            "lifecycle: {} {} in {} ({})",
            a["verdict"].as_str().unwrap_or_default(),
            a["image"].as_str().unwrap_or_default(),
            a["region"].as_str().unwrap_or_default(),
            a["reason"].as_str().unwrap_or_default()
        )?;
    }
    let failed = report["failed"].as_array().cloned().unwrap_or_default();
    for f in &failed {
        writeln!(stderr, "lifecycle {}: {}", f["pipeline"], f["error"])?;
    }
    Ok(failed.is_empty())
}

/// `kiln serve`: runs every enabled schedule when it is due, one build at a time, until stopped
/// (or, with `once`, the schedules due at `now` and then exits).
pub fn serve(
    home: &Path,
    once: bool,
    now: Option<DateTime<Utc>>,
    list: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let cloud = match crate::run::open_cloud(home) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            writeln!(stderr, "kiln serve: {e}")?;
            return Ok(exit::INVALID);
        }
    };
    if list {
        writeln!(
            stdout,
            "{}",
            serde_json::to_string_pretty(&cloud.store.schedules()?)?
        )?;
        return Ok(exit::OK);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut failed = false;
    let mut lifecycle_day = None;
    loop {
        let at = now.unwrap_or_else(Utc::now);
        // Once a day: every applied pipeline's lifecycle.
        if lifecycle_day != Some(at.date_naive()) {
            lifecycle_day = Some(at.date_naive());
            failed |= !run_lifecycles(&cloud, &runtime, stderr)?;
        }
        for row in cloud.store.schedules()? {
            let due = row.enabled
                && row
                    .next_run
                    .as_deref()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t <= at);
            if !due {
                continue;
            }
            // The next run is set first: a build that fails is not retried in a loop.
            cloud.store.set_next_run(
                &row.pipeline,
                next_run(&row.cron, &row.timezone, at).as_deref(),
            )?;
            let Some(record) = runtime.block_on(cloud.store.pipeline(&row.pipeline))? else {
                continue;
            };
            writeln!(
                stderr,
                "{at}: {} is due ({} in {})",
                row.pipeline, row.cron, row.timezone
            )?;
            if let Some(code) = crate::run::check_parent(
                &cloud,
                &runtime,
                &record.pipeline,
                Backend::Local,
                &row.pipeline,
                stderr,
            )? {
                failed |= code != exit::OK;
                continue;
            }
            let how = How {
                backend: Backend::Local,
                output: Output::Text,
                trigger: json!({"kind": "schedule", "detail": format!("{} {}", row.cron, row.timezone)}),
                shutdown: crate::run::Shutdown::catch(&runtime),
                timeout: None,
            };
            let code = crate::run::execute(cloud.clone(), &runtime, &record, how, stdout, stderr)?;
            failed |= code != exit::OK;
        }
        if once {
            return Ok(if failed { exit::FAILED } else { exit::OK });
        }
        let stop = runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(15)) => false,
                _ = tokio::signal::ctrl_c() => true,
            }
        });
        if stop {
            return Ok(exit::OK);
        }
    }
}
