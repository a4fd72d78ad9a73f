//! Query strings and keyset pages shared by the list endpoints (`/runs`,
//! `/runs/{id}/events`, `/audit`): strict parameter parsing, opaque cursors
//! (`base64url("{tag}:{last key}")`), and the fetch-one-more page rule.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::http::error::ApiError;

/// Parses a query string, refusing parameters not in `allowed` and any
/// given more than once (`400 invalid_parameter`).
pub fn parse_query(
    raw: Option<String>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode(s)
                .ok_or_else(|| ApiError::InvalidParameter("query string is not valid UTF-8".into()))
        };
        let (k, v) = (decode(k)?, decode(v)?);
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::InvalidParameter(format!(
                "unknown query parameter `{}`; expected {}",
                k.chars().take(64).collect::<String>(),
                allowed.join(", ")
            )));
        }
        if out.contains_key(&k) {
            // Which one was meant? (A billing period given twice must not
            // silently become the last one.)
            return Err(ApiError::InvalidParameter(format!(
                "query parameter `{k}` is given more than once"
            )));
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The `limit` parameter: `default` when absent, 1 to `max` otherwise.
pub fn parse_limit(
    query: &HashMap<String, String>,
    (default, max): (i64, i64),
) -> Result<i64, ApiError> {
    match query.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::InvalidParameter(format!(
                "limit: expected a whole number from 1 to {max}"
            ))),
        },
    }
}

/// An opaque cursor for the key `last`; `tag` tells one list's cursors from another's.
pub fn encode_cursor(tag: &str, last: impl Display) -> String {
    URL_SAFE_NO_PAD.encode(format!("{tag}:{last}"))
}

/// The key inside a cursor made by [`encode_cursor`] with the same `tag`.
pub fn decode_cursor<T: FromStr>(tag: &str, cursor: &str) -> Result<T, ApiError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| ApiError::InvalidCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| ApiError::InvalidCursor)?;
    text.strip_prefix(tag)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|key| key.parse().ok())
        .ok_or(ApiError::InvalidCursor)
}

/// Lists are fetched with `limit + 1` rows: when the extra row came back, it
/// is dropped and the cursor of the last kept row is the next page's.
pub fn next_page<T>(
    items: &mut Vec<T>,
    limit: i64,
    cursor_of: impl Fn(&T) -> String,
) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(0);
    if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor_of)
    } else {
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded_and_unknown_keys_refused() {
        let q = parse_query(
            Some("status=queued&cursor=a%3Db".into()),
            &["status", "cursor"],
        )
        .unwrap();
        assert_eq!(q["cursor"], "a=b");
        assert!(parse_query(Some("stauts=queued".into()), &["status"]).is_err());
        assert!(parse_query(Some("status=%ZZ".into()), &["status"]).is_err());
    }

    #[test]
    fn cursors_carry_their_tag_and_key() {
        assert_eq!(
            decode_cursor::<i64>("a1", &encode_cursor("a1", 42)).unwrap(),
            42
        );
        assert!(decode_cursor::<i64>("a1", &encode_cursor("v1", 42)).is_err());
        assert!(decode_cursor::<i64>("a1", &URL_SAFE_NO_PAD.encode("a1x:42")).is_err());
        assert!(decode_cursor::<i64>("a1", &encode_cursor("a1", "nope")).is_err());
    }

    #[test]
    fn a_page_ends_with_a_cursor_only_when_more_rows_came_back() {
        let mut full = vec![1, 2, 3];
        assert_eq!(
            next_page(&mut full, 2, |n| n.to_string()).as_deref(),
            Some("2")
        );
        assert_eq!(full, [1, 2]);
        let mut last = vec![1, 2];
        assert_eq!(next_page(&mut last, 2, |n| n.to_string()), None);
        assert_eq!(last, [1, 2]);
    }
}
