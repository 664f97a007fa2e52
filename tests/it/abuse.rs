//! Issue 8, defect 7 (unauthenticated resource exhaustion) and the hyper-level rejections of
//! defect 11: the listeners' pools, the head timeout, the per-peer limit, the head and body
//! bounds, and the JSON envelope on hyper's own answers. Small counts and limits: CI stays fast.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use lark_ticketd::clock;
use lark_ticketd::config::Config;
use lark_ticketd::server::{self, Listeners};
use lark_ticketd::store::Store;
use lark_ticketd::AppState;

use crate::util::{app_toml, client, eventually, Reply, APP_ID, KEY, TOKEN};

/// A status-scope bearer key for the API checks.
const STATUS_KEY: &str = "abuse-status-key";

/// The server in this process with a main and an ops listener, both on port 0.
struct Served {
    main: SocketAddr,
    ops: SocketAddr,
    /// With [`Served::start_with_api`]: the `api_listen` listener.
    api: Option<SocketAddr>,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// `server` is the body of the `[server]` table.
    async fn start(server: &str) -> Served {
        Served::launch(server, false).await
    }

    /// With an `api_listen` listener too (the APIs move there).
    async fn start_with_api(server: &str) -> Served {
        Served::launch(server, true).await
    }

    async fn launch(server: &str, with_api: bool) -> Served {
        let api_listen = if with_api {
            "api_listen = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        let text = format!(
            "ops_listen = \"127.0.0.1:0\"\n{api_listen}[store]\nkind = \"memory\"\n[server]\n{server}\n\
             [[clients]]\nname = \"dash\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"status\"]\n{}",
            lark_ticketd::auth::key_sha256_hex(STATUS_KEY),
            app_toml(APP_ID, Some(KEY), TOKEN)
        );
        let config = Config::parse(&text, &|_| None).expect("test config");
        let store = Store::open(&config.store).await.unwrap();
        let state = AppState::new(config, store, clock::system()).unwrap();
        let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (main_addr, ops_addr) = (main.local_addr().unwrap(), ops.local_addr().unwrap());
        let api = match with_api {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let api_addr = api.as_ref().map(|l| l.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            Listeners {
                main,
                ops: Some(ops),
                api,
            },
            state.clone(),
            async {
                let _ = rx.await;
            },
            server::Hangups::catch(),
        ));
        Served {
            main: main_addr,
            ops: ops_addr,
            api: api_addr,
            state,
            stop: Some(tx),
            task,
        }
    }

    /// Connections open now (the gauge `server` keeps per accepted connection).
    fn open_connections(&self) -> u64 {
        let text = self.state.metrics().encode();
        text.lines()
            .find_map(|l| l.strip_prefix("lark_ticketd_open_connections "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    async fn wait_open(&self, n: u64) {
        eventually(&format!("{n} open connections"), || {
            self.open_connections() == n
        })
        .await;
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

/// A connection to `addr` from the loopback address `from` (127.0.0.x: distinct peers).
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Everything the server sends until it closes the connection (at most 10 s).
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// The status and the JSON body of a raw HTTP/1.1 answer.
fn parse_answer(raw: &str) -> (u16, serde_json::Value) {
    let status = raw
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_default())
}

async fn get(url: String) -> Reply {
    let sent = tokio::time::timeout(Duration::from_secs(10), client().get(url).send()).await;
    Reply::from(sent.expect("answered within 10 s").expect("request")).await
}

#[tokio::test]
async fn defect_7_idle_main_connections_do_not_stop_the_ops_listener() {
    // Old keys only, so this runs on the code before the fix too.
    let served = Served::start("max_connections = 20\nheader_read_timeout = \"60s\"").await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(served.main).await.unwrap());
    }
    served.wait_open(20).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = get(format!("http://{}{path}", served.ops)).await;
        assert_eq!(reply.status, 200, "{path} on ops_listen: {reply:?}");
    }
    drop(idle);
    served.stop().await;
}

#[tokio::test]
async fn a_flood_of_the_public_listener_does_not_block_the_api_listener() {
    let served =
        Served::start_with_api("max_connections = 20\nheader_read_timeout = \"60s\"").await;
    let api = served.api.unwrap();
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(served.main).await.unwrap());
    }
    served.wait_open(20).await;
    // The public listener is full; the internal one still answers the API at once.
    let reply = client()
        .get(format!("http://{api}/v1/apps"))
        .bearer_auth(STATUS_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(get(format!("http://{api}/healthz")).await.status, 200);
    drop(idle);
    served.stop().await;
}

