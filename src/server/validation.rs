//! Request -> `ValidRequest`: parse the prompt's shape, decode images,
//! tokenize text, encode images with the VQ model into `<boi> codes <eoi>`,
//! resolve the generation parameters, and enforce every limit.
//!
//! Cheap checks run first (JSON shape, base64, counts); PNG decoding and VQ
//! encoding run last, on a blocking thread (`encode` is synchronous; the
//! handlers call it through `web::block`).
//!
//! Invariants of a `ValidRequest` built here: the prompt starts with `<s>`
//! (when the model has one), holds only text tokens and complete image
//! blocks, is at most `max_prompt_tokens` long, and prompt + `max_tokens`
//! fits the model's context; the parameters passed `GenerationParams::validate`;
//! unless the request is `raw`, the answer separator follows the prompt.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use super::api::{ChatContentPart, ChatMessage, PromptPartJson, PNG_DATA_URL_PREFIX};
use super::config::LimitsConfig;
use super::error::ApiError;
use crate::engine::params::{GenerationParams, Limits};
use crate::engine::types::{AdapterRequest, Priority, ValidRequest};
use crate::model::config::VocabLayout;
use crate::model::vq::VqModel;

mod encoding;
use crate::routing::mode::RoutingMode;
use crate::train::data::encode::ANSWER_SEPARATOR;

/// Given values quoted in messages are cut to this many characters.
const QUOTE_CHARS: usize = 48;
/// The fields of `GenerationParams`, as the `sampling` object spells them.
const SAMPLING_FIELDS: [&str; 6] = [
    "max_tokens",
    "text",
    "image",
    "cfg_scale",
    "seed",
    "stop_at_eos",
];

/// A prompt piece whose JSON shape was checked; images still undecoded.
#[derive(Debug, Clone)]
pub enum PromptPiece {
    Text {
        field: String,
        text: String,
    },
    Image {
        field: String,
        png: Vec<u8>,
    },
    /// `<boi>`, last in the prompt.
    ImageStart {
        field: String,
    },
}

/// Everything the validator needs, built once at start-up.
pub struct Validator {
    pub tokenizer: Arc<Tokenizer>,
    pub vocab: VocabLayout,
    pub vq: Option<VqModel>,
    pub limits: LimitsConfig,
    /// The model's context length (positions).
    pub max_context: usize,
    pub preview_every: usize,
}

/// The non-prompt fields of a request, before resolution.
#[derive(Debug, Clone, Default)]
pub struct Settings<'a> {
    pub max_tokens: Option<usize>,
    pub sampling: Option<&'a Value>,
    pub routing_mode: Option<&'a str>,
    pub adapters: Option<&'a AdapterRequest>,
}

impl Validator {
    /// `prompt` in answer form: the pieces of [`Self::parse_prompt_as`] with
    /// the answer separator after them.
    pub fn parse_prompt(&self, prompt: &Value) -> Result<Vec<PromptPiece>, ApiError> {
        self.parse_prompt_as(prompt, false)
    }

