//! What one KillrVideo request may carry. Past a limit the call is INVALID_ARGUMENT with a `BadRequest`
//! violation naming the field; nothing is written. The spec sets none of these: they are generous (the real
//! data sets stay far below them) and bound the memory, storage and hashing work one call can cause.

use keel_common::ServiceError;
pub use keel_common::limits::{bytes, chars};

/// A video's name, in characters.
pub const VIDEO_NAME_CHARS: usize = 512;
/// A video's description, in characters.
pub const DESCRIPTION_CHARS: usize = 10_000;
/// A YouTube video id or URL, in characters.
pub const LOCATION_CHARS: usize = 2_048;
/// Tags per video.
pub const TAGS: usize = 64;
/// One tag, in characters.
pub const TAG_CHARS: usize = 128;
/// A comment, in characters.
pub const COMMENT_CHARS: usize = 10_000;
/// A user's first or last name, in characters.
pub const PERSON_NAME_CHARS: usize = 256;
/// An email address, in characters (RFC 5321 allows 254; some systems 320).
pub const EMAIL_CHARS: usize = 320;
/// A password, in bytes: bounds the work of one argon2 hash.
pub const PASSWORD_BYTES: usize = 1_024;

/// Tags: at most [`TAGS`], each at most [`TAG_CHARS`] characters (the violation names `tags[i]`).
///
/// # Errors
/// As above.
pub fn tags(tags: &[String]) -> Result<(), ServiceError> {
    if tags.len() > TAGS {
        return Err(ServiceError::invalid(
            "tags",
            format!("{} tags: at most {TAGS}", tags.len()),
        ));
    }
    for (i, t) in tags.iter().enumerate() {
        chars(&format!("tags[{i}]"), t, TAG_CHARS)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_the_field_and_not_the_value() {
        assert!(chars("name", &"é".repeat(VIDEO_NAME_CHARS), VIDEO_NAME_CHARS).is_ok());
        let err = chars("name", &"é".repeat(VIDEO_NAME_CHARS + 1), VIDEO_NAME_CHARS).unwrap_err();
        assert!(
            matches!(&err, ServiceError::InvalidArgument { field, description }
            if field == "name" && description == "513 characters: at most 512")
        );
        assert!(bytes("password", &"é".repeat(PASSWORD_BYTES / 2), PASSWORD_BYTES).is_ok());
        assert!(
            bytes(
                "password",
                &"é".repeat(PASSWORD_BYTES / 2 + 1),
                PASSWORD_BYTES
            )
            .is_err()
        );
        let many: Vec<String> = (0..=TAGS).map(|i| i.to_string()).collect();
        assert!(tags(&many).is_err());
        let long = vec!["ok".to_owned(), "x".repeat(TAG_CHARS + 1)];
        assert!(
            matches!(tags(&long), Err(ServiceError::InvalidArgument { field, .. }) if field == "tags[1]")
        );
    }
}
