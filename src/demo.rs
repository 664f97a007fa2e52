//! `lark-ticketd demo`: the whole flow on one machine, with nothing to configure.
//!
//! It starts a local fake Open Platform ([`crate::mock_feishu`]) and the service on an embedded
//! store in a temporary directory, with freshly generated credentials. The service finds no
//! ticket and asks the platform to resend one; the platform pushes it to `/events` encrypted and
//! signed, exactly as Feishu does; then an app token and a tenant token are fetched through the
//! token API with a bearer key, and the tenant token is used against the fake platform. Next to
//! the store app runs a self-built ("custom") app: no ticket, its tokens straight from app_id +
//! app_secret, and a user signs in to it through the login API. Last, a small local consumer
//! shows the event hand-off: the platform pushes a chat message event, lark-ticketd queues it
//! and delivers it, signed, and the consumer verifies the signature. Every step is printed in
//! plain words. Without `--once` it keeps serving and prints `curl` commands to try.

use std::time::{Duration, Instant};

use rand::RngCore;

use crate::auth::key_sha256_hex;
use crate::clock::{self, Clock};
use crate::config::Config;
use crate::mock_feishu::{MockFeishu, MockOptions, AUTHORIZE_PATH, TENANT_QUERY_PATH};
use crate::server::{self, Listeners};
use crate::store::Store;
use crate::webhook::{self, WebhookSecret};
use crate::AppState;

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A value of an API answer in running text: a string without its JSON quotes (as the status
/// API's `"resend"` reads `resend` in "arrived via resend").
fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

/// Run the demo. With `once`, exit after the flow; otherwise serve until Ctrl-C.
pub async fn run(once: bool) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("lark-ticketd-demo-{}", random_hex(4)));
    let result = run_in(&dir, once).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, once: bool) -> Result<(), String> {
    let app_id = format!("cli_{}", random_hex(8));
    let custom_app_id = format!("cli_{}", random_hex(8));
    let tenant_key = format!("demo{}", random_hex(6));
    let client_key = format!("demo-key-{}", random_hex(16));
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let service_listener = server::bind(loopback).map_err(|e| format!("cannot listen: {e}"))?;
    let mock_listener = server::bind(loopback).map_err(|e| format!("cannot listen: {e}"))?;
    let service = service_listener.local_addr().map_err(|e| e.to_string())?;
    let mock_addr = mock_listener.local_addr().map_err(|e| e.to_string())?;
    let consumer_listener = server::bind(loopback).map_err(|e| format!("cannot listen: {e}"))?;
    let consumer_addr = consumer_listener.local_addr().map_err(|e| e.to_string())?;
    let consumer_secret = WebhookSecret::random();
    let db = dir.join("lark-ticketd.db");
    let text = format!(
        r#"
listen = "{service}"
[store]
kind = "embedded"
path = {db:?}
[[apps]]
app_id = "{app_id}"
app_secret = "{secret}"
encrypt_key = "{encrypt_key}"
verification_token = "{token}"
base_url = "http://{mock_addr}"
[[apps]]
app_id = "{custom_app_id}"
kind = "custom"
app_secret = "{custom_secret}"
base_url = "http://{mock_addr}"
[[clients]]
name = "demo"
key_sha256 = "{key_hash}"
apps = ["*"]
scopes = ["tokens", "status", "admin", "login"]
[[consumers]]
name = "demo-bot"
url = "http://{consumer_addr}/feishu"
secret = "{consumer_secret}"
events = ["im.message.*"]
"#,
        consumer_secret = consumer_secret.to_config_value().expose(),
        db = db.display().to_string(),
        secret = random_hex(16),
        custom_secret = random_hex(16),
        encrypt_key = random_hex(16),
        token = random_hex(16),
        key_hash = key_sha256_hex(&client_key),
    );
    let config = Config::parse(&text, &|_| None).map_err(|e| format!("demo config: {e}"))?;

    println!("lark-ticketd demo: the whole App Ticket → token flow on this machine.");
    step(1, &format!(
        "A fake Feishu Open Platform (mock-feishu) is serving the auth API (app-store and self-built\n   apps) and OAuth login at http://{mock_addr}."
    ));
    let mut mock_options = MockOptions::from_config(&config, clock::system());
    mock_options.events_url = Some(format!("http://{service}/events/{{app_id}}"));
    let mock = MockFeishu::start(mock_listener, mock_options).map_err(|e| e.to_string())?;

    let store = Store::open(&config.store)
        .await
        .map_err(|e| format!("cannot open the store: {e}"))?;
    let state = AppState::new(config, store, clock::system())
        .map_err(|e| format!("cannot start the service: {}", e.message()))?;
    let mut ticket_signal = state
        .tickets()
        .ticket_watch(&app_id)
        .ok_or("the demo app is missing")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let server_task = tokio::spawn(server::run(
        Listeners {
            main: service_listener,
            ops: None,
            api: None,
        },
        state.clone(),
        async {
            let _ = stop_rx.await;
        },
        server::Hangups::catch(),
    ));
    step(2, &format!(
        "lark-ticketd is serving at http://{service} for app {app_id}, with an embedded store at\n   {}.",
        db.display()
    ));

    step(3, "lark-ticketd has no App Ticket yet, so it asked the Open Platform to resend one\n   (POST /open-apis/auth/v3/app_ticket/resend). Waiting for the push…");
    tokio::time::timeout(Duration::from_secs(10), ticket_signal.changed())
        .await
        .map_err(|_| "no ticket arrived within 10 s".to_string())?
        .map_err(|_| "the service stopped".to_string())?;
    let ticket = state
        .store()
        .ticket(&app_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the ticket was not stored")?;
    println!(
        "   The platform pushed an encrypted, signed app_ticket event to POST /events/{app_id}.\n   lark-ticketd checked the signature over the raw bytes, decrypted it, checked the\n   Verification Token and stored the ticket on disk before answering 200\n   (ticket fingerprint {}, arrived via {}, {} ms after start).",
        ticket.ticket.fingerprint(),
        ticket.source.as_str(),
        started.elapsed().as_millis()
    );

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| e.to_string())?;
    let base = format!("http://{service}");
    let app_path = format!("/v1/apps/{app_id}/app_access_token");
    step(
        4,
        &format!(
        "A downstream service asks for the app_access_token with its bearer key:\n   GET {app_path}"
    ),
    );
    let app_token = get_json(&http, &format!("{base}{app_path}"), &client_key).await?;
    println!("   → {app_token}");

    let tenant_path = format!("/v1/apps/{app_id}/tenants/{tenant_key}/tenant_access_token");
    let app = state.config().apps[0].clone();
    let app_open = crate::push::seal(
        &serde_json::json!({
            "ts": format!("{}.000000", clock::SystemClock.now_ms() / 1000),
            "uuid": crate::push::random_event_id(),
            "token": app.verification_token.as_ref().map(|t| t.expose()),
            "type": "event_callback",
            "event": {"type": "app_open", "app_id": app_id, "tenant_key": tenant_key,
                      "installer": {"open_id": "ou_demo"}},
        })
        .to_string(),
        crate::push::Seal {
            encrypt_key: app.encrypt_key.as_ref(),
            sign: true,
        },
    );
    let (status, _) = crate::push::send(&http, &format!("{base}/events/{app_id}"), &app_open)
        .await
        .map_err(|e| e.to_string())?;
    step(5, &format!(
        "A customer tenant ({tenant_key}) installs the app: the platform pushes an app_open event\n   (HTTP {status}: lark-ticketd recorded the tenant). Its tenant_access_token:\n   GET {tenant_path}"
    ));
    let tenant = get_json(&http, &format!("{base}{tenant_path}"), &client_key).await?;
    println!("   → {tenant}");
    let tenant_token = tenant["tenant_access_token"]
        .as_str()
        .ok_or("no tenant_access_token in the answer")?
        .to_string();

    step(
        6,
        "The tenant token works against the Open Platform (GET /open-apis/tenant/v2/tenant/query):",
    );
    let check = get_json(
        &http,
        &format!("http://{mock_addr}{TENANT_QUERY_PATH}"),
        &tenant_token,
    )
    .await?;
    println!("   → {check}");
    let again = get_json(&http, &format!("{base}{tenant_path}"), &client_key).await?;
    let now_s = clock::SystemClock.now_ms() / 1000;
    println!(
        "   Asking again is served from the cache: same token, {} s left (expires at unix {}; now {now_s}).",
        again["expire"], again["expires_at"]
    );
    println!(
        "   Upstream calls so far: app_access_token {}, tenant_access_token {}, app_ticket/resend {}.",
        mock.calls(crate::mock_feishu::Endpoint::AppAccessToken),
        mock.calls(crate::mock_feishu::Endpoint::TenantAccessToken),
        mock.calls(crate::mock_feishu::Endpoint::AppTicketResend),
    );

    let custom_app_path = format!("/v1/apps/{custom_app_id}/app_access_token");
    let custom_tenant_path = format!("/v1/apps/{custom_app_id}/tenant_access_token");
    step(
        7,
        &format!(
            "Next to it, a self-built app ({custom_app_id}, kind = \"custom\") needs no ticket: its tokens\n   \
             come from app_id + app_secret alone (/open-apis/auth/v3/*_access_token/internal), with\n   \
             the same cache and background refresh. Its own tenant's token has no tenant_key:\n   \
             GET {custom_app_path}\n   GET {custom_tenant_path}"
        ),
    );
    let custom_app_token =
        get_json(&http, &format!("{base}{custom_app_path}"), &client_key).await?;
    println!("   → {custom_app_token}");
    let custom_tenant =
        get_json(&http, &format!("{base}{custom_tenant_path}"), &client_key).await?;
    println!("   → {custom_tenant}");
    let status = get_json(
        &http,
        &format!("{base}/v1/apps/{custom_app_id}"),
        &client_key,
    )
    .await?;
    println!(
        "   Its status says ticket {} (`lark-ticketd status` does not count it), and no resend was\n   \
         ever asked for it (app_ticket/resend calls so far: {}, all for {app_id}).",
        plain(&status["ticket"]["state"]),
        mock.calls(crate::mock_feishu::Endpoint::AppTicketResend),
    );

    step(
        8,
        &format!(
            "A user signs in to the custom app. Their browser opens the authorize URL\n   \
             http://{mock_addr}{AUTHORIZE_PATH}?client_id={custom_app_id}&redirect_uri=<your callback>&scope=offline_access&state=<random>\n   \
             and comes back to the callback with ?code=…; the login service hands the code over:\n   \
             POST /v1/apps/{custom_app_id}/user_access_token {{\"code\": \"…\"}}"
        ),
    );
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| e.to_string())?;
    let callback = "http://127.0.0.1:1/callback";
    let authorize = format!(
        "http://{mock_addr}{AUTHORIZE_PATH}?client_id={custom_app_id}&redirect_uri={}&scope=offline_access&state=demo",
        urlencode(callback)
    );
    let redirected = no_redirects
        .get(&authorize)
        .send()
        .await
        .map_err(|e| format!("GET {authorize}: {e}"))?;
    let location = redirected
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("the authorize page did not redirect")?
        .to_string();
    let code = reqwest::Url::parse(&location)
        .map_err(|e| e.to_string())?
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .ok_or("no code in the redirect")?;
    let login = post_json(
        &http,
        &format!("{base}/v1/apps/{custom_app_id}/user_access_token"),
        &client_key,
        &serde_json::json!({"code": code, "redirect_uri": callback}),
    )
    .await?;
    println!(
        "   → signed in: open_id {}, name {}, tenant_key {};\n   \
         a user access token for {} s and a refresh token (POST …/user_access_token/refresh).\n   \
         lark-ticketd keeps neither.",
        plain(&login["open_id"]),
        plain(&login["name"]),
        plain(&login["tenant_key"]),
        login["expire"]
    );

    step(
        9,
        &format!(
            "The app's other events are handed on: a local consumer (demo-bot, http://{consumer_addr})\n   \
             wants im.message.*. The platform pushes a chat message event to lark-ticketd…"
        ),
    );
    let (delivered_tx, mut delivered_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(consume(consumer_listener, consumer_secret, delivered_tx));
    let message = serde_json::json!({
        "schema": "2.0",
        "header": {"event_id": crate::push::random_event_id(), "event_type": "im.message.receive_v1",
                   "create_time": clock::SystemClock.now_ms().to_string(), "tenant_key": tenant_key,
                   "app_id": app_id},
        "event": {"message": {"message_type": "text", "content": "{\"text\":\"hello from the demo\"}"}},
    });
    let status = mock.push_event(&app_id, &message.to_string()).await?;
    let delivery = tokio::time::timeout(Duration::from_secs(10), delivered_rx.recv())
        .await
        .map_err(|_| "the consumer got nothing within 10 s".to_string())?
        .ok_or("the consumer stopped")?;
    println!(
        "   lark-ticketd answered {status} once the event was queued on disk, then POSTed it to the\n   \
         consumer with Standard Webhooks headers (webhook-id {}, the Feishu event id) and without\n   \
         the Verification Token. The consumer checked the signature with its secret: {}.",
        delivery.0, delivery.1
    );

    if once {
        let _ = stop_tx.send(());
        let _ = server_task.await;
        println!("\nDone (--once). Run `lark-ticketd demo` without --once to keep it running.");
        return Ok(());
    }
    println!(
        "\nThe demo keeps running. Try (Ctrl-C to stop):\n\
         \n  curl -H 'Authorization: Bearer {client_key}' {base}{app_path}\
         \n  curl -H 'Authorization: Bearer {client_key}' {base}{tenant_path}\
         \n  curl -H 'Authorization: Bearer {client_key}' {base}{custom_tenant_path}\
         \n  curl -X POST http://{mock_addr}/mock/oauth/code -d '{{\"app_id\":\"{custom_app_id}\"}}'   # a login code\
         \n  curl -X POST -H 'Authorization: Bearer {client_key}' -d '{{\"code\":\"<code>\"}}' {base}/v1/apps/{custom_app_id}/user_access_token\
         \n  curl -X POST -H 'Authorization: Bearer {client_key}' -d '{{\"token\":\"{tenant_token}\"}}' {base}{tenant_path}/invalidate\
         \n  curl http://{mock_addr}/mock/calls\
         \n  curl -X POST http://{mock_addr}/mock/push/{app_id}     # push a new ticket now\
         \n  curl {base}/readyz"
    );
    server::shutdown_signal().await;
    let _ = stop_tx.send(());
    let _ = server_task.await;
    Ok(())
}

