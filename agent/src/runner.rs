//! Runs component documents: documents in the given order, phases in document order (filtered),
//! steps with loops, conditions, retries, timeouts, output chaining and reboot-and-resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::component::vars::{self, ChainKind, Expr, LoopField};
use kiln::component::{self, Document, ForEach, OnFailure, PhaseName, Step};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::actions::{self, ActionResult, Outcome};
use crate::exec::tail;
use crate::report::{DocumentReport, Failure, PhaseReport, Report, Status, StepReport};

/// A document to run, with its parameter values.
#[derive(Debug, Clone)]
pub struct DocSpec {
    pub path: PathBuf,
    pub loaded: component::Loaded,
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub phases: Vec<PhaseName>,
    pub work_dir: PathBuf,
    /// Progress saved across a reboot; removed when the run ends.
    pub state_file: PathBuf,
    /// Where each ExecuteBash step's script gets its private folder ([`crate::exec::script_base`]).
    pub scripts: PathBuf,
    /// Full stdout/stderr of each step, when set.
    pub log_dir: Option<PathBuf>,
    /// Stream step output to the console.
    pub echo: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Success,
    Failed,
    Reboot,
}

/// How many times one step may ask for a reboot before the run fails (a step that always exits
/// 194 would otherwise reboot forever).
pub const MAX_REBOOTS_PER_STEP: u32 = 5;
const TAIL: usize = 4000;

/// Inputs and outputs of a finished step, for `{{ phase.step.inputs/outputs }}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StepData {
    inputs: Json,
    outputs: Json,
}

/// Where to resume after a reboot, and everything needed to go on as if nothing happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    key: String,
    doc: usize,
    phase: usize,
    step: usize,
    /// Run the step again (exit 194) rather than go on after it (Reboot action).
    rerun: bool,
    reboots_here: u32,
    failed: bool,
    report: Report,
    chains: Vec<BTreeMap<String, StepData>>,
}

use crate::report::now;

/// A key that changes when the documents, parameters or phases change, so that a stale saved
/// state from another run is never resumed.
fn run_key(docs: &[DocSpec], phases: &[PhaseName]) -> String {
    let material = serde_json::json!({
        "docs": docs.iter().map(|d| serde_json::json!({"path": d.path, "doc": d.loaded.json, "params": d.parameters})).collect::<Vec<_>>(),
        "phases": phases.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
    });
    kiln::model::fingerprint::Fingerprint::of_value(&material).to_string()
}

/// Parameter values: those given, else the defaults. Missing required ones are an error.
pub fn resolve_parameters(
    doc: &Document,
    given: &BTreeMap<String, String>,
    label: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut values = BTreeMap::new();
    for name in doc.parameter_names() {
        let spec = doc.parameter(name).expect("declared");
        match given.get(name).or(spec.default.as_ref()) {
            Some(v) => {
                if let Some(allowed) = &spec.allowed_values {
                    if !allowed.contains(v) {
                        return Err(format!("{label}: `{v}` is not an allowed value of parameter `{name}` ({})", allowed.join(", ")));
                    }
                }
                values.insert(name.to_string(), v.clone());
            }
            None => return Err(format!("{label}: parameter `{name}` has no default; pass it with --parameters {name}=VALUE")),
        }
    }
    Ok(values)
}

