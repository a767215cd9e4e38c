//! What an operator asks for: new resources and patches, validated against SPEC §1 before
//! anything touches the store. Store-dependent rules (existence, uniqueness, quotas,
//! lifecycle) are checked inside the store's transaction.

use ipnet::IpNet;

use super::limits::LimitsInput;
use super::model::{check_pattern, split_entry};
use super::usage::{ModelPriceInput, parse_pricing};
use super::validate::{self, FieldViolation};
use super::{
    GenerationMethod, Limits, ModelSource, RuleError, ScopeInput, ScopePatch, Secret, SecretRef,
    Timestamp,
};

pub const DEFAULT_AUTH_HEADER: &str = "authorization";
pub const DEFAULT_AUTH_VALUE_TEMPLATE: &str = "Bearer {key}";

#[derive(Clone, Debug, Default)]
pub struct NewConsumer {
    pub name: String,
    pub description: String,
    pub scope: ScopeInput,
    /// Budgets and rate limits, as written: parsed by `LimitsInput::parse`.
    pub limits: LimitsInput,
}

#[derive(Clone, Debug, Default)]
pub struct ConsumerPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub scope: Option<ScopePatch>,
    /// Replaces every limit (unset ones are removed).
    pub limits: Option<LimitsInput>,
}

#[derive(Clone, Debug, Default)]
pub struct NewModelService {
    pub name: String,
    pub description: String,
    pub provider: String,
    pub auth_header: String,
    pub auth_value_template: String,
    /// Model patterns the service may be asked for (empty: any), enforced by the data plane.
    pub models: Vec<String>,
    pub model_source: ModelSource,
    /// Prices of its models (SPEC §8.2), as written: parsed by `usage::parse_pricing`.
    pub pricing: Vec<ModelPriceInput>,
}

#[derive(Clone, Debug, Default)]
pub struct ModelServicePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub provider: Option<String>,
    pub auth_header: Option<String>,
    pub auth_value_template: Option<String>,
    pub models: Option<Vec<String>>,
    pub model_source: Option<ModelSource>,
    /// Replaces the whole price list.
    pub pricing: Option<Vec<ModelPriceInput>>,
}

/// A consumer key's value as the operator chose to provide it.
#[derive(Clone, Debug)]
pub enum KeySource {
    Auto,
    Custom(Secret),
    /// The reference, and its value once the caller has resolved it (the store refuses to
    /// commit an unresolved reference: keygate never serves a key it could not resolve).
    SecretRef(SecretRef, Option<Secret>),
}

impl KeySource {
    pub fn method(&self) -> GenerationMethod {
        match self {
            KeySource::Auto => GenerationMethod::Auto,
            KeySource::Custom(_) => GenerationMethod::Custom,
            KeySource::SecretRef(..) => GenerationMethod::SecretRef,
        }
    }
}

#[derive(Clone, Debug)]
pub struct NewConsumerKey {
    pub name: String,
    pub description: String,
    pub source: KeySource,
    /// Name or id of the consumer to bind at creation.
    pub consumer: Option<String>,
    pub scope: ScopeInput,
    pub ip_allowlist: Vec<String>,
    pub expire_time: Option<Timestamp>,
    /// Budgets and rate limits, as written.
    pub limits: LimitsInput,
}

#[derive(Clone, Debug, Default)]
pub struct ConsumerKeyPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub scope: Option<ScopePatch>,
    pub ip_allowlist: Option<Vec<String>>,
    /// `Some(None)` clears the expiry.
    pub expire_time: Option<Option<Timestamp>>,
    /// A SECRET_REF key pointed at another reference, with its resolved value.
    pub secret_ref: Option<(SecretRef, Secret)>,
    /// Replaces every limit (unset ones are removed).
    pub limits: Option<LimitsInput>,
}

/// How long a rotated key's previous value keeps authorizing when the request does not say.
pub const DEFAULT_ROTATION_OVERLAP_US: i64 = 24 * 3600 * 1_000_000;
/// The longest overlap a rotation may ask for: 30 days.
pub const MAX_ROTATION_OVERLAP_US: i64 = 30 * 24 * 3600 * 1_000_000;

