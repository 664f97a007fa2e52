//! OAuth login through the service (protocol.md §6c; DESIGN.md → *Every kind of Feishu app*):
//! a login service hands over the authorization code Feishu gave its callback, or a refresh
//! token, and gets the user's tokens and identity back — without ever holding the app secret.
//!
//! One exchange is two calls: the v2 token endpoint (client credentials in the body), then
//! `user_info` with the new user access token, for the identity and the `tenant_key` (what a
//! store app needs next, to get that tenant's token). A store app logs in only once its app
//! token can be had — the first ticket has arrived — else `503 ticket_missing` ([`super::issuer`]
//! says why); a custom app at once.
//!
//! What a caller gets back when it goes wrong: Feishu refusing the code or the refresh token
//! (single-use, so also a second use) → `400 login_failed` with Feishu's code and message in
//! `error.upstream`; no answer in time → `504 upstream_timeout`; anything else Feishu or the
//! network did → `502 upstream_error`.
//!
//! **User tokens and codes are never stored, cached or logged**: they pass through as
//! [`Secret`]s (redacted in `Debug`), nothing here writes to the store or the token cache, the
//! log line of a login names the app, the grant and the tenant only, and metrics see only the
//! endpoint and Feishu's code.

use serde::Serialize;

use crate::error::{Error, ErrorKind};
use crate::secret::Secret;

use super::upstream::{UpstreamError, UserInfo, UserTokens};
use super::Broker;

pub use super::upstream::Grant;

/// A signed-in user, in DESIGN.md's shape: who, in which tenant, and their tokens.
#[derive(Debug, Clone, Serialize)]
pub struct UserLogin {
    pub app_id: String,
    pub tenant_key: String,
    pub open_id: String,
    pub union_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The user access token.
    pub access_token: Secret,
    /// Seconds left.
    pub expire: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// Only when the user granted `offline_access`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// Seconds the refresh token lives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_expire: Option<u64>,
}

impl Grant {
    /// `authorization_code` or `refresh_token`: for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Grant::Code { .. } => "authorization_code",
            Grant::Refresh(_) => "refresh_token",
        }
    }
}

impl Broker {
    /// Exchange `grant` for `app_id`'s user: the user's tokens, identity and tenant. Nothing is
    /// kept (module docs).
    pub async fn login(&self, app_id: &str, grant: Grant) -> Result<UserLogin, Error> {
        let issuer = self.issuer(app_id)?;
        issuer.before_login(self).await?;
        let creds = issuer.creds();
        let upstream = &self.0.upstream;
        // One deadline for both calls (`tokens.request_deadline`).
        let deadline = upstream.deadline();
        let tokens = upstream
            .user_tokens(&creds.base_url, app_id, &creds.secret, &grant, deadline)
            .await
            .map_err(|e| refused(e, &grant))?;
        let issued_at_ms = self.now();
        let info = upstream
            .user_info(&creds.base_url, &tokens.access_token, deadline)
            .await
            .map_err(Error::from)?;
        tracing::info!(
            app_id,
            grant = grant.kind(),
            tenant_key = %info.tenant_key,
            refresh_token = tokens.refresh_token.is_some(),
            "user tokens issued"
        );
        Ok(user_login(app_id, tokens, info, issued_at_ms))
    }
}

/// Feishu's refusal of the code or refresh token is the caller's problem (`login_failed`, with
/// Feishu's code and message); anything else is an upstream failure.
fn refused(e: UpstreamError, grant: &Grant) -> Error {
    match e {
        UpstreamError::Api { code, msg, .. } => {
            let what = match grant {
                Grant::Code { .. } => {
                    "the Open Platform refused the authorization code (a code is valid once, for 5 \
                     minutes, and only with the redirect_uri and code_verifier it was issued for)"
                }
                Grant::Refresh(_) => {
                    "the Open Platform refused the refresh token (each is valid once: use the one \
                     the last exchange returned)"
                }
            };
            Error::new(ErrorKind::LoginFailed, what).with_upstream(code, msg)
        }
        other => Error::from(other),
    }
}

fn user_login(app_id: &str, tokens: UserTokens, info: UserInfo, now_ms: u64) -> UserLogin {
    let expires_at_ms = now_ms.saturating_add(tokens.expire_s.saturating_mul(1000));
    UserLogin {
        app_id: app_id.to_string(),
        tenant_key: info.tenant_key,
        open_id: info.open_id,
        union_id: info.union_id,
        user_id: info.user_id.filter(|u| !u.is_empty()),
        name: info.name.filter(|n| !n.is_empty()),
        access_token: tokens.access_token,
        expire: tokens.expire_s,
        expires_at: expires_at_ms / 1000,
        refresh_token: tokens.refresh_token,
        refresh_expire: tokens.refresh_expire_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant::Code {
            code: Secret::new("oc-secret-code"),
            redirect_uri: None,
            code_verifier: None,
        }
    }

    #[test]
    fn a_refusal_is_login_failed_with_feishus_answer() {
        let e = refused(
            UpstreamError::Api {
                code: 20003,
                msg: "invalid code".into(),
                status: 400,
            },
            &grant(),
        );
        assert_eq!(e.kind(), ErrorKind::LoginFailed);
        assert_eq!(e.upstream(), Some((20003, "invalid code")));
        assert_eq!(
            refused(UpstreamError::Timeout("no answer".into()), &grant()).kind(),
            ErrorKind::UpstreamTimeout
        );
        let e = refused(
            UpstreamError::Server {
                code: -1,
                msg: "down".into(),
                status: 503,
            },
            &Grant::Refresh(Secret::new("ur-x")),
        );
        assert_eq!(e.kind(), ErrorKind::UpstreamError);
    }

    #[test]
    fn the_answer_has_designs_shape_and_debug_hides_the_tokens() {
        let login = user_login(
            "cli_a",
            UserTokens {
                access_token: Secret::new("u-secret-access"),
                expire_s: 7200,
                refresh_token: Some(Secret::new("ur-secret-refresh")),
                refresh_expire_s: Some(604_800),
            },
            UserInfo {
                open_id: "ou_1".into(),
                union_id: "on_1".into(),
                user_id: Some(String::new()),
                name: Some("Ada".into()),
                tenant_key: "t1".into(),
            },
            1_800_000_000_500,
        );
        let json = serde_json::to_value(&login).unwrap();
        assert_eq!(json["access_token"], "u-secret-access");
        assert_eq!(json["refresh_token"], "ur-secret-refresh");
        assert_eq!(json["expire"], 7200);
        assert_eq!(json["expires_at"], 1_800_007_200);
        assert_eq!(json["refresh_expire"], 604_800);
        assert_eq!(json["tenant_key"], "t1");
        assert!(
            json.get("user_id").is_none(),
            "an empty user_id is left out"
        );
        let debug = format!("{login:?}");
        assert!(
            !debug.contains("u-secret") && !debug.contains("ur-secret"),
            "{debug}"
        );
    }
}
