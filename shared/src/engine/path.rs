//! JSONPath as Step Functions uses it: reference paths (`$.a.b[0]`, `$['x']`) that select one
//! node, and full JSONPath (`[*]`, `..`, slices, unions, filters) that selects a list.

use serde_json::Value as Json;

#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Key(String),
    Index(i64),
    Wildcard,
    /// `..name` or `..*`
    Descend(Option<String>),
    Slice(Option<i64>, Option<i64>, Option<i64>),
    Union(Vec<Seg>),
    Filter(Filter),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub field: Vec<String>,
    pub op: Option<(String, Json)>,
}

/// A parsed path; the default is `$`, the whole input.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Path {
    /// `$$` paths read the context object.
    pub context: bool,
    /// `$name…` paths read the workflow variable `name`.
    pub variable: Option<String>,
    pub segs: Vec<Seg>,
}

/// Where the engine keeps the workflow variables in scope, inside the context value it hands to
/// path selection (never visible through `$$`).
pub const VARIABLES: &str = "\u{0}variables";

impl Path {
    /// A reference path selects at most one node: no wildcards, filters, slices or unions.
    pub fn is_reference(&self) -> bool {
        self.segs
            .iter()
            .all(|s| matches!(s, Seg::Key(_) | Seg::Index(_)))
    }
}

pub fn parse(text: &str) -> Result<Path, String> {
    let bad = |why: &str| format!("invalid path `{text}`: {why}");
    let (context, rest) = if let Some(r) = text.strip_prefix("$$") {
        (true, r)
    } else if let Some(r) = text.strip_prefix('$') {
        (false, r)
    } else {
        return Err(bad("a path starts with `$`"));
    };
    let mut chars: Vec<char> = rest.chars().collect();
    // `$name` (not `$$`, `$.`, `$[`): a workflow variable, then an ordinary path into it.
    let mut variable = None;
    if !context
        && chars
            .first()
            .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_')
    {
        let end = chars
            .iter()
            .position(|c| matches!(c, '.' | '['))
            .unwrap_or(chars.len());
        let name: String = chars[..end].iter().collect();
        if !is_variable_name(&name) {
            return Err(bad("a variable name has letters, digits and `_`"));
        }
        variable = Some(name);
        chars = chars[end..].to_vec();
    }
    let chars = chars;
    let mut i = 0;
    let mut segs = Vec::new();
    let ident = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && !matches!(chars[*i], '.' | '[') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    while i < chars.len() {
        match chars[i] {
            '.' if chars.get(i + 1) == Some(&'.') => {
                i += 2;
                let name = ident(&mut i);
                segs.push(Seg::Descend(if name == "*" || name.is_empty() {
                    None
                } else {
                    Some(name)
                }));
            }
            '.' => {
                i += 1;
                let name = ident(&mut i);
                if name.is_empty() {
                    return Err(bad("empty field name"));
                }
                segs.push(if name == "*" {
                    Seg::Wildcard
                } else {
                    Seg::Key(name)
                });
            }
            '[' => {
                let mut depth = 0;
                let start = i + 1;
                let mut in_quote: Option<char> = None;
                while i < chars.len() {
                    let c = chars[i];
                    match in_quote {
                        Some(q) if c == q => in_quote = None,
                        Some(_) => {}
                        None if c == '\'' || c == '"' => in_quote = Some(c),
                        None if c == '[' => depth += 1,
                        None if c == ']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        None => {}
                    }
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(bad("`[` is not closed"));
                }
                let inner: String = chars[start..i].iter().collect();
                i += 1;
                segs.push(parse_bracket(inner.trim()).map_err(|e| bad(&e))?);
            }
            _ => return Err(bad("expected `.` or `[`")),
        }
    }
    Ok(Path {
        context,
        variable,
        segs,
    })
}

/// A workflow variable's name: a letter or `_`, then letters, digits and `_`; at most 80
/// characters; `states` is reserved.
pub fn is_variable_name(name: &str) -> bool {
    let mut c = name.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && name.len() <= 80
        && name != "states"
}

fn parse_bracket(inner: &str) -> Result<Seg, String> {
    if inner == "*" {
        return Ok(Seg::Wildcard);
    }
    if let Some(f) = inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')')) {
        return parse_filter(f.trim());
    }
    if inner.contains(',') && !inner.starts_with('\'') && !inner.starts_with('"') {
        return Ok(Seg::Union(
            inner
                .split(',')
                .map(|p| parse_bracket(p.trim()))
                .collect::<Result<_, _>>()?,
        ));
    }
    if let Some(q) = inner
        .strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
    {
        return Ok(Seg::Key(q.to_string()));
    }
    if inner.contains(':') {
        let parts: Vec<&str> = inner.split(':').collect();
        let n = |s: &str| -> Result<Option<i64>, String> {
            if s.trim().is_empty() {
                Ok(None)
            } else {
                s.trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("`{s}` is not a number"))
            }
        };
        return Ok(Seg::Slice(
            n(parts[0])?,
            n(parts.get(1).copied().unwrap_or(""))?,
            n(parts.get(2).copied().unwrap_or(""))?,
        ));
    }
    inner.parse::<i64>().map(Seg::Index).map_err(|_| {
        format!("`[{inner}]` is not an index, a quoted name, `*`, a slice or a filter")
    })
}

