//! What the response meter reads from vendors' JSON: the keys it recognises, the paths whose
//! values are usage counts or the model ([`target`]), the containers those paths run through
//! ([`may_hold_target`]), and the raw counts normalised into [`Tokens`].

use super::Tokens;

/// The keys the scanner recognises; every other key is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(super) enum Key {
    #[default]
    Other,
    Usage,
    UsageMetadata,
    Message,
    Response,
    Model,
    ModelVersion,
    PromptTokens,
    CompletionTokens,
    PromptTokensDetails,
    InputTokensDetails,
    CachedTokens,
    InputTokens,
    OutputTokens,
    CacheRead,
    CacheCreation,
    PromptTokenCount,
    CandidatesTokenCount,
    ThoughtsTokenCount,
    CachedContentTokenCount,
    ToolUsePromptTokenCount,
}

/// The longest key recognised (`cache_creation_input_tokens`).
pub(super) const KEY_BUF: usize = 32;

pub(super) fn classify(key: &[u8]) -> Key {
    match key {
        b"usage" => Key::Usage,
        b"usageMetadata" => Key::UsageMetadata,
        b"message" => Key::Message,
        b"response" => Key::Response,
        b"model" => Key::Model,
        b"modelVersion" => Key::ModelVersion,
        b"prompt_tokens" => Key::PromptTokens,
        b"completion_tokens" => Key::CompletionTokens,
        b"prompt_tokens_details" => Key::PromptTokensDetails,
        b"input_tokens_details" => Key::InputTokensDetails,
        b"cached_tokens" => Key::CachedTokens,
        b"input_tokens" => Key::InputTokens,
        b"output_tokens" => Key::OutputTokens,
        b"cache_read_input_tokens" => Key::CacheRead,
        b"cache_creation_input_tokens" => Key::CacheCreation,
        b"promptTokenCount" => Key::PromptTokenCount,
        b"candidatesTokenCount" => Key::CandidatesTokenCount,
        b"thoughtsTokenCount" => Key::ThoughtsTokenCount,
        b"cachedContentTokenCount" => Key::CachedContentTokenCount,
        b"toolUsePromptTokenCount" => Key::ToolUsePromptTokenCount,
        _ => Key::Other,
    }
}

/// The raw counts, each the last value seen.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Raw {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    details_cached: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    gemini_prompt: Option<u64>,
    gemini_tool_prompt: Option<u64>,
    gemini_candidates: Option<u64>,
    gemini_thoughts: Option<u64>,
    gemini_cached: Option<u64>,
}

impl Raw {
    pub(super) fn slot(&mut self, field: Field) -> &mut Option<u64> {
        match field {
            Field::PromptTokens => &mut self.prompt_tokens,
            Field::CompletionTokens => &mut self.completion_tokens,
            Field::DetailsCached => &mut self.details_cached,
            Field::InputTokens => &mut self.input_tokens,
            Field::OutputTokens => &mut self.output_tokens,
            Field::CacheRead => &mut self.cache_read,
            Field::CacheCreation => &mut self.cache_creation,
            Field::GeminiPrompt => &mut self.gemini_prompt,
            Field::GeminiToolPrompt => &mut self.gemini_tool_prompt,
            Field::GeminiCandidates => &mut self.gemini_candidates,
            Field::GeminiThoughts => &mut self.gemini_thoughts,
            Field::GeminiCached => &mut self.gemini_cached,
        }
    }

    /// The normalised counts, if the response reported any.
    pub(super) fn tokens(&self) -> Option<Tokens> {
        let n = |v: Option<u64>| v.unwrap_or(0);
        let t = if self.prompt_tokens.is_some() || self.completion_tokens.is_some() {
            // OpenAI chat / completions: prompt_tokens includes the cached tokens.
            Tokens {
                input: n(self.prompt_tokens),
                output: n(self.completion_tokens),
                cached_input: n(self.details_cached),
            }
        } else if self.gemini_prompt.is_some()
            || self.gemini_candidates.is_some()
            || self.gemini_thoughts.is_some()
            || self.gemini_tool_prompt.is_some()
        {
            Tokens {
                input: n(self.gemini_prompt).saturating_add(n(self.gemini_tool_prompt)),
                output: n(self.gemini_candidates).saturating_add(n(self.gemini_thoughts)),
                cached_input: n(self.gemini_cached),
            }
        } else if self.input_tokens.is_some()
            || self.output_tokens.is_some()
            || self.cache_read.is_some()
            || self.cache_creation.is_some()
        {
            // Anthropic (cache fields apart from input_tokens) or OpenAI Responses (cached
            // tokens part of input_tokens, detailed in input_tokens_details).
            Tokens {
                input: n(self.input_tokens)
                    .saturating_add(n(self.cache_read))
                    .saturating_add(n(self.cache_creation)),
                output: n(self.output_tokens),
                cached_input: n(self.cache_read).saturating_add(n(self.details_cached)),
            }
        } else {
            return None;
        };
        // Cached input is part of input, whatever a vendor's numbers say.
        Some(Tokens {
            cached_input: t.cached_input.min(t.input),
            ..t
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Field {
    PromptTokens,
    CompletionTokens,
    DetailsCached,
    InputTokens,
    OutputTokens,
    CacheRead,
    CacheCreation,
    GeminiPrompt,
    GeminiToolPrompt,
    GeminiCandidates,
    GeminiThoughts,
    GeminiCached,
}

/// What a value at `path` (object keys from a document's root) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Count(Field),
    Model,
}

pub(super) fn target(path: &[Key]) -> Option<Target> {
    use Key::*;
    // Anthropic's message_start nests the message; OpenAI's Responses stream the response.
    let path = match path {
        [Message | Response, rest @ ..] if !rest.is_empty() => rest,
        _ => path,
    };
    let count = |f| Some(Target::Count(f));
    match path {
        [Model] | [ModelVersion] => Some(Target::Model),
        [Usage, PromptTokens] => count(Field::PromptTokens),
        [Usage, CompletionTokens] => count(Field::CompletionTokens),
        [
            Usage,
            PromptTokensDetails | InputTokensDetails,
            CachedTokens,
        ] => count(Field::DetailsCached),
        [Usage, InputTokens] => count(Field::InputTokens),
        [Usage, OutputTokens] => count(Field::OutputTokens),
        [Usage, CacheRead] => count(Field::CacheRead),
        [Usage, CacheCreation] => count(Field::CacheCreation),
        [UsageMetadata, PromptTokenCount] => count(Field::GeminiPrompt),
        [UsageMetadata, ToolUsePromptTokenCount] => count(Field::GeminiToolPrompt),
        [UsageMetadata, CandidatesTokenCount] => count(Field::GeminiCandidates),
        [UsageMetadata, ThoughtsTokenCount] => count(Field::GeminiThoughts),
        [UsageMetadata, CachedContentTokenCount] => count(Field::GeminiCached),
        _ => None,
    }
}

/// Whether a container at `path` (the keys from the root, the root array of a Gemini stream
/// left out) can hold a value [`target`] reads: the root, `usage`, `usageMetadata`, the
/// details objects of `usage`, each also under `message` / `response`.
pub(super) fn may_hold_target(path: &[Key]) -> bool {
    use Key::*;
    fn prefix(p: &[Key]) -> bool {
        matches!(
            p,
            [] | [Usage] | [UsageMetadata] | [Usage, PromptTokensDetails | InputTokensDetails]
        )
    }
    match path {
        [Message | Response, rest @ ..] => prefix(path) || prefix(rest),
        _ => prefix(path),
    }
}
