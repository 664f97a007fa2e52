//! One error type for everything a request can run into, and the one mapping from an error to an
//! HTTP status and a stable, public error code.
//!
//! An [`Error`] has a public part (its [`ErrorKind`] and a message meant for the caller) and a
//! private part (the underlying cause, which goes to the log exactly once, in `routes`). 4xx bodies
//! carry the code and a helpful message; 5xx bodies carry the code and a generic message, because
//! the cause of a server-side failure is ours to read, not the caller's.
//!
//! The codes are part of the public contract (DESIGN.md): clients and alerts match on them, so a
//! kind's `code()` never changes once released.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// What went wrong, as far as the caller needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request body is not the JSON object Feishu sends.
    MalformedBody,
    /// The `encrypt` field could not be decrypted to a JSON object. Every decryption failure
    /// (base64, length, padding, UTF-8, JSON) is this one kind with one message: no padding oracle.
    BadPayload,
    /// A plaintext body reached an app that has an Encrypt Key: Feishu encrypts everything then.
    EncryptionRequired,
    /// An encrypted body reached an app (or a bare `/events` with apps) without an Encrypt Key.
    EncryptKeyNotConfigured,
    /// The `X-Lark-Signature` headers are missing or do not match the raw body.
    BadSignature,
    /// The Verification Token is missing or wrong.
    BadToken,
    /// Authentic, but too old (or a signature timestamp too far ahead): outside `events.max_age`
    /// / `events.max_skew`, or a signature timestamp that is not unix seconds. A replay.
    StaleRequest,
    /// The routed `app_id` is not configured, or no configured app matches the request.
    UnknownApp,
    /// The app is configured, but not to receive events: a custom app without a
    /// `verification_token`.
    EventsNotConfigured,
    /// Consumer API: no `[[consumers]]` entry has this name.
    UnknownConsumer,
    /// The event names an app other than the one it was routed to.
    AppMismatch,
    /// The body is larger than `server.max_body_bytes`.
    PayloadTooLarge,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// No such route.
    NotFound,
    /// The body did not arrive within `server.request_timeout`.
    RequestTimeout,
    /// Token API: missing or unknown bearer key.
    Unauthorized,
    /// Token API: the key lacks the scope or the app.
    Forbidden,
    /// A request to the API was well-formed JSON but semantically wrong.
    BadRequest,
    /// Our own storage failed: Feishu should retry later, nothing acknowledged is lost.
    StoreUnavailable,
    /// No App Ticket yet: a resend was requested; retry shortly.
    TicketMissing,
    /// Feishu answered with an error code.
    UpstreamError,
    /// A store app asked for the tenant-less tenant token: it has one per customer tenant.
    TenantKeyRequired,
    /// Login: Feishu refused the authorization code or refresh token (its code and message are
    /// in the error's `upstream`).
    LoginFailed,
    /// Feishu did not answer in time.
    UpstreamTimeout,
    /// An operator's resend request inside `tickets.resend_interval`: Feishu was asked already.
    /// The answer says when the next may be sent (`Retry-After`).
    ResendRateLimited,
    /// The server-wide budget for request bodies in flight (`server.max_body_bytes_in_flight`)
    /// cannot take this body now: retry after `Retry-After` (never a 5xx: nothing of ours failed).
    Busy,
    /// This client address already holds `server.max_connections_per_peer` connections.
    TooManyConnections,
    /// Hyper refused the request head: larger than `server.max_header_bytes`.
    HeaderTooLarge,
    /// Hyper refused the request line: the URI is too long.
    UriTooLong,
    /// Hyper refused the request: not parseable HTTP/1 (bad method, header, framing).
    MalformedRequest,
    /// A bug or an unexpected failure of ours.
    Internal,
}

impl ErrorKind {
    /// The HTTP status this kind maps to.
    pub fn status(self) -> u16 {
        use ErrorKind::*;
        match self {
            MalformedBody
            | BadPayload
            | EncryptionRequired
            | EncryptKeyNotConfigured
            | AppMismatch
            | BadRequest
            | TenantKeyRequired
            | LoginFailed
            | MalformedRequest => 400,
            BadSignature | BadToken | StaleRequest | Unauthorized => 401,
            Forbidden => 403,
            UnknownApp | EventsNotConfigured | UnknownConsumer | NotFound => 404,
            MethodNotAllowed => 405,
            RequestTimeout => 408,
            PayloadTooLarge => 413,
            UriTooLong => 414,
            Busy | TooManyConnections | ResendRateLimited => 429,
            HeaderTooLarge => 431,
            Internal => 500,
            UpstreamError => 502,
            StoreUnavailable | TicketMissing => 503,
            UpstreamTimeout => 504,
        }
    }

