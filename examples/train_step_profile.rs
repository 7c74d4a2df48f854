//! Where one base training step goes: the whole step (forward, backward,
//! AdamW) of the demo decoder on a packed batch of the demo's shape, then
//! forward + backward of each part alone at the same sizes, so the parts
//! can be compared with the step and with their FLOP floor.
//!
//! cargo run --release --example train_step_profile -- [CONFIG.json] [STEPS]
//! (CONFIG defaults to models/demo/config.json; weights are freshly
//! initialised, batch 4 rows x 256 tokens of three ~85-token sequences.)

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use molora::model::config::Config;
use molora::train::batch::{PackedBatch, TrainSeq};
use molora::train::decoder::{
    cross_entropy, init_tensors, rms_norm, set_vars, NoAdapters, TrainDecoder,
};
use molora::train::vq_train::AdamW;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One part of the step: builds its output, whose sum is differentiated.
type Part<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;

const ROWS: usize = 4;
const LEN: usize = 256;
const SEQ: usize = 85;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .map_or("models/demo/config.json", String::as_str);
    let steps: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let cfg = Config::from_file(std::path::Path::new(path))?;
    let dev = Device::Cpu;
    let batch = batch(&cfg, &dev)?;

    // The composed ops and the fused ones (`TrainDecoder::with_fused_ops`),
    // steps alternating so both see the same machine.
    let mut runs: Vec<Timed> = [false, true]
        .into_iter()
        .map(|fused| Timed::new(&cfg, fused, &dev))
        .collect::<Result<_>>()?;
    for step in 0..=steps {
        for run in runs.iter_mut() {
            run.step(&batch, step > 0)?;
        }
    }
    let n = steps as f64;
    let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let tokens = (ROWS * LEN) as f64;
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let linear_params = cfg.num_hidden_layers * (d * (d + 2 * kv + d) + 3 * d * i) + v * d;
    let attn_flops = 4.0
        * (ROWS * cfg.num_attention_heads * LEN * LEN * cfg.head_dim()) as f64
        * cfg.num_hidden_layers as f64;
    let step_flops = 3.0 * (2.0 * linear_params as f64 * tokens + attn_flops);
    println!("demo decoder: {linear_params} matmul parameters, {:.1} GFLOP per step (forward + backward), {steps} steps each", step_flops / 1e9);
    println!("| ops | step ms | forward | backward | AdamW | GFLOP/s | loss after |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for run in &runs {
        let [f, b, a] = run.seconds.map(|s| 1e3 * s / n);
        println!(
            "| {} | {:.0} | {f:.0} | {b:.0} | {a:.0} | {:.0} | {:.4} |",
            if run.fused { "fused" } else { "composed" },
            f + b + a,
            step_flops / ((f + b + a) / 1e3) / 1e9,
            run.last_loss
        );
    }
    let step = runs[0].seconds.iter().sum::<f64>() / n;
    println!(
        "speed-up of the fused step: {:.2}x",
        step / (runs[1].seconds.iter().sum::<f64>() / n)
    );

    // The parts, each forward + backward at one layer's sizes, times the layers.
    let layers = cfg.num_hidden_layers as f64;
    let (h, hd) = (cfg.num_attention_heads, cfg.head_dim());
    let nt = ROWS * LEN;
    let mut rng = StdRng::seed_from_u64(3);
    let mut rand = |shape: &[usize]| -> Result<Var> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)?)
    };
    let x = rand(&[nt, d])?;
    let wq = rand(&[d + 2 * kv + d, d])?;
    let wmlp = rand(&[3 * i, d])?;
    let wd = rand(&[d, i])?;
    let norm_w = rand(&[d])?;
    let q = rand(&[ROWS, h, LEN, hd])?;
    let k = rand(&[ROWS, h, LEN, hd])?;
    let g = rand(&[nt, i])?;
    let u = rand(&[nt, i])?;
    let hx = rand(&[nt, d])?;
    let lm = rand(&[v, d])?;
    let scale = 1.0 / (hd as f64).sqrt();
    let parts: Vec<(&str, f64, Part)> = vec![
        (
            "linears (q,k,v,o + gate,up,down)",
            layers,
            Box::new(|| {
                let a = x.matmul(&wq.t()?)?.sum_all()?;
                let b = x.matmul(&wmlp.t()?)?.sum_all()?;
                let c = g.matmul(&wd.t()?)?.sum_all()?;
                (a + b)? + c
            }),
        ),
        (
            "attention core (scores, mask, softmax, mix)",
            layers,
            Box::new(|| {
                let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&batch.mask)?;
                let p = candle_nn::ops::softmax(&s, D::Minus1)?;
                p.matmul(&k.as_tensor().contiguous()?)?.sum_all()
            }),
        ),
        (
            "2 RMSNorms",
            2.0 * layers,
            Box::new(|| rms_norm(&x, &norm_w, 1e-5)?.sum_all()),
        ),
        (
            "SiLU gate",
            layers,
            Box::new(|| (candle_nn::ops::silu(&g)? * u.as_tensor())?.sum_all()),
        ),
        (
            "lm_head + cross-entropy",
            1.0,
            Box::new(|| cross_entropy(&hx.matmul(&lm.t()?)?, &batch)),
        ),
    ];
    println!("\nThe composed parts alone, forward + backward, per step:\n");
    println!("| part | ms per step (fwd+bwd) | share of composed step |");
    println!("| --- | ---: | ---: |");
    let mut sum = 0.0;
    for (name, times, f) in &parts {
        let _ = f()?.backward()?;
        let t0 = Instant::now();
        for _ in 0..steps {
            let _ = f()?.backward()?;
        }
        let ms = 1e3 * t0.elapsed().as_secs_f64() / n * times;
        sum += ms;
        println!("| {name} | {ms:.0} | {:.0}% |", ms / 10.0 / step);
    }
    println!("| parts listed | {sum:.0} | {:.0}% |", sum / 10.0 / step);
    Ok(())
}

