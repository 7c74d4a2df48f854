//! `adapter_config.json`: PEFT's LoRA fields as PEFT writes them, molora's
//! role under `"molora"`, and every other key kept as is so that a read and a
//! write give back what PEFT wrote. [`AdapterConfig::validate`] refuses the
//! settings molora cannot serve (DoRA, biases, fan-in-fan-out, per-module
//! ranks) instead of serving them wrongly.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::adapters::{AdapterRole, Projection};

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT's `adapter_config.json`, with molora's role under `"molora"`. Keys
/// molora does not interpret are kept in `extra` so they survive a round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    pub r: usize,
    #[serde(serialize_with = "write_number")]
    pub lora_alpha: f64,
    #[serde(deserialize_with = "read_target_modules")]
    pub target_modules: Vec<Projection>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default, deserialize_with = "read_layers")]
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub task_type: Option<String>,
    pub molora: AdapterRole,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `16.0` is written as `16`, as PEFT writes its integer alphas.
fn write_number<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

pub(super) fn known_modules() -> String {
    let names: Vec<&str> = Projection::ALL.iter().map(|p| p.module_name()).collect();
    names.join(", ")
}

/// A list of module names; a regex string (which PEFT also allows) or an
/// unknown name is refused, naming it.
fn read_target_modules<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<Projection>, D::Error> {
    use serde::de::Error;
    let value = serde_json::Value::deserialize(d)?;
    let serde_json::Value::Array(items) = value else {
        return Err(D::Error::custom(format!(
            "target_modules must be a list of module names ({}), found {value}",
            known_modules()
        )));
    };
    let mut targets = Vec::with_capacity(items.len());
    for item in items {
        let name = item.as_str().ok_or_else(|| {
            D::Error::custom(format!("target_modules holds {item}, not a module name"))
        })?;
        let proj = Projection::from_module_name(name).ok_or_else(|| {
            D::Error::custom(format!(
                "unknown target module {name:?} in target_modules (known: {})",
                known_modules()
            ))
        })?;
        if !targets.contains(&proj) {
            targets.push(proj);
        }
    }
    Ok(targets)
}

/// PEFT allows a single layer index as well as a list.
fn read_layers<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<usize>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(usize),
        Many(Vec<usize>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(l) => vec![l],
        OneOrMany::Many(ls) => ls,
    }))
}

impl AdapterConfig {
    /// A config for `targets` with PEFT's defaults.
    pub fn new(role: AdapterRole, r: usize, lora_alpha: f64, targets: &[Projection]) -> Self {
        let mut target_modules = targets.to_vec();
        target_modules.sort();
        target_modules.dedup();
        Self {
            peft_type: default_peft_type(),
            r,
            lora_alpha,
            target_modules,
            use_rslora: false,
            layers_to_transform: None,
            base_model_name_or_path: None,
            bias: default_bias(),
            fan_in_fan_out: false,
            task_type: Some("CAUSAL_LM".into()),
            molora: role,
            extra: BTreeMap::new(),
        }
    }

    /// Reads and validates the file; errors name it and the problem.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("{}: cannot read adapter config: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    /// Parses and validates the text of an `adapter_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).context("not valid JSON for an adapter config")?;
        if value.get("molora").is_none() {
            bail!(
                "no \"molora\" metadata: add e.g. \"molora\": {{\"kind\": \"modality\", \
                 \"modality\": \"image\"}} or {{\"kind\": \"semantic\", \"domain\": \"math\"}}"
            );
        }
        let cfg: Self =
            serde_json::from_value(value).context("not a valid PEFT LoRA adapter config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// The settings molora can serve; anything else would be silently wrong.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            bail!(
                "peft_type is {:?}; only \"LORA\" is supported",
                self.peft_type
            );
        }
        if self.r == 0 {
            bail!("r must be at least 1");
        }
        if !self.lora_alpha.is_finite() {
            bail!("lora_alpha {} is not finite", self.lora_alpha);
        }
        if self.target_modules.is_empty() {
            bail!("target_modules is empty");
        }
        if self.bias != "none" {
            bail!("bias is {:?}; only \"none\" is supported", self.bias);
        }
        if self.fan_in_fan_out {
            bail!("fan_in_fan_out is true; molora needs PEFT's default layout (false)");
        }
        if self
            .extra
            .get("use_dora")
            .is_some_and(|v| v.as_bool() == Some(true))
        {
            bail!("use_dora is true; DoRA adapters are not supported");
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(v) = self.extra.get(key) {
                if !(v.is_null() || v.as_object().is_some_and(|m| m.is_empty())) {
                    bail!("{key} is not empty; per-module ranks and alphas are not supported");
                }
            }
        }
        Ok(())
    }

    /// `lora_alpha / sqrt(r)` with rsLoRA, else `lora_alpha / r`.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        let s = if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        };
        s as f32
    }

    /// The layers this adapter covers in a model of `num_layers` layers.
    pub fn layers(&self, num_layers: usize) -> Vec<usize> {
        match &self.layers_to_transform {
            Some(ls) => ls.clone(),
            None => (0..num_layers).collect(),
        }
    }
}
