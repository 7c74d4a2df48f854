//! The engine's admission and management: a full queue, unknown adapters,
//! abandoned clients, adapter load/unload (bad folders included).

mod common;
mod engine_support;

use std::collections::BTreeMap;

use engine_support::*;
use molora::engine::{
    AdapterCommand, AdapterReply, AdapterRequest, EngineConfig, EngineHandle, InferEvent,
    SubmitError,
};
use molora::random_model::ADAPTERS_DIR;
use molora::routing::mode::RoutingMode;

#[test]
fn a_full_queue_is_overloaded_and_unknown_adapters_are_refused() {
    let f = fixture();
    let cfg = EngineConfig {
        max_batch_size: 1,
        max_queue: 2,
        ..config()
    };
    let engine = start(&f, cfg, true);
    let long = || {
        request(
            text_prompt(&f.vocab, 4, 0),
            params(1, 240, 1.0),
            RoutingMode::Base,
            Default::default(),
        )
    };
    let mut first = engine.submit(long()).unwrap();
    // Running once its first token arrives: the batch (size 1) is full.
    assert!(matches!(
        first.blocking_recv(),
        Some(InferEvent::Token { .. })
    ));
    let _a = engine.submit(long()).unwrap();
    let _b = engine.submit(long()).unwrap();
    assert_eq!(
        engine.submit(long()).unwrap_err(),
        SubmitError::Overloaded(2)
    );
    assert_eq!(engine.stats().queue_depth, 2);

    let unknown = AdapterRequest {
        forced: vec!["nope".into()],
        ..Default::default()
    };
    let err = engine
        .submit(request(
            vec![1, 2],
            params(1, 1, 0.0),
            RoutingMode::PerSequence,
            unknown,
        ))
        .unwrap_err();
    assert_eq!(err, SubmitError::UnknownAdapter("nope".into()));
    let bad_mode = AdapterRequest {
        modality: Some(BTreeMap::from([("audio".into(), "text".into())])),
        ..Default::default()
    };
    let err = engine
        .submit(request(
            vec![1, 2],
            params(1, 1, 0.0),
            RoutingMode::SinglePass,
            bad_mode,
        ))
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::InvalidAdapters(ref m) if m.contains("audio")),
        "{err:?}"
    );
}

#[test]
fn a_dropped_receiver_frees_its_sequence() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let req = request(
        text_prompt(&f.vocab, 4, 0),
        params(1, 240, 1.0),
        RoutingMode::SinglePass,
        Default::default(),
    );
    let mut rx = engine.submit(req).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(InferEvent::Token { .. })));
    wait_until("the sequence to run", || engine.stats().running == 1);
    drop(rx);
    wait_until("the sequence to be freed", || engine.stats().running == 0);
    let status = block_on(engine.adapter_command(AdapterCommand::List)).unwrap();
    let AdapterReply::Status(list) = status else {
        panic!("{status:?}")
    };
    assert!(
        list.iter().all(|a| a.in_use == 0),
        "adapters still held: {list:?}"
    );
    // Errors in the prompt come back as an Error event, not a panic.
    let long_prompt = text_prompt(&f.vocab, 300, 0);
    let events = run(
        &engine,
        request(
            long_prompt,
            params(1, 4, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    assert!(
        matches!(events.last(), Some(InferEvent::Error(m)) if m.contains("context")),
        "{events:?}"
    );
}

#[test]
fn adapter_commands_load_unload_and_refuse_bad_folders() {
    let f = fixture();
    let engine = start(&f, config(), true);
    let list = |engine: &EngineHandle| match block_on(engine.adapter_command(AdapterCommand::List))
        .unwrap()
    {
        AdapterReply::Status(l) => l,
        other => panic!("{other:?}"),
    };
    let names: Vec<String> = list(&engine).into_iter().map(|a| a.name).collect();
    assert!(
        names.contains(&"math".to_string()) && names.contains(&"image".to_string()),
        "{names:?}"
    );
    assert!(engine
        .model_info()
        .adapters
        .iter()
        .all(|a| a.parent == "tiny"));

    // Unload, then requests naming it are refused at once; load it back.
    let reply = block_on(engine.adapter_command(AdapterCommand::Unload {
        name: "math".into(),
    }))
    .unwrap();
    assert_eq!(
        reply,
        AdapterReply::Unloaded {
            name: "math".into()
        }
    );
    assert!(!list(&engine).iter().any(|a| a.name == "math"));
    let forced = AdapterRequest {
        forced: vec!["math".into()],
        ..Default::default()
    };
    let req = request(
        text_prompt(&f.vocab, 3, 0),
        params(1, 3, 0.0),
        RoutingMode::PerSequence,
        forced,
    );
    assert_eq!(
        engine.submit(req.clone()).unwrap_err(),
        SubmitError::UnknownAdapter("math".into())
    );
    let reply = block_on(engine.adapter_command(AdapterCommand::Load {
        name: "math".into(),
    }))
    .unwrap();
    assert!(
        matches!(reply, AdapterReply::Loaded { ref name, slot } if name == "math" && slot > 0),
        "{reply:?}"
    );
    let info = list(&engine)
        .into_iter()
        .find(|a| a.name == "math")
        .unwrap();
    assert!(info.slot.is_some() && info.in_use == 0);
    completion(&run(&engine, req));

    // Bad folders: missing, outside the adapter folder, broken weights.
    let adapters = f.path.join(ADAPTERS_DIR);
    for name in ["missing", "../tiny"] {
        let err = block_on(engine.adapter_command(AdapterCommand::Load { name: name.into() }))
            .unwrap_err();
        assert!(format!("{err:#}").contains(name), "{err:#}");
    }
    copy_dir(&adapters.join("code"), &adapters.join("broken"));
    std::fs::write(
        adapters.join("broken").join("adapter_model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = block_on(engine.adapter_command(AdapterCommand::Load {
        name: "broken".into(),
    }))
    .unwrap_err();
    assert!(format!("{err:#}").contains("broken"), "{err:#}");
    assert!(!list(&engine).iter().any(|a| a.name == "broken"));

    // Unloading an adapter a running request holds is refused.
    let forced = AdapterRequest {
        forced: vec!["code".into()],
        ..Default::default()
    };
    let long = request(
        text_prompt(&f.vocab, 3, 0),
        params(1, 240, 1.0),
        RoutingMode::PerSequence,
        forced,
    );
    let mut rx = engine.submit(long).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(InferEvent::Token { .. })));
    let err = block_on(engine.adapter_command(AdapterCommand::Unload {
        name: "code".into(),
    }))
    .unwrap_err();
    assert!(format!("{err:#}").contains("in use"), "{err:#}");
    drop(rx);

    // The engine still serves.
    let events = run(
        &engine,
        request(
            text_prompt(&f.vocab, 3, 0),
            params(1, 3, 0.0),
            RoutingMode::SinglePass,
            Default::default(),
        ),
    );
    assert_eq!(tokens(&events).len(), 3);
}