/// Three ~85-token sequences per row, random ids, every target weighed 1.
fn batch(cfg: &Config, dev: &Device) -> Result<PackedBatch> {
    let mut rng = StdRng::seed_from_u64(7);
    let seqs: Vec<TrainSeq> = (0..ROWS * (LEN / SEQ))
        .map(|_| TrainSeq {
            ids: (0..SEQ)
                .map(|_| rng.random_range(5..cfg.vocab_size as u32))
                .collect(),
            weights: vec![1.0; SEQ],
            labels: vec![None; SEQ],
        })
        .collect();
    PackedBatch::pack(&seqs, ROWS, LEN, 0, dev)
}

/// One decoder trained step by step, with the time of each phase.
struct Timed {
    model: TrainDecoder,
    opt: AdamW,
    fused: bool,
    /// Forward, backward, AdamW.
    seconds: [f64; 3],
    last_loss: f32,
    _varmap: VarMap,
}

impl Timed {
    fn new(cfg: &Config, fused: bool, dev: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let model = TrainDecoder::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?
            .with_fused_ops(fused);
        set_vars(&varmap, &init_tensors(cfg, 1)?)?;
        let vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: 1e-3,
                ..ParamsAdamW::default()
            },
        )?;
        Ok(Self {
            model,
            opt,
            fused,
            seconds: [0.0; 3],
            last_loss: 0.0,
            _varmap: varmap,
        })
    }

    fn step(&mut self, batch: &PackedBatch, timed: bool) -> Result<()> {
        let t0 = Instant::now();
        let loss = self.model.loss(batch, &NoAdapters)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        self.opt.step(&grads)?;
        let t3 = Instant::now();
        self.last_loss = loss.to_scalar()?;
        if timed {
            for (s, d) in self.seconds.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
                *s += d.as_secs_f64();
            }
        }
        Ok(())
    }
}
