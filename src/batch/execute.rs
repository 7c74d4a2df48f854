//! One item, from its stored `/v1/generate` body to an [`ItemOutcome`]:
//! the same validation, engine and answer shape as `POST /v1/generate`,
//! at batch priority.
//!
//! Invariants: an item that fails on its own (bad prompt, generation
//! error) becomes a `Failed` outcome with the status and `{error, type}`
//! that `/v1/generate` would answer; only conditions of the server (a full
//! engine queue, a stopped engine) are [`NotNow`], and the item is given
//! back to run later. Picture files are written (temp file, then rename)
//! before the outcome is recorded, so a recorded result never names a
//! missing file; a rerun after a crash rewrites the same names.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::model::{ClaimedItem, ImageOutput, ItemOutcome};
use crate::engine::handle::ModelInfo;
use crate::engine::types::{Priority, SubmitError};
use crate::server::api::{GenerateRequest, GenerateResponse, OutputPart};
use crate::server::error::ApiError;
use crate::server::metrics::GenerationTimes;
use crate::server::output::collect;
use crate::server::validation::Settings;
use crate::server::AppState;

/// The folder (inside a job's folder) that holds its pictures.
pub const IMAGES_DIR: &str = "images";

/// The server cannot take the item now; give it back.
#[derive(Debug, Clone, PartialEq)]
pub enum NotNow {
    /// The engine's queue is full: retry shortly.
    Busy,
    /// The engine has stopped: the runner stops too.
    Stopped,
}

fn settings(req: &GenerateRequest) -> Settings<'_> {
    Settings {
        max_tokens: req.max_tokens,
        sampling: req.sampling.as_ref(),
        routing_mode: req.routing_mode.as_deref(),
        adapters: req.adapters.as_ref(),
    }
}

/// The cheap checks of a `/v1/generate` body, run on every line at
/// submission so that a bad line is refused with its line number instead
/// of failing later: field shapes, prompt shape, routing mode, adapters,
/// sampling values. Tokenizing and image encoding wait for the run.
pub fn check_body(state: &AppState, info: &ModelInfo, body: &Value) -> Result<(), String> {
    let req = GenerateRequest::from_json(body.clone()).map_err(|e| e.to_string())?;
    if req.stream {
        return Err("`stream` cannot be true in a batch: results are collected".into());
    }
    let v = &state.validator;
    v.parse_prompt_as(&req.prompt, req.raw)
        .map_err(|e| e.to_string())?;
    let s = settings(&req);
    let (mode, adapters) = v.routing(&s).map_err(|e| e.to_string())?;
    v.params(0, &s).map_err(|e| e.to_string())?;
    info.check_adapters(&adapters, mode)
        .map_err(|e| ApiError::from(e).to_string())
}

fn failed(e: ApiError) -> ItemOutcome {
    ItemOutcome::Failed {
        status_code: e.status().as_u16(),
        kind: e.kind().to_string(),
        message: e.to_string(),
    }
}

/// Runs one claimed item to its outcome. `job_dir` is where `images/` goes.
pub async fn run_item(
    state: &Arc<AppState>,
    item: &ClaimedItem,
    job_dir: &Path,
) -> Result<ItemOutcome, NotNow> {
    match generate(state, item, job_dir).await {
        Ok(body) => Ok(ItemOutcome::Completed { body }),
        Err(Attempt::NotNow(n)) => Err(n),
        Err(Attempt::Failed(e)) => Ok(failed(e)),
    }
}

enum Attempt {
    NotNow(NotNow),
    Failed(ApiError),
}

impl From<ApiError> for Attempt {
    fn from(e: ApiError) -> Self {
        Attempt::Failed(e)
    }
}

