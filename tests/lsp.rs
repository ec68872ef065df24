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

/// The labels and details of a completion response.
fn completion_items(response: &Value) -> Vec<(String, String)> {
    response["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or_default().to_string();
            (s("label"), s("detail"))
        })
        .collect()
}

#[test]
fn with_the_config_s_avro_schemas_fields_complete_with_their_types_and_a_wrong_literal_is_a_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/avro");
    let config = dir.path().join("switchyard.yaml");
    std::fs::write(
        &config,
        format!(
            "source: {{ kind: stdin }}\nrules: [rules/]\nsinks: {{ log: {{ kind: log }} }}\navro_schemas: {}\n",
            schemas.display()
        ),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let rules = dir.path().join("rules/orders.yaml");
    std::fs::write(&rules, "version: 1\nroutes: []\n").unwrap();
    let uri = format!("file://{}", rules.display());
    let mut client = Client::start(&["--config", config.to_str().unwrap()]);
    client.request(
        1,
        "initialize",
        json!({"processId": null, "rootUri": null, "capabilities": {}}),
    );
    client.notify("initialized", json!({}));

    // Half typed: `event.`, `event.BillingAddress.` and `record.` (the file does not compile yet).
    let text = "version: 1\nroutes:\n  - name: other\n    channel: fulfilment-requests\n    when: 'true'\n    then: [{ sink: log, message: x }]\n  - name: provision\n    channel: orders\n    when: event.TotalAmount > \"100\" && event.\n    enrich: { object: Order, fields: [WHMCS_Order_ID__c, Status] }\n    guard: event.BillingAddress.Ci == record.\n    then:\n      - { sink: log, message: x }\n";
    client.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "yaml", "version": 1, "text": text}}),
    );
    client.diagnostics(&uri);
    let at = |id: u64, client: &mut Client, line: u32, character: u32| {
        let response = client.request(
            id,
            "textDocument/completion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character}}),
        );
        completion_items(&response)
    };
    let end_of = |line: usize| text.lines().nth(line).unwrap().len() as u32;
    let event = at(2, &mut client, 8, end_of(8));
    assert!(event.contains(&("TotalAmount".into(), "double".into())), "{event:?}");
    assert!(
        event.contains(&("Activation_Status__c".into(), "string".into())),
        "{event:?}"
    );
    assert!(
        !event.iter().any(|(l, _)| l == "became"),
        "only fields after `event.`: {event:?}"
    );
    let member = at(3, &mut client, 10, "    guard: event.BillingAddress.Ci".len() as u32);
    assert!(member.contains(&("City".into(), "string".into())), "{member:?}");
    assert!(member.contains(&("Latitude".into(), "double".into())), "{member:?}");
    let record = at(4, &mut client, 10, end_of(10));
    assert_eq!(
        record,
        [
            ("WHMCS_Order_ID__c".into(), "Order field: string".into()),
            ("Status".into(), "Order field: string".into())
        ],
        "the fields `enrich` reads"
    );

    // Completed: the literal of another type is the diagnostic `validate` gives with the config's schemas.
    let fixed = text
        .replace("&& event.\n", "&& event.Status == \"Activated\"\n")
        .replace(
            "event.BillingAddress.Ci == record.",
            "is_blank(record.WHMCS_Order_ID__c)",
        );
    client.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"text": fixed}]}),
    );
    let errors: Vec<Value> = client
        .diagnostics(&uri)
        .into_iter()
        .filter(|d| d["severity"] == 1)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["range"]["start"], json!({"line": 8, "character": 10}));
    assert!(
        errors[0]["message"].as_str().unwrap().contains(
            "`event.TotalAmount` is a `double` in the channel's Avro schema, but is compared with the string \"100\""
        ),
        "{errors:?}"
    );
    client.request(5, "shutdown", Value::Null);
    client.notify("exit", Value::Null);
    drop(client.stdin);
    assert!(client.child.wait().unwrap().success());
}

/// Neovim's own LSP client (`vim.lsp`), headless, is the editor: `tests/editor/nvim-lsp.lua` opens a rule file
/// with a typo, reads the diagnostics Neovim shows, fixes the line in the buffer and completes after `event.`.
/// Needs `nvim` (scripts/test installs Debian's neovim); without it the test is skipped loudly, unless
/// `SWITCHYARD_EDITOR_REQUIRED` is set (CI sets it): then it fails.
#[test]
fn neovim_shows_the_diagnostics_clears_them_on_the_fix_and_completes_fields() {
    if Command::new("nvim").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("SWITCHYARD_EDITOR_REQUIRED").is_none(),
            "nvim is missing; scripts/test installs Debian's neovim"
        );
        eprintln!("SKIPPED: nvim is missing (scripts/test installs it; CI requires it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    std::os::unix::fs::symlink(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/avro"),
        dir.path().join("schemas/avro"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let rules = dir.path().join("rules/orders.yaml");
    std::fs::write(&rules, BAD).unwrap();
    let out = dir.path().join("editor.json");
    let mut nvim = Command::new("nvim")
        .args(["--headless", "--clean", "-c"])
        .arg(format!(
            "luafile {}",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/editor/nvim-lsp.lua")
                .display()
        ))
        .env("SWITCHYARD", env!("CARGO_BIN_EXE_switchyard"))
        .env("RULES", &rules)
        .env("OUT", &out)
        .env_remove("SWITCHYARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = nvim.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            nvim.kill().ok();
            panic!("nvim did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let seen: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(seen.get("error").is_none(), "{seen}");
    assert_eq!(
        seen["diagnostics"],
        json!([{"lnum": 4, "col": 10, "severity": 1,
                "message": "route `provision`: `when`: unknown function `becomes`; did you mean `became`?"}]),
        "{seen}"
    );
    assert_eq!(seen["after_fix"], 0, "{seen}");
    let labels: Vec<&str> = seen["completion"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        labels.contains(&"Activation_Status__c") && labels.contains(&"TotalAmount"),
        "{labels:?}"
    );
}
