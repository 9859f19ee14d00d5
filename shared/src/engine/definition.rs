//! State machine definitions: parsed from ASL JSON and checked statically, each problem located
//! by a JSON pointer into the definition.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as Json;

use super::path;

/// The Error or Cause of a Fail state: the text itself, or `ErrorPath`/`CausePath` — a
/// reference path or an intrinsic function (`States.Format('… {}', $.x)`), both valid in AWS.
#[derive(Debug, Clone, PartialEq)]
pub enum FailText {
    Text(String),
    Path(path::Path),
    Intrinsic(String),
}

/// A problem in a definition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub pointer: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            if self.pointer.is_empty() {
                "/"
            } else {
                &self.pointer
            },
            self.message
        )
    }
}

/// `InputPath`, `OutputPath`, `ResultPath`: absent (default `$`), null, or a path.
#[derive(Debug, Clone, PartialEq)]
pub enum PathField {
    Default,
    Null,
    Path(path::Path),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retrier {
    pub errors: Vec<String>,
    pub interval: f64,
    pub max_attempts: u32,
    pub backoff: f64,
    pub max_delay: Option<f64>,
    pub full_jitter: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Catcher {
    pub errors: Vec<String>,
    pub next: String,
    pub result_path: PathField,
    /// Workflow variables the catcher assigns, from the error output.
    pub assign: Option<Json>,
}

/// A number given directly or read from a path.
#[derive(Debug, Clone, PartialEq)]
pub enum NumOrPath {
    Num(f64),
    Path(path::Path),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Pass {
        result: Option<Json>,
    },
    Task {
        resource: String,
        timeout: Option<NumOrPath>,
        heartbeat: Option<NumOrPath>,
    },
    Choice {
        choices: Vec<(Json, String)>,
        default: Option<String>,
    },
    Wait {
        seconds: Option<NumOrPath>,
        timestamp: Option<Result<String, path::Path>>,
    },
    Succeed,
    Fail {
        error: Option<FailText>,
        cause: Option<FailText>,
    },
    Parallel {
        branches: Vec<Machine>,
    },
    Map {
        items_path: path::Path,
        item_selector: Option<Json>,
        processor: Box<Machine>,
        max_concurrency: Option<NumOrPath>,
        tolerated_count: Option<NumOrPath>,
        tolerated_percentage: Option<NumOrPath>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub name: String,
    pub kind: Kind,
    pub next: Option<String>,
    pub input_path: PathField,
    pub output_path: PathField,
    pub result_path: PathField,
    pub parameters: Option<Json>,
    pub result_selector: Option<Json>,
    pub retry: Vec<Retrier>,
    pub catch: Vec<Catcher>,
    /// Workflow variables the state assigns when it completes (`Assign`).
    pub assign: Option<Json>,
    /// What of the context object (`$$`) the state reads, so that the execution input is not
    /// copied into every state's context when nothing reads it.
    pub context_use: ContextUse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ContextUse {
    None,
    WithoutExecutionInput,
    Full,
}

fn context_use(state: &serde_json::Map<String, Json>) -> ContextUse {
    // Nested machines (Parallel branches, Map processors) have states of their own.
    let own: serde_json::Map<String, Json> = state
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "Branches" | "ItemProcessor" | "Iterator"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let text = Json::Object(own).to_string();
    if !text.contains("$$") {
        ContextUse::None
    } else if text.contains("$$.Execution")
        || text.contains("$$['Execution")
        || text.contains("$$[\\\"Execution")
    {
        ContextUse::Full
    } else {
        ContextUse::WithoutExecutionInput
    }
}

impl State {
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Pass { .. } => "Pass",
            Kind::Task { .. } => "Task",
            Kind::Choice { .. } => "Choice",
            Kind::Wait { .. } => "Wait",
            Kind::Succeed => "Succeed",
            Kind::Fail { .. } => "Fail",
            Kind::Parallel { .. } => "Parallel",
            Kind::Map { .. } => "Map",
        }
    }
}

/// A state machine or a branch / item processor.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub start_at: String,
    pub states: BTreeMap<String, State>,
    /// The execution's TimeoutSeconds (top level only): past it, the execution is TIMED_OUT.
    pub timeout_seconds: Option<f64>,
}

const COMMON: &[&str] = &["Type", "Comment"];

fn allowed(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pass" => &[
            "Assign",
            "Next",
            "End",
            "InputPath",
            "OutputPath",
            "ResultPath",
            "Parameters",
            "Result",
        ],
        "Task" => &[
            "Assign",
            "Next",
            "End",
            "InputPath",
            "OutputPath",
            "ResultPath",
            "Parameters",
            "ResultSelector",
            "Resource",
            "Retry",
            "Catch",
            "TimeoutSeconds",
            "TimeoutSecondsPath",
            "HeartbeatSeconds",
            "HeartbeatSecondsPath",
            "Credentials",
        ],
        "Choice" => &["Choices", "Default", "InputPath", "OutputPath", "Assign"],
        "Wait" => &[
            "Assign",
            "Next",
            "End",
            "InputPath",
            "OutputPath",
            "Seconds",
            "Timestamp",
            "SecondsPath",
            "TimestampPath",
        ],
        "Succeed" => &["InputPath", "OutputPath"],
        "Fail" => &["Error", "Cause", "ErrorPath", "CausePath"],
        "Parallel" => &[
            "Assign",
            "Next",
            "End",
            "InputPath",
            "OutputPath",
            "ResultPath",
            "Parameters",
            "ResultSelector",
            "Branches",
            "Retry",
            "Catch",
        ],
        "Map" => &[
            "Assign",
            "Next",
            "End",
            "InputPath",
            "OutputPath",
            "ResultPath",
            "Parameters",
            "ItemSelector",
            "ResultSelector",
            "ItemsPath",
            "ItemProcessor",
            "Iterator",
            "MaxConcurrency",
            "MaxConcurrencyPath",
            "ToleratedFailureCount",
            "ToleratedFailurePercentage",
            "ToleratedFailureCountPath",
            "ToleratedFailurePercentagePath",
            "Retry",
            "Catch",
            "Label",
        ],
        _ => return None,
    })
}

