//! Batch jobs over HTTP, in the shape of OpenAI's Batch API:
//! `POST /v1/batches` (a JSONL or JSON-array body; `?image_output=files`
//! writes pictures to the job's folder instead of base64), `GET
//! /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches/{id}/results`
//! (JSONL, one line per finished item), `POST /v1/batches/{id}/cancel`,
//! and `GET /v1/batches/{id}/images/{name}` (a picture of a `files` job).
//!
//! The store is synchronous (SQLite): every call runs on actix's blocking
//! pool, never on a worker thread.

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures::StreamExt;
use serde_json::json;

use crate::batch::execute::{check_body, is_image_file_name, IMAGES_DIR};
use crate::batch::input::{parse_input, InputError};
use crate::batch::model::{ImageOutput, NewJob};
use crate::batch::store::RESULT_PAGE;
use crate::server::error::ApiError;
use crate::server::validation::quote;
use crate::server::AppState;

/// Jobs listed by `GET /v1/batches` when no `limit` is given, and at most.
const LIST_DEFAULT: usize = 20;
const LIST_MAX: usize = 100;

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::Internal(format!("batch store task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("batch store: {e:#}")))
}

/// `key=value` pairs of the query string, each key one of `allowed`.
fn query_pairs(req: &HttpRequest, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = vec![];
    for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&k) {
            return Err(ApiError::InvalidRequest(format!(
                "unknown query parameter `{}`; expected {}",
                quote(k),
                allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Reads the body up to `limit` bytes; more is 413.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let too_large = |given: Option<usize>| {
        ApiError::BatchTooLarge(format!(
            "the batch body is larger than the limit of {limit} bytes (max_batch_bytes){}",
            given
                .map(|g| format!(". Given: {g} bytes"))
                .unwrap_or_default()
        ))
    };
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|&n| n > limit) {
        return Err(too_large(Some(n)));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::InvalidBatch(format!("cannot read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large(None));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let mut image_output = ImageOutput::Base64;
    for (_, v) in query_pairs(&req, &["image_output"])? {
        image_output = v.parse().map_err(|_| {
            ApiError::Validation(format!(
                "`image_output` must be base64 or files. Given: {:?}",
                quote(&v)
            ))
        })?;
    }
    let limits = &state.config.limits;
    let body = read_body(&req, payload, limits.max_batch_bytes).await?;
    let max_items = limits.max_batch_items;
    let st = state.clone();
    let parsed = web::block(move || {
        let info = st.engine.model_info();
        parse_input(&body, max_items, |b| check_body(&st, &info, b))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("batch parsing task failed: {e}")))?
    .map_err(|e| match e {
        InputError::TooMany { .. } => ApiError::BatchTooLarge(e.to_string()),
        other => ApiError::InvalidBatch(other.to_string()),
    })?;
    let new = NewJob {
        items: parsed.items,
        line_errors: parsed.errors,
        image_output,
        source: "http".into(),
    };
    let store = state.batches.store.clone();
    let job = blocking(move || store.create_job(&new)).await?;
    state.batches.wake.notify_one();
    tracing::info!(
        batch = %job.id,
        items = job.request_counts.total,
        refused_lines = job.errors.len(),
        "batch created"
    );
    Ok(HttpResponse::Ok().json(job))
}

pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let mut limit = LIST_DEFAULT;
    for (_, v) in query_pairs(&req, &["limit"])? {
        limit = v
            .parse()
            .ok()
            .filter(|n| (1..=LIST_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::Validation(format!(
                    "`limit` must be >= 1 and <= {LIST_MAX}. Given: {:?}",
                    quote(&v)
                ))
            })?;
    }
    let store = state.batches.store.clone();
    let jobs = blocking(move || store.list(limit)).await?;
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": jobs})))
}

pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let store = state.batches.store.clone();
    let key = id.clone();
    match blocking(move || store.get(&key)).await? {
        Some(job) => Ok(HttpResponse::Ok().json(job)),
        None => Err(ApiError::BatchNotFound(quote(&id))),
    }
}

pub async fn cancel(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let store = state.batches.store.clone();
    let key = id.clone();
    match blocking(move || store.cancel(&key)).await? {
        Some(job) => {
            tracing::info!(batch = %job.id, status = %job.status, "batch cancel requested");
            Ok(HttpResponse::Ok().json(job))
        }
        None => Err(ApiError::BatchNotFound(quote(&id))),
    }
}

/// The results as JSONL, streamed page by page in input order.
pub async fn results(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let store = state.batches.store.clone();
    let key = id.clone();
    let first = blocking(move || store.results_page(&key, None, RESULT_PAGE))
        .await?
        .ok_or_else(|| ApiError::BatchNotFound(quote(&id)))?;
    struct Cursor {
        state: web::Data<AppState>,
        id: String,
        page: Option<Vec<(usize, String)>>,
        after: Option<usize>,
    }
    let start = Cursor {
        state: state.clone(),
        id,
        page: Some(first),
        after: None,
    };
    let body = futures::stream::unfold(Some(start), |cursor| async move {
        let mut c = cursor?;
        let page = match c.page.take() {
            Some(p) => p,
            None => {
                let (store, id, after) = (c.state.batches.store.clone(), c.id.clone(), c.after);
                match blocking(move || store.results_page(&id, after, RESULT_PAGE)).await {
                    Ok(Some(p)) => p,
                    Ok(None) => vec![],
                    Err(e) => {
                        let err: actix_web::Error = e.into();
                        return Some((Err(err), None));
                    }
                }
            }
        };
        if page.is_empty() {
            return None;
        }
        let full = page.len() == RESULT_PAGE;
        c.after = page.last().map(|(i, _)| *i);
        let mut text = String::new();
        for (_, line) in page {
            text.push_str(&line);
            text.push('\n');
        }
        Some((
            Ok::<_, actix_web::Error>(Bytes::from(text)),
            full.then_some(c),
        ))
    });
    Ok(HttpResponse::Ok()
        .content_type("application/jsonl")
        .streaming(body))
}

/// A picture of a job run with `image_output=files`.
pub async fn image(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, name) = path.into_inner();
    if !is_image_file_name(&name) {
        return Err(ApiError::NotFound(format!(
            "no picture {:?}; names look like 3_0.png",
            quote(&name)
        )));
    }
    let store = state.batches.store.clone();
    let key = id.clone();
    if blocking(move || store.get(&key)).await?.is_none() {
        return Err(ApiError::BatchNotFound(quote(&id)));
    }
    let file = state.batches.job_dir(&id).join(IMAGES_DIR).join(&name);
    let png = web::block(move || std::fs::read(file))
        .await
        .map_err(|e| ApiError::Internal(format!("file task failed: {e}")))?
        .map_err(|_| ApiError::NotFound(format!("batch {id:?} has no picture {name:?}")))?;
    Ok(HttpResponse::Ok().content_type("image/png").body(png))
}
