//! A real browser for the console tests: Debian's `chromium`, headless, driven over WebDriver
//! by `chromedriver` (one per test, on a free port) through the fantoccini client. A machine
//! without them fails the test loudly (`tests/run.sh` installs both).

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context as _;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::process::{Child, Command};

use crate::DEADLINE;

/// Where screenshots go, for a person to look at: `target/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("console-screenshots")
}

/// Signs in to the console at `base` (`http://host:port`) without a browser: a client that
/// follows no redirects and the `ampora_session=…` cookie to send with it.
pub async fn console_session(base: &str, token: &str) -> anyhow::Result<(reqwest::Client, String)> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let signed = http
        .post(format!("{base}/ui/login"))
        .form(&[("token", token)])
        .send()
        .await?;
    anyhow::ensure!(
        signed.status() == 303,
        "sign-in answered {}",
        signed.status()
    );
    let cookie = signed
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no session cookie")?
        .to_string();
    Ok((http, cookie))
}

pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        let chromium = which("chromium").context(
            "chromium is not installed: apt-get install chromium chromium-driver (tests/run.sh does)",
        )?;
        let driver_bin = which("chromedriver").context(
            "chromedriver is not installed: apt-get install chromium-driver (tests/run.sh does)",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"],
            }
        });
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object"),
        };
        let url = format!("http://127.0.0.1:{port}");
        // chromedriver takes a moment to listen: ask for a session until the deadline.
        let client = crate::eventually("chromedriver to accept a session", DEADLINE, || {
            let mut builder = ClientBuilder::new(HttpConnector::new());
            builder.capabilities(caps.clone());
            let url = url.clone();
            async move { Ok(builder.connect(&url).await.ok()) }
        })
        .await?;
        Ok(Self { client, driver })
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("opening {url}"))
    }

    /// The text of the first element matching `css`, once there is one. Live pages replace
    /// their fragments: an element replaced between finding and reading it is found again.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let mut tries = 0;
        loop {
            let el = self.wait(css).await?;
            match el.text().await {
                Ok(t) => return Ok(t),
                Err(fantoccini::error::CmdError::Standard(e))
                    if e.error == fantoccini::error::ErrorStatus::StaleElementReference
                        && tries < 10 =>
                {
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The first element matching `css`, waiting for it up to the deadline.
    pub async fn wait(&self, css: &str) -> anyhow::Result<fantoccini::elements::Element> {
        self.client
            .wait()
            .at_most(DEADLINE)
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("waiting for `{css}`"))
    }

    /// Types `text` into the first element matching `css`.
    pub async fn fill(&self, css: &str, text: &str) -> anyhow::Result<()> {
        Ok(self.wait(css).await?.send_keys(text).await?)
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        Ok(self.wait(css).await?.click().await?)
    }

    /// The console's session cookie this browser holds (HttpOnly: WebDriver sees it, pages not).
    pub async fn session_cookie(&self) -> anyhow::Result<String> {
        self.client
            .get_all_cookies()
            .await?
            .into_iter()
            .find(|c| c.name() == "ampora_session")
            .map(|c| c.value().to_string())
            .context("no session cookie")
    }

    /// Whether an element matches `css` now.
    pub async fn has(&self, css: &str) -> anyhow::Result<bool> {
        Ok(!self.client.find_all(Locator::Css(css)).await?.is_empty())
    }

    /// Marks the page in the browser's memory; [`Browser::still_same_page`] checks the mark
    /// later, so a test can tell a live update from a reload.
    pub async fn mark_page(&self) -> anyhow::Result<()> {
        self.client
            .execute("window.__stayed = true;", vec![])
            .await?;
        Ok(())
    }

    /// Fails when the page was reloaded (or left) since [`Browser::mark_page`].
    pub async fn still_same_page(&self) -> anyhow::Result<()> {
        let stayed = self
            .client
            .execute("return window.__stayed === true;", vec![])
            .await?;
        anyhow::ensure!(
            stayed == serde_json::json!(true),
            "the page updated without a reload"
        );
        Ok(())
    }

    /// Fails when hostile markup the test planted ran (it sets `window.__xss`) or became an
    /// element (`<img onerror>`): what a page shows of what others wrote must stay text.
    pub async fn no_markup_ran(&self) -> anyhow::Result<()> {
        let clean = self
            .client
            .execute("return window.__xss === undefined;", vec![])
            .await?;
        anyhow::ensure!(clean == serde_json::json!(true), "hostile markup ran");
        anyhow::ensure!(
            !self.has("img[onerror]").await?,
            "hostile markup became an element"
        );
        Ok(())
    }

    /// Saves the page as `target/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<()> {
        let png = self.client.screenshot().await?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), png)?;
        Ok(())
    }

    pub async fn close(mut self) -> anyhow::Result<()> {
        self.client.clone().close().await?;
        let _ = self.driver.kill().await;
        Ok(())
    }
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}
