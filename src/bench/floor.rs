//! The floor of a decode step: the bytes it must read and the FLOPs it must
//! do, against this machine's measured bandwidth and matmul throughput.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::model::config::Config;

/// Work per decoded token of one model.
pub struct Flops {
    pub parameters: f64,
    /// Bytes of projection weights read per step (in their stored dtype).
    pub weight_bytes: f64,
    /// Weights + KV cache read per token at batch 1.
    pub bytes_per_token: f64,
    /// 2·(matmul weights) + attention against `context` tokens.
    pub base_per_token: f64,
    /// 2·r·(in + out) summed over the seven projections of every layer.
    pub lora_per_adapter: f64,
}

impl Flops {
    pub fn of(cfg: &Config, rank: usize, context: usize, weights: DType) -> Self {
        let (d, i, l, v) = (
            cfg.hidden_size as f64,
            cfg.intermediate_size as f64,
            cfg.num_hidden_layers as f64,
            cfg.vocab_size as f64,
        );
        let kv = (cfg.num_kv_heads() * cfg.head_dim()) as f64;
        let per_layer = d * d * 2.0 + d * kv * 2.0 + 3.0 * d * i;
        let matmul = l * per_layer + v * d; // + lm_head
        let parameters = matmul + v * d + l * 2.0 * d + d; // + embeddings and norms
        let ctx = context as f64 / 2.0; // mean context over a sequence
        let attention = l * 4.0 * ctx * d;
        let r = rank as f64;
        let lora_per_layer = 2.0 * r * ((d + d) * 2.0 + (d + kv) * 2.0 + 3.0 * (d + i));
        let weight_size = weights.size_in_bytes() as f64;
        Flops {
            parameters,
            weight_bytes: matmul * weight_size,
            bytes_per_token: matmul * weight_size + l * 2.0 * ctx * kv * 4.0,
            base_per_token: 2.0 * matmul + attention,
            lora_per_adapter: l * lora_per_layer,
        }
    }
}

/// This machine, measured now.
pub struct Machine {
    pub bytes_per_s: f64,
    pub flops_per_s: f64,
}

impl Machine {
    /// Read bandwidth over a buffer the size of the weights (so it sits where
    /// the weights sit: in L3 for the demo size) and the best f32 matmul rate.
    pub fn measure(weight_bytes: f64) -> candle_core::Result<Self> {
        let n = (weight_bytes / 4.0) as usize;
        let buf: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            // Sixteen independent lanes so the sum vectorises and the loop is
            // bound by loads, not by one dependency chain of additions.
            let mut lanes = [0f32; 16];
            for c in buf.chunks_exact(16) {
                for (l, x) in lanes.iter_mut().zip(c) {
                    *l += x;
                }
            }
            std::hint::black_box(lanes);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let bytes_per_s = weight_bytes / best;

        let m = 512;
        let a = Tensor::ones((m, m), candle_core::DType::F32, &Device::Cpu)?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let c = a.matmul(&a)?;
            std::hint::black_box(c);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let flops_per_s = 2.0 * (m * m * m) as f64 / best;
        Ok(Machine {
            bytes_per_s,
            flops_per_s,
        })
    }
}
