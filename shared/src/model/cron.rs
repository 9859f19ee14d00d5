//! EventBridge cron expressions: `cron(Minutes Hours Day-of-month Month Day-of-week Year)`, the
//! six-field syntax of EventBridge rules and EventBridge Scheduler.

use std::fmt;

/// A parsed, valid cron expression. `text` is the six fields, without `cron( )`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    pub text: String,
    pub fields: [Field; 6],
}

/// One field: either "any" (`*` or `?`) or a list of terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Any,
    Terms(Vec<Term>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// `a`, `a-b`, `a/step`, `a-b/step`, `*/step`
    Range { from: u32, to: u32, step: u32 },
    /// `L` in day-of-month: the last day; `nL` in day-of-week: the last weekday n of the month.
    Last(Option<u32>),
    /// `nW`: the weekday nearest day n.
    NearestWeekday(u32),
    /// `d#n`: the n-th weekday d of the month.
    Nth { weekday: u32, nth: u32 },
}

struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

const SPECS: [Spec; 6] = [
    Spec {
        name: "minutes",
        min: 0,
        max: 59,
        names: &[],
    },
    Spec {
        name: "hours",
        min: 0,
        max: 23,
        names: &[],
    },
    Spec {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
    },
    Spec {
        name: "month",
        min: 1,
        max: 12,
        names: MONTHS,
    },
    Spec {
        name: "day-of-week",
        min: 1,
        max: 7,
        names: DAYS,
    },
    Spec {
        name: "year",
        min: 1970,
        max: 2199,
        names: &[],
    },
];

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cron({})", self.text)
    }
}

impl Cron {
    /// Parses `cron(…)` or the bare six fields. The error says which field is wrong and why.
    pub fn parse(input: &str) -> Result<Cron, String> {
        let trimmed = input.trim();
        if trimmed.starts_with("rate(") {
            return Err("rate expressions are not supported; write a cron expression such as `cron(0 4 ? * SUN *)`".into());
        }
        let inner = match trimmed.strip_prefix("cron(") {
            Some(rest) => rest
                .strip_suffix(')')
                .ok_or("`cron(` is not closed with `)`")?,
            None => trimmed,
        };
        let parts: Vec<&str> = inner.split_whitespace().collect();
        if parts.len() != 6 {
            return Err(format!(
                "a cron expression has six fields (minutes hours day-of-month month day-of-week year), found {}; e.g. `cron(0 4 ? * SUN *)`",
                parts.len()
            ));
        }
        let mut fields: Vec<Field> = Vec::with_capacity(6);
        for (i, (part, spec)) in parts.iter().zip(SPECS.iter()).enumerate() {
            fields.push(
                parse_field(part, spec, i)
                    .map_err(|e| format!("{} field `{part}`: {e}", spec.name))?,
            );
        }
        let dom_q = parts[2] == "?";
        let dow_q = parts[4] == "?";
        if dom_q == dow_q {
            return Err("exactly one of day-of-month and day-of-week must be `?` (EventBridge cannot match both)".into());
        }
        let fields: [Field; 6] = fields.try_into().map_err(|_| "six fields")?;
        Ok(Cron {
            text: parts.join(" "),
            fields,
        })
    }
}

fn parse_value(text: &str, spec: &Spec) -> Result<u32, String> {
    if let Some(pos) = spec.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        return Ok(pos as u32 + 1);
    }
    let v: u32 = text.parse().map_err(|_| {
        if spec.names.is_empty() {
            format!("`{text}` is not a number")
        } else {
            format!(
                "`{text}` is not a number or one of {}",
                spec.names.join(",")
            )
        }
    })?;
    if v < spec.min || v > spec.max {
        return Err(format!("{v} is outside {}-{}", spec.min, spec.max));
    }
    Ok(v)
}

