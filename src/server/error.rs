//! Every error the HTTP layer can answer with, and the one table that maps
//! each to a status code and a stable short name (the `type` field of the
//! JSON body and the `type` label of `molora_errors_total`).
//!
//! Invariants: user errors are 4xx (400 malformed JSON, 401, 404, 413, 415,
//! 422 invalid values, 429 full queue); 424 is a generation that failed
//! inside the engine and 500/503 are the server's own faults, never the
//! answer to bad input. Messages name the field, the limit and the value
//! given. The body is always `{"error": message, "type": short_name}`.

use actix_web::error::{JsonPayloadError, PayloadError};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

use crate::engine::types::SubmitError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all (syntax error, truncated).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// JSON of the wrong shape: a wrong field type, a missing field, an unknown field.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A value outside its bounds ("`max_tokens` must be >= 1 and <= 512. Given: 900").
    #[error("{0}")]
    Validation(String),
    #[error("`prompt` must not be empty")]
    EmptyPrompt,
    #[error("{0}")]
    PromptTooLong(String),
    #[error("unknown routing mode {0:?}; expected one of single_pass, per_modality_pass, per_sequence, base")]
    UnknownMode(String),
    #[error("unknown adapter {0:?}; see GET /v1/models for the adapters this server has")]
    UnknownAdapter(String),
    #[error("{0}")]
    InvalidAdapters(String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    ImagesUnsupported(String),
    #[error("the request body is larger than the limit of {limit} bytes{}", given.map(|g| format!(". Given: {g} bytes")).unwrap_or_default())]
    PayloadTooLarge { limit: usize, given: Option<usize> },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("missing or wrong admin key: send `Authorization: Bearer <admin_key>`")]
    Unauthorized,
    #[error("the model {0:?} is not served here; see GET /v1/models")]
    ModelNotFound(String),
    #[error("{0}")]
    AdapterNotFound(String),
    #[error("{0}")]
    AdapterRefused(String),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Overloaded(String),
    /// A batch with more items (or bytes) than the configured limit.
    #[error("{0}")]
    BatchTooLarge(String),
    /// A batch body that cannot be read as lines at all (empty, not UTF-8, a broken array).
    #[error("{0}")]
    InvalidBatch(String),
    #[error("no batch {0:?}; see GET /v1/batches")]
    BatchNotFound(String),
    /// The engine started the request and then failed it.
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("the engine has stopped")]
    Unavailable,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The table: status and stable short name of each error.
impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MalformedJson(_) => StatusCode::BAD_REQUEST,
            InvalidRequest(_) | Validation(_) | EmptyPrompt | PromptTooLong(_) | UnknownMode(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            UnknownAdapter(_) | InvalidAdapters(_) | InvalidImage(_) | ImagesUnsupported(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AdapterRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            PayloadTooLarge { .. } | BatchTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            InvalidBatch(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BatchNotFound(_) => StatusCode::NOT_FOUND,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Unauthorized => StatusCode::UNAUTHORIZED,
            ModelNotFound(_) | AdapterNotFound(_) | NotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Generation(_) => StatusCode::FAILED_DEPENDENCY,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn kind(&self) -> &'static str {
        use ApiError::*;
        match self {
            MalformedJson(_) => "malformed_json",
            InvalidRequest(_) => "invalid_request",
            Validation(_) => "validation",
            EmptyPrompt => "empty_prompt",
            PromptTooLong(_) => "prompt_too_long",
            UnknownMode(_) => "unknown_routing_mode",
            UnknownAdapter(_) => "unknown_adapter",
            InvalidAdapters(_) => "invalid_adapters",
            InvalidImage(_) => "invalid_image",
            ImagesUnsupported(_) => "images_unsupported",
            PayloadTooLarge { .. } => "payload_too_large",
            UnsupportedMediaType(_) => "unsupported_media_type",
            Unauthorized => "unauthorized",
            ModelNotFound(_) => "model_not_found",
            AdapterNotFound(_) => "adapter_not_found",
            AdapterRefused(_) => "adapter_refused",
            NotFound(_) => "not_found",
            MethodNotAllowed(_) => "method_not_allowed",
            Overloaded(_) => "overloaded",
            BatchTooLarge(_) => "batch_too_large",
            InvalidBatch(_) => "invalid_batch",
            BatchNotFound(_) => "batch_not_found",
            Generation(_) => "generation",
            Unavailable => "unavailable",
            Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            kind: self.kind(),
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        if self.status().is_server_error() {
            tracing::error!(kind = self.kind(), "{self}");
        } else {
            tracing::debug!(kind = self.kind(), "{self}");
        }
        let mut res = HttpResponse::build(self.status()).json(self.body());
        res.extensions_mut()
            .insert(crate::server::metrics::ErrorKind(self.kind()));
        res
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded(_) => ApiError::Overloaded(e.to_string()),
            SubmitError::UnknownAdapter(name) => ApiError::UnknownAdapter(name),
            SubmitError::InvalidAdapters(msg) => ApiError::InvalidAdapters(msg),
            SubmitError::Stopped => ApiError::Unavailable,
        }
    }
}

/// A serde error in a request body: syntax problems are 400, shape problems 422.
pub fn from_serde(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::MalformedJson(e.to_string()),
        Category::Data => ApiError::InvalidRequest(e.to_string()),
    }
}

