//! What user-chosen names may not hold: characters that change how the text around them is
//! shown without being seen themselves. A display name ending in U+202E (RIGHT-TO-LEFT
//! OVERRIDE) reverses the email shown after it in a member list; `invoice\u{202E}fdp.exe` reads
//! "invoiceexe.pdf"; a zero-width space makes two names look the same.
//!
//! Refused: controls (Cc), every Default_Ignorable_Code_Point of Unicode (characters a renderer
//! shows as nothing: U+00AD soft hyphen, U+034F, U+061C, U+115F–U+1160 and U+3164 Hangul
//! fillers, U+17B4–U+17B5, U+180B–U+180F, U+200B–U+200F, U+202A–U+202E bidirectional
//! embeddings and overrides, U+2060–U+206F, U+FEFF, U+FFA0, U+FFF0–U+FFF8, U+1BCA0–U+1BCA3,
//! U+1D173–U+1D17A, U+E0000–U+E0FFF tags and variation selectors) and the other format
//! characters (Cf: U+0600–U+0605, U+06DD, U+070F, U+08E2, U+110BD, U+110CD, U+13430–U+1343F,
//! U+FFF9–U+FFFB), with three exceptions that scripts and emoji need: U+200C and U+200D
//! (zero-width non-joiner and joiner: Persian and Indic names, emoji sequences) and U+FE0E–U+FE0F
//! (text and emoji presentation: "❤️").

/// Whether `c` is a control or an invisible formatting character a name may not hold.
pub fn is_deceptive(c: char) -> bool {
    if matches!(c, '\u{200C}' | '\u{200D}' | '\u{FE0E}' | '\u{FE0F}') {
        return false;
    }
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{08E2}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0D}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
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
            "al\u{AD}ice",
            "\u{3164}",
            "alice\u{E0020}",
            "x\u{034F}y",
        ] {
            assert!(has_deceptive(bad), "{bad:?}");
        }
        for good in [
            "Ada Lovelace",
            "می\u{200C}خواهم",
            "👨\u{200D}👩\u{200D}👧",
            "Zoë Ñandú",
            "I \u{2764}\u{FE0F} SQL",
            "名前",
        ] {
            assert!(!has_deceptive(good), "{good:?}");
        }
    }
}
