//! Conditions: the `if` construct of a step and the inputs of the Assert action. Comparison
//! operators, `and`, `or` and `not`, as AWSTOE documents them.

use serde_json::Value as Json;

use crate::yaml::Seg;

/// A comparison operator and what it needs besides its own operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    StringIsEmpty,
    StringIsWhitespace,
    StringEquals,
    StringLessThan,
    StringLessThanEquals,
    StringGreaterThan,
    StringGreaterThanEquals,
    PatternMatches,
    NumberEquals,
    NumberLessThan,
    NumberLessThanEquals,
    NumberGreaterThan,
    NumberGreaterThanEquals,
    BooleanEquals,
    FileExists,
    FolderExists,
    BinaryExists,
    FileMd5Equals,
    FileSha1Equals,
    FileSha256Equals,
    FileSha512Equals,
}

/// The extra key an operator needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    Value,
    Path,
}

pub const OPERATORS: &[(&str, Operator, Needs)] = &[
    ("stringIsEmpty", Operator::StringIsEmpty, Needs::Nothing),
    (
        "stringIsWhitespace",
        Operator::StringIsWhitespace,
        Needs::Nothing,
    ),
    ("stringEquals", Operator::StringEquals, Needs::Value),
    ("stringLessThan", Operator::StringLessThan, Needs::Value),
    (
        "stringLessThanEquals",
        Operator::StringLessThanEquals,
        Needs::Value,
    ),
    (
        "stringGreaterThan",
        Operator::StringGreaterThan,
        Needs::Value,
    ),
    (
        "stringGreaterThanEquals",
        Operator::StringGreaterThanEquals,
        Needs::Value,
    ),
    ("patternMatches", Operator::PatternMatches, Needs::Value),
    ("numberEquals", Operator::NumberEquals, Needs::Value),
    ("numberLessThan", Operator::NumberLessThan, Needs::Value),
    (
        "numberLessThanEquals",
        Operator::NumberLessThanEquals,
        Needs::Value,
    ),
    (
        "numberGreaterThan",
        Operator::NumberGreaterThan,
        Needs::Value,
    ),
    (
        "numberGreaterThanEquals",
        Operator::NumberGreaterThanEquals,
        Needs::Value,
    ),
    ("booleanEquals", Operator::BooleanEquals, Needs::Value),
    ("fileExists", Operator::FileExists, Needs::Nothing),
    ("folderExists", Operator::FolderExists, Needs::Nothing),
    ("binaryExists", Operator::BinaryExists, Needs::Nothing),
    ("fileMD5Equals", Operator::FileMd5Equals, Needs::Path),
    ("fileSHA1Equals", Operator::FileSha1Equals, Needs::Path),
    ("fileSHA256Equals", Operator::FileSha256Equals, Needs::Path),
    ("fileSHA512Equals", Operator::FileSha512Equals, Needs::Path),
];

const LOGICAL: [&str; 3] = ["and", "or", "not"];

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    And(Vec<Condition>),
    Or(Vec<Condition>),
    Not(Box<Condition>),
    Compare {
        op: Operator,
        operand: Json,
        value: Option<Json>,
        path: Option<String>,
    },
}

/// A problem in a condition, relative to where the condition starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub path: Vec<Seg>,
    pub message: String,
    pub allowed: Vec<String>,
}

fn all_keys() -> Vec<String> {
    LOGICAL
        .iter()
        .copied()
        .chain(OPERATORS.iter().map(|(n, _, _)| *n))
        .map(str::to_string)
        .collect()
}

