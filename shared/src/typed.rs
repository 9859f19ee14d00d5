//! Reads a YAML tree into JSON, guided by a JSON Schema generated from our serde types
//! (schemars), collecting every mismatch with its location. The Rust types stay the one source of
//! truth: the same schema is what `kiln schema` prints for editors.

use std::collections::HashMap;

use serde_json::{Map, Value as Json};

use crate::diag::{did_you_mean, Collector};
use crate::yaml::{Node, Seg, Value};

/// How lenient the reading is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A scalar holding a `{{ variable }}` may fill a number or boolean field: its type is only
    /// known once the variable is resolved at run time (AWSTOE allows this in action inputs).
    pub templates_fill_any_scalar: bool,
}

/// A schema document (root plus `$defs`) ready to check nodes against.
#[derive(Debug)]
pub struct Shape {
    root: Json,
    defs: Map<String, Json>,
    regexes: std::sync::Mutex<HashMap<String, Option<regex::Regex>>>,
}

impl Shape {
    pub fn new(schema: schemars::Schema) -> Self {
        let mut root = schema.to_value();
        let defs = root
            .as_object_mut()
            .and_then(|o| o.remove("$defs"))
            .and_then(|d| d.as_object().cloned())
            .unwrap_or_default();
        Shape {
            root,
            defs,
            regexes: Default::default(),
        }
    }

    pub fn of<T: schemars::JsonSchema>() -> Self {
        Shape::new(schemars::schema_for!(T))
    }

    /// Reads `node` (found at `path` within the file) into JSON, reporting mismatches to `out`.
    /// Returns `None` when anything was wrong.
    pub fn read(
        &self,
        node: &Node,
        path: &mut Vec<Seg>,
        out: &mut Collector<'_>,
        opts: Options,
    ) -> Option<Json> {
        let before = out.found.len();
        let value = self.read_lenient(node, path, out, opts);
        (out.found.len() == before).then_some(value)
    }

    /// Like `read`, but returns what could be read even when there were problems: unknown fields
    /// and values of the wrong type are left out, so later checks can still run on the rest.
    pub fn read_lenient(
        &self,
        node: &Node,
        path: &mut Vec<Seg>,
        out: &mut Collector<'_>,
        opts: Options,
    ) -> Json {
        self.walk(&self.root, node, path, out, opts)
    }

    fn resolve<'s>(&'s self, schema: &'s Json) -> &'s Json {
        let mut s = schema;
        for _ in 0..32 {
            match s
                .get("$ref")
                .and_then(Json::as_str)
                .and_then(|r| r.strip_prefix("#/$defs/"))
            {
                Some(name) => match self.defs.get(name) {
                    Some(def) => s = def,
                    None => return s,
                },
                None => return s,
            }
        }
        s
    }

