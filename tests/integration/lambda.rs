//! The stage functions as Lambda runs them: the real `bootstrap` binary against a local Lambda
//! Runtime API (a minimal emulator here), its AWS calls going to a moto server. Errors reach the
//! runtime with the stable `Kiln.*` errorType the state machine's Retry and Catch name.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use serde_json::{json, Value as Json};

use crate::support::{built_binary, Moto};

/// Serves `event` once on the Runtime API and returns (path, body) of the function's answer.
fn invoke_once(function: &str, event: Json, env: &[(&str, String)]) -> (String, Json) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut child = std::process::Command::new(built_binary(function))
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "test")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("bootstrap starts");
    let body = event.to_string();
    let mut answer = None;
    for stream in listener.incoming().take(3) {
        let mut s = stream.expect("connection");
        let mut reader = BufReader::new(s.try_clone().expect("clone"));
        let mut request_line = String::new();
        reader.read_line(&mut request_line).expect("request line");
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut payload = vec![0u8; length];
        reader.read_exact(&mut payload).expect("body");
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if path.ends_with("/invocation/next") {
            if answer.is_some() {
                break;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nLambda-Runtime-Aws-Request-Id: req-1\r\nLambda-Runtime-Deadline-Ms: {}\r\nLambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:{function}\r\nContent-Length: {}\r\n\r\n",
                chrono::Utc::now().timestamp_millis() + 60_000,
                body.len()
            );
            s.write_all(head.as_bytes())
                .and_then(|_| s.write_all(body.as_bytes()))
                .expect("event");
        } else {
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .expect("ack");
            answer = Some((path, serde_json::from_slice(&payload).unwrap_or(Json::Null)));
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    answer.expect("the function answered")
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
