//! The stage functions as Lambda runs them: the real `bootstrap` binary against a local Lambda
//! Runtime API (a minimal emulator here), its AWS calls going to a moto server. Errors reach the
//! runtime with the stable `Kiln.*` errorType the state machine's Retry and Catch name.

use serde_json::{json, Value as Json};

use crate::support::{built_binary, Moto};

/// Serves `event` once on the Runtime API and returns (path, body) of the function's answer.
fn invoke_once(function: &str, event: Json, env: &[(&str, String)]) -> (String, Json) {
    kiln_tests::runtime_api::invoke_once(&built_binary(function), function, &event, env)
        .expect("the function answered")
        .answer
}

#[test]
fn a_stage_function_reports_kiln_error_types_to_the_lambda_runtime() {
    // GIVEN moto with the table and bucket, and the launch-builder bootstrap
    let moto = Moto::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let mut env: Vec<(&str, String)> = moto.env();
    env.extend([
        ("KILN_TABLE", "kiln".to_string()),
        ("KILN_ARTIFACTS_BUCKET", "kiln-artifacts".to_string()),
    ]);
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let settings = kiln::aws::Settings {
        table: "kiln".into(),
        bucket: "kiln-artifacts".into(),
        event_bus: "default".into(),
        region: "us-east-1".into(),
        stack: None,
        instance_profile: None,
    };
    rt.block_on(async {
        kiln::aws::AwsPorts::from_env(settings)
            .await
            .bootstrap()
            .await
    })
    .expect("bootstrap");
    // WHEN it is invoked to start a pipeline that was never applied
    let (path, body) = invoke_once(
        "launch-builder",
        json!({"op": "start", "request": {"pipeline": "nope", "trigger": {"kind": "manual"}, "requestId": "exec-1"}}),
        &env,
    );
    // THEN the runtime receives an error whose errorType is the contract name
    assert!(path.ends_with("/invocation/req-1/error"), "{path}");
    assert_eq!(body["errorType"], "Kiln.InvalidPipeline", "{body}");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("pipeline `nope` is not applied"),
        "{body}"
    );
    // AND a malformed event is an internal error, not a crash
    let (_, body) = invoke_once("customize", json!({"op": "check"}), &env);
    assert_eq!(body["errorType"], "Kiln.Internal", "{body}");
}
