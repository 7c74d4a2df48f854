use super::*;
use crate::engine::modality::test_layout;

fn params(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
    }
}

/// Deterministic pseudo-random logits in [-4, 4).
fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
}

fn counts(logits: &[f32], p: &SamplingParams, draws: usize, seed: u64) -> Vec<usize> {
    let mut s = Sampler::new(seed);
    let mut hist = vec![0usize; logits.len()];
    for _ in 0..draws {
        hist[s.sample(logits, p).expect("sample") as usize] += 1;
    }
    hist
}

#[test]
fn greedy_picks_argmax_lowest_id_on_ties_and_skips_nan() {
    let mut s = Sampler::new(0);
    let g = SamplingParams::greedy();
    assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &g), Ok(1));
    assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0], &g), Ok(1));
    assert_eq!(s.sample(&[f32::NAN, -1.0, f32::NEG_INFINITY], &g), Ok(1));
    let masked = [f32::NEG_INFINITY; 4];
    assert_eq!(
        s.sample(&masked, &g),
        Err(SamplingError::NoCandidate { vocab: 4 })
    );
    assert_eq!(
        s.sample(&masked, &params(1.0, Some(2), Some(0.5))),
        Err(SamplingError::NoCandidate { vocab: 4 })
    );
    assert!(s.sample(&[], &g).is_err());
}

#[test]
fn same_seed_same_draws_whatever_runs_beside_it() {
    let logits = random_logits(200, 1);
    let p = params(1.0, None, None);
    let alone: Vec<u32> = {
        let mut s = Sampler::new(42);
        (0..100).map(|_| s.sample(&logits, &p).unwrap()).collect()
    };
    // The same sequence interleaved with another one's draws.
    let mut mine = Sampler::new(42);
    let mut other = Sampler::new(43);
    let mut batched = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..100 {
        theirs.push(other.sample(&logits, &p).unwrap());
        batched.push(mine.sample(&logits, &p).unwrap());
    }
    assert_eq!(alone, batched);
    assert_ne!(alone, theirs, "a different seed gives different draws");
    // A greedy step in between (e.g. greedy text between image tokens)
    // consumes no randomness.
    let mut s = Sampler::new(42);
    let mut with_greedy = Vec::new();
    for _ in 0..100 {
        s.sample(&logits, &SamplingParams::greedy()).unwrap();
        with_greedy.push(s.sample(&logits, &p).unwrap());
    }
    assert_eq!(alone, with_greedy);
}

#[test]
fn top_k_1_equals_greedy() {
    for seed in 0..50 {
        let logits = random_logits(300, seed);
        let mut s = Sampler::new(seed);
        let want = argmax(&logits);
        for t in [0.5, 1.0, 5.0] {
            assert_eq!(s.sample(&logits, &params(t, Some(1), None)).ok(), want);
        }
    }
}

