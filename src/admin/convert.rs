//! Protobuf ⇄ domain conversion for the admin API: selectors, pages, scopes, times, enums,
//! resources out, and the update-mask rules. Depends on `domain`, `store` and `proto`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost_types::{FieldMask, Timestamp as PbTimestamp};
use tonic::Status;

use crate::domain::limits::{Limits, LimitsInput, Spend};
use crate::domain::text::{nfc, nfc_owned};
use crate::domain::usage::{ModelPrice, ModelPriceInput};
use crate::domain::{
    self, FieldViolation, GenerationMethod, KeyStatus, ModelGrant, ModelSource, Named,
    ResourceKind, RuleError, Scope, ScopeInput, ScopePatch, Selector, Timestamp,
};
use crate::proto::admin::v1 as pb;
use crate::store::PageRequest;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

/// `INVALID_ARGUMENT` on one field.
pub fn invalid(field: &str, rule: impl Into<String>) -> Status {
    RuleError::invalid(field, rule).into()
}

/// A required `oneof selector { id, name }`.
/// A name given by the caller is taken in NFC, as names are stored.
pub fn selector<T>(sel: Option<T>, to: impl FnOnce(T) -> Selector) -> Result<Selector, Status> {
    match sel.map(to) {
        Some(Selector::Id(v)) if v.is_empty() => Err(invalid("id", "must not be empty")),
        Some(Selector::Name(v)) if v.is_empty() => Err(invalid("name", "must not be empty")),
        Some(Selector::Name(v)) => Ok(Selector::Name(nfc_owned(v))),
        Some(Selector::IdOrName(v)) => Ok(Selector::IdOrName(nfc_owned(v))),
        Some(s) => Ok(s),
        None => Err(invalid("selector", "set either \"id\" or \"name\"")),
    }
}

macro_rules! selector_from {
    ($($module:ident),* $(,)?) => {$(
        impl From<pb::$module::Selector> for Selector {
            fn from(s: pb::$module::Selector) -> Selector {
                match s {
                    pb::$module::Selector::Id(v) => Selector::Id(v),
                    pb::$module::Selector::Name(v) => Selector::Name(v),
                }
            }
        }
    )*};
}

selector_from!(
    get_consumer_request,
    update_consumer_request,
    delete_consumer_request,
    get_model_service_request,
    update_model_service_request,
    delete_model_service_request,
    get_consumer_key_request,
    update_consumer_key_request,
    enable_consumer_key_request,
    disable_consumer_key_request,
    delete_consumer_key_request,
    rotate_consumer_key_request,
    get_model_key_request,
    update_model_key_request,
    enable_model_key_request,
    disable_model_key_request,
    delete_model_key_request,
    get_key_references_request,
);

/// A required name-or-id reference field (bind requests), in NFC.
pub fn reference(field: &str, v: &str) -> Result<String, Status> {
    if v.is_empty() {
        Err(invalid(field, "is required (a name or an id)"))
    } else {
        Ok(nfc(v).into_owned())
    }
}

/// An optional name-or-id filter or reference (empty: none), in NFC.
pub fn optional_reference(v: String) -> Option<String> {
    (!v.is_empty()).then(|| nfc_owned(v))
}

/// Names the caller gives, in NFC (the form names are stored and compared in).
pub fn names_in(list: Vec<String>) -> Vec<String> {
    list.into_iter().map(nfc_owned).collect()
}

pub fn page(field_size: i32, token: &str) -> Result<PageRequest, Status> {
    let size = match field_size {
        n if n < 0 => return Err(invalid("page_size", "must not be negative")),
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    };
    let after = if token.is_empty() {
        None
    } else {
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| invalid("page_token", "is not a token from a previous page"))?;
        Some(
            String::from_utf8(bytes)
                .map_err(|_| invalid("page_token", "is not a token from a previous page"))?,
        )
    };
    Ok(PageRequest { size, after })
}

pub fn page_token(next: Option<String>) -> String {
    next.map(|n| URL_SAFE_NO_PAD.encode(n)).unwrap_or_default()
}

/// A scope as written: `all`, or its lists (names and `"<service>/<pattern>"` entries, in
/// NFC: NFC leaves a valid pattern, ASCII, as it is); neither is unset.
pub fn scope_input(field: &str, scope: Option<pb::Scope>) -> Result<ScopeInput, Status> {
    let Some(s) = scope else {
        return Ok(ScopeInput::Unset);
    };
    let listed = !(s.model_services.is_empty() && s.models.is_empty());
    match (s.all, listed) {
        (true, true) => Err(invalid(
            field,
            "\"all\": true cannot be combined with a list of model_services or models",
        )),
        (true, false) => Ok(ScopeInput::All),
        (false, true) => Ok(ScopeInput::List {
            services: names_in(s.model_services),
            models: names_in(s.models),
        }),
        (false, false) => Ok(ScopeInput::Unset),
    }
}

