//! Field rules of SPEC §1: names, descriptions, key values, header names, value templates,
//! IP allowlists, and how a secret is masked for display.

use std::net::IpAddr;

use ipnet::IpNet;

/// One broken rule: which field, and what the rule is. Becomes a `BadRequest` field violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &str, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.to_string(),
            description: description.into(),
        }
    }
}

pub const NAME_MAX_CHARS: usize = 60;
pub const DESCRIPTION_MAX_CHARS: usize = 200;
pub const KEY_VALUE_MIN: usize = 16;
pub const KEY_VALUE_MAX: usize = 1024;

fn is_separator(c: char) -> bool {
    c == '-' || c == '_'
}

/// Names: 1–60 characters of letters (any script), ASCII digits, `-` and `_`; not starting with
/// a digit or a separator, not ending with a separator; no invisible or format characters (a
/// Hangul filler is a letter, yet shows nothing). Callers pass the NFC form (`text::nfc`).
pub fn name(field: &str, value: &str) -> Result<(), FieldViolation> {
    let count = value.chars().count();
    if count == 0 {
        return Err(FieldViolation::new(
            field,
            "is required (1 to 60 characters)",
        ));
    }
    if count > NAME_MAX_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {NAME_MAX_CHARS} characters (got {count})"),
        ));
    }
    if let Some(bad) = value.chars().find(|&c| super::text::is_invisible(c)) {
        return Err(FieldViolation::new(
            field,
            format!(
                "must not contain invisible or format characters (found U+{:04X})",
                bad as u32
            ),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|&c| !(c.is_alphabetic() || c.is_ascii_digit() || is_separator(c)))
    {
        return Err(FieldViolation::new(
            field,
            format!(
                "may contain only letters, ASCII digits, '-' and '_' (found {:?})",
                bad
            ),
        ));
    }
    let first = value.chars().next().unwrap_or('a');
    if first.is_ascii_digit() || is_separator(first) {
        return Err(FieldViolation::new(
            field,
            "must not start with a digit, '-' or '_'",
        ));
    }
    if value.chars().last().is_some_and(is_separator) {
        return Err(FieldViolation::new(field, "must not end with '-' or '_'"));
    }
    Ok(())
}

/// Descriptions: optional, at most 200 characters.
pub fn description(field: &str, value: &str) -> Result<(), FieldViolation> {
    let count = value.chars().count();
    if count > DESCRIPTION_MAX_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {DESCRIPTION_MAX_CHARS} characters (got {count})"),
        ));
    }
    Ok(())
}

/// Key values (both kinds): 16 to 1024 characters of visible ASCII (0x21–0x7E).
/// The message never echoes the value.
pub fn key_value(field: &str, value: &str) -> Result<(), FieldViolation> {
    let len = value.len();
    if !(KEY_VALUE_MIN..=KEY_VALUE_MAX).contains(&len) {
        return Err(FieldViolation::new(
            field,
            format!(
                "must be {KEY_VALUE_MIN} to {KEY_VALUE_MAX} characters of visible ASCII (got {} characters)",
                value.chars().count()
            ),
        ));
    }
    if let Some(pos) = value.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(FieldViolation::new(
            field,
            format!(
                "must be visible ASCII (0x21-0x7E) only: the character at position {} is not",
                value[..pos].chars().count() + 1
            ),
        ));
    }
    Ok(())
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// An HTTP token character (lower case only: header names are compared lower-cased).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A model service's auth header: a lower-case HTTP token, never `host`, a pseudo-header,
/// `content-length` or a hop-by-hop header.
pub fn auth_header(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if value.starts_with(':') {
        return Err(FieldViolation::new(
            field,
            "must not be a ':' pseudo-header",
        ));
    }
    if !value.bytes().all(is_tchar) {
        return Err(FieldViolation::new(
            field,
            "must be a lower-case HTTP header name (token characters, no upper case)",
        ));
    }
    if value == "host" || value == "content-length" || HOP_BY_HOP.contains(&value) {
        return Err(FieldViolation::new(
            field,
            format!(
                "must not be {value:?} (host, content-length and hop-by-hop headers are refused)"
            ),
        ));
    }
    Ok(())
}

