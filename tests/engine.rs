//! The engine end to end on a tiny random model: streaming, image blocks,
//! guidance, continuous batching against runs alone, admission limits,
//! abandoned clients and adapter management.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use molora::engine::images::VQ_WEIGHTS_FILE;
use molora::engine::modality::{apply_mask, ModalityState};
use molora::engine::params::{GenerationParams, SamplingParams};
use molora::engine::sampler::{apply_cfg, argmax};
use molora::engine::{
    AdapterCommand, AdapterReply, AdapterRequest, Completion, Engine, EngineConfig, EngineHandle,
    FinishReason, InferEvent, Priority, SubmitError, ValidRequest,
};
use molora::engine_runner::SeqStep;
use molora::model::config::{Config, VocabLayout};
use molora::model::vq::{VqConfig, VqModel};
use molora::random_model::ADAPTERS_DIR;
use molora::routing::mode::RoutingMode;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    vocab: VocabLayout,
    tokenizer: Tokenizer,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tiny");
    common::write_tiny(&path);
    let vocab = Config::from_file(&path.join("config.json"))
        .unwrap()
        .vocab()
        .unwrap();
    let tokenizer = Tokenizer::from_file(path.join("tokenizer.json")).unwrap();
    Fixture {
        _dir: dir,
        path,
        vocab,
        tokenizer,
    }
}

/// A random VQ decoder for the tiny model's 4x4 grid of 64 codes (16x16 pixels).
fn tiny_vq(vocab: &VocabLayout) -> VqModel {
    let cfg: VqConfig = serde_json::from_value(serde_json::json!({
        "embed_dim": 4, "n_embed": vocab.image_range().len(), "z_channels": 4, "resolution": 16,
        "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_type": "none"
    }))
    .unwrap();
    assert_eq!(cfg.tokens_per_image(), vocab.tokens_per_image);
    let vm = VarMap::new();
    VqModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).expect("tiny vq")
}

fn start(f: &Fixture, cfg: EngineConfig, with_vq: bool) -> EngineHandle {
    let runner = common::runner(&f.path, 8);
    let vq = with_vq.then(|| tiny_vq(&f.vocab));
    Engine::start(runner, f.tokenizer.clone(), vq, cfg)
}

fn config() -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_queue: 16,
        max_batch_tokens: 24,
        max_context: 256,
    }
}

fn params(seed: u64, max_tokens: usize, temperature: f32) -> GenerationParams {
    let s = SamplingParams {
        temperature,
        top_k: Some(40),
        top_p: Some(0.95),
    };
    GenerationParams {
        max_tokens,
        text: s,
        image: s,
        cfg_scale: 1.0,
        seed,
        stop_at_eos: false,
    }
}

fn request(
    prompt: Vec<u32>,
    params: GenerationParams,
    mode: RoutingMode,
    adapters: AdapterRequest,
) -> ValidRequest {
    ValidRequest {
        prompt,
        params,
        mode,
        adapters,
        priority: Priority::Interactive,
        preview_every: None,
    }
}

/// `<bos>` and `n` text ids.
fn text_prompt(v: &VocabLayout, n: usize, offset: u32) -> Vec<u32> {
    let text = v.text_range();
    let mut p = vec![v.bos.unwrap()];
    p.extend((0..n as u32).map(|i| text.start + 7 + (offset + i * 13) % (text.len() as u32 - 20)));
    p
}

