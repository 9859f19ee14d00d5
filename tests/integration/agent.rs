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
    let out = agent_command(dir, extra, env)
        .output()
        .expect("kiln-agent runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kiln-agent run` on `dir/doc.yaml`, with `dir/work` as its work folder and `dir/state` as
/// its state folder.
fn agent_command(dir: &Path, extra: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(built_binary("kiln-agent"));
    c.arg("run")
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
        .current_dir(dir);
    c
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

/// A step ends when its shell exits, as AWSTOE's do: a daemon it starts in the background keeps
/// running for the next steps (as `service nginx start` leaves nginx running on an EC2 builder),
/// even one that forks late and holds the step's output open. 50 runs in a row, with both cores
/// kept busy.
#[test]
fn a_daemon_a_step_starts_runs_on_into_the_next_step() {
    let burners: Vec<std::process::Child> = (0..2)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("a burner")
        })
        .collect();
    let steps = doc("      - name: StartDaemon\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo starting\n            - (sleep 0.3; echo up; echo up >&2; echo up > @DIR@/up; exec sleep 60) &\n            - echo $! > @DIR@/daemon.pid\n      - name: UseDaemon\n        action: ExecuteBash\n        timeoutSeconds: 20\n        inputs:\n          commands:\n            - while [ ! -e @DIR@/up ]; do sleep 0.05; done\n            - kill -0 $(cat @DIR@/daemon.pid)\n");
    let mut failure = None;
    for n in 0..50 {
        // WHEN the first step starts a daemon that writes its mark late, holding stdout
        let r = run_doc(&steps, &[]);
        let pid: i32 = r
            .read("daemon.pid")
            .trim()
            .parse()
            .expect("the daemon's pid");
        // THEN the second step found it running, and it still runs after the document ended
        // (the agent ended though the daemon holds the first step's output pipe)
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        if r.code != 0 || !alive || r.step("UseDaemon").0 != "success" {
            failure = Some(format!(
                "run {n}: exit {}, alive {alive}\n{}",
                r.code, r.stdout
            ));
            break;
        }
        // AND the step's own output was captured whole
        let report = r.report().to_string();
        assert!(report.contains(r#""stdoutTail":"starting\n""#), "{report}");
    }
    for mut b in burners {
        let _ = b.kill();
        let _ = b.wait();
    }
    assert_eq!(failure, None);
}

/// A background process that never stops writing to the step's output does not hold the step
/// open: the step ends when its shell does, with its own output.
#[test]
fn a_step_whose_background_writer_never_stops_ends_with_its_shell() {
    // GIVEN a step that leaves `yes` writing to its stdout
    let r = run_doc(
        &doc("      - name: Flood\n        action: ExecuteBash\n        timeoutSeconds: 60\n        inputs:\n          commands:\n            - echo mine\n            - yes &\n            - echo $! > @DIR@/yes.pid\n      - name: After\n        action: ExecuteBash\n        inputs:\n          commands: [echo after]\n"),
        &[],
    );
    let pid: i32 = r.read("yes.pid").trim().parse().expect("yes's pid");
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z "));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    // THEN both steps succeeded well before the timeout, yes still ran, and the step's output
    // was captured
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.step("Flood").0, "success");
    assert_eq!(r.step("After").0, "success");
    assert!(alive, "yes was killed with its step");
    let report = r.report();
    let flood = report["documents"][0]["phases"][0]["steps"][0]["stdoutTail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!flood.is_empty(), "{report}");
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
    put_parameter(
        &moto,
        "/db/password",
        secret,
        aws_sdk_ssm::types::ParameterType::SecureString,
    );
    put_parameter(
        &moto,
        "/db/plain",
        "visible",
        aws_sdk_ssm::types::ParameterType::String,
    );
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

/// An ordinary user of the machine (nobody, uid 65534) running `python3 -c program` (the
/// system's: root's PATH may lead to a python nobody cannot run).
fn as_nobody(program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("/usr/bin/python3");
    c.arg("-c").arg(program).uid(65534).gid(65534);
    c
}

/// Review H-2 (#27 point 3): the work folder is `/tmp`-like (root's, 1777) and another user has
/// made `.kiln-agent` in it first, with a FIFO and links named as the agent used to name its
/// scripts (`step-<pid>-<n>.sh`) for every PID: to the FIFO (read root's script, hand bash
/// another) and to a root-owned file (overwrite it as root).
#[test]
fn a_work_folder_shared_with_another_user_gives_them_neither_the_script_nor_a_run() {
    use std::os::unix::fs::PermissionsExt;
    // GIVEN a 1777 work folder of root's, a root-owned victim file, and the attacker's trap
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let work = d.join("work");
    std::fs::create_dir(&work).expect("work");
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let victim = d.join("victim");
    std::fs::write(&victim, "root's file\n").expect("victim");
    std::fs::write(
        d.join("doc.yaml"),
        doc("      - name: Own\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo \"the component's own script\"\n"),
    )
    .expect("doc");
    let trap = format!(
        r#"
import os
os.chdir({work:?})
os.mkdir(".kiln-agent", 0o777)
os.mkfifo(".kiln-agent/fifo", 0o666)
pid_max = int(open("/proc/sys/kernel/pid_max").read())
for pid in range(2, pid_max + 1):
    for n in range(3):
        target = "fifo" if pid % 2 == 0 else {victim:?}
        os.symlink(target, ".kiln-agent/step-%d-%d.sh" % (pid, n))
"#,
        work = work.display().to_string(),
        victim = victim.display().to_string(),
    );
    let planted = as_nobody(&trap).status().expect("python3");
    assert!(planted.success(), "the attacker could not plant the trap");
    // The reader takes whatever is written into the FIFO, then feeds its own script to whoever
    // opens it next.
    let reader = format!(
        r#"
import os
os.chdir({work:?})
while True:
    with open(".kiln-agent/fifo", "rb") as f:
        got = f.read()
    with open(".kiln-agent/captured", "ab") as f:
        f.write(got)
    with open(".kiln-agent/fifo", "wb") as f:
        f.write(b"echo pwned-by-nobody; id > {work}/pwned\n")
"#,
        work = work.display(),
    );
    let mut attacker = as_nobody(&reader).spawn().expect("python3");
    // WHEN root runs the one-line component there
    let agent = agent_command(d, &[], &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kiln-agent runs");
    let pid = agent.id();
    let out = agent.wait_with_output().expect("kiln-agent");
    let _ = attacker.kill();
    let _ = attacker.wait();
    // THEN the component's own script ran, and nothing of the attacker's
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let report = std::fs::read_to_string(d.join("report.json")).expect("report");
    assert!(
        !work.join("pwned").exists(),
        "the attacker's script ran as root: {report}"
    );
    assert!(!report.contains("pwned-by-nobody"), "{report}");
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(report.contains("the component's own script"), "{report}");
    // AND the attacker's reader got nothing, and the victim is as it was
    let captured = std::fs::read(work.join(".kiln-agent/captured")).unwrap_or_default();
    assert!(
        captured.is_empty(),
        "the attacker read: {}",
        String::from_utf8_lossy(&captured)
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's file\n"
    );
    // AND the trap was aimed at this very run (a link for its PID was waiting)
    let aimed = work.join(format!(".kiln-agent/step-{pid}-0.sh"));
    assert!(
        std::fs::symlink_metadata(&aimed).is_ok_and(|m| m.file_type().is_symlink()),
        "{} was not planted",
        aimed.display()
    );
    // AND the agent left no script behind where it keeps them
    let left: Vec<_> = std::fs::read_dir(d.join("state"))
        .expect("state folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left in the state folder: {left:?}");
}

/// Review H-2's other half: a work or state folder another user owns, or may write without the
/// sticky bit, is refused before any step runs; a `/tmp`-like one (root's, 1777) is accepted.
#[test]
fn a_work_or_state_folder_another_user_controls_is_refused_with_the_reason() {
    use std::os::unix::fs::PermissionsExt;
    let steps = "      - name: Ran\n        action: ExecuteBash\n        inputs:\n          commands:\n            - touch @DIR@/ran\n";
    // One run per case: (what is made, the folder's owner, its mode, the words of the refusal).
    let cases: [(&str, u32, u32, Option<&str>); 5] = [
        ("work", 65534, 0o755, Some("is owned by uid 65534")),
        ("state", 65534, 0o700, Some("is owned by uid 65534")),
        (
            "work",
            0,
            0o777,
            Some("writable by others (mode 0777) without the sticky bit"),
        ),
        (
            "state",
            0,
            0o775,
            Some("writable by its group (mode 0775) without the sticky bit"),
        ),
        ("work", 0, 0o1777, None),
    ];
    for (folder, uid, mode, refusal) in cases {
        // GIVEN the folder made that way before the agent starts
        let dir = tempfile::tempdir().expect("tempdir");
        let at = dir.path().join(folder);
        std::fs::create_dir(&at).expect("mkdir");
        std::os::unix::fs::chown(&at, Some(uid), Some(uid)).expect("chown");
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::fs::write(
            dir.path().join("doc.yaml"),
            doc(steps).replace("@DIR@", &dir.path().display().to_string()),
        )
        .expect("doc");
        // WHEN root runs the agent
        let (code, stdout, stderr) = invoke(dir.path(), &[], &[]);
        let ran = dir.path().join("ran").exists();
        match refusal {
            // THEN it exits 2 naming the folder and why, and no step ran
            Some(why) => {
                assert_eq!(code, 2, "{folder} {uid} {mode:o}: {stdout}{stderr}");
                assert!(
                    stderr.contains(&format!("the {folder} folder {}", at.display()))
                        && stderr.contains(why),
                    "{folder} {uid} {mode:o}: {stderr}"
                );
                assert!(!ran, "{folder} {uid} {mode:o}: a step ran");
            }
            // THEN (the control) a /tmp-like folder is used as before
            None => {
                assert_eq!(code, 0, "{folder} {uid} {mode:o}: {stdout}{stderr}");
                assert!(ran, "the step did not run");
            }
        }
    }
}

/// Review M-8 (#27 point 5): S3Download of a prefix whose objects include `p/../../escape` fails
/// the step naming the key, and writes nothing, inside or outside the destination; the same
/// download without that key works (the control).
#[test]
fn s3_download_refuses_a_key_that_leaves_the_destination() {
    // GIVEN a moto bucket with `p/ok` and, for the second run, `p/../../escape`
    let moto = crate::support::Moto::start();
    assert_eq!(moto.http("PUT", "/kiln-keys", b"").0, 200);
    assert_eq!(moto.http("PUT", "/kiln-keys/p/ok", b"fine\n").0, 200);
    let steps = "      - name: Download\n        action: S3Download\n        inputs:\n          - source: s3://kiln-keys/p/*\n            destination: \"@DIR@/a/b/dest\"\n";
    // WHEN the prefix holds only well-formed keys (the control)
    let r = run_doc_env(&doc(steps), &[], &moto.env());
    // THEN they download into the destination
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.read("a/b/dest/ok"), "fine\n");
    // WHEN a writer of the bucket adds a key with `..` components
    let (status, body) = moto.http("PUT", "/kiln-keys/p/../../escape", b"escaped\n");
    assert_eq!(status, 200, "{body}");
    let listed = moto.http("GET", "/kiln-keys?list-type=2&prefix=p/", b"").1;
    assert!(listed.contains("<Key>p/../../escape</Key>"), "{listed}");
    let r = run_doc_env(&doc(steps), &[], &moto.env());
    // THEN nothing was written, outside the destination or in it, and the step fails naming the key
    for p in ["a/escape", "a/b/escape", "escape", "a/b/dest/ok"] {
        assert!(!r.path(p).exists(), "{p} was written");
    }
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let report = r.read("report.json");
    assert!(
        report.contains("object key `p/../../escape` leaves the destination"),
        "{report}"
    );
}

/// A parameter in moto's SSM (`{{ ssm-secure:name }}` reads SecureStrings).
fn put_parameter(
    moto: &crate::support::Moto,
    name: &str,
    value: &str,
    kind: aws_sdk_ssm::types::ParameterType,
) {
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
    rt.block_on(
        ssm.put_parameter()
            .name(name)
            .value(value)
            .r#type(kind)
            .send(),
    )
    .expect("PutParameter");
}

/// Review H-2, L-7 and #27's "on AWS": the customize command script exactly as kiln sends it to
/// SSM (`AwsPorts::command_script`, moto's S3 behind its presigned URLs), run by bash in a
/// scratch root (an overlay over this machine's `/` whose writes land in a folder of the test,
/// with its own `/tmp` and `/var/tmp`), the agent fetched and pinned as on EC2, a reboot (exit
/// 194, the script run again as SSM does) and every sanitize item. Whatever the run wrote or
/// changed anywhere in that root is searched for the `ssm-secure` value the component used.
mod command_script_in_a_scratch_root {
    use super::*;
    use kiln::aws::{AwsPorts, Settings};
    use kiln::component::PhaseName;
    use kiln::model::build::BuildId;
    use kiln::model::pipeline::SanitizeItem;
    use kiln::ports::{CommandPlan, ComponentSpec};
    use serde_json::json;

    const BUCKET: &str = "kiln-scratch";
    const SECRET: &str = "kiln-secret-9f1c2e7a5b";

    /// The component: checks it got the value (by digest, so the document does not hold it),
    /// prints it (masked in the report), asks for one reboot, uses it again; `extra` lines last.
    fn component(extra: &[&str]) -> ComponentSpec {
        let digest = kiln::digest::sha256_hex(SECRET.as_bytes());
        let check = format!(
            "test \"$(printf %s '{{{{ Password }}}}' | sha256sum | cut -c1-64)\" = {digest}"
        );
        let mut again = vec![
            check.clone(),
            "echo used > /etc/kiln-used-the-secret".to_string(),
        ];
        again.extend(extra.iter().map(|l| l.to_string()));
        ComponentSpec {
            name: "uses-secret".into(),
            document: json!({"name": "uses-secret", "schemaVersion": "1.0",
                "parameters": [{"Password": {"type": "string"}}],
                "phases": [{"name": "build", "steps": [
                    {"name": "UseThenReboot", "action": "ExecuteBash", "inputs": {"commands": [
                        check,
                        "echo 'connecting with {{ Password }}'",
                        "if [ ! -e /etc/kiln-rebooted ]; then touch /etc/kiln-rebooted; exit 194; fi"]}},
                    {"name": "UseAgain", "action": "ExecuteBash", "inputs": {"commands": again}}]}]}),
            parameters: [(
                "Password".to_string(),
                "{{ ssm-secure:/kiln/scratch/password }}".to_string(),
            )]
            .into(),
        }
    }

    /// What one customize run left: the regular files (in the overlay's upper folder and the
    /// scratch `/tmp`, `/var/tmp`) that hold the value, the report and the scratch folder.
    struct Left {
        holding_secret: Vec<PathBuf>,
        report: Json,
        scratch: tempfile::TempDir,
        build: BuildId,
    }

    fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                files_under(&e.path(), out);
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }

    fn run_customize(extra: &[&str]) -> Left {
        let moto = crate::support::Moto::start();
        for (k, v) in moto.env() {
            // Each nextest test runs in its own process: the environment is this test's alone.
            std::env::set_var(k, v);
        }
        put_parameter(
            &moto,
            "/kiln/scratch/password",
            SECRET,
            aws_sdk_ssm::types::ParameterType::SecureString,
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let ports = rt.block_on(AwsPorts::from_env(Settings {
            table: String::new(),
            bucket: BUCKET.into(),
            event_bus: String::new(),
            region: "us-east-1".into(),
            stack: None,
            instance_profile: None,
        }));
        rt.block_on(ports.prepare_artifacts(&built_binary("kiln-agent")))
            .expect("artifacts");
        let build = BuildId::new_at(chrono::Utc::now().timestamp_millis() as u64);
        let plan = CommandPlan {
            build: build.clone(),
            phases: vec![PhaseName::Build, PhaseName::Validate],
            components: vec![component(extra)],
            working_directory: "/tmp".into(),
            sanitize: SanitizeItem::ALL.to_vec(),
            verify_clean: None,
            timeout_minutes: 30,
        };
        let script = rt
            .block_on(ports.command_script(&plan))
            .expect("customize script");
        // The scratch root's folders live on /dev/shm, another file system than `/`: overlayfs
        // refuses an upper folder inside its lower one.
        let scratch = tempfile::Builder::new()
            .prefix("kiln-scratch-")
            .tempdir_in("/dev/shm")
            .expect("scratch");
        let s = scratch.path();
        for d in ["upper", "ovlwork", "root", "tmp", "vartmp"] {
            std::fs::create_dir(s.join(d)).expect("mkdir");
        }
        std::fs::write(s.join("script.sh"), script.join("\n")).expect("script");
        // Every mount is made in a private mount namespace and goes with it; `set -e` stops
        // before `chroot` if any fails, so the script never runs on this machine's own root.
        let wrapper = r#"set -eu
S=$1
mount -t overlay kiln-scratch -o "lowerdir=/,upperdir=$S/upper,workdir=$S/ovlwork" "$S/root"
mount --bind "$S/tmp" "$S/root/tmp"
mount --bind "$S/vartmp" "$S/root/var/tmp"
mount --rbind /dev "$S/root/dev"
mount -t proc proc "$S/root/proc"
for attempt in 1 2 3; do
  code=0
  chroot "$S/root" /bin/bash /dev/fd/3 3<"$S/script.sh" || code=$?
  [ "$code" = 194 ] || break
  echo "reboot requested; running the command again"
done
echo "exit=$code"
"#;
        let out = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
                wrapper,
                "wrapper",
            ])
            .arg(s)
            .output()
            .expect("unshare");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("exit=0"),
            "{stdout}\n{stderr}"
        );
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(
                &rt.block_on(aws_config::defaults(aws_config::BehaviorVersion::latest()).load()),
            )
            .force_path_style(true)
            .build(),
        );
        let report = rt.block_on(async {
            let o = s3
                .get_object()
                .bucket(BUCKET)
                .key(format!("builds/{build}/customize/report.json"))
                .send()
                .await
                .expect("report in the bucket");
            o.body.collect().await.expect("body").into_bytes().to_vec()
        });
        let mut files = Vec::new();
        for d in ["upper", "tmp", "vartmp"] {
            files_under(&s.join(d), &mut files);
        }
        let needle = SECRET.as_bytes();
        let holding_secret = files
            .into_iter()
            .filter(|f| {
                std::fs::read(f).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            })
            .collect();
        Left {
            holding_secret,
            report: serde_json::from_slice(&report).expect("report JSON"),
            scratch,
            build,
        }
    }

    #[test]
    fn leaves_neither_the_script_nor_a_substituted_secret_anywhere() {
        // GIVEN the customize script of a component that uses an ssm-secure value and reboots
        // WHEN it runs to the end in the scratch root
        let left = run_customize(&[]);
        // THEN the run succeeded through the reboot, the value was used, and sanitizing ran
        let r = &left.report;
        assert_eq!(r["status"], "success", "{r}");
        assert_eq!(r["reboots"], 1, "{r}");
        let docs: Vec<&str> = r["documents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["name"].as_str())
            .collect();
        assert_eq!(docs, ["uses-secret", "kiln-sanitize"], "{r}");
        let upper = left.scratch.path().join("upper");
        assert!(upper.join("etc/kiln-used-the-secret").is_file());
        assert!(r.to_string().contains("connecting with ****"), "{r}");
        // AND no file anywhere the run wrote holds the value, and nothing of kiln's run is left
        assert_eq!(left.holding_secret, Vec::<PathBuf>::new());
        assert!(!upper.join(format!("var/lib/kiln/{}", left.build)).exists());
        let mut agent_state = Vec::new();
        files_under(&upper.join("var/lib/kiln-agent"), &mut agent_state);
        assert_eq!(agent_state, Vec::<PathBuf>::new());
    }

    #[test]
    fn a_value_the_component_writes_itself_is_found_by_the_same_search() {
        // GIVEN (the search's control) a component that writes the value into a file itself
        // WHEN its customize script runs in the scratch root
        let left = run_customize(&["printf %s '{{ Password }}' > /etc/kiln-leak"]);
        // THEN the search finds that file, and only that one
        assert_eq!(left.report["status"], "success", "{}", left.report);
        assert_eq!(
            left.holding_secret,
            [left.scratch.path().join("upper/etc/kiln-leak")]
        );
    }
}
