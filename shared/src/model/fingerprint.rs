//! The fingerprint of a build: a hash of everything that determines the image it produces — the
//! resolved parent image, the component and test documents, their parameters, the block devices,
//! user data, working directory and the runner version. Independent of key order, formatting and
//! comments in the source files. `startCondition: onChange` compares it with the last build.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::model::pipeline::LoadedPipeline;
use crate::ports::{ComponentSpec, PipelineRecord};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hash of a JSON value in canonical form (object keys sorted, no whitespace).
    pub fn of_value(value: &Json) -> Fingerprint {
        let mut text = String::new();
        write_canonical(value, &mut text);
        Fingerprint(format!(
            "sha256:{}",
            hex::encode(Sha256::digest(text.as_bytes()))
        ))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn write_canonical(value: &Json, out: &mut String) {
    match value {
        Json::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&map[*k], out);
            }
            out.push('}');
        }
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn component_input(c: &ComponentSpec) -> Json {
    json!({ "document": c.document, "parameters": c.parameters })
}

/// The fingerprint of building `pipeline` on `parent_image` (an AMI id or an embedded image id).
pub fn compute(pipeline: &LoadedPipeline, parent_image: &str) -> Fingerprint {
    of_record(&PipelineRecord::from(pipeline), parent_image)
}

/// The same, from the record the store keeps.
pub fn of_record(pipeline: &PipelineRecord, parent_image: &str) -> Fingerprint {
    let p = &pipeline.pipeline;
    Fingerprint::of_value(&json!({
        "runner": crate::VERSION,
        "parent": parent_image,
        "workingDirectory": p.working_directory,
        "blockDevices": p.block_devices,
        "userData": p.user_data,
        "components": pipeline.components.iter().map(component_input).collect::<Vec<_>>(),
        "tests": {
            "enabled": p.tests.enabled,
            "components": pipeline.tests.iter().map(component_input).collect::<Vec<_>>(),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    /// A generated component: parameters with defaults, and steps with commands.
    #[derive(Debug, Clone)]
    struct Doc {
        params: Vec<(String, String)>,
        steps: Vec<(String, Vec<String>)>,
    }

    fn doc_strategy() -> impl Strategy<Value = Doc> {
        let text = "[a-zA-Z0-9 _./=-]{1,20}";
        (
            prop::collection::btree_map("[A-Z][a-zA-Z0-9]{0,8}", text, 0..4),
            prop::collection::btree_map(
                "[A-Z][a-zA-Z0-9]{0,8}",
                prop::collection::vec(text, 1..4),
                1..5,
            ),
        )
            .prop_map(|(params, steps)| Doc {
                params: params.into_iter().collect(),
                steps: steps.into_iter().collect(),
            })
    }

    fn q(s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    /// Block style, keys in the usual order.
    fn render_block(d: &Doc) -> String {
        let mut y = String::from("name: Gen\nschemaVersion: 1.0\n");
        if !d.params.is_empty() {
            y.push_str("parameters:\n");
            for (n, v) in &d.params {
                y.push_str(&format!(
                    "  - {n}:\n      type: string\n      default: {}\n",
                    q(v)
                ));
            }
        }
        y.push_str("phases:\n  - name: build\n    steps:\n");
        for (n, cmds) in &d.steps {
            y.push_str(&format!("      - name: {n}\n        action: ExecuteBash\n        inputs:\n          commands:\n"));
            for c in cmds {
                y.push_str(&format!("            - {}\n", q(c)));
            }
        }
        y
    }

    /// The same document with keys reversed, flow style, comments and odd spacing.
    fn render_shuffled(d: &Doc) -> String {
        let mut y = String::from("# generated\nphases:\n-   steps:\n");
        for (n, cmds) in &d.steps {
            let list: Vec<String> = cmds.iter().map(|c| format!("\"{}\"", c)).collect();
            y.push_str(&format!("    -   inputs: {{ commands: [ {} ] }}\n        action:   ExecuteBash   # the action\n        name: \"{n}\"\n", list.join(" ,  ")));
        }
        y.push_str("    name: 'build'\n");
        if !d.params.is_empty() {
            y.push_str("parameters:\n");
            for (n, v) in &d.params {
                y.push_str(&format!("- {n}: {{default: {}, type: string}}\n", q(v)));
            }
        }
        y.push_str("schemaVersion: '1.0'\nname: Gen\n");
        y
    }

    fn fp(text: &str) -> Fingerprint {
        let loaded = crate::component::load_str(Path::new("gen.yaml"), text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        Fingerprint::of_value(&loaded.json)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn fingerprint_ignores_key_order_and_formatting(d in doc_strategy()) {
            // GIVEN one document written two ways WHEN fingerprinted THEN the hashes agree
            prop_assert_eq!(fp(&render_block(&d)), fp(&render_shuffled(&d)));
        }

        #[test]
        fn fingerprint_changes_with_any_command_or_default(d in doc_strategy(), which in any::<prop::sample::Index>(), extra in "[a-z]{1,3}") {
            // GIVEN a document WHEN one command or parameter default changes THEN the hash changes
            let mut changed = d.clone();
            let n_cmds: usize = d.steps.iter().map(|(_, c)| c.len()).sum();
            let pick = which.index(n_cmds + d.params.len());
            if pick < n_cmds {
                let mut k = pick;
                for (_, cmds) in changed.steps.iter_mut() {
                    if k < cmds.len() { cmds[k].push_str(&extra); break; }
                    k -= cmds.len();
                }
            } else {
                changed.params[pick - n_cmds].1.push_str(&extra);
            }
            prop_assert_ne!(fp(&render_block(&d)), fp(&render_block(&changed)));
        }
    }

    #[test]
    fn step_order_is_semantic() {
        let d = Doc {
            params: vec![],
            steps: vec![
                ("A".into(), vec!["echo a".into()]),
                ("B".into(), vec!["echo b".into()]),
            ],
        };
        let mut swapped = d.clone();
        swapped.steps.reverse();
        assert_ne!(fp(&render_block(&d)), fp(&render_block(&swapped)));
    }
}
