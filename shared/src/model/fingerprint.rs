//! The fingerprint of a build: a hash of everything that determines the image it produces — the
//! resolved parent image, the component and test documents, their parameters, the block devices,
//! user data, working directory, what the builder sanitizes and the runner version. Independent
//! of key order, formatting and comments in the source files. `startCondition: onChange` compares
//! it with the last build. Every field of the pipeline file is classified in this module's tests
//! (determines the image or not), so a field added later fails them until it is.

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

/// The version of what the fingerprint covers: a change here makes every `onChange` pipeline
/// build once. 2: `sanitize` added.
const INPUTS_VERSION: u32 = 2;

/// The same, from the record the store keeps.
pub fn of_record(pipeline: &PipelineRecord, parent_image: &str) -> Fingerprint {
    let p = &pipeline.pipeline;
    Fingerprint::of_value(&json!({
        "inputs": INPUTS_VERSION,
        "runner": crate::VERSION,
        "parent": parent_image,
        "workingDirectory": p.working_directory,
        "blockDevices": p.block_devices,
        "userData": p.user_data,
        "sanitize": p.sanitize,
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

    /// The pipeline file's top-level fields that determine the image (each must change the
    /// fingerprint) and those that do not (none may). `parent` counts through the image it
    /// resolves to, which is the fingerprint's other input.
    const DETERMINES_THE_IMAGE: &[&str] = &[
        "parent",
        "components",
        "tests",
        "workingDirectory",
        "blockDevices",
        "userData",
        "sanitize",
    ];
    const DOES_NOT: &[&str] = &[
        "name",
        "description",
        "version",
        "infrastructure",
        "distribution",
        "schedule",
        "lifecycle",
        "timeouts",
    ];

    fn hello() -> PipelineRecord {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/pipeline.yaml");
        PipelineRecord::from(&crate::model::load(&file).expect("the example loads"))
    }

    /// `field` of `record` set to another valid value (through the file's JSON form).
    fn with_field(record: &PipelineRecord, field: &str) -> PipelineRecord {
        let mut changed = record.clone();
        let mut v = serde_json::to_value(&record.pipeline).expect("to json");
        let other = match field {
            "name" => json!("hello-2"),
            "description" => json!("another description"),
            "version" => json!("9.9.9"),
            "parent" => json!({"local": "another-image"}),
            "infrastructure" => {
                let mut i = v["infrastructure"].clone();
                i["instanceTypes"] = json!(["m7g.large"]);
                i
            }
            "distribution" => {
                let mut d = v["distribution"].clone();
                d.as_array_mut()
                    .expect("list")
                    .push(json!({"region": "ap-south-1"}));
                d
            }
            "schedule" => json!({"cron": "cron(0 3 * * ? *)", "startCondition": "always"}),
            "lifecycle" => json!({"keepLatest": 7}),
            "timeouts" => json!({"launchMinutes": 7}),
            "workingDirectory" => json!("/var/tmp/work"),
            "blockDevices" => json!([{"deviceName": "/dev/xvdb", "volumeSize": 8}]),
            "userData" => json!("#!/bin/sh\necho first boot\n"),
            "sanitize" => json!(["ssh-host-keys"]),
            "components" => {
                changed.components[0]
                    .parameters
                    .insert("Greeting".into(), "Bonjour".into());
                return changed;
            }
            "tests" => {
                changed.pipeline.tests.enabled = !changed.pipeline.tests.enabled;
                return changed;
            }
            other => panic!("no mutation for the pipeline field `{other}`: classify it above"),
        };
        assert_ne!(
            v[field], other,
            "{field}: the mutation must change the value"
        );
        v[field] = other;
        changed.pipeline = serde_json::from_value(v).unwrap_or_else(|e| panic!("{field}: {e}"));
        changed
    }

    #[test]
    fn every_field_of_the_pipeline_file_is_classified() {
        // GIVEN the pipeline file's schema WHEN its top-level properties are listed
        let schema =
            serde_json::to_value(schemars::schema_for!(crate::model::Pipeline)).expect("schema");
        let fields: std::collections::BTreeSet<String> = schema["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .cloned()
            .collect();
        // THEN each is classified once: a new field fails here until someone decides
        let classified: std::collections::BTreeSet<String> = DETERMINES_THE_IMAGE
            .iter()
            .chain(DOES_NOT)
            .map(|f| f.to_string())
            .collect();
        assert_eq!(fields, classified);
        assert_eq!(
            classified.len(),
            DETERMINES_THE_IMAGE.len() + DOES_NOT.len()
        );
    }

    #[test]
    fn a_field_that_determines_the_image_changes_the_fingerprint_and_no_other_does() {
        let record = hello();
        let before = of_record(&record, "ami-0parent");
        for field in DETERMINES_THE_IMAGE.iter().chain(DOES_NOT) {
            // GIVEN the example with one field changed WHEN fingerprinted
            let changed = with_field(&record, field);
            let after = if *field == "parent" {
                of_record(&changed, "ami-0another")
            } else {
                of_record(&changed, "ami-0parent")
            };
            // THEN it differs exactly when the field determines the image
            if DETERMINES_THE_IMAGE.contains(field) {
                assert_ne!(
                    before, after,
                    "changing `{field}` must change the fingerprint"
                );
            } else {
                assert_eq!(
                    before, after,
                    "changing `{field}` must not change the fingerprint"
                );
            }
        }
        // Within the fields: a component's parameter, its document, the test components.
        let mut doc = record.clone();
        doc.components[0].document["phases"][0]["steps"][0]["name"] = json!("Renamed");
        assert_ne!(
            before,
            of_record(&doc, "ami-0parent"),
            "a component's document"
        );
        let mut tests = record.clone();
        tests.tests[0]
            .parameters
            .insert("Greeting".into(), "Hej".into());
        assert_ne!(
            before,
            of_record(&tests, "ami-0parent"),
            "a test's parameter"
        );
        let mut devices = record.clone();
        devices.pipeline.block_devices =
            vec![
                serde_json::from_value(json!({"deviceName": "/dev/xvda", "volumeSize": 16}))
                    .expect("device"),
            ];
        let mut bigger = devices.clone();
        bigger.pipeline.block_devices[0].volume_size = Some(32);
        assert_ne!(
            of_record(&devices, "ami-0parent"),
            of_record(&bigger, "ami-0parent"),
            "a block device's size"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn the_pipeline_file_fingerprints_alike_however_it_is_written(order in prop::collection::vec(0usize..1000, 16), comment in "[a-z ]{0,12}") {
            // GIVEN the example rewritten: its top-level blocks shuffled, comments and blank lines added
            let dir = tempfile::tempdir().expect("dir");
            let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
            std::fs::create_dir(dir.path().join("components")).expect("mkdir");
            for c in ["hello.yaml", "hello-test.yaml"] {
                std::fs::copy(example.join("components").join(c), dir.path().join("components").join(c)).expect("copy");
            }
            let text = std::fs::read_to_string(example.join("pipeline.yaml")).expect("read");
            let mut blocks: Vec<String> = Vec::new();
            for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
                if !line.starts_with(' ') && !line.starts_with('-') || blocks.is_empty() {
                    blocks.push(String::new());
                }
                let b = blocks.last_mut().expect("a block");
                b.push_str(line);
                b.push('\n');
            }
            let mut keyed: Vec<(usize, String)> = blocks.into_iter().enumerate().map(|(i, b)| (order[i % order.len()] * 100 + i, b)).collect();
            keyed.sort();
            let shuffled: String = keyed.into_iter().map(|(_, b)| format!("# {comment}\n\n{b}")).collect();
            std::fs::write(dir.path().join("pipeline.yaml"), &shuffled).expect("write");
            // WHEN both are fingerprinted
            let again = PipelineRecord::from(&crate::model::load(&dir.path().join("pipeline.yaml")).unwrap_or_else(|e| panic!("{e}\n{shuffled}")));
            // THEN they agree
            prop_assert_eq!(of_record(&hello(), "ami-0parent"), of_record(&again, "ami-0parent"));
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
