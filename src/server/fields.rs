//! Request bodies parsed field by field, so that every shape error names
//! its field: "`max_tokens`: invalid type: string \"ten\", expected usize"
//! (serde_json alone reports only a line and column for wrong types).
//!
//! The body is first read as a JSON value by actix (syntax errors and size
//! limits are handled there); each request type then takes its fields out
//! of the object one by one, and what is left over is an unknown field.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::api::{ChatMessage, ChatRequest, CompareRequest, GenerateRequest, LoadAdapterRequest};
use super::error::ApiError;

/// The fields of a JSON object, taken out one at a time.
pub struct Fields {
    map: Map<String, Value>,
    known: Vec<&'static str>,
}

impl Fields {
    pub fn new(body: Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(map) => Ok(Self { map, known: vec![] }),
            other => Err(ApiError::InvalidRequest(format!(
                "the request body must be a JSON object; given: {}",
                super::validation::json_kind(&other)
            ))),
        }
    }

    /// A field that must be present (and not null).
    pub fn required<T: DeserializeOwned>(&mut self, key: &'static str) -> Result<T, ApiError> {
        self.optional(key)?
            .ok_or_else(|| ApiError::InvalidRequest(format!("`{key}` is required")))
    }

    /// A field that may be absent or null.
    pub fn optional<T: DeserializeOwned>(
        &mut self,
        key: &'static str,
    ) -> Result<Option<T>, ApiError> {
        self.known.push(key);
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| ApiError::InvalidRequest(format!("`{key}`: {e}"))),
        }
    }

    /// A field kept as raw JSON (parsed later with its own messages).
    pub fn raw(&mut self, key: &'static str) -> Option<Value> {
        self.known.push(key);
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// Refuses fields nobody asked for (a typo should not be ignored).
    pub fn deny_unknown(self) -> Result<(), ApiError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(ApiError::InvalidRequest(format!(
                "unknown field `{}`; expected one of {}",
                super::validation::quote(k),
                self.known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

impl GenerateRequest {
    pub fn from_json(body: Value) -> Result<Self, ApiError> {
        let mut f = Fields::new(body)?;
        let prompt = f
            .raw("prompt")
            .ok_or_else(|| ApiError::InvalidRequest("`prompt` is required".into()))?;
        let req = Self {
            prompt,
            max_tokens: f.optional("max_tokens")?,
            sampling: f.raw("sampling"),
            routing_mode: f.optional("routing_mode")?,
            adapters: f.optional("adapters")?,
            stream: f.optional("stream")?.unwrap_or(false),
            return_tokens: f.optional("return_tokens")?.unwrap_or(false),
            raw: f.optional("raw")?.unwrap_or(false),
        };
        f.deny_unknown()?;
        Ok(req)
    }
}

impl CompareRequest {
    pub fn from_json(body: Value) -> Result<Self, ApiError> {
        let mut f = Fields::new(body)?;
        let prompt = f
            .raw("prompt")
            .ok_or_else(|| ApiError::InvalidRequest("`prompt` is required".into()))?;
        let req = Self {
            prompt,
            max_tokens: f.optional("max_tokens")?,
            sampling: f.raw("sampling"),
            seed: f.optional("seed")?,
            adapters: f.optional("adapters")?,
            per_sequence: f.optional("per_sequence")?,
            raw: f.optional("raw")?.unwrap_or(false),
        };
        f.deny_unknown()?;
        Ok(req)
    }
}

impl ChatRequest {
    /// Unknown fields are ignored: OpenAI clients send many (`n`, `user`, ...).
    pub fn from_json(body: Value) -> Result<Self, ApiError> {
        let mut f = Fields::new(body)?;
        let max_tokens = match f.optional("max_tokens")? {
            Some(n) => Some(n),
            None => f.optional("max_completion_tokens")?,
        };
        let messages: Vec<Value> = f.required("messages")?;
        let mut parsed = Vec::with_capacity(messages.len());
        for (i, m) in messages.into_iter().enumerate() {
            parsed.push(
                serde_json::from_value::<ChatMessage>(m)
                    .map_err(|e| ApiError::InvalidRequest(format!("`messages[{i}]`: {e}")))?,
            );
        }
        Ok(Self {
            model: f.optional("model")?,
            messages: parsed,
            max_tokens,
            temperature: f.optional("temperature")?,
            top_p: f.optional("top_p")?,
            seed: f.optional("seed")?,
            stream: f.optional("stream")?.unwrap_or(false),
            routing_mode: f.optional("routing_mode")?,
            adapters: f.optional("adapters")?,
        })
    }
}

impl LoadAdapterRequest {
    pub fn from_json(body: Value) -> Result<Self, ApiError> {
        let mut f = Fields::new(body)?;
        let req = Self {
            name: f.required("name")?,
        };
        f.deny_unknown()?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        GenerateRequest::from_json(v)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn shape_errors_name_their_field() {
        assert!(err(json!({"prompt": "x", "max_tokens": "ten"}))
            .contains("`max_tokens`: invalid type: string \"ten\""));
        assert!(err(json!({"prompt": "x", "stream": 1})).contains("`stream`"));
        assert!(err(json!({"max_tokens": 3})).contains("`prompt` is required"));
        let unknown = err(json!({"prompt": "x", "max_token": 3}));
        assert!(
            unknown.contains("unknown field `max_token`") && unknown.contains("`max_tokens`"),
            "{unknown}"
        );
        assert!(err(json!([1, 2])).contains("must be a JSON object; given: an array"));
    }

    #[test]
    fn absent_and_null_fields_take_their_defaults() {
        let r =
            GenerateRequest::from_json(json!({"prompt": "x", "max_tokens": null, "stream": true}))
                .unwrap();
        assert_eq!(
            (r.max_tokens, r.stream, r.return_tokens),
            (None, true, false)
        );
    }

    #[test]
    fn chat_ignores_unknown_fields_and_reads_max_completion_tokens() {
        let r = ChatRequest::from_json(json!({
            "messages": [{"role": "user", "content": "hi"}], "n": 1, "max_completion_tokens": 9
        }))
        .unwrap();
        assert_eq!(r.max_tokens, Some(9));
        let e = ChatRequest::from_json(json!({"messages": [{"content": "hi"}]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`messages[0]`") && e.contains("role"), "{e}");
    }
}
