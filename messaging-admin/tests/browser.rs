//! The web console in a real headless Chromium, driven through
//! chromedriver over the W3C WebDriver protocol (the `fantoccini` client:
//! async on tokio, maintained, and it needs no browser-specific code), on
//! a real PostgreSQL and RabbitMQ:
//!
//! 1. without the token, the page shows the API's 401;
//! 2. with the token, the dead event shows in its group;
//! 3. "retry all in this group" is clicked;
//! 4. the relay publishes the event, once, and the audit row names the
//!    token's owner.
//!
//! Skipped, saying so, when `DATABASE_URL` or `AMQP_URL` is unset, or when
//! `chromium` or `chromedriver` is not on the `PATH` (Debian: `apt-get
//! install chromium chromium-driver`). `.ci/run` installs them and sets
//! `MESSAGING_ADMIN_BROWSER=required`, which makes their absence a failure.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{count, enqueue, Broker, Console, TOKEN};
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;
use test_support::eventually;

/// `name` on the `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// chromium and chromedriver, or `None` after saying why the test skips
/// (a failure when `MESSAGING_ADMIN_BROWSER=required`).
fn browser() -> Option<(PathBuf, PathBuf)> {
    match (on_path("chromium"), on_path("chromedriver")) {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        _ => {
            let why = "chromium or chromedriver is not on the PATH \
                       (Debian: apt-get install chromium chromium-driver)";
            if std::env::var("MESSAGING_ADMIN_BROWSER").as_deref() == Ok("required") {
                panic!("MESSAGING_ADMIN_BROWSER=required, but {why}");
            }
            eprintln!("skipping the console's browser test: {why}");
            None
        }
    }
}

/// A chromedriver process on a free port, killed on drop.
struct Driver {
    url: String,
    _child: tokio::process::Child,
}

impl Driver {
    async fn start(path: &PathBuf) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        eventually("chromedriver answers", || async {
            client
                .get(format!("{url}/status"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        Self { url, _child: child }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_retries_a_group_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let Some(b) = Broker::new("admin_browser").await else {
        return;
    };
    let ids = enqueue(&b.db.pool, &b.queue, 1).await;
    let relay = b.relay().await;
    eventually("the event dies (its queue does not exist)", || async {
        count(
            &b.db.pool,
            "SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    let console = Console::start(&b.db.url).await;
    let driver = Driver::start(&chromedriver).await;
    let profile = common::tempfile_path::TempPath::new("chromium_profile");
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                format!("--user-data-dir={}", profile.0.display()),
            ],
        },
    });
    let capabilities = match capabilities {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("an object"),
    };
    let web = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a Chromium session");
    let wait = || web.wait().at_most(Duration::from_secs(30));

    // 1. No token: the page shows the API's 401.
    web.goto(&format!("{}/", console.base)).await.expect("open");
    wait()
        .for_element(Locator::Css("body[data-ready='error']"))
        .await
        .expect("the page gives up without a token");
    let error = web.find(Locator::Id("error")).await.expect("#error");
    let error = error.text().await.expect("text");
    assert!(error.contains("401"), "the page shows: {error:?}");

    // 2. With the token (a fresh load: the fragment is read on load), the
    // dead event is in its group.
    b.declare().await;
    web.goto(&format!("{}/?with-token#token={TOKEN}", console.base))
        .await
        .expect("open with the token");
    wait()
        .for_element(Locator::Css("body[data-ready='true']"))
        .await
        .expect("the page loads with the token");
    let who = web.find(Locator::Id("who")).await.expect("#who");
    assert_eq!(who.text().await.expect("text"), "as alice");
    let group = web
        .find(Locator::Css("#groups tr.group"))
        .await
        .expect("a group of failures");
    let text = group.text().await.expect("text");
    assert!(text.contains(&b.queue), "the group: {text:?}");
    let item = web
        .find(Locator::Css("#items tbody tr"))
        .await
        .expect("an item");
    assert!(item.text().await.expect("text").contains(&ids[0]));

    // 3. Retry all in this group.
    group
        .find(Locator::Css("button.retry-group"))
        .await
        .expect("the group's retry button")
        .click()
        .await
        .expect("click");
    let notice = wait()
        .for_element(Locator::XPath(
            "//div[@id='notice'][contains(., 'retry: 1 changed')]",
        ))
        .await
        .expect("the page reports the retry");
    drop(notice);

    // 4. Published once, audited as alice via the console.
    eventually("the relay publishes the retried event", || async {
        count(
            &b.db.pool,
            "SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.drain().await, ids, "published once");
    let audit: (String, String, String, Vec<String>) = sqlx::query_as(
        "SELECT actor, via, action, items FROM messaging_admin.audit WHERE area = 'outbox'",
    )
    .fetch_one(&b.db.pool)
    .await
    .expect("one audit row");
    assert_eq!(
        audit,
        (
            "alice".into(),
            "console".into(),
            "retry".into(),
            ids.clone()
        )
    );
    // The page's audit table shows it too.
    wait()
        .for_element(Locator::XPath(
            "//table[@id='audit']//tr[contains(., 'alice')][contains(., 'retry')]",
        ))
        .await
        .expect("the audit row on the page");

    web.close().await.expect("close the session");
    drop(driver);
    let _ = std::fs::remove_dir_all(&profile.0);
    console.stop().await;
    relay.stop().await;
    b.finish().await;
}
