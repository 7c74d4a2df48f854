//! The plain types of a batch job: the job, its items, their statuses and
//! the outcome of one item, as the store keeps them and the API shows them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job's life, in the words of OpenAI's Batch API.
///
/// `in_progress` -> `completed` when no item is pending or in flight;
/// `in_progress` -> `cancelling` (items still in flight finish) ->
/// `cancelled`; a job with no valid line is `failed` from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    InProgress,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

/// One item's life: `pending` -> `in_flight` (claimed by a runner) ->
/// `completed` | `failed`; `pending` -> `cancelled`. A runner that dies
/// leaves `in_flight` items, which go back to `pending` at the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    Pending,
    InFlight,
    Completed,
    Failed,
    Cancelled,
}

macro_rules! text_enum {
    ($t:ty { $($v:ident = $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(Self::$v),)*
                    other => Err(format!("unknown {} {other:?}", stringify!($t))),
                }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(JobStatus {
    InProgress = "in_progress",
    Cancelling = "cancelling",
    Cancelled = "cancelled",
    Completed = "completed",
    Failed = "failed",
});

text_enum!(ItemStatus {
    Pending = "pending",
    InFlight = "in_flight",
    Completed = "completed",
    Failed = "failed",
    Cancelled = "cancelled",
});

impl JobStatus {
    /// No item of the job will run any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Cancelled | Self::Completed | Self::Failed)
    }
}

/// How generated pictures appear in the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageOutput {
    /// `{"type": "image", "png_base64": ...}`, as `/v1/generate` answers.
    #[default]
    Base64,
    /// `{"type": "image", "file": "images/<item>_<n>.png"}`, the PNG written
    /// into the job's results folder.
    Files,
}

text_enum!(ImageOutput {
    Base64 = "base64",
    Files = "files",
});

/// A line of the input that could not become an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// 1-based: the line of a JSONL body, the element of a JSON array.
    pub line: usize,
    /// The line's `custom_id`, when it could be read.
    #[serde(default)]
    pub custom_id: Option<String>,
    pub message: String,
}

/// A valid line: its request body is checked and ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    pub line: usize,
    pub custom_id: String,
    /// The `/v1/generate` request body.
    pub body: Value,
}

/// Everything needed to create a job.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub items: Vec<NewItem>,
    pub line_errors: Vec<LineError>,
    pub image_output: ImageOutput,
    /// Where the input came from (`http`, or a file and its digest for the CLI).
    pub source: String,
}

/// Items per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Valid items (lines refused at submission are in `Job::errors`).
    pub total: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub pending: usize,
    pub in_flight: usize,
}

impl RequestCounts {
    /// Items that will not run again.
    pub fn finished(&self) -> usize {
        self.completed + self.failed + self.cancelled
    }

    pub fn add(&mut self, status: ItemStatus, n: usize) {
        match status {
            ItemStatus::Pending => self.pending += n,
            ItemStatus::InFlight => self.in_flight += n,
            ItemStatus::Completed => self.completed += n,
            ItemStatus::Failed => self.failed += n,
            ItemStatus::Cancelled => self.cancelled += n,
        }
        self.total += n;
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Always `"batch"` (OpenAI's field).
    pub object: String,
    pub status: JobStatus,
    /// Unix seconds.
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub image_output: ImageOutput,
    pub source: String,
    pub request_counts: RequestCounts,
    /// Finished items / valid items (1.0 for a job with none), 3 decimals.
    #[serde(serialize_with = "crate::engine::types::serialize_ratio")]
    pub progress: f64,
    /// Lines refused at submission, with the reason.
    pub errors: Vec<LineError>,
}

/// An item a runner has claimed (it is `in_flight` until its result is
/// recorded or it is released).
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedItem {
    pub job_id: String,
    pub index: usize,
    pub line: usize,
    pub custom_id: String,
    pub body: Value,
    pub image_output: ImageOutput,
}

/// How one item ended: a `/v1/generate` answer, or an error with the status
/// code and `{error, type}` body that `/v1/generate` would have answered.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    Completed {
        body: Value,
    },
    Failed {
        status_code: u16,
        kind: String,
        message: String,
    },
}

impl ItemOutcome {
    pub fn status(&self) -> ItemStatus {
        match self {
            Self::Completed { .. } => ItemStatus::Completed,
            Self::Failed { .. } => ItemStatus::Failed,
        }
    }
}

/// One line of the results file (JSONL), OpenAI's shape plus `status` and
/// the input `line`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultLine {
    /// `<job id>-<item index>`.
    pub id: String,
    pub custom_id: String,
    pub line: usize,
    pub status: ItemStatus,
    pub response: ResultResponse,
    /// `{code, message}` for a failed item, null otherwise.
    pub error: Option<ResultError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultResponse {
    pub status_code: u16,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    pub code: String,
    pub message: String,
}

impl ResultLine {
    pub fn new(job_id: &str, index: usize, line: usize, custom_id: &str, o: &ItemOutcome) -> Self {
        let (response, error) = match o {
            ItemOutcome::Completed { body } => (
                ResultResponse {
                    status_code: 200,
                    body: body.clone(),
                },
                None,
            ),
            ItemOutcome::Failed {
                status_code,
                kind,
                message,
            } => (
                ResultResponse {
                    status_code: *status_code,
                    body: serde_json::json!({"error": message, "type": kind}),
                },
                Some(ResultError {
                    code: kind.clone(),
                    message: message.clone(),
                }),
            ),
        };
        Self {
            id: format!("{job_id}-{index}"),
            custom_id: custom_id.to_string(),
            line,
            status: o.status(),
            response,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in [
            JobStatus::InProgress,
            JobStatus::Cancelling,
            JobStatus::Cancelled,
            JobStatus::Completed,
            JobStatus::Failed,
        ] {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("done".parse::<ItemStatus>().is_err());
        assert_eq!("in_flight".parse::<ItemStatus>(), Ok(ItemStatus::InFlight));
    }

    #[test]
    fn a_failed_outcome_carries_the_error_both_ways() {
        let o = ItemOutcome::Failed {
            status_code: 422,
            kind: "prompt_too_long".into(),
            message: "too long".into(),
        };
        let r = ResultLine::new("batch_x", 3, 4, "c", &o);
        assert_eq!(r.id, "batch_x-3");
        assert_eq!(r.status, ItemStatus::Failed);
        assert_eq!(r.response.status_code, 422);
        assert_eq!(r.response.body["type"], "prompt_too_long");
        assert_eq!(r.error.unwrap().code, "prompt_too_long");
    }
}
