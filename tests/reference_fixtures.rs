//! molora against the reference implementations, on the golden fixtures
//! that scripts/fixtures/make_fixtures.py wrote with transformers
//! (Chameleon), PEFT (LoRA) and taming-transformers (VQGAN): the checkpoints
//! load as their libraries saved them, and molora computes the same numbers
//! to 1e-4 relative (max |molora - reference| / max |reference|).
//!
//! Bad checkpoints (unknown model_type, a vocabulary map without image codes,
//! a VQ codebook that disagrees with the image-code range, a missing tensor,
//! a missing shard, a scaled RoPE) are refused naming the field or tensor;
//! `convert-vqgan` turns a taming export into a model's VQ weights.

mod reference_support;

use candle_core::{DType, Device, Tensor};
use molora::engine::runner::{AdapterSelection, SeqStep};
use molora::model::decoder::{BatchInput, Decoder};
use molora::model::kv_cache::KvCache;
use molora::model::norms::KernelPath;
use molora::model::vq::{VqConfig, VqModel};
use molora::routing::mode::RoutingMode;
use reference_support::*;

/// Both sequences in one batch; logits and hidden rows of each.
fn decoder_outputs(model: &Decoder, seqs: &[Vec<u32>]) -> Vec<(Tensor, Tensor)> {
    let mut caches: Vec<KvCache> = seqs
        .iter()
        .map(|_| KvCache::new(model.config(), model.device()).unwrap())
        .collect();
    let mut batch = BatchInput::default();
    for (i, s) in seqs.iter().enumerate() {
        batch.push(i, s);
    }
    let hidden = model.forward(&batch, &mut caches, None).unwrap();
    let logits = model.logits(&hidden).unwrap();
    let mut out = vec![];
    let mut at = 0;
    for s in seqs {
        out.push((
            hidden.narrow(0, at, s.len()).unwrap(),
            logits.narrow(0, at, s.len()).unwrap(),
        ));
        at += s.len();
    }
    out
}

#[test]
fn tied_prenorm_checkpoint_matches_transformers() {
    let refs = reference("chameleon_tied");
    let seqs = input_ids(&refs);
    // The checkpoint carries transformers' VQ encoder; the decoder skips it.
    let file = fixture("chameleon_tied/model.safetensors");
    let names = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    assert!(names.contains_key("model.vqmodel.encoder.conv_in.weight"));
    let mut model = Decoder::load(&fixture("chameleon_tied"), &Device::Cpu).unwrap();
    for path in [KernelPath::HostSlices, KernelPath::TensorOps] {
        model.set_kernel_path(path).unwrap();
        for (s, (hidden, logits)) in decoder_outputs(&model, &seqs).iter().enumerate() {
            assert_close(
                hidden,
                &refs[&format!("hidden_{s}")],
                &format!("{path:?} hidden {s}"),
            );
            assert_close(
                logits,
                &refs[&format!("logits_{s}")],
                &format!("{path:?} logits {s}"),
            );
        }
    }
}

#[test]
fn swin_gqa_sharded_checkpoint_matches_transformers() {
    let refs = reference("chameleon_swin");
    let seqs = input_ids(&refs);
    let mut model = Decoder::load(&fixture("chameleon_swin"), &Device::Cpu).unwrap();
    let cfg = model.config().clone();
    assert!(cfg.swin_norm && !cfg.tie_word_embeddings);
    assert_eq!((cfg.num_attention_heads, cfg.num_kv_heads()), (4, 2));
    // Read from rope_parameters (transformers 5 writes no top-level rope_theta).
    assert_eq!(cfg.rope_theta, 50000.0);
    for path in [KernelPath::HostSlices, KernelPath::TensorOps] {
        model.set_kernel_path(path).unwrap();
        for (s, (hidden, logits)) in decoder_outputs(&model, &seqs).iter().enumerate() {
            let tag = format!("{path:?} seq {s}");
            assert_close(hidden, &refs[&format!("hidden_base_{s}")], &tag);
            assert_close(logits, &refs[&format!("logits_base_{s}")], &tag);
        }
    }
    // f16 projection weights (`serve --weight-dtype f16`) stay near the
    // reference: f16 rounds each weight by up to 2^-11 relative.
    model.set_weight_dtype(DType::F16).unwrap();
    for (s, (_, logits)) in decoder_outputs(&model, &seqs).iter().enumerate() {
        let r = rel_diff(logits, &refs[&format!("logits_base_{s}")]);
        eprintln!("f16 weights, seq {s}: relative difference {r:.1e}");
        assert!(r < 5e-3, "f16 weights, seq {s}: relative difference {r:e}");
    }
}