#[test]
fn top_k_draws_only_the_k_best_in_softmax_proportion() {
    let logits = random_logits(500, 7);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let k = 5;
    let hist = counts(&logits, &params(1.0, Some(k), None), 20_000, 3);
    let z: f64 = order[..k].iter().map(|&i| (logits[i] as f64).exp()).sum();
    for (rank, &i) in order.iter().enumerate() {
        if rank >= k {
            assert_eq!(hist[i], 0, "token of rank {rank} drawn");
        } else {
            let want = (logits[i] as f64).exp() / z;
            let got = hist[i] as f64 / 20_000.0;
            assert!((got - want).abs() < 0.02, "rank {rank}: {got} vs {want}");
        }
    }
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_p() {
    // Probabilities 0.4, 0.3, 0.2, 0.1 on ids 3, 0, 2, 1; vocab padded
    // with masked ids.
    let probs = [(3usize, 0.4f64), (0, 0.3), (2, 0.2), (1, 0.1)];
    let mut logits = vec![f32::NEG_INFINITY; 8];
    for (id, p) in probs {
        logits[id] = p.ln() as f32;
    }
    let draws = 40_000;
    // p = 0.65: 0.4 < 0.65 <= 0.7, so ids 3 and 0 only.
    let hist = counts(&logits, &params(1.0, None, Some(0.65)), draws, 11);
    assert_eq!(hist[2] + hist[1], 0);
    let f3 = hist[3] as f64 / draws as f64;
    assert!((f3 - 0.4 / 0.7).abs() < 0.015, "id 3 frequency {f3}");
    // p = 0.75: the prefix must grow to three tokens (mass 0.9).
    let hist = counts(&logits, &params(1.0, None, Some(0.75)), draws, 12);
    assert_eq!(hist[1], 0);
    assert!(hist[2] > 0);
    let f2 = hist[2] as f64 / draws as f64;
    assert!((f2 - 0.2 / 0.9).abs() < 0.015, "id 2 frequency {f2}");
    // p = 0.3: the single best token.
    let hist = counts(&logits, &params(1.0, None, Some(0.3)), 1000, 13);
    assert_eq!(hist[3], 1000);
}

#[test]
fn temperature_to_zero_is_argmax() {
    for seed in 0..20 {
        let mut logits = random_logits(1000, seed);
        let want = argmax(&logits).unwrap();
        // A clear winner: 0.01 / 1e-4 = 100 nats above the rest.
        logits[want as usize] += 0.01;
        let mut s = Sampler::new(seed);
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &params(1e-4, None, None)), Ok(want));
        }
    }
    // And high temperature flattens: on two logits 1 apart, T = 100 gives
    // nearly even odds.
    let hist = counts(&[1.0, 0.0], &params(100.0, None, None), 20_000, 9);
    let f0 = hist[0] as f64 / 20_000.0;
    assert!((f0 - 0.5025).abs() < 0.015, "{f0}");
}

#[test]
fn plain_temperature_sampling_follows_the_softmax() {
    let logits = [0.0f32, 1.0, 2.0, f32::NEG_INFINITY];
    let t = 2.0f64;
    let hist = counts(&logits, &params(t as f32, None, None), 40_000, 5);
    let w: Vec<f64> = [0.0, 1.0, 2.0]
        .iter()
        .map(|l: &f64| (l / t).exp())
        .collect();
    let z: f64 = w.iter().sum();
    for i in 0..3 {
        let got = hist[i] as f64 / 40_000.0;
        assert!((got - w[i] / z).abs() < 0.015, "id {i}: {got}");
    }
    assert_eq!(hist[3], 0);
}

#[test]
fn cfg_applies_the_formula_on_the_image_range_only() {
    let v = test_layout(true);
    let cond: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
    let uncond: Vec<f32> = (0..128).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut out = cond.clone();
    apply_cfg(&mut out, &uncond, 3.0, &v).unwrap();
    for i in 0..128 {
        if v.image_range().contains(&(i as u32)) {
            let want = uncond[i] + 3.0 * (cond[i] - uncond[i]);
            assert!((out[i] - want).abs() < 1e-6, "id {i}");
        } else {
            assert_eq!(out[i], cond[i], "id {i} untouched");
        }
    }
    let mut same = cond.clone();
    apply_cfg(&mut same, &uncond, 1.0, &v).unwrap();
    assert_eq!(same, cond);
    assert_eq!(
        apply_cfg(&mut same, &uncond[..5], 2.0, &v),
        Err(SamplingError::CfgLengthMismatch {
            cond: 128,
            uncond: 5
        })
    );
}

