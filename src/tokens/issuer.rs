//! The one seam between the kinds of Feishu app: how a token is *issued*.
//!
//! Everything else in the broker — the cache, single-flight, the background refresh and its
//! 30-minute rule, compare-and-invalidate, the error back-off, the fleet's leases and coherent
//! near-caches — is the same for every app, and knows nothing of kinds. What differs between an
//! app-store app and a self-built ("custom") app (DESIGN.md → *Every kind of Feishu app*) is
//! only what this module decides:
//!
//! | | store app ([`Issuer::Store`]) | custom app ([`Issuer::Custom`]) |
//! |---|---|---|
//! | app token | `app_access_token` with the newest App Ticket; on `10012` the ticket is demoted, a resend requested, the call retried once with the pushed ticket | `app_access_token/internal` (app_id + app_secret) |
//! | tenant token | one per `tenant_key`, from the app token; on `99991663` / `99991664` that app token is replaced once | one, the app's own tenant: `tenant_access_token/internal` |
//! | the other path | the tenant-less tenant token: `400 tenant_key_required` | a tenant_key path: `400 bad_request` |
//! | App Ticket | asked for at start-up (none stored), after the store lost its data, by an operator | none: nothing to ask for, `ticket.state = "not_needed"` |
//! | login | once the app token can be had (the first ticket has arrived): else `503 ticket_missing` | at once |
//!
//! Why a store app's login waits for its ticket: what a login service does next is fetch the
//! signed-in user's tenant token, which for a store app needs the app token, so a login that
//! succeeded before the first ticket could not be followed up (and Feishu's older v1 exchange
//! needs the app token itself). Answering `ticket_missing` says exactly when to retry.
//!
//! An issuer never caches, stores or single-flights: the broker calls it inside the flight of the
//! key it fetches, and keeps what it returns.

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use crate::config::{AppConfig, AppKind};
use crate::error::{Error, ErrorKind};
use crate::secret::Secret;
use crate::tickets::ResendOutcome;

use super::upstream::{codes, IssuedToken, Upstream};
use super::{Broker, Token, TokenKey};

/// An app's credentials for the Open Platform.
pub(super) struct AppCreds {
    pub app_id: String,
    pub secret: Secret,
    pub base_url: String,
}

/// How one app's tokens are issued.
pub(super) enum Issuer {
    /// An app-store app: tokens from the App Ticket.
    Store(AppCreds),
    /// A self-built app: tokens from app_id + app_secret alone.
    Custom(AppCreds),
}

/// What the upstream call for a token needs, got before its fetch lease is taken (waiting for
/// a ticket push or for the app token must not hold the lease).
pub(super) enum Prepared {
    /// A store app's app token: the ticket to spend.
    Ticket(Secret),
    /// A store app's tenant token: the app token to ask with.
    AppToken(Arc<Token>),
    /// A custom app's tokens: the app's own credentials are enough.
    Credentials,
}

impl Issuer {
    pub fn new(app: &AppConfig) -> Issuer {
        let creds = AppCreds {
            app_id: app.app_id.clone(),
            secret: app.app_secret.clone(),
            base_url: app.base_url.clone(),
        };
        match app.kind {
            AppKind::Store => Issuer::Store(creds),
            AppKind::Custom => Issuer::Custom(creds),
        }
    }

    pub fn kind(&self) -> AppKind {
        match self {
            Issuer::Store(_) => AppKind::Store,
            Issuer::Custom(_) => AppKind::Custom,
        }
    }

    pub fn creds(&self) -> &AppCreds {
        match self {
            Issuer::Store(c) | Issuer::Custom(c) => c,
        }
    }

    /// Does this kind of app have `key` at all? Checked before any flight starts.
    pub fn check(&self, key: &TokenKey) -> Result<(), Error> {
        match (self, key) {
            (Issuer::Store(_), TokenKey::OwnTenant(_)) => Err(Error::from(
                ErrorKind::TenantKeyRequired,
            )),
            (Issuer::Custom(c), TokenKey::Tenant(..)) => Err(Error::new(
                ErrorKind::BadRequest,
                format!(
                    "{} is a custom app: it has one tenant, its own; use /v1/apps/{}/tenant_access_token",
                    c.app_id, c.app_id
                ),
            )),
            _ => Ok(()),
        }
    }