#[test]
fn vocabulary_comes_from_the_chameleon_files() {
    let cfg =
        molora::model::config::Config::from_file(&fixture("chameleon_tied/config.json")).unwrap();
    let v = cfg.vocab().unwrap();
    // IMGIMG* names in vocabulary_map: Chameleon's layout, codes right after 4 specials.
    assert_eq!(v.image_range(), 4..36);
    assert_eq!(v.text_range(), 36..80);
    assert_eq!((v.boi, v.eoi), (Some(36), Some(37)));
    // No molora fields: the grid is the VQ model's (16 px / 2 = 8 x 8 codes).
    assert_eq!((v.image_grid, v.tokens_per_image), ([8, 8], 64));
    // The tokenizer transformers' side wrote reads with the tokenizers crate.
    let tok = tokenizers::Tokenizer::from_file(fixture("chameleon_tied/tokenizer.json")).unwrap();
    assert_eq!(tok.token_to_id("IMGIMGBAZ"), Some(4 + 10));
    assert_eq!(tok.token_to_id("<racm3:break>"), v.boi);
}

/// Logits of every sequence run in one step with per-sequence modes.
fn runner_logits(
    runner: &molora::engine::runner::ModelRunner,
    seqs: &[Vec<u32>],
    mode: RoutingMode,
    sel: &AdapterSelection,
) -> Vec<Tensor> {
    let mut pool: Vec<KvCache> = (0..seqs.len())
        .map(|_| runner.new_cache().unwrap())
        .collect();
    let ids: Vec<Vec<usize>> = (0..seqs.len()).map(|i| vec![i]).collect();
    let steps: Vec<SeqStep> = seqs
        .iter()
        .zip(&ids)
        .map(|(tokens, caches)| SeqStep {
            tokens,
            mode,
            adapters: sel,
            caches,
        })
        .collect();
    let out = runner.forward(&steps, &mut pool).unwrap();
    let logits = runner.decoder.logits(&out.hidden).unwrap();
    let mut at = 0;
    seqs.iter()
        .map(|s| {
            let rows = logits.narrow(0, at, s.len()).unwrap();
            at += s.len();
            rows
        })
        .collect()
}

#[test]
fn peft_adapter_on_every_token_matches_peft() {
    let refs = reference("chameleon_swin");
    let seqs = input_ids(&refs);
    let mut runner = swin_runner();
    let sel = runner.default_selection().unwrap();
    let slots = [("text", sel.modality[0]), ("image", sel.modality[1])];
    for (name, slot) in slots {
        let forced = AdapterSelection {
            forced: vec![(slot.expect("modality adapter loaded"), 1.0)],
            ..Default::default()
        };
        let logits = runner_logits(&runner, &seqs, RoutingMode::PerSequence, &forced);
        for (s, l) in logits.iter().enumerate() {
            let want = &refs[&format!("logits_{name}_{s}")];
            assert_close(l, want, &format!("adapter {name}, seq {s}"));
            // The adapter really acts: PEFT's output is far from the base.
            assert!(rel_diff(want, &refs[&format!("logits_base_{s}")]) > 1e-2);
        }
    }
}