/// A consumer key's rotation (SPEC §8.4): a new value for the same key, the previous one
/// authorizing for `overlap_us` more.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// Microseconds from the rotation's commit until the previous value stops (0: at once).
    pub overlap_us: i64,
    /// The new value of a CUSTOM key (an AUTO key's is generated).
    pub value: Option<Secret>,
}

impl Rotation {
    /// The rules that need no store: the overlap's range and the value's characters.
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut v = Violations::default();
        if self.overlap_us < 0 {
            v.0.push(FieldViolation::new("overlap", "must not be negative"));
        } else if self.overlap_us > MAX_ROTATION_OVERLAP_US {
            v.0.push(FieldViolation::new(
                "overlap",
                "must be at most 720h (30 days)",
            ));
        }
        if let Some(value) = &self.value {
            v.check(validate::key_value("value", value.expose()));
        }
        v.finish()
    }
}

#[derive(Clone, Debug)]
pub struct NewModelKey {
    pub name: String,
    pub description: String,
    pub source: KeySource,
    /// Names or ids of model services to bind at creation.
    pub model_services: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ModelKeyPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A SECRET_REF key pointed at another reference, with its resolved value.
    pub secret_ref: Option<(SecretRef, Secret)>,
}

/// Collects every violation, so one answer names all broken fields.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn check(&mut self, r: Result<(), FieldViolation>) {
        if let Err(v) = r {
            self.0.push(v);
        }
    }
    fn finish(self) -> Result<(), RuleError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(RuleError::Invalid(self.0))
        }
    }
}

fn check_scope(v: &mut Violations, field: &str, scope: &ScopeInput) {
    if let ScopeInput::List { services, models } = scope {
        check_scope_lists(v, field, Some(services), Some(models));
    }
}

fn check_scope_patch(v: &mut Violations, field: &str, patch: &ScopePatch) {
    match patch {
        ScopePatch::Replace(scope) => check_scope(v, field, scope),
        ScopePatch::Lists { services, models } => {
            check_scope_lists(v, field, services.as_ref(), models.as_ref())
        }
    }
}

/// A scope's lists: service names, and `"<service>/<pattern>"` entries whose service part is
/// a name too (`{field}.models[i]` in either case).
fn check_scope_lists(
    v: &mut Violations,
    field: &str,
    services: Option<&Vec<String>>,
    models: Option<&Vec<String>>,
) {
    for (i, n) in services.into_iter().flatten().enumerate() {
        v.check(validate::name(&format!("{field}.model_services[{i}]"), n));
    }
    for (i, entry) in models.into_iter().flatten().enumerate() {
        let f = format!("{field}.models[{i}]");
        v.check(split_entry(&f, entry).and_then(|(service, _)| validate::name(&f, service)));
    }
}

fn check_limits(v: &mut Violations, field: &str, limits: Option<&LimitsInput>) {
    if let Some(Err(mut bad)) = limits.map(|l| l.parse(field)) {
        v.0.append(&mut bad);
    }
}

fn check_expiry(v: &mut Violations, field: &str, t: Option<Timestamp>, now: Timestamp) {
    if let Some(t) = t
        && t <= now
    {
        v.0.push(FieldViolation::new(field, "must be in the future"));
    }
}

/// Parses an allowlist: at most `limits.max_ip_allowlist` entries, each an address or CIDR.
pub fn parse_ip_allowlist(list: &[String], limits: &Limits) -> Result<Vec<IpNet>, RuleError> {
    if list.len() > limits.max_ip_allowlist {
        return Err(RuleError::ResourceExhausted(format!(
            "ip_allowlist has {} entries; at most {} are allowed",
            list.len(),
            limits.max_ip_allowlist
        )));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut bad = Violations::default();
    for (i, e) in list.iter().enumerate() {
        match validate::ip_entry(&format!("ip_allowlist[{i}]"), e) {
            Ok(n) => {
                if !out.contains(&n) {
                    out.push(n)
                }
            }
            Err(v) => bad.0.push(v),
        }
    }
    bad.finish()?;
    Ok(out)
}

fn check_source(v: &mut Violations, source: &KeySource) {
    match source {
        KeySource::Auto => {}
        KeySource::Custom(value) => v.check(validate::key_value("value", value.expose())),
        KeySource::SecretRef(r, _) => {
            if r.provider.is_empty() {
                v.0.push(FieldViolation::new("secret_ref.provider", "is required"));
            }
            if r.name.is_empty() {
                v.0.push(FieldViolation::new("secret_ref.name", "is required"));
            }
        }
    }
}

impl NewConsumer {
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut v = Violations::default();
        v.check(validate::name("name", &self.name));
        v.check(validate::description("description", &self.description));
        check_scope(&mut v, "scope", &self.scope);
        check_limits(&mut v, "limits", Some(&self.limits));
        v.finish()
    }
}

