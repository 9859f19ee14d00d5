//! kiln-agent as a user runs it: the real binary, real bash, real files in temporary folders.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;

use crate::support::built_binary;

/// A scratch folder with a document in it, run by the real `kiln-agent`.
pub struct Run {
    pub dir: tempfile::TempDir,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn report(&self) -> Json {
        serde_json::from_str(
            &std::fs::read_to_string(self.path("report.json")).expect("report written"),
        )
        .expect("report is JSON")
    }
    /// (status, attempts) of a step, by name.
    pub fn step(&self, name: &str) -> (String, u64) {
        let r = self.report();
        for d in r["documents"].as_array().into_iter().flatten() {
            for p in d["phases"].as_array().into_iter().flatten() {
                for s in p["steps"].as_array().into_iter().flatten() {
                    if s["name"] == name {
                        return (
                            s["status"].as_str().unwrap_or_default().to_string(),
                            s["attempts"].as_u64().unwrap_or(0),
                        );
                    }
                }
            }
        }
        ("absent".into(), 0)
    }
    pub fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }
    /// Runs the agent again in the same folder (after a "reboot").
    pub fn again(&mut self, extra: &[&str]) {
        let (code, stdout, stderr) = invoke(self.dir.path(), extra, &[]);
        (self.code, self.stdout, self.stderr) = (code, stdout, stderr);
    }
}

fn invoke(dir: &Path, extra: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let out = Command::new(built_binary("kiln-agent"))
        .arg("run")
        .arg("--documents")
        .arg(dir.join("doc.yaml"))
        .arg("--report")
        .arg(dir.join("report.json"))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--state-file")
        .arg(dir.join("state/state.json"))
        .arg("--quiet")
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .output()
        .expect("kiln-agent runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `doc` (with `@DIR@` replaced by the scratch folder) and runs it.
pub fn run_doc(doc: &str, extra: &[&str]) -> Run {
    run_doc_env(doc, extra, &[])
}

pub fn run_doc_env(doc: &str, extra: &[&str], env: &[(&str, String)]) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = doc.replace("@DIR@", &dir.path().display().to_string());
    std::fs::write(dir.path().join("doc.yaml"), text).expect("write doc");
    let (code, stdout, stderr) = invoke(dir.path(), extra, env);
    Run {
        dir,
        code,
        stdout,
        stderr,
    }
}

fn doc(steps: &str) -> String {
    format!("name: t\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n{steps}")
}

#[test]
fn file_actions_do_what_awstoe_documents() {
    // GIVEN a document that uses every Linux file action on a scratch folder
    let r = run_doc(
        &doc(r#"
      - name: Folder
        action: CreateFolder
        inputs:
          - path: "@DIR@/a/b"
            permissions: 750
      - name: File
        action: CreateFile
        inputs:
          - path: "@DIR@/a/b/hello.txt"
            content: "hello"
            permissions: '0640'
          - path: "@DIR@/a/wide.txt"
            content: "wide"
            encoding: utf16
      - name: Append
        action: AppendFile
        inputs:
          - path: "@DIR@/a/b/hello.txt"
            content: " world"
      - name: Read
        action: ReadFile
        inputs:
          - path: "@DIR@/a/b/hello.txt"
      - name: Echo
        action: ExecuteBinary
        inputs:
          path: /bin/echo
          arguments: ["{{ build.Read.outputs.content }}", "--literal $(nope)"]
      - name: CopyOne
        action: CopyFile
        inputs:
          - source: "@DIR@/a/b/hello.txt"
            destination: "@DIR@/c/copy.txt"
      - name: CopyTree
        action: CopyFolder
        inputs:
          - source: "@DIR@/a"
            destination: "@DIR@/tree"
      - name: MoveOne
        action: MoveFile
        inputs:
          - source: "@DIR@/c/copy.txt"
            destination: "@DIR@/c/moved.txt"
      - name: MoveTree
        action: MoveFolder
        inputs:
          - source: "@DIR@/tree"
            destination: "@DIR@/tree2"
      - name: Link
        action: CreateSymlink
        inputs:
          - path: "@DIR@/link"
            target: "@DIR@/c/moved.txt"
      - name: List
        action: ListFiles
        inputs:
          - path: "@DIR@/tree2"
            recursive: true
            fileNamePattern: "*.txt"
      - name: Perms
        action: SetFolderPermissions
        inputs:
          - path: "@DIR@/tree2"
            permissions: 700
            recursive: true
      - name: FilePerms
        action: SetFilePermissions
        inputs:
          - path: "@DIR@/c/moved.txt"
            permissions: 600
      - name: Owner
        action: SetFileOwner
        inputs:
          - path: "@DIR@/c/moved.txt"
            owner: "0"
            group: "0"
      - name: FolderOwner
        action: SetFolderOwner
        inputs:
          - path: "@DIR@/tree2"
            owner: "0"
            recursive: true
      - name: Encoding
        action: SetFileEncoding
        inputs:
          - path: "@DIR@/c/moved.txt"
            encoding: utf16
      - name: RemoveFile
        action: DeleteFile
        inputs:
          - path: "@DIR@/a/wide.txt"
      - name: RemoveTree
        action: DeleteFolder
        inputs:
          - path: "@DIR@/a"
            force: true
      - name: Count
        action: Assert
        inputs:
          numberEquals: 2
          value: "{{ build.List.outputs.files }}"
        onFailure: Ignore
"#),
        &[],
    );
    // THEN the run succeeds and the disk shows each action's effect
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(r.path(p)).expect(p).permissions().mode() & 0o7777;
    assert_eq!(r.read("tree2/b/hello.txt"), "hello world");
    assert_eq!(mode("tree2/b"), 0o700, "recursive permissions");
    assert_eq!(mode("c/moved.txt"), 0o600);
    assert_eq!(
        std::fs::read(r.path("c/moved.txt")).expect("moved"),
        [
            0xFF, 0xFE, b'h', 0, b'e', 0, b'l', 0, b'l', 0, b'o', 0, b' ', 0, b'w', 0, b'o', 0,
            b'r', 0, b'l', 0, b'd', 0
        ]
    );
    assert_eq!(
        std::fs::read_link(r.path("link")).expect("symlink"),
        r.path("c/moved.txt")
    );
    assert!(!r.path("a").exists() && !r.path("tree").exists() && !r.path("c/copy.txt").exists());
    let report = r.report();
    let steps = &report["documents"][0]["phases"][0]["steps"];
    let echo = steps
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == "Echo")
        .expect("Echo");
    assert_eq!(
        echo["outputs"]["stdout"], "hello world --literal $(nope)",
        "arguments are data, not shell"
    );
    let list = steps
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == "List")
        .expect("List");
    assert_eq!(list["outputs"]["files"].as_array().map(Vec::len), Some(2));
}

