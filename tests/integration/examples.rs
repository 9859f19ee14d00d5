//! The examples users copy from are valid, and say what the README says they do.

use crate::support::repo;

#[test]
fn every_example_pipeline_validates() {
    let dir = repo().join("examples");
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let pipeline = entry.expect("entry").path().join("pipeline.yaml");
        if pipeline.is_file() {
            found += 1;
            if let Err(d) = kiln::model::load(&pipeline) {
                panic!("{} is invalid:\n{d}", pipeline.display());
            }
        }
    }
    assert!(
        found >= 3,
        "expected the hello, debian-nginx and aws-al2023 examples, found {found}"
    );
}

#[test]
fn the_aws_example_uses_the_features_the_reference_documents() {
    let loaded =
        kiln::model::load(&repo().join("examples/aws-al2023/pipeline.yaml")).expect("valid");
    let p = &loaded.pipeline;
    assert!(matches!(
        p.parent,
        kiln::model::pipeline::Parent::SsmParameter(_)
    ));
    assert_eq!(p.distribution.len(), 2);
    assert_eq!(p.home_region(), "us-east-1");
    assert_eq!(
        loaded.components.len(),
        2,
        "a file component and an inline one"
    );
    assert_eq!(
        p.start_condition(),
        kiln::model::pipeline::StartCondition::OnChange
    );
}
