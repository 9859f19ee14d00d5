//! Per-step overhead of kiln-agent: 200 trivial ExecuteBash steps run by the agent, against the
//! same 200 commands run by bash directly — as one script (one bash) and as 200 `bash -c`
//! invocations (one bash per command, as the agent does) — measured in the same run. The agent
//! runs as production runs it: in-process with a log folder (every step's output file), and as
//! the `kiln-agent run` process with `--log-dir` and `--report` (start-up and report included).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::component::PhaseName;
use kiln_agent::runner::{self, DocSpec, Options};

const STEPS: usize = 200;

fn best(rounds: u32, mut f: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let commands: Vec<String> = (0..STEPS)
        .map(|i| format!("echo step-{i} > /dev/null"))
        .collect();
    let mut doc =
        String::from("name: bench\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n");
    for (i, c) in commands.iter().enumerate() {
        doc.push_str(&format!("      - name: S{i}\n        action: ExecuteBash\n        inputs:\n          commands: ['{c}']\n"));
    }
    let path = dir.path().join("bench.yaml");
    std::fs::write(&path, &doc).expect("write");
    let loaded = kiln::component::load_file(&path).expect("valid");
    let specs = vec![DocSpec {
        path: path.clone(),
        loaded,
        parameters: BTreeMap::new(),
    }];
    let opts = Options {
        phases: vec![PhaseName::Build],
        work_dir: dir.path().to_path_buf(),
        state_file: dir.path().join("state.json"),
        scripts: dir.path().to_path_buf(),
        log_dir: Some(dir.path().join("logs")),
        echo: false,
    };
    let script = dir.path().join("all.sh");
    std::fs::write(&script, commands.join("\n")).expect("script");
    let rounds = 5;

    let one_bash = best(rounds, || {
        let ok = Command::new("bash")
            .arg(&script)
            .status()
            .expect("bash")
            .success();
        assert!(ok);
    });
    let many_bash = best(rounds, || {
        for c in &commands {
            let ok = Command::new("bash")
                .arg("-c")
                .arg(c)
                .current_dir(Path::new(dir.path()))
                .status()
                .expect("bash")
                .success();
            assert!(ok);
        }
    });
    let agent = best(rounds, || {
        let (outcome, _) = runner::run(&specs, &opts);
        assert_eq!(outcome, runner::RunOutcome::Success);
    });
    let report = dir.path().join("report.json");
    let process = best(rounds, || {
        let ok = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .arg("run")
            .arg("--documents")
            .arg(&path)
            .args(["--phases", "build", "--quiet"])
            .arg("--work-dir")
            .arg(dir.path())
            .arg("--log-dir")
            .arg(dir.path().join("process-logs"))
            .arg("--report")
            .arg(&report)
            .status()
            .expect("kiln-agent")
            .success();
        assert!(ok);
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_step = (agent.as_secs_f64() - many_bash.as_secs_f64()) / STEPS as f64 * 1e6;
    println!("agent: {STEPS} trivial ExecuteBash steps, best of {rounds}");
    println!("  bash, one script             : {:>9.1} ms", ms(one_bash));
    println!("  bash -c, one per command     : {:>9.1} ms", ms(many_bash));
    println!("  kiln-agent, in-process       : {:>9.1} ms", ms(agent));
    println!("  kiln-agent run, the process  : {:>9.1} ms", ms(process));
    println!(
        "  ratio agent / one bash       : {:>9.1}x",
        agent.as_secs_f64() / one_bash.as_secs_f64()
    );
    println!(
        "  ratio agent / bash per step  : {:>9.2}x",
        agent.as_secs_f64() / many_bash.as_secs_f64()
    );
    println!(
        "  agent overhead per step      : {:>9.0} µs beyond spawning bash",
        per_step
    );
    println!(
        "  ratio process / bash per step: {:>9.2}x",
        process.as_secs_f64() / many_bash.as_secs_f64()
    );
}
