//! YAML read into a tree that remembers where every node came from, so that every error can point
//! at a line and column of the user's file.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based position in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Mark {
    fn from(m: Marker) -> Self {
        // yaml-rust2 reports 1-based lines and 0-based columns.
        Mark {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// A YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub mark: Mark,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar keeps its source text; what it means (string, number, bool, null) depends on the
    /// field it fills, as in Go's YAML decoding that AWSTOE uses (`schemaVersion: 1.0` is "1.0").
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// One step of a path into a document: a map key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A problem found while reading YAML, before any schema applies.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxProblem {
    pub mark: Mark,
    pub message: String,
}

impl Node {
    /// A plain `null`, `~` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, quoted: false } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The node at `path`, or the deepest node on the way there (errors about a missing field
    /// point at the map that lacks it). For a key segment the mark of the key is returned when
    /// `key_mark` is set, so "unknown field" points at the field name.
    pub fn locate(&self, path: &[Seg]) -> Mark {
        let mut node = self;
        for seg in path {
            let next = match (&node.value, seg) {
                (Value::Map(entries), Seg::Key(k)) => entries
                    .iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v),
                (Value::Seq(items), Seg::Index(i)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return node.mark,
            }
        }
        node.mark
    }

    /// The mark of the key `key` in this map, if present.
    pub fn key_mark(&self, key: &str) -> Option<Mark> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(k, _)| k.mark),
            _ => None,
        }
    }
}

/// Parse one YAML document. Syntax errors, duplicate keys, non-scalar keys and multiple
/// documents are reported with their positions; an empty file is an empty map.
pub fn parse(text: &str) -> Result<Node, Vec<SyntaxProblem>> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(vec![SyntaxProblem {
            mark: (*e.marker()).into(),
            message: e.info().to_string(),
        }]);
    }
    if builder.documents.len() > 1 {
        builder.problems.push(SyntaxProblem {
            mark: builder.documents[1].mark,
            message: "only one YAML document per file is allowed; remove the second `---` document"
                .into(),
        });
    }
    if !builder.problems.is_empty() {
        return Err(builder.problems);
    }
    Ok(builder.documents.into_iter().next().unwrap_or(Node {
        value: Value::Map(Vec::new()),
        mark: Mark { line: 1, column: 1 },
    }))
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Node, usize)>,
    anchors: Vec<(usize, Node)>,
    documents: Vec<Node>,
    problems: Vec<SyntaxProblem>,
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.documents.push(node),
            Some((
                Node {
                    value: Value::Seq(items),
                    ..
                },
                _,
            )) => items.push(node),
            Some((
                Node {
                    value: Value::Map(entries),
                    ..
                },
                _,
            )) => {
                // A map under construction holds keys with a placeholder value until the value arrives.
                match entries.last_mut() {
                    Some((_, v)) if v.mark.line == 0 => *v = node,
                    _ => {
                        if node.as_str().is_none() {
                            self.problems.push(SyntaxProblem {
                                mark: node.mark,
                                message: "mapping keys must be plain strings".into(),
                            });
                        } else if let Some(dup) =
                            entries.iter().find(|(k, _)| k.as_str() == node.as_str())
                        {
                            self.problems.push(SyntaxProblem {
                                mark: node.mark,
                                message: format!(
                                    "duplicate key `{}` (first defined at line {})",
                                    node.as_str().unwrap_or_default(),
                                    dup.0.mark.line
                                ),
                            });
                        }
                        let placeholder = Node {
                            value: Value::Scalar {
                                text: String::new(),
                                quoted: false,
                            },
                            mark: Mark::default(),
                        };
                        entries.push((node, placeholder));
                    }
                }
            }
            Some(_) => {}
        }
    }

    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.push((anchor, node.clone()));
        }
        self.push_value(node);
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, marker: Marker) {
        let mark = Mark::from(marker);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.finish(
                    Node {
                        value: Value::Scalar { text, quoted },
                        mark,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Seq(Vec::new()),
                    mark,
                },
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Map(Vec::new()),
                    mark,
                },
                anchor,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, anchor)) = self.stack.pop() {
                    if let Value::Map(entries) = &mut node.value {
                        // A key with no value (`key:` at the end) is an empty scalar.
                        for (k, v) in entries.iter_mut() {
                            if v.mark.line == 0 {
                                v.mark = k.mark;
                            }
                        }
                        // The parser marks a block map where it recognised it, after its first
                        // key; the first key is where a reader sees the map start.
                        if let Some((first, _)) = entries.first() {
                            if first.mark < node.mark {
                                node.mark = first.mark;
                            }
                        }
                    }
                    self.finish(node, anchor);
                }
            }
            Event::Alias(id) => match self.anchors.iter().rev().find(|(a, _)| *a == id) {
                Some((_, node)) => {
                    let mut node = node.clone();
                    node.mark = mark;
                    self.push_value(node);
                }
                None => self.problems.push(SyntaxProblem {
                    mark,
                    message: "alias refers to an unknown anchor".into(),
                }),
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_columns() {
        // GIVEN a nested document WHEN parsed THEN each node knows its line and column
        let doc = parse("a:\n  b: [1, two]\n").expect("parses");
        let b = doc.get("a").and_then(|a| a.get("b")).expect("a.b");
        assert_eq!(b.mark, Mark { line: 2, column: 6 });
        assert_eq!(
            doc.locate(&[Seg::Key("a".into()), Seg::Key("b".into()), Seg::Index(1)]),
            Mark {
                line: 2,
                column: 10
            }
        );
    }

    #[test]
    fn duplicate_keys_are_reported_with_both_lines() {
        let problems = parse("name: a\nx: 1\nname: b\n").expect_err("duplicate");
        assert_eq!(problems[0].mark, Mark { line: 3, column: 1 });
        assert!(
            problems[0].message.contains("first defined at line 1"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn empty_value_is_null_and_empty_file_is_empty_map() {
        let doc = parse("a:\nb: 1\n").expect("parses");
        assert!(doc.get("a").is_some_and(Node::is_null));
        assert_eq!(parse("").expect("empty").value, Value::Map(Vec::new()));
    }

    #[test]
    fn quoted_scalars_are_marked_quoted() {
        let doc = parse("a: '1'\nb: 1\n").expect("parses");
        assert_eq!(
            doc.get("a").map(|n| n.value.clone()),
            Some(Value::Scalar {
                text: "1".into(),
                quoted: true
            })
        );
        assert_eq!(
            doc.get("b").map(|n| n.value.clone()),
            Some(Value::Scalar {
                text: "1".into(),
                quoted: false
            })
        );
    }

    #[test]
    fn aliases_copy_the_anchored_node() {
        let doc = parse("a: &x {k: v}\nb: *x\n").expect("parses");
        assert_eq!(
            doc.get("b").and_then(|b| b.get("k")).and_then(Node::as_str),
            Some("v")
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let problems = parse("a: [1, 2\nb: 3\n").expect_err("unterminated");
        assert!(problems[0].mark.line >= 1);
    }
}
