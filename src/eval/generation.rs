//! Generation through the engine's real path: requests are submitted to an
//! [`EngineHandle`] (continuous batching, modality state machine, sampler)
//! and their Token events collected; then cut into text and image runs and
//! the image runs decoded by the VQ model, as the server does.
//!
//! Invariants:
//! - every request is submitted before any is awaited, so the engine batches
//!   them as it would concurrent clients;
//! - a request that fails (refused or an engine error) yields `Err` with the
//!   reason for that item only; the others are unaffected.

use anyhow::{anyhow, Result};
use image::RgbImage;

use super::model::{at_checker_size, EvalModel};
use crate::engine::params::{GenerationParams, Limits, SamplingParams};
use crate::engine::{AdapterRequest, EngineHandle, InferEvent, Priority, ValidRequest};
use crate::routing::mode::RoutingMode;
use crate::train::data::encode::GeneratedRun;
use crate::train::data::scoring::Produced;

/// One prompt to continue.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub adapters: AdapterRequest,
    pub max_tokens: usize,
}

/// How tokens are drawn: greedy text; images greedy unless a temperature is
/// given (then top-k 100, the service's default for image codes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoding {
    pub image_temperature: f32,
    /// Classifier-free guidance of image codes (1 = off).
    pub cfg_scale: f32,
    pub seed: u64,
}

impl Decoding {
    fn params(&self, max_tokens: usize, index: usize) -> GenerationParams {
        let image = if self.image_temperature > 0.0 {
            SamplingParams {
                temperature: self.image_temperature,
                ..SamplingParams::image_default()
            }
        } else {
            SamplingParams::greedy()
        };
        GenerationParams {
            max_tokens,
            text: SamplingParams::greedy(),
            image,
            cfg_scale: self.cfg_scale,
            seed: self.seed.wrapping_add(index as u64),
            stop_at_eos: true,
        }
    }
}

/// Generates a continuation of every request in `mode`; returns the
/// generated ids (or the reason it failed) per request, in order.
pub fn generate(
    engine: &EngineHandle,
    requests: &[GenRequest],
    mode: RoutingMode,
    decoding: Decoding,
) -> Result<Vec<Result<Vec<u32>, String>>> {
    let mut streams = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        let params = decoding.params(r.max_tokens, i);
        params
            .validate(&Limits::default())
            .map_err(|e| anyhow!("eval generation parameters: {e}"))?;
        let req = ValidRequest {
            prompt: r.prompt.clone(),
            params,
            mode,
            adapters: r.adapters.clone(),
            priority: Priority::Batch,
            preview_every: None,
        };
        streams.push(engine.submit(req).map_err(|e| e.to_string()));
    }
    let mut out = Vec::with_capacity(streams.len());
    for stream in streams {
        out.push(stream.and_then(|mut rx| {
            let mut ids = Vec::new();
            loop {
                match rx.blocking_recv() {
                    Some(InferEvent::Token { id, .. }) => ids.push(id),
                    Some(InferEvent::End(_)) => return Ok(ids),
                    Some(InferEvent::Error(e)) => return Err(e),
                    Some(_) => {}
                    None => return Err("the engine dropped the request".into()),
                }
            }
        }));
    }
    Ok(out)
}

/// Generated ids as scored runs: text decoded, each complete image decoded
/// by the VQ model (an incomplete one, or one without a VQ model, becomes an
/// empty picture that fails every attribute).
pub fn produced(model: &EvalModel, ids: &[u32]) -> Result<Vec<Produced>> {
    let runs = model.encoder().split_generated(ids)?;
    let tpi = model.tokens_per_image();
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        out.push(match run {
            GeneratedRun::Text(t) => Produced::Text(t),
            GeneratedRun::Codes(c) if c.len() == tpi && model.vq.is_some() => {
                let img = model.decode_images(std::slice::from_ref(&c))?.remove(0);
                Produced::Image(at_checker_size(img))
            }
            GeneratedRun::Codes(_) => Produced::Image(RgbImage::new(0, 0)),
        });
    }
    Ok(out)
}