    /// What the upstream call for `key` needs: a store app's ticket (requesting a resend and
    /// waiting for the push if there is none) or its app token; nothing for a custom app.
    pub async fn prepare(&self, broker: &Broker, key: &TokenKey) -> Result<Prepared, Error> {
        match (self, key) {
            (Issuer::Store(c), TokenKey::App(_)) => Ok(Prepared::Ticket(
                current_ticket(broker, &c.app_id, None).await?,
            )),
            (Issuer::Store(c), TokenKey::Tenant(..)) => {
                let app_key = TokenKey::App(c.app_id.clone());
                let (app_token, _) = Box::pin(broker.get(&app_key)).await?;
                Ok(Prepared::AppToken(app_token))
            }
            (Issuer::Custom(_), TokenKey::App(_) | TokenKey::OwnTenant(_)) => {
                Ok(Prepared::Credentials)
            }
            _ => {
                self.check(key)?;
                Err(mismatch())
            }
        }
    }

    /// Call Feishu for `key` with what [`Issuer::prepare`] got, every call ending by
    /// `deadline`. Failures are handed to [`Broker::upstream_failed`] (the per-key back-off and
    /// the app's failure count).
    pub async fn issue(
        &self,
        broker: &Broker,
        key: &TokenKey,
        prepared: Prepared,
        deadline: Instant,
    ) -> Result<IssuedToken, Error> {
        let up = &broker.0.upstream;
        match (self, key, prepared) {
            (Issuer::Store(c), TokenKey::App(_), Prepared::Ticket(ticket)) => {
                fetch_store_app_token(broker, c, key, ticket, deadline).await
            }
            (Issuer::Store(c), TokenKey::Tenant(_, tenant_key), Prepared::AppToken(app_token)) => {
                fetch_store_tenant_token(broker, c, key, tenant_key, app_token, deadline).await
            }
            (Issuer::Custom(c), TokenKey::App(_), Prepared::Credentials) => up
                .app_access_token_internal(&c.base_url, &c.app_id, &c.secret, deadline)
                .await
                .map_err(|e| broker.upstream_failed(key, e)),
            (Issuer::Custom(c), TokenKey::OwnTenant(_), Prepared::Credentials) => up
                .tenant_access_token_internal(&c.base_url, &c.app_id, &c.secret, deadline)
                .await
                .map_err(|e| broker.upstream_failed(key, e)),
            _ => Err(mismatch()),
        }
    }

    /// The app's ticket generation ([`crate::tickets::Tickets::generation`]): an app-token
    /// failure remembered under an older one is forgotten (a newly stored ticket may be the
    /// cure). `None` for a custom app: no ticket can cure anything.
    pub fn ticket_generation(&self, broker: &Broker) -> Option<u64> {
        match self {
            Issuer::Store(c) => Some(broker.0.tickets.generation(&c.app_id)),
            Issuer::Custom(_) => None,
        }
    }

    /// The resend request to Feishu, to run in the background; `None` for a custom app (it has
    /// no ticket).
    pub fn resend_call(
        &self,
        upstream: &Upstream,
    ) -> Option<impl Future<Output = ResendOutcome> + Send + 'static> {
        let Issuer::Store(c) = self else {
            return None;
        };
        let upstream = upstream.clone();
        let base_url = c.base_url.clone();
        let secret = c.secret.clone();
        let app = c.app_id.clone();
        Some(async move {
            let deadline = upstream.deadline();
            match upstream
                .resend_app_ticket(&base_url, &app, &secret, deadline)
                .await
            {
                Ok(()) => ResendOutcome::Accepted,
                Err(e) => ResendOutcome::Failed {
                    code: e.code(),
                    message: e.to_string(),
                },
            }
        })
    }

    /// At start-up: a store app without a stored ticket asks Feishu to resend one.
    pub async fn start(&self, broker: &Broker) {
        let Issuer::Store(c) = self else {
            return;
        };
        match broker.0.store.ticket(&c.app_id).await {
            Ok(None) => {
                broker.request_resend(&c.app_id).await;
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::warn!(app_id = %c.app_id, error = %e, "cannot read the stored ticket")
            }
        }
    }

    /// The store came back without its data: a store app's ticket is asked for again (once for
    /// the fleet).
    pub async fn after_data_loss(&self, broker: &Broker) {
        if let Some(call) = self.resend_call(&broker.0.upstream) {
            broker
                .0
                .tickets
                .request_resend_after_data_loss(&self.creds().app_id, call)
                .await;
        }
    }

    /// Before a login: a store app needs its app token (so its first ticket) — see the module
    /// docs.
    pub async fn before_login(&self, broker: &Broker) -> Result<(), Error> {
        match self {
            Issuer::Store(c) => broker
                .get(&TokenKey::App(c.app_id.clone()))
                .await
                .map(|_| ()),
            Issuer::Custom(_) => Ok(()),
        }
    }
}

fn mismatch() -> Error {
    Error::new(
        ErrorKind::Internal,
        "a token fetch was prepared for another kind of token",
    )
}

