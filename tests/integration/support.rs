//! Paths and helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The AWSTOE fixture corpus (documents written by others, with their sources and licences in
/// its README and MANIFEST.tsv): `tests/data/awstoe`, or `$KILN_FIXTURES`.
pub fn awstoe_fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/data/awstoe"))
}

/// Runs the `kiln` command line in-process; returns (exit code, stdout, stderr).
pub fn kiln(args: &[&str]) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = kiln_cli::run(
        std::iter::once("kiln").chain(args.iter().copied()),
        &mut out,
        &mut err,
    );
    (
        code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// A binary built by `cargo build` next to this test binary (`target/<profile>/NAME`).
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        bin.display()
    );
    bin
}

/// What ships, as `make test` builds it apart from the workspace build (whose feature
/// unification could hide a feature a shipped binary lacks): `lambda/<function>/bootstrap` as
/// `make package` builds them, `debug/kiln` and `debug/kiln-agent` as `make run` builds them.
/// In `KILN_SHIPPED_DIR`, by default `shipped/` in the target dir.
pub fn shipped(rel: &str) -> PathBuf {
    let dir = std::env::var_os("KILN_SHIPPED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("test binary path");
            exe.ancestors()
                .nth(3)
                .expect("target/<profile>/deps/<test>")
                .join("shipped")
        });
    let path = dir.join(rel);
    assert!(
        path.is_file(),
        "{} is missing: `make test` builds what ships before it runs the tests",
        path.display()
    );
    path
}

/// Makes paths in tool output relative to the repository, for stable snapshots.
pub fn relative(text: &str) -> String {
    text.replace(&format!("{}/", repo().display()), "")
}

/// A moto server on 127.0.0.1 and a free port, stopped when dropped. It stands in for AWS in
/// the tests: the code under test talks real HTTP to it.
pub struct Moto {
    child: std::process::Child,
    pub port: u16,
    /// The rehearsal's TLS listener (the functions' endpoint): its port and the folder holding
    /// its self-signed certificate (`cert.pem`).
    tls: Option<(u16, tempfile::TempDir)>,
}

impl Moto {
    fn server_binary() -> PathBuf {
        let bin = std::env::var_os("KILN_MOTO_SERVER")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .unwrap_or_else(|| repo().join(".venv/python/bin/moto_server"));
        assert!(
            bin.is_file(),
            "moto_server not found at {}: run `make setup` (or set KILN_MOTO_SERVER)",
            bin.display()
        );
        bin
    }

    /// moto's server with the gaps kiln needs filled (tests/conformance/moto_gaps.py:
    /// DescribeInstanceInformation, tags at creation on CreateImage/CopyImage), run by the Python
    /// of moto's virtualenv.
    pub fn start() -> Moto {
        Moto::launch(Moto::gaps_command())
    }

    /// As [`Moto::start`], with `images` (a JSON list in moto's `MOTO_AMIS_PATH` format) as the
    /// Amazon-owned images in place of moto's stock ones, whose creation dates are the time
    /// moto started: a test that needs "the newest" image states which one it is.
    pub fn start_with_images(images: &Path) -> Moto {
        let mut c = Moto::gaps_command();
        c.env("MOTO_AMIS_PATH", images);
        Moto::launch(c)
    }

    /// moto_gaps.py, with the IAM evaluator it decides an SSM agent's registration by.
    fn gaps_command() -> std::process::Command {
        let python = Moto::server_binary().with_file_name("python");
        let mut c = std::process::Command::new(python);
        c.arg(repo().join("tests/conformance/moto_gaps.py"))
            .env("KILN_AUTHZ_MODULES", Moto::evaluator_modules());
        c
    }