fn parse_filter(f: &str) -> Result<Seg, String> {
    let f = f.strip_prefix("@").ok_or("a filter reads `@`")?;
    for op in ["==", "!=", "<=", ">=", "<", ">"] {
        if let Some((lhs, rhs)) = f.split_once(op) {
            let field = lhs
                .trim()
                .trim_start_matches('.')
                .split('.')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let rhs = rhs.trim();
            let value = if let Some(s) = rhs.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
                Json::String(s.to_string())
            } else {
                serde_json::from_str(rhs).map_err(|_| format!("filter value `{rhs}`"))?
            };
            return Ok(Seg::Filter(Filter {
                field,
                op: Some((op.to_string(), value)),
            }));
        }
    }
    let field = f
        .trim()
        .trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Seg::Filter(Filter { field, op: None }))
}

fn index(len: usize, i: i64) -> Option<usize> {
    let i = if i < 0 { len as i64 + i } else { i };
    (0..len as i64).contains(&i).then_some(i as usize)
}

fn apply(seg: &Seg, node: &Json, out: &mut Vec<Json>) {
    match seg {
        Seg::Key(k) => {
            if let Some(v) = node.get(k) {
                out.push(v.clone());
            }
        }
        Seg::Index(i) => {
            if let Some(v) = node
                .as_array()
                .and_then(|a| index(a.len(), *i).map(|i| &a[i]))
            {
                out.push(v.clone());
            }
        }
        Seg::Wildcard => match node {
            Json::Array(a) => out.extend(a.iter().cloned()),
            Json::Object(m) => out.extend(m.values().cloned()),
            _ => {}
        },
        Seg::Descend(name) => {
            fn walk(node: &Json, name: &Option<String>, out: &mut Vec<Json>) {
                match name {
                    Some(n) => {
                        if let Some(v) = node.get(n) {
                            out.push(v.clone());
                        }
                    }
                    None => match node {
                        Json::Array(a) => out.extend(a.iter().cloned()),
                        Json::Object(m) => out.extend(m.values().cloned()),
                        _ => {}
                    },
                }
                match node {
                    Json::Array(a) => a.iter().for_each(|c| walk(c, name, out)),
                    Json::Object(m) => m.values().for_each(|c| walk(c, name, out)),
                    _ => {}
                }
            }
            walk(node, name, out);
        }
        Seg::Slice(start, end, step) => {
            if let Some(a) = node.as_array() {
                let len = a.len() as i64;
                let norm = |v: i64| if v < 0 { (len + v).max(0) } else { v.min(len) };
                let (s, e, st) = (
                    norm(start.unwrap_or(0)),
                    norm(end.unwrap_or(len)),
                    step.unwrap_or(1).max(1),
                );
                let mut i = s;
                while i < e {
                    out.push(a[i as usize].clone());
                    i += st;
                }
            }
        }
        Seg::Union(parts) => parts.iter().for_each(|p| apply(p, node, out)),
        Seg::Filter(f) => {
            let items: Vec<&Json> = match node {
                Json::Array(a) => a.iter().collect(),
                Json::Object(m) => m.values().collect(),
                _ => Vec::new(),
            };
            for item in items {
                let mut v = Some(item);
                for k in &f.field {
                    v = v.and_then(|x| x.get(k));
                }
                let keep = match (&f.op, v) {
                    (None, v) => v.is_some(),
                    (Some(_), None) => false,
                    (Some((op, rhs)), Some(lhs)) => compare(lhs, op, rhs),
                };
                if keep {
                    out.push(item.clone());
                }
            }
        }
    }
}

fn compare(l: &Json, op: &str, r: &Json) -> bool {
    let ord = match (l, r) {
        (Json::Number(a), Json::Number(b)) => a.as_f64().partial_cmp(&b.as_f64()),
        (Json::String(a), Json::String(b)) => Some(a.cmp(b)),
        _ => {
            return match op {
                "==" => l == r,
                "!=" => l != r,
                _ => false,
            }
        }
    };
    let Some(o) = ord else { return false };
    match op {
        "==" => o.is_eq(),
        "!=" => !o.is_eq(),
        "<" => o.is_lt(),
        "<=" => o.is_le(),
        ">" => o.is_gt(),
        _ => o.is_ge(),
    }
}

