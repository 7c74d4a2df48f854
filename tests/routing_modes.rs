//! The routing invariants of DESIGN.md on a real (random) model directory:
//! modes against each other, batching against running alone, cached decode
//! against recomputation, zero adapters against the base.

mod common;

use common::*;
use molora::adapters::peft::LoraAdapter;
use molora::adapters::{AdapterRole, Projection};
use molora::bench::interleaved_sequence;
use molora::engine::runner::AdapterSelection;
use molora::routing::mode::RoutingMode;

const TOL: f32 = 1e-5;

fn text_only(runner: &molora::engine::runner::ModelRunner, len: usize, seed: u64) -> Vec<u32> {
    interleaved_sequence(&runner.vocab, 1, len, seed)
}

#[test]
fn per_modality_pass_equals_single_pass_on_one_modality() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let mut runner = runner(dir.path(), 8);
    let sel = runner.default_selection().unwrap();
    assert!(!sel.gate_set.is_empty() && sel.modality.iter().all(Option::is_some));
    let tokens = text_only(&runner, 40, 1);
    let single = run_step(&runner, &[(&tokens, RoutingMode::SinglePass, &sel)]);
    let multi = run_step(&runner, &[(&tokens, RoutingMode::PerModalityPass, &sel)]);
    assert!(max_diff(&single[0], &multi[0]) < TOL);
    // Adapters really act: the routed output differs from the base.
    let base = run_step(
        &runner,
        &[(&tokens, RoutingMode::Base, &AdapterSelection::default())],
    );
    assert!(max_diff(&single[0], &base[0]) > 1e-3);
}

#[test]
fn each_pass_of_per_modality_pass_equals_that_adapter_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let mut runner = runner(dir.path(), 8);
    let mut sel = runner.default_selection().unwrap();
    sel.gate_set.clear(); // so the text pass is exactly "text adapter everywhere"
    let tokens = interleaved_sequence(&runner.vocab, 2, 60, 2);
    let image_rows: Vec<usize> = (0..tokens.len())
        .filter(|&i| runner.vocab.is_image_code(tokens[i]))
        .collect();
    let text_rows: Vec<usize> = (0..tokens.len())
        .filter(|&i| !runner.vocab.is_image_code(tokens[i]))
        .collect();
    assert!(!image_rows.is_empty() && !text_rows.is_empty());

    let multi = &run_step(&runner, &[(&tokens, RoutingMode::PerModalityPass, &sel)])[0];
    for (modality, idx) in [(0, &text_rows), (1, &image_rows)] {
        let forced = AdapterSelection {
            forced: vec![(sel.modality[modality].unwrap(), 1.0)],
            ..Default::default()
        };
        let everywhere = &run_step(&runner, &[(&tokens, RoutingMode::PerSequence, &forced)])[0];
        assert!(
            max_diff(&rows(multi, idx), &rows(everywhere, idx)) < TOL,
            "pass {modality}"
        );
    }
    // On mixed sequences the two modes differ (context computed with the wrong adapter).
    let single = &run_step(&runner, &[(&tokens, RoutingMode::SinglePass, &sel)])[0];
    assert!(max_diff(single, multi) > 1e-4);
}

#[test]
fn mixed_batch_equals_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let mut runner = runner(dir.path(), 8);
    let sel = runner.default_selection().unwrap();
    let forced = AdapterSelection {
        forced: vec![(sel.gate_set[1].1, 1.0)],
        ..Default::default()
    };
    let none = AdapterSelection::default();
    let a = interleaved_sequence(&runner.vocab, 2, 50, 3);
    let b = interleaved_sequence(&runner.vocab, 2, 31, 4);
    let c = text_only(&runner, 17, 5);
    let d = interleaved_sequence(&runner.vocab, 2, 44, 6);
    let batch = [
        (&a[..], RoutingMode::SinglePass, &sel),
        (&b[..], RoutingMode::PerModalityPass, &sel),
        (&c[..], RoutingMode::PerSequence, &forced),
        (&d[..], RoutingMode::Base, &none),
    ];
    let together = run_step(&runner, &batch);
    for (i, one) in batch.iter().enumerate() {
        let alone = run_step(&runner, &[*one]);
        assert!(max_diff(&together[i], &alone[0]) < TOL, "sequence {i}");
    }
}

#[test]
fn cached_decode_equals_recomputation_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let mut runner = runner(dir.path(), 8);
    let sel = runner.default_selection().unwrap();
    let tokens = interleaved_sequence(&runner.vocab, 2, 45, 7);
    for mode in [RoutingMode::SinglePass, RoutingMode::PerModalityPass] {
        let full = &run_step(&runner, &[(&tokens, mode, &sel)])[0];
        let chunked = run_chunked(&runner, &tokens, 20, mode, &sel);
        assert!(max_diff(full, &chunked) < 1e-4, "{mode}");
    }
}

