//! Model-level scope (SPEC §8.1): model patterns, scope entries naming `"<service>/<pattern>"`,
//! and where a service's requests name their model. Shared by validation (admin), the store
//! and the data plane's matcher, so the rules are written once.

use super::Named;
use super::validate::FieldViolation;

/// The longest model pattern, in bytes (patterns are ASCII).
pub const MODEL_PATTERN_MAX: usize = 128;

/// Where a service's requests name their model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ModelSource {
    /// The top-level `model` string of a JSON request body (OpenAI, Anthropic, Mistral, …).
    #[default]
    Body,
    /// The path: the segment after `/deployments/` (Azure OpenAI) or after `/models/` up to
    /// `:` (Gemini, Vertex).
    Path,
    /// Requests do not name a model (only a route's fixed model can).
    None,
}

impl ModelSource {
    /// The stored / wire code (0 is never stored: it means "unspecified" on the wire).
    pub fn code(self) -> i64 {
        match self {
            ModelSource::Body => 1,
            ModelSource::Path => 2,
            ModelSource::None => 3,
        }
    }

    /// The source for a stored / wire code; 0 (unspecified) is `Body`.
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 | 1 => Some(ModelSource::Body),
            2 => Some(ModelSource::Path),
            3 => Some(ModelSource::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelSource::Body => "BODY",
            ModelSource::Path => "PATH",
            ModelSource::None => "NONE",
        }
    }
}

/// One `models` entry of a scope, resolved: the service it names and the pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelGrant {
    pub service: Named,
    pub pattern: String,
}

impl ModelGrant {
    /// `"<service name>/<pattern>"`, as operators write and read it.
    pub fn entry(&self) -> String {
        format!("{}/{}", self.service.name, self.pattern)
    }
}

/// Checks a model pattern: 1–128 visible ASCII characters (`!`..=`~`), `*` only as the last
/// character (a prefix). `field` names the field in the violation.
pub fn check_pattern(field: &str, pattern: &str) -> Result<(), FieldViolation> {
    // Characters first, so the length below counts ASCII characters (= bytes).
    if let Some(c) = pattern.chars().find(|c| !matches!(c, '!'..='~')) {
        return Err(FieldViolation::new(
            field,
            format!(
                "a model pattern must be visible ASCII characters (found U+{:04X})",
                c as u32
            ),
        ));
    }
    if pattern.is_empty() || pattern.len() > MODEL_PATTERN_MAX {
        return Err(FieldViolation::new(
            field,
            format!(
                "a model pattern must be 1 to {MODEL_PATTERN_MAX} characters (got {})",
                pattern.len()
            ),
        ));
    }
    if pattern[..pattern.len() - 1].contains('*') {
        return Err(FieldViolation::new(
            field,
            "'*' may only be the last character of a model pattern (a prefix)",
        ));
    }
    Ok(())
}

/// Splits a scope's `models` entry `"<service>/<pattern>"` at its first `/` (service names
/// never contain one; model names may) and checks the pattern. The service part is checked
/// as a name by the caller.
pub fn split_entry<'e>(field: &str, entry: &'e str) -> Result<(&'e str, &'e str), FieldViolation> {
    let Some((service, pattern)) = entry.split_once('/') else {
        return Err(FieldViolation::new(
            field,
            "must be \"<model service>/<model pattern>\" (e.g. \"openai/gpt-4o-mini\" or \"anthropic/claude-*\")",
        ));
    };
    check_pattern(field, pattern)?;
    Ok((service, pattern))
}

/// Whether `model` matches `pattern`: equal, or for `prefix*`, starting with `prefix`.
/// Case-sensitive, as vendors' model names are.
#[inline]
pub fn pattern_matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        assert!(pattern_matches("gpt-4o-mini", "gpt-4o-mini"));
        assert!(!pattern_matches("gpt-4o", "gpt-4o-mini"));
        assert!(!pattern_matches("gpt-4o-mini", "gpt-4o"));
        assert!(pattern_matches("claude-*", "claude-sonnet-4"));
        assert!(pattern_matches("claude-*", "claude-"));
        assert!(!pattern_matches("claude-*", "Claude-sonnet"));
        assert!(pattern_matches("*", "anything"));
    }

    #[test]
    fn pattern_rules_name_the_field() {
        assert!(check_pattern("f", "gpt-4o").is_ok());
        assert!(check_pattern("f", "claude-*").is_ok());
        assert!(check_pattern("f", "*").is_ok());
        assert!(check_pattern("f", "meta-llama/Llama-3-70b").is_ok());
        for bad in ["", "gpt 4o", "gpt-*-mini", "**", "modèle", &"m".repeat(129)] {
            let e = check_pattern("scope.models[0]", bad).unwrap_err();
            assert_eq!(e.field, "scope.models[0]", "{bad:?}");
        }
        assert!(check_pattern("f", &"m".repeat(128)).is_ok());
    }

    #[test]
    fn entries_split_at_the_first_slash() {
        assert_eq!(
            split_entry("f", "together/meta-llama/Llama-3").unwrap(),
            ("together", "meta-llama/Llama-3")
        );
        assert!(split_entry("f", "openai").is_err());
        assert!(split_entry("f", "openai/").is_err());
    }
}
