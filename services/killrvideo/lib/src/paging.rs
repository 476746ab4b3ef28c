//! Paging (spec §2.3): `page_size` must be positive; `paging_state` is an opaque, URL-safe token ("" = first
//! page on input, no more pages on output). Tokens carry a service-defined cursor (the sort key of the last row
//! returned), so a page continues strictly after it; they are signed for their *scope* (the list and whose it
//! is, e.g. `comments.by_video:<id>`) with the platform's token key ([`keel_common::tokens`]), so a changed,
//! forged or foreign token is INVALID_ARGUMENT, never a wrong page.

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

/// Encodes a cursor as a paging state of `scope`.
pub fn encode<T: Serialize>(scope: &str, cursor: &T) -> String {
    keel_common::tokens::seal(scope, cursor)
}

/// Decodes a paging state of `scope`: `None` for "" (first page).
///
/// # Errors
/// INVALID_ARGUMENT when the token was not made by [`encode`] for this scope and cursor type.
pub fn decode<T: DeserializeOwned>(
    scope: &str,
    paging_state: &str,
) -> Result<Option<T>, ServiceError> {
    if paging_state.is_empty() {
        return Ok(None);
    }
    keel_common::tokens::open(scope, paging_state)
        .map(Some)
        .ok_or_else(|| {
            ServiceError::invalid(
                "paging_state",
                "not a paging state returned by this service for this list",
            )
        })
}

/// Takes up to `size` rows of `rows` (fetched with `LIMIT size + 1`) and the token of the next page: non-empty
/// exactly when more rows exist.
pub fn page<R, C: Serialize>(
    mut rows: Vec<R>,
    size: usize,
    scope: &str,
    cursor: impl Fn(&R) -> C,
) -> (Vec<R>, String) {
    if rows.len() > size {
        rows.truncate(size);
        let token = rows
            .last()
            .map(|r| encode(scope, &cursor(r)))
            .unwrap_or_default();
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
        let t = encode("s", &(1_700_000_000_000i64, "abc".to_owned()));
        assert!(
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(
            decode::<(i64, String)>("s", &t).unwrap(),
            Some((1_700_000_000_000, "abc".into()))
        );
        assert_eq!(decode::<(i64, String)>("s", "").unwrap(), None);
        let status: tonic::Status = decode::<(i64, String)>("s", "%%%").unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(decode::<(i64, String)>("another list", &t).is_err());
    }

    #[test]
    fn page_has_a_token_only_when_more_rows_exist() {
        let (rows, token) = page(vec![1, 2, 3], 2, "s", |r| *r);
        assert_eq!(
            (rows, decode::<i32>("s", &token).unwrap()),
            (vec![1, 2], Some(2))
        );
        let (rows, token) = page(vec![1, 2], 2, "s", |r| *r);
        assert_eq!((rows, token), (vec![1, 2], String::new()));
        assert!(page_size(0, "x").is_err());
        assert_eq!(page_size(5000, "x").unwrap(), MAX_PAGE_SIZE);
    }
}