#[test]
fn choose_next_masks_by_state_and_forces_eoi() {
    let v = test_layout(true);
    let (boi, eoi) = (v.boi.unwrap(), v.eoi.unwrap());
    let mut gp: GenerationParams = serde_json::from_str(r#"{"seed": 3}"#).unwrap();
    gp.text = SamplingParams::greedy();
    let mut state = ModalityState::Text;
    let mut sampler = Sampler::new(gp.seed);

    // Text mode: the best logits sit on an image code, <eoi> and an
    // unused id; the best allowed is text token 20.
    let mut logits = vec![0.0f32; 128];
    logits[70] = 9.0;
    logits[eoi as usize] = 8.0;
    logits[125] = 7.0;
    logits[20] = 1.0;
    let step = choose_next(&mut state, &mut sampler, &mut logits, None, &gp, &v).unwrap();
    assert_eq!(
        step,
        Chosen {
            token: 20,
            forced: None
        }
    );

    let mut logits = vec![0.0f32; 128];
    logits[boi as usize] = 2.0;
    let step = choose_next(&mut state, &mut sampler, &mut logits, None, &gp, &v).unwrap();
    assert_eq!(step.token, boi);
    assert_eq!(state, ModalityState::Image { emitted: 0 });

    // Image mode: text tokens score highest, yet only codes come out;
    // the 16th code forces <eoi>.
    let mut rng = StdRng::seed_from_u64(1);
    for i in 0..v.tokens_per_image {
        let mut logits: Vec<f32> = (0..128).map(|_| rng.random::<f32>()).collect();
        logits[10] = 50.0;
        logits[v.eos.unwrap() as usize] = 50.0;
        let uncond = vec![0.0f32; 128];
        let step = choose_next(
            &mut state,
            &mut sampler,
            &mut logits,
            Some(&uncond),
            &gp,
            &v,
        )
        .unwrap();
        assert!(v.is_image_code(step.token), "step {i}: {}", step.token);
        let last = i + 1 == v.tokens_per_image;
        assert_eq!(step.forced, last.then_some(eoi), "step {i}");
    }
    assert_eq!(state, ModalityState::Text);
}

#[test]
fn choose_next_guides_image_tokens_only() {
    let v = test_layout(true);
    let mut gp: GenerationParams = serde_json::from_str(r#"{"seed": 1}"#).unwrap();
    gp.text = SamplingParams::greedy();
    gp.image = SamplingParams::greedy();
    let (a, b) = (v.image_token(0) as usize, v.image_token(1) as usize);
    let mut cond = vec![0.0f32; 128];
    cond[a] = 1.0;
    cond[b] = 0.9;
    cond[10] = 0.5;
    let mut uncond = vec![0.0f32; 128];
    uncond[a] = 1.0;
    uncond[10] = 5.0; // would win in text mode if guidance touched it
    let step = |scale: f32, state: ModalityState| {
        let mut gp = gp.clone();
        gp.cfg_scale = scale;
        let (mut state, mut sampler, mut logits) = (state, Sampler::new(1), cond.clone());
        choose_next(
            &mut state,
            &mut sampler,
            &mut logits,
            Some(&uncond),
            &gp,
            &v,
        )
        .unwrap()
        .token
    };
    let image = ModalityState::Image { emitted: 0 };
    assert_eq!(step(1.0, image) as usize, a, "no guidance: the cond argmax");
    // Guided: a = 1 + 3·0 = 1, b = 0 + 3·0.9 = 2.7.
    assert_eq!(step(3.0, image) as usize, b);
    assert_eq!(step(3.0, ModalityState::Text), 10, "text logits unguided");
}

/// Measurement, run by hand: `cargo test --release --lib
/// engine::sampler::tests::sampling_cost -- --ignored --nocapture`.
/// Reports the best of 40 rounds of 10 draws, so that time lost to other
/// processes on a shared machine is left out.
#[test]
#[ignore]
fn sampling_cost() {
    fn best_us(mut f: impl FnMut()) -> f64 {
        (0..40)
            .map(|_| {
                let t0 = std::time::Instant::now();
                for _ in 0..10 {
                    f();
                }
                t0.elapsed().as_secs_f64() * 1e6 / 10.0
            })
            .fold(f64::INFINITY, f64::min)
    }
    for vocab in [4096usize, 65_536] {
        let logits = random_logits(vocab, 1);
        let peaked: Vec<f32> = logits.iter().map(|l| l * 4.0).collect();
        let mut s = Sampler::new(1);
        let floor = best_us(|| {
            std::hint::black_box(std::hint::black_box(&logits).iter().sum::<f32>());
        });
        println!("vocab {vocab}, one pass (sum): {floor:.1} us");
        for (name, p, logits) in [
            ("greedy", SamplingParams::greedy(), &logits),
            ("temperature", params(0.7, None, None), &logits),
            ("top_k 100", params(1.0, Some(100), None), &logits),
            ("top_p 0.9 flat", params(0.7, None, Some(0.9)), &logits),
            ("top_p 0.9 peaked", params(0.7, None, Some(0.9)), &peaked),
            (
                "top_k 50 + top_p 0.9",
                params(0.7, Some(50), Some(0.9)),
                &logits,
            ),
        ] {
            let us = best_us(|| {
                std::hint::black_box(s.sample(logits, &p).unwrap());
            });
            println!("vocab {vocab}, {name}: {us:.1} us/token");
        }
    }
}
