//! Plain HTTP(S) transfers for WebDownload and S3 (rustls, no system TLS library).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

fn agent(insecure: bool) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(insecure)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_body(Some(Duration::from_secs(600)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Streams `url` into `dest` (written to a temporary name first, so a failed download leaves
/// nothing behind).
pub fn download(url: &str, dest: &Path, insecure: bool) -> Result<(), String> {
    let response = agent(insecure).get(url).call().map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let partial = dest.with_extension("kiln-partial");
    let mut file = std::fs::File::create(&partial)
        .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
    let copied = std::io::copy(&mut response.into_body().into_reader(), &mut file);
    drop(file);
    match copied {
        Ok(_) => std::fs::rename(&partial, dest)
            .map_err(|e| format!("cannot write {}: {e}", dest.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(format!("transfer interrupted: {e}"))
        }
    }
}

/// A response: status, headers we care about, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request with headers and an optional body; the whole response is read.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Result<Response, String> {
    let agent = agent(false);
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let response = match body {
        Some(b) => agent.run(builder.body(b.to_vec()).map_err(|e| e.to_string())?),
        None => agent.run(builder.body(()).map_err(|e| e.to_string())?),
    }
    .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    Ok(Response {
        status,
        body: bytes,
    })
}
