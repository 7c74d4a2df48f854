//! What real Hugging Face Chameleon `config.json` files say in other words
//! than molora's [`Config`](super::config::Config) fields, resolved once
//! before the config is parsed or used.
//!
//! - transformers >= 5 writes RoPE as `"rope_parameters": {"rope_type":
//!   "default", "rope_theta": 10000.0}` and no top-level `rope_theta`; 4.x
//!   wrote `rope_theta` and `rope_scaling`. Both read to the same base; any
//!   scaled RoPE is refused (molora implements the default one only), never
//!   silently computed as unscaled.
//! - `eos_token_id` may be a list; a one-element list is that id.
//! - The VQ model's config (`vq_config`) fixes the image grid and the
//!   codebook size, which must agree with molora's grid fields and with the
//!   image-code id range: every code needs exactly one token id.
//!
//! Errors name the field, so that a user can fix the file.

use std::ops::Range;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::vq::VqConfig;

/// Rewrites the HF-only spellings of `config.json` into molora's fields, in
/// place, refusing what molora cannot compute.
pub fn normalize_hf_fields(config: &mut Value) -> Result<()> {
    let Some(obj) = config.as_object_mut() else {
        bail!("config.json must hold a JSON object");
    };
    if let Some(scaling) = obj.get("rope_scaling").filter(|v| !v.is_null()) {
        bail!("rope_scaling {scaling} is not supported: molora implements the default RoPE only");
    }
    if let Some(params) = obj.get("rope_parameters").filter(|v| !v.is_null()) {
        let theta = rope_theta_of(params)?;
        if let Some(top) = obj.get("rope_theta").and_then(Value::as_f64) {
            if top != theta {
                bail!(
                    "rope_theta {top} disagrees with rope_parameters.rope_theta {theta}; give one"
                );
            }
        }
        obj.insert("rope_theta".into(), Value::from(theta));
    }
    if let Some(Value::Array(ids)) = obj.get("eos_token_id") {
        match ids.as_slice() {
            [one] => {
                let one = one.clone();
                obj.insert("eos_token_id".into(), one);
            }
            _ => bail!(
                "eos_token_id lists {} ids; molora stops on one end-of-sequence id",
                ids.len()
            ),
        }
    }
    Ok(())
}

/// The base of a `rope_parameters` object whose type is the default RoPE.
fn rope_theta_of(params: &Value) -> Result<f64> {
    let Some(p) = params.as_object() else {
        bail!("rope_parameters must be an object, found {params}");
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if kind != "default" {
        bail!(
            "rope_parameters.rope_type {kind:?} is not supported: molora implements the default RoPE only"
        );
    }
    if let Some(f) = p.get("partial_rotary_factor").and_then(Value::as_f64) {
        if f != 1.0 {
            bail!("rope_parameters.partial_rotary_factor {f} is not supported (only 1.0)");
        }
    }
    match p.get("rope_theta") {
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite() && *t > 0.0)
            .with_context(|| format!("rope_parameters.rope_theta {v} is not a positive number")),
        None => bail!("rope_parameters has no rope_theta"),
    }
}

/// The VQ config of `config.json`'s `vq_config`, validated.
pub fn vq_config_of(vq_config: Option<&Value>) -> Result<Option<VqConfig>> {
    vq_config
        .filter(|v| !v.is_null())
        .map(VqConfig::from_value)
        .transpose()
}

/// Refuses a VQ codebook that does not give exactly one code per id of the
/// image range.
pub fn check_codebook(vq: &VqConfig, image_range: &Range<u32>) -> Result<()> {
    if vq.num_embeddings != image_range.len() {
        bail!(
            "vq_config.num_embeddings {} disagrees with the image-code token range {:?} ({} ids): \
             every codebook entry needs exactly one image token",
            vq.num_embeddings,
            image_range,
            image_range.len()
        );
    }
    Ok(())
}

/// The image grid: molora's `image_grid` / `tokens_per_image` when given,
/// else the VQ model's grid, else Chameleon's 32 x 32. Given ones must
/// agree with each other and with the VQ model.
pub fn image_grid(
    grid: Option<[usize; 2]>,
    tokens_per_image: Option<usize>,
    vq: Option<&VqConfig>,
) -> Result<[usize; 2]> {
    let given = match (grid, tokens_per_image) {
        (Some(g), Some(t)) if g[0] * g[1] != t => {
            bail!(
                "image_grid {g:?} holds {} codes but tokens_per_image is {t}",
                g[0] * g[1]
            )
        }
        (Some(g), _) => Some(g),
        (None, Some(t)) => {
            let side = (t as f64).sqrt() as usize;
            if side * side != t {
                bail!("tokens_per_image {t} is not a square; give image_grid too");
            }
            Some([side, side])
        }
        (None, None) => None,
    };
    match (given, vq) {
        (Some(g), Some(vq)) if g[0] * g[1] != vq.tokens_per_image() => bail!(
            "molora.image_grid {g:?} ({} codes) disagrees with vq_config, whose {s}x{s} grid \
             (resolution / 2^(len(channel_multiplier) - 1)) holds {} codes",
            g[0] * g[1],
            vq.tokens_per_image(),
            s = vq.grid_size()
        ),
        (Some(g), _) => Ok(g),
        (None, Some(vq)) => Ok([vq.grid_size(), vq.grid_size()]),
        // Chameleon: 1024 codes per 512x512 picture.
        (None, None) => Ok([32, 32]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn normalized(v: Value) -> Result<Value> {
        let mut v = v;
        normalize_hf_fields(&mut v)?;
        Ok(v)
    }

    #[test]
    fn rope_parameters_give_the_base() {
        let v = normalized(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}))
            .unwrap();
        assert_eq!(v["rope_theta"], json!(5e5));
        let v = normalized(json!({"rope_theta": 1e4, "rope_scaling": null})).unwrap();
        assert_eq!(v["rope_theta"], json!(1e4));
    }

    #[test]
    fn scaled_or_conflicting_rope_is_refused_naming_the_field() {
        for (v, field) in [
            (
                json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
                "rope_parameters.rope_type",
            ),
            (
                json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
                "rope_scaling",
            ),
            (
                json!({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e4}}),
                "rope_parameters.rope_theta",
            ),
            (
                json!({"rope_parameters": {"rope_type": "default"}}),
                "rope_theta",
            ),
        ] {
            let e = format!("{:#}", normalized(v).unwrap_err());
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn eos_list_of_one_is_that_id() {
        assert_eq!(
            normalized(json!({"eos_token_id": [2]})).unwrap()["eos_token_id"],
            json!(2)
        );
        let e = format!(
            "{:#}",
            normalized(json!({"eos_token_id": [2, 7]})).unwrap_err()
        );
        assert!(e.contains("eos_token_id"), "{e}");
    }

    #[test]
    fn grid_comes_from_the_vq_model_and_must_agree() {
        let vq = VqConfig::chameleon();
        assert_eq!(image_grid(None, None, Some(&vq)).unwrap(), [32, 32]);
        assert_eq!(image_grid(None, Some(64), None).unwrap(), [8, 8]);
        let e = format!(
            "{:#}",
            image_grid(Some([8, 8]), None, Some(&vq)).unwrap_err()
        );
        assert!(e.contains("image_grid") && e.contains("vq_config"), "{e}");
        let e = format!("{:#}", check_codebook(&vq, &(4..4100)).unwrap_err());
        assert!(e.contains("vq_config.num_embeddings 8192"), "{e}");
        check_codebook(&vq, &(4..8196)).unwrap();
    }
}