/// The scope change an update asks for, if any: the mask path `scope` replaces the whole
/// scope; `scope.model_services` and `scope.models` each replace one list, keeping the other.
/// `field` is the scope's path in the request (`consumer.scope`).
pub fn scope_patch(
    mask: &UpdateMask,
    field: &str,
    scope: Option<pb::Scope>,
) -> Result<Option<ScopePatch>, Status> {
    let (services, models) = (mask.has("scope.model_services"), mask.has("scope.models"));
    if mask.has("scope") {
        if services || models {
            return Err(invalid(
                "update_mask",
                "\"scope\" replaces the whole scope: name either it or its lists (\"scope.model_services\", \"scope.models\")",
            ));
        }
        return Ok(Some(ScopePatch::Replace(scope_input(field, scope)?)));
    }
    if !(services || models) {
        return Ok(None);
    }
    let s = scope.unwrap_or_default();
    if s.all {
        return Err(invalid(
            &format!("{field}.all"),
            "is set only by the update_mask path \"scope\" (\"scope.model_services\" and \"scope.models\" replace a list)",
        ));
    }
    Ok(Some(ScopePatch::Lists {
        services: services.then(|| names_in(s.model_services)),
        models: models.then(|| names_in(s.models)),
    }))
}

pub fn scope_out(scope: &Scope) -> Option<pb::Scope> {
    match scope {
        Scope::Unset => None,
        Scope::All => Some(pb::Scope {
            all: true,
            ..Default::default()
        }),
        Scope::List { services, models } => Some(pb::Scope {
            all: false,
            model_services: names(services),
            models: models.iter().map(ModelGrant::entry).collect(),
        }),
    }
}

/// A model service's `model_source` (unspecified: BODY); `field` names it in a refusal.
pub fn model_source_in(field: &str, v: i32) -> Result<ModelSource, Status> {
    ModelSource::from_code(i64::from(v))
        .ok_or_else(|| invalid(field, format!("must be BODY, PATH or NONE (got {v})")))
}

/// A stored source on the wire: BODY, PATH or NONE, never unspecified.
pub fn model_source_out(s: ModelSource) -> i32 {
    s.code() as i32
}

/// A service's price list as written (parsed and checked by the domain).
pub fn pricing_in(list: Vec<pb::ModelPrice>) -> Vec<ModelPriceInput> {
    list.into_iter()
        .map(|p| ModelPriceInput {
            model: p.model,
            input_per_mtok: p.input_per_mtok,
            output_per_mtok: p.output_per_mtok,
            cached_input_per_mtok: p.cached_input_per_mtok,
        })
        .collect()
}

/// Stored prices on the wire, as canonical decimals ("2.5"; cached input empty when unset).
pub fn pricing_out(list: &[ModelPrice]) -> Vec<pb::ModelPrice> {
    list.iter()
        .map(|p| {
            let p = ModelPriceInput::from(p);
            pb::ModelPrice {
                model: p.model,
                input_per_mtok: p.input_per_mtok,
                output_per_mtok: p.output_per_mtok,
                cached_input_per_mtok: p.cached_input_per_mtok,
            }
        })
        .collect()
}

/// Limits as written (absent: none); checked by the domain, which names a bad period number.
pub fn limits_in(l: Option<pb::Limits>) -> LimitsInput {
    let l = l.unwrap_or_default();
    LimitsInput {
        budget_usd: l.budget_usd,
        budget_tokens: l.budget_tokens,
        budget_period: i64::from(l.budget_period),
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
    }
}

/// Stored limits on the wire (absent when there is none), the budget as a canonical decimal.
pub fn limits_out(l: &Limits) -> Option<pb::Limits> {
    (!l.is_unlimited()).then(|| pb::Limits {
        budget_usd: l.budget_usd_text(),
        budget_tokens: l.budget_tokens.unwrap_or(0),
        // The domain's codes are the wire's.
        budget_period: l.period.map_or(0, |p| p.code() as i32),
        requests_per_minute: l.requests_per_minute.unwrap_or(0),
        tokens_per_minute: l.tokens_per_minute.unwrap_or(0),
    })
}

/// The spend of a budget's period on the wire, the cost an exact decimal.
pub fn spend_out(s: &Option<Spend>) -> Option<pb::Spend> {
    s.as_ref().map(|s| pb::Spend {
        period_start: Some(ts_out(s.period_start)),
        period_end: s.period_end.map(ts_out),
        cost_usd: s.cost.to_string(),
        tokens: s.tokens,
        exhausted: s.exhausted,
    })
}

