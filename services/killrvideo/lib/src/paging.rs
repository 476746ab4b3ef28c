//! Paging (spec §2.3): `page_size` must be positive; `paging_state` is an opaque, URL-safe token ("" = first
//! page on input, no more pages on output). Tokens here are base64url JSON of a service-defined cursor (the
//! sort key of the last row returned), so a page continues strictly after it; a garbage token is
//! INVALID_ARGUMENT.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use keel_common::ServiceError;
use serde::{Serialize, de::DeserializeOwned};

/// Largest page served, whatever the client asks (bounds a response's size).
pub const MAX_PAGE_SIZE: usize = 1000;

/// The page size of a request: `page_size > 0`, capped at [`MAX_PAGE_SIZE`].
///
/// # Errors
/// INVALID_ARGUMENT "page size should be strictly positive for <what>" when `page_size <= 0`.
pub fn page_size(page_size: i32, what: &str) -> Result<usize, ServiceError> {
    if page_size <= 0 {
        return Err(ServiceError::invalid(
            "page_size",
            format!("page size should be strictly positive for {what}"),
        ));
    }
    Ok((page_size as usize).min(MAX_PAGE_SIZE))
}

/// Encodes a cursor as a paging state.
pub fn encode<T: Serialize>(cursor: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(cursor).unwrap_or_default())
}

/// Decodes a paging state: `None` for "" (first page).
///
/// # Errors
/// INVALID_ARGUMENT when the token was not made by [`encode`] for this cursor type.
pub fn decode<T: DeserializeOwned>(paging_state: &str) -> Result<Option<T>, ServiceError> {
    if paging_state.is_empty() {
        return Ok(None);
    }
    URL_SAFE_NO_PAD
        .decode(paging_state.trim())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .map(Some)
        .ok_or_else(|| {
            ServiceError::invalid(
                "paging_state",
                "not a paging state returned by this service",
            )
        })
}

/// Takes up to `size` rows of `rows` (fetched with `LIMIT size + 1`) and the token of the next page: non-empty
/// exactly when more rows exist.
pub fn page<R, C: Serialize>(
    mut rows: Vec<R>,
    size: usize,
    cursor: impl Fn(&R) -> C,
) -> (Vec<R>, String) {
    if rows.len() > size {
        rows.truncate(size);
        let token = rows.last().map(|r| encode(&cursor(r))).unwrap_or_default();
        (rows, token)
    } else {
        (rows, String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_rejected() {
        let t = encode(&(1_700_000_000_000i64, "abc".to_owned()));
        assert!(
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(
            decode::<(i64, String)>(&t).unwrap(),
            Some((1_700_000_000_000, "abc".into()))
        );
        assert_eq!(decode::<(i64, String)>("").unwrap(), None);
        let status: tonic::Status = decode::<(i64, String)>("%%%").unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn page_has_a_token_only_when_more_rows_exist() {
        let (rows, token) = page(vec![1, 2, 3], 2, |r| *r);
        assert_eq!(
            (rows, decode::<i32>(&token).unwrap()),
            (vec![1, 2], Some(2))
        );
        let (rows, token) = page(vec![1, 2], 2, |r| *r);
        assert_eq!((rows, token), (vec![1, 2], String::new()));
        assert!(page_size(0, "x").is_err());
        assert_eq!(page_size(5000, "x").unwrap(), MAX_PAGE_SIZE);
    }
}
