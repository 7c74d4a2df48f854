//! HTTP handlers, one file per area. Each handler validates (cheap checks
//! first), submits to the engine and turns its event stream into JSON or
//! server-sent events; none touches a tensor.

pub mod adapters;
pub mod batches;
pub mod chat;
pub mod compare;
pub mod generate;
pub mod ops;

use std::time::Instant;

use actix_web::web::{self, Bytes};
use actix_web::HttpResponse;
use futures::Stream;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::metrics::GenerationTimes;
use super::output::{collect, Collected};
use super::validation::{PromptPiece, Settings};
use super::AppState;
use crate::engine::types::{InferEvent, ValidRequest};

/// Validates settings, encodes the prompt on a blocking thread, and builds
/// the engine request. Cheap checks (mode, adapters, sampling fields) run
/// before the prompt's images are decoded and encoded.
pub async fn prepare(
    state: &web::Data<AppState>,
    pieces: Vec<PromptPiece>,
    settings: &Settings<'_>,
) -> Result<ValidRequest, ApiError> {
    let v = &state.validator;
    v.routing(settings)?;
    v.params(0, settings)?;
    let st = state.clone();
    let prompt = web::block(move || st.validator.encode(&pieces))
        .await
        .map_err(|e| ApiError::Internal(format!("prompt encoding task failed: {e}")))??;
    v.finish(prompt, settings)
}

/// Submits and waits for the whole answer; records the request's metrics.
pub async fn run_to_end(
    state: &web::Data<AppState>,
    endpoint: &str,
    req: ValidRequest,
) -> Result<Collected, ApiError> {
    let mode = req.mode.as_str();
    let submitted = Instant::now();
    let rx = state.engine.submit(req)?;
    let out = collect(rx, submitted).await?;
    state.metrics.observe_generation(
        endpoint,
        &GenerationTimes {
            mode,
            wall: out.wall,
            first_token: out.first_token,
            queue_ms: out.completion.routing.queue_ms,
            forward_ms: out.completion.routing.forward_ms,
            images: out.completion.usage.images,
        },
    );
    Ok(out)
}

/// A server-sent-events response over `frames`.
pub fn sse_response(
    frames: impl Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(frames)
}

/// Turns the engine's events into SSE frames with `encode` (which may
/// return no frame for an event), recording latency metrics on the way. The stream owns the receiver: a client that disconnects drops
/// the stream, hence the receiver, and the engine frees the sequence at its
/// next step.
pub fn event_stream<E>(
    state: web::Data<AppState>,
    endpoint: &'static str,
    mode: &'static str,
    rx: UnboundedReceiver<InferEvent>,
    submitted: Instant,
    encode: E,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> + 'static
where
    E: FnMut(&InferEvent) -> Vec<Bytes> + 'static,
{
    struct Open<E> {
        state: web::Data<AppState>,
        rx: UnboundedReceiver<InferEvent>,
        first_token: Option<std::time::Duration>,
        encode: E,
    }
    let open = Open {
        state,
        rx,
        first_token: None,
        encode,
    };
    futures::stream::unfold(Some(open), move |open| async move {
        let mut s = open?;
        loop {
            let event = s.rx.recv().await.unwrap_or_else(|| {
                InferEvent::Error("the engine ended the request without an answer".into())
            });
            let last = matches!(event, InferEvent::End(_) | InferEvent::Error(_));
            match &event {
                InferEvent::Token { .. } => {
                    s.first_token.get_or_insert_with(|| submitted.elapsed());
                }
                InferEvent::End(c) => s.state.metrics.observe_generation(
                    endpoint,
                    &GenerationTimes {
                        mode,
                        wall: submitted.elapsed(),
                        first_token: s.first_token,
                        queue_ms: c.routing.queue_ms,
                        forward_ms: c.routing.forward_ms,
                        images: c.usage.images,
                    },
                ),
                _ => {}
            }
            let frames = (s.encode)(&event);
            if frames.is_empty() {
                if last {
                    return None;
                }
                continue;
            }
            let bytes = Bytes::from(frames.concat());
            return Some((Ok(bytes), (!last).then_some(s)));
        }
    })
}
