//! S3Download and S3Upload without an AWS SDK: requests signed with Signature Version 4.
//! Credentials come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else
//! from the instance role through IMDSv2 (the instance profile needs s3:GetObject, s3:PutObject
//! and, for prefixes, s3:ListBucket). `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` select another
//! endpoint (path-style), e.g. a moto server.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use kiln::component::actions::S3Transfer;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::http;

#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    pub(crate) key: String,
    pub(crate) secret: String,
    pub(crate) token: Option<String>,
}

pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

const IMDS: &str = "http://169.254.169.254";

fn imds(path: &str, token: &str) -> Result<String, String> {
    let base = env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| IMDS.into());
    let r = http::request(
        "GET",
        &format!("{}{path}", base.trim_end_matches('/')),
        &[("x-aws-ec2-metadata-token".into(), token.into())],
        None,
    )?;
    if r.status != 200 {
        return Err(format!("instance metadata {path}: HTTP {}", r.status));
    }
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

fn imds_token() -> Result<String, String> {
    if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err("no credentials in the environment and instance metadata is disabled".into());
    }
    let base = env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| IMDS.into());
    let r = http::request(
        "PUT",
        &format!("{}/latest/api/token", base.trim_end_matches('/')),
        &[("x-aws-ec2-metadata-token-ttl-seconds".into(), "300".into())],
        Some(b""),
    )?;
    if r.status != 200 {
        return Err(format!("instance metadata token: HTTP {}", r.status));
    }
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

pub(crate) fn credentials() -> Result<Credentials, String> {
    if let (Some(key), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Credentials {
            key,
            secret,
            token: env("AWS_SESSION_TOKEN"),
        });
    }
    let token = imds_token().map_err(|e| {
        format!("no AWS credentials: {e}; attach an instance profile or set AWS_ACCESS_KEY_ID")
    })?;
    let role = imds("/latest/meta-data/iam/security-credentials/", &token)?;
    let role = role
        .lines()
        .next()
        .ok_or("the instance has no instance profile role")?;
    let doc: Json = serde_json::from_str(&imds(
        &format!("/latest/meta-data/iam/security-credentials/{role}"),
        &token,
    )?)
    .map_err(|e| e.to_string())?;
    let field = |k: &str| {
        doc.get(k)
            .and_then(Json::as_str)
            .map(str::to_string)
            .ok_or(format!("instance credentials lack {k}"))
    };
    Ok(Credentials {
        key: field("AccessKeyId")?,
        secret: field("SecretAccessKey")?,
        token: Some(field("Token")?),
    })
}

pub(crate) fn region() -> String {
    env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| {
            imds_token()
                .and_then(|t| imds("/latest/meta-data/placement/region", &t))
                .ok()
        })
        .unwrap_or_else(|| "us-east-1".into())
}

/// `s3://bucket/key` → (bucket, key).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("`{url}` is not an s3:// URL"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("`{url}` names no bucket"));
    }
    Ok((bucket.to_string(), key.to_string()))
}

fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// What a signature covers.
pub(crate) struct Request<'a> {
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    /// Already URI-encoded.
    pub(crate) path: &'a str,
    pub(crate) query: &'a [(&'a str, String)],
    pub(crate) extra_headers: &'a [(String, String)],
    pub(crate) payload_hash: &'a str,
    /// `YYYYMMDDTHHMMSSZ`
    pub(crate) amz_date: &'a str,
    pub(crate) region: &'a str,
    /// `s3`, `ssm`, …
    pub(crate) service: &'a str,
}

pub(crate) struct Signed {
    pub(crate) query_string: String,
    /// Headers to send, `authorization` included (`host` is set by the HTTP client).
    pub(crate) headers: Vec<(String, String)>,
}

/// Signature Version 4, per the AWS documentation.
pub(crate) fn sign(r: &Request<'_>, creds: &Credentials) -> Signed {
    let date = &r.amz_date[..8];
    let mut q: Vec<(String, String)> = r
        .query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    let query_string = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), r.host.to_string()),
        ("x-amz-content-sha256".into(), r.payload_hash.to_string()),
        ("x-amz-date".into(), r.amz_date.to_string()),
    ];
    headers.extend(r.extra_headers.iter().cloned());
    headers.sort();
    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed_headers = names.join(";");
    let canonical_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    let canonical = format!(
        "{}\n{}\n{query_string}\n{canonical_headers}\n{signed_headers}\n{}",
        r.method, r.path, r.payload_hash
    );
    let scope = format!("{date}/{}/{}/aws4_request", r.region, r.service);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        r.amz_date,
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key_bytes = hmac(format!("AWS4{}", creds.secret).as_bytes(), date);
    for part in [r.region, r.service, "aws4_request"] {
        key_bytes = hmac(&key_bytes, part);
    }
    let signature = hex::encode(hmac(&key_bytes, &to_sign));
    headers.push(("authorization".into(), format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}", creds.key)));
    headers.retain(|(k, _)| k != "host");
    Signed {
        query_string,
        headers,
    }
}