    /// `prompt`: a string or an array of `{type: "text"|"image", ...}` parts.
    /// Unless `raw`, the answer separator goes between the prompt and the
    /// answer as in training and as chat does (`<s> prompt \n answer`; see
    /// `add_answer_separator`).
    pub fn parse_prompt_as(&self, prompt: &Value, raw: bool) -> Result<Vec<PromptPiece>, ApiError> {
        let pieces = match prompt {
            Value::String(s) => vec![PromptPiece::Text {
                field: "prompt".into(),
                text: s.clone(),
            }],
            Value::Array(parts) => {
                let mut pieces = Vec::with_capacity(parts.len());
                for (i, part) in parts.iter().enumerate() {
                    let field = format!("prompt[{i}]");
                    let parsed: PromptPartJson = serde_json::from_value(part.clone())
                        .map_err(|e| ApiError::InvalidRequest(format!("`{field}`: {e}")))?;
                    pieces.push(match parsed {
                        PromptPartJson::Text { text } => PromptPiece::Text { field: format!("{field}.text"), text },
                        PromptPartJson::Image { png_base64 } => {
                            let field = format!("{field}.png_base64");
                            let png = decode_base64(&field, &png_base64)?;
                            PromptPiece::Image { field, png }
                        }
                        PromptPartJson::ImageStart {} => {
                            if i + 1 != parts.len() {
                                return Err(ApiError::InvalidRequest(format!(
                                    "`{field}`: an image_start part must be the last part of the prompt"
                                )));
                            }
                            PromptPiece::ImageStart { field }
                        }
                    });
                }
                pieces
            }
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "`prompt` must be a string or an array of parts; given: {}",
                    json_kind(other)
                )))
            }
        };
        let mut pieces = self.check_pieces(pieces)?;
        if !raw {
            add_answer_separator(&mut pieces, "prompt");
        }
        Ok(pieces)
    }

    /// Chat messages -> prompt pieces: each message's content in order,
    /// messages separated by a newline, and the answer separator (a newline)
    /// at the end, as the demo model was trained (`<s> prompt \n answer`;
    /// the same rule as [`Self::parse_prompt_as`]).
    pub fn parse_chat(&self, messages: &[ChatMessage]) -> Result<Vec<PromptPiece>, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::EmptyPrompt);
        }
        let mut pieces = vec![];
        for (m, msg) in messages.iter().enumerate() {
            if !matches!(
                msg.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(ApiError::InvalidRequest(format!(
                    "`messages[{m}].role` must be one of system, developer, user, assistant; given: {:?}",
                    quote(&msg.role)
                )));
            }
            if m > 0 {
                pieces.push(PromptPiece::Text {
                    field: format!("messages[{m}]"),
                    text: "\n".into(),
                });
            }
            match &msg.content {
                Value::String(s) => {
                    pieces.push(PromptPiece::Text { field: format!("messages[{m}].content"), text: s.clone() })
                }
                Value::Array(parts) => {
                    for (i, part) in parts.iter().enumerate() {
                        let field = format!("messages[{m}].content[{i}]");
                        let parsed: ChatContentPart = serde_json::from_value(part.clone())
                            .map_err(|e| ApiError::InvalidRequest(format!("`{field}`: {e}")))?;
                        pieces.push(match parsed {
                            ChatContentPart::Text { text } => PromptPiece::Text { field: format!("{field}.text"), text },
                            ChatContentPart::ImageUrl { image_url } => {
                                let field = format!("{field}.image_url.url");
                                let Some(data) = image_url.url.strip_prefix(PNG_DATA_URL_PREFIX) else {
                                    return Err(ApiError::InvalidImage(format!(
                                        "`{field}` must be a {PNG_DATA_URL_PREFIX}... URL (no remote fetches); given: {:?}",
                                        quote(&image_url.url)
                                    )));
                                };
                                let png = decode_base64(&field, data)?;
                                PromptPiece::Image { field, png }
                            }
                        });
                    }
                }
                other => {
                    return Err(ApiError::InvalidRequest(format!(
                        "`messages[{m}].content` must be a string or an array of content parts; given: {}",
                        json_kind(other)
                    )))
                }
            }
        }
        let mut pieces = self.check_pieces(pieces)?;
        add_answer_separator(&mut pieces, "messages");
        Ok(pieces)
    }

    /// Non-empty, image count within the limit, images supported.
    fn check_pieces(&self, pieces: Vec<PromptPiece>) -> Result<Vec<PromptPiece>, ApiError> {
        let has_content = pieces.iter().any(|p| match p {
            PromptPiece::Text { text, .. } => !text.trim().is_empty(),
            PromptPiece::Image { .. } | PromptPiece::ImageStart { .. } => true,
        });
        if !has_content {
            return Err(ApiError::EmptyPrompt);
        }
        let images = pieces
            .iter()
            .filter(|p| matches!(p, PromptPiece::Image { .. }))
            .count();
        let starts = pieces
            .iter()
            .any(|p| matches!(p, PromptPiece::ImageStart { .. }));
        if (images > 0 || starts) && (self.vq.is_none() || self.vocab.boi.is_none()) {
            return Err(ApiError::ImagesUnsupported(
                "this model has no VQ image model, so prompts cannot contain or start images"
                    .into(),
            ));
        }
        if images > self.limits.max_images_per_prompt {
            return Err(ApiError::Validation(format!(
                "a prompt may hold at most {} images (max_images_per_prompt). Given: {images}",
                self.limits.max_images_per_prompt
            )));
        }
        // Cheap length check before any image is decoded: images have a fixed size.
        let image_tokens = images * (self.vocab.tokens_per_image + 2);
        if image_tokens > self.limits.max_prompt_tokens {
            return Err(self.too_long(image_tokens));
        }
        Ok(pieces)
    }

    fn too_long(&self, len: usize) -> ApiError {
        let limit = self.prompt_limit();
        ApiError::PromptTooLong(format!(
            "`prompt` must be at most {limit} tokens (max_prompt_tokens {}, model context {}). Given: {len} tokens",
            self.limits.max_prompt_tokens, self.max_context
        ))
    }

    /// Longest prompt accepted: the configured limit, leaving room for one
    /// new token in the context.
    pub fn prompt_limit(&self) -> usize {
        self.limits
            .max_prompt_tokens
            .min(self.max_context.saturating_sub(1))
    }

    /// `routing_mode` by name; absent = single_pass.
    pub fn mode(&self, name: Option<&str>) -> Result<RoutingMode, ApiError> {
        match name {
            None => Ok(RoutingMode::default()),
            Some(s) => s.parse().map_err(|_| ApiError::UnknownMode(quote(s))),
        }
    }

    /// Mode-specific rules of the adapter request (names are resolved by the engine).
    pub fn check_adapters(
        &self,
        mode: RoutingMode,
        adapters: &AdapterRequest,
    ) -> Result<(), ApiError> {
        match (mode, adapters.forced.is_empty()) {
            (RoutingMode::PerSequence, true) => Err(ApiError::InvalidAdapters(
                "`adapters.forced` must name at least one adapter when `routing_mode` is per_sequence".into(),
            )),
            (RoutingMode::PerSequence, false) => Ok(()),
            (other, false) => Err(ApiError::InvalidAdapters(format!(
                "`adapters.forced` applies only to per_sequence routing; given routing_mode {other}"
            ))),
            _ => Ok(()),
        }
    }

    /// Sampling settings: the `sampling` object (GenerationParams fields),
    /// `max_tokens` resolved against the limits and the context left after
    /// a prompt of `prompt_len` tokens.
    pub fn params(
        &self,
        prompt_len: usize,
        s: &Settings<'_>,
    ) -> Result<GenerationParams, ApiError> {
        let mut obj = match s.sampling {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => {
                return Err(ApiError::InvalidRequest(format!(
                    "`sampling` must be an object; given: {}",
                    json_kind(other)
                )))
            }
        };
        if let Some(bad) = obj.keys().find(|k| !SAMPLING_FIELDS.contains(&k.as_str())) {
            return Err(ApiError::InvalidRequest(format!(
                "unknown field `sampling.{}`; expected one of {}",
                quote(bad),
                SAMPLING_FIELDS.map(|f| format!("`{f}`")).join(", ")
            )));
        }
        let inner_max = match obj.remove("max_tokens") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value::<usize>(v)
                    .map_err(|e| ApiError::InvalidRequest(format!("`sampling.max_tokens`: {e}")))?,
            ),
        };
        let mut params: GenerationParams = serde_json::from_value(Value::Object(obj))
            .map_err(|e| ApiError::InvalidRequest(format!("`sampling`: {e}")))?;
        let room = self.max_context.saturating_sub(prompt_len);
        params.max_tokens = match s.max_tokens.or(inner_max) {
            Some(n) => {
                if n >= 1 && n <= self.limits.max_tokens && n > room {
                    return Err(ApiError::Validation(format!(
                        "`max_tokens` must be <= {room}: the prompt has {prompt_len} tokens and the model's context holds {}. Given: {n}",
                        self.max_context
                    )));
                }
                n
            }
            None => self
                .limits
                .default_max_tokens
                .min(self.limits.max_tokens)
                .min(room),
        };
        let limits = Limits {
            max_tokens: self.limits.max_tokens,
            // A top_k at or above the vocabulary keeps every token (the
            // sampler skips the filter), so the documented image default of
            // 100 must pass on small vocabularies too; the bound only
            // catches nonsense.
            max_top_k: self.vocab.vocab_size.max(Limits::default().max_top_k),
        };
        params
            .validate(&limits)
            .map_err(|e| ApiError::Validation(e.to_string()))?;
        Ok(params)
    }

    /// Everything but the prompt encoding; returns the mode and adapters.
    pub fn routing(&self, s: &Settings<'_>) -> Result<(RoutingMode, AdapterRequest), ApiError> {
        let mode = self.mode(s.routing_mode)?;
        let adapters = s.adapters.cloned().unwrap_or_default();
        self.check_adapters(mode, &adapters)?;
        Ok((mode, adapters))
    }

    /// Builds the engine request from an encoded prompt.
    pub fn finish(&self, prompt: Vec<u32>, s: &Settings<'_>) -> Result<ValidRequest, ApiError> {
        let (mode, adapters) = self.routing(s)?;
        let params = self.params(prompt.len(), s)?;
        Ok(ValidRequest {
            prompt,
            params,
            mode,
            adapters,
            priority: Priority::Interactive,
            preview_every: (self.preview_every > 0).then_some(self.preview_every),
        })
    }
}

