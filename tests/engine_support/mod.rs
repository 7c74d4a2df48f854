//! Shared helpers of the engine integration tests: a tiny random model,
//! a random VQ decoder for it, request builders and event collection.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use molora::engine::params::{GenerationParams, SamplingParams};
use molora::engine::{
    AdapterRequest, Completion, Engine, EngineConfig, EngineHandle, InferEvent, Priority,
    ValidRequest,
};
use molora::model::config::{Config, VocabLayout};
use molora::model::vq::{VqConfig, VqModel};
use molora::routing::mode::RoutingMode;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::common;

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    pub vocab: VocabLayout,
    pub tokenizer: Tokenizer,
}

pub fn fixture() -> Fixture {
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
pub fn tiny_vq(vocab: &VocabLayout) -> VqModel {
    let cfg: VqConfig = serde_json::from_value(serde_json::json!({
        "embed_dim": 4, "n_embed": vocab.image_range().len(), "z_channels": 4, "resolution": 16,
        "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_type": "none"
    }))
    .unwrap();
    assert_eq!(cfg.tokens_per_image(), vocab.tokens_per_image);
    let vm = VarMap::new();
    VqModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).expect("tiny vq")
}

pub fn start(f: &Fixture, cfg: EngineConfig, with_vq: bool) -> EngineHandle {
    let runner = common::runner(&f.path, 8);
    let vq = with_vq.then(|| tiny_vq(&f.vocab));
    Engine::start(runner, f.tokenizer.clone(), vq, cfg)
}

pub fn config() -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_queue: 16,
        max_batch_tokens: 24,
        max_context: 256,
    }
}

pub fn params(seed: u64, max_tokens: usize, temperature: f32) -> GenerationParams {
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

pub fn request(
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
pub fn text_prompt(v: &VocabLayout, n: usize, offset: u32) -> Vec<u32> {
    let text = v.text_range();
    let mut p = vec![v.bos.unwrap()];
    p.extend((0..n as u32).map(|i| text.start + 7 + (offset + i * 13) % (text.len() as u32 - 20)));
    p
}

/// Every event up to and including End or Error.
pub fn collect(rx: &mut UnboundedReceiver<InferEvent>) -> Vec<InferEvent> {
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

pub fn tokens(events: &[InferEvent]) -> Vec<u32> {
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

pub fn completion(events: &[InferEvent]) -> &Completion {
    match events.last() {
        Some(InferEvent::End(c)) => c,
        other => panic!("expected End, got {other:?}"),
    }
}

pub fn run(engine: &EngineHandle, req: ValidRequest) -> Vec<InferEvent> {
    let mut rx = engine.submit(req).expect("submit");
    collect(&mut rx)
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn image_prompt(v: &VocabLayout) -> Vec<u32> {
    let mut p = text_prompt(v, 5, 3);
    p.push(v.boi.unwrap());
    p
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
