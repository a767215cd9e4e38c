//! The reference documentation stays true to the protos and self-contained:
//! `docs/ADMIN-API.md` has a section for every `KeyAdmin` RPC naming every field of its request,
//! and mentions every field of every other admin message; and no file of the repository points
//! at documents outside it. A plain text scan (std only): the admin proto is small and regular.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(rel: &str) -> String {
    let path = Path::new(ROOT).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One `rpc Name(Request) returns (Response);` line.
#[derive(Debug)]
struct Rpc {
    name: String,
    request: String,
}

/// The service's RPCs and every message's field names (oneof members included), in order.
#[derive(Debug, Default)]
struct Proto {
    rpcs: Vec<Rpc>,
    messages: BTreeMap<String, Vec<String>>,
}

#[derive(Debug)]
enum Block {
    Message(String),
    Other,
}

/// Parses the subset of proto3 the admin proto uses: one declaration per line, `//` comments,
/// `message`/`oneof`/`enum`/`service` blocks (a `{}` on one line opens and closes a block).
fn parse_proto(text: &str) -> Proto {
    let mut proto = Proto::default();
    let mut stack: Vec<Block> = Vec::new();
    for raw in text.lines() {
        let line = raw.split("//").next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        match first {
            "message" => {
                let name = line["message".len()..]
                    .trim()
                    .trim_end_matches(['{', '}', ' '])
                    .trim()
                    .to_string();
                proto.messages.entry(name.clone()).or_default();
                stack.push(Block::Message(name));
            }
            "oneof" | "enum" | "service" => stack.push(Block::Other),
            "rpc" => {
                let rest = &line["rpc".len()..];
                let (name, after) = rest.split_once('(').expect("rpc Name(Request)");
                let (request, _) = after.split_once(')').expect("rpc Name(Request)");
                proto.rpcs.push(Rpc {
                    name: name.trim().to_string(),
                    request: request.trim().to_string(),
                });
            }
            // `type name = N;` belongs to the innermost message (a oneof's members included);
            // enum values (`NAME = N;`) have a single word before '='.
            _ if !line.starts_with("option") => {
                let owner = stack.iter().rev().find_map(|b| match b {
                    Block::Message(m) => Some(m),
                    Block::Other => None,
                });
                if let (Some(owner), Some((decl, _))) = (owner, line.split_once('=')) {
                    let words: Vec<&str> = decl.split_whitespace().collect();
                    if let [_, .., name] = words.as_slice() {
                        let field = name.to_string();
                        proto.messages.entry(owner.clone()).or_default().push(field);
                    }
                }
            }
            _ => {}
        }
        // A `}` closes a block (a `message X {}` closes the one it just opened).
        let closes = line.matches('}').count();
        for _ in 0..closes {
            stack.pop();
        }
    }
    proto
}

fn admin_proto() -> Proto {
    parse_proto(&read("proto/keygate/admin/v1/admin.proto"))
}

/// The text of the `###` section whose heading names `rpc` (up to the next `##`/`###` heading).
fn rpc_section<'d>(doc: &'d str, rpc: &str) -> Option<&'d str> {
    let mut start = None;
    let mut offset = 0;
    for line in doc.split_inclusive('\n') {
        let heading = line.trim_end();
        if let Some(s) = start {
            if heading.starts_with("## ") || heading.starts_with("### ") {
                return Some(&doc[s..offset]);
            }
        } else if let Some(title) = heading.strip_prefix("### ")
            && title.trim().trim_matches('`') == rpc
        {
            start = Some(offset);
        }
        offset += line.len();
    }
    start.map(|s| &doc[s..])
}

fn mentions(text: &str, field: &str) -> bool {
    text.contains(&format!("`{field}`"))
}

