//! Object names, validated once at the edge so every layer below can trust them.

use crate::error::CoreError;

/// ScaleIO limits names to 31 characters; we keep that so names fit in tables and paths.
pub const MAX_NAME_LEN: usize = 31;

/// A valid name is 1..=31 characters of `[A-Za-z0-9_.-]`, starting with a letter or digit.
/// That keeps names safe as file names, NBD export names and URI path segments.
pub fn validate_name(name: &str) -> Result<(), CoreError> {
    let bad = |reason: &str| CoreError::InvalidName { name: name.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("longer than {MAX_NAME_LEN} characters")));
    }
    let first = name.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(bad(&format!("character {c:?} not allowed (use letters, digits, '_', '.', '-')")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for n in ["vol1", "a", "pd-1.b_c", "0abc"] {
            validate_name(n).unwrap();
        }
    }

    #[test]
    fn rejects_bad_names() {
        for n in ["", "-x", ".x", "a b", "a/b", "ä", &"x".repeat(32), "a;rm"] {
            assert!(validate_name(n).is_err(), "{n:?} accepted");
        }
    }
}
