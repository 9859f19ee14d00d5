//! The artifacts bucket as the stage functions use it: PutObject and GetObject of one object, and
//! presigned GET and PUT URLs, path-style. The requests are signed by aws-sigv4, the SDK's own
//! SigV4 signer, with the settings the SDK uses for S3 (single URI encoding, no path
//! normalisation, `x-amz-content-sha256`), and sent over the SDK's HTTP connector (hyper 1,
//! rustls over ring).
//!
//! Why not aws-sdk-s3: its client is about 2 MB of every bootstrap that holds it (endpoint
//! rules, checksums, Express sessions, the operations' plugins), and customize, test-image and
//! wake use four calls of it. The CLI's artifact set-up (`prepare_artifacts`, `upload_agent`,
//! `bootstrap`) keeps the SDK. The unit tests hold these URLs to the SDK's presigner, byte for
//! byte; the rehearsal's proxy verifies every signature (tests/rehearsal/moto_server.py).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SessionTokenMode, SignableBody,
    SignableRequest, SignatureLocation, SigningInstructions, SigningSettings,
    UriPathNormalizationMode,
};
use aws_smithy_runtime_api::client::http::HttpConnector;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::body::SdkBody;

use crate::errors::{classify_aws_code, ErrorKind, StageError};

/// The longest a presigned URL may live (SigV4's limit).
const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long one attempt may take (the objects are small: documents, reports).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// One bucket's objects.
pub(crate) struct Objects {
    bucket: String,
    region: String,
    /// `scheme://host[:port]`, no path.
    endpoint: String,
    credentials: Option<SharedCredentialsProvider>,
    cached: Mutex<Option<Credentials>>,
    connector: aws_smithy_http_client::Connector,
    attempts: u32,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A GET or a PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Put,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }

    /// The operation, as the SDK names it in its presigned URLs (`x-id`) and kiln in errors.
    fn operation(self) -> &'static str {
        match self {
            Method::Get => "GetObject",
            Method::Put => "PutObject",
        }
    }
}

/// S3's endpoint for a region when none is configured: `s3.<region>.amazonaws.com`, or
/// `.amazonaws.com.cn` in the China regions.
fn default_endpoint(region: &str) -> String {
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("https://s3.{region}.{suffix}")
}

/// `text` percent-encoded as S3 and the SDK encode it: every byte but RFC 3986's unreserved
/// ones (and `/` in a key, which is a URI path) as `%XX`.
fn percent_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of `<tag>…</tag>` in an S3 error body.
fn xml_value<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&format!("</{tag}>"))?;
    Some(&body[start..start + len])
}

/// What a failed response says: the error code and message from its XML body, or the status.
fn response_error(operation: &str, status: u16, body: &[u8]) -> StageError {
    let text = String::from_utf8_lossy(body);
    let code = xml_value(&text, "Code").map(str::to_string);
    let message = xml_value(&text, "Message")
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let kind = match code.as_deref() {
        Some("SlowDown") => ErrorKind::Retryable,
        Some(c) if classify_aws_code(c) != ErrorKind::Internal => classify_aws_code(c),
        _ if status >= 500 || status == 429 => ErrorKind::Retryable,
        _ => ErrorKind::Internal,
    };
    let err = StageError::new(kind, format!("{operation}: {message}"));
    match code {
        Some(c) => err.with_code(c),
        None => err,
    }
}