fn from_payload(e: &PayloadError, limit: usize) -> ApiError {
    match e {
        PayloadError::Overflow => ApiError::PayloadTooLarge { limit, given: None },
        other => ApiError::MalformedJson(format!("cannot read the request body: {other}")),
    }
}

/// actix's `JsonConfig` error handler: every JSON extraction failure becomes
/// one of ours (413 for size, 415 for content type, 400/422 for serde).
pub fn json_error(err: JsonPayloadError, limit: usize) -> ApiError {
    match &err {
        JsonPayloadError::OverflowKnownLength { length, limit } => ApiError::PayloadTooLarge {
            limit: *limit,
            given: Some(*length),
        },
        JsonPayloadError::Overflow { limit } => ApiError::PayloadTooLarge {
            limit: *limit,
            given: None,
        },
        JsonPayloadError::ContentType => ApiError::UnsupportedMediaType(
            "the request body must be JSON (Content-Type: application/json)".into(),
        ),
        JsonPayloadError::Deserialize(e) => from_serde(e),
        JsonPayloadError::Payload(p) => from_payload(p, limit),
        other => ApiError::MalformedJson(other.to_string()),
    }
}

/// The default service: unknown routes answer a JSON 404 too.
pub async fn not_found(req: HttpRequest) -> ApiError {
    ApiError::NotFound(format!("{} {}", req.method(), req.path()))
}

impl actix_web::Responder for ApiError {
    type Body = actix_web::body::BoxBody;
    fn respond_to(self, _req: &HttpRequest) -> HttpResponse {
        self.error_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_errors_are_never_5xx_and_names_are_unique() {
        let all = [
            ApiError::MalformedJson("x".into()),
            ApiError::InvalidRequest("x".into()),
            ApiError::Validation("x".into()),
            ApiError::EmptyPrompt,
            ApiError::PromptTooLong("x".into()),
            ApiError::UnknownMode("x".into()),
            ApiError::UnknownAdapter("x".into()),
            ApiError::InvalidAdapters("x".into()),
            ApiError::InvalidImage("x".into()),
            ApiError::ImagesUnsupported("x".into()),
            ApiError::PayloadTooLarge {
                limit: 1,
                given: Some(2),
            },
            ApiError::UnsupportedMediaType("x".into()),
            ApiError::Unauthorized,
            ApiError::ModelNotFound("x".into()),
            ApiError::AdapterNotFound("x".into()),
            ApiError::AdapterRefused("x".into()),
            ApiError::NotFound("x".into()),
            ApiError::MethodNotAllowed("x".into()),
            ApiError::Overloaded("x".into()),
            ApiError::BatchTooLarge("x".into()),
            ApiError::InvalidBatch("x".into()),
            ApiError::BatchNotFound("x".into()),
        ];
        for e in &all {
            assert!(e.status().is_client_error(), "{e:?} -> {}", e.status());
        }
        let mut names: Vec<_> = all.iter().map(|e| e.kind()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert_eq!(
            ApiError::Overloaded("x".into()).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn serde_syntax_errors_are_400_and_shape_errors_422() {
        let syntax = serde_json::from_str::<serde_json::Value>("{\"a\": ").unwrap_err();
        assert_eq!(from_serde(&syntax).status(), StatusCode::BAD_REQUEST);
        let shape = serde_json::from_str::<Vec<u32>>("{\"a\": 1}").unwrap_err();
        assert_eq!(
            from_serde(&shape).status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[test]
    fn payload_messages_name_the_limit_and_the_size() {
        let e = json_error(
            JsonPayloadError::OverflowKnownLength {
                length: 900,
                limit: 100,
            },
            100,
        );
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            e.to_string(),
            "the request body is larger than the limit of 100 bytes. Given: 900 bytes"
        );
    }
}