    fn walk(
        &self,
        schema: &Json,
        node: &Node,
        path: &mut Vec<Seg>,
        out: &mut Collector<'_>,
        opts: Options,
    ) -> Json {
        let schema = self.resolve(schema);
        let Some(obj) = schema.as_object() else {
            // `true` accepts anything.
            return to_json(node);
        };
        if let Some(branches) = obj
            .get("oneOf")
            .or_else(|| obj.get("anyOf"))
            .and_then(Json::as_array)
        {
            return self.walk_alternatives(branches, node, path, out, opts);
        }
        if let Some(allowed) = obj.get("enum").and_then(Json::as_array) {
            return check_enum(allowed, node, path, out);
        }
        if let Some(c) = obj.get("const") {
            return check_enum(std::slice::from_ref(c), node, path, out);
        }
        let types: Vec<&str> = match obj.get("type") {
            Some(Json::String(t)) => vec![t.as_str()],
            Some(Json::Array(ts)) => ts.iter().filter_map(Json::as_str).collect(),
            _ => return to_json(node),
        };
        if node.is_null() && types.contains(&"null") {
            return Json::Null;
        }
        match &node.value {
            Value::Map(entries) if types.contains(&"object") => {
                self.walk_object(obj, entries, path, out, opts)
            }
            Value::Seq(items) if types.contains(&"array") => {
                if let Some(min) = obj.get("minItems").and_then(Json::as_u64) {
                    if (items.len() as u64) < min {
                        out.at(
                            path,
                            format!(
                                "needs at least {min} item{}",
                                if min == 1 { "" } else { "s" }
                            ),
                        );
                    }
                }
                let item_schema = obj.get("items").cloned().unwrap_or(Json::Bool(true));
                let mut arr = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    arr.push(self.walk(&item_schema, item, path, out, opts));
                    path.pop();
                }
                Json::Array(arr)
            }
            Value::Scalar { text, quoted } => {
                self.walk_scalar(obj, &types, text, *quoted, node, path, out, opts)
            }
            _ => {
                out.at(
                    path,
                    format!(
                        "expected {}, found {}",
                        describe_types(&types),
                        describe_node(node)
                    ),
                );
                Json::Null
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_scalar(
        &self,
        obj: &Map<String, Json>,
        types: &[&str],
        text: &str,
        quoted: bool,
        node: &Node,
        path: &[Seg],
        out: &mut Collector<'_>,
        opts: Options,
    ) -> Json {
        let templated = opts.templates_fill_any_scalar && text.contains("{{");
        if !quoted && !templated {
            if types.contains(&"integer") {
                if let Ok(i) = text.parse::<i64>() {
                    check_range(obj, i as f64, path, out);
                    return Json::from(i);
                }
            }
            if types.contains(&"number") {
                if let Ok(f) = text.parse::<f64>() {
                    check_range(obj, f, path, out);
                    return serde_json::Number::from_f64(f)
                        .map(Json::Number)
                        .unwrap_or(Json::Null);
                }
            }
            if types.contains(&"boolean") {
                match text {
                    "true" | "True" | "TRUE" => return Json::Bool(true),
                    "false" | "False" | "FALSE" => return Json::Bool(false),
                    _ => {}
                }
            }
        }
        if types.contains(&"string") && (quoted || !node.is_null()) {
            if let Some(pattern) = obj.get("pattern").and_then(Json::as_str) {
                if !templated && !self.matches(pattern, text) {
                    let hint = obj
                        .get("description")
                        .and_then(Json::as_str)
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default();
                    out.at(path, format!("`{text}` is not valid here{hint}"));
                }
            }
            return Json::String(text.to_string());
        }
        if templated {
            return Json::String(text.to_string());
        }
        out.at(
            path,
            format!(
                "expected {}, found {}",
                describe_types(types),
                describe_node(node)
            ),
        );
        Json::Null
    }

    fn matches(&self, pattern: &str, text: &str) -> bool {
        let mut cache = self
            .regexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let re = cache
            .entry(pattern.to_string())
            .or_insert_with(|| regex::Regex::new(pattern).ok());
        re.as_ref().is_none_or(|re| re.is_match(text))
    }

    fn walk_object(
        &self,
        obj: &Map<String, Json>,
        entries: &[(Node, Node)],
        path: &mut Vec<Seg>,
        out: &mut Collector<'_>,
        opts: Options,
    ) -> Json {
        let empty = Map::new();
        let props = obj
            .get("properties")
            .and_then(Json::as_object)
            .unwrap_or(&empty);
        let additional = obj.get("additionalProperties");
        let mut result = Map::new();
        let mut suggested = Vec::new();
        for (k, v) in entries {
            let key = k.as_str().unwrap_or_default().to_string();
            path.push(Seg::Key(key.clone()));
            if let Some(prop_schema) = props.get(&key) {
                let value = self.walk(prop_schema, v, path, out, opts);
                // An explicit null for an optional field means "not set"; a value that failed to
                // read (null from a non-null node) is left out.
                if !value.is_null() {
                    result.insert(key, value);
                }
            } else {
                match additional {
                    Some(Json::Bool(false)) => {
                        let names: Vec<&str> = props.keys().map(String::as_str).collect();
                        let suggestion = did_you_mean(&key, names.iter().copied());
                        suggested.extend(suggestion.map(str::to_string));
                        let hint = suggestion
                            .map(|s| format!("; did you mean `{s}`?"))
                            .unwrap_or_default();
                        out.at_key(
                            path,
                            format!("unknown field `{key}`{hint}"),
                            names.iter().map(|s| s.to_string()).collect(),
                        );
                    }
                    Some(s @ Json::Object(_)) => {
                        let value = self.walk(s, v, path, out, opts);
                        result.insert(key, value);
                    }
                    _ => {
                        result.insert(key, to_json(v));
                    }
                }
            }
            path.pop();
        }
        if let Some(required) = obj.get("required").and_then(Json::as_array) {
            for name in required.iter().filter_map(Json::as_str) {
                // A misspelt required field was already reported with the suggestion.
                if !entries.iter().any(|(k, _)| k.as_str() == Some(name))
                    && !suggested.iter().any(|s| s == name)
                {
                    out.at(path, format!("missing required field `{name}`"));
                }
            }
        }
        Json::Object(result)
    }

    fn walk_alternatives(
        &self,
        branches: &[Json],
        node: &Node,
        path: &mut Vec<Seg>,
        out: &mut Collector<'_>,
        opts: Options,
    ) -> Json {
        let branches: Vec<&Json> = branches.iter().map(|b| self.resolve(b)).collect();
        let is_null_branch = |b: &&Json| b.get("type").and_then(Json::as_str) == Some("null");
        if node.is_null() && branches.iter().any(is_null_branch) {
            return Json::Null;
        }
        let branches: Vec<&Json> = branches
            .into_iter()
            .filter(|b| !is_null_branch(b))
            .collect();

        if let [only] = branches.as_slice() {
            return self.walk(only, node, path, out, opts);
        }

        // An enum whose variants carry descriptions: one `const` (or `enum`) per branch.
        let consts: Option<Vec<Json>> = branches
            .iter()
            .map(|b| {
                b.get("const")
                    .map(|c| vec![c.clone()])
                    .or_else(|| b.get("enum").and_then(Json::as_array).cloned())
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect());
        if let Some(allowed) = consts {
            return check_enum(&allowed, node, path, out);
        }

        // An externally tagged enum: each branch is an object with one required key (its tag).
        let tags: Vec<&str> = branches.iter().filter_map(|b| single_tag(b)).collect();
        if tags.len() == branches.len() && !tags.is_empty() {
            if let Value::Map(entries) = &node.value {
                let present: Vec<&str> = entries
                    .iter()
                    .filter_map(|(k, _)| k.as_str())
                    .filter(|k| tags.contains(k))
                    .collect();
                let allowed: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
                match present.as_slice() {
                    [one] => {
                        let idx = tags.iter().position(|t| t == one).unwrap_or(0);
                        return self.walk(branches[idx], node, path, out, opts);
                    }
                    [] => {
                        let unknown = entries
                            .first()
                            .and_then(|(k, _)| k.as_str())
                            .unwrap_or_default();
                        let hint = did_you_mean(unknown, tags.iter().copied())
                            .map(|s| format!("; did you mean `{s}`?"))
                            .unwrap_or_default();
                        out.at_with_allowed(
                            path,
                            format!("needs exactly one of the allowed keys{hint}"),
                            allowed,
                        );
                    }
                    many => out.at_with_allowed(
                        path,
                        format!("sets {} at once; choose exactly one", many.join(" and ")),
                        allowed,
                    ),
                }
                return Json::Null;
            }
        }

        // Otherwise: the first branch that reads cleanly wins; failing that, report the branch
        // that matches the node's kind best.
        let mut best: Option<(usize, Vec<crate::diag::Diagnostic>, Json)> = None;
        for branch in &branches {
            let mut trial = Collector::new(out.file(), out_root(out));
            let value = self.walk(branch, node, path, &mut trial, opts);
            if trial.found.is_empty() {
                return value;
            }
            let score =
                kind_score(branch, node) * 1000 + 999usize.saturating_sub(trial.found.len());
            if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                best = Some((score, trial.found, value));
            }
        }
        match best {
            Some((score, found, value)) if score >= 1000 => {
                out.found.extend(found);
                value
            }
            _ => {
                let kinds: Vec<String> = branches.iter().map(|b| describe_schema(b)).collect();
                out.at(
                    path,
                    format!(
                        "expected {}, found {}",
                        kinds.join(" or "),
                        describe_node(node)
                    ),
                );
                Json::Null
            }
        }
    }
}

fn out_root<'a>(out: &Collector<'a>) -> &'a Node {
    out.root()
}