/// Selects with `path` from `data` (or `context` for `$$`). A reference path yields the one
/// value or an error naming the missing part; any other path yields the list of matches.
pub fn select(path: &Path, data: &Json, context: &Json) -> Result<Json, String> {
    let bare;
    let root = match (&path.variable, path.context) {
        (Some(name), _) => context
            .get(VARIABLES)
            .and_then(|v| v.get(name))
            .ok_or_else(|| format!("The variable `${name}` is not defined"))?,
        (None, true) if context.get(VARIABLES).is_some() => {
            let mut c = context.clone();
            if let Some(m) = c.as_object_mut() {
                m.remove(VARIABLES);
            }
            bare = c;
            &bare
        }
        (None, true) => context,
        (None, false) => data,
    };
    if path.is_reference() {
        let mut node = root;
        for seg in &path.segs {
            let next = match seg {
                Seg::Key(k) => node.get(k),
                Seg::Index(i) => node
                    .as_array()
                    .and_then(|a| index(a.len(), *i).map(|i| &a[i])),
                _ => None,
            };
            node =
                next.ok_or_else(|| format!("the path does not match: no `{}`", describe(seg)))?;
        }
        return Ok(node.clone());
    }
    let mut current = vec![root.clone()];
    for seg in &path.segs {
        let mut next = Vec::new();
        for node in &current {
            apply(seg, node, &mut next);
        }
        current = next;
    }
    Ok(Json::Array(current))
}

fn describe(seg: &Seg) -> String {
    match seg {
        Seg::Key(k) => k.clone(),
        Seg::Index(i) => format!("[{i}]"),
        other => format!("{other:?}"),
    }
}

/// Sets the node at a reference path, creating objects on the way (ResultPath).
pub fn set(target: &mut Json, path: &Path, value: Json) -> Result<(), String> {
    if path.context || path.variable.is_some() || !path.is_reference() {
        return Err("ResultPath must be a reference path into the state input".into());
    }
    if path.segs.is_empty() {
        *target = value;
        return Ok(());
    }
    let mut node = target;
    let last = path.segs.len() - 1;
    for (i, seg) in path.segs.iter().enumerate() {
        match seg {
            Seg::Key(k) => {
                if node.is_null() && i == 0 {
                    *node = Json::Object(Default::default());
                }
                let obj = node
                    .as_object_mut()
                    .ok_or_else(|| format!("cannot set `{k}`: the value there is not an object"))?;
                if i == last {
                    obj.insert(k.clone(), value);
                    return Ok(());
                }
                node = obj
                    .entry(k.clone())
                    .or_insert_with(|| Json::Object(Default::default()));
            }
            Seg::Index(ix) => {
                let arr = node
                    .as_array_mut()
                    .ok_or("cannot index: the value there is not an array")?;
                let len = arr.len();
                let at = index(len, *ix).ok_or_else(|| format!("index {ix} is out of bounds"))?;
                if i == last {
                    arr[at] = value;
                    return Ok(());
                }
                node = &mut arr[at];
            }
            _ => unreachable!("checked is_reference"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(p: &str, d: &Json) -> Result<Json, String> {
        select(&parse(p).expect("parses"), d, &json!({}))
    }

    #[test]
    fn reference_paths_select_one_value() {
        let d = json!({"a": {"b": [10, 20]}, "x y": 1});
        assert_eq!(sel("$.a.b[1]", &d), Ok(json!(20)));
        assert_eq!(sel("$['x y']", &d), Ok(json!(1)));
        assert_eq!(sel("$", &d), Ok(d.clone()));
        assert!(sel("$.nope", &d).is_err());
    }

    #[test]
    fn jsonpath_selects_lists() {
        let d = json!({"items": [{"n": 1, "t": "a"}, {"n": 5, "t": "b"}, {"n": 3}]});
        assert_eq!(sel("$.items[*].n", &d), Ok(json!([1, 5, 3])));
        assert_eq!(sel("$..t", &d), Ok(json!(["a", "b"])));
        assert_eq!(sel("$.items[?(@.n > 2)].n", &d), Ok(json!([5, 3])));
        assert_eq!(sel("$.items[0:2].n", &d), Ok(json!([1, 5])));
        assert_eq!(sel("$.items[?(@.t)].t", &d), Ok(json!(["a", "b"])));
    }

    #[test]
    fn set_creates_objects() {
        let mut d = json!({"a": 1});
        set(&mut d, &parse("$.r.x").expect("p"), json!(2)).expect("set");
        assert_eq!(d, json!({"a": 1, "r": {"x": 2}}));
    }
}