fn parse_field(text: &str, spec: &Spec, index: usize) -> Result<Field, String> {
    if text == "*" {
        return Ok(Field::Any);
    }
    if text == "?" {
        return if index == 2 || index == 4 {
            Ok(Field::Any)
        } else {
            Err("`?` is only allowed in day-of-month and day-of-week".into())
        };
    }
    let mut terms = Vec::new();
    for term in text.split(',') {
        terms.push(parse_term(term, spec, index)?);
    }
    Ok(Field::Terms(terms))
}

fn parse_term(term: &str, spec: &Spec, index: usize) -> Result<Term, String> {
    if term.is_empty() {
        return Err("empty list item".into());
    }
    if index == 2 {
        if term == "L" {
            return Ok(Term::Last(None));
        }
        if let Some(day) = term.strip_suffix('W') {
            return Ok(Term::NearestWeekday(parse_value(day, spec)?));
        }
    }
    if index == 4 {
        if term == "L" {
            return Ok(Term::Last(Some(7)));
        }
        if let Some(day) = term.strip_suffix('L') {
            return Ok(Term::Last(Some(parse_value(day, spec)?)));
        }
        if let Some((day, nth)) = term.split_once('#') {
            let weekday = parse_value(day, spec)?;
            let nth: u32 = nth
                .parse()
                .map_err(|_| format!("`#{nth}` needs a number 1-5"))?;
            if !(1..=5).contains(&nth) {
                return Err(format!(
                    "`#{nth}`: a weekday occurs at most 5 times a month"
                ));
            }
            return Ok(Term::Nth { weekday, nth });
        }
    }
    if term.contains(['L', 'W', '#'])
        && spec
            .names
            .iter()
            .all(|n| !term.to_ascii_uppercase().contains(n))
    {
        return Err(format!(
            "`{term}`: L, W and # are only allowed in the day fields"
        ));
    }
    let (range, step) = match term.split_once('/') {
        Some((r, s)) => {
            let step: u32 = s
                .parse()
                .map_err(|_| format!("step `/{s}` is not a number"))?;
            if step == 0 {
                return Err("a step of 0 never advances".into());
            }
            (r, step)
        }
        None => (term, 1),
    };
    let (from, to) = if range == "*" {
        (spec.min, spec.max)
    } else if let Some((a, b)) = range.split_once('-') {
        let (a, b) = (parse_value(a, spec)?, parse_value(b, spec)?);
        if a > b {
            return Err(format!("range {a}-{b} runs backwards"));
        }
        (a, b)
    } else {
        let v = parse_value(range, spec)?;
        (v, if term.contains('/') { spec.max } else { v })
    };
    Ok(Term::Range { from, to, step })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_eventbridge_examples() {
        for ok in [
            "cron(0 10 * * ? *)",
            "cron(15 12 * * ? *)",
            "cron(0 18 ? * MON-FRI *)",
            "cron(0 8 1 * ? *)",
            "cron(0/15 * * * ? *)",
            "0/10 * ? * MON-FRI *",
            "cron(0/5 8-17 ? * MON-FRI *)",
            "cron(0 9 ? * 2#1 *)",
            "cron(0 0 L * ? *)",
            "cron(0 0 15W * ? *)",
            "cron(0 0 ? * 6L 2027)",
        ] {
            assert!(Cron::parse(ok).is_ok(), "{ok}: {:?}", Cron::parse(ok));
        }
    }

    #[test]
    fn rejects_with_a_reason() {
        let cases = [
            (
                "cron(0 10 * * * *)",
                "exactly one of day-of-month and day-of-week",
            ),
            ("cron(0 10 * *)", "six fields"),
            (
                "cron(60 10 * * ? *)",
                "minutes field `60`: 60 is outside 0-59",
            ),
            ("cron(0 10 ? * FUN *)", "day-of-week field `FUN`"),
            ("rate(5 minutes)", "rate expressions"),
            ("cron(0 ? * * ? *)", "hours field"),
            ("cron(*/0 * ? * * *)", "step of 0"),
        ];
        for (input, want) in cases {
            let err = Cron::parse(input).expect_err(input);
            assert!(err.contains(want), "{input}: {err}");
        }
    }
}
