//! Unicode hygiene for names: NFC normalisation (so two spellings of one name are one name)
//! and the code points a name must not contain because nobody can see them — default-ignorable
//! code points (zero-width characters, Hangul fillers, variation selectors, bidi controls) and
//! format characters (general category Cf). Depends on nothing else in keygate.

use std::borrow::Cow;

use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// `Default_Ignorable_Code_Point` (Unicode DerivedCoreProperties), as inclusive ranges.
const DEFAULT_IGNORABLE: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
];

/// Whether `c` is invisible: default-ignorable or a format character.
pub fn is_invisible(c: char) -> bool {
    let cp = c as u32;
    DEFAULT_IGNORABLE
        .iter()
        .any(|&(lo, hi)| (lo..=hi).contains(&cp))
        || c.general_category() == GeneralCategory::Format
}

/// `s` in Unicode Normalization Form C (borrowed when it already is).
pub fn nfc(s: &str) -> Cow<'_, str> {
    match is_nfc_quick(s.chars()) {
        IsNormalized::Yes => Cow::Borrowed(s),
        _ => Cow::Owned(s.nfc().collect()),
    }
}

/// An owned name in NFC (no copy when it already is).
pub fn nfc_owned(s: String) -> String {
    match nfc(&s) {
        Cow::Borrowed(_) => s,
        Cow::Owned(n) => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn invisible_characters_are_recognised() {
        for c in [
            '\u{3164}',
            '\u{115F}',
            '\u{1160}',
            '\u{FFA0}', // Hangul fillers (letters!)
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{2060}',
            '\u{FEFF}', // zero-width
            '\u{202E}',
            '\u{2066}',
            '\u{061C}', // bidi controls
            '\u{FE0F}',
            '\u{E0100}',
            '\u{00AD}',
            '\u{0600}',
            '\u{110BD}', // selectors, Cf
        ] {
            assert!(is_invisible(c), "U+{:04X} should be invisible", c as u32);
        }
        for c in ['a', 'Z', '中', '한', 'ß', '-', '_', '7', 'é'] {
            assert!(!is_invisible(c), "{c:?} is visible");
        }
    }

    #[test]
    fn nfc_joins_two_spellings_of_one_name() {
        // Korean: precomposed syllable vs. conjoining jamo.
        assert_eq!(nfc("\u{1112}\u{1161}\u{11AB}"), "\u{D55C}");
        assert!(matches!(nfc("billing-app"), Cow::Borrowed(_)));
        assert_eq!(nfc_owned("e\u{0301}".into()), "\u{e9}");
    }

    proptest! {
        /// Normalising is idempotent and never changes an already-NFC name.
        #[test]
        fn nfc_is_idempotent(s in "\\PC{0,40}") {
            let once = nfc(&s).into_owned();
            prop_assert_eq!(nfc(&once).into_owned(), once.clone());
        }
    }
}