/// The environment a step sees its parameters in: `KILN_PARAM_<name>` always, and `<name>`
/// itself when it is a plain identifier that does not shadow a system variable.
fn parameter_env(params: &BTreeMap<String, String>) -> Vec<(String, String)> {
    const RESERVED: &[&str] = &[
        "PATH", "HOME", "SHELL", "USER", "PWD", "OLDPWD", "LANG", "TERM", "IFS", "HOSTNAME",
        "TMPDIR", "BASH_ENV", "ENV", "PS4",
    ];
    let mut env = Vec::new();
    for (k, v) in params {
        let ident = k.replace('-', "_");
        env.push((format!("KILN_PARAM_{ident}"), v.clone()));
        let plain = k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !k.starts_with(|c: char| c.is_ascii_digit());
        if plain
            && !RESERVED.contains(&k.as_str())
            && !k.starts_with("LD_")
            && !k.starts_with("BASH_")
            && std::env::var_os(k).is_none()
        {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

#[derive(Debug, Clone)]
struct LoopCtx {
    name: Option<String>,
    index: usize,
    value: String,
}

struct Scope<'a> {
    doc: &'a Document,
    params: &'a BTreeMap<String, String>,
    chains: &'a BTreeMap<String, StepData>,
    current: Option<&'a LoopCtx>,
}

fn json_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

impl Scope<'_> {
    fn lookup(&self, expr: &Expr) -> Option<String> {
        match expr {
            Expr::Name(n) => self
                .params
                .get(n)
                .cloned()
                .or_else(|| self.doc.constant(n).map(|c| c.value.clone())),
            Expr::Loop { name, field } => {
                let l = self.current?;
                if name.is_some() && name != &l.name {
                    return None;
                }
                Some(if *field == LoopField::Index {
                    l.index.to_string()
                } else {
                    l.value.clone()
                })
            }
            Expr::Chain {
                phase,
                step,
                kind,
                index,
                fields,
            } => {
                let data = self.chains.get(&format!("{phase}.{step}"))?;
                let mut v = if *kind == ChainKind::Inputs {
                    &data.inputs
                } else {
                    &data.outputs
                };
                if let Some(i) = index {
                    v = v.as_array()?.get(*i)?;
                } else if v.is_array() && *kind == ChainKind::Inputs {
                    v = v.as_array()?.first()?;
                }
                for f in fields {
                    v = v.get(f)?;
                }
                Some(json_text(v))
            }
            Expr::Invalid { .. } => None,
        }
    }

    fn resolve_str(&self, s: &str) -> Result<String, String> {
        vars::substitute(s, |e| self.lookup(e))
    }

    fn resolve(&self, v: &Json) -> Result<Json, String> {
        Ok(match v {
            Json::String(s) => Json::String(self.resolve_str(s)?),
            Json::Array(items) => Json::Array(
                items
                    .iter()
                    .map(|i| self.resolve(i))
                    .collect::<Result<_, _>>()?,
            ),
            Json::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.resolve(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
}

/// The loop's iterations as (index, value); one iteration without a loop.
fn iterations(step: &Step, scope: &Scope<'_>) -> Result<Vec<LoopCtx>, String> {
    let Some(l) = &step.loop_ else {
        return Ok(vec![LoopCtx {
            name: None,
            index: 0,
            value: String::new(),
        }]);
    };
    let values: Vec<String> = match (&l.for_, &l.for_each) {
        (Some(f), _) => {
            let mut out = Vec::new();
            let mut v = f.start;
            while (f.update_by > 0 && v <= f.end) || (f.update_by < 0 && v >= f.end) {
                out.push(v.to_string());
                if out.len() > 100_000 {
                    return Err("the loop has more than 100000 iterations".into());
                }
                v += f.update_by;
            }
            out
        }
        (None, Some(ForEach::List(items))) => items
            .iter()
            .map(|i| scope.resolve_str(i))
            .collect::<Result<_, _>>()?,
        (None, Some(ForEach::Delimited(d))) => {
            let list = scope.resolve_str(&d.list)?;
            let delim = d.delimiter.as_deref().unwrap_or(",");
            list.split(delim).map(str::to_string).collect()
        }
        (None, None) => Vec::new(),
    };
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(index, value)| LoopCtx {
            name: l.name.clone(),
            index,
            value,
        })
        .collect())
}

struct Runner<'o> {
    opts: &'o Options,
    depth: usize,
}

/// What the run does after a step.
enum Flow {
    Next,
    Abort,
    Reboot { rerun: bool },
}

impl Runner<'_> {
    fn step(
        &self,
        doc: &Document,
        doc_dir: &Path,
        phase: PhaseName,
        step: &Step,
        params: &BTreeMap<String, String>,
        chains: &mut BTreeMap<String, StepData>,
    ) -> (StepReport, Flow) {
        let started = Instant::now();
        let mut report = StepReport {
            name: step.name.clone(),
            action: step.action.clone(),
            status: Status::Success,
            attempts: 0,
            iterations: 0,
            start_time: now(),
            end_time: String::new(),
            duration_seconds: 0.0,
            exit_code: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            outputs: Json::Null,
            failure_message: None,
            nested: Vec::new(),
        };
        if self.opts.echo {
            println!("==> {}/{} ({})", phase.as_str(), step.name, step.action);
        }
        let env = parameter_env(params);
        let timeout = match step.timeout_seconds {
            Some(t) if t > 0 => Some(Duration::from_secs(t as u64)),
            _ => None,
        };
        let max_attempts = step.max_attempts.unwrap_or(1).max(1);
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let mut data = StepData::default();
        let mut failure: Option<String> = None;
        let mut reboot: Option<bool> = None;
        let mut ran_any = false;
        let iters = {
            let scope = Scope {
                doc,
                params,
                chains,
                current: None,
            };
            iterations(step, &scope)
        };
        match iters {
            Err(e) => failure = Some(e),
            Ok(iters) => {
                'iterations: for ctx in &iters {
                    let scope = Scope {
                        doc,
                        params,
                        chains,
                        current: Some(ctx),
                    };
                    report.iterations += 1;
                    if let Some(cond) = &step.if_ {
                        match scope.resolve(cond).and_then(|c| {
                            let mut problems = Vec::new();
                            let parsed =
                                component::condition::parse(&c, &mut Vec::new(), &mut problems)
                                    .ok_or_else(|| {
                                        problems
                                            .first()
                                            .map(|p| p.message.clone())
                                            .unwrap_or_default()
                                    })?;
                            crate::eval::evaluate(&parsed)
                        }) {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(e) => {
                                failure = Some(format!("`if`: {e}"));
                                break;
                            }
                        }
                    }
                    let inputs = match scope.resolve(step.inputs.as_ref().unwrap_or(&Json::Null)) {
                        Ok(i) => i,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    };
                    ran_any = true;
                    for attempt in 1..=max_attempts {
                        report.attempts = report.attempts.max(attempt);
                        let nested = NestedRunner {
                            opts: self.opts,
                            depth: self.depth + 1,
                        };
                        let ctx = actions::Context {
                            work_dir: &self.opts.work_dir,
                            scripts: &self.opts.scripts,
                            document_dir: doc_dir,
                            timeout,
                            env: &env,
                            echo: self.opts.echo,
                            nested: &nested,
                        };
                        let ActionResult {
                            outcome,
                            exit_code,
                            stdout: out,
                            stderr: err,
                            nested,
                        } = actions::execute(&step.action, &inputs, &ctx);
                        stdout.push_str(&out);
                        stderr.push_str(&err);
                        report.exit_code = exit_code;
                        report.nested = nested;
                        match outcome {
                            Outcome::Success(outputs) => {
                                data = StepData {
                                    inputs: inputs.clone(),
                                    outputs,
                                };
                                failure = None;
                                continue 'iterations;
                            }
                            Outcome::Reboot { rerun } => {
                                reboot = Some(rerun);
                                data = StepData {
                                    inputs: inputs.clone(),
                                    outputs: Json::Object(Default::default()),
                                };
                                break 'iterations;
                            }
                            Outcome::Failed(message) => {
                                let suffix = if max_attempts > 1 {
                                    format!(" (attempt {attempt} of {max_attempts})")
                                } else {
                                    String::new()
                                };
                                failure = Some(format!("{message}{suffix}"));
                            }
                        }
                    }
                    // Every attempt of this iteration failed: the step fails.
                    break;
                }
            }
        }
        report.stdout_tail = tail(&stdout, TAIL);
        report.stderr_tail = tail(&stderr, TAIL);
        if let Some(dir) = &self.opts.log_dir {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::write(
                dir.join(format!("{}-{}.log", phase.as_str(), step.name)),
                format!("{stdout}\n--- stderr ---\n{stderr}"),
            );
        }
        report.end_time = now();
        report.duration_seconds = started.elapsed().as_secs_f64();
        let flow = if let Some(rerun) = reboot {
            report.status = Status::Reboot;
            Flow::Reboot { rerun }
        } else if let Some(message) = failure {
            report.failure_message = Some(message);
            match step.on_failure.unwrap_or_default() {
                OnFailure::Abort => {
                    report.status = Status::Failed;
                    Flow::Abort
                }
                OnFailure::Continue => {
                    report.status = Status::Failed;
                    Flow::Next
                }
                OnFailure::Ignore => {
                    report.status = Status::Ignored;
                    Flow::Next
                }
            }
        } else {
            if !ran_any {
                report.status = Status::Skipped;
            }
            Flow::Next
        };
        report.outputs = data.outputs.clone();
        chains.insert(format!("{}.{}", phase.as_str(), step.name), data);
        (report, flow)
    }
}

