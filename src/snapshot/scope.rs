//! Scopes as the data plane checks them (SPEC §8.1): all services, or a list of whole services
//! and of model entries (a service and a model pattern). Effective scope is consumer ∩ key,
//! per (service, model): [`ScopeSet::grant`] says what one scope grants on a service, and
//! [`Grant::allows`] whether that covers a model.

use std::sync::Arc;

use uuid::Uuid;

use crate::domain::model::pattern_matches;

/// A scope's model entry: the models of `service` matching `pattern` (exact, or `prefix*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRule {
    pub service: Uuid,
    pub pattern: Box<str>,
}

/// A narrowed scope: whole services, and model entries of other services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeList {
    pub services: Box<[Uuid]>,
    pub models: Box<[ModelRule]>,
}

impl From<Vec<Uuid>> for ScopeList {
    fn from(services: Vec<Uuid>) -> Self {
        ScopeList {
            services: services.into(),
            models: Box::default(),
        }
    }
}

/// Which model services (and models) a consumer or key may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeSet {
    All,
    Only(Arc<ScopeList>),
}

/// What one scope grants on one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant<'a> {
    /// Nothing of this service.
    Nothing,
    /// Every model of it.
    AllModels,
    /// Only the models matching one of these rules (those of this service).
    Models(Uuid, &'a [ModelRule]),
}

impl Grant<'_> {
    /// Whether the grant covers `model` (`AllModels` covers every model, known or not).
    pub fn allows(&self, model: &str) -> bool {
        match self {
            Grant::Nothing => false,
            Grant::AllModels => true,
            Grant::Models(service, rules) => rules
                .iter()
                .any(|r| r.service == *service && pattern_matches(&r.pattern, model)),
        }
    }

    /// Whether this grant depends on the model (so the data plane must read it).
    pub fn needs_model(&self) -> bool {
        matches!(self, Grant::Models(..))
    }
}

impl ScopeSet {
    /// A scope listing only whole services.
    pub fn services(ids: Vec<Uuid>) -> Self {
        ScopeSet::Only(Arc::new(ids.into()))
    }

    /// What this scope grants on `service_id`.
    #[inline]
    pub fn grant(&self, service_id: &Uuid) -> Grant<'_> {
        match self {
            ScopeSet::All => Grant::AllModels,
            ScopeSet::Only(list) if list.services.contains(service_id) => Grant::AllModels,
            ScopeSet::Only(list) if list.models.iter().any(|r| r.service == *service_id) => {
                Grant::Models(*service_id, &list.models)
            }
            ScopeSet::Only(_) => Grant::Nothing,
        }
    }

    /// Whether this scope grants anything (some or all models) of `service_id`.
    pub fn allows(&self, service_id: &Uuid) -> bool {
        self.grant(service_id) != Grant::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(service: u128, pattern: &str) -> ModelRule {
        ModelRule {
            service: Uuid::from_u128(service),
            pattern: pattern.into(),
        }
    }

    #[test]
    fn a_list_grants_whole_services_or_matching_models_of_one() {
        let scope = ScopeSet::Only(Arc::new(ScopeList {
            services: vec![Uuid::from_u128(1)].into(),
            models: vec![rule(2, "gpt-4o-mini"), rule(3, "claude-*")].into(),
        }));
        let (s1, s2, s3, s4) = (
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            Uuid::from_u128(4),
        );
        assert_eq!(scope.grant(&s1), Grant::AllModels);
        assert!(scope.grant(&s1).allows("anything"));
        assert!(scope.grant(&s2).needs_model());
        assert!(scope.grant(&s2).allows("gpt-4o-mini"));
        assert!(!scope.grant(&s2).allows("gpt-4o"));
        // A rule of another service never leaks into this one.
        assert!(!scope.grant(&s2).allows("claude-sonnet-4"));
        assert!(scope.grant(&s3).allows("claude-sonnet-4"));
        assert_eq!(scope.grant(&s4), Grant::Nothing);
        assert!(!scope.allows(&s4));
        assert!(ScopeSet::All.grant(&s4).allows("x"));
    }
}
