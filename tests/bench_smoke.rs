//! A short smoke run of the benchmark tools (correctness, not speed): `keygate bench seed`
//! loads keys the load generator can present, `keygate bench load` counts allowed and denied
//! checks against a real `keygate serve` and compares with `keygate bench null`.

mod common;

use std::process::Command;

use common::{Keygate, Options, Proc, keygate_bin};

fn field(out: &str, line_prefix: &str, name: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .unwrap_or_else(|| panic!("no {line_prefix:?} line in:\n{out}"));
    let after = line
        .split(&format!("{name} "))
        .nth(1)
        .unwrap_or_else(|| panic!("{name} in {line}"));
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn load_generator_counts_allowed_and_denied_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kg");
    let seeded = Command::new(keygate_bin())
        .args(["bench", "seed", "--keys", "50", "--data-dir"])
        .arg(&data)
        .env("KEYGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    assert!(String::from_utf8_lossy(&seeded.stdout).contains("seeded 50 consumer keys"));

    let kg = Keygate::start_with(Options {
        data_dir: Some(data),
        ..Default::default()
    })
    .await;
    let mut null = Proc::spawn(
        "null ext_authz",
        &[
            "bench".into(),
            "null".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
        ],
        &[],
    );
    let null_addr = common::poll_until(
        std::time::Duration::from_secs(10),
        "the null server's address",
        || {
            let logs = null.logs();
            async move {
                logs.lines().find_map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).ok()?;
                    v["fields"]["addr"]
                        .as_str()?
                        .parse::<std::net::SocketAddr>()
                        .ok()
                })
            }
        },
    )
    .await;

    let out = Command::new(keygate_bin())
        .args(["bench", "load", "--target"])
        .arg(kg.authz_addr.to_string())
        .args(["--baseline", &null_addr.to_string()])
        .args([
            "--keys",
            "50",
            "--unknown-percent",
            "20",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--in-flight",
            "4",
            "--connections",
            "2",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = field(&text, "round 0 target", "requests");
    let allowed = field(&text, "round 0 target", "allowed");
    let denied = field(&text, "round 0 target", "denied");
    let errors = field(&text, "round 0 target", "errors");
    assert!(requests > 0, "{text}");
    assert_eq!(errors, 0, "{text}");
    assert_eq!(allowed + denied, requests);
    // Every 5th presented key is unknown (20 %): denied; the rest are seeded keys: allowed.
    let share = denied as f64 / requests as f64;
    assert!(
        (0.15..=0.25).contains(&share),
        "denied share {share:.2}: {text}"
    );
    // The null server allows everything.
    assert_eq!(field(&text, "round 0 baseline", "denied"), 0, "{text}");
    assert!(field(&text, "round 0 baseline", "allowed") > 0, "{text}");
    assert!(text.contains("ratio target/baseline"), "{text}");
    null.kill();
}
