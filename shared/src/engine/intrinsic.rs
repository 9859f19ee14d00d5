//! Intrinsic functions: `States.Format('{} {}', $.a, 1)` and the rest, nested calls included.

use base64::Engine as _;
use serde_json::{json, Value as Json};

use super::path;

#[derive(Debug, Clone, PartialEq)]
enum Arg {
    Literal(Json),
    Path(String),
    Call(String, Vec<Arg>),
}

/// Is this string an intrinsic call (`States.X(…)`)?
pub fn is_call(s: &str) -> bool {
    s.trim_start().starts_with("States.") && s.trim_end().ends_with(')')
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn err(&self, why: &str) -> String {
        format!("invalid intrinsic function `{}`: {why}", self.text)
    }
    fn ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }
    fn call(&mut self) -> Result<Arg, String> {
        let start = self.pos;
        while self
            .chars
            .get(self.pos)
            .is_some_and(|c| c.is_alphanumeric() || *c == '.')
        {
            self.pos += 1;
        }
        let name: String = self.chars[start..self.pos].iter().collect();
        self.ws();
        if self.chars.get(self.pos) != Some(&'(') {
            return Err(self.err("expected `(`"));
        }
        self.pos += 1;
        let mut args = Vec::new();
        loop {
            self.ws();
            if self.chars.get(self.pos) == Some(&')') {
                self.pos += 1;
                break;
            }
            args.push(self.arg()?);
            self.ws();
            match self.chars.get(self.pos) {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(self.err("expected `,` or `)`")),
            }
        }
        Ok(Arg::Call(name, args))
    }
    fn arg(&mut self) -> Result<Arg, String> {
        self.ws();
        match self.chars.get(self.pos) {
            Some('\'') => {
                self.pos += 1;
                let mut s = String::new();
                loop {
                    match self.chars.get(self.pos) {
                        None => return Err(self.err("unterminated string")),
                        Some('\\') => {
                            s.push(
                                *self
                                    .chars
                                    .get(self.pos + 1)
                                    .ok_or_else(|| self.err("dangling escape"))?,
                            );
                            self.pos += 2;
                        }
                        Some('\'') => {
                            self.pos += 1;
                            break;
                        }
                        Some(c) => {
                            s.push(*c);
                            self.pos += 1;
                        }
                    }
                }
                Ok(Arg::Literal(Json::String(s)))
            }
            Some('$') => {
                let start = self.pos;
                let mut depth = 0;
                while let Some(c) = self.chars.get(self.pos) {
                    match c {
                        '[' | '(' => depth += 1,
                        ']' => depth -= 1,
                        ')' if depth == 0 => break,
                        ')' => depth -= 1,
                        ',' if depth == 0 => break,
                        _ => {}
                    }
                    self.pos += 1;
                }
                Ok(Arg::Path(
                    self.chars[start..self.pos]
                        .iter()
                        .collect::<String>()
                        .trim()
                        .to_string(),
                ))
            }
            Some(c)
                if c.is_ascii_alphabetic()
                    && self.chars[self.pos..]
                        .iter()
                        .collect::<String>()
                        .starts_with("States.") =>
            {
                self.call()
            }
            Some(_) => {
                let start = self.pos;
                while self
                    .chars
                    .get(self.pos)
                    .is_some_and(|c| *c != ',' && *c != ')')
                {
                    self.pos += 1;
                }
                let text: String = self.chars[start..self.pos].iter().collect();
                serde_json::from_str(text.trim())
                    .map(Arg::Literal)
                    .map_err(|_| self.err(&format!("`{}` is not a literal", text.trim())))
            }
            None => Err(self.err("unexpected end")),
        }
    }
}

fn parse(text: &str) -> Result<Arg, String> {
    let mut p = Parser {
        chars: text.trim().chars().collect(),
        pos: 0,
        text,
    };
    let call = p.call()?;
    p.ws();
    if p.pos != p.chars.len() {
        return Err(p.err("unexpected text after the call"));
    }
    Ok(call)
}

/// Checks an intrinsic call's syntax (for the definition checker).
pub fn check(text: &str) -> Result<(), String> {
    parse(text).map(|_| ())
}

/// Evaluates an intrinsic call against the state input and the context object. Errors are
/// States.IntrinsicFailure causes.
pub fn evaluate(text: &str, input: &Json, context: &Json) -> Result<Json, String> {
    eval(&parse(text)?, input, context)
}

fn eval(arg: &Arg, input: &Json, context: &Json) -> Result<Json, String> {
    match arg {
        Arg::Literal(v) => Ok(v.clone()),
        Arg::Path(p) => path::select(&path::parse(p)?, input, context),
        Arg::Call(name, args) => {
            let vals: Vec<Json> = args
                .iter()
                .map(|a| eval(a, input, context))
                .collect::<Result<_, _>>()?;
            call(name, &vals)
        }
    }
}