fn names(list: &[Named]) -> Vec<String> {
    list.iter().map(|n| n.name.clone()).collect()
}

pub fn ts_out(t: Timestamp) -> PbTimestamp {
    PbTimestamp {
        seconds: t.0.div_euclid(1_000_000),
        nanos: (t.0.rem_euclid(1_000_000) * 1000) as i32,
    }
}

pub fn ts_in(field: &str, t: &PbTimestamp) -> Result<Timestamp, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(field, "nanos must be in 0..999999999"));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
        .map(Timestamp)
        .ok_or_else(|| invalid(field, "is out of range"))
}

/// A duration as microseconds (nanoseconds below that are dropped); `field` names it in a
/// refusal. The range is the caller's rule; this only refuses what is not a duration.
pub fn duration_in(field: &str, d: &prost_types::Duration) -> Result<i64, Status> {
    if !(-999_999_999..=999_999_999).contains(&d.nanos)
        || (d.seconds > 0 && d.nanos < 0)
        || (d.seconds < 0 && d.nanos > 0)
    {
        return Err(invalid(
            field,
            "is not a valid duration (nanos out of range or of the other sign than seconds)",
        ));
    }
    d.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(d.nanos / 1000)))
        .ok_or_else(|| invalid(field, "is out of range"))
}

pub fn status_out(s: KeyStatus) -> i32 {
    match s {
        KeyStatus::Enabled => pb::KeyStatus::Enabled as i32,
        KeyStatus::Disabled => pb::KeyStatus::Disabled as i32,
    }
}

pub fn status_filter(v: i32) -> Result<Option<KeyStatus>, Status> {
    match pb::KeyStatus::try_from(v) {
        Ok(pb::KeyStatus::Unspecified) => Ok(None),
        Ok(pb::KeyStatus::Enabled) => Ok(Some(KeyStatus::Enabled)),
        Ok(pb::KeyStatus::Disabled) => Ok(Some(KeyStatus::Disabled)),
        Err(_) => Err(invalid("status", "must be ENABLED or DISABLED")),
    }
}

pub fn method_out(m: GenerationMethod) -> i32 {
    match m {
        GenerationMethod::Auto => pb::GenerationMethod::Auto as i32,
        GenerationMethod::Custom => pb::GenerationMethod::Custom as i32,
        GenerationMethod::SecretRef => pb::GenerationMethod::SecretRef as i32,
    }
}

pub fn kind_in(field: &str, v: i32, required: bool) -> Result<Option<ResourceKind>, Status> {
    match pb::ResourceKind::try_from(v) {
        Ok(pb::ResourceKind::Unspecified) if !required => Ok(None),
        Ok(pb::ResourceKind::Unspecified) => Err(invalid(
            field,
            "is required: CONSUMER, CONSUMER_KEY, MODEL_SERVICE or MODEL_KEY",
        )),
        Ok(pb::ResourceKind::Consumer) => Ok(Some(ResourceKind::Consumer)),
        Ok(pb::ResourceKind::ConsumerKey) => Ok(Some(ResourceKind::ConsumerKey)),
        Ok(pb::ResourceKind::ModelService) => Ok(Some(ResourceKind::ModelService)),
        Ok(pb::ResourceKind::ModelKey) => Ok(Some(ResourceKind::ModelKey)),
        Ok(pb::ResourceKind::AdminToken) => Ok(Some(ResourceKind::AdminToken)),
        Ok(pb::ResourceKind::Store) => Ok(Some(ResourceKind::Store)),
        Err(_) => Err(invalid(field, "is not a known resource kind")),
    }
}

pub fn kind_out(k: ResourceKind) -> i32 {
    (match k {
        ResourceKind::Consumer => pb::ResourceKind::Consumer,
        ResourceKind::ConsumerKey => pb::ResourceKind::ConsumerKey,
        ResourceKind::ModelService => pb::ResourceKind::ModelService,
        ResourceKind::ModelKey => pb::ResourceKind::ModelKey,
        ResourceKind::AdminToken => pb::ResourceKind::AdminToken,
        ResourceKind::Store => pb::ResourceKind::Store,
    }) as i32
}

pub fn secret_ref_out(r: &Option<domain::SecretRef>) -> Option<pb::SecretRef> {
    r.as_ref().map(|r| pb::SecretRef {
        provider: r.provider.clone(),
        name: r.name.clone(),
        version: r.version.clone(),
    })
}

pub fn consumer_out(c: domain::Consumer) -> pb::Consumer {
    pb::Consumer {
        scope: scope_out(&c.scope),
        consumer_keys: names(&c.consumer_keys),
        create_time: Some(ts_out(c.create_time)),
        update_time: Some(ts_out(c.update_time)),
        limits: limits_out(&c.limits),
        spend: spend_out(&c.spend),
        id: c.id,
        name: c.name,
        description: c.description,
    }
}