/// The demo's consumer: verify each delivery's signature and report (event id, verdict).
async fn consume(
    listener: tokio::net::TcpListener,
    secret: WebhookSecret,
    report: tokio::sync::mpsc::Sender<(String, String)>,
) {
    use http_body_util::BodyExt;
    let secret = std::sync::Arc::new(secret);
    while let Ok((stream, _)) = listener.accept().await {
        let (secret, report) = (std::sync::Arc::clone(&secret), report.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (secret, report) = (std::sync::Arc::clone(&secret), report.clone());
                    async move {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let (id, timestamp, signature) = (
                            header("webhook-id"),
                            header("webhook-timestamp"),
                            header("webhook-signature"),
                        );
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let verdict = match body {
                            Ok(body) => match webhook::verify(
                                &secret,
                                &id,
                                &timestamp,
                                &signature,
                                &body,
                                clock::SystemClock.now_ms() / 1000,
                                Duration::from_secs(300),
                            ) {
                                Ok(()) => "valid".to_string(),
                                Err(e) => format!("INVALID ({e})"),
                            },
                            Err(e) => format!("unreadable ({e})"),
                        };
                        let _ = report.send((id, verdict)).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Percent-encode a query value (RFC 3986 unreserved characters stay).
fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let response = http
        .post(url)
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("POST {url}: HTTP {status}: {body}"));
    }
    Ok(body)
}

async fn get_json(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
) -> Result<serde_json::Value, String> {
    let response = http
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET {url}: HTTP {status}: {body}"));
    }
    Ok(body)
}