/// Runs nested documents for ExecuteDocument: no reboots inside (as with SSM's
/// aws:runDocument), and a depth limit against documents that include themselves.
struct NestedRunner<'o> {
    opts: &'o Options,
    depth: usize,
}

impl actions::Nested for NestedRunner<'_> {
    fn run_document(
        &self,
        path: &Path,
        phases: Option<&str>,
        parameters: &[(String, String)],
    ) -> ActionResult {
        let fail = |m: String| ActionResult {
            outcome: Outcome::Failed(m),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            nested: Vec::new(),
        };
        if self.depth > 8 {
            return fail("ExecuteDocument nests more than 8 levels deep".into());
        }
        let loaded = match component::load_file(path) {
            Ok(l) => l,
            Err(d) => return fail(format!("nested document is invalid:\n{d}")),
        };
        let given: BTreeMap<String, String> = parameters.iter().cloned().collect();
        let params = match resolve_parameters(&loaded.document, &given, &path.display().to_string())
        {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        let wanted: Option<Vec<&str>> = phases.map(|p| {
            p.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        });
        let runner = Runner {
            opts: self.opts,
            depth: self.depth,
        };
        let doc_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut chains = BTreeMap::new();
        let mut reports = Vec::new();
        let mut failed = None;
        for phase in &loaded.document.phases {
            if wanted
                .as_ref()
                .is_some_and(|w| !w.contains(&phase.name.as_str()))
            {
                continue;
            }
            let mut pr = PhaseReport {
                name: phase.name.as_str().into(),
                status: Status::Success,
                steps: Vec::new(),
            };
            for step in &phase.steps {
                let (sr, flow) = runner.step(
                    &loaded.document,
                    &doc_dir,
                    phase.name,
                    step,
                    &params,
                    &mut chains,
                );
                let status = sr.status;
                let message = sr.failure_message.clone();
                pr.steps.push(sr);
                match flow {
                    Flow::Next if status == Status::Failed => {
                        pr.status = Status::Failed;
                        failed.get_or_insert(format!(
                            "{}/{}: {}",
                            phase.name.as_str(),
                            step.name,
                            message.unwrap_or_default()
                        ));
                    }
                    Flow::Next => {}
                    Flow::Abort => {
                        pr.status = Status::Failed;
                        failed.get_or_insert(format!(
                            "{}/{}: {}",
                            phase.name.as_str(),
                            step.name,
                            message.unwrap_or_default()
                        ));
                        break;
                    }
                    Flow::Reboot { .. } => {
                        pr.status = Status::Failed;
                        failed.get_or_insert(format!("{}/{}: a reboot was requested inside ExecuteDocument, which cannot resume there", phase.name.as_str(), step.name));
                        break;
                    }
                }
            }
            let stop = pr.status == Status::Failed && failed.as_ref().is_some();
            reports.push(pr);
            if stop {
                break;
            }
        }
        let outcome = match failed {
            Some(m) => Outcome::Failed(format!("nested document {}: {m}", path.display())),
            None => Outcome::Success(serde_json::json!({})),
        };
        ActionResult {
            outcome,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            nested: reports,
        }
    }
}