#[test]
fn two_adapters_single_pass_match_peft_per_token() {
    let refs = reference("chameleon_swin");
    let seqs = input_ids(&refs);
    let mut runner = swin_runner();
    // The vocabulary-range router: text ids -> adapter "text", image codes -> "image".
    let sel = runner.default_selection().unwrap();
    assert!(sel.gate_set.is_empty());
    let logits = runner_logits(&runner, &seqs, RoutingMode::SinglePass, &sel);
    for (s, l) in logits.iter().enumerate() {
        let want = &refs[&format!("logits_mixed_{s}")];
        assert_close(l, want, &format!("single_pass seq {s}"));
        // Per-token routing is neither adapter alone.
        for name in ["text", "image"] {
            assert!(rel_diff(want, &refs[&format!("logits_{name}_{s}")]) > 1e-3);
        }
    }
}

fn vq_fixture() -> VqModel {
    let cfg = VqConfig::from_file(&fixture("vqgan/vq_config.json")).unwrap();
    VqModel::load(&fixture("vqgan/vqgan.safetensors"), &cfg, &Device::Cpu).unwrap()
}

#[test]
fn vq_decoder_pixels_match_taming() {
    let refs = reference("vqgan");
    let vq = vq_fixture();
    let codes = refs["codes"].to_dtype(DType::U32).unwrap();
    let pixels = vq.decode(&codes).unwrap();
    assert_close(&pixels, &refs["pixels_from_codes"], "pixels from codes");
}

#[test]
fn vq_encoder_latents_and_codes_match_taming() {
    let refs = reference("vqgan");
    let vq = vq_fixture();
    let latents = vq.encode_latents(&refs["images"]).unwrap();
    assert_close(&latents, &refs["latents"], "latents");
    let codes = vq.encode(&refs["images"]).unwrap();
    let want = refs["codes_from_pixels"].to_dtype(DType::U32).unwrap();
    assert_eq!(
        codes.to_vec2::<u32>().unwrap(),
        want.to_vec2::<u32>().unwrap()
    );
    let recon = vq.decode(&codes).unwrap();
    assert_close(&recon, &refs["reconstruction"], "reconstruction");
}

fn config_error(fixture_dir: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let (_dir, path) = edited_config(fixture_dir, edit);
    let err = molora::model::config::Config::from_file(&path).expect_err("must be refused");
    format!("{err:#}")
}

#[test]
fn bad_chameleon_configs_are_refused_naming_the_field() {
    let e = config_error("chameleon_tied", |v| v["model_type"] = "llama".into());
    assert!(e.contains("model_type") && e.contains("llama"), "{e}");

    let e = config_error("chameleon_tied", |v| {
        let map = v["vocabulary_map"].as_object_mut().unwrap();
        map.retain(|name, _| !name.starts_with("IMGIMG"));
    });
    assert!(e.contains("vocabulary_map") && e.contains("IMGIMG"), "{e}");

    let e = config_error("chameleon_tied", |v| {
        v["vq_config"]["num_embeddings"] = 64.into()
    });
    assert!(
        e.contains("vq_config.num_embeddings 64") && e.contains("4..36"),
        "{e}"
    );

    let e = config_error("chameleon_swin", |v| {
        v["molora"]["image_grid"] = serde_json::json!([4, 4])
    });
    assert!(e.contains("image_grid") && e.contains("vq_config"), "{e}");

    let e =
        config_error(
            "chameleon_swin",
            |v| {
                v["rope_parameters"] =
                    serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
            },
        );
    assert!(
        e.contains("rope_parameters.rope_type") && e.contains("yarn"),
        "{e}"
    );
}

