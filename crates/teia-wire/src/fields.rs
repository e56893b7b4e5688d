//! Liberal readers for fields sent by real peers ("strict when writing, liberal when
//! reading"), and the validation rules for names and namespaces.

use serde_json::{Map, Value};

/// Longest name or namespace, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// Reads an unsigned integer given as a JSON integer, an integral float, or a string of
/// digits (surrounding whitespace allowed). Anything else is `None`.
pub fn liberal_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
                .map(|f| f as u64)
        }),
        Value::String(s) => {
            let digits = s.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        }
        _ => None,
    }
}

/// Reads a string field; numbers are accepted and rendered as text.
pub fn liberal_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The `type` of a message, upper-cased, when present as a string.
pub fn message_type(object: &Map<String, Value>) -> Option<String> {
    object
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_ascii_uppercase)
}

/// Why a name or namespace is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty string.
    #[error("must not be empty")]
    Empty,
    /// More than [`MAX_NAME_CHARS`] characters.
    #[error("must be at most {MAX_NAME_CHARS} characters")]
    TooLong,
    /// Contains `@`, `#`, `*`, whitespace or a control character.
    #[error("must not contain '@', '#', '*', whitespace or control characters")]
    BadCharacter,
}

/// True for `name@namespace` with both parts valid names.
pub fn is_peer_id(text: &str) -> bool {
    text.split_once('@').is_some_and(|(name, namespace)| {
        validate_name(name).is_ok() && validate_name(namespace).is_ok()
    })
}

/// Checks a name or namespace: 1 to 64 characters, none of `@ # *`, whitespace or controls
/// (they would break `name@namespace`, `#namespace` and `*`).
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(NameError::TooLong);
    }
    if name
        .chars()
        .any(|c| matches!(c, '@' | '#' | '*') || c.is_whitespace() || c.is_control())
    {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_are_read_liberally() {
        assert_eq!(liberal_u64(&json!(7070)), Some(7070));
        assert_eq!(liberal_u64(&json!("7070")), Some(7070));
        assert_eq!(liberal_u64(&json!(" 42 ")), Some(42));
        assert_eq!(liberal_u64(&json!(7070.0)), Some(7070));
        assert_eq!(liberal_u64(&json!(7070.5)), None);
        assert_eq!(liberal_u64(&json!(-1)), None);
        assert_eq!(liberal_u64(&json!("-1")), None);
        assert_eq!(liberal_u64(&json!("12a")), None);
        assert_eq!(liberal_u64(&json!("")), None);
        assert_eq!(liberal_u64(&json!("99999999999999999999999")), None);
        assert_eq!(liberal_u64(&json!(null)), None);
        assert_eq!(liberal_u64(&json!(true)), None);
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(validate_name("alice"), Ok(()));
        assert_eq!(validate_name("São_Paulo-1.x"), Ok(()));
        assert_eq!(validate_name(&"é".repeat(64)), Ok(()));
        assert_eq!(validate_name(&"é".repeat(65)), Err(NameError::TooLong));
        assert_eq!(validate_name(""), Err(NameError::Empty));
        for bad in ["a@b", "#ns", "*", "a b", "a\tb", "a\u{7}b", "a\nb"] {
            assert_eq!(validate_name(bad), Err(NameError::BadCharacter), "{bad:?}");
        }
    }

    #[test]
    fn message_type_is_case_insensitive() {
        let obj = json!({"type":"register"});
        assert_eq!(
            message_type(obj.as_object().unwrap()).as_deref(),
            Some("REGISTER")
        );
        let obj = json!({"type":5});
        assert_eq!(message_type(obj.as_object().unwrap()), None);
    }
}
