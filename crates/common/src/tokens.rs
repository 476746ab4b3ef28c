//! Opaque, tamper-proof tokens handed to clients and taken back (paging states): base64url of the JSON value
//! and the first 16 bytes of its HMAC-SHA256 under the deployment's key (`tokens.key`), bound to a *scope*
//! (which list, for whom). A token that was changed, forged without the key, or made for another scope (another
//! list, another user's list, another service) does not open: the caller answers INVALID_ARGUMENT instead of
//! serving a wrong page.
//!
//! Every instance of a service must share `tokens.key` (a client pages across instances). Unset, a built-in
//! key is used: tokens still cannot be mixed up between scopes, but anyone who reads this source could forge
//! one; set it in production.

use std::sync::{OnceLock, RwLock};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{KeyInit, Mac};
use serde::{Serialize, de::DeserializeOwned};
use sha2::Sha256;

use crate::config::{Reader, Secret};

/// Bytes of the MAC kept in a token.
const MAC_BYTES: usize = 16;
/// The key when `tokens.key` is unset.
const BUILT_IN_KEY: &str = "keel built-in token key: set tokens.key in production";

/// The `tokens` section.
#[derive(Clone, Debug, Default)]
pub struct TokenSettings {
    /// The key tokens are signed with (`tokens.key`, `KEEL_TOKENS__KEY`); unset: a built-in one.
    pub key: Secret,
}

impl TokenSettings {
    /// Reads the `tokens` section.
    pub fn read(r: &mut Reader) -> Self {
        Self {
            key: r.secret("tokens.key"),
        }
    }
}

fn key() -> &'static RwLock<Vec<u8>> {
    static KEY: OnceLock<RwLock<Vec<u8>>> = OnceLock::new();
    KEY.get_or_init(|| RwLock::new(BUILT_IN_KEY.as_bytes().to_vec()))
}

/// Makes `settings.key` the process's token key (the platform does this at start).
pub fn install(settings: &TokenSettings) {
    let new = if settings.key.is_empty() {
        BUILT_IN_KEY.as_bytes().to_vec()
    } else {
        settings.key.expose().as_bytes().to_vec()
    };
    *key().write().expect("token key") = new;
}

/// The HMAC of `body` under the process's key, for `scope`.
fn mac(scope: &str, body: &[u8]) -> hmac::Hmac<Sha256> {
    let key = key().read().expect("token key");
    let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC takes any key");
    m.update(scope.as_bytes());
    m.update(&[0]);
    m.update(body);
    m
}

/// A token carrying `value` for `scope`.
pub fn seal<T: Serialize>(scope: &str, value: &T) -> String {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    let tag = mac(scope, &bytes).finalize().into_bytes();
    bytes.extend_from_slice(&tag[..MAC_BYTES]);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The value of a token made by [`seal`] for `scope`; `None` for anything else (changed, forged, another
/// scope's, not a token at all).
pub fn open<T: DeserializeOwned>(scope: &str, token: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(token.trim()).ok()?;
    let split = bytes.len().checked_sub(MAC_BYTES)?;
    let (body, tag) = bytes.split_at(split);
    // Constant time (the MAC crate's comparison): a forger learns nothing from how long it took.
    let same = mac(scope, body).verify_truncated_left(tag).is_ok();
    same.then(|| serde_json::from_slice(body).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_only_unchanged_and_in_their_own_scope() {
        let t = seal("comments.by_video:v1", &(1_700_000_000_000i64, "abc"));
        assert!(
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(
            open::<(i64, String)>("comments.by_video:v1", &t),
            Some((1_700_000_000_000, "abc".to_owned()))
        );
        assert_eq!(open::<(i64, String)>("comments.by_video:v2", &t), None);
        assert_eq!(open::<(i64, String)>("comments.by_user:v1", &t), None);
        let mut bytes = URL_SAFE_NO_PAD.decode(&t).unwrap();
        bytes[3] ^= 1;
        assert_eq!(
            open::<(i64, String)>("comments.by_video:v1", &URL_SAFE_NO_PAD.encode(&bytes)),
            None
        );
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&(0i64, "zzz")).unwrap());
        assert_eq!(open::<(i64, String)>("comments.by_video:v1", &forged), None);
        assert_eq!(open::<usize>("x", ""), None);
        assert_eq!(open::<usize>("x", "!!!"), None);
    }
}
