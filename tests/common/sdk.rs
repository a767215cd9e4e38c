//! The vendors' own Python SDKs (`openai`, `anthropic`, installed by `./scripts/test` into
//! `target/test-venv`) as clients of the gateway: what an application using them sees —
//! the answer parsed into the SDK's types, or the SDK's exception for a refusal.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::test_tool;

/// How long one SDK script may run (each call has the SDK's own 20 s timeout, no retries).
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);

/// The script's shared part: the calls come as JSON in `KEYGATE_SDK_CALLS`, the results go to
/// stdout as one JSON list, one entry per call: `{"ok": true, "model", "text", "id"}` or
/// `{"ok": false, "error": <exception class>, "status", "code", "type", "body"}`, each with
/// `"sent"`: the request body the SDK put on the wire (an httpx request hook). Anything but an
/// HTTP status error (a connection error, a response the SDK cannot parse) ends the script
/// with a traceback, which fails the test.
const PRELUDE: &str = r#"
import json, os, sys
sent = []
def record(request):
    sent.append(request.content.decode("utf-8"))
calls = json.loads(os.environ["KEYGATE_SDK_CALLS"])
base_url = os.environ["KEYGATE_SDK_BASE_URL"]
api_key = os.environ["KEYGATE_SDK_API_KEY"]
results = []
def refused(e):
    return {"ok": False, "error": type(e).__name__, "status": e.status_code,
            "code": getattr(e, "code", None), "type": getattr(e, "type", None),
            "body": e.body, "sent": sent[-1] if sent else None}
"#;

const OPENAI: &str = r#"
import openai
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20.0,
                       http_client=openai.DefaultHttpxClient(event_hooks={"request": [record]}))
for call in calls:
    sent.clear()
    try:
        messages = [{"role": "user", "content": call.get("prompt", "Say hello.")}]
        if call.get("stream"):
            extra = {"stream_options": {"include_usage": True}} if call.get("include_usage") else {}
            text, model, usage = "", None, None
            for chunk in client.chat.completions.create(model=call["model"], messages=messages,
                                                        stream=True, **extra):
                model = chunk.model
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if chunk.usage:
                    usage = chunk.usage.model_dump()
            results.append({"ok": True, "model": model, "text": text, "usage": usage,
                            "sent": sent[-1]})
        else:
            r = client.chat.completions.create(model=call["model"], messages=messages)
            results.append({"ok": True, "model": r.model, "text": r.choices[0].message.content,
                            "id": r.id, "usage": r.usage.model_dump() if r.usage else None,
                            "sent": sent[-1]})
    except openai.APIStatusError as e:
        results.append(refused(e))
print(json.dumps(results))
"#;

const ANTHROPIC: &str = r#"
import anthropic
client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=20.0,
                             http_client=anthropic.DefaultHttpxClient(event_hooks={"request": [record]}))
for call in calls:
    sent.clear()
    try:
        messages = [{"role": "user", "content": call.get("prompt", "Say hello.")}]
        if call.get("stream"):
            with client.messages.stream(model=call["model"], max_tokens=64,
                                        messages=messages) as stream:
                text = "".join(stream.text_stream)
                r = stream.get_final_message()
            results.append({"ok": True, "model": r.model, "text": text, "id": r.id,
                            "usage": r.usage.model_dump(), "sent": sent[-1]})
        else:
            r = client.messages.create(model=call["model"], max_tokens=64, messages=messages)
            results.append({"ok": True, "model": r.model, "text": r.content[0].text, "id": r.id,
                            "usage": r.usage.model_dump(), "sent": sent[-1]})
    except anthropic.APIStatusError as e:
        results.append(refused(e))
print(json.dumps(results))
"#;

/// Which SDK.
#[derive(Clone, Copy, Debug)]
pub enum Sdk {
    /// `openai.OpenAI(...).chat.completions.create(model=…)`.
    OpenAi,
    /// `anthropic.Anthropic(...).messages.create(model=…)` (the key goes in `x-api-key`).
    Anthropic,
}