fn load_saved(path: &Path, key: &str) -> Option<Saved> {
    let text = std::fs::read_to_string(path).ok()?;
    let saved: Saved = serde_json::from_str(&text).ok()?;
    if saved.key == key {
        Some(saved)
    } else {
        eprintln!(
            "kiln-agent: ignoring saved progress in {} from a different run",
            path.display()
        );
        None
    }
}

fn save(path: &Path, saved: &Saved) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    // The saved state holds step inputs (substituted values): a new file only root can read,
    // never a link someone left in its place.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&serde_json::to_vec(saved).map_err(std::io::Error::other)?)
            })
    };
    written.map_err(|e| format!("cannot save progress to {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot save progress to {}: {e}", path.display()))
}

/// Runs the documents. Returns the outcome and the report (also on reboot, when the report
/// covers what ran so far).
/// A report of a run that ran no document (it ended before the first).
pub fn empty_report(outcome: RunOutcome) -> Report {
    let t = now();
    Report {
        run_id: String::new(),
        status: if outcome == RunOutcome::Success {
            Status::Success
        } else {
            Status::Failed
        },
        start_time: t.clone(),
        end_time: t,
        duration_seconds: 0.0,
        reboots: 0,
        documents: Vec::new(),
        failure: None,
    }
}

pub fn run(docs: &[DocSpec], opts: &Options) -> (RunOutcome, Report) {
    let started = Instant::now();
    let key = run_key(docs, &opts.phases);
    let resumed = load_saved(&opts.state_file, &key);
    let mut report = Report {
        run_id: key.trim_start_matches("sha256:").chars().take(16).collect(),
        status: Status::Success,
        start_time: now(),
        end_time: String::new(),
        duration_seconds: 0.0,
        reboots: 0,
        documents: Vec::new(),
        failure: None,
    };
    let mut chains: Vec<BTreeMap<String, StepData>> = vec![BTreeMap::new(); docs.len()];
    let mut failed = false;
    let (mut start, mut reboots_here) = ((0, 0, 0), 0);
    if let Some(saved) = resumed {
        report = saved.report;
        report.reboots += 1;
        chains = saved.chains;
        failed = saved.failed;
        reboots_here = saved.reboots_here;
        start = (
            saved.doc,
            saved.phase,
            if saved.rerun {
                saved.step
            } else {
                saved.step + 1
            },
        );
        // The step that asked for the reboot is reported again when it runs again.
        if saved.rerun {
            if let Some(steps) = report
                .documents
                .get_mut(saved.doc)
                .and_then(|d| d.phases.last_mut())
                .map(|p| &mut p.steps)
            {
                steps.pop();
            }
        }
    }
    let runner = Runner { opts, depth: 0 };
    'docs: for (di, spec) in docs.iter().enumerate().skip(start.0) {
        let doc = &spec.loaded.document;
        let label = doc
            .name
            .clone()
            .unwrap_or_else(|| spec.path.display().to_string());
        let params = match resolve_parameters(doc, &spec.parameters, &label) {
            Ok(p) => p,
            Err(e) => {
                report.failure = Some(Failure {
                    document: label,
                    phase: String::new(),
                    step: String::new(),
                    message: e,
                    output_tail: String::new(),
                });
                failed = true;
                break;
            }
        };
        if report.documents.len() <= di {
            report.documents.push(DocumentReport {
                name: label.clone(),
                path: spec.path.display().to_string(),
                status: Status::Success,
                phases: Vec::new(),
            });
        }
        let doc_dir = spec.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let phases: Vec<&component::Phase> = doc
            .phases
            .iter()
            .filter(|p| opts.phases.contains(&p.name))
            .collect();
        for (pi, phase) in phases.iter().enumerate() {
            if (di, pi) < (start.0, start.1) {
                continue;
            }
            let resuming_phase =
                (di, pi) == (start.0, start.1) && report.documents[di].phases.len() > pi;
            if !resuming_phase {
                report.documents[di].phases.push(PhaseReport {
                    name: phase.name.as_str().into(),
                    status: Status::Success,
                    steps: Vec::new(),
                });
            }
            for (si, step) in phase.steps.iter().enumerate() {
                if (di, pi) == (start.0, start.1) && si < start.2 {
                    continue;
                }
                let (mut sr, flow) =
                    runner.step(doc, &doc_dir, phase.name, step, &params, &mut chains[di]);
                let failure_of = |sr: &StepReport| Failure {
                    document: label.clone(),
                    phase: phase.name.as_str().into(),
                    step: step.name.clone(),
                    message: sr.failure_message.clone().unwrap_or_default(),
                    output_tail: tail(&format!("{}{}", sr.stdout_tail, sr.stderr_tail), 2000),
                };
                match flow {
                    Flow::Reboot { rerun } => {
                        let here = if rerun && (di, pi, si) == (start.0, start.1, start.2) {
                            reboots_here + 1
                        } else {
                            1
                        };
                        if here > MAX_REBOOTS_PER_STEP {
                            sr.status = Status::Failed;
                            sr.failure_message = Some(format!(
                                "the step asked for a reboot {here} times in a row; giving up"
                            ));
                            report.failure.get_or_insert_with(|| failure_of(&sr));
                            report.documents[di].phases[pi].steps.push(sr);
                            failed = true;
                            break 'docs;
                        }
                        report.documents[di].phases[pi].steps.push(sr);
                        report.status = Status::Reboot;
                        report.end_time = now();
                        report.duration_seconds = started.elapsed().as_secs_f64();
                        let saved = Saved {
                            key: key.clone(),
                            doc: di,
                            phase: pi,
                            step: si,
                            rerun,
                            reboots_here: here,
                            failed,
                            report: report.clone(),
                            chains: chains.clone(),
                        };
                        if let Err(e) = save(&opts.state_file, &saved) {
                            report.status = Status::Failed;
                            report.failure = Some(Failure {
                                document: label,
                                phase: phase.name.as_str().into(),
                                step: step.name.clone(),
                                message: e,
                                output_tail: String::new(),
                            });
                            return (RunOutcome::Failed, report);
                        }
                        return (RunOutcome::Reboot, report);
                    }
                    Flow::Abort => {
                        report.failure.get_or_insert_with(|| failure_of(&sr));
                        report.documents[di].phases[pi].steps.push(sr);
                        failed = true;
                        break 'docs;
                    }
                    Flow::Next => {
                        if sr.status == Status::Failed {
                            failed = true;
                            report.failure.get_or_insert_with(|| failure_of(&sr));
                        }
                        report.documents[di].phases[pi].steps.push(sr);
                    }
                }
            }
        }
    }
    // Roll step statuses up into phases and documents.
    for d in &mut report.documents {
        for p in &mut d.phases {
            if p.steps.iter().any(|s| s.status == Status::Failed) {
                p.status = Status::Failed;
            }
        }
        if d.phases.iter().any(|p| p.status == Status::Failed) {
            d.status = Status::Failed;
        }
    }
    let _ = std::fs::remove_file(&opts.state_file);
    report.status = if failed {
        Status::Failed
    } else {
        Status::Success
    };
    report.end_time = now();
    report.duration_seconds += started.elapsed().as_secs_f64();
    (
        if failed {
            RunOutcome::Failed
        } else {
            RunOutcome::Success
        },
        report,
    )
}
