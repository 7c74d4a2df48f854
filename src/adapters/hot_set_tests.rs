//! The hot set: LRU eviction, in-use and pinned adapters kept, bad names
//! refused, and routed outputs that stay exact across eviction and reload.

use candle_core::{Device, IndexOp, Tensor};

use super::hot_set::{HotSet, HotSetConfig, SlotStatus};
use super::peft::LoraAdapter;
use super::tests::{random_adapter, tiny_config};
use super::{Projection, SlotId};
use crate::dispatch::{self, LoraTarget, SlotWeights};
use crate::routing::plan::RoutingPlan;

fn hot_set(capacity: usize, max_rank: usize) -> HotSet {
    let cfg = HotSetConfig { capacity, max_rank };
    HotSet::new(&tiny_config(), cfg, &Device::Cpu).unwrap()
}

/// A hot set holding adapters "a", "b", "c" (ranks 2, 4, 3) in the cold set.
fn hot_set_with_abc(capacity: usize) -> HotSet {
    let mut hs = hot_set(capacity, 4);
    let qvd = [Projection::QProj, Projection::VProj, Projection::DownProj];
    hs.register(random_adapter("a", 2, &qvd, 1)).unwrap();
    hs.register(random_adapter("b", 4, &Projection::ALL, 2))
        .unwrap();
    hs.register(random_adapter(
        "c",
        3,
        &[Projection::KProj, Projection::QProj],
        3,
    ))
    .unwrap();
    hs
}