fn want<'a>(name: &str, vals: &'a [Json], n: usize) -> Result<&'a [Json], String> {
    if vals.len() != n {
        return Err(format!(
            "{name} takes {n} argument{}, got {}",
            if n == 1 { "" } else { "s" },
            vals.len()
        ));
    }
    Ok(vals)
}

fn as_str<'a>(name: &str, v: &'a Json) -> Result<&'a str, String> {
    v.as_str()
        .ok_or_else(|| format!("{name}: expected a string, got {v}"))
}

fn as_int(name: &str, v: &Json) -> Result<i64, String> {
    v.as_i64()
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
        .ok_or_else(|| format!("{name}: expected an integer, got {v}"))
}

/// An argument of `States.Format` as Step Functions renders it: strings as they are, arrays as
/// `[a, b]`, objects as `{key=value, key=value}` (its Java `toString`), other values as JSON.
fn text_of(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Array(a) => format!("[{}]", a.iter().map(text_of).collect::<Vec<_>>().join(", ")),
        Json::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{k}={}", text_of(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// A `States.MathAdd` operand: Step Functions rounds a non-integer half up (`floor(x + 0.5)`:
/// 1.5 → 2, 2.5 → 3, −1.5 → −1, −2.5 → −2), as its recorded executions show.
fn rounded(name: &str, v: &Json) -> Result<i64, String> {
    v.as_i64()
        .or_else(|| v.as_f64().map(|f| (f + 0.5).floor() as i64))
        .ok_or_else(|| format!("{name}: expected a number, got {v}"))
}

fn random_u64() -> u64 {
    uuid::Uuid::new_v4().as_u128() as u64
}

fn call(name: &str, v: &[Json]) -> Result<Json, String> {
    Ok(match name {
        "States.Format" => {
            let fmt = as_str(
                name,
                v.first().ok_or("States.Format needs a format string")?,
            )?;
            let mut out = String::new();
            let mut args = v[1..].iter();
            let mut chars = fmt.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '{' && chars.peek() == Some(&'}') {
                    chars.next();
                    out.push_str(&text_of(
                        args.next()
                            .ok_or("States.Format has more {} than arguments")?,
                    ));
                } else {
                    out.push(c);
                }
            }
            if args.next().is_some() {
                return Err("States.Format has more arguments than {}".into());
            }
            json!(out)
        }
        "States.StringToJson" => {
            let text = as_str(name, &want(name, v, 1)?[0])?;
            // An empty or blank string is null in Step Functions, not an error.
            if text.trim().is_empty() {
                Json::Null
            } else {
                serde_json::from_str(text).map_err(|e| format!("States.StringToJson: {e}"))?
            }
        }
        "States.JsonToString" => {
            json!(serde_json::to_string(&want(name, v, 1)?[0]).map_err(|e| e.to_string())?)
        }
        "States.Array" => Json::Array(v.to_vec()),
        "States.ArrayPartition" => {
            let v = want(name, v, 2)?;
            let arr = v[0]
                .as_array()
                .ok_or("States.ArrayPartition: expected an array")?;
            let size = as_int(name, &v[1])?;
            if size <= 0 {
                return Err("States.ArrayPartition: the chunk size must be positive".into());
            }
            Json::Array(
                arr.chunks(size as usize)
                    .map(|c| Json::Array(c.to_vec()))
                    .collect(),
            )
        }
        "States.ArrayContains" => {
            let v = want(name, v, 2)?;
            json!(v[0]
                .as_array()
                .ok_or("States.ArrayContains: expected an array")?
                .contains(&v[1]))
        }
        "States.ArrayRange" => {
            let v = want(name, v, 3)?;
            let (start, end, step) = (
                as_int(name, &v[0])?,
                as_int(name, &v[1])?,
                as_int(name, &v[2])?,
            );
            if step == 0 {
                return Err("States.ArrayRange: the step must not be 0".into());
            }
            let mut out = Vec::new();
            let mut i = start;
            while (step > 0 && i <= end) || (step < 0 && i >= end) {
                out.push(json!(i));
                if out.len() > 1000 {
                    return Err("States.ArrayRange: at most 1000 items".into());
                }
                i += step;
            }
            Json::Array(out)
        }
        "States.ArrayGetItem" => {
            let v = want(name, v, 2)?;
            let arr = v[0]
                .as_array()
                .ok_or("States.ArrayGetItem: expected an array")?;
            let i = as_int(name, &v[1])?;
            arr.get(usize::try_from(i).map_err(|_| "States.ArrayGetItem: negative index")?)
                .cloned()
                .ok_or("States.ArrayGetItem: index out of bounds")?
        }
        "States.ArrayLength" => json!(want(name, v, 1)?[0]
            .as_array()
            .ok_or("States.ArrayLength: expected an array")?
            .len()),
        "States.ArrayUnique" => {
            let arr = want(name, v, 1)?[0]
                .as_array()
                .ok_or("States.ArrayUnique: expected an array")?;
            let mut out: Vec<Json> = Vec::new();
            for x in arr {
                if !out.contains(x) {
                    out.push(x.clone());
                }
            }
            Json::Array(out)
        }
        "States.Base64Encode" => {
            json!(base64::engine::general_purpose::STANDARD
                .encode(as_str(name, &want(name, v, 1)?[0])?))
        }
        "States.Base64Decode" => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(as_str(name, &want(name, v, 1)?[0])?)
                .map_err(|e| format!("States.Base64Decode: {e}"))?;
            json!(String::from_utf8(bytes).map_err(|_| "States.Base64Decode: not UTF-8")?)
        }
        "States.Hash" => {
            use sha2::Digest;
            let v = want(name, v, 2)?;
            let data = text_of(&v[0]);
            let data = data.as_bytes();
            json!(match as_str(name, &v[1])? {
                "MD5" => hex::encode(md5::Md5::digest(data)),
                "SHA-1" => hex::encode(sha1::Sha1::digest(data)),
                "SHA-256" => hex::encode(sha2::Sha256::digest(data)),
                "SHA-384" => hex::encode(sha2::Sha384::digest(data)),
                "SHA-512" => hex::encode(sha2::Sha512::digest(data)),
                other => return Err(format!("States.Hash: unknown algorithm `{other}` (MD5, SHA-1, SHA-256, SHA-384, SHA-512)")),
            })
        }
        "States.JsonMerge" => {
            let v = want(name, v, 3)?;
            if v[2] != json!(false) {
                return Err(
                    "States.JsonMerge: only shallow merges (false) are supported, as in AWS".into(),
                );
            }
            let (mut a, b) = (
                v[0].as_object()
                    .cloned()
                    .ok_or("States.JsonMerge: expected objects")?,
                v[1].as_object()
                    .ok_or("States.JsonMerge: expected objects")?,
            );
            for (k, x) in b {
                a.insert(k.clone(), x.clone());
            }
            Json::Object(a)
        }
        "States.MathRandom" => {
            if v.len() != 2 && v.len() != 3 {
                return Err("States.MathRandom takes a start, an end and an optional seed".into());
            }
            let (start, end) = (as_int(name, &v[0])?, as_int(name, &v[1])?);
            if end <= start {
                return Err("States.MathRandom: the end must be greater than the start".into());
            }
            let r = match v.get(2) {
                Some(seed) => (as_int(name, seed)? as u64)
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407),
                None => random_u64(),
            };
            json!(start + (r % (end - start) as u64) as i64)
        }
        "States.MathAdd" => {
            let v = want(name, v, 2)?;
            json!(rounded(name, &v[0])? + rounded(name, &v[1])?)
        }
        "States.StringSplit" => {
            let v = want(name, v, 2)?;
            let (s, d) = (as_str(name, &v[0])?, as_str(name, &v[1])?);
            // Every character of the delimiter string is a delimiter; empty parts are dropped.
            Json::Array(
                s.split(|c| d.contains(c))
                    .filter(|p| !p.is_empty())
                    .map(|p| json!(p))
                    .collect(),
            )
        }
        "States.UUID" => {
            want(name, v, 0)?;
            json!(uuid::Uuid::new_v4().to_string())
        }
        other => return Err(format!("unknown intrinsic function `{other}`")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str, input: Json) -> Result<Json, String> {
        evaluate(s, &input, &json!({}))
    }

    #[test]
    fn intrinsics_compute() {
        assert_eq!(
            ev(
                "States.Format('Hello, {}! {}', $.name, 3)",
                json!({"name": "kiln"})
            ),
            Ok(json!("Hello, kiln! 3"))
        );
        assert_eq!(
            ev(
                "States.ArrayPartition(States.ArrayRange(1, 5, 1), 2)",
                json!({})
            ),
            Ok(json!([[1, 2], [3, 4], [5]]))
        );
        assert_eq!(
            ev("States.StringSplit('a,b;;c', ',;')", json!({})),
            Ok(json!(["a", "b", "c"]))
        );
        assert_eq!(
            ev("States.Hash('input data', 'SHA-1')", json!({})),
            Ok(json!("aaff4a450a104cd177d28d18d74485e8cae074b7"))
        );
        assert_eq!(
            ev(
                "States.Base64Decode(States.Base64Encode('Data to encode'))",
                json!({})
            ),
            Ok(json!("Data to encode"))
        );
        assert_eq!(
            ev(
                "States.JsonMerge($.a, $.b, false)",
                json!({"a": {"x": 1, "y": 1}, "b": {"y": 2}})
            ),
            Ok(json!({"x": 1, "y": 2}))
        );
        assert_eq!(
            ev("States.Format('it\\'s {}', 'x')", json!({})),
            Ok(json!("it's x"))
        );
        assert!(ev("States.Nope()", json!({})).is_err());
    }
}
