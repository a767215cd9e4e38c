//! `--admin-identities FILE` (SPEC §9): with mTLS on the admin listener, a client
//! certificate's subject CN or a subject alternative name maps to an admin identity, so that
//! caller needs no token. The file is a list, one mapping a line:
//!
//! ```text
//! # match              name        role
//! cn:alice.example     alice       OPERATOR
//! san:dashboard.svc    dashboard   VIEWER
//! ```
//!
//! `cn:` matches the subject common name, `san:` a DNS, URI, e-mail or IP subject alternative
//! name (exactly, case-sensitively). Names follow the resource name rules; `bootstrap` is
//! reserved. The first line that matches wins. Depends on `domain`.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::auth::Identity;
use crate::domain::{BOOTSTRAP_NAME, Role, validate};

/// What a line matches on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Match {
    CommonName(String),
    AltName(String),
}

/// The parsed `--admin-identities` file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertIdentities {
    entries: Vec<(Match, Identity)>,
}

impl CertIdentities {
    /// Parses the file's text; an error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<CertIdentities, String> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let entry = parse_line(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            entries.push(entry);
        }
        Ok(CertIdentities { entries })
    }

    /// The identity of the client certificate `der`, if a line maps it.
    pub fn identify(&self, der: &[u8]) -> Option<Identity> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let cns: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
        let sans = alt_names(&cert);
        self.entries
            .iter()
            .find(|(m, _)| match m {
                Match::CommonName(v) => cns.contains(v),
                Match::AltName(v) => sans.contains(v),
            })
            .map(|(_, who)| who.clone())
    }
}

fn parse_line(line: &str) -> Result<(Match, Identity), String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [matcher, name, role] = fields[..] else {
        return Err("expected \"cn:VALUE NAME ROLE\" or \"san:VALUE NAME ROLE\"".into());
    };
    let m = match matcher.split_once(':') {
        Some(("cn", v)) if !v.is_empty() => Match::CommonName(v.to_string()),
        Some(("san", v)) if !v.is_empty() => Match::AltName(v.to_string()),
        _ => return Err(format!("{matcher:?} is not cn:VALUE or san:VALUE")),
    };
    validate::name("name", name).map_err(|v| format!("name {name:?} {}", v.description))?;
    if name == BOOTSTRAP_NAME {
        return Err("the name \"bootstrap\" is reserved for the bootstrap token".into());
    }
    let role = Role::parse(role)
        .ok_or_else(|| format!("role {role:?} is not VIEWER, OPERATOR or ADMIN"))?;
    let who = Identity {
        name: name.to_string(),
        role,
    };
    Ok((m, who))
}

/// The certificate's DNS, URI, e-mail and IP subject alternative names, as text.
fn alt_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(v) | GeneralName::URI(v) | GeneralName::RFC822Name(v) => {
                Some((*v).to_string())
            }
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_names_the_bad_one() {
        let ok = CertIdentities::parse(
            "# comment\n\ncn:alice.example alice OPERATOR\nsan:dash.svc dashboard viewer # ro\n",
        )
        .unwrap();
        assert_eq!(ok.entries.len(), 2);
        assert_eq!(ok.entries[1].1.role, Role::Viewer);
        for (text, needle) in [
            ("cn:a alice", "line 1"),
            ("ou:a alice VIEWER", "not cn:VALUE"),
            ("cn:a 1bad VIEWER", "name"),
            ("cn:a bootstrap ADMIN", "reserved"),
            ("cn:a alice VIEWER\nsan:b bob ROOT", "line 2: role"),
        ] {
            let e = CertIdentities::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
