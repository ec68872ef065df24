//! `switchyard lsp` end to end: this test is the editor, speaking JSON-RPC over the built binary's stdio (the LSP
//! base protocol: `Content-Length` framing), as Neovim's `vim.lsp` or a VS Code client would.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

struct Client {
    child: Child,
    stdin: ChildStdin,
    messages: mpsc::Receiver<Value>,
}

impl Client {
    fn start(args: &[&str]) -> Client {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("lsp")
            .args(args)
            .env_remove("SWITCHYARD_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the switchyard binary runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || read_messages(stdout, tx));
        Client { child, stdin, messages }
    }

    fn send(&mut self, message: Value) {
        let body = message.to_string();
        write!(self.stdin, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn request(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        self.next(|m| m["id"] == id)
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// The next message that `wanted` accepts (others, such as log messages, are skipped).
    fn next(&self, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let m = self
                .messages
                .recv_timeout(Duration::from_secs(20))
                .expect("the server answers within 20 s");
            if wanted(&m) {
                return m;
            }
        }
    }

    fn diagnostics(&self, uri: &str) -> Vec<Value> {
        let m = self.next(|m| m["method"] == "textDocument/publishDiagnostics" && m["params"]["uri"] == uri);
        m["params"]["diagnostics"].as_array().unwrap().clone()
    }
}

fn read_messages(stdout: ChildStdout, tx: mpsc::Sender<Value>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some(n) = header.strip_prefix("Content-Length: ") {
                length = n.parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        if tx.send(serde_json::from_slice(&body).unwrap()).is_err() {
            return;
        }
    }
}

const BAD: &str = "version: 1\nroutes:\n  - name: provision\n    channel: orders\n    when: becomes(\"Activation_Status__c\", \"Activating\")\n    then:\n      - { sink: log, message: x }\n";

#[test]
fn the_editor_sees_validate_s_diagnostics_as_it_types_and_completes_helpers() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("orders.yaml");
    std::fs::write(&rules, "version: 1\nroutes: []\n").unwrap();
    let uri = format!("file://{}", rules.display());
    let mut client = Client::start(&[]);
    let init = client.request(
        1,
        "initialize",
        json!({"processId": null, "rootUri": null, "capabilities": {}}),
    );
    assert_eq!(init["result"]["capabilities"]["hoverProvider"], true, "{init}");
    client.notify("initialized", json!({}));

    // Opened with a misspelt helper (unsaved: the file on disk is fine): the diagnostic `validate` gives.
    client.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "yaml", "version": 1, "text": BAD}}),
    );
    let diagnostics = client.diagnostics(&uri);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0]["range"]["start"], json!({"line": 4, "character": 10}));
    assert_eq!(diagnostics[0]["severity"], 1);
    assert_eq!(
        diagnostics[0]["message"],
        "route `provision`: `when`: unknown function `becomes`; did you mean `became`?"
    );
    // The same file on disk gives the same message at the same place through `validate`.
    std::fs::write(&rules, BAD).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate", rules.to_str().unwrap()])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        line,
        format!(
            "{}:5:11: error: {}",
            rules.display(),
            diagnostics[0]["message"].as_str().unwrap()
        )
    );

    // Fixed: no diagnostics.
    client.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2},
               "contentChanges": [{"text": BAD.replace("becomes", "became")}]}),
    );
    assert_eq!(client.diagnostics(&uri), Vec::<Value>::new());

    let completion = client.request(
        2,
        "textDocument/completion",
        json!({"textDocument": {"uri": uri}, "position": {"line": 4, "character": 10}}),
    );
    let labels: Vec<&str> = completion["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["label"].as_str())
        .collect();
    for expected in ["became", "changed_any", "event", "record", "enqueue-provisioning"] {
        assert!(labels.contains(&expected), "{expected} in {labels:?}");
    }

    let hover = client.request(
        3,
        "textDocument/hover",
        json!({"textDocument": {"uri": uri}, "position": {"line": 4, "character": 13}}),
    );
    let text = hover["result"]["contents"]["value"].as_str().unwrap_or_default();
    assert!(text.starts_with("`became(field, value)`: UPDATE"), "{hover}");

    // A config file: its own problems, at the key.
    let config = dir.path().join("config.yaml");
    let config_uri = format!("file://{}", config.display());
    client.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": config_uri, "languageId": "yaml", "version": 1,
               "text": "source: { kind: stdin }\nchannels:\n  orders: /topic/Orders\nrules: [orders.yaml]\n"}}),
    );
    let diagnostics = client.diagnostics(&config_uri);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0]["range"]["start"], json!({"line": 2, "character": 2}));
    assert!(
        diagnostics[0]["message"]
            .as_str()
            .unwrap()
            .contains("a channel starts with /data/")
    );

    let shutdown = client.request(4, "shutdown", Value::Null);
    assert!(shutdown.get("error").is_none(), "{shutdown}");
    client.notify("exit", Value::Null);
    // An editor closes the pipe once it has said `exit`.
    drop(client.stdin);
    let status = client.child.wait().unwrap();
    assert!(status.success(), "{status}");
}