/// One SDK call's result, as the script reported it.
#[derive(Clone, Debug)]
pub struct SdkResult(pub serde_json::Value);

impl SdkResult {
    pub fn ok(&self) -> bool {
        self.0["ok"] == true
    }
    /// The request body the SDK sent.
    pub fn sent(&self) -> &str {
        self.0["sent"]
            .as_str()
            .unwrap_or_else(|| panic!("the SDK sent no body: {}", self.0))
    }
}

/// Runs `models` as one call each through `sdk`, with `base_url` (on Envoy's listener) and the
/// consumer key `api_key`; one result per model, in order.
pub async fn sdk_calls(
    sdk: Sdk,
    listener: SocketAddr,
    base_path: &str,
    api_key: &str,
    models: &[&str],
) -> Vec<SdkResult> {
    let calls: Vec<SdkCall> = models.iter().map(|m| SdkCall::plain(m)).collect();
    sdk_run(sdk, listener, base_path, api_key, &calls).await
}

/// One SDK call: a model, and whether it streams (OpenAI: with `stream_options.include_usage`
/// when `include_usage`; Anthropic: `messages.stream`).
#[derive(Clone, Debug)]
pub struct SdkCall {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt: String,
}

impl SdkCall {
    pub fn plain(model: &str) -> SdkCall {
        SdkCall {
            model: model.into(),
            stream: false,
            include_usage: false,
            prompt: "Say hello.".into(),
        }
    }

    pub fn streaming(model: &str, include_usage: bool) -> SdkCall {
        SdkCall {
            stream: true,
            include_usage,
            ..SdkCall::plain(model)
        }
    }

    pub fn with_prompt(mut self, prompt: &str) -> SdkCall {
        self.prompt = prompt.into();
        self
    }
}

/// Runs `calls` through `sdk`, as [`sdk_calls`] does; one result per call, in order.
pub async fn sdk_run(
    sdk: Sdk,
    listener: SocketAddr,
    base_path: &str,
    api_key: &str,
    calls: &[SdkCall],
) -> Vec<SdkResult> {
    let script = format!(
        "{PRELUDE}{}",
        match sdk {
            Sdk::OpenAi => OPENAI,
            Sdk::Anthropic => ANTHROPIC,
        }
    );
    let calls: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| {
            serde_json::json!({
                "model": c.model, "stream": c.stream, "include_usage": c.include_usage,
                "prompt": c.prompt,
            })
        })
        .collect();
    let base_url = format!("http://{listener}{base_path}");
    let out = run_python(
        &script,
        &[
            ("KEYGATE_SDK_CALLS", serde_json::to_string(&calls).unwrap()),
            ("KEYGATE_SDK_BASE_URL", base_url),
            ("KEYGATE_SDK_API_KEY", api_key.to_string()),
        ],
    )
    .await;
    let results: Vec<serde_json::Value> = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("the {sdk:?} script printed no JSON list ({e}): {out}"));
    assert_eq!(results.len(), calls.len(), "{sdk:?}: one result per call");
    results.into_iter().map(SdkResult).collect()
}

/// Runs `script` with the venv's python (`KEYGATE_TEST_PYTHON`), `env` on top of the test's
/// environment without proxy settings (the SDKs would route 127.0.0.1 through one) or the SDKs'
/// own variables. Returns stdout; panics with stderr if it fails or runs over its limit.
pub async fn run_python(script: &str, env: &[(&str, String)]) -> String {
    let python = test_tool("python3", "KEYGATE_TEST_PYTHON");
    let mut cmd = Command::new(&python);
    cmd.arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "running {} (./scripts/test installs the venv): {e}",
            python.display()
        )
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let pid = child.id();
    let waited = tokio::time::timeout(
        SCRIPT_LIMIT,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let out = match waited {
        Ok(joined) => joined.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("the python script ran over {SCRIPT_LIMIT:?}:\n{script}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the python script failed ({}):\n{}\nstdout:\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
