//! `kiln simulate PIPELINE.yaml`: the build in AWS, before running it. The real state machine
//! definition and the real stage code run in virtual time over the in-memory cloud, every AWS
//! operation taking a latency drawn from the table (`kiln::simulate`); N seeded runs give the
//! makespan's p50/p90, the critical path, what the build bills and how long its waits idled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use kiln::engine::clock::{Clock, TokioClock};
use kiln::engine::{Engine, Status};
use kiln::execution::{self, StageSpan, StageTaskAdapter, Timeline};
use kiln::model::build::{BuildStatus, ImageId};
use kiln::model::pipeline::{Architecture, Parent};
use kiln::ports::{Parameters, PipelineRecord, PortsProvider};
use kiln::simulate::{percentile, SimCloud, SimTasks, Sizes, Table};
use kiln::stages::handler::{local_substitutions, DEFINITION};
use kiln_testkit::{MemoryCloud, AMAZON};
use serde_json::{json, Value as Json};

use crate::{exit, Output};

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[arg(value_name = "PIPELINE.yaml")]
    pub pipeline: PathBuf,
    /// Seeded runs (each draws every latency anew).
    #[arg(long, default_value_t = 100)]
    pub runs: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A state machine definition to simulate in place of the built-in one (repeat to compare
    /// several in one run; `builtin` names the built-in one).
    #[arg(long = "definition", value_name = "FILE")]
    pub definitions: Vec<PathBuf>,
    /// A latency table in place of the built-in one (the shape of `kiln simulate --table`).
    #[arg(long, value_name = "FILE")]
    pub latencies: Option<PathBuf>,
    /// GiB of data the image's snapshots hold (what snapshotting and copying move).
    #[arg(long, value_name = "GIB", default_value_t = 2.0)]
    pub image_gib: f64,
    /// Seconds each component step runs (default: the table's `command.step`).
    #[arg(long, value_name = "SECONDS")]
    pub step_seconds: Option<f64>,
    /// The share (0 to 1) of AWS's state-change events that never arrive (they are best effort;
    /// AWS publishes no rate): those waits end by their timeout, the bounded poll.
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub lost_events: f64,
    /// The Lambda functions' architecture, for their price (the stack's `Architecture`).
    #[arg(long, value_parser = ["arm64", "x86_64"], default_value = "arm64")]
    pub lambda_arch: String,
    /// Print the latency table (with its sources) and exit.
    #[arg(long)]
    pub table: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// What one simulated build did.
#[derive(Debug, Clone)]
struct RunResult {
    status: String,
    makespan: f64,
    stages: Vec<StageSpan>,
    start: DateTime<Utc>,
    transitions: usize,
    invocations: usize,
    gb_seconds: f64,
    instance_seconds: std::collections::BTreeMap<String, f64>,
    volume_gib_seconds: f64,
    copied_gib: f64,
    requests: usize,
    /// State-change events delivered, and lost.
    events: (usize, usize),
    idle: Vec<(String, f64)>,
    cost: Cost,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Cost {
    ec2: f64,
    ebs: f64,
    lambda: f64,
    step_functions: f64,
    transfer: f64,
    total: f64,
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The root volume's size: the pipeline's block device for the root, else 8 GiB (AL2023's).
fn volume_gib(record: &PipelineRecord) -> f64 {
    record
        .pipeline
        .block_devices
        .iter()
        .find_map(|b| b.volume_size)
        .map_or(8.0, f64::from)
}

/// A parent image the pipeline's `parent` finds, in the build region.
fn seed_parent(
    cloud: &MemoryCloud,
    record: &PipelineRecord,
    start: DateTime<Utc>,
) -> Result<(), String> {
    let p = &record.pipeline;
    let region = p.home_region();
    match &p.parent {
        Parent::Ami(id) => {
            let made = cloud.add_image(region, "parent");
            cloud.with(|c| {
                if let Some(image) = c.images.remove(&made) {
                    c.images.insert(ImageId(id.clone()), image);
                }
            });
        }
        Parent::SsmParameter(name) => {
            let id = cloud.add_image(region, "parent");
            futures::executor::block_on(Parameters::put(cloud, region, name, id.as_str()))
                .map_err(|e| e.to_string())?;
        }
        Parent::Filter(f) => {
            let name = f.name.replace('*', "2026").replace('?', "x");
            let owner = match f.owners.first().map(String::as_str) {
                Some("self") => kiln_testkit::ACCOUNT,
                Some("amazon") | None => AMAZON,
                Some(id) => id,
            };
            let arch = match f.architecture {
                Some(Architecture::Arm64) => "arm64",
                _ => "x86_64",
            };
            cloud.add_image_as(region, &name, owner, arch, start);
        }
        Parent::Local(name) => {
            return Err(format!(
                "parent.local `{name}` is an embedded image: kiln simulate models a build in AWS (use `kiln run` for embedded builds)"
            ))
        }
    }
    Ok(())
}

fn simulate_once(
    record: &PipelineRecord,
    definition: &str,
    table: &Table,
    seed: u64,
    args: &SimulateArgs,
) -> Result<RunResult, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    let start = DateTime::parse_from_rfc3339("2026-01-05T03:00:00Z")
        .map_err(|e| e.to_string())?
        .with_timezone(&Utc);
    runtime.block_on(async {
        let clock = Arc::new(TokioClock::starting_at(start));
        let memory = MemoryCloud::new();
        *memory
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(start);
        seed_parent(&memory, record, start)?;
        memory
            .store()
            .put_pipeline(record)
            .await
            .map_err(|e| e.to_string())?;
        let sizes = Sizes {
            volume_gib: volume_gib(record),
            data_gib: args.image_gib,
        };
        let sim = Arc::new(
            SimCloud::new(
                memory,
                table.clone(),
                clock.clone(),
                seed,
                sizes,
                args.step_seconds,
            )
            .with_lost_events(args.lost_events),
        );
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let adapter = StageTaskAdapter::new(sim.clone(), timeline.clone(), clock.clone(), None);
        let tasks = Arc::new(SimTasks::new(adapter, table.clone(), clock.clone(), seed));
        let engine = Engine::new(tasks.clone(), clock.clone(), false)
            .with_jitter_seed(seed)
            .with_tokens(sim.task_tokens());
        let machine = execution::machine(definition, &local_substitutions())?;
        let request = format!("simulate-{seed}");
        let trigger = json!({"kind": "manual", "detail": "kiln simulate"});
        // The definition's own poll interval: no waitSeconds in the input, as in AWS.
        let input = execution::input(&record.pipeline.name, &trigger, None);
        let outcome = execution::run(
            &engine,
            &machine,
            input,
            &request,
            &timeline,
            futures::future::pending::<()>(),
            sim.deliver_events(),
        )
        .await
        .map_err(|()| "interrupted".to_string())?;
        let end = clock.now();
        let build = execution::build_of(&sim.ports(), &record.pipeline.name, &request).await;
        let status = match (&outcome.status, build.as_ref().map(|b| b.status)) {
            (Status::Succeeded, Some(BuildStatus::Available)) => "AVAILABLE".to_string(),
            (_, Some(s)) => s.as_str().to_string(),
            (s, None) => format!("{s:?}"),
        };
        let usage = sim.usage(end);
        let billed: Vec<f64> = tasks
            .billed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .flatten()
            // Lambda bills each invocation in 1 ms steps.
            // And the wake function's invocations by the events' rules.
            .chain(sim.event_invocations().iter())
            .map(|s| (s * 1000.0).ceil() / 1000.0)
            .collect();
        let gb_seconds =
            billed.iter().sum::<f64>() * f64::from(kiln::simulate::LAMBDA_MEMORY_MB) / 1024.0;
        let prices = &table.prices;
        let mut cost = Cost::default();
        for (ty, secs) in &usage.instance_seconds {
            let hourly = prices.instance_hour.get(ty).copied().ok_or_else(|| {
                format!("the price table has no instance type {ty} (add it to prices.instanceHour)")
            })?;
            // Linux instances bill per second, with a 60 s minimum.
            cost.ec2 += secs.max(60.0) / 3600.0 * hourly;
        }
        cost.ebs = usage.volume_gib_seconds * prices.ebs_gp3_gib_month / (30.0 * 24.0 * 3600.0);
        cost.lambda = gb_seconds
            * prices
                .lambda_gib_second
                .get(args.lambda_arch.as_str())
                .copied()
                .unwrap_or(0.0)
            + billed.len() as f64 * prices.lambda_request;
        cost.step_functions = outcome.state_transitions() as f64 * prices.step_functions_transition;
        cost.transfer = usage.copied_gib * prices.inter_region_gib;
        cost.total = cost.ec2 + cost.ebs + cost.lambda + cost.step_functions + cost.transfer;
        let t = timeline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(RunResult {
            status,
            makespan: (end - start).num_milliseconds() as f64 / 1000.0,
            stages: t.stages(end),
            start,
            transitions: outcome.state_transitions(),
            invocations: outcome.task_invocations() + sim.event_invocations().len(),
            gb_seconds,
            instance_seconds: usage.instance_seconds,
            volume_gib_seconds: usage.volume_gib_seconds,
            copied_gib: usage.copied_gib,
            requests: usage.requests.values().sum(),
            events: sim.events(),
            idle: sim
                .waits()
                .iter()
                .map(|w| (w.what.to_string(), w.idle_seconds()))
                .collect(),
            cost,
        })
    })
}

/// The stages that decide when the build ends: from the last-ending stage back, each time the
/// stage that ended last before it started.
fn critical_path(stages: &[StageSpan]) -> Vec<StageSpan> {
    let mut path = Vec::new();
    let mut next = stages.iter().max_by_key(|s| s.ended).cloned();
    while let Some(s) = next {
        next = stages
            .iter()
            .filter(|p| {
                p.ended <= s.started + chrono::Duration::milliseconds(500) && p.name != s.name
            })
            .filter(|p| !path.iter().any(|q: &StageSpan| q.name == p.name))
            .max_by_key(|p| p.ended)
            .cloned();
        path.push(s);
    }
    path.reverse();
    path
}

/// `{"p50", "p90", "count"}` of `values`.
fn quantiles(values: &[f64]) -> Json {
    json!({
        "p50": round(percentile(values, 50.0)),
        "p90": round(percentile(values, 90.0)),
        "count": values.len(),
    })
}

/// Quantiles per key, over every run's `(key, value)` pairs; keys in the order first seen.
fn quantiles_by<'r, I: IntoIterator<Item = (String, f64)>>(
    runs: &'r [RunResult],
    pairs: impl Fn(&'r RunResult) -> I,
) -> serde_json::Map<String, Json> {
    let mut by: Vec<(String, Vec<f64>)> = Vec::new();
    for (k, v) in runs.iter().flat_map(pairs) {
        match by.iter_mut().find(|(key, _)| *key == k) {
            Some((_, values)) => values.push(v),
            None => by.push((k, vec![v])),
        }
    }
    by.iter().map(|(k, v)| (k.clone(), quantiles(v))).collect()
}

fn summarize(name: &str, runs: &[RunResult]) -> Json {
    let q = |f: &dyn Fn(&RunResult) -> f64| quantiles(&runs.iter().map(f).collect::<Vec<_>>());
    // The run at the median makespan shows the critical path.
    let mut by_time: Vec<&RunResult> = runs.iter().collect();
    by_time.sort_by(|a, b| a.makespan.total_cmp(&b.makespan));
    let median = by_time[(by_time.len() - 1) / 2];
    let path: Vec<Json> = critical_path(&median.stages)
        .iter()
        .map(|s| {
            json!({"stage": s.name,
                   "startSeconds": round((s.started - median.start).num_milliseconds() as f64 / 1000.0),
                   "seconds": round(s.seconds())})
        })
        .collect();
    let stages = quantiles_by(runs, |r| {
        r.stages.iter().map(|s| (s.name.to_string(), s.seconds()))
    });
    let mut idle = quantiles_by(runs, |r| r.idle.iter().cloned());
    idle.sort_keys();
    let mut types = quantiles_by(runs, |r| {
        r.instance_seconds.iter().map(|(k, v)| (k.clone(), *v))
    });
    types.sort_keys();
    let mut statuses: std::collections::BTreeMap<String, usize> = Default::default();
    for r in runs {
        *statuses.entry(r.status.clone()).or_default() += 1;
    }
    json!({
        "definition": name,
        "runs": runs.len(),
        "statuses": statuses,
        "makespanSeconds": q(&|r| r.makespan),
        "criticalPath": path,
        "stageSeconds": stages,
        "idleAfterReadySeconds": idle,
        "stateTransitions": q(&|r| r.transitions as f64),
        "lambdaInvocations": q(&|r| r.invocations as f64),
        "lambdaGbSeconds": q(&|r| r.gb_seconds),
        "apiRequests": q(&|r| r.requests as f64),
        "events": {
            "delivered": q(&|r| r.events.0 as f64),
            "lost": q(&|r| r.events.1 as f64),
        },
        "instanceSeconds": types,
        "volumeGibSeconds": q(&|r| r.volume_gib_seconds),
        "copiedGib": q(&|r| r.copied_gib),
        "costUsd": {
            "ec2": q(&|r| r.cost.ec2), "ebs": q(&|r| r.cost.ebs), "lambda": q(&|r| r.cost.lambda),
            "stepFunctions": q(&|r| r.cost.step_functions), "transfer": q(&|r| r.cost.transfer),
            "total": q(&|r| r.cost.total),
        },
    })
}

fn round(x: f64) -> f64 {
    (x * 10000.0).round() / 10000.0
}

fn minutes(s: f64) -> String {
    let s = s.round() as i64;
    format!("{}m{:02}s", s / 60, s % 60)
}

fn write_text(out: &mut dyn Write, s: &Json) -> std::io::Result<()> {
    let p = |v: &Json| {
        (
            v["p50"].as_f64().unwrap_or(0.0),
            v["p90"].as_f64().unwrap_or(0.0),
        )
    };
    let (m50, m90) = p(&s["makespanSeconds"]);
    writeln!(
        out,
        "{} — {} runs {}",
        s["definition"].as_str().unwrap_or("-"),
        s["runs"],
        s["statuses"]
    )?;
    writeln!(
        out,
        "  makespan      p50 {}  p90 {}",
        minutes(m50),
        minutes(m90)
    )?;
    let path: Vec<String> = s["criticalPath"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {}",
                c["stage"].as_str().unwrap_or("-"),
                minutes(c["seconds"].as_f64().unwrap_or(0.0))
            )
        })
        .collect();
    writeln!(out, "  critical path (the median run) {}", path.join(" → "))?;
    if let Some(stages) = s["stageSeconds"].as_object() {
        for (name, v) in stages {
            let (a, b) = p(v);
            writeln!(
                out,
                "    {name:<11} p50 {:>7}  p90 {:>7}",
                minutes(a),
                minutes(b)
            )?;
        }
    }
    if let Some(idle) = s["idleAfterReadySeconds"].as_object() {
        let parts: Vec<String> = idle
            .iter()
            .map(|(k, v)| format!("{k} {:.1}s", v["p50"].as_f64().unwrap_or(0.0)))
            .collect();
        writeln!(out, "  idle after AWS was done (p50): {}", parts.join(", "))?;
    }
    let (d50, _) = p(&s["events"]["delivered"]);
    let (x50, _) = p(&s["events"]["lost"]);
    writeln!(
        out,
        "  state-change events (p50): {d50} delivered to the wake function, {x50} lost (their waits poll)"
    )?;
    let (t50, _) = p(&s["stateTransitions"]);
    let (l50, _) = p(&s["lambdaInvocations"]);
    let (g50, _) = p(&s["lambdaGbSeconds"]);
    writeln!(
        out,
        "  state transitions {t50}, Lambda invocations {l50}, Lambda GB-s {g50:.2} (p50)"
    )?;
    if let Some(types) = s["instanceSeconds"].as_object() {
        let parts: Vec<String> = types
            .iter()
            .map(|(k, v)| format!("{k} {:.0}s", v["p50"].as_f64().unwrap_or(0.0)))
            .collect();
        writeln!(out, "  instance-seconds (p50): {}", parts.join(", "))?;
    }
    let c = &s["costUsd"];
    let (c50, c90) = p(&c["total"]);
    writeln!(
        out,
        "  cost p50 ${c50:.4}  p90 ${c90:.4} (EC2 ${:.4}, EBS ${:.4}, Lambda ${:.5}, Step Functions ${:.4}, transfer ${:.4})",
        p(&c["ec2"]).0, p(&c["ebs"]).0, p(&c["lambda"]).0, p(&c["stepFunctions"]).0, p(&c["transfer"]).0
    )
}

pub fn simulate(
    args: SimulateArgs,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let table = match &args.latencies {
        None => Table::builtin(),
        Some(path) => match read(path)
            .and_then(|t| Table::parse(&t).map_err(|e| format!("{}: {e}", path.display())))
        {
            Ok(t) => t,
            Err(e) => {
                writeln!(stderr, "kiln simulate: {e}")?;
                return Ok(exit::INVALID);
            }
        },
    };
    if args.table {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&table)?)?;
        return Ok(exit::OK);
    }
    if args.runs == 0 {
        writeln!(stderr, "kiln simulate: --runs must be at least 1")?;
        return Ok(exit::INVALID);
    }
    if !(0.0..=1.0).contains(&args.lost_events) {
        writeln!(
            stderr,
            "kiln simulate: --lost-events {} is not a share: give 0 to 1 (0.05 loses one event in twenty)",
            args.lost_events
        )?;
        return Ok(exit::INVALID);
    }
    let json_out = args.output == Output::Json;
    let Some(loaded) = crate::run::load_or_report(&args.pipeline, json_out, stdout, stderr)? else {
        return Ok(exit::INVALID);
    };
    let record = PipelineRecord::from(&loaded);
    let mut definitions: Vec<(String, String)> = Vec::new();
    if args.definitions.is_empty() {
        definitions.push(("builtin".into(), DEFINITION.into()));
    }
    for d in &args.definitions {
        if d.as_os_str() == "builtin" {
            definitions.push(("builtin".into(), DEFINITION.into()));
            continue;
        }
        match read(d) {
            Ok(text) => definitions.push((d.display().to_string(), text)),
            Err(e) => {
                writeln!(stderr, "kiln simulate: {e}")?;
                return Ok(exit::INVALID);
            }
        }
    }
    let mut results = Vec::new();
    for (name, text) in &definitions {
        let mut runs = Vec::new();
        for i in 0..args.runs {
            match simulate_once(
                &record,
                text,
                &table,
                args.seed.wrapping_add(u64::from(i)),
                &args,
            ) {
                Ok(r) => runs.push(r),
                Err(e) => {
                    writeln!(stderr, "kiln simulate: {}: {e}", args.pipeline.display())?;
                    return Ok(exit::INVALID);
                }
            }
        }
        results.push(summarize(name, &runs));
    }
    let report = json!({
        "pipeline": record.pipeline.name,
        "seed": args.seed,
        "runs": args.runs,
        "volumeGib": volume_gib(&record),
        "imageGib": args.image_gib,
        "definitions": results,
        "latencies": table.rows,
        "prices": table.prices,
    });
    if json_out {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            stdout,
            "kiln simulate {} — {} seeded runs from seed {}, in virtual time (latencies: {})",
            record.pipeline.name,
            args.runs,
            args.seed,
            args.latencies.as_deref().map_or(
                "built-in table, `kiln simulate --table` lists it with sources".to_string(),
                |p| p.display().to_string()
            )
        )?;
        for r in &results {
            write_text(stdout, r)?;
        }
        writeln!(stdout, "prices: {}", table.prices.comment)?;
    }
    Ok(exit::OK)
}
