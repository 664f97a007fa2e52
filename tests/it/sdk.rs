//! The README's SDK examples (`examples/sdk/`) run against lark-ticketd and mock-feishu, so they
//! cannot rot: the official Node and Python SDKs call Feishu's "get tenant info" with a tenant
//! token from lark-ticketd and never mint one of their own; when Feishu rejects the token
//! (`99991663` / `99991664`, HTTP 400) the example reports it to lark-ticketd's `…/invalidate`
//! and retries once with the new token. The README embeds each example file whole (checked here).
//!
//! The SDKs come from `examples/sdk/install.sh` (into `target/sdk/`, at the pinned versions; `.ci/run`
//! calls it). Without them the tests fail under `CI=true` and print why they skipped elsewhere.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lark_ticketd::mock_feishu::Endpoint;
use serde_json::json;

use crate::util::{holds_issued_secret, Stack, StackOptions, APP_ID, BEARER};

/// The longest one run of an example may take (a Python run imports ~11,000 SDK modules).
const RUN_DEADLINE: Duration = Duration::from_secs(60);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn sdk_dir() -> PathBuf {
    repo().join("target").join("sdk")
}

fn example(path: &str) -> String {
    let path = repo().join("examples").join("sdk").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Is everything in `missing` absent (empty)? Under `CI=true` anything missing fails the test
/// (tests must not pass by skipping); elsewhere a loud notice says what was not tested.
fn installed(test: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join("; ");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {missing}. CI=true requires the SDK examples to run: .ci/run installs them \
         (bash examples/sdk/install.sh)"
    );
    eprintln!(
        "\n********************************************************************************\n\
         ** SKIPPED {test}: {missing}.\n\
         ** Run `bash examples/sdk/install.sh`. Under CI=true this is a failure.\n\
         ********************************************************************************\n"
    );
    false
}

/// One of the two examples the tests run.
#[derive(Debug, Clone, Copy)]
enum Sdk {
    Node,
    Python,
}

impl Sdk {
    /// What is missing to run this example, if anything: the runtime, or the SDK at the pinned
    /// version (install.sh keeps a copy of the pin file it installed from).
    fn missing(self) -> Vec<String> {
        let sdk = sdk_dir();
        let (runtime, pin, installed_pin) = match self {
            Sdk::Node => (
                which("node").map(|_| ()).ok_or("node is not installed"),
                "node/package.json",
                sdk.join("node/package.json"),
            ),
            Sdk::Python => (
                sdk.join("venv/bin/python")
                    .is_file()
                    .then_some(())
                    .ok_or("target/sdk/venv is missing"),
                "python/requirements.txt",
                sdk.join("venv/requirements.txt"),
            ),
        };
        let mut missing = Vec::new();
        if let Err(e) = runtime {
            missing.push(e.to_string());
        }
        if std::fs::read_to_string(installed_pin).ok() != Some(example(pin)) {
            missing.push(format!(
                "the SDK pinned in examples/sdk/{pin} is not installed in target/sdk"
            ));
        }
        missing
    }

    /// Run the example once with these variables; its exit status and what it printed.
    async fn run(self, env: &[(&str, String)]) -> (bool, String) {
        let mut cmd = match self {
            Sdk::Node => {
                // Node finds packages beside the script: run the example's text from there.
                let dir = sdk_dir().join("node");
                std::fs::write(dir.join("index.mjs"), example("node/index.mjs")).unwrap();
                let mut cmd = tokio::process::Command::new("node");
                cmd.arg("index.mjs").current_dir(dir);
                cmd
            }
            Sdk::Python => {
                let mut cmd = tokio::process::Command::new(sdk_dir().join("venv/bin/python"));
                cmd.arg(repo().join("examples/sdk/python/tenant_query.py"));
                cmd
            }
        };
        // Everything goes to 127.0.0.1 directly (axios and requests honour proxy variables).
        for var in crate::util::PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{self:?}: {e}"));
        let output = tokio::time::timeout(RUN_DEADLINE, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("the {self:?} example did not finish in {RUN_DEADLINE:?}"))
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), printed)
    }
}

