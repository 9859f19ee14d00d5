//! AWSTOE component documents: the schema (`schemaVersion: 1.0`), parsing with positions,
//! validation that collects every problem, and variable resolution shared with `kiln-agent`.

pub mod actions;
pub mod condition;
pub mod vars;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::diag::{did_you_mean, Collector, Diagnostics};
use crate::typed::{Options, Shape};
use crate::yaml::{Node, Seg};
use actions::InputForm;
use vars::{ChainKind, Expr};

/// A component document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Document {
    pub name: Option<String>,
    pub description: Option<String>,
    /// `1.0` (written `1` by some documents, which AWSTOE accepts too).
    pub schema_version: String,
    /// Each item is a map with one key, the parameter's name.
    #[serde(default)]
    pub parameters: Vec<BTreeMap<String, ParameterSpec>>,
    /// Each item is a map with one key, the constant's name.
    #[serde(default)]
    pub constants: Vec<BTreeMap<String, ConstantSpec>>,
    #[schemars(length(min = 1))]
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParameterSpec {
    #[serde(rename = "type")]
    pub kind: ValueType,
    /// Used when the pipeline does not set the parameter; without it the parameter is required.
    pub default: Option<String>,
    pub description: Option<String>,
    /// The only values the parameter may take.
    pub allowed_values: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConstantSpec {
    #[serde(rename = "type")]
    pub kind: ValueType,
    pub value: String,
    pub description: Option<String>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PhaseName {
    Build,
    Validate,
    Test,
}

impl PhaseName {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Build => "build",
            PhaseName::Validate => "validate",
            PhaseName::Test => "test",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: PhaseName,
    #[schemars(length(min = 1))]
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum OnFailure {
    /// Stop the document and fail the run (the default).
    #[default]
    Abort,
    /// Record the failure, carry on with the next step, and fail the run at the end.
    Continue,
    /// Record the failure and carry on as if the step succeeded.
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    pub name: String,
    pub action: String,
    /// Depends on the action: a map, a list of maps, or nothing.
    #[schemars(with = "Option<serde_json::Value>")]
    pub inputs: Option<Json>,
    pub on_failure: Option<OnFailure>,
    #[schemars(range(min = 1))]
    pub max_attempts: Option<u32>,
    /// Seconds before the step is killed; -1 for no limit.
    pub timeout_seconds: Option<i64>,
    #[serde(rename = "loop")]
    pub loop_: Option<Loop>,
    /// Run the step only when the condition holds.
    #[serde(rename = "if")]
    #[schemars(with = "Option<serde_json::Value>")]
    pub if_: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Loop {
    /// Lets `{{ name.value }}` and `{{ name.index }}` refer to this loop.
    pub name: Option<String>,
    #[serde(rename = "for")]
    pub for_: Option<ForLoop>,
    pub for_each: Option<ForEach>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForLoop {
    pub start: i64,
    pub end: i64,
    pub update_by: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ForEach {
    List(Vec<String>),
    Delimited(Delimited),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Delimited {
    pub list: String,
    /// Defaults to a comma.
    pub delimiter: Option<String>,
}

/// A validated document, with the typed JSON it was read into (the input to fingerprints).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub document: Document,
    pub json: Json,
}

impl Document {
    pub fn parameter(&self, name: &str) -> Option<&ParameterSpec> {
        self.parameters.iter().find_map(|p| p.get(name))
    }

    pub fn constant(&self, name: &str) -> Option<&ConstantSpec> {
        self.constants.iter().find_map(|c| c.get(name))
    }

    pub fn parameter_names(&self) -> impl Iterator<Item = &str> {
        self.parameters
            .iter()
            .flat_map(|p| p.keys().map(String::as_str))
    }

    pub fn phase(&self, name: PhaseName) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }
}

/// Reads and validates a component document file.
pub fn load_file(path: &Path) -> Result<Loaded, Diagnostics> {
    let text = crate::read_source(path)?;
    load_str(path, &text)
}

/// Validates a document given as text; `path` names it in errors.
pub fn load_str(path: &Path, text: &str) -> Result<Loaded, Diagnostics> {
    let root = crate::parse_source(path, text)?;
    let mut out = Collector::new(path, &root);
    let loaded = check(&root, &mut Vec::new(), &mut out);
    match loaded {
        Some(l) if out.found.is_empty() => Ok(l),
        _ => Err(Diagnostics(out.found).sorted()),
    }
}

/// Validates the document at `path` within the tree `out` reports on (a file of its own, or an
/// inline component inside a pipeline file).
pub fn check(node: &Node, path: &mut Vec<Seg>, out: &mut Collector<'_>) -> Option<Loaded> {
    let before = out.found.len();
    static SHAPE: std::sync::OnceLock<Shape> = std::sync::OnceLock::new();
    let json =
        SHAPE
            .get_or_init(Shape::of::<Document>)
            .read_lenient(node, path, out, Options::default());
    // With problems already reported, go on to the semantic checks when what was read still
    // makes a document, so that one pass reports as much as it can.
    let document: Document = match serde_json::from_value(json.clone()) {
        Ok(d) => d,
        Err(e) => {
            if out.found.len() == before {
                out.at(path, format!("cannot read the document: {e}"));
            }
            return None;
        }
    };
    let mut checker = Checker {
        doc: &document,
        base: path.clone(),
        out,
        typed: Vec::new(),
    };
    checker.run();
    let typed = std::mem::take(&mut checker.typed);
    if out.found.len() != before {
        return None;
    }
    // What runs sees values as written (`checksum: 0000` stays "0000", `permissions: 0755` stays
    // octal text, `stringEquals: 007` compares "007"): the checker read each step's `inputs` with
    // its action's schema and `if` as text; the document schema leaves them untyped.
    let mut document = document;
    for t in typed {
        let step = &mut document.phases[t.phase].steps[t.step];
        match t.field {
            TypedField::Inputs => step.inputs = Some(t.value),
            TypedField::If => step.if_ = Some(t.value),
        }
    }
    let json = serde_json::to_value(&document).unwrap_or(json);
    Some(Loaded { document, json })
}

/// A step field as the checker read it, to replace the untyped one.
struct Typed {
    phase: usize,
    step: usize,
    field: TypedField,
    value: Json,
}

enum TypedField {
    Inputs,
    If,
}

/// A node as JSON with every scalar kept as its text.
fn text_json(node: &Node) -> Json {
    match &node.value {
        _ if node.is_null() => Json::Null,
        crate::yaml::Value::Scalar { text, .. } => Json::String(text.clone()),
        crate::yaml::Value::Seq(items) => Json::Array(items.iter().map(text_json).collect()),
        crate::yaml::Value::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), text_json(v)))
                .collect(),
        ),
    }
}

struct Checker<'d, 'c, 'o> {
    doc: &'d Document,
    base: Vec<Seg>,
    out: &'o mut Collector<'c>,
    typed: Vec<Typed>,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Checker<'_, '_, '_> {
    fn path(&self, rest: &[Seg]) -> Vec<Seg> {
        let mut p = self.base.clone();
        p.extend_from_slice(rest);
        p
    }

    fn err(&mut self, rest: &[Seg], message: impl Into<String>) {
        let p = self.path(rest);
        self.out.at(&p, message);
    }

    fn run(&mut self) {
        let doc = self.doc;
        if !matches!(doc.schema_version.as_str(), "1.0" | "1") {
            let p = self.path(&[key("schemaVersion")]);
            self.out.at_with_allowed(
                &p,
                format!("unsupported schemaVersion `{}`", doc.schema_version),
                vec!["1.0".into()],
            );
        }
        let params = self.check_names(
            "parameters",
            &doc.parameters
                .iter()
                .map(|m| m.keys().collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        );
        let consts = self.check_names(
            "constants",
            &doc.constants
                .iter()
                .map(|m| m.keys().collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        );
        for (i, spec) in doc.parameters.iter().enumerate() {
            for (name, spec) in spec {
                if let (Some(allowed), Some(default)) = (&spec.allowed_values, &spec.default) {
                    if !allowed.contains(default) {
                        let p = self.path(&[
                            key("parameters"),
                            Seg::Index(i),
                            key(name),
                            key("default"),
                        ]);
                        self.out.at_with_allowed(
                            &p,
                            format!(
                                "default `{default}` is not one of the parameter's allowedValues"
                            ),
                            allowed.clone(),
                        );
                    }
                }
            }
        }
        for (i, name) in consts.iter().enumerate() {
            if params.contains(name) {
                self.err(
                    &[key("constants"), Seg::Index(i), key(name)],
                    format!("`{name}` is both a parameter and a constant; rename one"),
                );
            }
        }
        let mut seen_phases = BTreeSet::new();
        for (pi, phase) in doc.phases.iter().enumerate() {
            if !seen_phases.insert(phase.name) {
                self.err(
                    &[key("phases"), Seg::Index(pi), key("name")],
                    format!(
                        "phase `{}` appears twice; merge its steps into one phase",
                        phase.name.as_str()
                    ),
                );
            }
            let mut seen_steps: BTreeMap<&str, usize> = BTreeMap::new();
            for (si, step) in phase.steps.iter().enumerate() {
                let at = [key("phases"), Seg::Index(pi), key("steps"), Seg::Index(si)];
                if let Some(first) = seen_steps.insert(&step.name, si) {
                    self.err(&[&at[..], &[key("name")]].concat(), format!("duplicate step name `{}` in phase `{}` (also step {first}); step names must be unique within a phase", step.name, phase.name.as_str()));
                }
                if !is_name(&step.name) {
                    self.err(
                        &[&at[..], &[key("name")]].concat(),
                        format!(
                            "step name `{}` may only contain letters, digits, `_` and `-`",
                            step.name
                        ),
                    );
                }
                self.check_step(pi, si, step, &at);
            }
        }
    }

    /// Checks that each item of `parameters` / `constants` has exactly one well-formed, unique name.
    fn check_names(&mut self, field: &str, items: &[Vec<&String>]) -> Vec<String> {
        let mut names = Vec::new();
        for (i, keys) in items.iter().enumerate() {
            match keys.as_slice() {
                [name] => {
                    if !is_name(name) {
                        self.err(
                            &[key(field), Seg::Index(i), key(name)],
                            format!("name `{name}` may only contain letters, digits, `_` and `-`"),
                        );
                    }
                    if names.contains(*name) {
                        self.err(
                            &[key(field), Seg::Index(i), key(name)],
                            format!("`{name}` is declared twice in {field}"),
                        );
                    }
                    names.push((*name).clone());
                }
                _ => self.err(
                    &[key(field), Seg::Index(i)],
                    format!(
                        "each item of {field} is a map with exactly one key, the name (found {})",
                        keys.len()
                    ),
                ),
            }
        }
        names
    }

    fn check_step(&mut self, pi: usize, si: usize, step: &Step, at: &[Seg]) {
        let sub = |rest: &[Seg]| [at, rest].concat();
        match actions::find(&step.action) {
            None => {
                let names = actions::ACTIONS.iter().map(|a| a.name);
                let hint = did_you_mean(&step.action, names.clone())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                let p = self.path(&sub(&[key("action")]));
                self.out.at_with_allowed(
                    &p,
                    format!("unknown action `{}`{hint}", step.action),
                    names.map(str::to_string).collect(),
                );
            }
            Some(action) => self.check_inputs(action, pi, si, step, &sub(&[key("inputs")])),
        }
        if let Some(t) = step.timeout_seconds {
            if t == 0 || t < -1 {
                self.err(
                    &sub(&[key("timeoutSeconds")]),
                    format!(
                        "timeoutSeconds is -1 (no limit) or a positive number of seconds, not {t}"
                    ),
                );
            }
        }
        let mut loop_name = None;
        if let Some(l) = &step.loop_ {
            let lp = sub(&[key("loop")]);
            match (&l.for_, &l.for_each) {
                (Some(f), None) => {
                    if f.update_by == 0 {
                        self.err(
                            &[&lp[..], &[key("for"), key("updateBy")]].concat(),
                            "updateBy must not be 0: the loop would never end",
                        );
                    } else if (f.end - f.start).signum() * f.update_by.signum() < 0 {
                        self.err(
                            &[&lp[..], &[key("for"), key("updateBy")]].concat(),
                            format!(
                                "counting from {} to {} needs an updateBy of the opposite sign",
                                f.start, f.end
                            ),
                        );
                    }
                }
                (None, Some(_)) => {}
                _ => self.err(&lp, "a loop has exactly one of `for` and `forEach`"),
            }
            if let Some(name) = &l.name {
                if !is_name(name) || name == "loop" {
                    self.err(&[&lp[..], &[key("name")]].concat(), format!("loop name `{name}` must be letters, digits, `_` or `-`, and not `loop`"));
                } else if self.doc.parameter(name).is_some() || self.doc.constant(name).is_some() {
                    self.err(
                        &[&lp[..], &[key("name")]].concat(),
                        format!(
                            "loop name `{name}` is also a parameter or constant; rename the loop"
                        ),
                    );
                }
            }
            loop_name = Some(l.name.clone());
        }
        if let Some(cond) = &step.if_ {
            self.check_condition(cond, &sub(&[key("if")]));
            if let Some(n) =
                crate::diag::locate_node(self.out.root(), &self.path(&sub(&[key("if")])))
            {
                self.typed.push(Typed {
                    phase: pi,
                    step: si,
                    field: TypedField::If,
                    value: text_json(n),
                });
            }
        }
        // Variables, wherever a step may use them.
        let mut strings = Vec::new();
        if let Some(inputs) = &step.inputs {
            collect_strings(inputs, &mut sub(&[key("inputs")]), &mut strings);
        }
        if let Some(cond) = &step.if_ {
            collect_strings(cond, &mut sub(&[key("if")]), &mut strings);
        }
        if let Some(Loop {
            for_each: Some(ForEach::Delimited(d)),
            ..
        }) = &step.loop_
        {
            strings.push((
                sub(&[key("loop"), key("forEach"), key("list")]),
                d.list.clone(),
            ));
        }
        if let Some(Loop {
            for_each: Some(ForEach::List(items)),
            ..
        }) = &step.loop_
        {
            for (i, item) in items.iter().enumerate() {
                strings.push((
                    sub(&[key("loop"), key("forEach"), Seg::Index(i)]),
                    item.clone(),
                ));
            }
        }
        for (path, text) in strings {
            for p in vars::placeholders(&text) {
                if let Some(message) = self.check_variable(&p.expr, pi, si, loop_name.as_ref()) {
                    self.err(&path, message);
                }
            }
        }
    }

    /// Checks a step's inputs against its action and keeps them as the action's schema reads them.
    fn check_inputs(
        &mut self,
        action: &actions::Action,
        pi: usize,
        si: usize,
        step: &Step,
        at: &[Seg],
    ) {
        let node_path = self.path(at);
        let root = self.out.root();
        let node = crate::diag::locate_node(root, &node_path);
        let lenient = Options {
            templates_fill_any_scalar: true,
        };
        let typed = match (action.form, &step.inputs, node) {
            (InputForm::OptionalMap, None | Some(Json::Null), _) => None,
            (InputForm::Comparison, Some(cond), node) => {
                self.check_condition(cond, at);
                node.map(text_json)
            }
            (_, None | Some(Json::Null), _) => {
                self.err(at, format!("`{}` needs inputs", action.name));
                None
            }
            (
                InputForm::List,
                Some(Json::Array(_)),
                Some(Node {
                    value: crate::yaml::Value::Seq(items),
                    ..
                }),
            ) => {
                let shape = action.input_shape();
                let read = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let mut p = node_path.clone();
                        p.push(Seg::Index(i));
                        shape.read_lenient(item, &mut p, self.out, lenient)
                    })
                    .collect();
                Some(Json::Array(read))
            }
            (InputForm::List, Some(_), _) => {
                self.err(
                    at,
                    format!(
                        "inputs of `{}` are a list of operations: start each one with `- `",
                        action.name
                    ),
                );
                None
            }
            (InputForm::Map | InputForm::OptionalMap, Some(Json::Object(map)), Some(node)) => {
                if action.name == "ExecutePowerShell"
                    && map.contains_key("commands") == map.contains_key("file")
                {
                    self.err(
                        at,
                        "ExecutePowerShell takes exactly one of `commands` and `file`",
                    );
                }
                Some(action.input_shape().read_lenient(
                    node,
                    &mut node_path.clone(),
                    self.out,
                    lenient,
                ))
            }
            (InputForm::Map | InputForm::OptionalMap, Some(_), _) => {
                self.err(
                    at,
                    format!("inputs of `{}` are a single map, not a list", action.name),
                );
                None
            }
        };
        if let Some(value) = typed {
            self.typed.push(Typed {
                phase: pi,
                step: si,
                field: TypedField::Inputs,
                value,
            });
        }
    }

    fn check_condition(&mut self, cond: &Json, at: &[Seg]) {
        let mut problems = Vec::new();
        condition::parse(cond, &mut Vec::new(), &mut problems);
        for p in problems {
            let full = self.path(&[at, &p.path[..]].concat());
            self.out.at_with_allowed(&full, p.message, p.allowed);
        }
    }

    /// Why `expr`, used in step `si` of phase `pi`, does not resolve; `None` when it does.
    fn check_variable(
        &self,
        expr: &Expr,
        pi: usize,
        si: usize,
        loop_name: Option<&Option<String>>,
    ) -> Option<String> {
        let doc = self.doc;
        match expr {
            Expr::Name(n) => {
                if doc.parameter(n).is_some() || doc.constant(n).is_some() {
                    return None;
                }
                let known: Vec<&str> = doc
                    .parameter_names()
                    .chain(
                        doc.constants
                            .iter()
                            .flat_map(|c| c.keys().map(String::as_str)),
                    )
                    .collect();
                let hint = did_you_mean(n, known.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                Some(format!("undefined variable `{{{{ {n} }}}}`: not a parameter or constant of this document{hint}"))
            }
            Expr::Loop { name, .. } => match (loop_name, name) {
                (None, _) => Some(format!(
                    "`{{{{ {expr} }}}}` is used in a step without a loop"
                )),
                (Some(_), None) => None,
                (Some(Some(declared)), Some(used)) if declared == used => None,
                (Some(declared), Some(used)) => Some(format!(
                    "`{{{{ {expr} }}}}` refers to loop `{used}`, but this step's loop is {}",
                    declared
                        .as_ref()
                        .map(|d| format!("named `{d}`"))
                        .unwrap_or_else(|| "unnamed (use `loop.value`)".into())
                )),
            },
            Expr::Chain {
                phase, step, kind, ..
            } => {
                let here = &doc.phases[pi];
                if phase != here.name.as_str() {
                    return Some(format!("`{{{{ {expr} }}}}` chains to phase `{phase}`; a step can only use outputs of earlier steps in its own phase (`{}`)", here.name.as_str()));
                }
                match here.steps.iter().position(|s| &s.name == step) {
                    None => {
                        let names = here.steps.iter().map(|s| s.name.as_str());
                        let hint = did_you_mean(step, names).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default();
                        Some(format!("`{{{{ {expr} }}}}` chains to step `{step}`, which is not in phase `{phase}`{hint}"))
                    }
                    Some(i) if i >= si => Some(format!("`{{{{ {expr} }}}}` chains to step `{step}`, which does not run before this one; chaining reads earlier steps only")),
                    Some(i) => {
                        let target = &here.steps[i];
                        let list_inputs = actions::find(&target.action).is_some_and(|a| a.form == InputForm::List);
                        match (kind, expr) {
                            (ChainKind::Inputs, Expr::Chain { index: None, .. }) if list_inputs => {
                                Some(format!("`{{{{ {expr} }}}}`: the inputs of `{step}` are a list; pick one with an index, e.g. `inputs[0]`"))
                            }
                            _ => None,
                        }
                    }
                }
            }
            Expr::Invalid { text, reason } => {
                Some(format!("cannot understand `{{{{ {text} }}}}`: {reason}"))
            }
        }
    }
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

/// Every string inside `json`, with its path.
fn collect_strings(json: &Json, path: &mut Vec<Seg>, found: &mut Vec<(Vec<Seg>, String)>) {
    match json {
        Json::String(s) => found.push((path.clone(), s.clone())),
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                collect_strings(item, path, found);
                path.pop();
            }
        }
        Json::Object(map) => {
            for (k, v) in map {
                path.push(Seg::Key(k.clone()));
                collect_strings(v, path, found);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The SSM parameter a component parameter value references as `{{ ssm-secure:/name }}` (the
/// whole value), if it does; the agent reads it on the instance.
pub fn secure_reference(value: &str) -> Option<&str> {
    let inner = value
        .trim()
        .strip_prefix("{{")?
        .strip_suffix("}}")?
        .trim()
        .strip_prefix("ssm-secure:")?
        .trim();
    Some(inner)
}

/// A value that mentions `ssm-secure:` must be exactly one reference to a parameter path.
pub fn check_secure_reference(value: &str) -> Result<(), String> {
    if !value.contains("ssm-secure:") {
        return Ok(());
    }
    let Some(name) = secure_reference(value) else {
        return Err(
            "an SSM SecureString is referenced as the whole value: `{{ ssm-secure:/path/name }}`"
                .into(),
        );
    };
    let shaped = name.starts_with('/')
        && name.len() <= 2048
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b))
        && !name.contains("//");
    if shaped {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not an SSM parameter path (`/` then letters, digits, `_`, `.`, `-`, `/`)"
        ))
    }
}
