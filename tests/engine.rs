//! The engine end to end on a tiny random model: streaming, image blocks,
//! guidance, and continuous batching against runs alone.

mod common;
mod engine_support;

use std::collections::BTreeMap;

use engine_support::*;
use molora::engine::images::VQ_WEIGHTS_FILE;
use molora::engine::modality::{apply_mask, ModalityState};
use molora::engine::runner::SeqStep;
use molora::engine::sampler::{apply_cfg, argmax};
use molora::engine::{AdapterRequest, FinishReason, InferEvent};
use molora::routing::mode::RoutingMode;

#[test]
fn greedy_generation_streams_tokens_text_and_usage() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let prompt = text_prompt(&f.vocab, 9, 0);
    let events = run(
        &engine,
        request(
            prompt.clone(),
            params(0, 12, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    let ids = tokens(&events);
    assert_eq!(ids.len(), 12, "{events:?}");
    let c = completion(&events);
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.usage.prompt_tokens, prompt.len());
    assert_eq!(c.usage.text_tokens + c.usage.image_tokens, 12);
    assert_eq!(
        c.usage.image_tokens,
        ids.iter().filter(|&&t| f.vocab.is_image_code(t)).count()
    );
    assert_eq!(c.routing.mode, "single_pass");
    assert!(
        c.routing.passes >= 1 && c.routing.token_rows >= prompt.len() + 11,
        "{:?}",
        c.routing
    );
    assert!(
        c.routing.rows_per_adapter.contains_key("text"),
        "{:?}",
        c.routing.rows_per_adapter
    );
    assert!(c.routing.total_ms >= c.routing.forward_ms);

    // The deltas concatenate to the decoded text of the generated text ids.
    let text: String = events
        .iter()
        .filter_map(|e| {
            if let InferEvent::TextDelta(t) = e {
                Some(t.as_str())
            } else {
                None
            }
        })
        .collect();
    let specials = [
        f.vocab.bos,
        f.vocab.eos,
        f.vocab.pad,
        f.vocab.boi,
        f.vocab.eoi,
    ];
    let text_ids: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|t| !f.vocab.is_image_code(*t) && !specials.contains(&Some(*t)))
        .collect();
    assert_eq!(text, f.tokenizer.decode(&text_ids, true).unwrap());
    // Every token names its modality; text tokens name an adapter.
    for e in &events {
        if let InferEvent::Token {
            id,
            modality,
            adapter,
        } = e
        {
            assert_eq!(modality, &f.vocab.modalities[f.vocab.modality_of(*id)].name);
            assert!(adapter.is_some(), "token {id} has no serving adapter");
        }
    }
    // Text tokens are attributed to the gate's top pick, a semantic adapter.
    let semantic = ["math", "code", "caption", "chat"];
    assert!(
        events.iter().any(|e| matches!(e, InferEvent::Token { adapter: Some(a), .. } if semantic.contains(&a.as_str()))),
        "no token names a semantic adapter: {events:?}"
    );
    // Greedy is deterministic.
    let again = run(
        &engine,
        request(
            prompt,
            params(99, 12, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    assert_eq!(tokens(&again), ids);
    let stats = engine.stats();
    assert_eq!(stats.tokens_by_modality.values().sum::<u64>(), 24);
    assert!(
        stats.steps >= 12 && stats.requests_finished == 2,
        "{stats:?}"
    );
}

#[test]
fn an_image_block_is_tokens_per_image_codes_then_eoi_and_a_png() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let tpi = f.vocab.tokens_per_image;
    let mut req = request(
        image_prompt(&f.vocab),
        params(5, tpi + 3, 1.0),
        RoutingMode::SinglePass,
        Default::default(),
    );
    req.preview_every = Some(4);
    let events = run(&engine, req);
    let ids = tokens(&events);
    assert_eq!(ids.len(), tpi + 3, "{ids:?}");
    assert!(
        ids[..tpi].iter().all(|&t| f.vocab.is_image_code(t)),
        "{ids:?}"
    );
    assert_eq!(ids[tpi], f.vocab.eoi.unwrap());
    assert!(
        !ids[tpi + 1..].iter().any(|&t| f.vocab.is_image_code(t)),
        "text mode after <eoi>"
    );

    let previews: Vec<usize> = events
        .iter()
        .filter_map(|e| {
            if let InferEvent::ImagePreview { codes_done, .. } = e {
                Some(*codes_done)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(previews, vec![4, 8, 12]);
    let images: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, InferEvent::Image { .. }))
        .collect();
    assert_eq!(images.len(), 1);
    if let InferEvent::Image {
        index,
        png,
        width,
        height,
    } = images[0]
    {
        assert_eq!((*index, *width, *height), (0, 16, 16));
        let decoded = image::load_from_memory(png).expect("a valid PNG");
        assert_eq!((decoded.width(), decoded.height()), (16, 16));
    }
    // The image follows its <eoi> token.
    let eoi_at = events
        .iter()
        .position(|e| matches!(e, InferEvent::Token { id, .. } if Some(*id) == f.vocab.eoi));
    let img_at = events
        .iter()
        .position(|e| matches!(e, InferEvent::Image { .. }));
    assert!(eoi_at < img_at);
    // Pictures render on their own thread, yet arrive in order: each preview
    // right after the token that completed its codes, the image right after
    // <eoi>, and nothing after the final event.
    let token_at: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, InferEvent::Token { .. }))
        .map(|(i, _)| i)
        .collect();
    for done in [4, 8, 12] {
        assert!(
            matches!(&events[token_at[done - 1] + 1],
                InferEvent::ImagePreview { codes_done, .. } if *codes_done == done),
            "preview {done} is not right after code {done}"
        );
    }
    assert_eq!(img_at, eoi_at.map(|i| i + 1), "the image right after <eoi>");
    assert!(matches!(events.last(), Some(InferEvent::End(_))));
    let c = completion(&events);
    assert_eq!((c.usage.image_tokens, c.usage.images), (tpi, 1));

    // Image tokens are served by the image adapter.
    for e in &events {
        if let InferEvent::Token { id, adapter, .. } = e {
            if f.vocab.is_image_code(*id) {
                assert_eq!(adapter.as_deref(), Some("image"));
            }
        }
    }
}

#[test]
fn without_a_vq_model_a_finished_image_is_an_error_naming_the_file() {
    let f = fixture();
    let engine = start(&f, config(), false);
    let tpi = f.vocab.tokens_per_image;
    let events = run(
        &engine,
        request(
            image_prompt(&f.vocab),
            params(5, tpi + 3, 1.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    let ids = tokens(&events);
    assert_eq!(ids.len(), tpi + 1, "codes and <eoi> stream first");
    match events.last() {
        Some(InferEvent::Error(msg)) => assert!(msg.contains(VQ_WEIGHTS_FILE), "{msg}"),
        other => panic!("expected an Error, got {other:?}"),
    }
    // The engine keeps serving.
    let events = run(
        &engine,
        request(
            text_prompt(&f.vocab, 4, 1),
            params(1, 3, 0.0),
            RoutingMode::Base,
            Default::default(),
        ),
    );
    completion(&events);
}

/// Guidance: the first guided code is the argmax, over the image range, of
/// uncond + s·(cond − uncond), where cond sees the prompt and uncond only
/// `<bos> <boi>` — computed here by hand with the runner.
#[test]
fn guided_image_codes_use_the_unconditional_twin() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let tpi = f.vocab.tokens_per_image;
    let prompt = image_prompt(&f.vocab);
    let mut p = params(0, tpi + 1, 0.0);
    p.cfg_scale = 3.0;
    let guided = tokens(&run(
        &engine,
        request(
            prompt.clone(),
            p.clone(),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    ));
    assert_eq!(guided.len(), tpi + 1);
    assert!(guided[..tpi].iter().all(|&t| f.vocab.is_image_code(t)));
    assert_eq!(guided[tpi], f.vocab.eoi.unwrap());
    p.cfg_scale = 1.0;
    let plain = tokens(&run(
        &engine,
        request(
            prompt.clone(),
            p,
            RoutingMode::SinglePass,
            Default::default(),
        ),
    ));
    assert_ne!(guided, plain, "guidance changed nothing");

    let mut runner = common::runner(&f.path, 8);
    let sel = runner.default_selection().unwrap();
    let uncond_prompt = vec![f.vocab.bos.unwrap(), f.vocab.boi.unwrap()];
    let mut last = vec![];
    for toks in [&prompt, &uncond_prompt] {
        let mut pool = vec![runner.new_cache().unwrap()];
        let step = SeqStep {
            tokens: toks,
            mode: RoutingMode::SinglePass,
            adapters: &sel,
            caches: &[0],
        };
        let hidden = runner.forward(&[step], &mut pool).unwrap().hidden;
        let row = hidden.narrow(0, toks.len() - 1, 1).unwrap();
        last.push(
            runner
                .decoder
                .logits(&row)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    let mut cond = last[0].clone();
    apply_cfg(&mut cond, &last[1], 3.0, &f.vocab).unwrap();
    apply_mask(
        &mut cond,
        &ModalityState::Image { emitted: 0 }.allowed_mask(&f.vocab),
    );
    assert_eq!(argmax(&cond), Some(guided[0]));
}

#[test]
fn concurrent_requests_match_each_run_alone() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let v = &f.vocab;
    let forced = AdapterRequest {
        forced: vec!["math".into()],
        ..Default::default()
    };
    let semantic = AdapterRequest {
        semantic: Some(vec!["code".into()]),
        modality: Some(BTreeMap::from([("text".to_string(), "chat".to_string())])),
        ..Default::default()
    };
    let mut guided = params(7, 20, 0.9);
    guided.cfg_scale = 2.0;
    let reqs = [
        request(
            text_prompt(v, 30, 0),
            params(1, 24, 0.9),
            RoutingMode::SinglePass,
            Default::default(),
        ),
        request(
            text_prompt(v, 5, 1),
            params(2, 24, 0.0),
            RoutingMode::PerModalityPass,
            Default::default(),
        ),
        request(
            text_prompt(v, 17, 2),
            params(3, 24, 1.2),
            RoutingMode::PerSequence,
            forced,
        ),
        request(
            text_prompt(v, 3, 3),
            params(4, 24, 0.7),
            RoutingMode::Base,
            Default::default(),
        ),
        request(
            image_prompt(v),
            guided,
            RoutingMode::SinglePass,
            Default::default(),
        ),
        request(
            image_prompt(v),
            params(6, 20, 1.0),
            RoutingMode::PerModalityPass,
            semantic,
        ),
    ];
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| tokens(&run(&engine, r.clone())))
        .collect();
    let steps_alone = engine.stats().steps;
    let mut rxs: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("submit"))
        .collect();
    let together: Vec<Vec<u32>> = rxs.iter_mut().map(|rx| tokens(&collect(rx))).collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} differs when batched");
    }
    // Batched, the same work takes far fewer steps: the requests shared them.
    let steps_together = engine.stats().steps - steps_alone;
    assert!(
        steps_together * 2 < steps_alone,
        "{steps_together} steps batched vs {steps_alone} alone"
    );
}
