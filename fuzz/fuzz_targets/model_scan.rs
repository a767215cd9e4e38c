//! Fuzz target of the request model scanner (`keygate::authz::model`): arbitrary bytes as a
//! request body, and as a path when they are UTF-8.
//!
//! Invariants: it never panics; a model it finds is 1–256 bytes of visible ASCII; and, as a
//! differential check, when serde_json parses the body as an object with exactly one
//! top-level `"model"` (keys compared unescaped) whose value is a string that passes the rule,
//! and no key that is `model` in another ASCII case, the scanner returns that same string;
//! when there is such a case variant, it returns no model.
#![no_main]

use std::fmt;

use keygate::authz::model::{MAX_MODEL_LEN, model_from_json, model_from_path};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// What serde_json sees at the top level of an object: how many keys are `model`, how many
/// are `model` in another ASCII letter case, and the first `model`'s value when it is a string.
struct TopLevel {
    models: usize,
    case_variants: usize,
    model: Option<String>,
}

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        let mut top = TopLevel {
            models: 0,
            case_variants: 0,
            model: None,
        };
        while let Some(key) = map.next_key::<String>()? {
            // Values go through `Value`, which has serde_json's recursion limit.
            let value: Value = map.next_value()?;
            if key == "model" {
                top.models += 1;
                if let Value::String(model) = value {
                    top.model.get_or_insert(model);
                }
            } else if key.eq_ignore_ascii_case("model") {
                top.case_variants += 1;
            }
        }
        Ok(top)
    }
}

fn passes_rule(model: &str) -> bool {
    (1..=MAX_MODEL_LEN).contains(&model.len()) && model.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fuzz_target!(|data: &[u8]| {
    let found = model_from_json(data);
    if let Ok(model) = &found {
        assert!(passes_rule(model), "found a model that breaks the rule: {model:?}");
    }
    match serde_json::from_slice::<TopLevel>(data) {
        Ok(TopLevel {
            models: 1,
            case_variants: 0,
            model: Some(expected),
        }) if passes_rule(&expected) => {
            assert_eq!(found.as_deref(), Ok(expected.as_str()), "serde_json disagrees");
        }
        // A key a case-insensitive parser would read as the model: never a model found.
        Ok(TopLevel { case_variants: 1.., .. }) => {
            assert!(found.is_err(), "a case variant of \"model\" was let through");
        }
        _ => {}
    }
    if let Ok(path) = std::str::from_utf8(data) {
        if let Some(model) = model_from_path(path) {
            assert!(passes_rule(model) && !model.contains('%'), "{model:?}");
        }
    }
});
