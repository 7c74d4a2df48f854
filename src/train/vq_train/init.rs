//! The VQ's initial weights: PyTorch's default initialisation from a
//! seeded RNG (candle's CPU RNG cannot be seeded).

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{named_vars, CODEBOOK};

/// PyTorch's default initialisation, drawn from `seed` in name order:
/// conv weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), GroupNorm
/// weight 1 and bias 0, the codebook U(-1/n, 1/n) (taming's).
pub fn init_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut vars = named_vars(varmap);
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let shapes: std::collections::HashMap<String, Vec<usize>> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, var) in &vars {
        let dims = var.dims().to_vec();
        let count: usize = dims.iter().product();
        let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let weight_dims = shapes.get(&format!("{module}.weight"));
        let data: Vec<f32> = if name == CODEBOOK {
            let bound = 1.0 / dims[0] as f32;
            (0..count)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        } else if let Some(w) = weight_dims.filter(|w| w.len() == 4) {
            // A conv: fan_in = in_channels * k * k.
            let fan_in: usize = w[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..count)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        } else if leaf == "weight" {
            vec![1.0; count]
        } else {
            vec![0.0; count]
        };
        let t = Tensor::from_vec(data, dims, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