#[test]
fn adapter_with_zero_b_leaves_the_base_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let cfg = molora::model::config::Config::from_file(&dir.path().join("config.json")).unwrap();
    let zero = LoraAdapter::random(
        "zero",
        AdapterRole::Semantic {
            domain: "zero".into(),
        },
        &cfg,
        4,
        8.0,
        &Projection::ALL,
        3,
        true,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    zero.save(&dir.path().join("adapters/zero")).unwrap();
    let mut runner = runner(dir.path(), 8);
    let slot = runner.hot_set.acquire("zero").unwrap();
    let forced = AdapterSelection {
        forced: vec![(slot, 1.0)],
        ..Default::default()
    };
    let tokens = interleaved_sequence(&runner.vocab, 2, 40, 8);
    let with = &run_step(&runner, &[(&tokens, RoutingMode::PerSequence, &forced)])[0];
    let base = &run_step(
        &runner,
        &[(&tokens, RoutingMode::Base, &AdapterSelection::default())],
    )[0];
    assert_eq!(max_diff(with, base), 0.0);
}

#[test]
fn hot_set_eviction_keeps_outputs_correct() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let tokens = interleaved_sequence(&tiny_runner_vocab(dir.path()), 2, 30, 9);
    // Reference: every adapter resident at once.
    let mut big = runner(dir.path(), 8);
    let names = ["math", "code", "caption", "chat"];
    let mut expected = vec![];
    for n in names {
        let slot = big.hot_set.acquire(n).unwrap();
        let sel = AdapterSelection {
            forced: vec![(slot, 1.0)],
            ..Default::default()
        };
        expected.push(run_step(&big, &[(&tokens, RoutingMode::PerSequence, &sel)]).remove(0));
        big.hot_set.release(n).unwrap();
    }
    // Two slots for four adapters: every acquire past the second evicts the LRU one.
    let mut small = runner(dir.path(), 2);
    for round in 0..2 {
        for (i, n) in names.iter().enumerate() {
            let slot = small.hot_set.acquire(n).unwrap();
            let sel = AdapterSelection {
                forced: vec![(slot, 1.0)],
                ..Default::default()
            };
            let got = run_step(&small, &[(&tokens, RoutingMode::PerSequence, &sel)]).remove(0);
            assert!(
                max_diff(&got, &expected[i]) < TOL,
                "round {round} adapter {n}"
            );
            small.hot_set.release(n).unwrap();
        }
    }
    assert!(small.hot_set.evictions() >= 6);
}

fn tiny_runner_vocab(dir: &std::path::Path) -> molora::model::config::VocabLayout {
    molora::model::config::Config::from_file(&dir.join("config.json"))
        .unwrap()
        .vocab()
        .unwrap()
}

/// `first_gated_layer` in gate_config.json: the layers before it get no
/// semantic adapter, the later ones get the gate's picks as before; an
/// out-of-range value is refused when the model loads.
#[test]
fn layers_before_the_first_gated_layer_get_no_semantic_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_tiny(dir.path());
    let gate_file = dir.path().join(molora::routing::gate::GATE_CONFIG_FILE);
    let set_first = |layer: usize| {
        let text = std::fs::read_to_string(&gate_file).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg["first_gated_layer"] = layer.into();
        std::fs::write(&gate_file, cfg.to_string()).unwrap();
    };
    let semantic_rows = |first: usize| -> (f64, candle_core::Tensor) {
        set_first(first);
        let mut runner = runner(dir.path(), 8);
        let sel = runner.default_selection().unwrap();
        let tokens = text_only(&runner, 40, 1);
        let mut pool = vec![runner.new_cache().unwrap()];
        let step = molora::engine::runner::SeqStep {
            tokens: &tokens,
            mode: RoutingMode::SinglePass,
            adapters: &sel,
            caches: &[0],
        };
        let out = runner.forward(&[step], &mut pool).unwrap();
        let experts = &runner.gate.as_ref().unwrap().config.experts;
        let rows = (out.report.rows_per_adapter.iter())
            .filter(|(name, _)| experts.contains(name))
            .map(|(_, rows)| rows)
            .sum();
        (rows, out.hidden)
    };
    let (every_layer, routed_everywhere) = semantic_rows(0);
    let (after_first, routed_after_first) = semantic_rows(1);
    assert!(every_layer >= 40.0, "{every_layer}");
    let layers = spec.num_layers as f64;
    assert!((after_first - every_layer * (layers - 1.0) / layers).abs() < 1e-9);
    assert!(max_diff(&routed_everywhere, &routed_after_first) > 1e-4);
    set_first(spec.num_layers);
    let hot = molora::adapters::hot_set::HotSetConfig {
        capacity: 8,
        max_rank: 8,
    };
    let dir = dir.path();
    let err = molora::engine::runner::ModelRunner::load(
        dir,
        &dir.join(molora::random_model::ADAPTERS_DIR),
        hot,
        &candle_core::Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("first_gated_layer"), "{err:#}");
}
