//! Partial and strict loads (MindSpore `load_checkpoint(specify_prefix, filter_prefix)` and
//! `load_param_into_net(strict_load)`): every selector alone and combined, strict and
//! non-strict loads against an expected model, dtype and shape mismatches, and the close
//! matches a missing name's error lists.

mod support;

use ckptstore::store::{LoadReport, LoadSpec};
use ckptstore::{DType, Error, Selector, Store};
use support::{data, opts};

/// One checkpoint: a small "network" with a few scopes, a blob, tensors of several dtypes.
fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(10).unwrap();
    for (i, (name, dtype, shape)) in layout().iter().enumerate() {
        let n = ckptstore::manifest::tensor_nbytes(*dtype, shape).unwrap() as usize;
        t.put_tensor(name, *dtype, shape, &data(i as u64, n))
            .unwrap();
    }
    t.put_blob("optimizer.state", b"opaque").unwrap();
    t.commit().unwrap();
    (dir, s)
}

fn layout() -> Vec<(&'static str, DType, Vec<u64>)> {
    vec![
        ("encoder.layer.0.weight", DType::F32, vec![4, 3]),
        ("encoder.layer.0.bias", DType::F32, vec![4]),
        ("encoder.layer.1.weight", DType::BF16, vec![4, 4]),
        ("decoder.head.weight", DType::F16, vec![2, 4]),
        ("moments.encoder.layer.0.weight", DType::F32, vec![4, 3]),
        ("global_step", DType::I64, vec![]),
    ]
}

fn names(v: &[(String, ckptstore::Tensor)]) -> Vec<&str> {
    v.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn default_spec_loads_everything_in_checkpoint_order_bit_exact() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let all = ck.load(&LoadSpec::all()).unwrap();
    assert_eq!(names(&all), ck.tensor_names());
    for (name, t) in &all {
        assert_eq!(*t, ck.tensor(name).unwrap());
    }
    // Blobs are not tensors: never selected.
    assert!(!names(&all).contains(&"optimizer.state"));
}

#[test]
fn by_name_list_keeps_the_callers_order() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let got = ck
        .load(&LoadSpec::all().names(["global_step", "decoder.head.weight"]))
        .unwrap();
    assert_eq!(names(&got), ["global_step", "decoder.head.weight"]);
    assert_eq!(got[0].1.dtype, DType::I64);
    assert_eq!(got[0].1.shape, Vec::<u64>::new());
    assert_eq!(got[1].1, ck.tensor("decoder.head.weight").unwrap());
    // An empty list loads nothing.
    let none = ck
        .load(&LoadSpec::all().names(Vec::<String>::new()))
        .unwrap();
    assert!(none.is_empty());
}

#[test]
fn specify_prefix_keeps_names_starting_with_any() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let got = ck
        .select(&LoadSpec::all().specify_prefix(["encoder.", "global"]))
        .unwrap();
    assert_eq!(
        got,
        [
            "encoder.layer.0.weight",
            "encoder.layer.0.bias",
            "encoder.layer.1.weight",
            "global_step"
        ]
    );
    // A prefix is matched at the start of the name only: "enc" matches, "layer" does not.
    let got = ck.select(&LoadSpec::all().specify_prefix(["enc"])).unwrap();
    assert_eq!(got.len(), 3);
    let got = ck
        .select(&LoadSpec::all().specify_prefix(["layer"]))
        .unwrap();
    assert!(got.is_empty());
}

#[test]
fn filter_prefix_drops_names_starting_with_any() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let got = ck
        .load(&LoadSpec::all().filter_prefix(["moments.", "global_step"]))
        .unwrap();
    assert_eq!(
        names(&got),
        [
            "encoder.layer.0.weight",
            "encoder.layer.0.bias",
            "encoder.layer.1.weight",
            "decoder.head.weight"
        ]
    );
}

#[test]
fn predicate_selects() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let suffix = String::from(".weight");
    let got = ck
        .select(&LoadSpec::all().predicate(|n| n.ends_with(suffix.as_str())))
        .unwrap();
    assert_eq!(
        got,
        [
            "encoder.layer.0.weight",
            "encoder.layer.1.weight",
            "decoder.head.weight",
            "moments.encoder.layer.0.weight"
        ]
    );
}