#[test]
fn checkpoint_with_a_missing_tensor_or_shard_is_refused_naming_it() {
    // The tied checkpoint without one q/k-norm bias (and with its vqmodel.*).
    let dir = tempfile::tempdir().unwrap();
    copy_files("chameleon_tied", dir.path());
    let file = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let gone = "model.layers.1.self_attn.k_norm.bias";
    assert!(tensors.remove(gone).is_some());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let e = format!("{:#}", Decoder::load(dir.path(), &Device::Cpu).unwrap_err());
    assert!(e.contains(gone) && e.contains("model.safetensors"), "{e}");

    // The sharded checkpoint without its third shard.
    let dir = tempfile::tempdir().unwrap();
    copy_files("chameleon_swin", dir.path());
    let shard = "model-00003-of-00004.safetensors";
    std::fs::remove_file(dir.path().join(shard)).unwrap();
    let e = format!("{:#}", Decoder::load(dir.path(), &Device::Cpu).unwrap_err());
    assert!(e.contains(shard), "{e}");
}

/// The fixture VQGAN as a taming transformer checkpoint exports it: every
/// name under `first_stage_model.`, plus GAN-loss tensors the VQ model never reads.
fn taming_export(dir: &std::path::Path) -> std::path::PathBuf {
    let tensors =
        candle_core::safetensors::load(fixture("vqgan/vqgan.safetensors"), &Device::Cpu).unwrap();
    let mut out: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("first_stage_model.{k}"), v))
        .collect();
    for name in ["loss.discriminator.main.0.weight", "loss.logvar"] {
        out.insert(
            name.into(),
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let path = dir.join("export.safetensors");
    candle_core::safetensors::save(&out, &path).unwrap();
    path
}

#[test]
fn convert_vqgan_strips_the_prefix_drops_the_loss_and_decodes_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let input = taming_export(tmp.path());
    let out = tmp.path().join("vq");
    let report =
        molora::convert_vqgan::convert_vqgan(&input, &out, Some(&fixture("vqgan/vq_config.json")))
            .unwrap();
    assert_eq!(report.prefix, "first_stage_model.");
    assert_eq!(report.dropped.get("loss."), Some(&2));
    let text = report.to_string();
    assert!(
        text.contains("first_stage_model.") && text.contains("loss.* (2)"),
        "{text}"
    );

    let cfg = VqConfig::from_file(&out.join("vq_config.json")).unwrap();
    let vq = VqModel::load(&out.join("vqgan.safetensors"), &cfg, &Device::Cpu).unwrap();
    let refs = reference("vqgan");
    let codes = refs["codes"].to_dtype(DType::U32).unwrap();
    assert_close(
        &vq.decode(&codes).unwrap(),
        &refs["pixels_from_codes"],
        "converted",
    );
}

#[test]
fn convert_vqgan_into_a_chameleon_directory_makes_it_servable() {
    let tmp = tempfile::tempdir().unwrap();
    let input = taming_export(tmp.path());
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    copy_files("chameleon_tied", &model);
    // The directory's own vq_config (transformers' names) describes this VQGAN.
    let report = molora::convert_vqgan::convert_vqgan(&input, &model, None).unwrap();
    let check = report.model_check.clone().unwrap();
    assert!(
        check.contains("4..36") && check.contains("64 codes"),
        "{check}"
    );
    let cfg = molora::model::config::Config::from_file(&model.join("config.json")).unwrap();
    let vq = molora::server::load_vq(&model, &cfg, &Device::Cpu)
        .unwrap()
        .expect("the server finds the converted VQ model");
    assert_eq!(vq.config().num_embeddings, 32);

    // transformers keeps only the VQ encoder: refused with the reason.
    let e = molora::convert_vqgan::convert_vqgan(
        &fixture("chameleon_tied/model.safetensors"),
        &tmp.path().join("x"),
        Some(&fixture("vqgan/vq_config.json")),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("no decoder.* tensors"), "{e}");
}

