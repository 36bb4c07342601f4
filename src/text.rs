//! What user-chosen names may not hold: characters that change how the text around them is
//! shown without being seen themselves. A display name ending in U+202E (RIGHT-TO-LEFT
//! OVERRIDE) reverses the email shown after it in a member list; `invoice\u{202E}fdp.exe` reads
//! "invoiceexe.pdf"; a zero-width space makes two names look the same.
//!
//! Refused: C0/C1 controls, the bidirectional embeddings, overrides, isolates and marks
//! (U+061C, U+200E–U+200F, U+202A–U+202E, U+2066–U+2069), and the invisible separators and
//! joiners that no script needs (U+200B zero-width space, U+2060–U+2064, U+FEFF, U+180E).
//! U+200C and U+200D (zero-width non-joiner and joiner) stay allowed: Persian and Indic names
//! and emoji sequences need them.

/// Whether `c` is a control or an invisible formatting character a name may not hold.
pub fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// Whether `s` holds such a character.
pub fn has_deceptive(s: &str) -> bool {
    s.chars().any(is_deceptive)
}

/// The words an error names them with.
pub const DECEPTIVE_CHARACTERS: &str =
    "control, text-direction (such as U+202E) or invisible (such as U+200B) characters";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_and_invisible_characters_are_refused_and_scripts_keep_their_joiners() {
        for bad in [
            "Alice \u{202E}",
            "a\u{200B}b",
            "\u{2066}x\u{2069}",
            "x\u{200F}",
            "\u{FEFF}name",
            "tab\there",
            "nul\0",
        ] {
            assert!(has_deceptive(bad), "{bad:?}");
        }
        for good in [
            "Ada Lovelace",
            "می\u{200C}خواهم",
            "👨\u{200D}👩\u{200D}👧",
            "Zoë Ñandú",
            "名前",
        ] {
            assert!(!has_deceptive(good), "{good:?}");
        }
    }
}
