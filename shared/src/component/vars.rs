//! `{{ … }}` variables in component documents: parameters and constants, loop values, and output
//! chaining (`{{ build.Step.outputs.stdout }}`, `{{ build.Step.inputs[0].destination }}`).

use std::fmt;

/// One `{{ expr }}` found in a string, with its byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    pub start: usize,
    pub end: usize,
    pub expr: Expr,
}

/// What a placeholder refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// A parameter or a constant.
    Name(String),
    /// `loop.index`, `loop.value`, or the same through a named loop.
    Loop {
        name: Option<String>,
        field: LoopField,
    },
    /// `phase.step.(inputs|outputs)[i].field…`
    Chain {
        phase: String,
        step: String,
        kind: ChainKind,
        index: Option<usize>,
        fields: Vec<String>,
    },
    /// Anything else; `reason` says why it is not understood.
    Invalid { text: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopField {
    Index,
    Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Inputs,
    Outputs,
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Name(n) => f.write_str(n),
            Expr::Loop { name, field } => {
                write!(
                    f,
                    "{}.{}",
                    name.as_deref().unwrap_or("loop"),
                    if *field == LoopField::Index {
                        "index"
                    } else {
                        "value"
                    }
                )
            }
            Expr::Chain {
                phase,
                step,
                kind,
                index,
                fields,
            } => {
                write!(
                    f,
                    "{phase}.{step}.{}",
                    if *kind == ChainKind::Inputs {
                        "inputs"
                    } else {
                        "outputs"
                    }
                )?;
                if let Some(i) = index {
                    write!(f, "[{i}]")?;
                }
                for field in fields {
                    write!(f, ".{field}")?;
                }
                Ok(())
            }
            Expr::Invalid { text, .. } => f.write_str(text),
        }
    }
}

pub const PHASES: [&str; 3] = ["build", "validate", "test"];

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Splits `a.b[0].c` into `["a", "b[0]", "c"]` and interprets it.
fn parse_expr(text: &str) -> Expr {
    let invalid = |reason: &str| Expr::Invalid {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let parts: Vec<&str> = text.split('.').collect();
    match parts.as_slice() {
        [single] if is_ident(single) => Expr::Name(single.to_string()),
        [name, field] if is_ident(name) && (*field == "index" || *field == "value") => Expr::Loop {
            name: (*name != "loop").then(|| name.to_string()),
            field: if *field == "index" { LoopField::Index } else { LoopField::Value },
        },
        [phase, step, kind_and_index, fields @ ..] if PHASES.contains(phase) => {
            if !is_ident(step) {
                return invalid("a step name has letters, digits, `_` and `-` only");
            }
            let (kind_text, index) = match kind_and_index.split_once('[') {
                Some((k, rest)) => match rest.strip_suffix(']').and_then(|i| i.parse::<usize>().ok()) {
                    Some(i) => (k, Some(i)),
                    None => return invalid("an index is written `[0]`"),
                },
                None => (*kind_and_index, None),
            };
            let kind = match kind_text {
                "inputs" => ChainKind::Inputs,
                "outputs" => ChainKind::Outputs,
                _ => return invalid("chaining reads `inputs` or `outputs` of a step"),
            };
            if fields.iter().any(|f| !is_ident(f)) {
                return invalid("field names have letters, digits, `_` and `-` only");
            }
            Expr::Chain { phase: phase.to_string(), step: step.to_string(), kind, index, fields: fields.iter().map(|f| f.to_string()).collect() }
        }
        _ => invalid("expected a parameter or constant name, `loop.value`, `loop.index`, or `phase.Step.outputs.field`"),
    }
}

/// Finds every `{{ … }}` in `text`. An opening `{{` without a closing `}}` is not a variable
/// (shell code may contain braces), as with AWSTOE.
pub fn placeholders(text: &str) -> Vec<Placeholder> {
    let mut found = Vec::new();
    let mut pos = 0;
    while let Some(open) = text[pos..].find("{{") {
        let start = pos + open;
        let Some(close) = text[start + 2..].find("}}") else {
            break;
        };
        let end = start + 2 + close + 2;
        let inner = text[start + 2..end - 2].trim();
        found.push(Placeholder {
            start,
            end,
            expr: parse_expr(inner),
        });
        pos = end;
    }
    found
}

/// Replaces each placeholder with what `lookup` returns for it; an expression it cannot resolve
/// is an error naming it.
pub fn substitute(
    text: &str,
    mut lookup: impl FnMut(&Expr) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for p in placeholders(text) {
        out.push_str(&text[last..p.start]);
        match lookup(&p.expr) {
            Some(v) => out.push_str(&v),
            None => return Err(format!("`{{{{ {} }}}}` cannot be resolved", p.expr)),
        }
        last = p.end;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_names_loops_and_chains() {
        let found = placeholders(
            "a {{ Name }} b {{loop.value}} {{ myLoop.index }} {{ build.Dl.inputs[0].destination }}",
        );
        let exprs: Vec<String> = found.iter().map(|p| p.expr.to_string()).collect();
        assert_eq!(
            exprs,
            [
                "Name",
                "loop.value",
                "myLoop.index",
                "build.Dl.inputs[0].destination"
            ]
        );
        assert!(matches!(
            found[3].expr,
            Expr::Chain {
                index: Some(0),
                kind: ChainKind::Inputs,
                ..
            }
        ));
    }

    #[test]
    fn unclosed_braces_are_left_alone() {
        assert!(
            placeholders("awk '{{print $1}' ").is_empty() || placeholders("echo {{ x").is_empty()
        );
        assert!(placeholders("echo {{ x").is_empty());
    }

    #[test]
    fn malformed_expressions_are_invalid_with_a_reason() {
        let p = placeholders("{{ build.Step.stdout }}");
        assert!(matches!(&p[0].expr, Expr::Invalid { reason, .. } if reason.contains("inputs")));
    }

    #[test]
    fn substitute_replaces_and_reports_unknown() {
        let out = substitute("x={{ A }};y={{B}}", |e| match e {
            Expr::Name(n) if n == "A" => Some("1".into()),
            Expr::Name(n) if n == "B" => Some("$(rm -rf /)".into()),
            _ => None,
        });
        assert_eq!(out.as_deref(), Ok("x=1;y=$(rm -rf /)"));
        assert!(substitute("{{ C }}", |_| None).unwrap_err().contains("C"));
    }
}
