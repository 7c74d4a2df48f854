//! A batch's input: JSONL lines `{"custom_id": ..., "body": {...}}` or one
//! JSON array of such objects, turned into items and per-line errors.
//!
//! Invariants: the count limit is checked before any line is parsed; a
//! malformed line never stops the others (it becomes a [`LineError`] with
//! its 1-based line number and the reason); `custom_id`s are unique within
//! a job (a repeat is refused on its own line, naming the first); every
//! item's body passed the caller's check (`/v1/generate`'s cheap
//! validation), so what runs later can fail only on deeper problems.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::model::{LineError, NewItem};
use crate::server::validation::{json_kind, quote};

/// The one endpoint a line may name (OpenAI's lines carry `method` and `url`).
pub const ITEM_URL: &str = "/v1/generate";
/// Longest accepted `custom_id`.
pub const MAX_CUSTOM_ID_CHARS: usize = 256;

/// Why a whole input is refused (no job is made).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("the batch is empty: send JSONL lines {{\"custom_id\": ..., \"body\": {{...}}}} or a JSON array of them")]
    Empty,
    #[error("the batch has {given} items but at most {limit} are accepted (max_batch_items)")]
    TooMany { limit: usize, given: usize },
    #[error("the batch is not UTF-8 text: {0}")]
    NotText(String),
    /// A body starting with `[` that is not a JSON array.
    #[error("the batch starts with `[` but is not a JSON array: {0}")]
    BadArray(String),
}

/// The input after parsing: the items to run and the lines refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedInput {
    pub items: Vec<NewItem>,
    pub errors: Vec<LineError>,
}

/// Parses a JSONL or JSON-array body. `check_body` validates one request
/// body and says why it is refused.
pub fn parse_input(
    bytes: &[u8],
    max_items: usize,
    check_body: impl Fn(&Value) -> Result<(), String>,
) -> Result<ParsedInput, InputError> {
    let text = std::str::from_utf8(bytes).map_err(|e| InputError::NotText(e.to_string()))?;
    let lines: Vec<(usize, Result<Value, String>)> = if text.trim_start().starts_with('[') {
        let array: Vec<Value> =
            serde_json::from_str(text).map_err(|e| InputError::BadArray(e.to_string()))?;
        check_count(array.len(), max_items)?;
        array
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, Ok(v)))
            .collect()
    } else {
        let numbered: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect();
        check_count(numbered.len(), max_items)?;
        numbered
            .into_iter()
            .map(|(n, l)| {
                let v = serde_json::from_str(l).map_err(|e| format!("not valid JSON: {e}"));
                (n, v)
            })
            .collect()
    };
    let mut out = ParsedInput::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, value) in lines {
        let custom_id = value.as_ref().ok().and_then(|v| {
            v.get("custom_id")
                .and_then(Value::as_str)
                .map(|s| quote(s).to_string())
        });
        let item = value.and_then(|v| parse_line(line, v, &seen, &check_body));
        match item {
            Ok(item) => {
                seen.insert(item.custom_id.clone(), line);
                out.items.push(item);
            }
            Err(message) => out.errors.push(LineError {
                line,
                custom_id,
                message,
            }),
        }
    }
    Ok(out)
}

fn check_count(given: usize, limit: usize) -> Result<(), InputError> {
    match given {
        0 => Err(InputError::Empty),
        n if n > limit => Err(InputError::TooMany { limit, given: n }),
        _ => Ok(()),
    }
}