impl Objects {
    /// The objects of `bucket`, with the configuration's region, credentials, endpoint
    /// (`AWS_ENDPOINT_URL_S3`, then the configuration's) and attempts.
    pub(crate) fn new(config: &aws_config::SdkConfig, bucket: &str, region: &str) -> Objects {
        let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| config.endpoint_url().map(str::to_string))
            .unwrap_or_else(|| default_endpoint(region));
        // The configuration's connect timeout (kiln::lambda sets 3.1 s, as aws-config does).
        let connect = config
            .timeout_config()
            .and_then(|t| t.connect_timeout())
            .unwrap_or(Duration::from_millis(3100));
        let settings = aws_smithy_runtime_api::client::http::HttpConnectorSettings::builder()
            .connect_timeout(connect);
        let connector = aws_smithy_http_client::Connector::builder()
            .connector_settings(settings.build())
            .sleep_impl(aws_smithy_async::rt::sleep::TokioSleep::new())
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build();
        Objects {
            bucket: bucket.to_string(),
            region: region.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            credentials: config.credentials_provider(),
            cached: Mutex::new(None),
            connector,
            attempts: config.retry_config().map_or(3, |r| r.max_attempts()).max(1),
        }
    }

    fn url(&self, key: &str) -> String {
        format!(
            "{}/{}/{}",
            self.endpoint,
            self.bucket,
            percent_encode(key, true)
        )
    }

    /// The credentials, cached until shortly before they expire.
    async fn credentials(&self) -> Result<Credentials, StageError> {
        let fresh = |c: &Credentials| {
            c.expiry()
                .is_none_or(|e| e > SystemTime::now() + RENEW_BEFORE)
        };
        if let Some(c) = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|c| fresh(c))
        {
            return Ok(c.clone());
        }
        let provider = self.credentials.as_ref().ok_or_else(|| {
            StageError::new(ErrorKind::Internal, "S3: no credentials are configured")
        })?;
        let creds = provider.provide_credentials().await.map_err(|e| {
            StageError::new(
                ErrorKind::Retryable,
                format!("S3: the credentials could not be loaded: {e}"),
            )
        })?;
        *self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(creds.clone());
        Ok(creds)
    }

    /// The signature of `method url` by aws-sigv4 with the settings the SDK signs S3 requests
    /// with (single URI encoding, no path normalisation, `x-amz-content-sha256`, the session
    /// token signed), in the headers or the query (`where_`, with the URL's lifetime).
    fn instructions(
        &self,
        creds: Credentials,
        method: Method,
        url: &str,
        body: SignableBody<'_>,
        where_: (SignatureLocation, Option<Duration>),
        time: SystemTime,
    ) -> Result<SigningInstructions, StageError> {
        let failed = |e: &dyn std::fmt::Display| {
            StageError::new(
                ErrorKind::Internal,
                format!("{}: signing: {e}", method.operation()),
            )
        };
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.session_token_mode = SessionTokenMode::Include;
        (settings.signature_location, settings.expires_in) = where_;
        let identity: Identity = creds.into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| failed(&e))?
            .into();
        let request = SignableRequest::new(method.as_str(), url, std::iter::empty(), body)
            .map_err(|e| failed(&e))?;
        Ok(sign(request, &params)
            .map_err(|e| failed(&e))?
            .into_parts()
            .0)
    }

    /// A presigned URL for `method` on `key`, valid for `life` from `now`: what the SDK's
    /// `presigned()` makes, `x-id` included.
    pub(crate) fn presign_at(
        &self,
        creds: Credentials,
        method: Method,
        key: &str,
        life: Duration,
        now: SystemTime,
    ) -> Result<String, StageError> {
        if life > MAX_LIFETIME || life.is_zero() {
            return Err(StageError::new(
                ErrorKind::Internal,
                format!(
                    "a presigned URL lives between 1 second and 7 days, not {}s",
                    life.as_secs()
                ),
            ));
        }
        let url = format!("{}?x-id={}", self.url(key), method.operation());
        let instructions = self.instructions(
            creds,
            method,
            &url,
            SignableBody::UnsignedPayload,
            (SignatureLocation::QueryParams, Some(life)),
            now,
        )?;
        let mut out = url;
        for (name, value) in instructions.params() {
            out.push('&');
            out.push_str(name);
            out.push('=');
            out.push_str(&percent_encode(value, false));
        }
        Ok(out)
    }

    /// A presigned URL for `method` on `key`, valid for `life` from now.
    pub(crate) async fn presign(
        &self,
        method: Method,
        key: &str,
        life: Duration,
    ) -> Result<String, StageError> {
        let creds = self.credentials().await?;
        self.presign_at(creds, method, key, life, SystemTime::now())
    }

    /// Puts `body` as `key`.
    pub(crate) async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), StageError> {
        self.send(Method::Put, key, body).await.map(|_| ())
    }

    /// The bytes of `key`.
    pub(crate) async fn get(&self, key: &str) -> Result<Vec<u8>, StageError> {
        self.send(Method::Get, key, Vec::new()).await
    }

    /// One request, signed in its headers, retried as the SDK's standard mode retries: on
    /// throttling, 5xx, timeouts and connection failures, with exponential jittered backoff.
    async fn send(&self, method: Method, key: &str, body: Vec<u8>) -> Result<Vec<u8>, StageError> {
        let op = method.operation();
        let url = self.url(key);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.attempt(method, &url, &body).await;
            match result {
                Ok(bytes) => return Ok(bytes),
                Err(e) if e.kind == ErrorKind::Retryable && attempt < self.attempts => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(mut e) => {
                    if !e.message.starts_with(op) {
                        e.message = format!("{op}: {}", e.message);
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn attempt(&self, method: Method, url: &str, body: &[u8]) -> Result<Vec<u8>, StageError> {
        let op = method.operation();
        let creds = self.credentials().await?;
        let instructions = self.instructions(
            creds,
            method,
            url,
            SignableBody::Bytes(body),
            (SignatureLocation::Headers, None),
            SystemTime::now(),
        )?;
        let mut request = aws_smithy_runtime_api::http::Request::new(SdkBody::from(body.to_vec()));
        let internal =
            |e: &dyn std::fmt::Display| StageError::new(ErrorKind::Internal, format!("{op}: {e}"));
        request
            .set_method(method.as_str())
            .map_err(|e| internal(&e))?;
        request.set_uri(url).map_err(|e| internal(&e))?;
        request
            .headers_mut()
            .insert("content-length", body.len().to_string());
        for (name, value) in instructions.headers() {
            request
                .headers_mut()
                .insert(name.to_string(), value.to_string());
        }
        let response = tokio::time::timeout(ATTEMPT_TIMEOUT, self.connector.call(request))
            .await
            .map_err(|_| {
                StageError::new(
                    ErrorKind::Retryable,
                    format!("{op}: no answer in {}s", ATTEMPT_TIMEOUT.as_secs()),
                )
            })?
            .map_err(|e| {
                StageError::new(
                    ErrorKind::Retryable,
                    format!(
                        "{op}: {}",
                        aws_smithy_types::error::display::DisplayErrorContext(&e)
                    ),
                )
            })?;
        let status = response.status().as_u16();
        let bytes = aws_smithy_types::byte_stream::ByteStream::new(response.into_body())
            .collect()
            .await
            .map_err(|e| StageError::new(ErrorKind::Retryable, format!("{op}: {e}")))?
            .into_bytes()
            .to_vec();
        if (200..300).contains(&status) {
            Ok(bytes)
        } else {
            Err(response_error(op, status, &bytes))
        }
    }
}

/// The standard retry mode's backoff: a random fraction of min(20 s, 1 s × 2^(attempt-1)).
fn backoff(attempt: u32) -> Duration {
    let ceiling = Duration::from_secs(1)
        .saturating_mul(1 << (attempt - 1).min(5))
        .min(Duration::from_secs(20));
    let fraction = f64::from(uuid::Uuid::new_v4().as_bytes()[0]) / 256.0;
    ceiling.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: Option<&str>) -> aws_config::SdkConfig {
        let mut b = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("eu-west-1"))
            .credentials_provider(SharedCredentialsProvider::new(creds()));
        if let Some(e) = endpoint {
            b = b.endpoint_url(e);
        }
        b.build()
    }

    fn creds() -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("FwoGZXIvYXdzE/session+token=".into()),
            None,
            "test",
        )
    }

    /// The SDK's presigned URL for the same request, at the same time, with the same key.
    async fn sdk_url(endpoint: Option<&str>, method: Method, key: &str, life: Duration) -> String {
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&config(endpoint))
                .force_path_style(true)
                .build(),
        );
        let cfg = aws_sdk_s3::presigning::PresigningConfig::builder()
            .start_time(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600))
            .expires_in(life)
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let uri = |r: aws_sdk_s3::presigning::PresignedRequest| r.uri().to_string();
        let url = match method {
            Method::Get => {
                let get = s3.get_object().bucket("kiln-art").key(key);
                get.presigned(cfg)
                    .await
                    .map(uri)
                    .map_err(|e| format!("{e:?}"))
            }
            Method::Put => {
                let put = s3.put_object().bucket("kiln-art").key(key);
                put.presigned(cfg)
                    .await
                    .map(uri)
                    .map_err(|e| format!("{e:?}"))
            }
        };
        url.unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn presigned_urls_are_the_sdks_byte_for_byte() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600);
        for endpoint in [None, Some("http://127.0.0.1:5000")] {
            let objects = Objects::new(&config(endpoint), "kiln-art", "eu-west-1");
            for (method, key, life) in [
                (Method::Get, "builds/01JB/customize/docs/0.json", 3600),
                (Method::Put, "builds/01JB/test/report.json", 6 * 3600),
                (Method::Get, "agent/kiln-agent-x86_64", 7 * 24 * 3600),
                (Method::Put, "odd key/with+plus&amp=é", 60),
            ] {
                let life = Duration::from_secs(life);
                let ours = objects
                    .presign_at(creds(), method, key, life, at)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(ours, sdk_url(endpoint, method, key, life).await, "{key}");
            }
        }
    }

    /// A server on loopback answering each request with the next of `answers` (status, body);
    /// returns its endpoint and the requests it read.
    fn server(answers: Vec<(u16, &'static str)>) -> (String, std::sync::mpsc::Receiver<String>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let endpoint = format!(
            "http://{}",
            listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (status, body) in answers {
                let Ok((mut conn, _)) = listener.accept() else {
                    return;
                };
                let mut buf = vec![0u8; 65536];
                let n = conn.read(&mut buf).unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).to_string());
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (endpoint, rx)
    }

    #[tokio::test]
    async fn a_throttled_put_is_retried_and_a_denied_one_is_not() {
        let slow = (
            503,
            "<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>",
        );
        let denied = (
            403,
            "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
        );
        let (endpoint, seen) = server(vec![slow, (200, "")]);
        let objects = Objects::new(&config(Some(&endpoint)), "kiln-art", "eu-west-1");
        objects
            .put("builds/b/docs/0.json", b"{}".to_vec())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let requests: Vec<String> = seen.try_iter().collect();
        assert_eq!(requests.len(), 2, "{requests:#?}");
        assert!(requests
            .iter()
            .all(|r| r.starts_with("PUT /kiln-art/builds/b/docs/0.json ")
                && r.contains("x-amz-security-token:")
                && r.contains("authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")));

        let (endpoint, seen) = server(vec![denied, (200, "")]);
        let objects = Objects::new(&config(Some(&endpoint)), "kiln-art", "eu-west-1");
        let e = objects
            .get("builds/b/test/report.json")
            .await
            .err()
            .unwrap_or_else(|| panic!("a denied GetObject succeeded"));
        assert_eq!(
            (e.code.as_deref(), e.message.as_str()),
            (Some("AccessDenied"), "GetObject: Access Denied")
        );
        assert_eq!(seen.try_iter().count(), 1);
    }

    #[test]
    fn a_presigned_url_lives_at_most_seven_days() {
        let objects = Objects::new(&config(None), "b", "eu-west-1");
        let at = SystemTime::now();
        for life in [Duration::ZERO, MAX_LIFETIME + Duration::from_secs(1)] {
            let e = objects
                .presign_at(creds(), Method::Get, "k", life, at)
                .err()
                .unwrap_or_else(|| panic!("{life:?} was accepted"));
            assert!(e.message.contains("7 days"), "{}", e.message);
        }
    }

    #[test]
    fn the_default_endpoint_is_regional_and_path_style() {
        let objects = Objects::new(&config(None), "kiln-art", "cn-north-1");
        assert_eq!(
            objects.url("builds/a b"),
            "https://s3.cn-north-1.amazonaws.com.cn/kiln-art/builds/a%20b"
        );
        assert_eq!(
            default_endpoint("us-east-1"),
            "https://s3.us-east-1.amazonaws.com"
        );
    }

    #[test]
    fn s3_errors_keep_their_code_and_retry_what_the_sdk_retries() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>";
        let e = response_error("PutObject", 503, body);
        assert_eq!(e.kind, ErrorKind::Retryable);
        assert_eq!(e.code.as_deref(), Some("SlowDown"));
        assert_eq!(e.message, "PutObject: Reduce your request rate.");
        let e = response_error(
            "GetObject",
            403,
            b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
        );
        assert_eq!(e.kind, ErrorKind::Internal);
        assert_eq!(e.code.as_deref(), Some("AccessDenied"));
        let e = response_error("GetObject", 500, b"");
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Retryable, "GetObject: HTTP 500")
        );
    }
}