impl ConsumerPatch {
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut v = Violations::default();
        if let Some(n) = &self.name {
            v.check(validate::name("consumer.name", n));
        }
        if let Some(d) = &self.description {
            v.check(validate::description("consumer.description", d));
        }
        if let Some(s) = &self.scope {
            check_scope_patch(&mut v, "consumer.scope", s);
        }
        check_limits(&mut v, "consumer.limits", self.limits.as_ref());
        v.finish()
    }
}

impl NewModelService {
    /// Fills defaults (auth header and template) and validates.
    pub fn normalize(&mut self) -> Result<(), RuleError> {
        if self.auth_header.is_empty() {
            self.auth_header = DEFAULT_AUTH_HEADER.to_string();
        }
        if self.auth_value_template.is_empty() {
            self.auth_value_template = DEFAULT_AUTH_VALUE_TEMPLATE.to_string();
        }
        let mut v = Violations::default();
        v.check(validate::name("name", &self.name));
        v.check(validate::description("description", &self.description));
        v.check(validate::auth_header("auth_header", &self.auth_header));
        v.check(validate::auth_value_template(
            "auth_value_template",
            &self.auth_value_template,
        ));
        check_provider_and_models(&mut v, "", Some(&self.provider), Some(&self.models));
        check_pricing(&mut v, "pricing", Some(&self.pricing));
        v.finish()
    }
}

fn check_provider_and_models(
    v: &mut Violations,
    prefix: &str,
    provider: Option<&String>,
    models: Option<&Vec<String>>,
) {
    if let Some(p) = provider
        && p.chars().count() > 60
    {
        v.0.push(FieldViolation::new(
            &format!("{prefix}provider"),
            "must be at most 60 characters",
        ));
    }
    for (i, m) in models.into_iter().flatten().enumerate() {
        v.check(check_pattern(&format!("{prefix}models[{i}]"), m));
    }
}

fn check_pricing(v: &mut Violations, field: &str, pricing: Option<&Vec<ModelPriceInput>>) {
    if let Some(Err(mut bad)) = pricing.map(|p| parse_pricing(field, p)) {
        v.0.append(&mut bad);
    }
}

impl ModelServicePatch {
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut v = Violations::default();
        if let Some(n) = &self.name {
            v.check(validate::name("model_service.name", n));
        }
        if let Some(d) = &self.description {
            v.check(validate::description("model_service.description", d));
        }
        if let Some(h) = &self.auth_header {
            v.check(validate::auth_header("model_service.auth_header", h));
        }
        if let Some(t) = &self.auth_value_template {
            v.check(validate::auth_value_template(
                "model_service.auth_value_template",
                t,
            ));
        }
        check_provider_and_models(
            &mut v,
            "model_service.",
            self.provider.as_ref(),
            self.models.as_ref(),
        );
        check_pricing(&mut v, "model_service.pricing", self.pricing.as_ref());
        v.finish()
    }
}

impl NewConsumerKey {
    pub fn validate(&self, limits: &Limits, now: Timestamp) -> Result<Vec<IpNet>, RuleError> {
        let mut v = Violations::default();
        v.check(validate::name("name", &self.name));
        v.check(validate::description("description", &self.description));
        check_source(&mut v, &self.source);
        check_scope(&mut v, "scope", &self.scope);
        check_expiry(&mut v, "expire_time", self.expire_time, now);
        check_limits(&mut v, "limits", Some(&self.limits));
        v.finish()?;
        parse_ip_allowlist(&self.ip_allowlist, limits)
    }
}

