//! Choice rules: comparisons (and their `…Path` forms), type tests, And / Or / Not.

use serde_json::Value as Json;

use super::error::StateError;
use super::path;

/// Comparison operators and the type of value each compares.
const OPERATORS: &[(&str, &str)] = &[
    ("StringEquals", "string"),
    ("StringLessThan", "string"),
    ("StringGreaterThan", "string"),
    ("StringLessThanEquals", "string"),
    ("StringGreaterThanEquals", "string"),
    ("StringMatches", "string"),
    ("NumericEquals", "number"),
    ("NumericLessThan", "number"),
    ("NumericGreaterThan", "number"),
    ("NumericLessThanEquals", "number"),
    ("NumericGreaterThanEquals", "number"),
    ("BooleanEquals", "boolean"),
    ("TimestampEquals", "timestamp"),
    ("TimestampLessThan", "timestamp"),
    ("TimestampGreaterThan", "timestamp"),
    ("TimestampLessThanEquals", "timestamp"),
    ("TimestampGreaterThanEquals", "timestamp"),
    ("IsNull", "boolean"),
    ("IsPresent", "boolean"),
    ("IsNumeric", "boolean"),
    ("IsString", "boolean"),
    ("IsBoolean", "boolean"),
    ("IsTimestamp", "boolean"),
];

fn operator_of(rule: &serde_json::Map<String, Json>) -> Vec<&str> {
    rule.keys()
        .map(String::as_str)
        .filter(|k| {
            OPERATORS
                .iter()
                .any(|(o, _)| *o == *k || k.strip_suffix("Path") == Some(o))
                || matches!(*k, "And" | "Or" | "Not")
        })
        .collect()
}

