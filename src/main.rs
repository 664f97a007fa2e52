//! The `lark-ticketd` command: parse the command line, load config, start. Nothing else lives
//! here; every command's work is a library function.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use lark_ticketd::clock;
use lark_ticketd::config::{Config, ConfigError, StoreKind};
use lark_ticketd::events::cipher::EventCipher;
use lark_ticketd::mock_feishu::{MockFeishu, MockOptions};
use lark_ticketd::ops::logging::{self, LogFormat};

/// jemalloc instead of glibc's malloc, so memory goes back to the system after a flood. Measured
/// with `cargo bench --bench abuse` (issue 8): with glibc, RSS 5 s after 1,000 unfinished bodies,
/// 1,000 unfinished heads and a connection flood stayed at the flood's 56 MiB (freed buffers
/// stranded in per-thread arenas; `malloc_trim` would need `unsafe`); with jemalloc and its
/// background purging thread it fell to 17 MiB, for about 1.5 MiB more at idle. (mimalloc was
/// tried too: 36 MiB after the flood and 40 MiB under plain load.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use lark_ticketd::push::{self, Seal};
use lark_ticketd::secret::Secret;
use lark_ticketd::server::{self, Listeners};
use lark_ticketd::store::Store;
use lark_ticketd::AppState;

/// Exit code for bad configuration (sysexits EX_USAGE / EX_CONFIG family; 64 as in DESIGN.md).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the store cannot be opened: a damaged or empty file, a file in use by another
/// process, no permission (sysexits EX_IOERR).
const EXIT_STORE: u8 = 74;

#[derive(Parser)]
#[command(
    name = "lark-ticketd",
    version,
    about = "App Ticket intake and token service for Feishu / Lark app-store apps"
)]
struct Cli {
    /// Log format: text on a terminal, JSON otherwise, unless set.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        #[arg(long, env = "LARK_TICKETD_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and print what it resolved to (secrets redacted).
    CheckConfig {
        #[arg(long, env = "LARK_TICKETD_CONFIG")]
        config: PathBuf,
    },
    /// Send one event to an events URL exactly as Feishu would (encrypted, signed, with the token).
    Push {
        #[command(subcommand)]
        what: PushWhat,
    },
    /// The whole flow on this machine with nothing to configure: a fake Open Platform, the
    /// service, a pushed ticket, and tokens fetched through the API.
    Demo {
        /// Exit after the flow instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// A local fake of the Open Platform: the store-app auth API, and app_ticket pushes to an
    /// events URL (on resend and periodically).
    MockFeishu(MockFeishuArgs),
    /// Operators: every app's ticket freshness and token state, and the consumers' backlogs. Exit code 0 when every ticket is
    /// fresh and every app's token fetches succeed, 1 when one is stale or one app's token fetches are failing (the last
    /// failed, none succeeded since), 2 when one is missing or the service is unreachable.
    Status {
        /// The service's base URL.
        #[arg(
            long,
            env = "LARK_TICKETD_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        url: String,
        /// The environment variable that holds a bearer key with the status scope.
        #[arg(long, default_value = "LARK_TICKETD_API_KEY")]
        api_key_env: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A consumer whose oldest undelivered event is older than this needs attention (exit 1).
        #[arg(long, default_value = "15m", value_parser = lark_ticketd::config::parse_duration)]
        max_pending_age: std::time::Duration,
    },
    /// Decrypt an `encrypt` blob (or a whole `{"encrypt": ...}` body) with an Encrypt Key.
    Decrypt {
        /// The Encrypt Key.
        #[arg(long, env = "LARK_ENCRYPT_KEY", hide_env_values = true)]
        encrypt_key: String,
        /// The blob or body; read from stdin when absent.
        blob: Option<String>,
    },
}

#[derive(Subcommand)]
enum PushWhat {
    /// A URL-verification challenge (as when saving the request URL in the console).
    Challenge {
        #[command(flatten)]
        target: PushTarget,
        /// The challenge string (random when absent).
        #[arg(long)]
        challenge: Option<String>,
    },
    /// An app_ticket event: REPLACES the app's stored ticket with a fake one (needs --force).
    ///
    /// A running lark-ticketd stores the pushed ticket as the app's newest App Ticket, in place of
    /// the real one Feishu pushed. Feishu refuses the fake ticket, so the app's token fetches fail
    /// until Feishu pushes the real ticket again (hourly, or after `POST
    /// /v1/apps/{app_id}/ticket/resend`). Use it against a test deployment or mock-feishu; to
    /// undo it, drop the fake ticket with `DELETE /v1/apps/{app_id}/ticket` (admin scope) and ask
    /// for a resend.
    Ticket {
        #[command(flatten)]
        target: PushTarget,
        /// The ticket value (random when absent).
        #[arg(long, env = "LARK_APP_TICKET", hide_env_values = true)]
        ticket: Option<String>,
        /// Replace the app's stored ticket with this fake one anyway.
        #[arg(long)]
        force: bool,
    },
    /// Any event from a JSON file; the Verification Token is filled in.
    Event {
        #[command(flatten)]
        target: PushTarget,
        /// The event JSON (schema 1.0 or 2.0).
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Args)]
struct MockFeishuArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: std::net::SocketAddr,
    /// A lark-ticketd config: the fake platform knows its apps and their credentials.
    #[arg(long, env = "LARK_TICKETD_CONFIG")]
    config: PathBuf,
    /// Where to push app_ticket events; `{app_id}` is replaced by the app id.
    #[arg(long, default_value = "http://127.0.0.1:8080/events/{app_id}")]
    events_url: String,
    /// Push a new ticket to every app this often, like Feishu's hourly push ("0s": only on resend).
    #[arg(long, default_value = "1h", value_parser = parse_duration_arg)]
    push_interval: std::time::Duration,
    /// Lifetime of issued tokens.
    #[arg(long, default_value = "2h", value_parser = parse_duration_arg)]
    token_ttl: std::time::Duration,
    /// Delay before answering each auth call.
    #[arg(long, default_value = "0s", value_parser = parse_duration_arg)]
    latency: std::time::Duration,
    /// Share of auth calls answered with HTTP 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    lark_ticketd::config::parse_duration(s)
}