/// The tenant token lark-ticketd serves now.
async fn served(stack: &Stack, tenant: &str) -> String {
    let r = stack
        .get(&format!(
            "/v1/apps/{APP_ID}/tenants/{tenant}/tenant_access_token"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["tenant_access_token"].as_str().unwrap().to_string()
}

/// Run `sdk`'s example against a fresh lark-ticketd + mock-feishu: once as is, then once after
/// mock-feishu revoked the token lark-ticketd serves, answering each of `codes` for it.
async fn example_takes_tokens_from_lark_ticketd(test: &str, sdk: Sdk, codes: &[i64]) {
    if !installed(test, &sdk.missing()) {
        return;
    }
    let tenant = "5e1dc0de0a11ce55";
    let stack = Stack::start(StackOptions::default()).await;
    // mock-feishu pushed the ticket, as Feishu does after the service's start-up resend request.
    stack.wait_for_ticket(APP_ID).await;
    let env = [
        ("LARK_TICKETD_URL", format!("http://{}", stack.app.addr)),
        ("LARK_TICKETD_KEY", BEARER.to_string()),
        ("LARK_APP_ID", APP_ID.to_string()),
        ("LARK_TENANT_KEY", tenant.to_string()),
        ("FEISHU_DOMAIN", stack.mock.base_url()),
    ];
    let calls = |e| stack.mock.calls(e);
    let resends = stack.mock.resends_for(APP_ID);
    let mut tokens = Vec::new();

    // The token lark-ticketd serves works: Feishu answers with the tenant.
    let (ok, printed) = sdk.run(&env).await;
    assert!(ok, "the {sdk:?} example failed:\n{printed}");
    assert!(
        printed.contains(&format!("tenant: Mock Tenant ({tenant})")),
        "{printed}"
    );
    assert!(!printed.contains("retrying"), "{printed}");
    assert_eq!(calls(Endpoint::TenantQuery), 1);
    assert_eq!(
        calls(Endpoint::TenantAccessToken),
        1,
        "lark-ticketd's one fetch"
    );
    tokens.push(served(&stack, tenant).await);

    for &code in codes {
        // Feishu stops accepting the token lark-ticketd serves (revoked, answered with `code`).
        let rejected = served(&stack, tenant).await;
        let r = stack
            .app
            .client
            .post(format!("{}/mock/revoke", stack.mock.base_url()))
            .json(&json!({"token": rejected, "code": code}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let queries = calls(Endpoint::TenantQuery);
        let fetches = calls(Endpoint::TenantAccessToken);

        let (ok, printed) = sdk.run(&env).await;
        assert!(ok, "the {sdk:?} example failed after {code}:\n{printed}");
        assert!(
            printed.contains(&format!(
                "Feishu rejected the tenant token ({code}): retrying once with a new one"
            )),
            "{printed}"
        );
        assert!(
            printed.contains(&format!("tenant: Mock Tenant ({tenant})")),
            "{printed}"
        );
        // One rejected call and one retry; lark-ticketd dropped the reported token and fetched
        // exactly one new one, which it serves from now on.
        assert_eq!(calls(Endpoint::TenantQuery), queries + 2, "{printed}");
        assert_eq!(calls(Endpoint::TenantAccessToken), fetches + 1);
        let now = served(&stack, tenant).await;
        assert!(!tokens.contains(&now), "a new token after {code}");
        tokens.push(now);
        assert!(
            !holds_issued_secret(&printed),
            "the example printed a token:\n{printed}"
        );
    }
    // The SDK minted nothing itself: no self-built token call (its default), no ticket resend
    // (its store-app mode asks for one when it starts).
    assert_eq!(calls(Endpoint::TenantAccessTokenInternal), 0);
    assert_eq!(calls(Endpoint::AppAccessTokenInternal), 0);
    assert_eq!(stack.mock.resends_for(APP_ID), resends);
    stack.stop().await;
}

#[tokio::test]
async fn the_node_example_calls_feishu_with_tokens_from_lark_ticketd_and_retries_once() {
    example_takes_tokens_from_lark_ticketd(
        "sdk::the_node_example_calls_feishu_with_tokens_from_lark_ticketd_and_retries_once",
        Sdk::Node,
        &[99991663, 99991664],
    )
    .await;
}

/// One rejection only: every Python run imports the whole SDK (seconds of CPU); the Node test
/// covers both codes, and the Python example checks them the same way.
#[tokio::test]
async fn the_python_example_calls_feishu_with_tokens_from_lark_ticketd_and_retries_once() {
    example_takes_tokens_from_lark_ticketd(
        "sdk::the_python_example_calls_feishu_with_tokens_from_lark_ticketd_and_retries_once",
        Sdk::Python,
        &[99991663],
    )
    .await;
}

#[test]
fn the_readme_shows_each_example_whole_and_the_sdks_are_pinned_exactly() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for (file, fence) in [
        ("node/index.mjs", "```js\n"),
        ("python/tenant_query.py", "```python\n"),
        ("go/main.go", "```go\n"),
    ] {
        assert!(
            readme.contains(&format!("{fence}{}```\n", example(file))),
            "README.md must show examples/sdk/{file} whole, as it is, in a {fence:?} block"
        );
    }
    let package: serde_json::Value = serde_json::from_str(&example("node/package.json")).unwrap();
    let version = package["dependencies"]["@larksuiteoapi/node-sdk"]
        .as_str()
        .unwrap();
    assert!(
        version.chars().all(|c| c.is_ascii_digit() || c == '.'),
        "an exact version: {version}"
    );
    assert!(example("python/requirements.txt")
        .lines()
        .all(|l| l.contains("==")));
    assert!(example("go/go.mod").contains("github.com/larksuite/oapi-sdk-go/v3 v3."));
}
