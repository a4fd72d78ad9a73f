//! JSON request bodies that the API documents as objects.
//!
//! serde reads a struct from a JSON array as well (its fields by position),
//! so `["a comment"]` would read as `{"comment": "a comment"}`. Every body
//! the API takes is an object: anything else is refused here.

use serde::de::{DeserializeOwned, IgnoredAny};

use super::error::ApiError;

/// Reads a JSON object body into `T`.
///
/// Errors: `invalid_json` (400) for bytes that are not JSON;
/// `invalid_request` (422) for JSON that is an array, or an object that does
/// not fit `T` (unknown or missing field, wrong type).
pub fn from_json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let starts_array = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    if starts_array {
        // Well-formed JSON in the wrong shape is a 422; broken JSON a 400.
        return Err(match serde_json::from_slice::<IgnoredAny>(bytes) {
            Ok(_) => {
                ApiError::InvalidRequest("the body must be a JSON object, not an array".into())
            }
            Err(e) => ApiError::InvalidJson(e.to_string()),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() {
            ApiError::InvalidRequest(e.to_string())
        } else {
            ApiError::InvalidJson(e.to_string())
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[allow(dead_code)]
        comment: Option<String>,
    }

    #[test]
    fn arrays_are_refused_and_objects_read() {
        assert!(from_json_object::<Body>(br#"{"comment":"x"}"#).is_ok());
        assert!(matches!(
            from_json_object::<Body>(br#" ["x"]"#).unwrap_err(),
            ApiError::InvalidRequest(_)
        ));
        assert!(matches!(
            from_json_object::<Body>(b"[").unwrap_err(),
            ApiError::InvalidJson(_)
        ));
        assert!(matches!(
            from_json_object::<Body>(b"{").unwrap_err(),
            ApiError::InvalidJson(_)
        ));
        assert!(matches!(
            from_json_object::<Body>(br#"{"other":1}"#).unwrap_err(),
            ApiError::InvalidRequest(_)
        ));
    }
}
