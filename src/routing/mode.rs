//! Routing modes, chosen per request (see DESIGN.md "Routing").

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingMode {
    /// Every token gets its modality's adapter plus the gate's semantic picks,
    /// all in one forward pass.
    #[default]
    SinglePass,
    /// What a per-sequence server must do: one full pass per adapter group,
    /// each with that group's adapters on every token and its own KV cache;
    /// each token's output is taken from the pass of its own group.
    PerModalityPass,
    /// One adapter set, chosen by the caller, on every token of the sequence.
    PerSequence,
    /// No adapters.
    Base,
}

impl RoutingMode {
    pub const ALL: [RoutingMode; 4] = [
        RoutingMode::SinglePass,
        RoutingMode::PerModalityPass,
        RoutingMode::PerSequence,
        RoutingMode::Base,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::SinglePass => "single_pass",
            RoutingMode::PerModalityPass => "per_modality_pass",
            RoutingMode::PerSequence => "per_sequence",
            RoutingMode::Base => "base",
        }
    }
}

impl std::str::FromStr for RoutingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| {
            format!(
                "unknown routing mode {s:?}; expected one of single_pass, per_modality_pass, per_sequence, base"
            )
        })
    }
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