/// Puts the answer separator between the prompt and the answer: before a
/// trailing `image_start`, else at the end. A text piece just before that
/// place loses a separator it already ends with (never doubled, always its
/// own token as in training). `field` names the separator piece in errors.
fn add_answer_separator(pieces: &mut Vec<PromptPiece>, field: &str) {
    let at = match pieces.last() {
        Some(PromptPiece::ImageStart { .. }) => pieces.len() - 1,
        _ => pieces.len(),
    };
    if let Some(PromptPiece::Text { text, .. }) = at.checked_sub(1).map(|i| &mut pieces[i]) {
        if let Some(kept) = text.strip_suffix(ANSWER_SEPARATOR) {
            text.truncate(kept.len());
        }
    }
    pieces.insert(
        at,
        PromptPiece::Text {
            field: field.into(),
            text: ANSWER_SEPARATOR.into(),
        },
    );
}

fn decode_base64(field: &str, data: &str) -> Result<Vec<u8>, ApiError> {
    let data = data.trim();
    if data.is_empty() {
        return Err(ApiError::InvalidImage(format!("`{field}` is empty")));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ApiError::InvalidImage(format!("`{field}` is not valid base64: {e}")))
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A user value cut short for an error message.
pub fn quote(s: &str) -> String {
    if s.chars().count() <= QUOTE_CHARS {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(QUOTE_CHARS).collect::<String>())
    }
}
