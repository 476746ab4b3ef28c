//! Who may call what. Two kinds of caller:
//! - an **operator** (or a trusted service such as the cache): `authorization: Bearer <accounts.admin_token>`,
//!   or, when the server requires client certificates (`tls.require_client_cert`), any client whose certificate
//!   the server verified against `tls.ca_file`;
//! - a **tenant**: `authorization: Bearer <its account token>`.
//!
//! CreateAccount, UpdateAccount and ListAccounts are the operator's; ReserveKeys and ReleaseKeys the operator's
//! or the account's own tenant's; GetByToken needs no more than the token it resolves. No credential (or one
//! nobody issued) is UNAUTHENTICATED; a tenant acting on another account, or on an operator's call, is
//! PERMISSION_DENIED. Both carry `ErrorInfo` (reason `UNAUTHENTICATED` / `PERMISSION_DENIED`, domain `keel`).

use keel_common::{ServiceError, config::Secret, context::bearer_token};
use subtle::ConstantTimeEq;
use tonic::Request;

use crate::Accounts;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The operator, or a trusted service.
    Operator,
    /// The tenant of this account id.
    Tenant(String),
}

impl Caller {
    /// PERMISSION_DENIED unless the operator.
    ///
    /// # Errors
    /// As above.
    pub fn operator(&self, what: &str) -> Result<(), ServiceError> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Tenant(_) => Err(ServiceError::PermissionDenied(format!(
                "{what} needs an operator credential (accounts.admin_token or a client certificate)"
            ))),
        }
    }

    /// PERMISSION_DENIED unless the operator or the tenant of `account_id`.
    ///
    /// # Errors
    /// As above.
    pub fn operator_or_owner(&self, account_id: &str, what: &str) -> Result<(), ServiceError> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Tenant(id) if id == account_id => Ok(()),
            Caller::Tenant(_) => Err(ServiceError::PermissionDenied(format!(
                "{what} of another account needs an operator credential"
            ))),
        }
    }
}

/// Whether `token` is the configured operator token (constant time; never, when none is configured).
fn is_admin(admin: &Secret, token: &str) -> bool {
    !admin.is_empty() && bool::from(admin.expose().as_bytes().ct_eq(token.as_bytes()))
}

impl Accounts {
    /// Who sent `request`.
    ///
    /// # Errors
    /// UNAUTHENTICATED without a credential or with one nobody issued; database failures.
    pub(crate) async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ServiceError> {
        if self.trust_client_certs && request.peer_certs().is_some_and(|c| !c.is_empty()) {
            return Ok(Caller::Operator);
        }
        let missing = || {
            ServiceError::Unauthenticated(
                "a credential is required: authorization: Bearer <account or operator token>"
                    .into(),
            )
        };
        let token = bearer_token(request.metadata()).ok_or_else(missing)?;
        if is_admin(&self.admin_token, token) {
            return Ok(Caller::Operator);
        }
        match self.account_of(token).await? {
            Some(account) => Ok(Caller::Tenant(account.id)),
            None => Err(ServiceError::Unauthenticated("unknown token".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_matches_only_when_configured() {
        assert!(!is_admin(&Secret::default(), ""));
        assert!(!is_admin(&Secret::default(), "x"));
        assert!(is_admin(&Secret::new("s3cret"), "s3cret"));
        assert!(!is_admin(&Secret::new("s3cret"), "s3cre"));
        let t = Caller::Tenant("a".into());
        assert!(t.operator("ListAccounts").is_err());
        assert!(t.operator_or_owner("a", "ReserveKeys").is_ok());
        assert!(matches!(
            t.operator_or_owner("b", "ReserveKeys"),
            Err(ServiceError::PermissionDenied(_))
        ));
        assert!(Caller::Operator.operator("ListAccounts").is_ok());
    }
}
