//! The SwiGLU MLP of a decoder layer: `down(silu(gate(x)) · up(x))`, with
//! gate and up stacked into one projection so the base matmul runs once.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::Config;
use super::decoder::LayerAdapters;
use super::norms::{silu_mul, with_host_f32, KernelPath};
use crate::adapters::Projection;

#[derive(Debug, Clone)]
pub struct Mlp {
    /// `[2·intermediate, d]`: gate rows first, then up.
    gate_up: Tensor,
    gate_up_bias: Option<Tensor>,
    down: Tensor,
    down_bias: Option<Tensor>,
    intermediate: usize,
}

impl Mlp {
    /// Stores the projection weights in `dtype` (see `Decoder::set_weight_dtype`).
    pub(crate) fn set_weight_dtype(&mut self, dtype: DType) -> Result<()> {
        self.gate_up = self.gate_up.to_dtype(dtype)?;
        self.down = self.down.to_dtype(dtype)?;
        Ok(())
    }

    /// Loads `mlp.*` (pass `vb.pp("mlp")`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let w = |name: &str, out: usize, inp: usize| vb.pp(name).get((out, inp), "weight");
        let gate_up = Tensor::cat(&[w("gate_proj", i, d)?, w("up_proj", i, d)?], 0)?;
        let down = w("down_proj", d, i)?;
        let (gate_up_bias, down_bias) = if cfg.mlp_bias {
            let b = |name: &str, out: usize| vb.pp(name).get(out, "bias");
            (
                Some(Tensor::cat(&[b("gate_proj", i)?, b("up_proj", i)?], 0)?),
                Some(b("down_proj", d)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            gate_up,
            gate_up_bias,
            down,
            down_bias,
            intermediate: i,
        })
    }

    /// `[N, d] -> [N, d]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        adapters: &LayerAdapters<'_>,
        path: KernelPath,
    ) -> Result<Tensor> {
        let i = self.intermediate;
        let gu = adapters.linear(
            x,
            &self.gate_up,
            self.gate_up_bias.as_ref(),
            &[(Projection::GateProj, 0), (Projection::UpProj, i)],
        )?;
        let act = match path {
            KernelPath::TensorOps => {
                (candle_nn::ops::silu(&gu.narrow(1, 0, i)?)? * gu.narrow(1, i, i)?)?
            }
            KernelPath::HostSlices => {
                let n = gu.dim(0)?;
                let mut out = vec![0f32; n * i];
                with_host_f32(&gu, |gu| {
                    for (row, o) in gu.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
                        let (g, u) = row.split_at(i);
                        silu_mul(g, u, o);
                    }
                    Ok(())
                })?;
                Tensor::from_vec(out, (n, i), gu.device())?
            }
        };
        adapters.linear(
            &act,
            &self.down,
            self.down_bias.as_ref(),
            &[(Projection::DownProj, 0)],
        )
    }
}
