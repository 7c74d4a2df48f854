//! `molora bench --quick` end to end: random models written, every table row
//! produced with finite, positive figures. (Speed itself is measured by the
//! bench, never asserted in tests.)

use molora::bench::{run, BenchOptions};

#[test]
fn quick_bench_produces_every_row() {
    let rows = run(&BenchOptions::quick()).expect("bench runs");
    let count = |name: &str| rows.iter().filter(|r| r["bench"] == name).count();
    assert_eq!(
        count("modes"),
        8,
        "K in {{2, 4}} x prefill/decode x batch 1/16"
    );
    assert_eq!(count("lora_overhead"), 2);
    assert_eq!(count("decode_floor"), 2, "f32 and f16 weights");
    for r in &rows {
        for (key, value) in r.as_object().unwrap() {
            if let Some(x) = value.as_f64() {
                assert!(x.is_finite() && x > 0.0, "{key} = {x} in {r}");
            }
        }
    }
    let lora = rows.iter().find(|r| r["bench"] == "lora_overhead").unwrap();
    assert!(
        lora["adapters_per_token"].as_f64().unwrap() > 1.0,
        "the gate adds adapters: {lora}"
    );
}