/// Every event up to and including End or Error.
fn collect(rx: &mut UnboundedReceiver<InferEvent>) -> Vec<InferEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = vec![];
    loop {
        match rx.try_recv() {
            Ok(ev) => {
                let last = matches!(ev, InferEvent::End(_) | InferEvent::Error(_));
                out.push(ev);
                if last {
                    return out;
                }
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no End after 60 s: {out:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("stream closed without End: {e:?} after {out:?}"),
        }
    }
}

fn tokens(events: &[InferEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| {
            if let InferEvent::Token { id, .. } = e {
                Some(*id)
            } else {
                None
            }
        })
        .collect()
}

fn completion(events: &[InferEvent]) -> &Completion {
    match events.last() {
        Some(InferEvent::End(c)) => c,
        other => panic!("expected End, got {other:?}"),
    }
}

fn run(engine: &EngineHandle, req: ValidRequest) -> Vec<InferEvent> {
    let mut rx = engine.submit(req).expect("submit");
    collect(&mut rx)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn greedy_generation_streams_tokens_text_and_usage() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let prompt = text_prompt(&f.vocab, 9, 0);
    let events = run(
        &engine,
        request(
            prompt.clone(),
            params(0, 12, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    let ids = tokens(&events);
    assert_eq!(ids.len(), 12, "{events:?}");
    let c = completion(&events);
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.usage.prompt_tokens, prompt.len());
    assert_eq!(c.usage.text_tokens + c.usage.image_tokens, 12);
    assert_eq!(
        c.usage.image_tokens,
        ids.iter().filter(|&&t| f.vocab.is_image_code(t)).count()
    );
    assert_eq!(c.routing.mode, "single_pass");
    assert!(
        c.routing.passes >= 1 && c.routing.token_rows >= prompt.len() + 11,
        "{:?}",
        c.routing
    );
    assert!(
        c.routing.rows_per_adapter.contains_key("text"),
        "{:?}",
        c.routing.rows_per_adapter
    );
    assert!(c.routing.total_ms >= c.routing.forward_ms);

    // The deltas concatenate to the decoded text of the generated text ids.
    let text: String = events
        .iter()
        .filter_map(|e| {
            if let InferEvent::TextDelta(t) = e {
                Some(t.as_str())
            } else {
                None
            }
        })
        .collect();
    let specials = [
        f.vocab.bos,
        f.vocab.eos,
        f.vocab.pad,
        f.vocab.boi,
        f.vocab.eoi,
    ];
    let text_ids: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|t| !f.vocab.is_image_code(*t) && !specials.contains(&Some(*t)))
        .collect();
    assert_eq!(text, f.tokenizer.decode(&text_ids, true).unwrap());
    // Every token names its modality; text tokens name an adapter.
    for e in &events {
        if let InferEvent::Token {
            id,
            modality,
            adapter,
        } = e
        {
            assert_eq!(modality, &f.vocab.modalities[f.vocab.modality_of(*id)].name);
            assert!(adapter.is_some(), "token {id} has no serving adapter");
        }
    }
    // Greedy is deterministic.
    let again = run(
        &engine,
        request(
            prompt,
            params(99, 12, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    assert_eq!(tokens(&again), ids);
    let stats = engine.stats();
    assert_eq!(stats.tokens_by_modality.values().sum::<u64>(), 24);
    assert!(
        stats.steps >= 12 && stats.requests_finished == 2,
        "{stats:?}"
    );
}

fn image_prompt(v: &VocabLayout) -> Vec<u32> {
    let mut p = text_prompt(v, 5, 3);
    p.push(v.boi.unwrap());
    p
}

#[test]
fn an_image_block_is_tokens_per_image_codes_then_eoi_and_a_png() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let tpi = f.vocab.tokens_per_image;
    let mut req = request(
        image_prompt(&f.vocab),
        params(5, tpi + 3, 1.0),
        RoutingMode::SinglePass,
        Default::default(),
    );
    req.preview_every = Some(4);
    let events = run(&engine, req);
    let ids = tokens(&events);
    assert_eq!(ids.len(), tpi + 3, "{ids:?}");
    assert!(
        ids[..tpi].iter().all(|&t| f.vocab.is_image_code(t)),
        "{ids:?}"
    );
    assert_eq!(ids[tpi], f.vocab.eoi.unwrap());
    assert!(
        !ids[tpi + 1..].iter().any(|&t| f.vocab.is_image_code(t)),
        "text mode after <eoi>"
    );

    let previews: Vec<usize> = events
        .iter()
        .filter_map(|e| {
            if let InferEvent::ImagePreview { codes_done, .. } = e {
                Some(*codes_done)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(previews, vec![4, 8, 12]);
    let images: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, InferEvent::Image { .. }))
        .collect();
    assert_eq!(images.len(), 1);
    if let InferEvent::Image {
        index,
        png,
        width,
        height,
    } = images[0]
    {
        assert_eq!((*index, *width, *height), (0, 16, 16));
        let decoded = image::load_from_memory(png).expect("a valid PNG");
        assert_eq!((decoded.width(), decoded.height()), (16, 16));
    }
    // The image follows its <eoi> token.
    let eoi_at = events
        .iter()
        .position(|e| matches!(e, InferEvent::Token { id, .. } if Some(*id) == f.vocab.eoi));
    let img_at = events
        .iter()
        .position(|e| matches!(e, InferEvent::Image { .. }));
    assert!(eoi_at < img_at);
    let c = completion(&events);
    assert_eq!((c.usage.image_tokens, c.usage.images), (tpi, 1));

    // Image tokens are served by the image adapter.
    for e in &events {
        if let InferEvent::Token { id, adapter, .. } = e {
            if f.vocab.is_image_code(*id) {
                assert_eq!(adapter.as_deref(), Some("image"));
            }
        }
    }
}

#[test]
fn without_a_vq_model_a_finished_image_is_an_error_naming_the_file() {
    let f = fixture();
    let engine = start(&f, config(), false);
    let tpi = f.vocab.tokens_per_image;
    let events = run(
        &engine,
        request(
            image_prompt(&f.vocab),
            params(5, tpi + 3, 1.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    let ids = tokens(&events);
    assert_eq!(ids.len(), tpi + 1, "codes and <eoi> stream first");
    match events.last() {
        Some(InferEvent::Error(msg)) => assert!(msg.contains(VQ_WEIGHTS_FILE), "{msg}"),
        other => panic!("expected an Error, got {other:?}"),
    }
    // The engine keeps serving.
    let events = run(
        &engine,
        request(
            text_prompt(&f.vocab, 4, 1),
            params(1, 3, 0.0),
            RoutingMode::Base,
            Default::default(),
        ),
    );
    completion(&events);
}

/// Guidance: the first guided code is the argmax, over the image range, of
/// uncond + s·(cond − uncond), where cond sees the prompt and uncond only
/// `<bos> <boi>` — computed here by hand with the runner.
#[test]
fn guided_image_codes_use_the_unconditional_twin() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let tpi = f.vocab.tokens_per_image;
    let prompt = image_prompt(&f.vocab);
    let mut p = params(0, tpi + 1, 0.0);
    p.cfg_scale = 3.0;
    let guided = tokens(&run(
        &engine,
        request(
            prompt.clone(),
            p.clone(),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    ));
    assert_eq!(guided.len(), tpi + 1);
    assert!(guided[..tpi].iter().all(|&t| f.vocab.is_image_code(t)));
    assert_eq!(guided[tpi], f.vocab.eoi.unwrap());
    p.cfg_scale = 1.0;
    let plain = tokens(&run(
        &engine,
        request(
            prompt.clone(),
            p,
            RoutingMode::SinglePass,
            Default::default(),
        ),
    ));
    assert_ne!(guided, plain, "guidance changed nothing");

    let mut runner = common::runner(&f.path, 8);
    let sel = runner.default_selection().unwrap();
    let uncond_prompt = vec![f.vocab.bos.unwrap(), f.vocab.boi.unwrap()];
    let mut last = vec![];
    for toks in [&prompt, &uncond_prompt] {
        let mut pool = vec![runner.new_cache().unwrap()];
        let step = SeqStep {
            tokens: toks,
            mode: RoutingMode::SinglePass,
            adapters: &sel,
            caches: &[0],
        };
        let hidden = runner.forward(&[step], &mut pool).unwrap().hidden;
        let row = hidden.narrow(0, toks.len() - 1, 1).unwrap();
        last.push(
            runner
                .decoder
                .logits(&row)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    let mut cond = last[0].clone();
    apply_cfg(&mut cond, &last[1], 3.0, &f.vocab).unwrap();
    apply_mask(
        &mut cond,
        &ModalityState::Image { emitted: 0 }.allowed_mask(&f.vocab),
    );
    assert_eq!(argmax(&cond), Some(guided[0]));
}

#[test]
fn concurrent_requests_match_each_run_alone() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let v = &f.vocab;
    let forced = AdapterRequest {
        forced: vec!["math".into()],
        ..Default::default()
    };
    let semantic = AdapterRequest {
        semantic: Some(vec!["code".into()]),
        modality: Some(BTreeMap::from([("text".to_string(), "chat".to_string())])),
        ..Default::default()
    };
    let mut guided = params(7, 20, 0.9);
    guided.cfg_scale = 2.0;
    let reqs = vec![
        request(
            text_prompt(v, 30, 0),
            params(1, 24, 0.9),
            RoutingMode::SinglePass,
            Default::default(),
        ),
        request(
            text_prompt(v, 5, 1),
            params(2, 24, 0.0),
            RoutingMode::PerModalityPass,
            Default::default(),
        ),
        request(
            text_prompt(v, 17, 2),
            params(3, 24, 1.2),
            RoutingMode::PerSequence,
            forced,
        ),
        request(
            text_prompt(v, 3, 3),
            params(4, 24, 0.7),
            RoutingMode::Base,
            Default::default(),
        ),
        request(
            image_prompt(v),
            guided,
            RoutingMode::SinglePass,
            Default::default(),
        ),
        request(
            image_prompt(v),
            params(6, 20, 1.0),
            RoutingMode::PerModalityPass,
            semantic,
        ),
    ];
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| tokens(&run(&engine, r.clone())))
        .collect();
    let mut rxs: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("submit"))
        .collect();
    let together: Vec<Vec<u32>> = rxs.iter_mut().map(|rx| tokens(&collect(rx))).collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} differs when batched");
    }
    assert!(engine.stats().last_batch_size > 1 || engine.stats().steps > 0);
}

#[test]
fn a_full_queue_is_overloaded_and_unknown_adapters_are_refused() {
    let f = fixture();
    let cfg = EngineConfig {
        max_batch_size: 1,
        max_queue: 2,
        ..config()
    };
    let engine = start(&f, cfg, true);
    let long = || {
        request(
            text_prompt(&f.vocab, 4, 0),
            params(1, 240, 1.0),
            RoutingMode::Base,
            Default::default(),
        )
    };
    let mut first = engine.submit(long()).unwrap();
    // Running once its first token arrives: the batch (size 1) is full.
    assert!(matches!(
        first.blocking_recv(),
        Some(InferEvent::Token { .. })
    ));
    let _a = engine.submit(long()).unwrap();
    let _b = engine.submit(long()).unwrap();
    assert_eq!(
        engine.submit(long()).unwrap_err(),
        SubmitError::Overloaded(2)
    );
    assert_eq!(engine.stats().queue_depth, 2);

    let unknown = AdapterRequest {
        forced: vec!["nope".into()],
        ..Default::default()
    };
    let err = engine
        .submit(request(
            vec![1, 2],
            params(1, 1, 0.0),
            RoutingMode::PerSequence,
            unknown,
        ))
        .unwrap_err();
    assert_eq!(err, SubmitError::UnknownAdapter("nope".into()));
    let bad_mode = AdapterRequest {
        modality: Some(BTreeMap::from([("audio".into(), "text".into())])),
        ..Default::default()
    };
    let err = engine
        .submit(request(
            vec![1, 2],
            params(1, 1, 0.0),
            RoutingMode::SinglePass,
            bad_mode,
        ))
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::InvalidAdapters(ref m) if m.contains("audio")),
        "{err:?}"
    );
}

#[test]
fn a_dropped_receiver_frees_its_sequence() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let req = request(
        text_prompt(&f.vocab, 4, 0),
        params(1, 240, 1.0),
        RoutingMode::SinglePass,
        Default::default(),
    );
    let mut rx = engine.submit(req).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(InferEvent::Token { .. })));
    assert_eq!(engine.stats().running, 1);
    drop(rx);
    wait_until("the sequence to be freed", || engine.stats().running == 0);
    let status = block_on(engine.adapter_command(AdapterCommand::List)).unwrap();
    let AdapterReply::Status(list) = status else {
        panic!("{status:?}")
    };
    assert!(
        list.iter().all(|a| a.in_use == 0),
        "adapters still held: {list:?}"
    );
    // Errors in the prompt come back as an Error event, not a panic.
    let long_prompt = text_prompt(&f.vocab, 300, 0);
    let events = run(
        &engine,
        request(
            long_prompt,
            params(1, 4, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    assert!(
        matches!(events.last(), Some(InferEvent::Error(m)) if m.contains("context")),
        "{events:?}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn adapter_commands_load_unload_and_refuse_bad_folders() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let list = |engine: &EngineHandle| match block_on(engine.adapter_command(AdapterCommand::List))
        .unwrap()
    {
        AdapterReply::Status(l) => l,
        other => panic!("{other:?}"),
    };
    let names: Vec<String> = list(&engine).into_iter().map(|a| a.name).collect();
    assert!(
        names.contains(&"math".to_string()) && names.contains(&"image".to_string()),
        "{names:?}"
    );
    assert!(engine
        .model_info()
        .adapters
        .iter()
        .all(|a| a.parent == "tiny"));

    // Unload, then requests naming it are refused at once; load it back.
    let reply = block_on(engine.adapter_command(AdapterCommand::Unload {
        name: "math".into(),
    }))
    .unwrap();
    assert_eq!(
        reply,
        AdapterReply::Unloaded {
            name: "math".into()
        }
    );
    assert!(!list(&engine).iter().any(|a| a.name == "math"));
    let forced = AdapterRequest {
        forced: vec!["math".into()],
        ..Default::default()
    };
    let req = request(
        text_prompt(&f.vocab, 3, 0),
        params(1, 3, 0.0),
        RoutingMode::PerSequence,
        forced,
    );
    assert_eq!(
        engine.submit(req.clone()).unwrap_err(),
        SubmitError::UnknownAdapter("math".into())
    );
    let reply = block_on(engine.adapter_command(AdapterCommand::Load {
        name: "math".into(),
    }))
    .unwrap();
    assert!(
        matches!(reply, AdapterReply::Loaded { ref name, slot } if name == "math" && slot > 0),
        "{reply:?}"
    );
    let info = list(&engine)
        .into_iter()
        .find(|a| a.name == "math")
        .unwrap();
    assert!(info.slot.is_some() && info.in_use == 0);
    completion(&run(&engine, req));

    // Bad folders: missing, outside the adapter folder, broken weights.
    let adapters = f.path.join(ADAPTERS_DIR);
    for name in ["missing", "../tiny"] {
        let err = block_on(engine.adapter_command(AdapterCommand::Load { name: name.into() }))
            .unwrap_err();
        assert!(format!("{err:#}").contains(name), "{err:#}");
    }
    copy_dir(&adapters.join("code"), &adapters.join("broken"));
    std::fs::write(
        adapters.join("broken").join("adapter_model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = block_on(engine.adapter_command(AdapterCommand::Load {
        name: "broken".into(),
    }))
    .unwrap_err();
    assert!(format!("{err:#}").contains("broken"), "{err:#}");
    assert!(!list(&engine).iter().any(|a| a.name == "broken"));

    // Unloading an adapter a running request holds is refused.
    let forced = AdapterRequest {
        forced: vec!["code".into()],
        ..Default::default()
    };
    let long = request(
        text_prompt(&f.vocab, 3, 0),
        params(1, 240, 1.0),
        RoutingMode::PerSequence,
        forced,
    );
    let mut rx = engine.submit(long).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(InferEvent::Token { .. })));
    let err = block_on(engine.adapter_command(AdapterCommand::Unload {
        name: "code".into(),
    }))
    .unwrap_err();
    assert!(format!("{err:#}").contains("in use"), "{err:#}");
    drop(rx);

    // The engine still serves.
    let events = run(
        &engine,
        request(
            text_prompt(&f.vocab, 3, 0),
            params(1, 3, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    assert_eq!(tokens(&events).len(), 3);
}
