//! `Secret`: a secret string (a key value, a token) as the domain carries it: zeroised on
//! drop, redacted in `Debug` and `Display`. Depends on nothing else in keygate.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret string: zeroised on drop, redacted in `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The plaintext. Call sites are the only places a secret leaves this type.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