impl ConsumerKeyPatch {
    pub fn validate(
        &self,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<Option<Vec<IpNet>>, RuleError> {
        let mut v = Violations::default();
        if let Some(n) = &self.name {
            v.check(validate::name("consumer_key.name", n));
        }
        if let Some(d) = &self.description {
            v.check(validate::description("consumer_key.description", d));
        }
        if let Some(s) = &self.scope {
            check_scope_patch(&mut v, "consumer_key.scope", s);
        }
        if let Some(t) = self.expire_time {
            check_expiry(&mut v, "consumer_key.expire_time", t, now);
        }
        check_limits(&mut v, "consumer_key.limits", self.limits.as_ref());
        v.finish()?;
        self.ip_allowlist
            .as_ref()
            .map(|l| parse_ip_allowlist(l, limits))
            .transpose()
    }
}

impl NewModelKey {
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut v = Violations::default();
        v.check(validate::name("name", &self.name));
        v.check(validate::description("description", &self.description));
        if matches!(self.source, KeySource::Auto) {
            v.0.push(FieldViolation::new(
                "generation_method",
                "a model key is CUSTOM (the vendor's value) or SECRET_REF; AUTO is for consumer keys",
            ));
        }
        check_source(&mut v, &self.source);
        v.finish()
    }
}

impl ModelKeyPatch {
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut v = Violations::default();
        if let Some(n) = &self.name {
            v.check(validate::name("model_key.name", n));
        }
        if let Some(d) = &self.description {
            v.check(validate::description("model_key.description", d));
        }
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(e: RuleError) -> Vec<String> {
        match e {
            RuleError::Invalid(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn list(services: &[&str], models: &[&str]) -> ScopeInput {
        ScopeInput::List {
            services: services.iter().map(|s| s.to_string()).collect(),
            models: models.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn scope_model_entries_name_their_field() {
        let ok = NewConsumer {
            name: "app".into(),
            scope: list(&[], &["openai/gpt-4o-mini", "anthropic/claude-*"]),
            ..Default::default()
        };
        assert!(
            ok.validate().is_ok(),
            "a scope of model entries only is valid"
        );
        let bad = NewConsumer {
            name: "app".into(),
            scope: list(
                &["openai", "1bad"],
                &[
                    "openai/gpt-*-mini",
                    "no-slash",
                    "1bad/gpt-4o",
                    "openai/gpt-4o",
                ],
            ),
            ..Default::default()
        };
        assert_eq!(
            fields(bad.validate().unwrap_err()),
            [
                "scope.model_services[1]",
                "scope.models[0]",
                "scope.models[1]",
                "scope.models[2]"
            ]
        );
    }

    #[test]
    fn scope_patches_name_the_resource_path() {
        let patch = ConsumerKeyPatch {
            scope: Some(ScopePatch::Lists {
                services: None,
                models: Some(vec!["openai/".into()]),
            }),
            ..Default::default()
        };
        let e = patch
            .validate(&Limits::default(), Timestamp::now())
            .unwrap_err();
        assert_eq!(fields(e), ["consumer_key.scope.models[0]"]);
        let patch = ConsumerPatch {
            scope: Some(list(&["-x"], &[]).into()),
            ..Default::default()
        };
        assert_eq!(
            fields(patch.validate().unwrap_err()),
            ["consumer.scope.model_services[0]"]
        );
    }

    #[test]
    fn service_models_follow_the_pattern_rules() {
        let mut new = NewModelService {
            name: "openai".into(),
            models: vec!["gpt-4o".into(), "o1-*".into(), "gpt 4".into(), "*-x".into()],
            ..Default::default()
        };
        assert_eq!(
            fields(new.normalize().unwrap_err()),
            ["models[2]", "models[3]"]
        );
        let patch = ModelServicePatch {
            models: Some(vec![String::new()]),
            ..Default::default()
        };
        assert_eq!(
            fields(patch.validate().unwrap_err()),
            ["model_service.models[0]"]
        );
    }
}
