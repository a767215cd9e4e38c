//! What an operator asks for: new resources and patches, validated against SPEC §1 before
//! anything touches the store. Store-dependent rules (existence, uniqueness, quotas,
//! lifecycle) are checked inside the store's transaction.

use ipnet::IpNet;

use super::validate::{self, FieldViolation};
use super::{GenerationMethod, Limits, RuleError, ScopeInput, Secret, SecretRef, Timestamp};

pub const DEFAULT_AUTH_HEADER: &str = "authorization";
pub const DEFAULT_AUTH_VALUE_TEMPLATE: &str = "Bearer {key}";

#[derive(Clone, Debug, Default)]
pub struct NewConsumer {
    pub name: String,
    pub description: String,
    pub scope: ScopeInput,
}

#[derive(Clone, Debug, Default)]
pub struct ConsumerPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub scope: Option<ScopeInput>,
}

#[derive(Clone, Debug, Default)]
pub struct NewModelService {
    pub name: String,
    pub description: String,
    pub provider: String,
    pub auth_header: String,
    pub auth_value_template: String,
    pub models: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ModelServicePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub provider: Option<String>,
    pub auth_header: Option<String>,
    pub auth_value_template: Option<String>,
    pub models: Option<Vec<String>>,
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
}

#[derive(Clone, Debug, Default)]
pub struct ConsumerKeyPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub scope: Option<ScopeInput>,
    pub ip_allowlist: Option<Vec<String>>,
    /// `Some(None)` clears the expiry.
    pub expire_time: Option<Option<Timestamp>>,
    /// A SECRET_REF key pointed at another reference, with its resolved value.
    pub secret_ref: Option<(SecretRef, Secret)>,
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
    if let ScopeInput::Services(list) = scope {
        for (i, n) in list.iter().enumerate() {
            v.check(validate::name(&format!("{field}.model_services[{i}]"), n));
        }
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
            check_scope(&mut v, "consumer.scope", s);
        }
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
    if let Some(models) = models {
        for (i, m) in models.iter().enumerate() {
            if m.is_empty() || m.chars().count() > 200 || m.chars().any(|c| c.is_control()) {
                v.0.push(FieldViolation::new(
                    &format!("{prefix}models[{i}]"),
                    "must be 1 to 200 printable characters",
                ));
            }
        }
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
            check_scope(&mut v, "consumer_key.scope", s);
        }
        if let Some(t) = self.expire_time {
            check_expiry(&mut v, "consumer_key.expire_time", t, now);
        }
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