#[test]
fn the_parser_reads_the_admin_proto() {
    let proto = admin_proto();
    assert!(
        proto.rpcs.len() >= 30,
        "expected every KeyAdmin RPC, got {:?}",
        proto.rpcs
    );
    let create = &proto.messages["CreateConsumerKeyRequest"];
    assert_eq!(
        create,
        &[
            "name",
            "description",
            "generation_method",
            "value",
            "secret_ref",
            "consumer",
            "scope",
            "ip_allowlist",
            "expire_time",
            "limits"
        ]
    );
    assert_eq!(proto.messages["GetConsumerRequest"], ["id", "name"]);
    assert_eq!(
        proto.messages["GetKeyReferencesRequest"],
        ["kind", "id", "name"]
    );
    assert!(proto.messages["GetSnapshotStatusRequest"].is_empty());
    assert!(proto.messages["DeleteResponse"].is_empty());
    for rpc in &proto.rpcs {
        assert!(
            proto.messages.contains_key(&rpc.request),
            "{} takes {}, which the parser did not find",
            rpc.name,
            rpc.request
        );
    }
}

#[test]
fn admin_api_reference_covers_every_rpc_and_request_field() {
    let proto = admin_proto();
    let doc = read("docs/ADMIN-API.md");
    let mut missing = Vec::new();
    for rpc in &proto.rpcs {
        let Some(section) = rpc_section(&doc, &rpc.name) else {
            missing.push(format!("RPC {}: no \"### {}\" section", rpc.name, rpc.name));
            continue;
        };
        for field in &proto.messages[&rpc.request] {
            if !mentions(section, field) {
                missing.push(format!(
                    "RPC {}: request field `{field}` ({}) not in its section",
                    rpc.name, rpc.request
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ADMIN-API.md is behind proto/keygate/admin/v1/admin.proto:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn admin_api_reference_mentions_every_message_field() {
    let proto = admin_proto();
    let doc = read("docs/ADMIN-API.md");
    let mut missing = Vec::new();
    for (message, fields) in &proto.messages {
        if message.ends_with("Request") {
            continue; // covered per RPC section
        }
        if !mentions(&doc, message) {
            missing.push(format!("message `{message}`"));
        }
        for field in fields {
            if !mentions(&doc, field) {
                missing.push(format!("field `{field}` of {message}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ADMIN-API.md does not mention:\n  {}",
        missing.join("\n  ")
    );
}

/// What the repository must not point at: documents that exist only beside a working copy.
fn outside_references() -> [String; 2] {
    let up = "..";
    let dir = "shared";
    [format!("{up}/{dir}"), [dir, "SPEC"].join("/")]
}

/// Every file under `rel` (a file or a directory), skipping build output and VCS metadata.
fn files_under(rel: &str, out: &mut Vec<PathBuf>) {
    let path = Path::new(ROOT).join(rel);
    let mut todo = vec![path];
    while let Some(p) = todo.pop() {
        if p.is_dir() {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "target" || name == ".git" || name == "keygate-data" {
                continue;
            }
            let entries =
                std::fs::read_dir(&p).unwrap_or_else(|e| panic!("listing {}: {e}", p.display()));
            for e in entries {
                todo.push(e.expect("directory entry").path());
            }
        } else if p.is_file() {
            out.push(p);
        }
    }
}

#[test]
fn no_file_points_outside_the_repository() {
    let mut files = Vec::new();
    for rel in [
        "README.md",
        "Cargo.toml",
        "build.rs",
        ".ci",
        "benches",
        "docs",
        "envoy",
        "keygate-envoy",
        "proto",
        "scripts",
        "src",
        "tests",
    ] {
        files_under(rel, &mut files);
    }
    assert!(
        files.iter().any(|f| f.ends_with("README.md")),
        "the scan must see the README"
    );
    let needles = outside_references();
    let mut found = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        let text = String::from_utf8_lossy(&bytes);
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle.as_str())) {
                let rel = f.strip_prefix(ROOT).unwrap_or(f);
                found.push(format!("{}:{}: {}", rel.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "files point at documents outside the repository (a user who clones keygate has none \
         of them; link the docs/ pages instead):\n  {}",
        found.join("\n  ")
    );
}
