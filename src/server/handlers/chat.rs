//! `POST /v1/chat/completions`: OpenAI's chat shape. Messages may carry
//! images as `image_url` content parts with `data:image/png;base64,` URLs;
//! the answer's content is a list of parts (text, and images as data URLs).
//!
//! `model` may be the base model's name (or absent), or an adapter's name:
//! then that adapter is forced on every token (`per_sequence`), as
//! multi-LoRA servers do, unless `routing_mode` says otherwise.
//!
//! Streaming sends OpenAI's `chat.completion.chunk` objects as `data:`
//! lines; text arrives as string deltas, a finished image as a delta whose
//! content is a one-element array of an `image_url` part; `data: [DONE]` ends it.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::{event_stream, prepare, run_to_end, sse_response};
use crate::engine::types::{AdapterRequest, InferEvent};
use crate::server::api::{ChatChoice, ChatReply, ChatRequest, ChatResponse, ChatUsage, OutputPart};
use crate::server::error::ApiError;
use crate::server::output::{b64, sse_data};
use crate::server::validation::Settings;
use crate::server::AppState;

pub async fn chat_completions(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let req = ChatRequest::from_json(body.into_inner())?;
    let model = req
        .model
        .clone()
        .unwrap_or_else(|| state.model_name.clone());
    let (routing_mode, adapters) = route_for_model(&state, &req, &model)?;
    let pieces = state.validator.parse_chat(&req.messages)?;
    let mut text = serde_json::Map::new();
    if let Some(t) = req.temperature {
        text.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        text.insert("top_p".into(), json!(p));
    }
    let mut sampling = serde_json::Map::new();
    if !text.is_empty() {
        sampling.insert("text".into(), Value::Object(text));
    }
    if let Some(seed) = req.seed {
        sampling.insert("seed".into(), json!(seed));
    }
    let sampling = Value::Object(sampling);
    let settings = Settings {
        max_tokens: req.max_tokens,
        sampling: Some(&sampling),
        routing_mode: routing_mode.as_deref(),
        adapters: adapters.as_ref(),
    };
    let valid = prepare(&state, pieces, &settings).await?;
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if req.stream {
        let mode = valid.mode.as_str();
        let submitted = Instant::now();
        let prompt_tokens = valid.prompt.len();
        let rx = state.engine.submit(valid)?;
        let mut chunks = ChunkWriter {
            id,
            created,
            model,
            prompt_tokens,
            started: false,
        };
        let frames = event_stream(state.clone(), "chat", mode, rx, submitted, move |ev| {
            chunks.frames(ev)
        });
        return Ok(sse_response(frames));
    }
    let prompt_tokens = valid.prompt.len();
    let out = run_to_end(&state, "chat", valid).await?;
    let completion_tokens = out.completion.usage.text_tokens + out.completion.usage.image_tokens;
    Ok(HttpResponse::Ok().json(ChatResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatReply {
                role: "assistant".into(),
                content: out.parts.iter().map(OutputPart::to_chat).collect(),
            },
            finish_reason: out.completion.finish_reason,
        }],
        usage: ChatUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    }))
}

/// The routing a `model` name implies: the base model keeps the request's
/// routing; an adapter's name forces that adapter; anything else is 404.
fn route_for_model(
    state: &AppState,
    req: &ChatRequest,
    model: &str,
) -> Result<(Option<String>, Option<AdapterRequest>), ApiError> {
    if model == state.model_name {
        return Ok((req.routing_mode.clone(), req.adapters.clone()));
    }
    let info = state.engine.model_info();
    if !info.adapters.iter().any(|a| a.name == model) {
        return Err(ApiError::ModelNotFound(model.to_string()));
    }
    let mode = req
        .routing_mode
        .clone()
        .or_else(|| Some("per_sequence".into()));
    let mut adapters = req.adapters.clone().unwrap_or_default();
    if mode.as_deref() == Some("per_sequence") && adapters.forced.is_empty() {
        adapters.forced = vec![model.to_string()];
    }
    Ok((mode, Some(adapters)))
}

/// OpenAI chunk stream state.
struct ChunkWriter {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    started: bool,
}

impl ChunkWriter {
    fn chunk(&self, delta: Value, finish_reason: Value) -> actix_web::web::Bytes {
        let c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        sse_data(&c.to_string())
    }

    fn frames(&mut self, ev: &InferEvent) -> Vec<actix_web::web::Bytes> {
        let mut out = vec![];
        if !self.started {
            self.started = true;
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        }
        match ev {
            InferEvent::TextDelta(t) => out.push(self.chunk(json!({"content": t}), Value::Null)),
            InferEvent::Image { png, .. } => out.push(self.chunk(
                json!({"content": [{"type": "image_url",
                                    "image_url": {"url": format!("data:image/png;base64,{}", b64(png))}}]}),
                Value::Null,
            )),
            InferEvent::End(c) => {
                let completion = c.usage.text_tokens + c.usage.image_tokens;
                out.push(self.chunk(json!({}), json!(c.finish_reason)));
                let usage = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [],
                    "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                              "total_tokens": self.prompt_tokens + completion},
                });
                out.push(sse_data(&usage.to_string()));
                out.push(sse_data("[DONE]"));
            }
            InferEvent::Error(msg) => {
                let body = ApiError::Generation(msg.clone()).body();
                out.push(sse_data(&json!({"error": {"message": body.error, "type": body.kind}}).to_string()));
                out.push(sse_data("[DONE]"));
            }
            InferEvent::Token { .. } | InferEvent::ImagePreview { .. } => {}
        }
        out
    }
}