/// Static checks of one rule.
pub fn check(rule: &Json, at: &str, top: bool, report: &mut dyn FnMut(String, String)) {
    let Some(obj) = rule.as_object() else {
        report(at.into(), "a choice rule is an object".into());
        return;
    };
    let ops = operator_of(obj);
    let [op] = ops.as_slice() else {
        report(
            at.into(),
            if ops.is_empty() {
                "a choice rule needs a comparison operator or And/Or/Not".into()
            } else {
                format!("a choice rule has one operator, found {}", ops.join(", "))
            },
        );
        return;
    };
    for k in obj.keys() {
        let ok = k == op
            || (k == "Next" && top)
            || (k == "Assign" && top)
            || (k == "Variable" && !matches!(*op, "And" | "Or" | "Not"))
            || k == "Comment";
        if !ok {
            report(
                format!("{at}/{k}"),
                if k == "Next" {
                    "Next is only allowed on top-level choice rules".into()
                } else {
                    format!("field `{k}` is not allowed in this choice rule")
                },
            );
        }
    }
    if top && !obj.contains_key("Next") {
        report(at.into(), "a top-level choice rule needs Next".into());
    }
    match *op {
        "And" | "Or" => match obj[*op].as_array() {
            Some(list) if !list.is_empty() => {
                for (i, r) in list.iter().enumerate() {
                    check(r, &format!("{at}/{op}/{i}"), false, report);
                }
            }
            _ => report(
                format!("{at}/{op}"),
                format!("{op} takes a non-empty list of rules"),
            ),
        },
        "Not" => check(&obj["Not"], &format!("{at}/Not"), false, report),
        _ => {
            match obj.get("Variable").and_then(Json::as_str) {
                Some(v) => {
                    if let Err(e) = path::parse(v) {
                        report(format!("{at}/Variable"), e);
                    }
                }
                None => report(at.into(), "a comparison needs Variable".into()),
            }
            let value = &obj[*op];
            if op
                .strip_suffix("Path")
                .is_some_and(|b| OPERATORS.iter().any(|(o, _)| *o == b))
            {
                match value.as_str().map(path::parse) {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => report(format!("{at}/{op}"), e),
                    None => report(format!("{at}/{op}"), "expected a path".into()),
                }
                return;
            }
            let ty = OPERATORS
                .iter()
                .find(|(o, _)| o == op)
                .map(|(_, t)| *t)
                .unwrap_or("string");
            let fits = match ty {
                "string" => value.is_string(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                _ => value
                    .as_str()
                    .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
            };
            if !fits {
                report(
                    format!("{at}/{op}"),
                    format!("{op} compares with a {ty}, found {value}"),
                );
            }
        }
    }
}

/// `*` matches any run of characters; `\*` is a literal star and `\\` a backslash.
pub fn string_matches(pattern: &str, text: &str) -> bool {
    #[derive(PartialEq)]
    enum T {
        Star,
        Ch(char),
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => toks.push(T::Ch(chars.next().unwrap_or('\\'))),
            '*' => toks.push(T::Star),
            c => toks.push(T::Ch(c)),
        }
    }
    let text: Vec<char> = text.chars().collect();
    // Iterative wildcard matching with backtracking to the last star.
    let (mut p, mut t, mut star, mut mark) = (0usize, 0usize, None, 0usize);
    while t < text.len() {
        if p < toks.len() && toks[p] == T::Ch(text[t]) {
            p += 1;
            t += 1;
        } else if p < toks.len() && toks[p] == T::Star {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while p < toks.len() && toks[p] == T::Star {
        p += 1;
    }
    p == toks.len()
}

fn timestamp(v: &Json) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
}

/// Evaluates a rule. A Variable that matches nothing is a States.Runtime error, except for
/// IsPresent.
pub fn evaluate(rule: &Json, input: &Json, context: &Json) -> Result<bool, StateError> {
    let obj = rule
        .as_object()
        .ok_or_else(|| StateError::new("States.Runtime", "invalid choice rule"))?;
    if let Some(list) = obj.get("And").and_then(Json::as_array) {
        for r in list {
            if !evaluate(r, input, context)? {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    if let Some(list) = obj.get("Or").and_then(Json::as_array) {
        for r in list {
            if evaluate(r, input, context)? {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    if let Some(r) = obj.get("Not") {
        return Ok(!evaluate(r, input, context)?);
    }
    let runtime = |m: String| StateError::new("States.Runtime", m);
    let var_text = obj
        .get("Variable")
        .and_then(Json::as_str)
        .ok_or_else(|| runtime("a comparison needs Variable".into()))?;
    let var_path = path::parse(var_text).map_err(runtime)?;
    let ops = operator_of(obj);
    let op = *ops.first().ok_or_else(|| runtime("no operator".into()))?;
    let found = path::select(&var_path, input, context);
    if op == "IsPresent" {
        let present = found.as_ref().is_ok_and(|v| {
            !(v.is_array() && !var_path.is_reference() && v.as_array().is_some_and(Vec::is_empty))
        });
        return Ok(present == (obj[op] == Json::Bool(true)));
    }
    let var = found.map_err(|e| runtime(format!("Invalid path '{var_text}': {e}")))?;
    let (base, operand) = match op
        .strip_suffix("Path")
        .filter(|b| OPERATORS.iter().any(|(o, _)| o == b))
    {
        Some(base) => {
            let p = obj[op]
                .as_str()
                .ok_or_else(|| runtime(format!("{op} takes a path")))?;
            let v = path::select(&path::parse(p).map_err(runtime)?, input, context)
                .map_err(|e| runtime(format!("Invalid path '{p}': {e}")))?;
            (base, v)
        }
        None => (op, obj[op].clone()),
    };
    let want = |b: bool| obj[op] == Json::Bool(b);
    Ok(match base {
        "IsNull" => var.is_null() == want(true),
        "IsNumeric" => var.is_number() == want(true),
        "IsString" => var.is_string() == want(true),
        "IsBoolean" => var.is_boolean() == want(true),
        "IsTimestamp" => timestamp(&var).is_some() == want(true),
        "BooleanEquals" => var.is_boolean() && var == operand,
        "StringMatches" => match (var.as_str(), operand.as_str()) {
            (Some(v), Some(p)) => string_matches(p, v),
            _ => false,
        },
        s if s.starts_with("String") => match (var.as_str(), operand.as_str()) {
            (Some(a), Some(b)) => cmp(s.trim_start_matches("String"), a.cmp(b)),
            _ => false,
        },
        s if s.starts_with("Numeric") => match (var.as_f64(), operand.as_f64()) {
            (Some(a), Some(b)) => a
                .partial_cmp(&b)
                .is_some_and(|o| cmp(s.trim_start_matches("Numeric"), o)),
            _ => false,
        },
        s if s.starts_with("Timestamp") => match (timestamp(&var), timestamp(&operand)) {
            (Some(a), Some(b)) => cmp(s.trim_start_matches("Timestamp"), a.cmp(&b)),
            _ => false,
        },
        other => return Err(runtime(format!("unknown operator {other}"))),
    })
}

fn cmp(suffix: &str, o: std::cmp::Ordering) -> bool {
    match suffix {
        "Equals" => o.is_eq(),
        "LessThan" => o.is_lt(),
        "GreaterThan" => o.is_gt(),
        "LessThanEquals" => o.is_le(),
        _ => o.is_ge(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matches_with_escapes() {
        assert!(string_matches("log-*.txt", "log-2024.txt"));
        assert!(!string_matches("log-*.txt", "log-2024.csv"));
        assert!(string_matches("a\\*b", "a*b"));
        assert!(!string_matches("a\\*b", "axb"));
        assert!(string_matches("*", ""));
    }
}
