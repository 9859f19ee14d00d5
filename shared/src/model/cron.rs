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

impl Term {
    /// Whether `v` (a plain value of the field) matches a range term; the calendar terms are
    /// matched by [`Cron::day_matches`].
    fn matches(&self, v: u32) -> bool {
        match *self {
            Term::Range { from, to, step } => v >= from && v <= to && (v - from) % step.max(1) == 0,
            _ => false,
        }
    }
}

impl Field {
    fn matches(&self, v: u32) -> bool {
        match self {
            Field::Any => true,
            Field::Terms(terms) => terms.iter().any(|t| t.matches(v)),
        }
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    use chrono::NaiveDate;
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    };
    next.and_then(|n| n.pred_opt())
        .map(|d| chrono::Datelike::day(&d))
        .unwrap_or(28)
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cron({})", self.text)
    }
}

impl Cron {
    /// Whether the calendar day matches the year, month, day-of-month and day-of-week fields.
    pub fn day_matches(&self, day: chrono::NaiveDate) -> bool {
        use chrono::Datelike;
        let [_, _, dom, month, dow, year] = &self.fields;
        if !year.matches(day.year() as u32) || !month.matches(day.month()) {
            return false;
        }
        let last = days_in_month(day.year(), day.month());
        let weekday = day.weekday().num_days_from_sunday() + 1;
        let dom_ok = match dom {
            Field::Any => true,
            Field::Terms(terms) => terms.iter().any(|t| match *t {
                Term::Last(_) => day.day() == last,
                Term::NearestWeekday(n) => {
                    // The weekday nearest day n, within the month.
                    let n = n.min(last);
                    let Some(target) = day.with_day(n) else {
                        return false;
                    };
                    let wd = target.weekday().num_days_from_sunday();
                    let nearest = match wd {
                        6 if n == 1 => n + 2,
                        6 => n - 1,
                        0 if n == last => n - 2,
                        0 => n + 1,
                        _ => n,
                    };
                    day.day() == nearest
                }
                _ => t.matches(day.day()),
            }),
        };
        let dow_ok = match dow {
            Field::Any => true,
            Field::Terms(terms) => terms.iter().any(|t| match *t {
                Term::Last(Some(d)) => weekday == d && day.day() + 7 > last,
                Term::Last(None) => weekday == 7,
                Term::Nth { weekday: d, nth } => weekday == d && (day.day() - 1) / 7 + 1 == nth,
                _ => t.matches(weekday),
            }),
        };
        dom_ok && dow_ok
    }

    /// The first time after `after` the expression fires, read in `after`'s time zone (local
    /// times that do not exist in a DST gap are skipped; ambiguous ones fire at the first).
    pub fn next_after<Tz: chrono::TimeZone>(
        &self,
        after: &chrono::DateTime<Tz>,
    ) -> Option<chrono::DateTime<Tz>> {
        let tz = after.timezone();
        let start = after.naive_local().date();
        let [minutes, hours, ..] = &self.fields;
        for offset in 0..(366 * 5) {
            let day = start + chrono::Duration::days(offset);
            if !self.day_matches(day) {
                continue;
            }
            for h in (0..24).filter(|h| hours.matches(*h)) {
                for m in (0..60).filter(|m| minutes.matches(*m)) {
                    let Some(naive) = day.and_hms_opt(h, m, 0) else {
                        continue;
                    };
                    if let Some(t) = tz.from_local_datetime(&naive).earliest() {
                        if t > *after {
                            return Some(t);
                        }
                    }
                }
            }
        }
        None
    }

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

#[cfg(test)]
mod next_tests {
    use super::Cron;
    use chrono::TimeZone;

    fn next(expr: &str, tz: chrono_tz::Tz, after: (i32, u32, u32, u32, u32)) -> String {
        let (y, mo, d, h, mi) = after;
        let t = tz
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("time");
        Cron::parse(expr)
            .expect("valid")
            .next_after(&t)
            .expect("fires")
            .to_rfc3339()
    }

    #[test]
    fn next_fire_times_follow_the_fields_and_the_time_zone() {
        use chrono_tz::{America::New_York, Europe::Berlin, UTC};
        // Mondays at 03:00 in New York: Monday 2026-11-30, EST (-05:00).
        assert_eq!(
            next("cron(0 3 ? * MON *)", New_York, (2026, 11, 27, 9, 0)),
            "2026-11-30T03:00:00-05:00"
        );
        // Sundays 04:00 in Berlin, across the DST change of 2027-03-28 (CET -> CEST).
        assert_eq!(
            next("cron(0 4 ? * SUN *)", Berlin, (2027, 3, 27, 12, 0)),
            "2027-03-28T04:00:00+02:00"
        );
        // Every 15 minutes.
        assert_eq!(
            next("cron(0/15 * * * ? *)", UTC, (2026, 1, 1, 10, 7)),
            "2026-01-01T10:15:00+00:00"
        );
        // The last day of the month, the last Friday, the second Tuesday, the weekday nearest the 15th.
        assert_eq!(
            next("cron(0 0 L * ? *)", UTC, (2027, 2, 3, 0, 0)),
            "2027-02-28T00:00:00+00:00"
        );
        assert_eq!(
            next("cron(0 0 ? * 6L *)", UTC, (2026, 11, 1, 0, 0)),
            "2026-11-27T00:00:00+00:00"
        );
        assert_eq!(
            next("cron(0 0 ? * 3#2 *)", UTC, (2026, 12, 1, 0, 0)),
            "2026-12-08T00:00:00+00:00"
        );
        assert_eq!(
            next("cron(0 0 15W * ? *)", UTC, (2026, 8, 1, 0, 0)),
            "2026-08-14T00:00:00+00:00"
        );
        // A year that has passed never fires.
        let t = UTC
            .with_ymd_and_hms(2030, 1, 1, 0, 0, 0)
            .single()
            .expect("time");
        assert!(Cron::parse("cron(0 0 1 1 ? 2029)")
            .expect("valid")
            .next_after(&t)
            .is_none());
    }
}