fn parse_line(
    line: usize,
    value: Value,
    seen: &HashMap<String, usize>,
    check_body: &impl Fn(&Value) -> Result<(), String>,
) -> Result<NewItem, String> {
    let mut obj: Map<String, Value> = match value {
        Value::Object(m) => m,
        other => {
            return Err(format!(
                "a line must be a JSON object {{\"custom_id\", \"body\"}}; given: {}",
                json_kind(&other)
            ))
        }
    };
    let custom_id = match obj.remove("custom_id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) => return Err("`custom_id` must not be empty".into()),
        None | Some(Value::Null) => return Err("`custom_id` is required".into()),
        Some(other) => {
            return Err(format!(
                "`custom_id` must be a string; given: {}",
                json_kind(&other)
            ))
        }
    };
    if custom_id.chars().count() > MAX_CUSTOM_ID_CHARS {
        return Err(format!(
            "`custom_id` must be at most {MAX_CUSTOM_ID_CHARS} characters. Given: {}",
            custom_id.chars().count()
        ));
    }
    if let Some(first) = seen.get(&custom_id) {
        return Err(format!(
            "duplicate `custom_id` {:?} (first on line {first}); custom_ids must be unique within a batch",
            quote(&custom_id)
        ));
    }
    match obj.remove("method") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
        Some(other) => return Err(format!("`method` must be \"POST\"; given: {other}")),
    }
    match obj.remove("url") {
        None | Some(Value::Null) => {}
        Some(Value::String(u)) if u == ITEM_URL => {}
        Some(other) => return Err(format!("`url` must be \"{ITEM_URL}\"; given: {other}")),
    }
    let body = match obj.remove("body") {
        Some(b @ Value::Object(_)) => b,
        None | Some(Value::Null) => {
            return Err("`body` (a /v1/generate request) is required".into())
        }
        Some(other) => {
            return Err(format!(
                "`body` must be a /v1/generate request object; given: {}",
                json_kind(&other)
            ))
        }
    };
    if let Some(k) = obj.keys().next() {
        return Err(format!(
            "unknown field `{}`; a line has `custom_id`, `body` and optionally `method`, `url`",
            quote(k)
        ));
    }
    check_body(&body).map_err(|e| format!("`body`: {e}"))?;
    Ok(NewItem {
        line,
        custom_id,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &Value) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn jsonl_keeps_good_lines_and_reports_bad_ones_by_number() {
        let text = concat!(
            "{\"custom_id\": \"a\", \"body\": {\"prompt\": \"x\"}}\n",
            "\n",
            "{not json\n",
            "{\"custom_id\": \"a\", \"body\": {\"prompt\": \"y\"}}\n",
            "{\"custom_id\": 7, \"body\": {}}\n",
            "{\"custom_id\": \"b\", \"body\": \"hi\"}\n",
            "{\"custom_id\": \"c\", \"method\": \"POST\", \"url\": \"/v1/generate\", \"body\": {\"prompt\": \"z\"}}\n",
            "{\"custom_id\": \"d\", \"url\": \"/v1/chat\", \"body\": {}}\n",
            "{\"custom_id\": \"e\", \"body\": {}, \"extra\": 1}\n",
        );
        let p = parse_input(text.as_bytes(), 100, ok).unwrap();
        let ids: Vec<(usize, &str)> = p
            .items
            .iter()
            .map(|i| (i.line, i.custom_id.as_str()))
            .collect();
        assert_eq!(ids, vec![(1, "a"), (7, "c")]);
        let errs: Vec<usize> = p.errors.iter().map(|e| e.line).collect();
        assert_eq!(errs, vec![3, 4, 5, 6, 8, 9]);
        assert!(p.errors[0].message.contains("not valid JSON"));
        assert!(p.errors[1]
            .message
            .contains("duplicate `custom_id` \"a\" (first on line 1)"));
        assert_eq!(p.errors[1].custom_id.as_deref(), Some("a"));
        assert!(p.errors[2].message.contains("`custom_id` must be a string"));
        assert!(p.errors[3].message.contains("`body` must be"));
        assert!(p.errors[4].message.contains("`url`"));
        assert!(p.errors[5].message.contains("unknown field `extra`"));
    }

    #[test]
    fn a_json_array_numbers_its_elements_and_the_body_check_applies() {
        let text = r#"[{"custom_id": "a", "body": {"prompt": ""}}, {"custom_id": "b", "body": {"prompt": "x"}}]"#;
        let p = parse_input(text.as_bytes(), 10, |b| {
            if b["prompt"] == "" {
                Err("`prompt` must not be empty".into())
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(p.items.len(), 1);
        assert_eq!(p.items[0].line, 2);
        assert_eq!(p.errors[0].line, 1);
        assert_eq!(p.errors[0].message, "`body`: `prompt` must not be empty");
    }

    #[test]
    fn empty_too_many_and_broken_arrays_refuse_the_whole_input() {
        assert_eq!(parse_input(b"\n  \n", 5, ok), Err(InputError::Empty));
        let three = "{}\n{}\n{}\n";
        assert_eq!(
            parse_input(three.as_bytes(), 2, ok),
            Err(InputError::TooMany { limit: 2, given: 3 })
        );
        assert!(matches!(
            parse_input(b"[{\"custom_id\": ", 5, ok),
            Err(InputError::BadArray(_))
        ));
        assert!(matches!(
            parse_input(&[0xff, 0xfe], 5, ok),
            Err(InputError::NotText(_))
        ));
    }
}