/// Parses a condition, collecting every problem.
pub fn parse(json: &Json, path: &mut Vec<Seg>, problems: &mut Vec<Problem>) -> Option<Condition> {
    let mut problem = |path: &[Seg], message: String, allowed: Vec<String>| {
        problems.push(Problem {
            path: path.to_vec(),
            message,
            allowed,
        })
    };
    let Some(map) = json.as_object() else {
        problem(
            path,
            "a condition is a map, e.g. `stringEquals: 'x'` with `value: …`".into(),
            Vec::new(),
        );
        return None;
    };
    let ops: Vec<&String> = map
        .keys()
        .filter(|k| LOGICAL.contains(&k.as_str()) || OPERATORS.iter().any(|(n, _, _)| n == k))
        .collect();
    let [op_name] = ops.as_slice() else {
        let message = if ops.is_empty() {
            let unknown = map
                .keys()
                .find(|k| *k != "value" && *k != "path")
                .cloned()
                .unwrap_or_default();
            let names = all_keys();
            let hint = crate::diag::did_you_mean(&unknown, names.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            format!("needs one comparison operator or `and`/`or`/`not`{hint}")
        } else {
            format!(
                "has {} operators; a condition has exactly one (combine them with `and`/`or`)",
                ops.len()
            )
        };
        problem(path, message, all_keys());
        return None;
    };
    let op_name = op_name.as_str();
    let operand = &map[op_name];
    path.push(Seg::Key(op_name.to_string()));
    let result = match op_name {
        "and" | "or" => match operand.as_array() {
            Some(items) if !items.is_empty() => {
                let mut parsed = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    parsed.push(parse(item, path, problems));
                    path.pop();
                }
                let parsed: Option<Vec<Condition>> = parsed.into_iter().collect();
                parsed.map(|p| {
                    if op_name == "and" {
                        Condition::And(p)
                    } else {
                        Condition::Or(p)
                    }
                })
            }
            _ => {
                problems.push(Problem {
                    path: path.clone(),
                    message: format!("`{op_name}` takes a non-empty list of conditions"),
                    allowed: Vec::new(),
                });
                None
            }
        },
        "not" => parse(operand, path, problems).map(|c| Condition::Not(Box::new(c))),
        _ => {
            let (_, op, needs) = OPERATORS
                .iter()
                .find(|(n, _, _)| *n == op_name)
                .copied()
                .expect("listed operator");
            let mut ok = true;
            if operand.is_object() || operand.is_array() {
                problems.push(Problem {
                    path: path.clone(),
                    message: format!("`{op_name}` compares a single value, not a list or map"),
                    allowed: Vec::new(),
                });
                ok = false;
            }
            path.pop();
            let allowed_extra: &[&str] = match needs {
                Needs::Nothing => &[],
                Needs::Value => &["value"],
                Needs::Path => &["path"],
            };
            for key in map.keys().filter(|k| k.as_str() != op_name) {
                if !allowed_extra.contains(&key.as_str()) {
                    path.push(Seg::Key(key.clone()));
                    problems.push(Problem {
                        path: path.clone(),
                        message: format!("`{op_name}` does not take `{key}`"),
                        allowed: allowed_extra.iter().map(|s| s.to_string()).collect(),
                    });
                    path.pop();
                    ok = false;
                }
            }
            for key in allowed_extra {
                if !map.contains_key(*key) {
                    problems.push(Problem {
                        path: path.clone(),
                        message: format!("`{op_name}` needs `{key}`"),
                        allowed: Vec::new(),
                    });
                    ok = false;
                }
            }
            if op == Operator::PatternMatches {
                if let Some(p) = operand.as_str().filter(|p| !p.contains("{{")) {
                    if let Err(e) = regex::Regex::new(p) {
                        path.push(Seg::Key(op_name.to_string()));
                        problems.push(Problem {
                            path: path.clone(),
                            message: format!("invalid regular expression: {e}"),
                            allowed: Vec::new(),
                        });
                        path.pop();
                        ok = false;
                    }
                }
            }
            path.push(Seg::Key(op_name.to_string()));
            ok.then(|| Condition::Compare {
                op,
                operand: operand.clone(),
                value: map.get("value").cloned(),
                path: map.get("path").and_then(Json::as_str).map(str::to_string),
            })
        }
    };
    path.pop();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems_of(j: &Json) -> Vec<String> {
        let mut problems = Vec::new();
        parse(j, &mut Vec::new(), &mut problems);
        problems.into_iter().map(|p| p.message).collect()
    }

    #[test]
    fn nested_logic_parses() {
        let mut problems = Vec::new();
        let c = parse(
            &json!({"and": [{"stringEquals": "a", "value": "a"}, {"not": {"binaryExists": "unzip"}}]}),
            &mut Vec::new(),
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(matches!(c, Some(Condition::And(v)) if v.len() == 2));
    }

    #[test]
    fn missing_value_and_typo_are_reported() {
        assert_eq!(
            problems_of(&json!({"stringEquals": "a"})),
            ["`stringEquals` needs `value`"]
        );
        assert!(problems_of(&json!({"stringEqual": "a", "value": "b"}))[0]
            .contains("did you mean `stringEquals`"));
        assert!(
            problems_of(&json!({"stringEquals": "a", "numberEquals": 1, "value": "b"}))[0]
                .contains("exactly one")
        );
    }
}