#[tokio::test]
async fn defect_7_silent_and_idle_connections_are_closed_after_the_head_timeout() {
    let served = Served::start("header_read_timeout = \"300ms\"").await;
    // Sends nothing at all: closed without an answer.
    let mut silent = TcpStream::connect(served.main).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
    // One request, then idle on a keep-alive connection: the answer, then closed.
    let mut idle = TcpStream::connect(served.main).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let raw = read_to_close(&mut idle).await;
    assert_eq!(parse_answer(&raw).0, 200, "{raw}");
    served.wait_open(0).await;
    served.stop().await;
}

#[tokio::test]
async fn defect_7_one_address_cannot_take_every_connection() {
    let served = Served::start(
        "max_connections_per_peer = 3\nops_max_connections_per_peer = 2\nheader_read_timeout = \"60s\"",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from([127, 0, 0, 1], served.main).await);
    }
    served.wait_open(3).await;
    // The fourth from the same address: a 429 with the envelope, then closed.
    let mut fourth = connect_from([127, 0, 0, 1], served.main).await;
    let raw = read_to_close(&mut fourth).await;
    let (status, body) = parse_answer(&raw);
    assert_eq!(status, 429, "{raw}");
    assert_eq!(body["error"]["code"], "too_many_connections", "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
    // Another address is still served, on both listeners.
    for addr in [served.main, served.ops] {
        let mut other = connect_from([127, 0, 0, 2], addr).await;
        other
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let raw = read_to_close(&mut other).await;
        assert_eq!(parse_answer(&raw).0, 200, "{raw}");
    }
    // The ops listener has its own, smaller, per-peer limit.
    let ops_held = [
        connect_from([127, 0, 0, 1], served.ops).await,
        connect_from([127, 0, 0, 1], served.ops).await,
    ];
    served.wait_open(5).await;
    let raw = read_to_close(&mut connect_from([127, 0, 0, 1], served.ops).await).await;
    assert_eq!(parse_answer(&raw).0, 429, "{raw}");
    // A closed connection gives its slot back.
    drop(held.pop());
    drop(ops_held);
    served.wait_open(2).await;
    let mut again = connect_from([127, 0, 0, 1], served.main).await;
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let raw = read_to_close(&mut again).await;
    assert_eq!(parse_answer(&raw).0, 200, "{raw}");
    drop(held);
    served.stop().await;
}

#[tokio::test]
async fn defect_7_an_oversized_head_is_refused_at_the_head_limit() {
    // 8 KiB of an unfinished head: before the fix hyper buffered up to ~400 KB and waited.
    let served = Served::start("max_header_bytes = \"8KiB\"\nheader_read_timeout = \"60s\"").await;
    let mut stream = TcpStream::connect(served.main).await.unwrap();
    let mut head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: ".to_vec();
    head.resize(8 * 1024, b'a');
    stream.write_all(&head).await.unwrap();
    let raw = read_to_close(&mut stream).await;
    let (status, body) = parse_answer(&raw);
    assert_eq!(status, 431, "{raw}");
    assert_eq!(body["error"]["code"], "header_too_large", "{raw}");
    served.stop().await;
}

#[tokio::test]
async fn defect_11_hyper_rejections_carry_the_json_envelope() {
    let served = Served::start("max_header_bytes = \"1MiB\"").await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let cases: [(&[u8], u16, &str); 4] = [
        (
            b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"G@T / HTTP/1.1\r\nhost: x\r\n\r\n",
            400,
            "malformed_request",
        ),
        (long_uri.as_bytes(), 414, "uri_too_long"),
        (
            b"GET / HTTP/1.1\r\nhost: x\r\nbad header: y\r\n\r\n",
            400,
            "malformed_request",
        ),
    ];
    for (request, status, code) in cases {
        let mut stream = TcpStream::connect(served.main).await.unwrap();
        stream.write_all(request).await.unwrap();
        let raw = read_to_close(&mut stream).await;
        let (got, body) = parse_answer(&raw);
        assert_eq!(got, status, "{raw}");
        assert_eq!(body["error"]["code"], code, "{raw}");
        assert!(body["error"]["message"].is_string(), "{raw}");
        assert!(
            raw.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{raw}"
        );
    }
    served.stop().await;
}

