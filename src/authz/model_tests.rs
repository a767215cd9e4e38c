//! Unit and property tests of the request model extraction (`model.rs`).

use proptest::prelude::*;
use serde_json::Value;

use super::*;

fn model(body: &str) -> Result<Cow<'_, str>, ModelError> {
    model_from_json(body.as_bytes())
}

#[test]
fn finds_the_top_level_model_anywhere_and_borrows_it() {
    let body = r#"{"messages":[{"role":"user","content":"hi \"there\"","model":"x"}],
        "n":-1.5e+3,"stream":true,"stop":null,"x":false,"meta":{"model":{"a":[]}},
        "model" : "gpt-4o-mini" }"#;
    assert!(matches!(model(body), Ok(Cow::Borrowed("gpt-4o-mini"))));
    assert_eq!(
        model(r#"{"model":"claude-sonnet-4-5"}"#).unwrap(),
        "claude-sonnet-4-5"
    );
    let gemini = model(" {\"model\":\"models/gemini-2.5-pro\"}\r\n\t").unwrap();
    assert_eq!(gemini, "models/gemini-2.5-pro");
}

#[test]
fn an_escaped_key_is_model_for_finding_it_and_for_the_duplicate_rule() {
    assert_eq!(model(r#"{"mo\u0064el":"gpt-4o"}"#).unwrap(), "gpt-4o");
    assert_eq!(
        model(r#"{"\u006D\u006f\u0064\u0065\u006c":"a"}"#).unwrap(),
        "a"
    );
    let twice = r#"{"model":"gpt-4o-mini","mo\u0064el":"gpt-4o"}"#;
    assert_eq!(model(twice), Err(ModelError::Duplicate));
    assert_eq!(model(r#"{"model\u0000":"a"}"#), Err(ModelError::Missing));
    assert_eq!(model(r#"{"mode\\l":"a"}"#), Err(ModelError::Missing));
}

#[test]
fn an_escaped_model_is_unescaped() {
    assert!(matches!(model(r#"{"model":"gpt\u002d4o"}"#), Ok(Cow::Owned(m)) if m == "gpt-4o"));
    assert_eq!(
        model(r#"{"model":"models\/gemini"}"#).unwrap(),
        "models/gemini"
    );
    assert_eq!(model(r#"{"model":"a\"b\\c"}"#).unwrap(), r#"a"b\c"#);
    assert_eq!(
        model(r#"{"model":"gpt\n4o"}"#),
        Err(ModelError::NotVisibleAscii)
    );
    assert_eq!(
        model(r#"{"model":"\u00e9"}"#),
        Err(ModelError::NotVisibleAscii)
    );
    assert_eq!(
        model(r#"{"model":"\ud83d\ude00"}"#),
        Err(ModelError::NotVisibleAscii)
    );
}

#[test]
fn a_duplicate_top_level_model_is_refused_whatever_the_values() {
    assert_eq!(
        model(r#"{"model":"a","model":"a"}"#),
        Err(ModelError::Duplicate)
    );
    assert_eq!(
        model(r#"{"model":"a","x":1,"model":null}"#),
        Err(ModelError::Duplicate)
    );
    assert_eq!(model(r#"{"x":{"model":"a"},"model":"b"}"#).unwrap(), "b");
}

#[test]
fn a_top_level_key_that_is_model_in_another_case_is_refused() {
    // Go's encoding/json matches field names case-insensitively: an upstream built on it
    // would bill "gpt-4o" for this body while keygate checked "gpt-4o-mini".
    for body in [
        r#"{"model":"gpt-4o-mini","Model":"gpt-4o"}"#,
        r#"{"MODEL":"gpt-4o","model":"gpt-4o-mini"}"#,
        r#"{"model":"gpt-4o-mini","mOdEl":"gpt-4o"}"#,
        r#"{"model":"gpt-4o-mini","Mod\u0065l":"gpt-4o"}"#,
        r#"{"Model":"gpt-4o"}"#,
    ] {
        assert_eq!(model(body), Err(ModelError::CaseVariant), "{body}");
    }
    // Nested, or a different name, is not a variant.
    assert_eq!(
        model(r#"{"input":{"Model":"x"},"model":"gpt-4o-mini","models":["x"],"Mode":1}"#).unwrap(),
        "gpt-4o-mini"
    );
    // Non-ASCII look-alikes are other keys (no upstream folds them to ASCII "model").
    assert_eq!(
        model(r#"{"model":"gpt-4o-mini","mod\u00e9l":"gpt-4o"}"#).unwrap(),
        "gpt-4o-mini"
    );
}

#[test]
fn the_model_rule_is_one_to_256_bytes_of_visible_ascii() {
    let max = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_LEN));
    assert_eq!(model(&max).unwrap().len(), MAX_MODEL_LEN);
    let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_LEN + 1));
    assert_eq!(model(&long), Err(ModelError::TooLong));
    let long_escaped = format!(r#"{{"model":"\u0041{}"}}"#, "m".repeat(MAX_MODEL_LEN));
    assert_eq!(model(&long_escaped), Err(ModelError::TooLong));
    assert_eq!(model(r#"{"model":""}"#), Err(ModelError::Empty));
    assert_eq!(
        model(r#"{"model":"gpt 4o"}"#),
        Err(ModelError::NotVisibleAscii)
    );
    assert_eq!(
        model("{\"model\":\"gpt-4\u{f6}\"}"),
        Err(ModelError::NotVisibleAscii)
    );
    assert_eq!(model(r#"{"model":"~!"}"#).unwrap(), "~!");
}

#[test]
fn a_model_that_is_missing_or_not_a_string_is_refused() {
    assert_eq!(model("{}"), Err(ModelError::Missing));
    assert_eq!(
        model(r#"{"Mode":"a","models":"b"}"#),
        Err(ModelError::Missing)
    );
    assert_eq!(
        model(r#"{"a":{"model":"gpt-4o"}}"#),
        Err(ModelError::Missing)
    );
    for value in ["1", "null", "true", "[\"a\"]", "{\"model\":\"a\"}", "-0"] {
        let body = format!(r#"{{"model":{value}}}"#);
        assert_eq!(model(&body), Err(ModelError::NotString), "{body}");
    }
}

#[test]
fn a_top_level_value_other_than_an_object_is_refused() {
    for body in [
        r#"["model","a"]"#,
        r#""model""#,
        "1",
        "-1",
        "true",
        "null",
        "false",
    ] {
        assert_eq!(model(body), Err(ModelError::NotObject), "{body}");
    }
}

#[test]
fn malformed_json_is_refused_even_after_the_model() {
    let syntax = |offset| Err(ModelError::Syntax { offset });
    assert_eq!(model(r#"{"model":"a",}"#), syntax(13));
    assert_eq!(model(r#"{"model":"a" "x":1}"#), syntax(13));
    assert_eq!(model(r#"{"model":"a","x":01}"#), syntax(18));
    assert_eq!(model(r#"{"model":"a","x":1.}"#), syntax(19));
    assert_eq!(model(r#"{"model":"a","x":[1,]}"#), syntax(20));
    assert_eq!(model(r#"{"model":"a","x":tru}"#), syntax(20));
    assert_eq!(model(r#"{"model":"a","x":"\q"}"#), syntax(19));
    assert_eq!(model(r#"{"model":"a","x":"\u12G4"}"#), syntax(22));
    assert_eq!(model("{\"model\":\"a\",\"x\":\"\n\"}"), syntax(18));
    assert_eq!(model(r#"{"model":"a","x":[}"#), syntax(18));
    assert_eq!(model(r#"{'model':"a"}"#), syntax(1));
    assert_eq!(model("model"), syntax(0));
}

#[test]
fn a_truncated_body_is_refused() {
    let full = r#"{"model":"gpt-4o","x":[{"a":"\u0041"},-1.5e3,true]}"#;
    for end in 0..full.len() {
        let cut = &full[..end];
        assert_eq!(model(cut), Err(ModelError::Truncated), "{cut}");
    }
    assert_eq!(model(full).unwrap(), "gpt-4o");
}

#[test]
fn trailing_data_is_refused() {
    let trailing = |offset| Err(ModelError::TrailingData { offset });
    assert_eq!(model(r#"{"model":"a"} x"#), trailing(14));
    assert_eq!(model(r#"{"model":"a"}{"model":"b"}"#), trailing(13));
    assert_eq!(model("{\"model\":\"a\"}\0"), trailing(13));
}

#[test]
fn nesting_is_bounded_without_recursion() {
    let nested = |depth: usize| {
        let inner = "[".repeat(depth - 1) + &"]".repeat(depth - 1);
        format!(r#"{{"model":"a","x":{inner}}}"#)
    };
    assert_eq!(model(&nested(MAX_DEPTH)).unwrap(), "a");
    assert_eq!(model(&nested(MAX_DEPTH + 1)), Err(ModelError::TooDeep));
    let deep = "{\"a\":".repeat(1_000_000) + "1" + &"}".repeat(1_000_000);
    assert_eq!(model(&deep), Err(ModelError::TooDeep));
}

#[test]
fn every_refusal_names_itself() {
    let errors = [
        ModelError::Syntax { offset: 3 },
        ModelError::Truncated,
        ModelError::TrailingData { offset: 3 },
        ModelError::NotObject,
        ModelError::TooDeep,
        ModelError::Missing,
        ModelError::NotString,
        ModelError::Duplicate,
        ModelError::CaseVariant,
        ModelError::Empty,
        ModelError::TooLong,
        ModelError::NotVisibleAscii,
    ];
    let names: std::collections::HashSet<_> = errors
        .iter()
        .map(|error| error.to_string().split(':').next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names.len(), errors.len());
}

#[test]
fn paths_name_azure_deployments_and_gemini_models() {
    let cases = [
        (
            "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024",
            Some("gpt-4o-mini"),
        ),
        ("/openai/deployments/my-dep", Some("my-dep")),
        (
            "/v1beta/models/gemini-2.5-pro:generateContent",
            Some("gemini-2.5-pro"),
        ),
        (
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            Some("gemini-2.5-flash"),
        ),
        (
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:predict",
            Some("gemini-2.5-pro"),
        ),
        ("/openai/deployments//chat/completions", None),
        ("/openai/deployments/gpt%2D4o/chat/completions", None),
        ("/v1beta/models/:generateContent", None),
        ("/v1beta/models/gemini%2Dpro:generateContent", None),
        ("/v1/models/gpt-4o", None),
        ("/v1beta/models/gemini/x:generateContent", None),
        ("/v1/chat/completions", None),
        ("/v1/chat/completions?x=/models/a:b", None),
        ("/openai/deployments/a b/chat", None),
        // Paths the upstream could resolve to another name than the one read.
        (
            "/openai/deployments/gpt-4o-mini/../gpt-4o/chat/completions",
            None,
        ),
        ("/openai/deployments/gpt-4o-mini/./chat/completions", None),
        ("/openai//deployments/gpt-4o-mini/chat/completions", None),
        ("/openai/deployments/gpt-4o-mini\\..\\gpt-4o/chat", None),
        (
            "/v1beta/models/../models/gemini-2.5-pro:generateContent",
            None,
        ),
        // A query is not part of the path.
        ("/openai/deployments/prod/chat?next=/../x", Some("prod")),
    ];
    for (path, expected) in cases {
        assert_eq!(model_from_path(path), expected, "{path}");
    }
    let long = format!("/openai/deployments/{}/chat", "d".repeat(MAX_MODEL_LEN + 1));
    assert_eq!(model_from_path(&long), None);
}

/// Any JSON value, with strings that need escapes.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[\"\\\\/\\x00-\\x1f model]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// A top-level object serialised by serde_json, fields in the given order.
fn object(fields: &[(String, Value)], pretty: bool) -> String {
    let text = |value: &Value| {
        if pretty {
            serde_json::to_string_pretty(value)
        } else {
            serde_json::to_string(value)
        }
    };
    let fields: Vec<String> = fields
        .iter()
        .map(|(key, value)| {
            let key = serde_json::to_string(key).unwrap_or_default();
            format!("{key}: {}", text(value).unwrap_or_default())
        })
        .collect();
    format!("{{{}}}", fields.join(if pretty { ",\n  " } else { "," }))
}

fn other_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec((any::<String>(), any_json()), 0..8).prop_map(|fields| {
        fields
            .into_iter()
            .filter(|(key, _)| !key.eq_ignore_ascii_case("model"))
            .collect()
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(found) = model_from_json(&body) {
            prop_assert!(check_model_units(found.bytes().map(u32::from)).is_ok());
        }
    }

    #[test]
    fn json_like_bytes_never_panic(
        body in prop::collection::vec(prop::sample::select(b"{}[]\":, \\u0d9-.eEtrunlsfamod".to_vec()), 0..256),
        path in "[/a-z0-9:%?]{0,40}",
    ) {
        if let Ok(found) = model_from_json(&body) {
            prop_assert!(check_model_units(found.bytes().map(u32::from)).is_ok());
        }
        if let Some(found) = model_from_path(&path) {
            prop_assert!(!found.is_empty() && found.bytes().all(is_visible_ascii));
        }
    }

    #[test]
    fn a_serialised_object_yields_its_model(
        fields in other_fields(),
        name in "[!-~]{1,256}",
        position in any::<prop::sample::Index>(),
        pretty in any::<bool>(),
    ) {
        let mut fields = fields;
        let at = position.index(fields.len() + 1);
        fields.insert(at, ("model".to_owned(), Value::String(name.clone())));
        let body = object(&fields, pretty);
        prop_assert_eq!(model(&body), Ok(Cow::Borrowed(name.as_str())));
    }

    #[test]
    fn a_serialised_object_with_model_twice_is_refused(
        fields in other_fields(),
        name in "[!-~]{1,256}",
        second in any_json(),
        positions in any::<(prop::sample::Index, prop::sample::Index)>(),
    ) {
        let mut fields = fields;
        let first = positions.0.index(fields.len() + 1);
        fields.insert(first, ("model".to_owned(), Value::String(name)));
        let later = first + 1 + positions.1.index(fields.len() - first);
        fields.insert(later, ("model".to_owned(), second));
        let body = object(&fields, false);
        prop_assert_eq!(model(&body), Err(ModelError::Duplicate));
    }
}

/// The meter's slot keeps the last valid model: a shorter one overwrites a longer one in place
/// and reads back alone; an invalid one leaves the slot as it was.
#[test]
fn a_stored_model_replaces_the_one_before_and_only_by_a_valid_one() {
    let mut slot = None;
    assert!(ModelName::store(&mut slot, b"gpt-4o-mini-2024-07-18"));
    assert!(ModelName::store(&mut slot, b"gpt-4o"));
    assert_eq!(
        slot.map(|m| m.as_str().to_owned()).as_deref(),
        Some("gpt-4o")
    );
    for bad in [
        &b""[..],
        b"has space",
        b"caf\xc3\xa9",
        &[b'a'; MAX_MODEL_LEN + 1],
    ] {
        assert!(!ModelName::store(&mut slot, bad));
    }
    assert_eq!(slot, ModelName::new("gpt-4o"));
    assert!(ModelName::store(&mut slot, &[b'm'; MAX_MODEL_LEN]));
    assert_eq!(slot.map(|m| m.as_str().len()), Some(MAX_MODEL_LEN));
}
