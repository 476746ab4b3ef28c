//! The checks of a service's documented input limits: past one, the call is INVALID_ARGUMENT with a
//! `BadRequest` violation naming the field, and the message gives the limit, never the value.

use crate::ServiceError;

/// INVALID_ARGUMENT on `field` when `value` has more than `max` characters.
///
/// # Errors
/// As above; the message gives the limit, not the value.
pub fn chars(field: &str, value: &str, max: usize) -> Result<(), ServiceError> {
    let n = value.chars().count();
    if n > max {
        return Err(ServiceError::invalid(
            field,
            format!("{n} characters: at most {max}"),
        ));
    }
    Ok(())
}

/// INVALID_ARGUMENT on `field` when `value` has more than `max` bytes.
///
/// # Errors
/// As above.
pub fn bytes(field: &str, value: &str, max: usize) -> Result<(), ServiceError> {
    if value.len() > max {
        return Err(ServiceError::invalid(
            field,
            format!("{} bytes: at most {max}", value.len()),
        ));
    }
    Ok(())
}
