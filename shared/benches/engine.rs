//! The ASL engine's speed: a Map of 10,000 Pass iterations (each applying a Parameters template),
//! in state transitions per second, against the same template applied 10,000 times directly
//! (the work with no interpreter around it), in one run.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::engine::{clock::VirtualClock, definition, payload, Engine, NoTasks};
use serde_json::json;

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
    const N: usize = 10_000;
    let template = json!({"n.$": "$.n", "label.$": "States.Format('item {}', $.n)"});
    let def = json!({"StartAt": "M", "States": {"M": {"Type": "Map", "ItemsPath": "$.items", "MaxConcurrency": 40,
        "ItemSelector": {"n.$": "$$.Map.Item.Value"},
        "ItemProcessor": {"StartAt": "P", "States": {"P": {"Type": "Pass", "Parameters": template, "End": true}}},
        // The results (~300 KiB) would exceed the 256 KiB payload limit; count them instead.
        "ResultSelector": {"count.$": "States.ArrayLength($)"}, "End": true}}});
    let machine = definition::parse(&def).expect("valid");
    let input = json!({"items": (0..N).collect::<Vec<_>>()});
    let mut engine = Engine::new(
        Arc::new(NoTasks("")),
        Arc::new(VirtualClock::default()),
        true,
    );
    // 10,000 iterations record ~40,000 events: above AWS's 25,000 limit, lifted for the benchmark.
    engine.max_events = usize::MAX;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut transitions = 0;
    let engine_time = best(3, || {
        let out = rt.block_on(engine.run(&machine, input.clone(), "bench"));
        assert_eq!(
            out.output,
            Some(json!({"count": N})),
            "{:?} {:?}",
            out.error,
            out.cause
        );
        transitions = out.state_transitions();
    });
    let ctx = json!({});
    let baseline = best(3, || {
        for n in 0..N {
            black_box(payload::apply(&template, &json!({"n": n}), &ctx).expect("applies"));
        }
    });
    println!("engine: Map of {N} Pass iterations, best of 3");
    println!("  state transitions            : {transitions}");
    println!(
        "  engine                       : {:>9.1} ms",
        engine_time.as_secs_f64() * 1e3
    );
    println!(
        "  transitions per second       : {:>9.0}",
        transitions as f64 / engine_time.as_secs_f64()
    );
    println!(
        "  baseline (template only)     : {:>9.1} ms",
        baseline.as_secs_f64() * 1e3
    );
    println!(
        "  ratio engine / baseline      : {:>9.1}x",
        engine_time.as_secs_f64() / baseline.as_secs_f64()
    );
}