fn single_tag(branch: &Json) -> Option<&str> {
    let obj = branch.as_object()?;
    let required = obj.get("required")?.as_array()?;
    let props = obj.get("properties")?.as_object()?;
    match (required.as_slice(), props.len()) {
        ([only], 1) => only.as_str(),
        _ => None,
    }
}

/// 1 when the branch's type fits the node's kind (map, list, scalar), else 0.
fn kind_score(branch: &Json, node: &Node) -> usize {
    if branch.get("oneOf").is_some() || branch.get("anyOf").is_some() {
        return 1;
    }
    let types: Vec<&str> = match branch.get("type") {
        Some(Json::String(t)) => vec![t.as_str()],
        Some(Json::Array(ts)) => ts.iter().filter_map(Json::as_str).collect(),
        _ => {
            return usize::from(
                branch.get("enum").is_some() && matches!(node.value, Value::Scalar { .. }),
            )
        }
    };
    let fits = match node.value {
        Value::Map(_) => types.contains(&"object"),
        Value::Seq(_) => types.contains(&"array"),
        Value::Scalar { .. } => types
            .iter()
            .any(|t| matches!(*t, "string" | "integer" | "number" | "boolean")),
    };
    usize::from(fits)
}

fn check_range(obj: &Map<String, Json>, v: f64, path: &[Seg], out: &mut Collector<'_>) {
    if let Some(min) = obj.get("minimum").and_then(Json::as_f64) {
        if v < min {
            out.at(path, format!("must be at least {min}"));
        }
    }
    if let Some(max) = obj.get("maximum").and_then(Json::as_f64) {
        if v > max {
            out.at(path, format!("must be at most {max}"));
        }
    }
}

