//! From the engine's event stream to what clients receive: ordered output
//! parts (text deltas accumulate until an image arrives), and server-sent
//! events for streaming.
//!
//! SSE event names (`event:` lines) of `POST /v1/generate` with `stream: true`:
//! - `token`: `{id, modality, adapter}` for every generated token;
//! - `text`: `{text, adapter}`, new text (adapter of the latest token);
//! - `image_preview`: `{index, codes_done, png_base64, width, height}`;
//! - `image`: `{index, png_base64, width, height}`, a finished picture;
//! - `done`: `{finish_reason, usage, routing}`, the last event;
//! - `error`: `{error, type}`, the last event of a failed request.

use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use base64::Engine as _;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{OutputPart, TokenInfo};
use super::error::ApiError;
use crate::engine::types::{Completion, InferEvent};

/// Builds the ordered parts: text deltas are appended to the open text
/// part; an image closes it.
#[derive(Debug, Default)]
pub struct PartBuilder {
    parts: Vec<OutputPart>,
    text: String,
}

impl PartBuilder {
    pub fn push_text(&mut self, delta: &str) {
        self.text.push_str(delta);
    }

    pub fn push_image(&mut self, png: &[u8], width: u32, height: u32) {
        self.flush_text();
        self.parts.push(OutputPart::Image {
            png_base64: b64(png),
            width,
            height,
        });
    }

    fn flush_text(&mut self) {
        if !self.text.is_empty() {
            self.parts.push(OutputPart::Text {
                text: std::mem::take(&mut self.text),
            });
        }
    }

    pub fn finish(mut self) -> Vec<OutputPart> {
        self.flush_text();
        self.parts
    }
}

/// A whole request's output.
#[derive(Debug)]
pub struct Collected {
    pub parts: Vec<OutputPart>,
    pub completion: Completion,
    pub tokens: Vec<TokenInfo>,
    /// Submission to the first token.
    pub first_token: Option<Duration>,
    /// Submission to the last event.
    pub wall: Duration,
}

/// Drains the receiver into parts. An `Error` event or a closed channel
/// without `End` is a generation failure (424).
pub async fn collect(
    mut rx: UnboundedReceiver<InferEvent>,
    submitted: Instant,
) -> Result<Collected, ApiError> {
    let mut parts = PartBuilder::default();
    let mut tokens = vec![];
    let mut first_token = None;
    loop {
        let Some(event) = rx.recv().await else {
            return Err(ApiError::Generation(
                "the engine ended the request without an answer".into(),
            ));
        };
        match event {
            InferEvent::Token {
                id,
                modality,
                adapter,
            } => {
                first_token.get_or_insert_with(|| submitted.elapsed());
                tokens.push(TokenInfo {
                    id,
                    modality,
                    adapter,
                });
            }
            InferEvent::TextDelta(t) => parts.push_text(&t),
            InferEvent::ImagePreview { .. } => {}
            InferEvent::Image {
                png, width, height, ..
            } => parts.push_image(&png, width, height),
            InferEvent::End(completion) => {
                return Ok(Collected {
                    parts: parts.finish(),
                    completion,
                    tokens,
                    first_token,
                    wall: submitted.elapsed(),
                })
            }
            InferEvent::Error(msg) => return Err(ApiError::Generation(msg)),
        }
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One SSE frame: `event: NAME\ndata: JSON\n\n`.
pub fn sse_frame(event: &str, data: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}

/// A `data:`-only frame (OpenAI's chunk stream has no event names).
pub fn sse_data(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// What the stream of `/v1/generate` remembers between events.
#[derive(Debug, Default)]
pub struct GenerateSse {
    last_adapter: Option<String>,
}

impl GenerateSse {
    /// The frame for one engine event.
    pub fn frame(&mut self, event: &InferEvent) -> Bytes {
        match event {
            InferEvent::Token {
                id,
                modality,
                adapter,
            } => {
                self.last_adapter = adapter.clone();
                sse_frame(
                    "token",
                    &json!({"id": id, "modality": modality, "adapter": adapter}),
                )
            }
            InferEvent::TextDelta(text) => {
                sse_frame("text", &json!({"text": text, "adapter": self.last_adapter}))
            }
            InferEvent::ImagePreview {
                index,
                codes_done,
                png,
                width,
                height,
            } => sse_frame(
                "image_preview",
                &json!({"index": index, "codes_done": codes_done, "png_base64": b64(png),
                        "width": width, "height": height}),
            ),
            InferEvent::Image {
                index,
                png,
                width,
                height,
            } => sse_frame(
                "image",
                &json!({"index": index, "png_base64": b64(png), "width": width, "height": height}),
            ),
            InferEvent::End(c) => sse_frame(
                "done",
                &json!({"finish_reason": c.finish_reason, "usage": c.usage, "routing": c.routing}),
            ),
            InferEvent::Error(msg) => sse_frame("error", &ApiError::Generation(msg.clone()).body()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_accumulates_until_an_image_closes_it() {
        let mut b = PartBuilder::default();
        b.push_text("a ");
        b.push_text("red circle");
        b.push_image(&[1, 2, 3], 8, 8);
        b.push_image(&[4], 8, 8);
        b.push_text("done");
        let parts = b.finish();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            parts[0],
            OutputPart::Text {
                text: "a red circle".into()
            }
        );
        assert!(matches!(&parts[1], OutputPart::Image { png_base64, .. } if png_base64 == "AQID"));
        assert_eq!(
            parts[3],
            OutputPart::Text {
                text: "done".into()
            }
        );
    }

    #[test]
    fn sse_frames_name_their_event_and_carry_one_json_line() {
        let mut s = GenerateSse::default();
        let tok = s.frame(&InferEvent::Token {
            id: 7,
            modality: "text".into(),
            adapter: Some("math".into()),
        });
        let tok = std::str::from_utf8(&tok).unwrap();
        let data = tok
            .strip_prefix("event: token\ndata: ")
            .and_then(|d| d.strip_suffix("\n\n"))
            .expect(tok);
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v, json!({"id": 7, "modality": "text", "adapter": "math"}));
        let text = s.frame(&InferEvent::TextDelta("hi\nthere".into()));
        let text = std::str::from_utf8(&text).unwrap();
        assert!(
            text.starts_with("event: text\ndata: {") && text.contains("\"adapter\":\"math\""),
            "{text}"
        );
        assert_eq!(
            text.matches('\n').count(),
            3,
            "newlines inside the text are escaped: {text}"
        );
        let err = s.frame(&InferEvent::Error("boom".into()));
        assert!(std::str::from_utf8(&err)
            .unwrap()
            .contains("\"type\":\"generation\""));
    }
}