#[derive(Args)]
struct PushTarget {
    /// The events URL, e.g. https://example.com/events/cli_xxx
    #[arg(long)]
    url: String,
    /// The app id (for app_ticket events).
    #[arg(long, env = "LARK_APP_ID")]
    app_id: Option<String>,
    /// The Encrypt Key; without it the event is sent in clear text, unsigned.
    #[arg(long, env = "LARK_ENCRYPT_KEY", hide_env_values = true)]
    encrypt_key: Option<String>,
    /// The Verification Token.
    #[arg(long, env = "LARK_VERIFICATION_TOKEN", hide_env_values = true)]
    verification_token: Option<String>,
    /// Take app id, Encrypt Key and Verification Token from this config file instead.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo { .. } | Command::Status { .. } => "warn",
        _ => "info",
    };
    logging::init(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lark-ticketd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(config).await,
            Command::CheckConfig { config } => check_config(config),
            Command::Push { what } => push_command(what).await,
            Command::Demo { once } => match lark_ticketd::demo::run(once).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lark-ticketd demo: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::MockFeishu(args) => mock_feishu(args).await,
            Command::Status {
                url,
                api_key_env,
                json,
                max_pending_age,
            } => {
                let key = std::env::var(&api_key_env).ok().filter(|k| !k.is_empty());
                let max_age_s = max_pending_age.as_secs();
                ExitCode::from(
                    lark_ticketd::ops::status::run_cli(&url, key.as_deref(), json, max_age_s).await,
                )
            }
            Command::Decrypt { encrypt_key, blob } => decrypt(&encrypt_key, blob),
        }
    });
    drop(runtime);
    logging::flush();
    code
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("lark-ticketd: config error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

async fn serve(path: PathBuf) -> ExitCode {
    // First: a SIGHUP from here on is held for a reload once serving, never fatal.
    let hangups = server::Hangups::catch();
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    // On this (the main) thread: see `Store::open_blocking`. Redis connects on the runtime.
    let opened = match config.store.kind {
        StoreKind::Redis => Store::open(&config.store).await,
        _ => Store::open_blocking(&config.store),
    };
    let store = match opened {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lark-ticketd: cannot open the store: {}", e.0);
            return ExitCode::from(EXIT_STORE);
        }
    };
    let main = match server::bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lark-ticketd: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let mut optional = Vec::new();
    for addr in [config.ops_listen, config.api_listen] {
        optional.push(match addr {
            Some(addr) => match server::bind(addr) {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("lark-ticketd: cannot listen on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        });
    }
    let (api, ops) = (optional.pop().flatten(), optional.pop().flatten());
    let address = |l: Option<&tokio::net::TcpListener>| {
        l.and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    let (listen, ops_listen, api_listen) = (
        address(Some(&main)),
        address(ops.as_ref()),
        address(api.as_ref()),
    );
    tracing::info!(
        listen = %listen,
        ops_listen = %ops_listen,
        api_listen = %api_listen,
        store = ?config.store.kind,
        apps = config.apps.len(),
        "lark-ticketd serving"
    );
    let state = match AppState::new(config, store.clone(), clock::system()) {
        Ok(state) => state,
        Err(e) => {
            let cause = e.cause().map(|c| format!(": {c}")).unwrap_or_default();
            eprintln!("lark-ticketd: {}{cause}", e.message());
            return ExitCode::FAILURE;
        }
    };
    let served = server::run(
        Listeners { main, ops, api },
        state,
        server::shutdown_signal(),
        hangups,
    )
    .await;
    // Commit what is queued and close the file off the async workers.
    store.close().await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lark-ticketd: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn mock_feishu(args: MockFeishuArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    if !(0.0..=1.0).contains(&args.error_rate) {
        eprintln!("lark-ticketd: --error-rate must be between 0.0 and 1.0");
        return ExitCode::from(EXIT_CONFIG);
    }
    let mut options = MockOptions::from_config(&config, clock::system());
    options.events_url = Some(args.events_url.clone());
    options.push_interval = (!args.push_interval.is_zero()).then_some(args.push_interval);
    options.token_ttl = args.token_ttl;
    options.latency = args.latency;
    options.error_rate = args.error_rate;
    let listener = match server::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lark-ticketd: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let mock = match MockFeishu::start(listener, options) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("lark-ticketd: cannot start mock-feishu: {e}");
            return ExitCode::FAILURE;
        }
    };
    let apps: Vec<&str> = config.apps.iter().map(|a| a.app_id.as_str()).collect();
    println!(
        "mock-feishu: a fake Open Platform at {} for {}\n\
         set base_url = \"{}\" in lark-ticketd's [[apps]]; tickets are pushed to {}\n\
         call counts: GET {}/mock/calls; push now: POST {}/mock/push/<app_id>",
        mock.base_url(),
        apps.join(", "),
        mock.base_url(),
        args.events_url,
        mock.base_url(),
        mock.base_url()
    );
    server::shutdown_signal().await;
    ExitCode::SUCCESS
}

fn check_config(path: PathBuf) -> ExitCode {
    match Config::load(&path) {
        Ok(config) => {
            println!("{} is valid:\n{config:#?}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

/// Credentials for `push`: from `--config` or from flags / environment.
struct PushCredentials {
    app_id: Option<String>,
    encrypt_key: Option<Secret>,
    verification_token: Secret,
}

fn push_credentials(target: &PushTarget) -> Result<PushCredentials, ExitCode> {
    if let Some(path) = &target.config {
        let config = Config::load(path).map_err(|e| config_error(&e))?;
        let app = match &target.app_id {
            Some(id) => config.app(id),
            None => config.apps.first(),
        };
        let Some(app) = app else {
            eprintln!("lark-ticketd: --app-id names no app in {}", path.display());
            return Err(ExitCode::from(EXIT_CONFIG));
        };
        let Some(verification_token) = app.verification_token.clone() else {
            eprintln!(
                "lark-ticketd: app {} has no verification_token in {}: its events are not received",
                app.app_id,
                path.display()
            );
            return Err(ExitCode::from(EXIT_CONFIG));
        };
        return Ok(PushCredentials {
            app_id: Some(app.app_id.clone()),
            encrypt_key: app.encrypt_key.clone(),
            verification_token,
        });
    }
    let Some(token) = target.verification_token.clone() else {
        eprintln!(
            "lark-ticketd: give --verification-token (or LARK_VERIFICATION_TOKEN) or --config"
        );
        return Err(ExitCode::from(EXIT_CONFIG));
    };
    Ok(PushCredentials {
        app_id: target.app_id.clone(),
        encrypt_key: target
            .encrypt_key
            .clone()
            .filter(|k| !k.is_empty())
            .map(Secret::new),
        verification_token: Secret::new(token),
    })
}

async fn push_command(what: PushWhat) -> ExitCode {
    let (target, plaintext, sign, expect_challenge) = match &what {
        PushWhat::Challenge { target, challenge } => {
            let creds = match push_credentials(target) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let challenge = challenge.clone().unwrap_or_else(push::random_event_id);
            let json = push::challenge_json(&challenge, &creds.verification_token);
            (target, (json, creds), false, Some(challenge))
        }
        PushWhat::Ticket {
            target,
            ticket,
            force,
        } => {
            let creds = match push_credentials(target) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(app_id) = creds.app_id.clone() else {
                eprintln!("lark-ticketd: push ticket needs --app-id (or LARK_APP_ID) or --config");
                return ExitCode::from(EXIT_CONFIG);
            };
            if !force {
                eprintln!(
                    "lark-ticketd: push ticket replaces {app_id}'s stored App Ticket with a fake one, \
                     and its token fetches fail until Feishu pushes the real one again: add --force \
                     to do it (undo: DELETE /v1/apps/{app_id}/ticket, then POST …/ticket/resend)"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            let ticket = Secret::new(
                ticket
                    .clone()
                    .unwrap_or_else(|| format!("ticket-{}", push::random_event_id())),
            );
            let now_us = clock::system().now_ms() as i64 * 1000;
            let json = push::app_ticket_json(
                &app_id,
                &ticket,
                &creds.verification_token,
                now_us,
                &push::random_event_id(),
            );
            println!("ticket fingerprint: {}", ticket.fingerprint());
            (target, (json, creds), true, None)
        }
        PushWhat::Event { target, file } => {
            let creds = match push_credentials(target) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("lark-ticketd: cannot read {}: {e}", file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let json = match push::with_token(&text, &creds.verification_token) {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("lark-ticketd: {}: {e}", file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            (target, (json, creds), true, None)
        }
    };
    let (json, creds) = plaintext;
    let request = push::seal(
        &json,
        Seal {
            encrypt_key: creds.encrypt_key.as_ref(),
            sign,
        },
    );
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lark-ticketd: cannot build an HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    match push::send(&client, &target.url, &request).await {
        Ok((status, body)) => {
            println!("HTTP {status}\n{body}");
            if !(200..300).contains(&status) {
                return ExitCode::FAILURE;
            }
            if let Some(expected) = expect_challenge {
                let echoed = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| {
                        v.get("challenge")
                            .and_then(|c| c.as_str().map(str::to_string))
                    });
                if echoed.as_deref() != Some(expected.as_str()) {
                    eprintln!("lark-ticketd: the challenge was not echoed back");
                    return ExitCode::FAILURE;
                }
                println!("challenge echoed correctly");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lark-ticketd: request to {} failed: {e}", target.url);
            ExitCode::FAILURE
        }
    }
}

fn decrypt(encrypt_key: &str, blob: Option<String>) -> ExitCode {
    let input = match blob {
        Some(b) => b,
        None => {
            let mut s = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
                eprintln!("lark-ticketd: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
            s
        }
    };
    let input = input.trim();
    // Accept a whole body too.
    let blob = serde_json::from_str::<serde_json::Value>(input)
        .ok()
        .and_then(|v| {
            v.get("encrypt")
                .and_then(|e| e.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| input.to_string());
    match EventCipher::new(encrypt_key).decrypt(&blob) {
        Ok(plaintext) => {
            println!("{plaintext}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lark-ticketd: cannot decrypt: {e}");
            ExitCode::FAILURE
        }
    }
}