/// The stored ticket other than `rejected`, or: request a resend and wait for the push. A
/// ticket Feishu refused counts as missing.
async fn current_ticket(
    broker: &Broker,
    app_id: &str,
    rejected: Option<&Secret>,
) -> Result<Secret, Error> {
    broker
        .0
        .tickets
        .current(app_id, rejected, || broker.request_resend(app_id))
        .await
}

/// A store app's `app_access_token`; `10012` means the ticket is invalid: demote it, ask for a
/// resend, retry once with the pushed ticket.
async fn fetch_store_app_token(
    broker: &Broker,
    c: &AppCreds,
    key: &TokenKey,
    ticket: Secret,
    deadline: Instant,
) -> Result<IssuedToken, Error> {
    let up = &broker.0.upstream;
    let app_id = c.app_id.as_str();
    let answer = match up
        .app_access_token(&c.base_url, app_id, &c.secret, &ticket, deadline)
        .await
    {
        Err(e) if e.code() == Some(codes::APP_TICKET_INVALID) => {
            tracing::warn!(
                app_id,
                ticket = %ticket.fingerprint(),
                "Feishu rejected the app_ticket (10012); asking for a resend"
            );
            broker.0.tickets.demote(app_id, &ticket).await;
            let fresh = current_ticket(broker, app_id, Some(&ticket)).await?;
            let answer = up
                .app_access_token(&c.base_url, app_id, &c.secret, &fresh, deadline)
                .await;
            if matches!(&answer, Err(e) if e.code() == Some(codes::APP_TICKET_INVALID)) {
                broker.0.tickets.demote(app_id, &fresh).await;
            }
            answer
        }
        other => other,
    };
    answer.map_err(|e| broker.upstream_failed(key, e))
}

/// One tenant's `tenant_access_token` of a store app; Feishu refusing the app token
/// (`99991663` / `99991664`) drops exactly that token and asks once more with a new one.
async fn fetch_store_tenant_token(
    broker: &Broker,
    c: &AppCreds,
    key: &TokenKey,
    tenant_key: &str,
    app_token: Arc<Token>,
    deadline: Instant,
) -> Result<IssuedToken, Error> {
    let up = &broker.0.upstream;
    let app_id = c.app_id.as_str();
    let app_key = TokenKey::App(app_id.to_string());
    let answer = match up
        .tenant_access_token(&c.base_url, &app_token.value, tenant_key, deadline)
        .await
    {
        Err(e)
            if matches!(
                e.code(),
                Some(codes::INVALID_ACCESS_TOKEN | codes::INVALID_APP_TOKEN)
            ) =>
        {
            tracing::warn!(
                app_id,
                code = e.code(),
                "Feishu rejected the app_access_token; fetching a new one"
            );
            let (fresh, _) =
                Box::pin(broker.invalidate(&app_key, app_token.value.expose())).await?;
            up.tenant_access_token(&c.base_url, &fresh.value, tenant_key, deadline)
                .await
        }
        other => other,
    };
    answer.map_err(|e| broker.upstream_failed(key, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn issuer(kind: &str) -> Issuer {
        let text = format!(
            "[[apps]]\napp_id = \"cli_x\"\nkind = \"{kind}\"\napp_secret = \"s\"\nverification_token = \"t\"\n"
        );
        Issuer::new(&Config::parse(&text, &|_| None).unwrap().apps[0])
    }

    #[test]
    fn each_kind_has_its_own_tenant_paths() {
        let store = issuer("store");
        let custom = issuer("custom");
        let app = TokenKey::App("cli_x".into());
        let own = TokenKey::OwnTenant("cli_x".into());
        let tenant = TokenKey::Tenant("cli_x".into(), "t1".into());
        assert_eq!(
            (store.kind(), custom.kind()),
            (AppKind::Store, AppKind::Custom)
        );
        assert!(store.check(&app).is_ok() && custom.check(&app).is_ok());
        assert!(store.check(&tenant).is_ok());
        assert!(custom.check(&own).is_ok());
        assert_eq!(
            store.check(&own).unwrap_err().kind(),
            ErrorKind::TenantKeyRequired
        );
        assert_eq!(
            custom.check(&tenant).unwrap_err().kind(),
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn only_store_apps_ask_for_a_ticket() {
        let bounds = super::super::upstream::Bounds {
            timeout: std::time::Duration::from_secs(1),
            retries: 0,
            request_deadline: std::time::Duration::from_secs(10),
        };
        let upstream = Upstream::new(bounds, crate::metrics::Metrics::new()).unwrap();
        assert!(issuer("store").resend_call(&upstream).is_some());
        assert!(issuer("custom").resend_call(&upstream).is_none());
    }
}
