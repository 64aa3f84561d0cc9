//! A minimal Chrome DevTools Protocol client for the dashboard test, written by hand: the test
//! needs five commands (attach, navigate, evaluate, screenshot, console events) over one
//! WebSocket, while the CDP crates (headless_chrome, chromiumoxide) bring hundreds of
//! generated types and browser-download logic that cannot work here.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::oneshot};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

pub struct Browser {
    child: Child,
    profile: PathBuf,
    connection: Arc<Connection>,
}

struct Connection {
    sink: tokio::sync::Mutex<Sink>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
    console_errors: Mutex<Vec<String>>,
}

pub struct Page {
    connection: Arc<Connection>,
    session: String,
}

fn chromium_binary() -> &'static str {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a Chromium on PATH (scripts/test installs Debian's `chromium`)")
}

impl Browser {
    pub async fn launch() -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "switchboard-chromium-{}",
            common::testing::random_suffix()
        ));
        let mut child = Command::new(chromium_binary())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // Chromium prints its DevTools address on stderr; keep draining it afterwards so
        // the pipe never fills.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    tx.send(url.trim().to_owned()).ok();
                }
            }
        });
        let ws_url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium's DevTools address");
        let (socket, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("DevTools connects");
        let (sink, mut stream) = socket.split();
        let connection = Arc::new(Connection {
            sink: tokio::sync::Mutex::new(sink),
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            console_errors: Mutex::default(),
        });
        let reader = connection.clone();
        tokio::spawn(async move {
            while let Some(Ok(Message::Text(text))) = stream.next().await {
                let message: Value = serde_json::from_str(&text).unwrap_or_default();
                if let Some(id) = message["id"].as_u64() {
                    if let Some(reply) = reader.pending.lock().unwrap().remove(&id) {
                        reply.send(message).ok();
                    }
                } else {
                    reader.observe(&message);
                }
            }
        });
        Browser {
            child,
            profile,
            connection,
        }
    }

    pub async fn open(&self, url: &str) -> Page {
        let c = &self.connection;
        let target = c
            .call("Target.createTarget", json!({"url": "about:blank"}), None)
            .await;
        let attached = c
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
                None,
            )
            .await;
        let page = Page {
            connection: c.clone(),
            session: attached["sessionId"].as_str().unwrap().to_owned(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            page.call(domain, json!({})).await;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1360, "height": 760, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        page.call("Page.navigate", json!({"url": url})).await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        std::fs::remove_dir_all(&self.profile).ok();
    }
}

impl Connection {
    async fn call(&self, method: &str, params: Value, session: Option<&str>) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        self.sink
            .lock()
            .await
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("DevTools command sent");
        let reply = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| panic!("no DevTools reply to {method}"))
            .expect("reply");
        assert!(
            reply["error"].is_null(),
            "{method} failed: {}",
            reply["error"]
        );
        reply["result"].clone()
    }

    /// Records console errors, uncaught exceptions and error log entries.
    fn observe(&self, event: &Value) {
        let params = &event["params"];
        let error = match event["method"].as_str() {
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                Some(format!("console.error: {}", params["args"]))
            }
            Some("Runtime.exceptionThrown") => {
                Some(format!("exception: {}", params["exceptionDetails"]))
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                Some(format!("log: {}", params["entry"]["text"]))
            }
            _ => None,
        };
        if let Some(error) = error {
            self.console_errors.lock().unwrap().push(error);
        }
    }
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.connection
            .call(method, params, Some(&self.session))
            .await
    }

    /// Evaluates a JavaScript expression in the page; its value (`null` if undefined).
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    pub async fn screenshot(&self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    pub fn console_errors(&self) -> Vec<String> {
        self.connection.console_errors.lock().unwrap().clone()
    }
}
