//! Extractors whose rejections are the API's own JSON errors: axum's `Path`
//! answers a segment that is not UTF-8 with a plain-text 400, which breaks the
//! contract that every error is JSON with a stable `code`.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A path parameter; a segment that cannot be decoded answers
/// `400 invalid_parameter` (the name of the segment, never its bytes).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|_| {
                ApiError::InvalidParameter(
                    "a path segment is not valid percent-encoded UTF-8".to_string(),
                )
            })
    }
}