/// A value template: visible ASCII and spaces, with `{key}` exactly once.
pub fn auth_value_template(field: &str, value: &str) -> Result<(), FieldViolation> {
    if !value
        .bytes()
        .all(|b| b == b' ' || (0x21..=0x7e).contains(&b))
    {
        return Err(FieldViolation::new(
            field,
            "must be visible ASCII and spaces only",
        ));
    }
    let n = value.matches("{key}").count();
    if n != 1 {
        return Err(FieldViolation::new(
            field,
            format!("must contain {{key}} exactly once (found {n})"),
        ));
    }
    Ok(())
}

/// An IPv4-mapped IPv6 network (`::ffff:a.b.c.d/96+n`) as the IPv4 network it denotes, so
/// entries and peers match whichever form a dual-stack listener reports.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(n.trunc());
    }
    net.trunc()
}

/// One allowlist entry: an IPv4/IPv6 address or CIDR. Returns its canonical form.
pub fn ip_entry(field: &str, value: &str) -> Result<IpNet, FieldViolation> {
    let v = value.trim();
    if let Ok(net) = v.parse::<IpNet>() {
        return Ok(canonical_net(net));
    }
    if let Ok(addr) = v.parse::<IpAddr>() {
        return Ok(canonical_net(IpNet::from(addr)));
    }
    Err(FieldViolation::new(
        field,
        format!("{value:?} is not an IPv4/IPv6 address or CIDR"),
    ))
}

/// Render an allowlist entry: plain address for single hosts, CIDR otherwise.
pub fn ip_entry_display(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// Whether `addr` falls inside any entry (IPv4-mapped IPv6 addresses match IPv4 entries).
pub fn ip_allowed(allowlist: &[IpNet], addr: IpAddr) -> bool {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    };
    allowlist.iter().any(|net| net.contains(&addr))
}