/// A client for one bucket.
struct Bucket {
    name: String,
    region: String,
    creds: Credentials,
    endpoint: Option<String>,
    expected_owner: Option<String>,
}

impl Bucket {
    fn new(name: &str, expected_owner: Option<String>) -> Result<Bucket, String> {
        Ok(Bucket {
            name: name.to_string(),
            region: region(),
            creds: credentials()?,
            endpoint: env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")),
            expected_owner,
        })
    }

    /// (url, host, canonical path) for `key`.
    fn locate(&self, key: &str) -> (String, String, String) {
        match &self.endpoint {
            Some(ep) => {
                let ep = ep.trim_end_matches('/');
                let host = ep.split("://").nth(1).unwrap_or(ep).to_string();
                let path = format!(
                    "/{}/{}",
                    uri_encode(&self.name, false),
                    uri_encode(key, true)
                );
                (format!("{ep}{path}"), host, path)
            }
            None => {
                let host = format!("{}.s3.{}.amazonaws.com", self.name, self.region);
                let path = format!("/{}", uri_encode(key, true));
                (format!("https://{host}{path}"), host, path)
            }
        }
    }

    fn send(
        &self,
        method: &str,
        key: &str,
        query: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<http::Response, String> {
        let (url, host, path) = self.locate(key);
        let amz_date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        let payload_hash = hex::encode(Sha256::digest(body.unwrap_or_default()));
        let mut extra = Vec::new();
        if let Some(t) = &self.creds.token {
            extra.push(("x-amz-security-token".to_string(), t.clone()));
        }
        if let Some(o) = &self.expected_owner {
            extra.push(("x-amz-expected-bucket-owner".to_string(), o.clone()));
        }
        let request = Request {
            method,
            host: &host,
            path: &path,
            query,
            extra_headers: &extra,
            payload_hash: &payload_hash,
            amz_date: &amz_date,
            region: &self.region,
            service: "s3",
        };
        let signed = sign(&request, &self.creds);
        let full = if signed.query_string.is_empty() {
            url
        } else {
            format!("{url}?{}", signed.query_string)
        };
        let r = http::request(method, &full, &signed.headers, body)?;
        if !(200..300).contains(&r.status) {
            let text = String::from_utf8_lossy(&r.body);
            let code = regex::Regex::new("<Code>([^<]+)</Code>")
                .ok()
                .and_then(|re| re.captures(&text).map(|c| c[1].to_string()))
                .unwrap_or_default();
            return Err(format!(
                "S3 {method} s3://{}/{key}: HTTP {} {code}",
                self.name, r.status
            ));
        }
        Ok(r)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        let key_re = regex::Regex::new("<Key>([^<]*)</Key>").map_err(|e| e.to_string())?;
        let next_re = regex::Regex::new("<NextContinuationToken>([^<]*)</NextContinuationToken>")
            .map_err(|e| e.to_string())?;
        loop {
            let mut q = vec![
                ("list-type", "2".to_string()),
                ("prefix", prefix.to_string()),
            ];
            if let Some(t) = &token {
                q.push(("continuation-token", t.clone()));
            }
            let r = self.send("GET", "", &q, None)?;
            let text = String::from_utf8_lossy(&r.body).into_owned();
            keys.extend(key_re.captures_iter(&text).map(|c| unescape_xml(&c[1])));
            match next_re.captures(&text) {
                Some(c) => token = Some(unescape_xml(&c[1])),
                None => break,
            }
        }
        Ok(keys)
    }
}

fn unescape_xml(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Runs one S3Download or S3Upload item.
pub fn transfer(upload: bool, i: &S3Transfer) -> Result<Json, String> {
    let owner = i.expected_bucket_owner.as_ref().map(|o| o.text());
    if upload {
        upload_item(i, owner)
    } else {
        download_item(i, owner)
    }
}

fn download_item(i: &S3Transfer, owner: Option<String>) -> Result<Json, String> {
    let (bucket_name, key) = parse_url(&i.source)?;
    let bucket = Bucket::new(&bucket_name, owner)?;
    let overwrite = i.overwrite != Some(false);
    // `prefix/*` or `recurse: true` downloads every object under the prefix into a folder.
    let many = key.ends_with('*') || i.recurse == Some(true);
    if !many {
        let dest = crate::actions::download_destination(&key, &i.destination);
        if dest.exists() && !overwrite {
            return Err(format!(
                "{} already exists and overwrite is false",
                dest.display()
            ));
        }
        let r = bucket.send("GET", &key, &[], None)?;
        write_file(&dest, &r.body)?;
        return Ok(json!({ "destination": dest }));
    }
    let prefix = key.trim_end_matches('*');
    // Keys are whatever the bucket's writers chose: each becomes a path below the destination,
    // and one with a `..` component fails the step before anything is downloaded.
    let mut objects = Vec::new();
    for k in bucket
        .list(prefix)?
        .into_iter()
        .filter(|k| !k.ends_with('/'))
    {
        let rel = k.strip_prefix(prefix).unwrap_or(&k).trim_start_matches('/');
        let parts = kiln::relpath::components(Path::new(rel)).map_err(|_| {
            format!(
                "object key `{k}` leaves the destination {} (`..`); nothing was downloaded",
                i.destination
            )
        })?;
        let dest = Path::new(&i.destination).join(parts.iter().collect::<PathBuf>());
        objects.push((k, dest));
    }
    let mut written = Vec::new();
    for (k, dest) in objects {
        if dest.exists() && !overwrite {
            return Err(format!(
                "{} already exists and overwrite is false",
                dest.display()
            ));
        }
        let r = bucket.send("GET", &k, &[], None)?;
        write_file(&dest, &r.body)?;
        written.push(dest);
    }
    Ok(json!({ "destination": i.destination, "files": written }))
}

fn write_file(dest: &Path, body: &[u8]) -> Result<(), String> {
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(dest, body).map_err(|e| format!("cannot write {}: {e}", dest.display()))
}

fn upload_item(i: &S3Transfer, owner: Option<String>) -> Result<Json, String> {
    let (bucket_name, key) = parse_url(&i.destination)?;
    let bucket = Bucket::new(&bucket_name, owner)?;
    let source = i.source.trim_end_matches('*');
    let src = Path::new(source);
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    if src.is_dir() {
        if i.recurse != Some(true) && !i.source.ends_with('*') {
            return Err(format!(
                "{} is a folder; set `recurse: true` to upload its contents",
                i.source
            ));
        }
        let mut all = Vec::new();
        walk(src, i.recurse == Some(true), &mut all)?;
        let prefix = if key.is_empty() || key.ends_with('/') {
            key.clone()
        } else {
            format!("{key}/")
        };
        for f in all {
            let rel = f
                .strip_prefix(src)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            files.push((f, format!("{prefix}{rel}")));
        }
    } else {
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let k = if key.is_empty() || key.ends_with('/') {
            format!("{key}{name}")
        } else {
            key.clone()
        };
        files.push((src.to_path_buf(), k));
    }
    let mut keys = Vec::new();
    for (path, k) in files {
        let body =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        bucket.send("PUT", &k, &[], Some(&body))?;
        keys.push(format!("s3://{bucket_name}/{k}"));
    }
    Ok(json!({ "uploaded": keys }))
}

fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<(), String> {
    for e in std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(Result::ok)
    {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if recursive {
                walk(&p, true, out)?;
            }
        } else {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_aws_documentation_example() {
        // GIVEN the "GET Bucket (List Objects)" example of the S3 SigV4 documentation
        let creds = Credentials {
            key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            token: None,
        };
        let query = [("max-keys", "2".to_string()), ("prefix", "J".to_string())];
        let empty = hex::encode(Sha256::digest(b""));
        let r = Request {
            method: "GET",
            host: "examplebucket.s3.amazonaws.com",
            path: "/",
            query: &query,
            extra_headers: &[],
            payload_hash: &empty,
            amz_date: "20130524T000000Z",
            region: "us-east-1",
            service: "s3",
        };
        // WHEN signed THEN the signature is the documented one
        let signed = sign(&r, &creds);
        let auth = signed
            .headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        assert!(
            auth.ends_with(
                "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
            ),
            "{auth}"
        );
        assert_eq!(signed.query_string, "max-keys=2&prefix=J");
    }

    #[test]
    fn urls_and_encoding() {
        assert_eq!(
            parse_url("s3://b/a/b.txt"),
            Ok(("b".into(), "a/b.txt".into()))
        );
        assert!(parse_url("https://x").is_err());
        assert_eq!(uri_encode("a b/c+d", true), "a%20b/c%2Bd");
    }
}