#[test]
fn selectors_combine_with_and() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let spec = LoadSpec::all()
        .specify_prefix(["encoder.", "decoder."])
        .filter_prefix(["encoder.layer.1"])
        .predicate(|n| n.ends_with("weight"));
    assert_eq!(
        ck.select(&spec).unwrap(),
        ["encoder.layer.0.weight", "decoder.head.weight"]
    );
    // With a name list, the other selectors filter it.
    let spec = LoadSpec::all()
        .names(["global_step", "encoder.layer.0.bias", "decoder.head.weight"])
        .filter_prefix(["decoder."]);
    let got = ck.load(&spec.verify(false)).unwrap();
    assert_eq!(names(&got), ["global_step", "encoder.layer.0.bias"]);
}

#[test]
fn bad_specs_are_invalid_arguments() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    for spec in [
        LoadSpec::all().specify_prefix([""]),
        LoadSpec::all().filter_prefix(["x", ""]),
        LoadSpec::all().names(["global_step", "global_step"]),
    ] {
        let e = ck.load(&spec).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{spec:?}: {e}");
    }
}

#[test]
fn missing_name_lists_close_matches() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    // A typo.
    let e = ck
        .load(&LoadSpec::all().names(["encoder.layer.0.wieght"]))
        .unwrap_err();
    let Error::NotFound(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(msg.contains("\"encoder.layer.0.wieght\""), "{msg}");
    assert!(msg.contains("did you mean"), "{msg}");
    let close = ck.close_matches("encoder.layer.0.wieght");
    assert_eq!(close[0], "encoder.layer.0.weight");
    assert!(close.len() <= 3);
    for c in &close {
        assert!(msg.contains(&format!("{c:?}")), "{msg}");
    }
    // A missing scope (MindSpore prefixes parameters with the network's name).
    assert_eq!(
        ck.close_matches("network.decoder.head.weight"),
        ["decoder.head.weight"]
    );
    // The same list from the plain tensor read.
    let e = ck.tensor("decoder.head.weigh").unwrap_err();
    assert!(
        e.to_string()
            .contains("did you mean [\"decoder.head.weight\"]"),
        "{e}"
    );
    // Nothing close: no suggestion.
    let e = ck.tensor("zzz").unwrap_err();
    assert!(
        matches!(&e, Error::NotFound(m) if !m.contains("did you mean")),
        "{e}"
    );
    // Blobs too.
    let e = ck.blob("optimizer.stat").unwrap_err();
    assert!(e.to_string().contains("\"optimizer.state\""), "{e}");
    // Top three at most, best first.
    assert_eq!(ck.close_matches("encoder.layer.2.weight").len(), 3);
    assert_eq!(
        ck.close_matches("encoder.layer.2.weight")[..2],
        ["encoder.layer.0.weight", "encoder.layer.1.weight"]
    );
}

#[test]
fn strict_load_of_the_exact_model_loads_everything() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let expected = layout();
    let r = ck.load_into(&expected, true).unwrap();
    assert!(r.missing.is_empty() && r.unexpected.is_empty(), "{r:?}");
    assert_eq!(
        names(&r.loaded),
        expected.iter().map(|e| e.0).collect::<Vec<_>>()
    );
    for (name, t) in &r.loaded {
        assert_eq!(*t, ck.tensor(name).unwrap());
    }
}

#[test]
fn strict_load_fails_listing_missing_and_unexpected() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let mut expected = layout();
    expected.retain(|e| !e.0.starts_with("moments.") && e.0 != "global_step");
    expected.push(("encoder.layer.2.weight", DType::F32, vec![4, 4]));
    let e = ck.load_into(&expected, true).unwrap_err();
    match &e {
        Error::StrictLoad {
            checkpoint,
            missing,
            unexpected,
        } => {
            assert_eq!(*checkpoint, ck.info().id);
            assert_eq!(missing, &["encoder.layer.2.weight"]);
            assert_eq!(
                unexpected,
                &["moments.encoder.layer.0.weight", "global_step"]
            );
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("encoder.layer.2.weight") && msg.contains("global_step"),
        "{msg}"
    );
    // Only missing, or only unexpected, is enough to fail.
    let only_unexpected = &layout()[..2];
    assert!(matches!(
        ck.load_into(only_unexpected, true),
        Err(Error::StrictLoad { missing, unexpected, .. })
            if missing.is_empty() && unexpected.len() == 4
    ));
    let mut only_missing = layout();
    only_missing.push(("extra", DType::U8, vec![1]));
    assert!(matches!(
        ck.load_into(&only_missing, true),
        Err(Error::StrictLoad { missing, unexpected, .. })
            if missing == ["extra"] && unexpected.is_empty()
    ));
}

