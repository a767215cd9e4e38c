//! What both fuzz targets share: a fixed master key and a small but complete snapshot (keys
//! with allowlists, scopes, expiry; consumers with scopes; services whose model keys are
//! encrypted exactly as the store distributes them), built through the public update path.

use keygate::crypto::{Keys, MasterKey, Secret};
use keygate::domain::Timestamp;
use keygate::snapshot::fixtures::key_entry;
use std::sync::Arc;

use keygate::domain::ModelSource;
use keygate::snapshot::{
    ConsumerRecord, ModelKeyRecord, ModelRule, ScopeList, ScopeSet, ServiceRecord, Snapshot,
    Update,
};
use uuid::Uuid;

/// The decision time (µs since the epoch); targets add a fuzzed offset.
pub const NOW: Timestamp = Timestamp(1_700_000_000_000_000);

/// Consumer key values; `@0`..`@8` in a fuzz input stand for them.
pub const KEYS: [&str; 9] = [
    "kg-fuzz-good-Qm7xV2pLr9TzW4nB", // 0: enabled, consumer with every service
    "kg-fuzz-disabled-Jd3KsZ8qWv1MxP", // 1: disabled
    "kg-fuzz-expired-Hb5NcR2yLq7VzX9", // 2: expired at NOW
    "kg-fuzz-unbound-Pf4GtY7wQs2KxM8", // 3: no consumer
    "kg-fuzz-allowlist-Rc8MvT1zNq5Xw", // 4: 10.0.0.0/8 and 2001:db8::/32 only
    "kg-fuzz-keyscope-Lx9PwN4vKr2ZqT", // 5: key scope: anthropic only
    "kg-fuzz-consumerscope-Zv1RmK8tWq", // 6: consumer scope: openai only
    "kg-fuzz-future-Mq4TzX7bVn2KwR9yL", // 7: expires an hour after NOW
    "kg-fuzz-models-Vd5XkQ1nRz8WmT3y", // 8: models openai/gpt-4o-mini and azure/prod-* only
];

/// The index in [`KEYS`] of the model-scoped key.
pub const MODEL_SCOPED: usize = 8;

/// Model key plaintexts: the only values an allowed response may carry.
pub const MODEL_KEYS: [&str; 3] = [
    "sk-openai-AAAA1111bbbb2222cccc",
    "sk-ant-GGGG5555hhhh6666iiii",
    "az-JJJJ7777kkkk8888llll",
];

pub const S_OPENAI: Uuid = Uuid::from_u128(0x100);
pub const S_ANTHROPIC: Uuid = Uuid::from_u128(0x101);
pub const S_AZURE: Uuid = Uuid::from_u128(0x102);
pub const S_EMPTY: Uuid = Uuid::from_u128(0x103);
pub const C_ALL: Uuid = Uuid::from_u128(0x200);
pub const C_OPENAI: Uuid = Uuid::from_u128(0x201);

/// Every key derived from a fixed master key.
pub fn master_key() -> MasterKey {
    MasterKey::from_bytes([7; 32])
}

pub fn keys() -> Keys {
    master_key().keys()
}

fn service(
    keys: &Keys,
    id: Uuid,
    name: &str,
    header: &str,
    template: &str,
    mk: &[&str],
    (models, model_source): (&[&str], ModelSource),
) -> ServiceRecord {
    ServiceRecord {
        id,
        name: name.into(),
        auth_header: header.into(),
        auth_value_template: template.into(),
        model_keys: mk
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mid = Uuid::from_u128(id.as_u128() << 8 | i as u128);
                ModelKeyRecord {
                    id: mid,
                    name: format!("{name}-{i}"),
                    ciphertext: keys
                        .cipher
                        .encrypt(&mid.to_string(), &Secret::new((*v).into())),
                }
            })
            .collect(),
        models: models.iter().map(|m| m.to_string()).collect(),
        model_source,
    }
}

/// Whole services, or the models of some.
fn scope(services: &[Uuid], models: &[(Uuid, &str)]) -> ScopeSet {
    ScopeSet::Only(Arc::new(ScopeList {
        services: services.into(),
        models: models
            .iter()
            .map(|(service, pattern)| ModelRule {
                service: *service,
                pattern: (*pattern).into(),
            })
            .collect(),
    }))
}

/// The full update the targets start from (store `fuzz`, version 10).
pub fn full_update(keys: &Keys) -> Update {
    let mut entries: Vec<_> = KEYS
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let e = key_entry(
                Uuid::from_u128(0x1000 + i as u128),
                Some(C_ALL),
                format!("key-{i}"),
            );
            (keys.hasher.hash(v.as_bytes()), e)
        })
        .collect();
    entries[1].1.enabled = false;
    entries[2].1.expire_time = Some(NOW);
    entries[3].1.consumer = None;
    entries[4].1.ip_allowlist = vec![
        "10.0.0.0/8".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ]
    .into();
    entries[5].1.scope = scope(&[S_ANTHROPIC], &[]);
    entries[8].1.scope = scope(&[], &[(S_OPENAI, "gpt-4o-mini"), (S_AZURE, "prod-*")]);
    entries[6].1.consumer = Some(C_OPENAI);
    entries[7].1.expire_time = Some(Timestamp(NOW.0 + 3_600_000_000));
    Update {
        store_id: "fuzz".into(),
        epoch: "fuzz-epoch-1".into(),
        version: 10,
        full: true,
        keys: entries,
        consumers: vec![
            ConsumerRecord {
                id: C_ALL,
                name: "all".into(),
                scope: ScopeSet::All,
                limits: Default::default(),
            },
            ConsumerRecord {
                id: C_OPENAI,
                name: "openai-only".into(),
                scope: scope(&[S_OPENAI], &[]),
                limits: Default::default(),
            },
        ],
        services: Some(vec![
            service(
                keys,
                S_OPENAI,
                "openai",
                "authorization",
                "Bearer {key}",
                &MODEL_KEYS[..1],
                (&[], ModelSource::Body),
            ),
            service(
                keys,
                S_ANTHROPIC,
                "anthropic",
                "x-api-key",
                "{key}",
                &MODEL_KEYS[1..2],
                (&["claude-*"], ModelSource::Body),
            ),
            service(
                keys,
                S_AZURE,
                "azure",
                "api-key",
                "{key}",
                &MODEL_KEYS[2..],
                (&[], ModelSource::Path),
            ),
            service(
                keys,
                S_EMPTY,
                "empty",
                "authorization",
                "Bearer {key}",
                &[],
                (&[], ModelSource::Body),
            ),
        ]),
        model_key_count: 3,
        ..Default::default()
    }
}

pub fn snapshot(keys: &Keys) -> Snapshot {
    Snapshot::from_full(full_update(keys), keys).expect("the fuzz snapshot builds")
}