    /// The stable, public error code.
    pub fn code(self) -> &'static str {
        use ErrorKind::*;
        match self {
            MalformedBody => "malformed_body",
            BadPayload => "bad_payload",
            EncryptionRequired => "encryption_required",
            EncryptKeyNotConfigured => "encrypt_key_not_configured",
            BadSignature => "bad_signature",
            BadToken => "bad_token",
            StaleRequest => "stale_request",
            UnknownApp => "unknown_app",
            EventsNotConfigured => "events_not_configured",
            UnknownConsumer => "unknown_consumer",
            AppMismatch => "app_mismatch",
            PayloadTooLarge => "payload_too_large",
            MethodNotAllowed => "method_not_allowed",
            NotFound => "not_found",
            RequestTimeout => "request_timeout",
            Unauthorized => "unauthorized",
            Forbidden => "forbidden",
            BadRequest => "bad_request",
            StoreUnavailable => "store_unavailable",
            TicketMissing => "ticket_missing",
            UpstreamError => "upstream_error",
            TenantKeyRequired => "tenant_key_required",
            LoginFailed => "login_failed",
            UpstreamTimeout => "upstream_timeout",
            ResendRateLimited => "resend_rate_limited",
            Busy => "server_busy",
            TooManyConnections => "too_many_connections",
            HeaderTooLarge => "header_too_large",
            UriTooLong => "uri_too_long",
            MalformedRequest => "malformed_request",
            Internal => "internal",
        }
    }

    /// Server-side failures: the message shown to the caller is generic.
    pub fn is_server_error(self) -> bool {
        self.status() >= 500
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error with a public kind and message and a private cause.
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    cause: Option<Cause>,
    /// Feishu's `code` and `msg`, for `upstream_error`: public, they tell the caller what the
    /// Open Platform said.
    upstream: Option<(i64, String)>,
    /// When the caller may try again (`Retry-After`), where the error knows better than its
    /// kind's default.
    retry_after: Option<Duration>,
}

