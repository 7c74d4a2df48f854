//! The JSON shapes of the HTTP API. Requests are deserialised into these
//! types and then validated (`validation.rs`) into the engine's
//! `ValidRequest`; a value of a later type never holds an unchecked field.
//!
//! The server reads request bodies field by field (`fields.rs`) so that
//! errors name the field; the serde derives here serve clients (tests, the
//! load generator). `prompt` and `sampling` stay raw JSON values and
//! `routing_mode` a string: the validator parses them with messages that
//! name the field and the value given.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::types::{AdapterRequest, FinishReason, RoutingStats, Usage};

/// `POST /v1/generate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// A string, or an array of parts `{type: "text", text}` /
    /// `{type: "image", png_base64}`, in order; the last part may be
    /// `{type: "image_start"}` (the model begins with a picture).
    pub prompt: Value,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// `GenerationParams` fields: `text` / `image` (`temperature`, `top_k`,
    /// `top_p`), `cfg_scale`, `seed`, `stop_at_eos`.
    #[serde(default)]
    pub sampling: Option<Value>,
    /// `single_pass` (default), `per_modality_pass`, `per_sequence`, `base`.
    #[serde(default)]
    pub routing_mode: Option<String>,
    #[serde(default)]
    pub adapters: Option<AdapterRequest>,
    /// Server-sent events instead of one JSON answer.
    #[serde(default)]
    pub stream: bool,
    /// Include every generated token (id, modality, adapter) in the answer.
    #[serde(default)]
    pub return_tokens: bool,
    /// Send the prompt as it is. By default the answer separator the model
    /// was trained with (`\n`) is put between the prompt and the answer.
    #[serde(default)]
    pub raw: bool,
}

/// One piece of a prompt, after its JSON shape was checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PromptPartJson {
    Text {
        text: String,
    },
    Image {
        png_base64: String,
    },
    /// `<boi>` at the end of the prompt: generation starts with an image.
    ImageStart {},
}

/// One piece of the output, in generation order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputPart {
    Text {
        text: String,
    },
    Image {
        png_base64: String,
        width: u32,
        height: u32,
    },
}

/// A generated token and the adapter that served it most.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: u32,
    pub modality: String,
    pub adapter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    pub parts: Vec<OutputPart>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub routing: RoutingStats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<TokenInfo>>,
}

/// `POST /v1/compare`: one prompt and seed in several routing modes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareRequest {
    pub prompt: Value,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub sampling: Option<Value>,
    /// Shared by every run; a random one (reported back) when absent.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub adapters: Option<AdapterRequest>,
    /// Adds a `per_sequence` run with these adapters forced on every token.
    #[serde(default)]
    pub per_sequence: Option<Vec<String>>,
    /// As in `/v1/generate`: no answer separator after the prompt.
    #[serde(default)]
    pub raw: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareRun {
    pub mode: String,
    pub parts: Vec<OutputPart>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub routing: RoutingStats,
    /// Request wall time seen by the server, submission to last event
    /// (the runs of one comparison run one after another).
    #[serde(serialize_with = "crate::engine::types::serialize_ms")]
    pub wall_ms: f64,
    pub token_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareResponse {
    pub seed: u64,
    pub runs: Vec<CompareRun>,
    /// Whether single_pass and per_modality_pass produced the same tokens.
    pub identical: bool,
    /// per_modality_pass token rows / single_pass token rows.
    #[serde(serialize_with = "crate::engine::types::serialize_ratio")]
    pub work_ratio: f64,
    /// per_modality_pass wall time / single_pass wall time (the runs never
    /// share a step, so this is what the extra passes cost).
    #[serde(default, serialize_with = "crate::engine::types::serialize_ratio")]
    pub time_ratio: f64,
}

/// `POST /v1/chat/completions` (OpenAI's shape; unknown fields are ignored
/// as OpenAI clients send many).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    /// molora extensions.
    #[serde(default)]
    pub routing_mode: Option<String>,
    #[serde(default)]
    pub adapters: Option<AdapterRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or content parts `{type: "text", text}` /
    /// `{type: "image_url", image_url: {url: "data:image/png;base64,..."}}`.
    pub content: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: ChatUsage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatReply,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatReply {
    pub role: String,
    pub content: Vec<ChatContentPart>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// `POST /v1/adapters`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapterRequest {
    pub name: String,
}

impl OutputPart {
    /// A chat content part: images become `data:` URLs.
    pub fn to_chat(&self) -> ChatContentPart {
        match self {
            OutputPart::Text { text } => ChatContentPart::Text { text: text.clone() },
            OutputPart::Image { png_base64, .. } => ChatContentPart::ImageUrl {
                image_url: ImageUrl {
                    url: format!("{PNG_DATA_URL_PREFIX}{png_base64}"),
                },
            },
        }
    }
}

/// The only `data:` URL form accepted for images.
pub const PNG_DATA_URL_PREFIX: &str = "data:image/png;base64,";