async fn generate(
    state: &Arc<AppState>,
    item: &ClaimedItem,
    job_dir: &Path,
) -> Result<Value, Attempt> {
    let req = GenerateRequest::from_json(item.body.clone())?;
    let pieces = state.validator.parse_prompt_as(&req.prompt, req.raw)?;
    let s = settings(&req);
    state.validator.routing(&s)?;
    state.validator.params(0, &s)?;
    let st = state.clone();
    let prompt = tokio::task::spawn_blocking(move || st.validator.encode(&pieces))
        .await
        .map_err(|e| ApiError::Internal(format!("prompt encoding task failed: {e}")))??;
    let mut valid = state.validator.finish(prompt, &s)?;
    valid.priority = Priority::Batch;
    // Previews are for streams; nobody watches a batch item.
    valid.preview_every = None;
    let mode = valid.mode.as_str();
    let submitted = Instant::now();
    let _in_engine = state.batches.enter_engine();
    let rx = match state.engine.submit(valid) {
        Ok(rx) => rx,
        Err(SubmitError::Overloaded(_)) => return Err(Attempt::NotNow(NotNow::Busy)),
        Err(SubmitError::Stopped) => return Err(Attempt::NotNow(NotNow::Stopped)),
        Err(e) => return Err(ApiError::from(e).into()),
    };
    let out = collect(rx, submitted).await?;
    // Time to first token is an interactive figure: batch items stay out of it.
    state.metrics.observe_generation(
        "batch",
        &GenerationTimes {
            mode,
            wall: out.wall,
            first_token: None,
            queue_ms: out.completion.routing.queue_ms,
            forward_ms: out.completion.routing.forward_ms,
            images: out.completion.usage.images,
        },
    );
    let response = GenerateResponse {
        parts: out.parts,
        finish_reason: out.completion.finish_reason,
        usage: out.completion.usage,
        routing: out.completion.routing,
        tokens: req.return_tokens.then_some(out.tokens),
    };
    let mut body = serde_json::to_value(&response)
        .map_err(|e| ApiError::Internal(format!("cannot serialise the answer: {e}")))?;
    if item.image_output == ImageOutput::Files {
        write_images(&mut body, &response.parts, item.index, job_dir)?;
    }
    Ok(body)
}

/// Writes each picture to `images/<item>_<n>.png` and replaces its
/// `png_base64` with the relative `file` path.
fn write_images(
    body: &mut Value,
    parts: &[OutputPart],
    index: usize,
    job_dir: &Path,
) -> Result<(), ApiError> {
    use base64::Engine as _;
    let dir = job_dir.join(IMAGES_DIR);
    let mut n = 0;
    for (i, part) in parts.iter().enumerate() {
        let OutputPart::Image { png_base64, .. } = part else {
            continue;
        };
        let png = base64::engine::general_purpose::STANDARD
            .decode(png_base64)
            .map_err(|e| ApiError::Internal(format!("picture {n} of item {index}: {e}")))?;
        let name = image_file_name(index, n);
        let io = |e: std::io::Error| {
            ApiError::Internal(format!(
                "{}: cannot write picture: {e}",
                dir.join(&name).display()
            ))
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &png).map_err(io)?;
        std::fs::rename(&tmp, dir.join(&name)).map_err(io)?;
        if let Some(obj) = body["parts"][i].as_object_mut() {
            obj.remove("png_base64");
            obj.insert("file".into(), Value::String(format!("{IMAGES_DIR}/{name}")));
        }
        n += 1;
    }
    Ok(())
}

/// `<item index>_<picture index>.png`: no user text reaches a file name.
pub fn image_file_name(index: usize, n: usize) -> String {
    format!("{index}_{n}.png")
}

/// Whether `name` is a picture name this module writes (guards the file
/// route against paths).
pub fn is_image_file_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".png") else {
        return false;
    };
    let mut halves = stem.split('_');
    let digits =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    digits(halves.next()) && digits(halves.next()) && halves.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_picture_names_pass() {
        assert!(is_image_file_name(&image_file_name(12, 0)));
        for bad in [
            "../x.png",
            "1_2",
            "1_2.png/..",
            "a_1.png",
            "1_2_3.png",
            "_1.png",
            "1_.png",
        ] {
            assert!(!is_image_file_name(bad), "{bad}");
        }
    }
}
