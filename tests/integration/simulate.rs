//! `kiln simulate`: the real definition and stage code in virtual time. What it reports, that it
//! is reproducible from its seed, that it compares definitions in one run, and that it refuses
//! what it cannot model.

use std::process::Command;

use serde_json::Value as Json;

use crate::support::{built_binary, repo};

/// The previous definition (test, then copy), kept to compare with.
const SEQUENTIAL: &str = "tests/data/simulate/pipeline-sequential.asl.json";
/// The definition before events (copies beside the test, every wait a 30-second poll).
const POLLING: &str = "tests/data/simulate/pipeline-polling.asl.json";

fn simulate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(built_binary("kiln"))
        .arg("simulate")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("kiln simulate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn report(args: &[&str]) -> Json {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (code, out, err) = simulate(&all);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("JSON")
}

fn p50(v: &Json) -> f64 {
    v["p50"].as_f64().expect("a p50")
}

fn definition<'a>(r: &'a Json, name: &str) -> &'a Json {
    r["definitions"]
        .as_array()
        .expect("definitions")
        .iter()
        .find(|d| d["definition"] == name)
        .unwrap_or_else(|| panic!("no definition {name} in {r}"))
}

#[test]
fn a_two_region_build_overlaps_its_copy_with_the_test_and_says_what_it_costs() {
    let r = report(&[
        "examples/aws-al2023/pipeline.yaml",
        "--runs",
        "40",
        "--seed",
        "20261201",
        "--definition",
        SEQUENTIAL,
        "--definition",
        "builtin",
    ]);
    let old = definition(&r, SEQUENTIAL);
    let new = definition(&r, "builtin");
    for d in [old, new] {
        assert_eq!(d["statuses"]["AVAILABLE"], 40, "{d}");
        assert!(p50(&d["stateTransitions"]) > 50.0, "{d}");
        assert!(p50(&d["lambdaGbSeconds"]) > 0.0, "{d}");
        assert!(p50(&d["costUsd"]["total"]) > 0.0, "{d}");
        // The builder is a t3.small, the test instance a t3.micro (the pipeline's).
        assert!(p50(&d["instanceSeconds"]["t3.small"]) > 60.0, "{d}");
        assert!(p50(&d["instanceSeconds"]["t3.micro"]) > 30.0, "{d}");
        // Every wait the stages did, and how long it idled after AWS was done.
        for what in [
            "instance running",
            "agent online",
            "command done",
            "image available",
        ] {
            assert!(
                d["idleAfterReadySeconds"][what]["count"].as_u64() > Some(0),
                "{what}: {d}"
            );
        }
    }
    // The copy to eu-central-1 starts when the image is available, not after the test.
    let (m_old, m_new) = (p50(&old["makespanSeconds"]), p50(&new["makespanSeconds"]));
    let test = p50(&new["stageSeconds"]["test"]);
    assert!(
        m_new + test * 0.5 < m_old,
        "overlap should save most of the test stage ({test} s): {m_old} s before, {m_new} s now"
    );
    // In the new definition the copies start before the test ends.
    let path = new["criticalPath"].as_array().expect("critical path");
    let names: Vec<&str> = path.iter().filter_map(|s| s["stage"].as_str()).collect();
    assert_eq!(names.first(), Some(&"launch"), "{names:?}");
    assert_eq!(names.last(), Some(&"distribute"), "{names:?}");
    assert!(
        names.contains(&"copy") && !names.contains(&"test"),
        "the copy, not the test, is on the path: {names:?}"
    );
    // The latency table comes along with its sources.
    for row in r["latencies"].as_array().expect("latencies") {
        assert!(
            row["source"].as_str().is_some_and(|s| s.len() > 10),
            "{row}"
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_report_and_another_seed_another() {
    let args = [
        "examples/aws-minimal/pipeline.yaml",
        "--runs",
        "5",
        "--seed",
        "3",
    ];
    let a = report(&args);
    let b = report(&args);
    assert_eq!(a, b);
    let c = report(&[
        "examples/aws-minimal/pipeline.yaml",
        "--runs",
        "5",
        "--seed",
        "4",
    ]);
    assert_ne!(
        a["definitions"][0]["makespanSeconds"], c["definitions"][0]["makespanSeconds"],
        "the seed should change the draws"
    );
    // The one-region build: no copy, nothing transferred.
    assert_eq!(p50(&a["definitions"][0]["copiedGib"]), 0.0);
}

#[test]
fn the_text_report_names_the_critical_path_and_the_prices() {
    let (code, out, err) = simulate(&["examples/aws-minimal/pipeline.yaml", "--runs", "3"]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "makespan      p50",
        "critical path (the median run) launch",
        "idle after AWS was done",
        "Lambda GB-s",
        "instance-seconds (p50): t3.micro",
        "cost p50 $",
        "prices: us-east-1, on-demand",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
}

#[test]
fn what_it_cannot_model_is_refused_with_exit_2() {
    // An embedded parent.
    let (code, _, err) = simulate(&["examples/hello/pipeline.yaml", "--runs", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("parent.local"), "{err}");
    // A latency table without a row the cloud draws.
    let dir = tempfile::tempdir().expect("dir");
    let table = dir.path().join("latencies.json");
    let (code, out, _) = simulate(&["--table", "examples/aws-minimal/pipeline.yaml"]);
    assert_eq!(code, 0);
    let mut t: Json = serde_json::from_str(&out).expect("the table as JSON");
    t["rows"]
        .as_array_mut()
        .expect("rows")
        .retain(|r| r["operation"] != "ec2.image.available");
    std::fs::write(&table, t.to_string()).expect("write");
    let (code, _, err) = simulate(&[
        "examples/aws-minimal/pipeline.yaml",
        "--latencies",
        table.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no row `ec2.image.available`"), "{err}");
    // A definition that is not one.
    let bad = dir.path().join("bad.asl.json");
    std::fs::write(&bad, r#"{"StartAt": "Nowhere", "States": {}}"#).expect("write");
    let (code, _, err) = simulate(&[
        "examples/aws-minimal/pipeline.yaml",
        "--definition",
        bad.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid"), "{err}");
    // A share of lost events that is not a share.
    let (code, _, err) = simulate(&["examples/aws-minimal/pipeline.yaml", "--lost-events", "2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give 0 to 1"), "{err}");
}

/// The one-region build (what Image Builder's figures measure): its waits end by events, so
/// each idles for the event's delivery, not up to the 30-second poll — within the goal of six
/// minutes at p50. With every event lost, each wait ends by its timeout (the bounded poll) and
/// the build still completes, as it did before events.
#[test]
fn waits_end_by_events_and_lost_events_by_the_bounded_poll() {
    let args = [
        "examples/aws-minimal/pipeline.yaml",
        "--runs",
        "40",
        "--seed",
        "20261202",
        "--definition",
        POLLING,
        "--definition",
        "builtin",
    ];
    let r = report(&args);
    let polling = definition(&r, POLLING);
    let events = definition(&r, "builtin");
    for d in [polling, events] {
        assert_eq!(d["statuses"]["AVAILABLE"], 40, "{d}");
    }
    let idle = |d: &Json, what: &str| p50(&d["idleAfterReadySeconds"][what]);
    for what in [
        "instance running",
        "instance stopped",
        "image available",
        "command done",
    ] {
        assert!(idle(polling, what) > 8.0, "{what} polled: {polling}");
        assert!(idle(events, what) < 4.0, "{what} by its event: {events}");
    }
    assert!(p50(&events["events"]["delivered"]) >= 4.0, "{events}");
    assert_eq!(p50(&events["events"]["lost"]), 0.0, "{events}");
    let (before, after) = (
        p50(&polling["makespanSeconds"]),
        p50(&events["makespanSeconds"]),
    );
    assert!(
        after <= 360.0 && after < before - 60.0,
        "{before} s → {after} s"
    );
    // WHEN every event is lost
    let mut lost = args[..5].to_vec();
    lost.extend(["--lost-events", "1"]);
    let r = report(&lost);
    let d = definition(&r, "builtin");
    // THEN the waits fall back to the poll, and every build completes
    assert_eq!(d["statuses"]["AVAILABLE"], 40, "{d}");
    assert_eq!(p50(&d["events"]["delivered"]), 0.0, "{d}");
    assert!(p50(&d["events"]["lost"]) >= 4.0, "{d}");
    assert!(idle(d, "image available") > 8.0, "{d}");
}