fn check_enum(allowed: &[Json], node: &Node, path: &[Seg], out: &mut Collector<'_>) -> Json {
    let names: Vec<String> = allowed
        .iter()
        .map(|a| {
            a.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| a.to_string())
        })
        .collect();
    match node.as_str() {
        Some(text) if names.iter().any(|n| n == text) => Json::String(text.to_string()),
        Some(text) => {
            let hint = did_you_mean(text, names.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            out.at_with_allowed(
                path,
                format!("`{text}` is not an allowed value{hint}"),
                names,
            );
            Json::Null
        }
        None => {
            out.at_with_allowed(
                path,
                format!(
                    "expected one of the allowed values, found {}",
                    describe_node(node)
                ),
                names,
            );
            Json::Null
        }
    }
}

/// A node as JSON with YAML's usual meaning for plain scalars.
pub fn to_json(node: &Node) -> Json {
    match &node.value {
        Value::Scalar { text, quoted: true } => Json::String(text.clone()),
        Value::Scalar {
            text,
            quoted: false,
        } => {
            if node.is_null() {
                Json::Null
            } else if let Ok(i) = text.parse::<i64>() {
                Json::from(i)
            } else if let Some(n) = text
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(serde_json::Number::from_f64)
            {
                Json::Number(n)
            } else {
                match text.as_str() {
                    "true" | "True" | "TRUE" => Json::Bool(true),
                    "false" | "False" | "FALSE" => Json::Bool(false),
                    _ => Json::String(text.clone()),
                }
            }
        }
        Value::Seq(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

pub fn describe_node(node: &Node) -> String {
    match &node.value {
        _ if node.is_null() => "nothing (null)".into(),
        Value::Scalar { text, .. } => format!("`{}`", truncate(text, 40)),
        Value::Seq(_) => "a list".into(),
        Value::Map(_) => "a map".into(),
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn describe_types(types: &[&str]) -> String {
    let words: Vec<&str> = types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| match *t {
            "string" => "a string",
            "integer" => "a whole number",
            "number" => "a number",
            "boolean" => "true or false",
            "array" => "a list",
            "object" => "a map",
            other => other,
        })
        .collect();
    words.join(" or ")
}

fn describe_schema(schema: &Json) -> String {
    if let Some(tag) = single_tag(schema) {
        return format!("a map with `{tag}`");
    }
    match schema.get("type") {
        Some(Json::String(t)) => describe_types(&[t.as_str()]),
        Some(Json::Array(ts)) => {
            describe_types(&ts.iter().filter_map(Json::as_str).collect::<Vec<_>>())
        }
        _ if schema.get("enum").is_some() => "one of the allowed values".into(),
        _ => "a value".into(),
    }
}