/// POST `declared` bytes to /events, sending all of them; the answer's status and code.
async fn post_body(addr: SocketAddr, declared: usize) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /events/{APP_ID} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may refuse before reading the body: ignore a failed write, read the answer.
    let _ = stream.write_all(&vec![b'x'; declared]).await;
    let raw = read_to_close(&mut stream).await;
    let (status, body) = parse_answer(&raw);
    let code = body["error"]["code"].as_str().unwrap_or("").to_string();
    (status, code, raw)
}

#[tokio::test]
async fn defect_7_the_body_budget_refuses_with_a_4xx_when_spent_and_recovers() {
    let served = Served::start(
        "max_body_bytes = \"64KiB\"\nmax_body_bytes_in_flight = \"64KiB\"\nbody_allowance_bytes = \"2KiB\"",
    )
    .await;
    // An unfinished 60,000-byte body holds most of the budget.
    let mut slow = TcpStream::connect(served.main).await.unwrap();
    let head = format!(
        "POST /events/{APP_ID} HTTP/1.1\r\nhost: x\r\ncontent-length: 60000\r\n\r\n{}",
        "x".repeat(100)
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // Until the server has read that head, a second large body may still fit: retry until not.
    let mut refused = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while refused.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        let (status, code, raw) = post_body(served.main, 20_000).await;
        if status == 429 {
            refused = Some((code, raw));
        } else {
            // Read whole and judged: a 4xx of the intake, never a 5xx.
            assert!((400..500).contains(&status), "{raw}");
        }
    }
    let (code, raw) = refused.unwrap();
    assert_eq!(code, "server_busy", "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
    // A small body (within the allowance) is still read and judged.
    let (status, code, raw) = post_body(served.main, 1_000).await;
    assert_ne!(status, 429, "{raw}");
    assert!((400..500).contains(&status) && !code.is_empty(), "{raw}");
    // The slow body goes away: its budget comes back.
    drop(slow);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, raw) = post_body(served.main, 20_000).await;
        if status != 429 {
            assert!((400..500).contains(&status), "{raw}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the budget never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    served.stop().await;
}

/// Found by the attack on the release binary: a client that pipelines requests and never reads
/// the answers fills its socket's buffers; hyper then stops reading, so the head timeout never
/// fires, and the connection held its permit (and kernel buffers) for ever.
#[tokio::test]
async fn attack_a_client_that_stops_reading_is_closed_after_the_write_timeout() {
    let served = Served::start("write_timeout = \"300ms\"\nheader_read_timeout = \"60s\"").await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(served.main).await.unwrap();
    let (_unread, mut write) = stream.into_split();
    // Pipeline requests until our own writes block (the server stopped reading), never reading
    // an answer; bounded in count.
    let writer = tokio::spawn(async move {
        let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".repeat(1000);
        for _ in 0..2_000 {
            if write.write_all(&request).await.is_err() {
                return;
            }
        }
    });
    served.wait_open(1).await;
    // Closed by the server (before the fix: open for ever, and `eventually` times out).
    served.wait_open(0).await;
    writer.abort();
    served.stop().await;
}

/// Found by the attack: `.` and `..` passed as tenant keys and minted tokens (path segments a
/// proxy in front may resolve; sent raw here, as `curl --path-as-is` does).
#[tokio::test]
async fn attack_dot_segments_are_not_tenant_keys() {
    let bearer = "dot-segment-bearer-key";
    let served = Served::start(&format!(
        "[[clients]]\nname = \"t\"\nkey_sha256 = \"{}\"\napps = [\"*\"]\nscopes = [\"tokens\"]\n",
        lark_ticketd::auth::key_sha256_hex(bearer)
    ))
    .await;
    for key in [".", "..", "..."] {
        let mut stream = TcpStream::connect(served.main).await.unwrap();
        let request = format!(
            "GET /v1/apps/{APP_ID}/tenants/{key}/tenant_access_token HTTP/1.1\r\nhost: x\r\n\
             authorization: Bearer {bearer}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let raw = read_to_close(&mut stream).await;
        let (status, body) = parse_answer(&raw);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{key}: {raw}"
        );
    }
    served.stop().await;
}