    /// The node_modules folder holding @cloud-copilot/iam-simulate (the IAM evaluator).
    pub fn evaluator_modules() -> PathBuf {
        let modules = std::env::var_os("KILN_NODE_MODULES")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".venv/node/node_modules"));
        assert!(
            modules.join("@cloud-copilot/iam-simulate").is_dir(),
            "@cloud-copilot/iam-simulate not found in {}: run `make setup` (or set KILN_NODE_MODULES)",
            modules.display()
        );
        modules
    }

    /// The deployment rehearsal's moto: every request signed by an assumed role is authorized
    /// against that role's policies by an IAM policy evaluator before moto runs it
    /// (tests/rehearsal/moto_server.py); each decision is appended to `log` as a JSON line.
    /// `faults` names the JSON file of injected faults (read on every request; may not exist).
    ///
    /// The same server also listens with TLS on a second port ([`Moto::tls_endpoint`]), with a
    /// self-signed certificate for 127.0.0.1 ([`Moto::certificate`]): the functions reach it
    /// there, as they reach AWS, so their HTTPS client and its trust store are exercised and
    /// `aws:SecureTransport` is true for them only.
    pub fn start_authorizing(log: &Path, faults: &Path, answers: &Path) -> Moto {
        let python = Moto::server_binary().with_file_name("python");
        let modules = Moto::evaluator_modules();
        let tls_port = free_port();
        let tls_dir = tempfile::tempdir().expect("certificate folder");
        let mut c = std::process::Command::new(python);
        c.arg(repo().join("tests/rehearsal/moto_server.py"))
            .env("KILN_AUTHZ_LOG", log)
            .env("KILN_FAULTS", faults)
            .env("KILN_TASK_ANSWERS", answers)
            .env("KILN_AUTHZ_MODULES", modules)
            .env("KILN_TLS_PORT", tls_port.to_string())
            .env("KILN_TLS_DIR", tls_dir.path());
        let mut moto = Moto::launch(c);
        let cert = tls_dir.path().join("cert.pem");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !cert.is_file() || std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server's TLS listener did not start on {tls_port} within 120s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        moto.tls = Some((tls_port, tls_dir));
        moto
    }

    /// The TLS endpoint of [`Moto::start_authorizing`]'s server.
    pub fn tls_endpoint(&self) -> String {
        let (port, _) = self
            .tls
            .as_ref()
            .expect("a TLS listener (start_authorizing)");
        format!("https://127.0.0.1:{port}")
    }

    /// An SDK HTTPS client (the functions' own: rustls over ring) trusting only the TLS
    /// listener's certificate.
    pub fn https_client(&self) -> aws_smithy_runtime_api::client::http::SharedHttpClient {
        use aws_smithy_http_client::tls;
        let pem = std::fs::read(self.certificate()).expect("the TLS listener's certificate");
        let context = tls::TlsContext::builder()
            .with_trust_store(tls::TrustStore::empty().with_pem_certificate(pem))
            .build()
            .expect("a TLS context");
        aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(context)
            .build_https()
    }

    /// The TLS listener's certificate (PEM), for SSL_CERT_FILE.
    pub fn certificate(&self) -> PathBuf {
        let (_, dir) = self
            .tls
            .as_ref()
            .expect("a TLS listener (start_authorizing)");
        dir.path().join("cert.pem")
    }

    fn launch(mut command: std::process::Command) -> Moto {
        let port = free_port();
        let child = command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Moto {
            child,
            port,
            tls: None,
        };
        // Generous: on a loaded 2-core machine moto's imports (and the rehearsal's evaluator)
        // took over 30 s once, which failed a fault campaign at a re-deploy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not listen on {port} within 120s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for AWS clients pointed at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// One plain HTTP request (for setting up fixtures); returns status and body.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", self.port, body.len());
        s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(body))
            .expect("send");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool and returns its stdout; the test fails with its output when it fails.
pub fn run_ok(mut cmd: std::process::Command) -> String {
    let out = cmd.output().expect("the tool runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small deterministic generator for seeded tests (no dependency).
#[derive(Debug)]
pub struct Lcg(pub u64);

impl Lcg {
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}