pub fn service_out(s: domain::ModelService) -> pb::ModelService {
    pb::ModelService {
        model_keys: names(&s.model_keys),
        create_time: Some(ts_out(s.create_time)),
        update_time: Some(ts_out(s.update_time)),
        id: s.id,
        name: s.name,
        description: s.description,
        provider: s.provider,
        auth_header: s.auth_header,
        auth_value_template: s.auth_value_template,
        models: s.models,
        model_source: model_source_out(s.model_source),
        pricing: pricing_out(&s.pricing),
    }
}

pub fn consumer_key_out(k: domain::ConsumerKey, now: Timestamp) -> pb::ConsumerKey {
    let previous = k.previous_in_force(now).cloned();
    pb::ConsumerKey {
        expired: k.is_expired(now),
        status: status_out(k.status),
        generation_method: method_out(k.generation_method),
        secret_ref: secret_ref_out(&k.secret_ref),
        secret_status: None,
        consumer: k
            .consumer
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default(),
        consumer_id: k
            .consumer
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default(),
        scope: scope_out(&k.scope),
        expire_time: k.expire_time.map(ts_out),
        create_time: Some(ts_out(k.create_time)),
        update_time: Some(ts_out(k.update_time)),
        last_used_time: k.last_used_time.map(ts_out),
        limits: limits_out(&k.limits),
        spend: spend_out(&k.spend),
        id: k.id,
        name: k.name,
        description: k.description,
        previous_value_expire_time: previous.as_ref().map(|p| ts_out(p.expire_time)),
        previous_masked_value: previous.map(|p| p.masked_value).unwrap_or_default(),
        masked_value: k.masked_value,
        ip_allowlist: k.ip_allowlist,
    }
}

pub fn model_key_out(k: domain::ModelKey) -> pb::ModelKey {
    pb::ModelKey {
        status: status_out(k.status),
        generation_method: method_out(k.generation_method),
        secret_ref: secret_ref_out(&k.secret_ref),
        secret_status: None,
        model_services: names(&k.model_services),
        create_time: Some(ts_out(k.create_time)),
        update_time: Some(ts_out(k.update_time)),
        id: k.id,
        name: k.name,
        description: k.description,
        masked_value: k.masked_value,
    }
}

pub fn audit_out(e: domain::AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        time: Some(ts_out(e.time)),
        kind: kind_out(e.kind),
        revision: e.revision as u64,
        actor: e.actor,
        action: e.action,
        resource_id: e.resource_id,
        resource_name: e.resource_name,
        changed_fields: e.changed_fields,
        details: e.details,
    }
}

/// The fields an update touches: the mask's paths, or (no mask) every field set in the
/// resource. Fields that are output only or changed by another RPC are refused by name.
pub struct UpdateMask {
    paths: Vec<String>,
}

impl UpdateMask {
    /// `set` lists the resource's fields that carry a value (used when the mask is omitted);
    /// `editable` the paths this RPC may change; `elsewhere` maps other known fields to the
    /// reason they cannot be changed here.
    pub fn new(
        mask: Option<FieldMask>,
        set: &[(&str, bool)],
        editable: &[&str],
        elsewhere: &[(&str, &str)],
    ) -> Result<Self, Status> {
        let paths: Vec<String> = match mask {
            Some(m) if !m.paths.is_empty() => m.paths,
            _ => set
                .iter()
                .filter(|(_, is_set)| *is_set)
                .map(|(p, _)| p.to_string())
                .collect(),
        };
        if paths.is_empty() {
            return Err(invalid(
                "update_mask",
                "names no field to update (list the fields in update_mask.paths, or set them in the resource)",
            ));
        }
        let mut violations = Vec::new();
        for p in &paths {
            if editable.contains(&p.as_str()) {
                continue;
            }
            match elsewhere.iter().find(|(f, _)| f == p) {
                Some((_, why)) => violations.push(FieldViolation::new(
                    &format!("update_mask.paths[{p}]"),
                    format!("{p} cannot be updated here: {why}"),
                )),
                None => violations.push(FieldViolation::new(
                    &format!("update_mask.paths[{p}]"),
                    format!(
                        "unknown field {p:?}; updatable fields: {}",
                        editable.join(", ")
                    ),
                )),
            }
        }
        if !violations.is_empty() {
            return Err(RuleError::Invalid(violations).into());
        }
        Ok(UpdateMask { paths })
    }

    pub fn has(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }
}

pub const OUTPUT_ONLY: &str = "it is output only";