#[test]
fn non_strict_load_returns_both_lists_and_loads_the_rest() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    // Owned names and slice shapes work too.
    let expected: Vec<(String, DType, &[u64])> = vec![
        ("decoder.head.weight".into(), DType::F16, &[2, 4]),
        ("encoder.layer.9.weight".into(), DType::F32, &[1]),
        ("encoder.layer.0.bias".into(), DType::F32, &[4]),
    ];
    let r: LoadReport = ck.load_into(&expected, false).unwrap();
    assert_eq!(
        names(&r.loaded),
        ["decoder.head.weight", "encoder.layer.0.bias"]
    );
    assert_eq!(r.loaded[1].1, ck.tensor("encoder.layer.0.bias").unwrap());
    assert_eq!(r.missing, ["encoder.layer.9.weight"]);
    assert_eq!(
        r.unexpected,
        [
            "encoder.layer.0.weight",
            "encoder.layer.1.weight",
            "moments.encoder.layer.0.weight",
            "global_step"
        ]
    );
    // Nothing expected: everything unexpected, nothing loaded.
    let none: [(&str, DType, Vec<u64>); 0] = [];
    let r = ck.load_into(&none, false).unwrap();
    assert!(r.loaded.is_empty() && r.missing.is_empty());
    assert_eq!(r.unexpected.len(), layout().len());
}

#[test]
fn dtype_and_shape_mismatches_name_the_tensor() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    for strict in [true, false] {
        let mut expected = layout();
        expected[2].1 = DType::F32; // encoder.layer.1.weight is BF16
        let e = ck.load_into(&expected, strict).unwrap_err();
        match &e {
            Error::TensorMismatch {
                name,
                expected_dtype,
                expected_shape,
                found_dtype,
                found_shape,
                ..
            } => {
                assert_eq!(name, "encoder.layer.1.weight");
                assert_eq!(*expected_dtype, DType::F32);
                assert_eq!(*found_dtype, DType::BF16);
                assert_eq!(expected_shape, &[4, 4]);
                assert_eq!(found_shape, &[4, 4]);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("\"encoder.layer.1.weight\""), "{e}");

        let mut expected = layout();
        expected[0].2 = vec![3, 4]; // transposed
        let e = ck.load_into(&expected, strict).unwrap_err();
        assert!(
            matches!(&e, Error::TensorMismatch { name, expected_shape, found_shape, .. }
                if name == "encoder.layer.0.weight" && expected_shape == &[3, 4]
                    && found_shape == &[4, 3]),
            "{e:?}"
        );
        // A scalar expected where a 1-element vector is stored (and the reverse) differs.
        let mut expected = layout();
        expected[5].2 = vec![1];
        assert!(matches!(
            ck.load_into(&expected, strict),
            Err(Error::TensorMismatch { name, .. }) if name == "global_step"
        ));
    }
    // A missing name in strict mode is reported before any mismatch.
    let mut expected = layout();
    expected[2].1 = DType::F32;
    expected.push(("extra", DType::U8, vec![1]));
    assert!(matches!(
        ck.load_into(&expected, true),
        Err(Error::StrictLoad { .. })
    ));
}

#[test]
fn duplicate_expected_names_are_invalid() {
    let (_d, s) = store();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let expected = [
        ("global_step", DType::I64, vec![]),
        ("global_step", DType::I64, vec![]),
    ];
    assert!(matches!(
        ck.load_into(&expected, false),
        Err(Error::InvalidArgument(_))
    ));
}
