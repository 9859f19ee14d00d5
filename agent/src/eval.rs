//! Evaluates conditions (`if` and Assert) on this machine, with AWSTOE's conversions: numeric
//! comparisons read strings as numbers (false when they are not), string comparisons are not
//! case-sensitive and do not trim.

use std::path::Path;

use kiln::component::condition::{Condition, Operator};
use serde_json::Value as Json;

fn text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

fn number(v: &Json) -> Option<f64> {
    match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(v: &Json) -> Option<bool> {
    match v {
        Json::Bool(b) => Some(*b),
        Json::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Json::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Is `name` an executable on PATH (or an executable path)?
pub fn binary_exists(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        return executable(Path::new(name));
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| executable(&d.join(name))))
}

fn file_hash(op: Operator, path: &str) -> Option<String> {
    use sha2::Digest;
    let data = std::fs::read(path).ok()?;
    Some(match op {
        Operator::FileMd5Equals => hex::encode(md5::Md5::digest(&data)),
        Operator::FileSha1Equals => hex::encode(sha1::Sha1::digest(&data)),
        Operator::FileSha256Equals => hex::encode(sha2::Sha256::digest(&data)),
        _ => hex::encode(sha2::Sha512::digest(&data)),
    })
}

/// Evaluates a condition whose variables are already resolved. An invalid regular expression
/// is an error; everything else is true or false.
pub fn evaluate(cond: &Condition) -> Result<bool, String> {
    Ok(match cond {
        Condition::And(items) => {
            for c in items {
                if !evaluate(c)? {
                    return Ok(false);
                }
            }
            true
        }
        Condition::Or(items) => {
            for c in items {
                if evaluate(c)? {
                    return Ok(true);
                }
            }
            false
        }
        Condition::Not(c) => !evaluate(c)?,
        Condition::Compare {
            op,
            operand,
            value,
            path,
        } => {
            let value = value.clone().unwrap_or(Json::Null);
            let (a, b) = (text(operand).to_lowercase(), text(&value).to_lowercase());
            let num = || number(operand).zip(number(&value));
            match op {
                Operator::StringIsEmpty => text(operand).is_empty(),
                Operator::StringIsWhitespace => {
                    let t = text(operand);
                    !t.is_empty() && t.chars().all(char::is_whitespace)
                }
                Operator::StringEquals => a == b,
                Operator::StringLessThan => b < a,
                Operator::StringLessThanEquals => b <= a,
                Operator::StringGreaterThan => b > a,
                Operator::StringGreaterThanEquals => b >= a,
                Operator::PatternMatches => {
                    let re = regex::Regex::new(&text(operand))
                        .map_err(|e| format!("invalid pattern: {e}"))?;
                    re.is_match(&text(&value))
                }
                // "value is less than the operand", as AWSTOE reads `numberLessThan: 10, value: x`.
                Operator::NumberEquals => num().is_some_and(|(x, v)| v == x),
                Operator::NumberLessThan => num().is_some_and(|(x, v)| v < x),
                Operator::NumberLessThanEquals => num().is_some_and(|(x, v)| v <= x),
                Operator::NumberGreaterThan => num().is_some_and(|(x, v)| v > x),
                Operator::NumberGreaterThanEquals => num().is_some_and(|(x, v)| v >= x),
                Operator::BooleanEquals => boolean(operand)
                    .zip(boolean(&value))
                    .is_some_and(|(x, v)| x == v),
                Operator::FileExists => Path::new(&text(operand)).is_file(),
                Operator::FolderExists => Path::new(&text(operand)).is_dir(),
                Operator::BinaryExists => binary_exists(&text(operand)),
                Operator::FileMd5Equals
                | Operator::FileSha1Equals
                | Operator::FileSha256Equals
                | Operator::FileSha512Equals => path
                    .as_deref()
                    .and_then(|p| file_hash(*op, p))
                    .is_some_and(|h| h.eq_ignore_ascii_case(text(operand).trim())),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(j: Json) -> Condition {
        let mut problems = Vec::new();
        kiln::component::condition::parse(&j, &mut Vec::new(), &mut problems)
            .expect("valid condition")
    }

    #[test]
    fn strings_compare_without_case_and_numbers_convert() {
        assert!(evaluate(&cond(json!({"stringEquals": "Hello", "value": "hello"}))).expect("ok"));
        assert!(!evaluate(&cond(json!({"stringEquals": "Hello ", "value": "hello"}))).expect("ok"));
        assert!(evaluate(&cond(json!({"numberEquals": 1, "value": "1.0"}))).expect("ok"));
        assert!(!evaluate(&cond(json!({"numberEquals": 1, "value": "a10"}))).expect("ok"));
        assert!(evaluate(&cond(json!({"numberLessThan": 10, "value": 3}))).expect("ok"));
        assert!(evaluate(&cond(json!({"stringIsWhitespace": "  "}))).expect("ok"));
        assert!(!evaluate(&cond(json!({"stringIsWhitespace": ""}))).expect("ok"));
    }

    #[test]
    fn logic_and_the_host() {
        assert!(evaluate(&cond(
            json!({"and": [{"binaryExists": "bash"}, {"not": {"fileExists": "/nonexistent"}}]})
        ))
        .expect("ok"));
        assert!(evaluate(&cond(
            json!({"or": [{"folderExists": "/nonexistent"}, {"folderExists": "/"}]})
        ))
        .expect("ok"));
    }
}
