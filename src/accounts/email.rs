//! Email addresses are normalised wherever they come in (sign-up, login, invitations): Unicode
//! NFKC, then lowercase ([`normalize_email`]). Look-alike spellings — the Kelvin sign `\u{212A}`
//! for `K`, fullwidth letters — are then the same address, so one of them cannot sign up beside
//! the other, log in as it, or receive its invitations; the stored address is the normalised one
//! and the unique index on `lower(email)` refuses a second account for it.

use super::AccountsError;

/// The one spelling of an email address: trimmed, Unicode NFKC, lowercase (NFKC again, as
/// lowercasing can leave a compatibility character behind).
pub fn normalize_email(raw: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded = raw.trim().nfkc().collect::<String>().to_lowercase();
    folded.nfkc().collect::<String>().trim().to_string()
}

/// The longest email address accepted anywhere (RFC 5321's path limit), in bytes.
pub const MAX_EMAIL_BYTES: usize = 254;

/// Refuses an email field longer than [`MAX_EMAIL_BYTES`] (surrounding blanks aside) before it
/// is normalised, looked up or counted anywhere.
pub fn check_email_length(raw: &str) -> Result<(), AccountsError> {
    if raw.trim().len() > MAX_EMAIL_BYTES {
        return Err(AccountsError::EmailTooLong(raw.trim().len()));
    }
    Ok(())
}

pub(super) fn validate_email(email: &str) -> Result<(), AccountsError> {
    let ok = email.len() <= 254
        && !email
            .chars()
            .any(|c| c.is_whitespace() || crate::text::is_deceptive(c))
        && matches!(email.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.') && !d.contains('@'));
    if ok {
        Ok(())
    } else {
        Err(AccountsError::InvalidEmail(email.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_for_shape() {
        assert!(validate_email("a@b.co").is_ok());
        for bad in [
            "", "a", "a@b", "@b.co", "a b@c.de", "a@.b", "a@b.", "a@b@c.d",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn look_alike_addresses_normalise_to_one() {
        for spelling in [
            "kate@example.com",
            "\u{212A}ate@example.com",
            " KATE@Example.COM ",
            "\u{FF4B}\u{FF41}\u{FF54}\u{FF45}@example.com",
        ] {
            assert_eq!(
                normalize_email(spelling),
                "kate@example.com",
                "{spelling:?}"
            );
        }
        assert_ne!(normalize_email("katie@example.com"), "kate@example.com");
    }
}
