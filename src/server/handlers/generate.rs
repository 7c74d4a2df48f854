//! `POST /v1/generate`: one prompt (text and images) -> ordered text and
//! image parts, as one JSON answer or as server-sent events (`stream: true`;
//! event names in `output.rs`).

use std::time::Instant;

use actix_web::{web, HttpResponse};

use super::{event_stream, prepare, run_to_end, sse_response};
use crate::server::api::{GenerateRequest, GenerateResponse};
use crate::server::error::ApiError;
use crate::server::output::GenerateSse;
use crate::server::validation::Settings;
use crate::server::AppState;

pub async fn generate(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let req = GenerateRequest::from_json(body.into_inner())?;
    let pieces = state.validator.parse_prompt_as(&req.prompt, req.raw)?;
    let settings = Settings {
        max_tokens: req.max_tokens,
        sampling: req.sampling.as_ref(),
        routing_mode: req.routing_mode.as_deref(),
        adapters: req.adapters.as_ref(),
    };
    let valid = prepare(&state, pieces, &settings).await?;
    if req.stream {
        let mode = valid.mode.as_str();
        let submitted = Instant::now();
        let rx = state.engine.submit(valid)?;
        let mut sse = GenerateSse::default();
        let frames = event_stream(state.clone(), "generate", mode, rx, submitted, move |ev| {
            vec![sse.frame(ev)]
        });
        return Ok(sse_response(frames));
    }
    let out = run_to_end(&state, "generate", valid).await?;
    Ok(HttpResponse::Ok().json(GenerateResponse {
        parts: out.parts,
        finish_reason: out.completion.finish_reason,
        usage: out.completion.usage,
        routing: out.completion.routing,
        tokens: req.return_tokens.then_some(out.tokens),
    }))
}