#[test]
fn convert_vqgan_refuses_a_codebook_that_disagrees_with_the_image_range() {
    let tmp = tempfile::tempdir().unwrap();
    let input = taming_export(tmp.path());
    let (dir, _) = edited_config("chameleon_tied", |v| {
        // A model with 16 image codes and no VQ config of its own.
        let map = v["vocabulary_map"].as_object_mut().unwrap();
        map.retain(|name, id| !name.starts_with("IMGIMG") || id.as_u64().unwrap() < 20);
        v.as_object_mut().unwrap().remove("vq_config");
    });
    let e = molora::convert_vqgan::convert_vqgan(
        &input,
        dir.path(),
        Some(&fixture("vqgan/vq_config.json")),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("vq_config.num_embeddings 32") && e.contains("4..20"),
        "{e}"
    );
    assert!(!dir.path().join("vqgan.safetensors").exists());
}

#[test]
fn convert_vqgan_command_reports_and_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let input = taming_export(tmp.path());
    let exe = env!("CARGO_BIN_EXE_molora");
    let ok = std::process::Command::new(exe)
        .arg("convert-vqgan")
        .arg(&input)
        .arg("--out")
        .arg(tmp.path().join("out"))
        .arg("--config")
        .arg(fixture("vqgan/vq_config.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("8x8 codes per 16x16 image"), "{stdout}");

    let bad = std::process::Command::new(exe)
        .arg("convert-vqgan")
        .arg(&input)
        .arg("--out")
        .arg(tmp.path().join("out2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no VQ config"), "{stderr}");
}

/// Batch-1 decode speed of a loaded checkpoint: `steps` tokens after a
/// 16-token prompt; returns (tokens/s, weight bytes in memory as f32).
fn decode_speed(model: &Decoder, steps: usize) -> (f64, f64) {
    let cfg = model.config();
    let params: usize = molora::model::weights::expected_tensors(cfg)
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut caches = vec![KvCache::new(cfg, model.device()).unwrap()];
        let mut batch = BatchInput::default();
        batch.push(0, &[0; 16]);
        model.forward(&batch, &mut caches, None).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..steps {
            let mut batch = BatchInput::default();
            batch.push(0, &[0]);
            let h = model.forward(&batch, &mut caches, None).unwrap();
            model.logits(&h).unwrap();
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    (steps as f64 / best, params as f64 * 4.0)
}

/// Prints decode speed and memory of the tiny fixtures and of a ~140M
/// Chameleon-layout checkpoint, for the README's 7B extrapolation:
/// `cargo test --release --test reference_fixtures -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_decode_for_the_readme() {
    let report = |name: &str, model: &Decoder, steps: usize| {
        let (tps, bytes) = decode_speed(model, steps);
        println!(
            "{name}: {:.2} M parameters, {:.1} MB f32, {tps:.0} tokens/s, {:.2} GB/s of weights",
            bytes / 4e6,
            bytes / 1e6,
            bytes * tps / 1e9
        );
    };
    for name in ["chameleon_tied", "chameleon_swin"] {
        report(
            name,
            &Decoder::load(&fixture(name), &Device::Cpu).unwrap(),
            100,
        );
    }
    // The swin fixture's config scaled up (d 1024, 8 layers, 16k vocabulary).
    let (dir, path) = edited_config("chameleon_swin", |v| {
        v["hidden_size"] = 1024.into();
        v["intermediate_size"] = 2816.into();
        v["num_hidden_layers"] = 8.into();
        v["num_attention_heads"] = 16.into();
        v["num_key_value_heads"] = 16.into();
        v["vocab_size"] = 16384.into();
        v["max_position_embeddings"] = 512.into();
    });
    let cfg = molora::model::config::Config::from_file(&path).unwrap();
    molora::model::weights::write_random_model(dir.path(), &cfg, 1).unwrap();
    let mut scaled = Decoder::load(dir.path(), &Device::Cpu).unwrap();
    report("scaled, f32 weights", &scaled, 20);
    scaled.set_weight_dtype(DType::F16).unwrap();
    let (tps, _) = decode_speed(&scaled, 20);
    println!("scaled, f16 projection weights: {tps:.0} tokens/s");
}