/// Whole seconds for `Retry-After`: rounded up, at least 1 (`0` would invite a retry that is
/// still too early).
pub fn retry_after_seconds(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            cause: None,
            upstream: None,
            retry_after: None,
        }
    }

    /// Attach Feishu's answer (`code`, `msg`).
    pub fn with_upstream(mut self, code: i64, msg: impl Into<String>) -> Self {
        self.upstream = Some((code, msg.into()));
        self
    }

    /// When the caller may try again: the answer's `Retry-After`.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The `Retry-After` this error asks for, if it knows better than its kind's default.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The public part of this error (kind, message, Feishu's answer, `Retry-After`), without the
    /// private cause: what another caller may be told about the same failure.
    pub fn public_copy(&self) -> Error {
        Error {
            kind: self.kind,
            message: self.message.clone(),
            cause: None,
            upstream: self.upstream.clone(),
            retry_after: self.retry_after,
        }
    }

    /// Feishu's `code` and `msg`, when the Open Platform answered with an error.
    pub fn upstream(&self) -> Option<(i64, &str)> {
        self.upstream.as_ref().map(|(c, m)| (*c, m.as_str()))
    }

    /// Attach the underlying cause: logged by the one place errors become responses, never sent.
    pub fn with_cause(mut self, cause: impl Into<Cause>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message for the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The private cause, for the log.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.cause.as_deref()
    }

    pub fn store(cause: impl Into<Cause>) -> Self {
        Error::new(
            ErrorKind::StoreUnavailable,
            "storage is unavailable; retry later",
        )
        .with_cause(cause)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("cause", &self.cause.as_ref().map(|c| c.to_string()))
            .field("upstream", &self.upstream)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)?;
        if let Some(cause) = &self.cause {
            write!(f, " ({cause})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        let message = match kind {
            ErrorKind::MalformedBody => "the body is not a JSON object",
            ErrorKind::BadPayload => "the encrypt field could not be decrypted to a JSON object",
            ErrorKind::EncryptionRequired => {
                "this app has an Encrypt Key: the body must be {\"encrypt\": ...}"
            }
            ErrorKind::EncryptKeyNotConfigured => {
                "the body is encrypted but no Encrypt Key is configured for this app"
            }
            ErrorKind::BadSignature => {
                "X-Lark-Signature is missing or does not match the body and the Encrypt Key"
            }
            ErrorKind::BadToken => "the Verification Token is missing or does not match",
            ErrorKind::StaleRequest => "the request or event is too old (a replay?)",
            ErrorKind::UnknownApp => "no configured app matches this request",
            ErrorKind::EventsNotConfigured => {
                "this app has no verification_token configured: its events are not received here"
            }
            ErrorKind::UnknownConsumer => "no consumer with this name is configured",
            ErrorKind::AppMismatch => "the event names a different app than the route",
            ErrorKind::PayloadTooLarge => "the body is larger than the configured limit",
            ErrorKind::MethodNotAllowed => "method not allowed on this path",
            ErrorKind::NotFound => "no such route",
            ErrorKind::RequestTimeout => "the request body did not arrive in time",
            ErrorKind::Unauthorized => "a valid bearer key is required",
            ErrorKind::Forbidden => "this key may not do that",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::StoreUnavailable => "storage is unavailable; retry later",
            ErrorKind::TicketMissing => "no app_ticket yet; a resend was requested, retry shortly",
            ErrorKind::UpstreamError => "the Open Platform returned an error",
            ErrorKind::TenantKeyRequired => {
                "a store app has a tenant_access_token per customer tenant: use /v1/apps/{app_id}/tenants/{tenant_key}/tenant_access_token"
            }
            ErrorKind::LoginFailed => "the Open Platform refused the code or refresh token",
            ErrorKind::UpstreamTimeout => "the Open Platform did not answer in time",
            ErrorKind::ResendRateLimited => {
                "a resend was requested within tickets.resend_interval; retry after Retry-After"
            }
            ErrorKind::Busy => "the server is busy reading other request bodies; retry shortly",
            ErrorKind::TooManyConnections => "too many open connections from this address",
            ErrorKind::HeaderTooLarge => "the request head is larger than the configured limit",
            ErrorKind::UriTooLong => "the request URI is too long",
            ErrorKind::MalformedRequest => "the request is not valid HTTP/1.1",
            ErrorKind::Internal => "internal error",
        };
        Error::new(kind, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses_match_the_contract() {
        let table = [
            (ErrorKind::MalformedBody, 400, "malformed_body"),
            (ErrorKind::BadPayload, 400, "bad_payload"),
            (ErrorKind::EncryptionRequired, 400, "encryption_required"),
            (ErrorKind::BadSignature, 401, "bad_signature"),
            (ErrorKind::BadToken, 401, "bad_token"),
            (ErrorKind::StaleRequest, 401, "stale_request"),
            (ErrorKind::UnknownApp, 404, "unknown_app"),
            (ErrorKind::UnknownConsumer, 404, "unknown_consumer"),
            (ErrorKind::AppMismatch, 400, "app_mismatch"),
            (ErrorKind::PayloadTooLarge, 413, "payload_too_large"),
            (ErrorKind::MethodNotAllowed, 405, "method_not_allowed"),
            (ErrorKind::StoreUnavailable, 503, "store_unavailable"),
            (ErrorKind::TicketMissing, 503, "ticket_missing"),
            (ErrorKind::UpstreamError, 502, "upstream_error"),
            (ErrorKind::UpstreamTimeout, 504, "upstream_timeout"),
            (ErrorKind::Busy, 429, "server_busy"),
            (ErrorKind::TooManyConnections, 429, "too_many_connections"),
            (ErrorKind::HeaderTooLarge, 431, "header_too_large"),
            (ErrorKind::UriTooLong, 414, "uri_too_long"),
            (ErrorKind::MalformedRequest, 400, "malformed_request"),
            (ErrorKind::EventsNotConfigured, 404, "events_not_configured"),
            (ErrorKind::TenantKeyRequired, 400, "tenant_key_required"),
            (ErrorKind::LoginFailed, 400, "login_failed"),
            (ErrorKind::ResendRateLimited, 429, "resend_rate_limited"),
        ];
        for (kind, status, code) in table {
            assert_eq!(kind.status(), status, "{kind:?}");
            assert_eq!(kind.code(), code, "{kind:?}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_secs(60)), 60);
        assert_eq!(retry_after_seconds(Duration::from_millis(59_001)), 60);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        let e = Error::from(ErrorKind::ResendRateLimited).with_retry_after(Duration::from_secs(7));
        assert_eq!(e.public_copy().retry_after(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn display_includes_the_cause_but_debug_of_kind_is_stable() {
        let e = Error::from(ErrorKind::StoreUnavailable).with_cause("disk full");
        assert!(e.to_string().contains("disk full"));
        assert_eq!(e.message(), "storage is unavailable; retry later");
    }
}