/// Acquire then release: one use that leaves the adapter idle but touched.
fn touch(hs: &mut HotSet, name: &str) -> SlotId {
    let slot = hs.acquire(name).unwrap();
    hs.release(name).unwrap();
    slot
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn slots_start_zero_and_slot_zero_is_null() {
    let hs = hot_set(3, 4);
    assert_eq!(hs.num_slots(), 4);
    let w = hs.weights(1, Projection::DownProj);
    assert_eq!(w.a.dims(), &[4, 4, 32]);
    assert_eq!(w.b.dims(), &[4, 16, 4]);
    assert_eq!(w.scale, vec![0.0; 4]);
    assert_eq!(max_abs(&w.a), 0.0);
    let kv = hs.weights(0, Projection::KProj);
    assert_eq!(kv.b.dims(), &[4, 16, 4]);
    assert!(hs.status().iter().all(|s| s.adapter.is_none()));
}

#[test]
fn loading_past_capacity_evicts_the_least_recently_used() {
    let mut hs = hot_set_with_abc(2);
    let sa = touch(&mut hs, "a");
    let sb = touch(&mut hs, "b");
    assert_ne!(sa, sb);
    assert_eq!(touch(&mut hs, "a"), sa); // a is now more recent than b
    let sc = touch(&mut hs, "c");
    assert_eq!(sc, sb, "c takes the slot of b, the least recently used");
    assert_eq!(hs.slot_of("b"), None);
    assert_eq!(hs.slot_of("a"), Some(sa));
    assert_eq!(hs.cold_names(), vec!["b".to_string()]);
    assert_eq!(hs.names().len(), 3);
    assert_eq!((hs.hits(), hs.misses(), hs.evictions()), (1, 3, 1));
    assert_eq!(
        hs.status()[(sc - 1) as usize],
        SlotStatus {
            slot: sc,
            adapter: Some("c".into()),
            rank: 3,
            in_use: 0,
            pinned: false
        }
    );
}

#[test]
fn in_use_adapters_are_never_evicted() {
    let mut hs = hot_set_with_abc(2);
    let sa = hs.acquire("a").unwrap();
    let sb = hs.acquire("b").unwrap();
    assert_eq!(hs.acquire("a").unwrap(), sa); // two uses of a now
    let msg = format!("{:#}", hs.acquire("c").unwrap_err());
    assert!(msg.contains("hot set full: 2 slots all in use"), "{msg}");
    assert_eq!(hs.slot_of("a"), Some(sa));
    assert_eq!(hs.slot_of("b"), Some(sb));
    hs.release("a").unwrap();
    assert!(hs.acquire("c").is_err(), "a still has one use");
    hs.release("b").unwrap();
    // b is idle, a is in use although b was acquired later: b goes.
    assert_eq!(hs.acquire("c").unwrap(), sb);
    assert_eq!(hs.slot_of("a"), Some(sa));
    assert!(hs.unload("a").unwrap_err().to_string().contains("in use"));
    hs.release("a").unwrap();
    assert!(
        hs.release("a").is_err(),
        "released more often than acquired"
    );
}

#[test]
fn pinned_adapters_are_never_evicted() {
    let mut hs = hot_set_with_abc(2);
    let sa = hs.pin("a").unwrap(); // least recently used from here on
    let sb = touch(&mut hs, "b");
    assert_eq!(touch(&mut hs, "c"), sb);
    assert_eq!(hs.slot_of("a"), Some(sa));
    assert!(hs.status()[(sa - 1) as usize].pinned);
    assert!(hs.unload("a").unwrap_err().to_string().contains("pinned"));
    hs.unpin("a").unwrap();
    assert_eq!(touch(&mut hs, "b"), sa, "unpinned a is the LRU now");
}

#[test]
fn unload_zeroes_the_slot_and_keeps_the_adapter_cold() {
    let mut hs = hot_set_with_abc(2);
    let sb = touch(&mut hs, "b");
    let w = hs.weights(0, Projection::UpProj);
    assert!(max_abs(&w.b.i(sb as usize).unwrap()) > 0.0);
    assert_eq!(w.scale[sb as usize], 2.0);
    hs.unload("b").unwrap();
    let w = hs.weights(0, Projection::UpProj);
    assert_eq!(max_abs(&w.a.i(sb as usize).unwrap()), 0.0);
    assert_eq!(max_abs(&w.b.i(sb as usize).unwrap()), 0.0);
    assert_eq!(w.scale[sb as usize], 0.0);
    assert_eq!(hs.slot_of("b"), None);
    assert!(hs.cold_names().contains(&"b".to_string()));
    let removed = hs.unregister("b").unwrap();
    assert_eq!(removed.name, "b");
    assert!(hs.role_of("b").is_none());
}

#[test]
fn bad_names_and_ranks_are_errors_not_panics() {
    let mut hs = hot_set_with_abc(2);
    for msg in [
        hs.acquire("nope").unwrap_err(),
        hs.release("nope").unwrap_err(),
        hs.pin("nope").map(|_| ()).unwrap_err(),
        hs.unpin("nope").unwrap_err(),
        hs.unload("nope").unwrap_err(),
        hs.unregister("nope").map(|_| ()).unwrap_err(),
    ] {
        assert!(msg.to_string().contains("\"nope\""), "{msg}");
    }
    assert!(hs
        .release("a")
        .unwrap_err()
        .to_string()
        .contains("not loaded"));
    let big = random_adapter("big", 8, &[Projection::QProj], 4);
    let msg = hs.register(big).unwrap_err().to_string();
    for part in ["\"big\"", "rank 8", "max_rank 4"] {
        assert!(msg.contains(part), "{msg}");
    }
    let dup = random_adapter("a", 2, &[Projection::QProj], 4);
    assert!(hs
        .register(dup)
        .unwrap_err()
        .to_string()
        .contains("already registered"));
    let mut wide = tiny_config();
    wide.hidden_size = 32;
    let other = LoraAdapter::random(
        "other",
        super::tests::image_role(),
        &wide,
        2,
        4.0,
        &[Projection::QProj],
        1,
        false,
        &Device::Cpu,
    )
    .unwrap();
    assert!(hs
        .register(other)
        .unwrap_err()
        .to_string()
        .contains("do not fit"));
    assert!(hot_set(0, 4).acquire("x").is_err());
    let mut empty = hot_set(0, 4);
    empty
        .register(random_adapter("x", 2, &[Projection::QProj], 1))
        .unwrap();
    assert!(empty
        .acquire("x")
        .unwrap_err()
        .to_string()
        .contains("hot set full: 0 slots"));
}

/// The slot weights of one projection built from scratch: adapter i in slot
/// i + 1, stacked at the largest of their ranks (no hot set involved).
fn fresh_slot_weights(adapters: &[&LoraAdapter], layer: usize, proj: Projection) -> SlotWeights {
    let (fan_in, fan_out) = proj.shape(&tiny_config());
    let r_max = adapters.iter().map(|a| a.rank()).max().unwrap();
    let (mut a_rows, mut b_rows) = (
        vec![Tensor::zeros((1, r_max, fan_in), candle_core::DType::F32, &Device::Cpu).unwrap()],
        vec![Tensor::zeros((1, fan_out, r_max), candle_core::DType::F32, &Device::Cpu).unwrap()],
    );
    let mut scale = vec![0.0];
    for ad in adapters {
        let pad = r_max - ad.rank();
        match ad.weights.get(&(layer, proj)) {
            Some(p) => {
                a_rows.push(p.a.pad_with_zeros(0, 0, pad).unwrap().unsqueeze(0).unwrap());
                b_rows.push(p.b.pad_with_zeros(1, 0, pad).unwrap().unsqueeze(0).unwrap());
                scale.push(ad.scale());
            }
            None => {
                a_rows.push(a_rows[0].clone());
                b_rows.push(b_rows[0].clone());
                scale.push(0.0);
            }
        }
    }
    SlotWeights {
        a: Tensor::cat(&a_rows, 0).unwrap(),
        b: Tensor::cat(&b_rows, 0).unwrap(),
        scale,
    }
}

/// Rows routed to (first, second) adapter: top-1, top-2 mixes and bare rows.
fn plan(first: SlotId, second: SlotId) -> RoutingPlan {
    let mut p = RoutingPlan::with_capacity(6, 8);
    p.push_row([(first, 1.0)]);
    p.push_row([(second, 1.0)]);
    p.push_row([]);
    p.push_row([(first, 0.7), (second, 0.3)]);
    p.push_row([(second, 0.25), (first, 0.75)]);
    p.push_row([(first, 0.5)]);
    p
}

#[test]
fn outputs_stay_exact_after_eviction_and_reload_into_another_slot() {
    let mut hs = hot_set_with_abc(2);
    let first_a = touch(&mut hs, "a");
    touch(&mut hs, "b");
    touch(&mut hs, "b"); // a is the LRU
    let sc = touch(&mut hs, "c");
    assert_eq!(sc, first_a, "c (rank 3) took a's slot");
    touch(&mut hs, "c"); // b (rank 4, all projections) is the LRU now
    let sa = hs.acquire("a").unwrap();
    assert_ne!(sa, first_a, "a came back into b's old slot");
    assert_eq!(hs.evictions(), 2);

    let adapters: Vec<LoraAdapter> = ["a", "c"]
        .iter()
        .map(|n| hs.adapter(n).unwrap().clone())
        .collect();
    let refs: Vec<&LoraAdapter> = adapters.iter().collect();
    let x = Tensor::randn(0f32, 1.0, (6, 32), &Device::Cpu).unwrap();
    for layer in 0..2 {
        for proj in Projection::ALL {
            let (fan_in, fan_out) = proj.shape(&tiny_config());
            let x = x.narrow(1, 0, fan_in).unwrap().contiguous().unwrap();
            let w = Tensor::randn(0f32, 0.3, (fan_out, fan_in), &Device::Cpu).unwrap();
            let hot = hs.weights(layer, proj);
            let targets = [LoraTarget {
                slots: hot,
                out_offset: 0,
            }];
            let grouped = plan(sa, sc).grouped(hs.num_slots());
            let got = dispatch::routed_linear(&x, &w, None, &targets, Some(&grouped)).unwrap();

            let fresh = fresh_slot_weights(&refs, layer, proj);
            let targets = [LoraTarget {
                slots: &fresh,
                out_offset: 0,
            }];
            let want =
                dispatch::reference::routed_linear(&x, &w, None, &targets, &plan(1, 2)).unwrap();
            let diff = max_abs(&(got - &want).unwrap());
            assert!(diff <= 1e-5, "layer {layer} {proj:?}: max diff {diff}");

            let base = x.matmul(&w.t().unwrap()).unwrap();
            let delta = max_abs(&(want - base).unwrap());
            let touched = refs.iter().any(|a| a.weights.contains_key(&(layer, proj)));
            assert_eq!(
                delta > 1e-4,
                touched,
                "layer {layer} {proj:?}: adapter delta {delta}"
            );
        }
    }
    hs.release("a").unwrap();
}
