//! `GET /v1/adapters` (hot-set status), `POST /v1/adapters {name}` (load
//! from the configured adapter folder), `DELETE /v1/adapters/{name}`.
//! Admin-only when an admin key is configured.
//!
//! Names are checked before the engine sees them: a name is one path
//! component of `[A-Za-z0-9_.-]` (no `..`, no separators), so a load can only
//! read inside the adapter folder.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::engine::{AdapterCommand, AdapterReply};
use crate::server::api::LoadAdapterRequest;
use crate::server::error::ApiError;
use crate::server::validation::quote;
use crate::server::AppState;

const MAX_NAME_CHARS: usize = 64;

pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    state.require_admin(&req)?;
    let adapters = status(&state).await?;
    let hot = state.config.hot_set;
    Ok(HttpResponse::Ok().json(json!({
        "adapters": adapters,
        "hot_set": {"capacity": hot.capacity, "max_rank": hot.max_rank},
        "adapter_dir": state.config.adapter_dir(),
    })))
}

pub async fn load(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    state.require_admin(&req)?;
    let name = LoadAdapterRequest::from_json(body.into_inner())?.name;
    check_name(&name)?;
    let dir = state.config.adapter_dir().join(&name);
    if !dir.is_dir() {
        return Err(ApiError::AdapterNotFound(format!(
            "adapter {name:?} not found: no folder {} in the adapter folder",
            dir.display()
        )));
    }
    match state
        .engine
        .adapter_command(AdapterCommand::Load { name: name.clone() })
        .await
    {
        Ok(AdapterReply::Loaded { name, slot }) => {
            Ok(HttpResponse::Ok().json(json!({"loaded": name, "slot": slot})))
        }
        Ok(other) => Err(ApiError::Internal(format!(
            "the engine answered a load with {other:?}"
        ))),
        Err(e) => Err(ApiError::AdapterRefused(format!(
            "adapter {name:?} was not loaded: {e:#}"
        ))),
    }
}

pub async fn unload(
    state: web::Data<AppState>,
    req: HttpRequest,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.require_admin(&req)?;
    let name = name.into_inner();
    check_name(&name)?;
    if !status(&state).await?.iter().any(|a| a.name == name) {
        return Err(ApiError::AdapterNotFound(format!(
            "adapter {name:?} is not registered; see GET /v1/adapters"
        )));
    }
    match state
        .engine
        .adapter_command(AdapterCommand::Unload { name: name.clone() })
        .await
    {
        Ok(AdapterReply::Unloaded { name }) => {
            Ok(HttpResponse::Ok().json(json!({"unloaded": name})))
        }
        Ok(other) => Err(ApiError::Internal(format!(
            "the engine answered an unload with {other:?}"
        ))),
        Err(e) => Err(ApiError::AdapterRefused(format!(
            "adapter {name:?} was not unloaded: {e:#}"
        ))),
    }
}

async fn status(state: &AppState) -> Result<Vec<crate::engine::AdapterInfo>, ApiError> {
    match state.engine.adapter_command(AdapterCommand::List).await {
        Ok(AdapterReply::Status(list)) => Ok(list),
        Ok(other) => Err(ApiError::Internal(format!(
            "the engine answered a listing with {other:?}"
        ))),
        Err(e) => Err(ApiError::Internal(format!("cannot list adapters: {e:#}"))),
    }
}

/// One safe path component.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Validation(format!(
            "`name` must be 1 to {MAX_NAME_CHARS} characters of A-Z, a-z, 0-9, '_', '-', '.' and not start with '.'. Given: {:?}",
            quote(name)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn names_cannot_leave_the_adapter_folder() {
        for bad in ["", "..", "../x", "a/b", ".hidden", "a\\b", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["math", "text-v2", "img_lora.1"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }
}
