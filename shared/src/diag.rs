//! Validation errors as users see them: file, line, column, the field path, what is wrong and
//! what would be right. Every checker collects all problems in one pass into `Diagnostics`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::yaml::{Mark, Node, Seg};

/// One problem in one input file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Where in the document, e.g. `phases[0].steps[2].inputs.commands`; empty for the root.
    pub path: String,
    pub message: String,
    /// The values the field accepts, when there is a closed set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if !self.allowed.is_empty() {
            write!(f, " (allowed: {})", self.allowed.join(", "))?;
        }
        Ok(())
    }
}

/// Renders a path as `a.b[0].c`.
pub fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Collects the problems found in one file, locating each by its path in the YAML tree.
#[derive(Debug)]
pub struct Collector<'a> {
    file: &'a Path,
    root: &'a Node,
    pub found: Vec<Diagnostic>,
}

impl<'a> Collector<'a> {
    pub fn new(file: &'a Path, root: &'a Node) -> Self {
        Collector {
            file,
            root,
            found: Vec::new(),
        }
    }

    pub fn file(&self) -> &'a Path {
        self.file
    }

    pub fn root(&self) -> &'a Node {
        self.root
    }

    /// An error about the value at `path`.
    pub fn at(&mut self, path: &[Seg], message: impl Into<String>) {
        let mark = self.root.locate(path);
        self.at_mark(mark, path, message, Vec::new());
    }

    /// An error about the value at `path` that has a closed set of allowed values.
    pub fn at_with_allowed(
        &mut self,
        path: &[Seg],
        message: impl Into<String>,
        allowed: Vec<String>,
    ) {
        let mark = self.root.locate(path);
        self.at_mark(mark, path, message, allowed);
    }

    /// An error about the key (not the value) at the end of `path`, e.g. an unknown field.
    pub fn at_key(&mut self, path: &[Seg], message: impl Into<String>, allowed: Vec<String>) {
        let mark = match path.split_last() {
            Some((Seg::Key(k), parent)) => {
                let parent_mark = self.root.locate(parent);
                let parent_node = locate_node(self.root, parent);
                parent_node
                    .and_then(|n| n.key_mark(k))
                    .unwrap_or(parent_mark)
            }
            _ => self.root.locate(path),
        };
        self.at_mark(mark, path, message, allowed);
    }

    pub fn at_mark(
        &mut self,
        mark: Mark,
        path: &[Seg],
        message: impl Into<String>,
        allowed: Vec<String>,
    ) {
        self.found.push(Diagnostic {
            file: self.file.to_path_buf(),
            line: mark.line,
            column: mark.column,
            path: render_path(path),
            message: message.into(),
            allowed,
        });
    }
}

/// The node at exactly `path`, if it exists.
pub fn locate_node<'n>(root: &'n Node, path: &[Seg]) -> Option<&'n Node> {
    let mut node = root;
    for seg in path {
        node = match (&node.value, seg) {
            (crate::yaml::Value::Map(entries), Seg::Key(k)) => entries
                .iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v)?,
            (crate::yaml::Value::Seq(items), Seg::Index(i)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

/// "did you mean" for a misspelt name: the closest candidate within a small edit distance.
pub fn did_you_mean<'c>(
    given: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let given_lower = given.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&given_lower, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// All problems found, sorted by position.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: impl IntoIterator<Item = Diagnostic>) {
        self.0.extend(other);
    }

    pub fn sorted(mut self) -> Self {
        self.0.sort_by(|a, b| {
            (&a.file, a.line, a.column, &a.message).cmp(&(&b.file, b.line, b.column, &b.message))
        });
        self.0.dedup();
        self
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