const TYPES: [&str; 8] = [
    "Pass", "Task", "Choice", "Wait", "Succeed", "Fail", "Parallel", "Map",
];

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn add(&mut self, pointer: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            pointer: pointer.to_string(),
            message: message.into(),
        });
    }

    fn path_field(
        &mut self,
        obj: &serde_json::Map<String, Json>,
        key: &str,
        at: &str,
        reference: bool,
    ) -> PathField {
        match obj.get(key) {
            None => PathField::Default,
            Some(Json::Null) => PathField::Null,
            Some(Json::String(s)) => match path::parse(s) {
                Ok(p) if reference && !p.is_reference() => {
                    self.add(
                        &format!("{at}/{key}"),
                        format!("`{s}` must be a reference path (no wildcards, filters or slices)"),
                    );
                    PathField::Default
                }
                Ok(p) if key == "ResultPath" && p.context => {
                    self.add(
                        &format!("{at}/{key}"),
                        "ResultPath cannot write to the context object ($$)",
                    );
                    PathField::Default
                }
                Ok(p) => PathField::Path(p),
                Err(e) => {
                    self.add(&format!("{at}/{key}"), e);
                    PathField::Default
                }
            },
            Some(_) => {
                self.add(&format!("{at}/{key}"), "expected a path string or null");
                PathField::Default
            }
        }
    }

    fn num_or_path(
        &mut self,
        obj: &serde_json::Map<String, Json>,
        key: &str,
        at: &str,
        min: f64,
    ) -> Option<NumOrPath> {
        let path_key = format!("{key}Path");
        match (obj.get(key), obj.get(&path_key)) {
            (Some(_), Some(_)) => {
                self.add(at, format!("{key} and {path_key} are exclusive"));
                None
            }
            (Some(v), None) => match v.as_f64() {
                Some(n) if n >= min => Some(NumOrPath::Num(n)),
                _ => {
                    self.add(
                        &format!("{at}/{key}"),
                        format!("expected a number of at least {min}"),
                    );
                    None
                }
            },
            (None, Some(Json::String(p))) => match path::parse(p) {
                Ok(p) if p.is_reference() => Some(NumOrPath::Path(p)),
                Ok(_) => {
                    self.add(&format!("{at}/{path_key}"), "must be a reference path");
                    None
                }
                Err(e) => {
                    self.add(&format!("{at}/{path_key}"), e);
                    None
                }
            },
            (None, Some(_)) => {
                self.add(&format!("{at}/{path_key}"), "expected a path string");
                None
            }
            (None, None) => None,
        }
    }

    /// An `Assign` field: an object whose keys (without `.$`) are variable names and whose values
    /// are a payload template.
    fn assign(&mut self, v: Option<&Json>, at: &str) -> Option<Json> {
        let v = v?;
        let Some(map) = v.as_object() else {
            self.add(at, "Assign is an object of variable names and values");
            return None;
        };
        for k in map.keys() {
            let name = k.strip_suffix(".$").unwrap_or(k);
            if !path::is_variable_name(name) {
                self.add(
                    &format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    format!("`{name}` is not a variable name (a letter or `_`, then letters, digits and `_`, at most 80; `states` is reserved)"),
                );
            }
        }
        self.payload(v, at);
        Some(v.clone())
    }

    fn payload(&mut self, template: &Json, at: &str) {
        match template {
            Json::Object(map) => {
                for (k, v) in map {
                    let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                    if k.ends_with(".$") {
                        match v.as_str() {
                            Some(s) if super::intrinsic::is_call(s) => {}
                            Some(s) => {
                                if let Err(e) = path::parse(s) {
                                    self.add(&here, e);
                                }
                            }
                            None => self.add(
                                &here,
                                "a key ending in `.$` takes a path or an intrinsic function",
                            ),
                        }
                    } else {
                        self.payload(v, &here);
                    }
                }
            }
            Json::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.payload(item, &format!("{at}/{i}"));
                }
            }
            _ => {}
        }
    }

    fn errors_list(&mut self, v: Option<&Json>, at: &str) -> Vec<String> {
        let names: Vec<String> = v
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Json::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            self.add(
                &format!("{at}/ErrorEquals"),
                "ErrorEquals needs at least one error name",
            );
        }
        if names.iter().any(|n| n == "States.ALL") && names.len() > 1 {
            self.add(&format!("{at}/ErrorEquals"), "States.ALL must appear alone");
        }
        names
    }

    fn retry_catch(
        &mut self,
        obj: &serde_json::Map<String, Json>,
        at: &str,
        names: &BTreeSet<String>,
    ) -> (Vec<Retrier>, Vec<Catcher>) {
        let mut retry = Vec::new();
        for (i, r) in obj
            .get("Retry")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let here = format!("{at}/Retry/{i}");
            let errors = self.errors_list(r.get("ErrorEquals"), &here);
            let num = |k: &str, d: f64| r.get(k).and_then(Json::as_f64).unwrap_or(d);
            for (k, min) in [
                ("IntervalSeconds", 1.0),
                ("MaxAttempts", 0.0),
                ("BackoffRate", 1.0),
                ("MaxDelaySeconds", 1.0),
            ] {
                if let Some(v) = r.get(k) {
                    if v.as_f64().is_none_or(|n| n < min) {
                        self.add(
                            &format!("{here}/{k}"),
                            format!("must be a number of at least {min}"),
                        );
                    }
                }
            }
            if let Some(j) = r.get("JitterStrategy") {
                if j != "FULL" && j != "NONE" {
                    self.add(&format!("{here}/JitterStrategy"), "must be FULL or NONE");
                }
            }
            if retry
                .iter()
                .any(|x: &Retrier| x.errors.iter().any(|e| e == "States.ALL"))
            {
                self.add(&here, "a retrier after States.ALL is never reached");
            }
            retry.push(Retrier {
                errors,
                interval: num("IntervalSeconds", 1.0),
                max_attempts: num("MaxAttempts", 3.0) as u32,
                backoff: num("BackoffRate", 2.0),
                max_delay: r.get("MaxDelaySeconds").and_then(Json::as_f64),
                full_jitter: r.get("JitterStrategy").and_then(Json::as_str) == Some("FULL"),
            });
        }
        let mut catch = Vec::new();
        for (i, c) in obj
            .get("Catch")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let here = format!("{at}/Catch/{i}");
            let errors = self.errors_list(c.get("ErrorEquals"), &here);
            let next = c
                .get("Next")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string();
            if !names.contains(&next) {
                self.add(&format!("{here}/Next"), format!("no state named `{next}`"));
            }
            let result_path = match c.as_object() {
                Some(o) => self.path_field(o, "ResultPath", &here, true),
                None => PathField::Default,
            };
            let assign = self.assign(c.get("Assign"), &format!("{here}/Assign"));
            catch.push(Catcher {
                errors,
                next,
                result_path,
                assign,
            });
        }
        (retry, catch)
    }

    fn machine(&mut self, v: &Json, at: &str) -> Option<Machine> {
        let Some(obj) = v.as_object() else {
            self.add(at, "a state machine is a JSON object");
            return None;
        };
        if obj.get("QueryLanguage").and_then(Json::as_str) == Some("JSONata") {
            self.add(&format!("{at}/QueryLanguage"), "JSONata state machines are not supported; kiln's engine runs the JSONPath query language");
            return None;
        }
        let states_obj = match obj.get("States").and_then(Json::as_object) {
            Some(s) if !s.is_empty() => s,
            _ => {
                self.add(&format!("{at}/States"), "States must be a non-empty object");
                return None;
            }
        };
        let names: BTreeSet<String> = states_obj.keys().cloned().collect();
        let start_at = obj
            .get("StartAt")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string();
        if !names.contains(&start_at) {
            self.add(
                &format!("{at}/StartAt"),
                format!("StartAt `{start_at}` is not a state"),
            );
        }
        let mut states = BTreeMap::new();
        for (name, sv) in states_obj {
            let here = format!("{at}/States/{}", name.replace('~', "~0").replace('/', "~1"));
            if name.len() > 80 {
                self.add(&here, "state names are at most 80 characters");
            }
            if let Some(st) = self.state(name, sv, &here, &names) {
                states.insert(name.clone(), st);
            }
        }
        // Every state must be reachable from StartAt.
        let mut seen = BTreeSet::new();
        let mut todo = vec![start_at.clone()];
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if let Some(s) = states.get(&n) {
                todo.extend(s.next.clone());
                todo.extend(s.catch.iter().map(|c| c.next.clone()));
                if let Kind::Choice { choices, default } = &s.kind {
                    todo.extend(choices.iter().map(|(_, n)| n.clone()));
                    todo.extend(default.clone());
                }
            }
        }
        for n in &names {
            if !seen.contains(n) && states.contains_key(n) {
                self.add(
                    &format!("{at}/States/{n}"),
                    format!("state `{n}` cannot be reached from StartAt"),
                );
            }
        }
        Some(Machine {
            start_at,
            states,
            timeout_seconds: None,
        })
    }

    fn state(&mut self, name: &str, v: &Json, at: &str, names: &BTreeSet<String>) -> Option<State> {
        let Some(obj) = v.as_object() else {
            self.add(at, "a state is a JSON object");
            return None;
        };
        let ty = obj.get("Type").and_then(Json::as_str).unwrap_or_default();
        let Some(fields) = allowed(ty) else {
            let hint = crate::diag::did_you_mean(ty, TYPES)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            self.add(
                &format!("{at}/Type"),
                format!(
                    "unknown state type `{ty}`{hint} (allowed: {})",
                    TYPES.join(", ")
                ),
            );
            return None;
        };
        for k in obj.keys() {
            if !fields.contains(&k.as_str()) && !COMMON.contains(&k.as_str()) {
                let hint = crate::diag::did_you_mean(k, fields.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.add(
                    &format!("{at}/{k}"),
                    format!("field `{k}` is not allowed in a {ty} state{hint}"),
                );
            }
        }
        let terminal = matches!(ty, "Choice" | "Succeed" | "Fail");
        let next = obj.get("Next").and_then(Json::as_str).map(str::to_string);
        let end = obj.get("End").and_then(Json::as_bool) == Some(true);
        if !terminal {
            match (&next, end) {
                (Some(_), true) => self.add(at, "a state has either Next or End: true, not both"),
                (None, false) => self.add(at, "a state needs Next or End: true"),
                _ => {}
            }
        }
        if let Some(n) = &next {
            if !names.contains(n) {
                let hint = crate::diag::did_you_mean(n, names.iter().map(String::as_str))
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.add(&format!("{at}/Next"), format!("no state named `{n}`{hint}"));
            }
        }
        let input_path = self.path_field(obj, "InputPath", at, false);
        let output_path = self.path_field(obj, "OutputPath", at, false);
        let result_path = self.path_field(obj, "ResultPath", at, true);
        for key in ["Parameters", "ResultSelector", "ItemSelector"] {
            if let Some(t) = obj.get(key) {
                self.payload(t, &format!("{at}/{key}"));
            }
        }
        let (retry, catch) = self.retry_catch(obj, at, names);
        let kind = match ty {
            "Pass" => Kind::Pass {
                result: obj.get("Result").cloned(),
            },
            "Task" => {
                let resource = obj
                    .get("Resource")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_string();
                if resource.is_empty() {
                    self.add(&format!("{at}/Resource"), "a Task needs a Resource");
                }
                Kind::Task {
                    resource,
                    timeout: self.num_or_path(obj, "TimeoutSeconds", at, 1.0),
                    heartbeat: self.num_or_path(obj, "HeartbeatSeconds", at, 1.0),
                }
            }
            "Choice" => {
                let mut choices = Vec::new();
                match obj.get("Choices").and_then(Json::as_array) {
                    Some(list) if !list.is_empty() => {
                        for (i, c) in list.iter().enumerate() {
                            let here = format!("{at}/Choices/{i}");
                            let n = c
                                .get("Next")
                                .and_then(Json::as_str)
                                .unwrap_or_default()
                                .to_string();
                            if !names.contains(&n) {
                                self.add(&format!("{here}/Next"), format!("no state named `{n}`"));
                            }
                            super::choice::check(c, &here, true, &mut |p, m| {
                                self.problems.push(Problem {
                                    pointer: p,
                                    message: m,
                                })
                            });
                            choices.push((c.clone(), n));
                        }
                    }
                    _ => self.add(
                        &format!("{at}/Choices"),
                        "a Choice state needs a non-empty Choices list",
                    ),
                }
                let default = obj
                    .get("Default")
                    .and_then(Json::as_str)
                    .map(str::to_string);
                if let Some(d) = &default {
                    if !names.contains(d) {
                        self.add(&format!("{at}/Default"), format!("no state named `{d}`"));
                    }
                }
                Kind::Choice { choices, default }
            }
            "Wait" => {
                let seconds = self.num_or_path(obj, "Seconds", at, 0.0);
                let timestamp = match (obj.get("Timestamp"), obj.get("TimestampPath")) {
                    (Some(Json::String(t)), None) => {
                        if chrono::DateTime::parse_from_rfc3339(t).is_err() {
                            self.add(
                                &format!("{at}/Timestamp"),
                                format!("`{t}` is not an RFC 3339 timestamp"),
                            );
                        }
                        Some(Ok(t.clone()))
                    }
                    (None, Some(Json::String(p))) => path::parse(p)
                        .map_err(|e| self.add(&format!("{at}/TimestampPath"), e))
                        .ok()
                        .map(Err),
                    (None, None) => None,
                    _ => {
                        self.add(at, "Timestamp and TimestampPath are exclusive strings");
                        None
                    }
                };
                if usize::from(seconds.is_some()) + usize::from(timestamp.is_some()) != 1 {
                    self.add(at, "a Wait state needs exactly one of Seconds, SecondsPath, Timestamp, TimestampPath");
                }
                Kind::Wait { seconds, timestamp }
            }
            "Succeed" => Kind::Succeed,
            "Fail" => {
                let text_or_path = |this: &mut Self, k: &str| -> Option<FailText> {
                    match (obj.get(k), obj.get(&format!("{k}Path"))) {
                        (Some(Json::String(s)), None) => Some(FailText::Text(s.clone())),
                        (None, Some(Json::String(p))) if super::intrinsic::is_call(p) => {
                            if let Err(e) = super::intrinsic::check(p) {
                                this.add(&format!("{at}/{k}Path"), e);
                            }
                            Some(FailText::Intrinsic(p.clone()))
                        }
                        (None, Some(Json::String(p))) => path::parse(p)
                            .map_err(|e| this.add(&format!("{at}/{k}Path"), e))
                            .ok()
                            .map(FailText::Path),
                        (None, None) => None,
                        _ => {
                            this.add(at, format!("{k} and {k}Path are exclusive strings"));
                            None
                        }
                    }
                };
                Kind::Fail {
                    error: text_or_path(self, "Error"),
                    cause: text_or_path(self, "Cause"),
                }
            }
            "Parallel" => {
                let mut branches = Vec::new();
                match obj.get("Branches").and_then(Json::as_array) {
                    Some(list) if !list.is_empty() => {
                        for (i, b) in list.iter().enumerate() {
                            branches.extend(self.machine(b, &format!("{at}/Branches/{i}")));
                        }
                    }
                    _ => self.add(
                        &format!("{at}/Branches"),
                        "a Parallel state needs a non-empty Branches list",
                    ),
                }
                Kind::Parallel { branches }
            }
            "Map" => {
                let processor_key = if obj.contains_key("ItemProcessor") {
                    "ItemProcessor"
                } else {
                    "Iterator"
                };
                if obj.contains_key("ItemSelector") && obj.contains_key("Parameters") {
                    self.add(
                        at,
                        "ItemSelector and Parameters (its legacy name) are exclusive",
                    );
                }
                if let Some(p) = obj
                    .get("ItemProcessor")
                    .and_then(|p| p.get("ProcessorConfig"))
                    .and_then(|c| c.get("Mode"))
                {
                    if p != "INLINE" {
                        self.add(&format!("{at}/ItemProcessor/ProcessorConfig/Mode"), "only INLINE Map states run in the embedded engine (DISTRIBUTED needs S3 item readers)");
                    }
                }
                let processor = match obj.get(processor_key) {
                    Some(p) => {
                        let mut p = p.clone();
                        if let Some(o) = p.as_object_mut() {
                            o.remove("ProcessorConfig");
                        }
                        self.machine(&p, &format!("{at}/{processor_key}"))
                    }
                    None => {
                        self.add(at, "a Map state needs an ItemProcessor");
                        None
                    }
                };
                let items_path = match obj.get("ItemsPath").and_then(Json::as_str) {
                    Some(p) => match path::parse(p) {
                        Ok(p) if p.is_reference() => p,
                        Ok(_) => {
                            self.add(
                                &format!("{at}/ItemsPath"),
                                "ItemsPath must be a reference path",
                            );
                            path::Path::default()
                        }
                        Err(e) => {
                            self.add(&format!("{at}/ItemsPath"), e);
                            path::Path::default()
                        }
                    },
                    None => path::Path::default(),
                };
                let item_selector = obj
                    .get("ItemSelector")
                    .or_else(|| obj.get("Parameters"))
                    .cloned();
                let tolerated_percentage =
                    self.num_or_path(obj, "ToleratedFailurePercentage", at, 0.0);
                if let Some(NumOrPath::Num(p)) = tolerated_percentage {
                    if p > 100.0 {
                        self.add(
                            &format!("{at}/ToleratedFailurePercentage"),
                            "a percentage is at most 100",
                        );
                    }
                }
                Kind::Map {
                    items_path,
                    item_selector,
                    processor: Box::new(processor?),
                    max_concurrency: self.num_or_path(obj, "MaxConcurrency", at, 0.0),
                    tolerated_count: self.num_or_path(obj, "ToleratedFailureCount", at, 0.0),
                    tolerated_percentage,
                }
            }
            _ => return None,
        };
        let parameters = if ty == "Map" {
            None
        } else {
            obj.get("Parameters").cloned()
        };
        Some(State {
            name: name.to_string(),
            kind,
            next,
            input_path,
            output_path,
            result_path,
            parameters,
            result_selector: obj.get("ResultSelector").cloned(),
            retry,
            catch,
            assign: self.assign(obj.get("Assign"), &format!("{at}/Assign")),
            context_use: context_use(obj),
        })
    }
}

/// Parses and checks a definition; every problem is reported.
pub fn parse(definition: &Json) -> Result<Machine, Vec<Problem>> {
    let mut c = Checker {
        problems: Vec::new(),
    };
    let m = c.machine(definition, "");
    if let Some(obj) = definition.as_object() {
        for k in obj.keys() {
            if ![
                "StartAt",
                "States",
                "Comment",
                "Version",
                "TimeoutSeconds",
                "QueryLanguage",
            ]
            .contains(&k.as_str())
            {
                c.add(
                    &format!("/{k}"),
                    format!("field `{k}` is not allowed at the top level"),
                );
            }
        }
    }
    let timeout_seconds = match definition.get("TimeoutSeconds") {
        None => None,
        Some(t) => match t.as_u64().filter(|t| *t > 0) {
            Some(t) => Some(t as f64),
            None => {
                c.add(
                    "/TimeoutSeconds",
                    "TimeoutSeconds must be a positive integer",
                );
                None
            }
        },
    };
    match m {
        Some(m) if c.problems.is_empty() => Ok(Machine {
            timeout_seconds,
            ..m
        }),
        _ => Err(c.problems),
    }
}
