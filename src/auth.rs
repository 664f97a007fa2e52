//! Bearer keys for the token API.
//!
//! The config holds only the SHA-256 of each client's key; a request's key is hashed and compared
//! against every client's hash in constant time (all of them, no early exit), so neither the key
//! nor which client matched leaks through timing. Missing or unknown key: `401` with
//! `WWW-Authenticate: Bearer`; a known key without the scope or the app: `403`.
//!
//! A [`Clients`] is immutable; a config reload (SIGHUP) builds a new one and the service swaps
//! it in whole (`AppState::clients`), so a request sees either the old clients or the new ones.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::{ClientConfig, Scope};
use crate::error::{Error, ErrorKind};

/// The configured clients.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Shared, so an authenticated request holds its client without copying it, and keeps it
    /// even if a reload swaps the clients meanwhile.
    clients: Vec<Arc<ClientConfig>>,
}

impl Clients {
    pub fn new(clients: &[ClientConfig]) -> Clients {
        Clients {
            clients: clients.iter().cloned().map(Arc::new).collect(),
        }
    }

    /// How many clients are configured.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The client whose key is in this `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<ClientConfig>, Error> {
        let key = authorization
            .and_then(|h| {
                let (scheme, key) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Error::new(ErrorKind::Unauthorized, "send Authorization: Bearer <key>")
            })?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = u32::MAX;
        for (i, client) in self.clients.iter().enumerate() {
            let matches = client.key_sha256.0.ct_eq(&digest);
            found = u32::conditional_select(&found, &(i as u32), matches);
        }
        self.clients
            .get(found as usize)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::Unauthorized, "unknown bearer key"))
    }
}

/// May `client` use `scope` on `app_id`?
pub fn authorize(client: &ClientConfig, scope: Scope, app_id: Option<&str>) -> Result<(), Error> {
    if !client.scopes.contains(&scope) {
        return Err(Error::new(
            ErrorKind::Forbidden,
            format!("this key lacks the {scope:?} scope").to_lowercase(),
        ));
    }
    if let Some(app_id) = app_id {
        if !client.apps.iter().any(|a| a == "*" || a == app_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "this key may not use this app",
            ));
        }
    }
    Ok(())
}

/// Hex SHA-256 of a bearer key: what goes into `key_sha256`.
pub fn key_sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn clients() -> Clients {
        let text = format!(
            "[[apps]]\napp_id = \"cli_a\"\napp_secret = \"s\"\nverification_token = \"t\"\n\
             [[clients]]\nname = \"orders\"\nkey_sha256 = \"{}\"\napps = [\"cli_a\"]\nscopes = [\"tokens\"]\n\
             [[clients]]\nname = \"ops\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\", \"admin\"]\n",
            key_sha256_hex("orders-key"),
            key_sha256_hex("ops-key")
        );
        Clients::new(&Config::parse(&text, &|_| None).unwrap().clients)
    }

    #[test]
    fn keys_authenticate_their_client() {
        let c = clients();
        assert_eq!(
            c.authenticate(Some("Bearer orders-key")).unwrap().name,
            "orders"
        );
        assert_eq!(c.authenticate(Some("bearer ops-key")).unwrap().name, "ops");
        for bad in [
            None,
            Some(""),
            Some("Bearer "),
            Some("Basic orders-key"),
            Some("Bearer nope"),
        ] {
            assert_eq!(
                c.authenticate(bad).unwrap_err().kind(),
                ErrorKind::Unauthorized,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn scopes_and_apps_are_enforced() {
        let c = clients();
        let orders = c.authenticate(Some("Bearer orders-key")).unwrap();
        assert!(authorize(&orders, Scope::Tokens, Some("cli_a")).is_ok());
        assert_eq!(
            authorize(&orders, Scope::Tokens, Some("cli_b"))
                .unwrap_err()
                .kind(),
            ErrorKind::Forbidden
        );
        assert_eq!(
            authorize(&orders, Scope::Status, None).unwrap_err().kind(),
            ErrorKind::Forbidden
        );
        let ops = c.authenticate(Some("Bearer ops-key")).unwrap();
        assert!(authorize(&ops, Scope::Admin, Some("anything")).is_ok());
    }
}
