//! `GET /health`, `GET /metrics`, `GET /v1/models`, and the JSON answers
//! for unknown routes and methods.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::server::error::ApiError;
use crate::server::AppState;

pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let stats = state.engine.stats();
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "model": state.model_name,
        "queue_depth": stats.queue_depth,
        "running": stats.running,
    }))
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let text = state.metrics.render(&state.engine.stats());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}

/// The base model and every adapter, each adapter with `parent` = the base.
pub async fn models(state: web::Data<AppState>) -> HttpResponse {
    let info = state.engine.model_info();
    let mut data = vec![json!({
        "id": state.model_name,
        "object": "model",
        "owned_by": "molora",
        "parent": null,
        "kind": "base",
        "info": info,
    })];
    for a in &info.adapters {
        data.push(json!({
            "id": a.name,
            "object": "model",
            "owned_by": "molora",
            "parent": state.model_name,
            "kind": "adapter",
            "role": a.role,
        }));
    }
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

pub async fn method_not_allowed(req: HttpRequest) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} {}", req.method(), req.path()))
}
