//! `POST /v1/compare`: one prompt and one seed, run in single_pass and
//! per_modality_pass (and per_sequence with forced adapters when asked).
//!
//! The runs go to the engine one after another, each submitted when the one
//! before has ended, so no two runs of a comparison share an engine step:
//! each run's wall time, forward time, passes and token rows are its own
//! (other clients' requests may still share its steps). `identical` says
//! whether single_pass and per_modality_pass produced the same tokens.

use actix_web::{web, HttpResponse};
use serde_json::Value;

use super::{prepare, run_to_end};
use crate::engine::types::{AdapterRequest, ValidRequest};
use crate::routing::mode::RoutingMode;
use crate::server::api::{CompareRequest, CompareResponse, CompareRun};
use crate::server::error::ApiError;
use crate::server::validation::Settings;
use crate::server::AppState;

pub async fn compare(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let req = CompareRequest::from_json(body.into_inner())?;
    let pieces = state.validator.parse_prompt_as(&req.prompt, req.raw)?;
    let mut sampling = match req.sampling.clone() {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "`sampling` must be an object".into(),
            ))
        }
    };
    // One seed for every run: the request's, the sampling object's, or a fresh one.
    let seed = match (req.seed, sampling.get("seed")) {
        (Some(s), _) => s,
        (None, Some(v)) => serde_json::from_value(v.clone())
            .map_err(|e| ApiError::InvalidRequest(format!("`sampling.seed`: {e}")))?,
        (None, None) => rand::random(),
    };
    sampling.insert("seed".into(), seed.into());
    let sampling = Value::Object(sampling);
    let base = Settings {
        max_tokens: req.max_tokens,
        sampling: Some(&sampling),
        routing_mode: Some("single_pass"),
        adapters: req.adapters.as_ref(),
    };
    let single = prepare(&state, pieces, &base).await?;
    let mut runs = vec![
        single.clone(),
        with_mode(&single, RoutingMode::PerModalityPass, None),
    ];
    if let Some(forced) = &req.per_sequence {
        let adapters = AdapterRequest {
            forced: forced.clone(),
            ..single.adapters.clone()
        };
        state
            .validator
            .check_adapters(RoutingMode::PerSequence, &adapters)?;
        runs.push(with_mode(&single, RoutingMode::PerSequence, Some(adapters)));
    }
    let mut outputs = Vec::with_capacity(runs.len());
    for r in runs {
        let mode = r.mode;
        outputs.push((mode, run_to_end(&state, "compare", r).await?));
    }
    let runs: Vec<CompareRun> = outputs
        .into_iter()
        .map(|(mode, out)| CompareRun {
            mode: mode.to_string(),
            parts: out.parts,
            finish_reason: out.completion.finish_reason,
            usage: out.completion.usage,
            routing: out.completion.routing,
            wall_ms: out.wall.as_secs_f64() * 1e3,
            token_ids: out.tokens.iter().map(|t| t.id).collect(),
        })
        .collect();
    let identical = runs[0].token_ids == runs[1].token_ids;
    let work_ratio = ratio(
        runs[1].routing.token_rows as f64,
        runs[0].routing.token_rows as f64,
    );
    let time_ratio = ratio(runs[1].wall_ms, runs[0].wall_ms);
    Ok(HttpResponse::Ok().json(CompareResponse {
        seed,
        runs,
        identical,
        work_ratio,
        time_ratio,
    }))
}

fn with_mode(
    base: &ValidRequest,
    mode: RoutingMode,
    adapters: Option<AdapterRequest>,
) -> ValidRequest {
    let mut r = base.clone();
    r.mode = mode;
    if let Some(a) = adapters {
        r.adapters = a;
    }
    r
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}
