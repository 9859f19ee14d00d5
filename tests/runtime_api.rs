//! A minimal AWS Lambda Runtime API: serves one event to a function's `bootstrap` and takes its
//! answer, timing the cold start (spawn to answer).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// What one invocation returned.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The path the function posted to (`…/response` or `…/error`) and the body it posted.
    pub answer: (String, Json),
    /// From spawning the process to receiving its answer.
    pub elapsed: Duration,
    /// From spawning the process to its first `/invocation/next`: the function's init.
    pub init: Duration,
}

/// Spawns `binary` as Lambda function `function`, serves `event` once, returns its answer.
pub fn invoke_once(
    binary: &Path,
    function: &str,
    event: &Json,
    env: &[(&str, String)],
) -> std::io::Result<Invocation> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let start = Instant::now();
    let log_path = std::env::temp_dir().join(format!(
        "kiln-invoke-{}-{}.stderr",
        std::process::id(),
        addr.port()
    ));
    let log = std::fs::File::create(&log_path)?;
    let mut child = std::process::Command::new(binary)
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "test")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        // Into a file, not a pipe nobody reads: what the function said, should it fail.
        .stderr(log)
        .spawn()?;
    let result = serve(&listener, &mut child, function, event);
    let elapsed = start.elapsed();
    let result = result.map(|(answer, next_at)| (answer, next_at.duration_since(start)));
    let _ = child.kill();
    let _ = child.wait();
    let result = result
        .map(|(answer, init)| Invocation {
            answer,
            elapsed,
            init,
        })
        .map_err(|e| {
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = said.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            std::io::Error::other(format!("{e}; its stderr:\n{tail}"))
        });
    let _ = std::fs::remove_file(&log_path);
    result
}

/// The next connection, or an error when the function exits first or 30 s pass.
fn accept(
    listener: &TcpListener,
    child: &mut std::process::Child,
) -> std::io::Result<std::net::TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait()? {
                    return Err(std::io::Error::other(format!(
                        "the function exited ({status}) without answering"
                    )));
                }
                if Instant::now() > deadline {
                    return Err(std::io::Error::other("the function did not call in 30 s"));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
}

// Each answer closes its connection (`Connection: close`): this emulator takes one request per
// connection, and a client that kept the connection for its next request met the closed socket
// (hyper's IncompleteMessage, the function exiting without answering).
fn serve(
    listener: &TcpListener,
    child: &mut std::process::Child,
    function: &str,
    event: &Json,
) -> std::io::Result<((String, Json), Instant)> {
    let body = event.to_string();
    let mut served = None;
    for _ in 0..3 {
        let mut s = accept(listener, child)?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut payload = vec![0u8; length];
        reader.read_exact(&mut payload)?;
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if path.ends_with("/invocation/next") {
            if served.is_some() {
                break;
            }
            let next_at = Instant::now();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nLambda-Runtime-Aws-Request-Id: req-1\r\nLambda-Runtime-Deadline-Ms: {}\r\nLambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:{function}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                chrono::Utc::now().timestamp_millis() + 60_000,
                body.len()
            );
            s.write_all(head.as_bytes())?;
            s.write_all(body.as_bytes())?;
            served = Some(next_at);
        } else {
            s.write_all(
                b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            let answer = (path, serde_json::from_slice(&payload).unwrap_or(Json::Null));
            return Ok((answer, served.unwrap_or_else(Instant::now)));
        }
    }
    Err(std::io::Error::other("the function did not answer"))
}