/// Masked display of a secret: first 5 + `***` + last 4; values under 20 characters show `***`.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 20 {
        return "***".to_string();
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_follow_the_rules() {
        for ok in [
            "a",
            "billing-app",
            "openai_prod",
            "计费应用",
            "app-中文_2",
            "Zürich",
            "a1",
        ] {
            assert!(name("name", ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "1app",
            "-app",
            "_app",
            "app-",
            "app_",
            "has space",
            "a.b",
            "a/b",
            "٣x",
        ] {
            assert!(name("name", bad).is_err(), "{bad:?} should be invalid");
        }
        assert!(name("name", &"a".repeat(60)).is_ok());
        let err = name("name", &"a".repeat(61)).unwrap_err();
        assert_eq!(err.field, "name");
        assert!(err.description.contains("60"));
    }

    #[test]
    fn masks_long_and_short_values() {
        assert_eq!(mask("sk-abcdefghijklmnopqrstuvwxyz"), "sk-ab***wxyz");
        assert_eq!(mask("0123456789012345678"), "***");
        assert_eq!(mask("01234567890123456789"), "01234***6789");
    }

    #[test]
    fn key_values_are_visible_ascii_of_bounded_length() {
        assert!(key_value("value", "sk-0123456789abcdef").is_ok());
        assert!(key_value("value", "short").is_err());
        assert!(key_value("value", &"x".repeat(1025)).is_err());
        let err = key_value("value", "sk-0123456789 abcdef").unwrap_err();
        assert!(!err.description.contains("sk-0123"), "never echo the value");
    }

    #[test]
    fn header_and_template_rules() {
        assert!(auth_header("auth_header", "authorization").is_ok());
        assert!(auth_header("auth_header", "x-api-key").is_ok());
        for bad in [
            "Authorization",
            "host",
            ":authority",
            "content-length",
            "connection",
            "te",
            "x y",
            "",
        ] {
            assert!(auth_header("auth_header", bad).is_err(), "{bad:?}");
        }
        assert!(auth_value_template("t", "Bearer {key}").is_ok());
        assert!(auth_value_template("t", "{key}").is_ok());
        assert!(auth_value_template("t", "Bearer").is_err());
        assert!(auth_value_template("t", "{key}{key}").is_err());
        assert!(auth_value_template("t", "Bearer\t{key}").is_err());
    }

    #[test]
    fn ip_entries_and_matching() {
        let list: Vec<IpNet> = ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]
            .iter()
            .map(|v| ip_entry("ip_allowlist", v).unwrap())
            .collect();
        assert!(ip_allowed(&list, "10.1.2.3".parse().unwrap()));
        assert!(ip_allowed(&list, "192.168.1.7".parse().unwrap()));
        assert!(!ip_allowed(&list, "192.168.1.8".parse().unwrap()));
        assert!(ip_allowed(&list, "2001:db8::1".parse().unwrap()));
        assert!(ip_allowed(&list, "::ffff:10.9.9.9".parse().unwrap()));
        assert!(ip_entry("ip_allowlist", "10.0.0.0/33").is_err());
        assert!(ip_entry("ip_allowlist", "nope").is_err());
        assert_eq!(ip_entry_display(&list[1]), "192.168.1.7");
        assert_eq!(
            ip_entry_display(&ip_entry("f", "10.1.2.3/8").unwrap()),
            "10.0.0.0/8"
        );
    }

    fn name_char() -> impl Strategy<Value = char> {
        prop_oneof![
            proptest::char::range('a', 'z'),
            proptest::char::range('A', 'Z'),
            proptest::char::range('0', '9'),
            Just('-'),
            Just('_'),
            proptest::char::range('\u{4e00}', '\u{9fa5}'),
            Just('\u{3164}'),
            Just('\u{200D}'),
            any::<char>(),
        ]
    }

    /// The rules restated independently, to check the validator against.
    fn oracle(s: &str) -> bool {
        let cs: Vec<char> = s.chars().collect();
        !cs.is_empty()
            && cs.len() <= 60
            && cs.iter().all(|c| {
                (c.is_alphabetic() || c.is_ascii_digit() || *c == '-' || *c == '_')
                    && !super::super::text::is_invisible(*c)
            })
            && !(cs[0].is_ascii_digit() || cs[0] == '-' || cs[0] == '_')
            && !(cs[cs.len() - 1] == '-' || cs[cs.len() - 1] == '_')
    }

    proptest! {
        #[test]
        fn name_validation_matches_the_rules(s in proptest::collection::vec(name_char(), 0..70)) {
            let s: String = s.into_iter().collect();
            prop_assert_eq!(name("name", &s).is_ok(), oracle(&s));
        }

        #[test]
        fn valid_names_round_trip(first in proptest::char::range('a', 'z'),
                                   mid in "[a-zA-Z0-9_\\-\u{4e00}-\u{9fa5}]{0,58}",
                                   last in proptest::char::range('a', 'z')) {
            let s = format!("{first}{mid}{last}");
            prop_assume!(s.chars().count() <= 60);
            prop_assert!(name("name", &s).is_ok());
        }

        #[test]
        fn mask_never_reveals_more_than_nine_chars(v in "[!-~]{0,200}") {
            let m = mask(&v);
            if v.len() < 20 {
                prop_assert_eq!(m, "***");
            } else {
                prop_assert_eq!(m.len(), 12);
                prop_assert!(m.starts_with(&v[..5]));
                prop_assert!(m.ends_with(&v[v.len() - 4..]));
            }
        }

        #[test]
        fn ip_entries_contain_their_own_address(a in any::<[u8; 4]>(), p in 0u8..=32) {
            let s = format!("{}.{}.{}.{}/{}", a[0], a[1], a[2], a[3], p);
            let net = ip_entry("ip_allowlist", &s).unwrap();
            prop_assert!(ip_allowed(&[net], IpAddr::from(a)));
        }
    }
}