#[test]
fn windows_only_actions_fail_with_a_clear_message_on_linux() {
    let r = run_doc(&doc("      - name: Ps\n        action: ExecutePowerShell\n        onFailure: Continue\n        inputs:\n          commands: [Write-Host hi]\n      - name: After\n        action: ExecuteBash\n        inputs:\n          commands: [echo after]\n"), &[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.step("Ps").0, "failed");
    assert_eq!(r.step("After").0, "success", "Continue goes on");
    assert!(
        r.stdout
            .contains("`ExecutePowerShell` is a Windows action: unsupported on this platform"),
        "{}",
        r.stdout
    );
}

/// One row of the onFailure × maxAttempts × timeout matrix.
fn failing_step(on_failure: &str, attempts: u32, timeout: bool) -> Run {
    let body = if timeout {
        "(sleep 30; echo orphan > @DIR@/orphan) & sleep 30"
    } else {
        "exit 7"
    };
    let timeout_line = if timeout {
        "        timeoutSeconds: 1\n"
    } else {
        ""
    };
    run_doc(
        &doc(&format!(
            "      - name: Flaky\n        action: ExecuteBash\n        onFailure: {on_failure}\n        maxAttempts: {attempts}\n{timeout_line}        inputs:\n          commands:\n            - echo try >> @DIR@/attempts\n            - {body}\n      - name: Next\n        action: ExecuteBash\n        inputs:\n          commands: [touch @DIR@/next-ran]\n"
        )),
        &[],
    )
}

#[test]
fn on_failure_max_attempts_and_timeout_combine_as_documented() {
    for on_failure in ["Abort", "Continue", "Ignore"] {
        for attempts in [1u32, 3] {
            for timeout in [false, true] {
                // GIVEN a step that always fails (exit 7) or hangs past its timeout
                let started = std::time::Instant::now();
                let r = failing_step(on_failure, attempts, timeout);
                let case = format!("{on_failure} × {attempts} × timeout={timeout}");
                // THEN it was tried maxAttempts times
                assert_eq!(
                    r.read("attempts").lines().count() as u32,
                    attempts,
                    "{case}"
                );
                assert_eq!(r.step("Flaky").1, u64::from(attempts), "{case}");
                // AND the status, the next step and the exit code follow onFailure
                let (status, next_ran, code) = match on_failure {
                    "Abort" => ("failed", false, 1),
                    "Continue" => ("failed", true, 1),
                    _ => ("ignored", true, 0),
                };
                assert_eq!(r.step("Flaky").0, status, "{case}");
                assert_eq!(r.path("next-ran").exists(), next_ran, "{case}");
                assert_eq!(r.code, code, "{case}\n{}", r.stdout);
                if timeout {
                    // AND the timeout killed the whole process group, background children too
                    assert!(
                        started.elapsed().as_secs() < 20,
                        "{case}: took {:?}",
                        started.elapsed()
                    );
                    assert!(
                        r.stdout.contains("timed out after 1s"),
                        "{case}: {}",
                        r.stdout
                    );
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    assert!(!r.path("orphan").exists(), "{case}: an orphan survived");
                }
            }
        }
    }
}

#[test]
fn a_step_that_succeeds_on_a_later_attempt_succeeds() {
    let r = run_doc(&doc("      - name: Second\n        action: ExecuteBash\n        maxAttempts: 3\n        inputs:\n          commands:\n            - n=$(cat @DIR@/n 2>/dev/null || echo 0)\n            - echo $((n+1)) > @DIR@/n\n            - test $n -ge 1\n"), &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.step("Second"), ("success".into(), 2));
}

#[test]
fn loops_iterate_and_name_their_variables() {
    let r = run_doc(
        &doc(r#"
      - name: Down
        action: ExecuteBash
        loop:
          for: {start: 6, end: 0, updateBy: -3}
        inputs:
          commands: ["echo {{ loop.index }}:{{ loop.value }} >> @DIR@/down"]
      - name: Each
        action: ExecuteBash
        loop:
          name: fruit
          forEach: [apple, pear]
        inputs:
          commands: ["echo {{ fruit.index }}={{ fruit.value }} >> @DIR@/each"]
      - name: Split
        action: ExecuteBash
        loop:
          forEach:
            list: "a;b;c"
            delimiter: ";"
        inputs:
          commands: ["echo {{ loop.value }} >> @DIR@/split"]
"#),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.read("down"), "0:6\n1:3\n2:0\n");
    assert_eq!(r.read("each"), "0=apple\n1=pear\n");
    assert_eq!(r.read("split"), "a\nb\nc\n");
}

#[test]
fn if_skips_steps_and_reads_chained_outputs() {
    let r = run_doc(
        &doc(r#"
      - name: Kind
        action: ExecuteBash
        inputs:
          commands: ["echo s3"]
      - name: WhenS3
        action: ExecuteBash
        if:
          stringEquals: s3
          value: "{{ build.Kind.outputs.stdout }}"
        inputs:
          commands: ["touch @DIR@/s3"]
      - name: WhenLocal
        action: ExecuteBash
        if:
          and:
            - stringEquals: local
              value: "{{ build.Kind.outputs.stdout }}"
            - not:
                fileExists: /nonexistent
        inputs:
          commands: ["touch @DIR@/local"]
"#),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(r.path("s3").exists());
    assert!(!r.path("local").exists());
    assert_eq!(r.step("WhenLocal").0, "skipped");
}

#[test]
fn exit_194_and_reboot_resume_where_they_left_off() {
    // GIVEN a document whose second step asks for a reboot once and whose third is a Reboot action
    let mut r = run_doc(
        &doc(r#"
      - name: Once
        action: ExecuteBash
        inputs:
          commands: ["echo once >> @DIR@/once"]
      - name: NeedsReboot
        action: ExecuteBash
        inputs:
          commands:
            - echo run >> @DIR@/needs
            - if [ ! -f @DIR@/rebooted ]; then touch @DIR@/rebooted; exit 194; fi
            - echo after-reboot
      - name: RebootNow
        action: Reboot
      - name: Last
        action: ExecuteBash
        inputs:
          commands: ["echo '{{ build.NeedsReboot.outputs.stdout }}' > @DIR@/last"]
"#),
        &[],
    );
    // WHEN run: it exits 194 and keeps its progress
    assert_eq!(r.code, 194, "{}", r.stdout);
    assert!(r.path("state/state.json").exists());
    // AND run again after the "reboot": the same step runs again, then the Reboot action asks again
    r.again(&[]);
    assert_eq!(r.code, 194, "{}", r.stdout);
    // AND a third time: the run continues after the Reboot action and finishes
    r.again(&[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // THEN earlier steps ran once, the rebooting step twice, chaining survived, state is gone
    assert_eq!(r.read("once"), "once\n");
    assert_eq!(r.read("needs"), "run\nrun\n");
    assert_eq!(r.read("last"), "after-reboot\n");
    assert!(!r.path("state/state.json").exists());
    let report = r.report();
    assert_eq!(report["reboots"], 2);
    let names: Vec<&str> = report["documents"][0]["phases"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["Once", "NeedsReboot", "RebootNow", "Last"],
        "each step once in the final report"
    );
}

#[test]
fn a_step_that_always_asks_for_a_reboot_fails_after_the_limit() {
    let mut r = run_doc(&doc("      - name: Forever\n        action: ExecuteBash\n        inputs:\n          commands: [exit 194]\n"), &[]);
    let mut codes = vec![r.code];
    for _ in 0..6 {
        if r.code != 194 {
            break;
        }
        r.again(&[]);
        codes.push(r.code);
    }
    assert_eq!(codes, [194, 194, 194, 194, 194, 1]);
    assert!(
        r.stdout.contains("asked for a reboot 6 times"),
        "{}",
        r.stdout
    );
}

#[test]
fn parameter_values_passed_through_the_glue_stay_inert() {
    // GIVEN a hostile parameter value
    let hostile = "$(touch @DIR@/PWNED)`touch @DIR@/PWNED2`";
    let d = r#"name: t
schemaVersion: 1.0
parameters:
  - Value:
      type: string
phases:
  - name: build
    steps:
      - name: AsEnv
        action: ExecuteBash
        inputs:
          commands: ['printf "%s" "$Value" > @DIR@/env.txt', 'printf "%s" "$KILN_PARAM_Value" > @DIR@/env2.txt']
      - name: AsFile
        action: CreateFile
        inputs:
          - path: "@DIR@/file.txt"
            content: "{{ Value }}"
      - name: AsArgument
        action: ExecuteBinary
        inputs:
          path: /bin/echo
          arguments: ["{{ Value }}"]
"#;
    let dir_holder = tempfile::tempdir().expect("tmp");
    let hostile = hostile.replace("@DIR@", &dir_holder.path().display().to_string());
    // WHEN passed on the command line and through a parameters file
    for via_file in [false, true] {
        let r = if via_file {
            let pf = dir_holder.path().join("params.json");
            std::fs::write(&pf, serde_json::json!([{ "Value": hostile }]).to_string())
                .expect("params file");
            run_doc(d, &["--parameters-file", &pf.display().to_string()])
        } else {
            run_doc(d, &["--parameters", &format!("Value={hostile}")])
        };
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        // THEN every route delivers the value verbatim and nothing ran
        assert_eq!(r.read("env.txt"), hostile);
        assert_eq!(r.read("env2.txt"), hostile);
        assert_eq!(r.read("file.txt"), hostile);
        assert!(
            !dir_holder.path().join("PWNED").exists() && !dir_holder.path().join("PWNED2").exists()
        );
    }
}

#[test]
fn execute_document_runs_a_nested_document_with_parameters() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("nested.yaml"),
        "schemaVersion: 1.0\nparameters:\n  - Who:\n      type: string\nphases:\n  - name: build\n    steps:\n      - name: Hello\n        action: ExecuteBash\n        inputs:\n          commands: [\"echo hi {{ Who }} > nested-out\"]\n  - name: test\n    steps:\n      - name: NotRun\n        action: ExecuteBash\n        inputs:\n          commands: [\"touch nested-test-ran\"]\n",
    )
    .expect("nested");
    let nested = dir.path().join("nested.yaml").display().to_string();
    let r = run_doc(&doc(&format!("      - name: Nest\n        action: ExecuteDocument\n        inputs:\n          document: {nested}\n          phases: build\n          parameters:\n            - name: Who\n              value: kiln\n")), &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.read("work/nested-out"), "hi kiln\n");
    assert!(
        !r.path("work/nested-test-ran").exists(),
        "phases filter the nested document"
    );
}

#[test]
fn web_download_verifies_the_checksum_and_retries() {
    use sha2::Digest;
    // GIVEN a local HTTP server that fails the first request, then serves a file
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let body = b"payload-bytes".to_vec();
    let sum = hex::encode(sha2::Sha256::digest(&body));
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for (n, stream) in listener.incoming().take(3).enumerate() {
            let mut s = stream.expect("conn");
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let reply = if n == 0 {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            } else {
                [
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes(),
                    body.clone(),
                ]
                .concat()
            };
            let _ = s.write_all(&reply);
        }
    });
    let r = run_doc(
        &doc(&format!(
            "      - name: Get\n        action: WebDownload\n        inputs:\n          - source: http://127.0.0.1:{port}/files/tool.bin\n            destination: \"@DIR@/dl/\"\n            checksum: {sum}\n            algorithm: SHA256\n      - name: Bad\n        action: WebDownload\n        onFailure: Continue\n        inputs:\n          - source: http://127.0.0.1:{port}/files/tool.bin\n            destination: \"@DIR@/bad.bin\"\n            checksum: 0000\n"
        )),
        &[],
    );
    let _ = server.join();
    assert_eq!(r.read("dl/tool.bin"), "payload-bytes", "{}", r.stdout);
    assert_eq!(r.step("Get").0, "success");
    assert_eq!(r.step("Bad").0, "failed");
    assert!(r.stdout.contains("checksum mismatch"), "{}", r.stdout);
    assert!(
        !r.path("bad.bin").exists(),
        "a file that fails its checksum is removed"
    );
}

#[test]
fn update_os_drives_the_package_manager_with_argument_vectors() {
    // GIVEN a fake apt-get and apt-mark first on PATH that record their arguments
    let fake = tempfile::tempdir().expect("tmp");
    let log = fake.path().join("calls");
    for tool in ["apt-get", "apt-mark"] {
        let script = fake.path().join(tool);
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"{tool} $*\" >> {}\n", log.display()),
        )
        .expect("fake");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // WHEN UpdateOS runs with include and exclude lists
    let r = run_doc_env(&doc("      - name: Update\n        action: UpdateOS\n        inputs:\n          include: [openssl, curl]\n          exclude: [kernel*]\n"), &[], &[("PATH", path)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // THEN apt is refreshed, excludes are held around an upgrade of the includes only
    let calls = std::fs::read_to_string(&log).expect("calls");
    assert_eq!(calls, "apt-get update\napt-mark hold kernel*\napt-get -y install --only-upgrade openssl curl\napt-mark unhold kernel*\n");
}

#[test]
fn invalid_documents_and_usage_exit_2_before_anything_runs() {
    let r = run_doc(&doc("      - name: A\n        action: ExecuteBsh\n        inputs:\n          commands: [touch @DIR@/ran]\n"), &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("did you mean `ExecuteBash`?"),
        "{}",
        r.stderr
    );
    assert!(!r.path("ran").exists());
    let r = run_doc(&doc("      - name: A\n        action: ExecuteBash\n        inputs:\n          commands: [touch @DIR@/ran]\n"), &["--parameters", "Nope=1"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no document declares `Nope`"),
        "{}",
        r.stderr
    );
    let r = run_doc(&doc("      - name: A\n        action: ExecuteBash\n        inputs:\n          commands: [touch @DIR@/ran]\n"), &["--phases", "deploy"]);
    assert_eq!(r.code, 2);
}

#[test]
fn runnable_fixture_documents_run_to_their_documented_result() {
    // The hello-world documents from the AWSTOE guide run unchanged (they only echo).
    let dir = crate::support::awstoe_fixtures();
    for (file, params) in [
        ("awsdocs__hello-world-linux.yaml", vec![]),
        (
            "awsdocs__hello-world-parameters-linux.yaml",
            vec!["--parameters", "MyInputParameter=kiln"],
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).expect("fixture");
        let r = run_doc(&text, &params);
        assert_eq!(r.code, 0, "{file}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("run succeeded"), "{file}: {}", r.stdout);
    }
}

#[test]
fn s3_upload_and_download_against_a_moto_server() {
    // GIVEN a moto S3 endpoint with a bucket, and local files to upload
    let moto = crate::support::Moto::start();
    assert_eq!(moto.http("PUT", "/kiln-artifacts", b"").0, 200);
    let r = run_doc_env(
        &doc(r#"
      - name: Prepare
        action: ExecuteBash
        inputs:
          commands:
            - mkdir -p @DIR@/up/sub && echo one > @DIR@/up/a.txt && echo two > @DIR@/up/sub/b.txt && echo single > @DIR@/single.txt
      - name: Upload
        action: S3Upload
        inputs:
          - source: "@DIR@/up"
            destination: s3://kiln-artifacts/tree/
            recurse: true
          - source: "@DIR@/single.txt"
            destination: s3://kiln-artifacts/one/renamed.txt
      - name: DownloadPrefix
        action: S3Download
        inputs:
          - source: s3://kiln-artifacts/tree/*
            destination: "@DIR@/down"
      - name: DownloadOne
        action: S3Download
        inputs:
          - source: s3://kiln-artifacts/one/renamed.txt
            destination: "@DIR@/got/"
      - name: Missing
        action: S3Download
        onFailure: Continue
        inputs:
          - source: s3://kiln-artifacts/nope.txt
            destination: "@DIR@/nope.txt"
"#),
        &[],
        &moto.env(),
    );
    // THEN the files made the round trip, and a missing object fails the step with S3's code
    assert_eq!(r.read("down/a.txt"), "one\n", "{}{}", r.stdout, r.stderr);
    assert_eq!(r.read("down/sub/b.txt"), "two\n");
    assert_eq!(r.read("got/renamed.txt"), "single\n");
    assert_eq!(r.step("Missing").0, "failed");
    assert!(r.stdout.contains("HTTP 404 NoSuchKey"), "{}", r.stdout);
}

/// #14 part 6: `{{ ssm-secure:/name }}` is read on the instance (here: moto's SSM, with the
/// agent's own SigV4 client), used by the step, and masked in the report, the logs and stdout.
#[test]
fn an_ssm_secure_parameter_is_used_and_masked_in_everything_the_agent_writes() {
    // GIVEN a SecureString and a plain String in SSM
    let moto = crate::support::Moto::start();
    let secret = "s3cr3t-\"quoted\"-$(not run)";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ssm = aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new("us-east-1"))
            .endpoint_url(moto.endpoint())
            .credentials_provider(aws_sdk_ssm::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .build(),
    );
    rt.block_on(async {
        for (name, value, kind) in [
            (
                "/db/password",
                secret,
                aws_sdk_ssm::types::ParameterType::SecureString,
            ),
            (
                "/db/plain",
                "visible",
                aws_sdk_ssm::types::ParameterType::String,
            ),
        ] {
            ssm.put_parameter()
                .name(name)
                .value(value)
                .r#type(kind)
                .send()
                .await
                .expect("PutParameter");
        }
    });
    let document = "name: t\nschemaVersion: 1.0\nparameters:\n  - Password:\n      type: string\nphases:\n  - name: build\n    steps:\n      - name: Use\n        action: ExecuteBash\n        inputs:\n          commands:\n            - printf '%s' '{{ Password }}' > @DIR@/used.txt\n            - echo 'connecting with {{ Password }}'\n";
    let run = |name: &str| {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("params.json"),
            format!(r#"[{{"Password": "{{{{ ssm-secure:{name} }}}}"}}]"#),
        )
        .expect("params");
        let params = dir.path().join("params.json").display().to_string();
        let logs = dir.path().join("logs").display().to_string();
        std::fs::write(
            dir.path().join("doc.yaml"),
            document.replace("@DIR@", &dir.path().display().to_string()),
        )
        .expect("doc");
        let (code, stdout, stderr) = invoke(
            dir.path(),
            &["--parameters-file", &params, "--log-dir", &logs],
            &moto.env(),
        );
        Run {
            dir,
            code,
            stdout,
            stderr,
        }
    };
    // WHEN a component gets the SecureString
    let r = run("/db/password");
    // THEN the step used the value, and nothing the agent wrote or printed holds it
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.read("used.txt"), secret);
    let report = r.read("report.json");
    assert!(!report.contains("s3cr3t"), "{report}");
    assert!(report.contains("connecting with ****"), "{report}");
    let mut logged = String::new();
    for e in std::fs::read_dir(r.path("logs")).expect("logs").flatten() {
        logged.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    assert!(logged.contains("connecting with ****"), "{logged}");
    assert!(!logged.contains("s3cr3t"), "{logged}");
    assert!(!r.stdout.contains("s3cr3t") && !r.stderr.contains("s3cr3t"));
    // AND a plain String is refused: ssm-secure references only SecureStrings
    let r = run("/db/plain");
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("is a String, not a SecureString"),
        "{}",
        r.stderr
    );
}
