//! Component parameter values that reference an SSM SecureString: `{{ ssm-secure:/path }}`. The
//! reference travels (pipeline, bucket, table, command); the value is read on the instance, with
//! the instance's credentials, right before the run, kept in memory only, and masked as `****` in
//! the report and the logs the run writes.

use std::path::Path;

use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::http;
use crate::s3::{credentials, env, region, sign, Request};

/// GetParameter with decryption; the value of a SecureString.
pub fn get_secure(name: &str) -> Result<String, String> {
    let creds = credentials()?;
    let region = region();
    let endpoint = env("AWS_ENDPOINT_URL_SSM")
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|| format!("https://ssm.{region}.amazonaws.com"));
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let host = endpoint
        .split("://")
        .nth(1)
        .unwrap_or(&endpoint)
        .to_string();
    let body = json!({"Name": name, "WithDecryption": true}).to_string();
    let amz_date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let payload_hash = hex::encode(Sha256::digest(body.as_bytes()));
    let mut extra = vec![
        (
            "content-type".to_string(),
            "application/x-amz-json-1.1".to_string(),
        ),
        (
            "x-amz-target".to_string(),
            "AmazonSSM.GetParameter".to_string(),
        ),
    ];
    if let Some(t) = &creds.token {
        extra.push(("x-amz-security-token".to_string(), t.clone()));
    }
    let signed = sign(
        &Request {
            method: "POST",
            host: &host,
            path: "/",
            query: &[],
            extra_headers: &extra,
            payload_hash: &payload_hash,
            amz_date: &amz_date,
            region: &region,
            service: "ssm",
        },
        &creds,
    );
    let r = http::request(
        "POST",
        &format!("{endpoint}/"),
        &signed.headers,
        Some(body.as_bytes()),
    )?;
    let answer: Json = serde_json::from_slice(&r.body).unwrap_or(Json::Null);
    if r.status != 200 {
        let code = answer["__type"].as_str().unwrap_or_default();
        let code = code.rsplit('#').next().unwrap_or(code);
        return Err(format!("SSM GetParameter {name}: HTTP {} {code}", r.status));
    }
    let p = &answer["Parameter"];
    if p["Type"] != "SecureString" {
        return Err(format!(
            "SSM parameter {name} is a {}, not a SecureString: ssm-secure references only SecureStrings",
            p["Type"].as_str().unwrap_or("parameter of unknown type")
        ));
    }
    p["Value"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("SSM parameter {name} has no value"))
}

/// `text` with every secret replaced by `****`.
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "****");
    }
    out
}

/// Masks the secrets in every file below `dir` (the run's logs).
pub fn mask_files(dir: &Path, secrets: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => mask_files(&path, secrets),
            Ok(t) if t.is_file() => {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let masked = mask(&text, secrets);
                    if masked != text {
                        let _ = std::fs::write(&path, masked);
                    }
                }
            }
            _ => {}
        }
    }
}
