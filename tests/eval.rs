//! `molora eval`: the checker validated through the eval path, the command end
//! to end on a tiny random model, the gate's routing-accuracy count on a
//! hand-built gate, and mixed requests scored by the world's scorer.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use molora::engine::images::VQ_WEIGHTS_FILE;
use molora::eval::image_checks::{checker_on_ground_truth, held_out_scenes};
use molora::eval::model::EvalModel;
use molora::eval::report::mode_rows;
use molora::eval::teacher::{adapters_vs_base, gate_accuracy, held_out_sequences};
use molora::eval::{generation, run, EvalArgs};
use molora::model::config::Config;
use molora::model::vq::{VqConfig, VqModel};
use molora::random_model::{write_random_model, RandomModelSpec};
use molora::routing::gate::{Gate, GateConfig};
use molora::routing::mode::RoutingMode;
use molora::train::data::scoring::score;
use molora::train::data::text_domains::{sample_mixed_kind, MixedKind};
use molora::train::data::{Domain, Scene, Split, Task, PART_SEPARATOR};
use serde_json::json;

/// The tiny random model of tests/common plus a random VQ for its 4x4 grid
/// (16x16 pixels), in a fresh folder under target/tmp.
fn tiny_model_with_vq(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("eval-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &common::tiny_spec()).unwrap();
    let path = dir.join("config.json");
    let mut cfg = Config::from_file(&path).unwrap();
    let codes = cfg.vocab().unwrap().image_range().len();
    let vq_json = json!({
        "embed_dim": 4, "n_embed": codes, "z_channels": 4, "resolution": 16,
        "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_type": "none"
    });
    let vq_cfg: VqConfig = serde_json::from_value(vq_json.clone()).unwrap();
    let vm = VarMap::new();
    VqModel::new(
        &vq_cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    vm.save(dir.join(VQ_WEIGHTS_FILE)).unwrap();
    cfg.vq_config = Some(vq_json);
    cfg.to_file(&path).unwrap();
    dir
}

#[test]
fn checker_reads_ground_truth_through_the_eval_path() {
    let tally = checker_on_ground_truth(&held_out_scenes(300, 7));
    assert_eq!(tally.checked, 300);
    for (attribute, rate) in tally.rates() {
        assert!(
            rate >= 0.99,
            "checker on ground truth: {attribute} {rate:.3}"
        );
    }
}

#[test]
fn eval_command_prints_every_row_for_every_mode() {
    let dir = tiny_model_with_vq("command");
    let out = dir.join("EVAL.md");
    let started = Instant::now();
    let result = Command::new(env!("CARGO_BIN_EXE_molora"))
        .args(["eval", "--model"])
        .arg(&dir)
        .args([
            "--n",
            "4",
            "--checker-n",
            "20",
            "--vq-n",
            "10",
            "--seed",
            "3",
            "--quiet",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--save-images")
        .arg(dir.join("pictures"))
        .arg("--show")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    println!("{stdout}");
    let stderr = String::from_utf8_lossy(&result.stderr);
    for mode in RoutingMode::ALL {
        assert!(
            stderr.contains(&format!("  [{mode}] arithmetic: \"what is ")),
            "{stderr}"
        );
    }
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());

    // The row list of a mode, from the report code itself.
    let rows: Vec<String> = mode_rows(&molora::eval::report::ModeResult {
        mode: RoutingMode::Base,
        tasks: Default::default(),
        gate: None,
    })
    .into_iter()
    .map(|r| r.metric)
    .collect();
    assert!(rows.len() > 20);
    let sections: Vec<&str> = stdout.split("### Routing mode ").skip(1).collect();
    assert_eq!(sections.len(), 4, "{stdout}");
    for (section, mode) in sections.iter().zip(RoutingMode::ALL) {
        assert!(section.starts_with(&format!("`{mode}`")), "{section}");
        for metric in &rows {
            assert!(
                section.contains(&format!("| {metric} |")),
                "mode {mode} lacks row {metric:?}"
            );
        }
        // Zero failed requests: per_sequence's forced adapters were accepted.
        assert!(section.contains("| failed requests | 0 |"), "{section}");
    }
    for heading in ["### Targets", "### Image pipeline", "### Each adapter"] {
        assert!(stdout.contains(heading), "missing {heading}");
    }
    assert!(stdout.contains("| checker on ground-truth renderings: all | 100.0% | 20 |"));
    let pictures = dir.join("pictures");
    assert!(pictures.join("vq-0-reconstruction.png").is_file());
    let page = std::fs::read_to_string(&out).unwrap();
    assert!(page.contains("--checker-n 20") && page.contains(&dir.display().to_string()));
    assert!(page.contains("- date: ") && page.contains("- machine: "));
    assert!(page.contains("### Routing mode `base`"));
}

#[test]
fn report_measures_gate_only_where_it_runs_and_every_adapter() {
    let dir = tiny_model_with_vq("report");
    let args = EvalArgs {
        n: 2,
        checker_n: 12,
        vq_n: 8,
        ..EvalArgs::for_model(&dir)
    };
    let report = run(&args).unwrap();
    assert_eq!(report.modes.len(), 4);
    for m in &report.modes {
        let gated = matches!(
            m.mode,
            RoutingMode::SinglePass | RoutingMode::PerModalityPass
        );
        assert_eq!(m.gate.is_some(), gated, "{}", m.mode);
        assert_eq!(m.tasks.failed, 0, "{:?}", m.tasks.first_failure);
        // Two items of each of the five tasks and of unseen-pair drawings,
        // all scored.
        let posed: usize = m.tasks.exact.values().map(|v| v.1).sum();
        assert_eq!(posed, 12);
        assert_eq!(m.tasks.draw.checked, 2);
        assert_eq!(m.tasks.draw_unseen.checked, 2);
        assert!(m.tasks.generated_tokens > 0);
    }
    // text, image, math, code, caption serve world domains; chat does not.
    let names: Vec<&str> = report.adapters.iter().map(|a| a.adapter.as_str()).collect();
    assert_eq!(names, ["caption", "code", "image", "math", "text"]);
    for a in &report.adapters {
        assert!(a.tokens > 0 && a.base_loss.is_finite() && a.adapter_loss.is_finite());
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["modes"].as_array().unwrap().len(), 4);
    let vq = report.vq.as_ref().unwrap();
    assert_eq!(vq.images, 8);
    assert!(vq.psnr_db > 0.0 && vq.psnr_db < 100.0);
}

#[test]
fn a_recipe_beside_the_model_keeps_an_adapter_from_being_judged_on_skills_it_never_learned() {
    use molora::train::pipeline::PipelineConfig;
    use molora::train::stages::RECIPE_FILE;
    let dir = tiny_model_with_vq("recipe");
    let tokens = |dir: &Path| {
        let mut model = EvalModel::load(dir).unwrap();
        let (seqs, _) = held_out_sequences(&model, 16, 0).unwrap();
        let adapters = model.adapters.clone();
        let rows = adapters_vs_base(&mut model.runner, &adapters, &seqs).unwrap();
        let count = |name: &str| rows.iter().find(|r| r.adapter == name).unwrap().tokens;
        (count("text"), count("math"), count("caption"))
    };
    let (text, math, caption) = tokens(&dir);
    // The chaining of two-operation sums is left to the math LoRA: the text
    // LoRA is judged without those tokens, the math LoRA with them.
    let mut cfg = PipelineConfig::tiny();
    cfg.adapter_only_domains.clear();
    cfg.adapter_only_skills = vec![Domain::Arithmetic];
    std::fs::write(
        dir.join(RECIPE_FILE),
        serde_json::to_string(&(0u64, &cfg)).unwrap(),
    )
    .unwrap();
    let (text_after, math_after, caption_after) = tokens(&dir);
    assert!(text_after < text, "{text_after} of {text}");
    assert_eq!((math_after, caption_after), (math, caption));
    std::fs::write(dir.join(RECIPE_FILE), "{").unwrap();
    let err = EvalModel::load(&dir).err().unwrap();
    assert!(format!("{err:#}").contains(RECIPE_FILE), "{err:#}");
}

/// Rewrites the model's gate as a linear gate whose bias puts `expert` first
/// for every input.
fn force_gate(dir: &Path, expert: &str) {
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let old = Gate::load(dir, cfg.num_hidden_layers, cfg.hidden_size, &Device::Cpu).unwrap();
    let experts = old.config.experts.clone();
    let e = experts.len();
    let mut bias = vec![0f32; e];
    bias[experts.iter().position(|x| x == expert).unwrap()] = 50.0;
    let mut tensors = HashMap::new();
    for i in 0..cfg.num_hidden_layers {
        tensors.insert(
            format!("layers.{i}.proj.weight"),
            Tensor::zeros((e, cfg.hidden_size), DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            format!("layers.{i}.proj.bias"),
            Tensor::new(bias.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    let gate_cfg = GateConfig {
        experts,
        top_k: 2,
        hidden_size: 0,
        first_gated_layer: 0,
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Gate::new(gate_cfg, cfg.num_hidden_layers, vb)
        .unwrap()
        .save(dir)
        .unwrap();
}

#[test]
fn routing_accuracy_counts_a_gate_forced_to_one_adapter() {
    let dir = tiny_model_with_vq("gate");
    force_gate(&dir, "code");
    let mut model = EvalModel::load(&dir).unwrap();
    let (seqs, tasks) = held_out_sequences(&model, 3, 5).unwrap();
    let count = |d: Domain| {
        seqs.iter()
            .flat_map(|s| &s.domains)
            .filter(|l| **l == Some(d))
            .count()
    };
    let (arith, code, caption) = (
        count(Domain::Arithmetic),
        count(Domain::Code),
        count(Domain::Caption),
    );
    assert!(arith > 0 && code > 0 && caption > 0);
    let routable =
        |d: &Option<Domain>| matches!(d, Some(Domain::Arithmetic | Domain::Code | Domain::Caption));
    let mixed_text: usize = (seqs.iter().zip(&tasks))
        .filter(|(_, t)| **t == Task::Mixed)
        .map(|(s, _)| s.domains.iter().filter(|d| routable(d)).count())
        .sum();
    let chaining: usize = (seqs.iter())
        .map(|s| (s.answer_start..s.len()).filter(|&t| s.skill[t]).count())
        .sum();
    assert!(mixed_text > 0 && chaining > 0);
    for mode in [RoutingMode::SinglePass, RoutingMode::PerModalityPass] {
        let tally = gate_accuracy(&mut model.runner, &seqs, &tasks, mode)
            .unwrap()
            .unwrap();
        // Image tokens are never gated; every text token of a routable domain
        // is counted, and only the code tokens are routed right.
        assert_eq!(tally.total, arith + code + caption, "{mode}");
        assert_eq!(tally.correct, code, "{mode}");
        assert_eq!(tally.by_domain[&Domain::Code], (code, code));
        assert_eq!(tally.by_domain[&Domain::Arithmetic], (0, arith));
        // Chaining tokens are arithmetic ones: a code-only gate gets none.
        assert_eq!(tally.skill, (0, chaining));
        assert_eq!(tally.mixed.1, mixed_text);
    }
    for mode in [RoutingMode::PerSequence, RoutingMode::Base] {
        assert!(gate_accuracy(&mut model.runner, &seqs, &tasks, mode)
            .unwrap()
            .is_none());
    }

    // A gate that always picks "chat" (no domain of the world) is never right.
    force_gate(&dir, "chat");
    let mut model = EvalModel::load(&dir).unwrap();
    let tally = gate_accuracy(&mut model.runner, &seqs, &tasks, RoutingMode::SinglePass)
        .unwrap()
        .unwrap();
    assert_eq!((tally.correct, tally.total), (0, arith + code + caption));
}

#[test]
fn mixed_requests_are_scored_by_the_real_scorer() {
    let dir = tiny_model_with_vq("mixed");
    let model = EvalModel::load(&dir).unwrap();
    let enc = model.encoder();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
    let mut codes = |s: &Scene| model.scene_codes(s);

    // The gold answer's own tokens, through the eval's decoding, are right.
    let ex = sample_mixed_kind(&mut rng, MixedKind::CodeAndResult, Split::Test);
    let seq = enc.encode_example(&ex, &mut codes).unwrap();
    let answer = &seq.ids[seq.answer_start..];
    let s = score(&ex, &generation::produced(&model, answer).unwrap());
    assert!(s.exact, "{s:?}");

    // The right program with a wrong result: the code part passes, the
    // request does not.
    let gold: String = ex.texts().skip(ex.prompt.len()).collect();
    let (code, _) = gold.rsplit_once(PART_SEPARATOR).unwrap();
    let wrong = format!("{code}{PART_SEPARATOR}result -1");
    let ids = model
        .tokenizer
        .encode(wrong, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let s = score(&ex, &generation::produced(&model, &ids).unwrap());
    assert!(!s.exact && s.parts[0].ok && !s.parts[1].ok, "{s:?}");

    // Draw and sides: the picture goes through the (random) VQ decoder and
    // fails the checker; the sides answer is still judged on its own.
    let ex = sample_mixed_kind(&mut rng, MixedKind::DrawAndSides, Split::Test);
    let seq = enc.encode_example(&ex, &mut codes).unwrap();
    let produced = generation::produced(&model, &seq.ids[seq.answer_start..]).unwrap();
    assert_eq!(produced.len(), 2);
    let s = score(&ex, &produced);
    assert!(!s.exact && !s.parts[0].ok && s.parts[1].ok, "{s:?}");
    assert!(s.parts[0].attributes.is_some());
}

/// Writes a random model of the demo's size (`init-random` defaults) with a
/// random VQ of configs/vq_demo.json into $EVAL_DEMO_DIR, for timing
/// `molora eval` at the demo size before a trained model exists:
/// `EVAL_DEMO_DIR=/tmp/demo-random cargo test --release --test eval -- --ignored`.
#[test]
#[ignore]
fn write_demo_size_random_model() {
    let Ok(dir) = std::env::var("EVAL_DEMO_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let cfg_path = dir.join("config.json");
    write_random_model(&dir, &Default::default()).unwrap();
    let vq_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vq_demo.json");
    let vq_cfg = VqConfig::from_file(&vq_path).unwrap();
    let vm = VarMap::new();
    VqModel::new(
        &vq_cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    vm.save(dir.join(VQ_WEIGHTS_FILE)).unwrap();
    let mut cfg = Config::from_file(&cfg_path).unwrap();
    assert_eq!(
        vq_cfg.tokens_per_image(),
        cfg.vocab().unwrap().tokens_per_image
    );
    cfg.vq_config = Some(serde_json::to_value(&vq_cfg).unwrap());
    cfg.to_file(&cfg_path).unwrap();
}

#[test]
fn a_model_without_vq_gets_na_picture_rows() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval-no-vq");
    let _ = std::fs::remove_dir_all(&dir);
    let spec = RandomModelSpec {
        with_vq: false,
        ..common::tiny_spec()
    };
    write_random_model(&dir, &spec).unwrap();
    let args = EvalArgs {
        n: 2,
        checker_n: 10,
        vq_n: 4,
        modes: vec![RoutingMode::SinglePass, RoutingMode::Base],
        ..EvalArgs::for_model(&dir)
    };
    let report = run(&args).unwrap();
    assert!(report.vq.is_none());
    let tables = molora::eval::report::markdown(&report);
    assert!(tables.contains("| image (drawn from held-out captions): colour | n/a |"));
    assert!(tables.contains("| VQ reconstruction PSNR (dB) | n/a |"));
    // Text tasks are still posed and scored.
    assert!(
        tables.contains("| arithmetic exact match | 0.0% | 2 |"),
        "{tables}"
    );
    // The rows by operator count split the same items (the first mode's).
    let posed = |label: &str| -> usize {
        tables
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .and_then(|l| l.split('|').nth(3))
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        posed("arithmetic: one operation") + posed("arithmetic: two operations"),
        2,
        "{tables}"
    );
}
