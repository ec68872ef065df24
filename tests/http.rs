//! The HTTP listener as a client (or an attacker) meets it: `switchyard run` in its own process, spoken to over
//! raw TCP on loopback. Changes need the bearer token and refuse cross-site requests, GET and large bodies; a
//! listener other machines reach needs a token to start at all and then asks it for reads too; many clients,
//! slow ones included, leave the probes answering. No Redis: every store is in memory.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

const TOKEN: &str = "http-test-token-0123456789abcdef";

/// A config that follows an empty events file and listens at `http` (the inside of `http: { ... }`).
fn config(dir: &Path, http: &str) -> PathBuf {
    let events = dir.join("events.jsonl");
    std::fs::write(&events, "").unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "source:\n  kind: jsonl\n  jsonl: {{ path: {}, follow: true }}\nrules: [{}]\nsinks:\n  \
             enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
             invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\nenricher: recorded\n\
             http: {{ {http} }}\n",
            events.display(),
            common::repo().join("rules").display(),
        ),
    )
    .unwrap();
    path
}

/// `switchyard run` killed when the test ends, however it ends.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(config: &Path, log: &Path) -> Service {
    Service(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--config"])
            .arg(config)
            .env("SWITCHYARD_HTTP_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// One request with `Connection: close`; the whole response (status line, headers, body).
fn request(port: u16, head: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    // A server that refuses early may close while the body is still going out.
    let _ = stream.write_all(body);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `METHOD path` with `headers` (CRLF-terminated lines) and no body.
fn call(port: u16, method: &str, path: &str, headers: &str) -> String {
    request(
        port,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        b"",
    )
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

fn wait_until_up(port: u16, service: &mut Service, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = service.0.try_wait().unwrap() {
            panic!("switchyard ended ({status}): {}", std::fs::read_to_string(log).unwrap());
        }
        assert!(Instant::now() < deadline, "no listener on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn reloads(port: u16) -> u64 {
    let rules = call(port, "GET", "/rules", &bearer(TOKEN));
    let body = rules.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {rules}"));
    v["reloads"].as_u64().unwrap()
}

#[test]
fn changes_need_the_token_and_refuse_cross_site_requests_get_and_large_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config(
        dir.path(),
        &format!("listen: \"127.0.0.1:{port}\", token: \"${{SWITCHYARD_HTTP_TOKEN}}\""),
    );
    let log = dir.path().join("run.log");
    let mut service = start(&config, &log);
    wait_until_up(port, &mut service, &log);

    // On loopback the reads and the probes are open.
    assert!(call(port, "GET", "/rules", "").starts_with("HTTP/1.1 200"));
    assert!(call(port, "GET", "/healthz", "").starts_with("HTTP/1.1 200"));
    let before = reloads(port);

    let none = call(port, "POST", "/reload", "");
    assert!(none.starts_with("HTTP/1.1 401"), "{none}");
    assert!(none.to_ascii_lowercase().contains("www-authenticate: bearer"), "{none}");
    let wrong = call(port, "POST", "/reload", &bearer("http-test-token-0123456789abcdeF"));
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let basic = call(port, "POST", "/reload", &format!("Authorization: Basic {TOKEN}\r\n"));
    assert!(basic.starts_with("HTTP/1.1 401"), "{basic}");
    // A page on another site that got the token still cannot make a browser change anything.
    let origin = call(
        port,
        "POST",
        "/reload",
        &format!("{}Origin: https://evil.example\r\n", bearer(TOKEN)),
    );
    assert!(
        origin.starts_with("HTTP/1.1 403") && origin.contains("cross-site"),
        "{origin}"
    );
    let fetch = call(
        port,
        "POST",
        "/reload",
        &format!("{}Sec-Fetch-Site: cross-site\r\n", bearer(TOKEN)),
    );
    assert!(fetch.starts_with("HTTP/1.1 403"), "{fetch}");
    let get = call(port, "GET", "/reload", &bearer(TOKEN));
    assert!(get.starts_with("HTTP/1.1 405"), "{get}");
    // 10 MB declared: refused before a byte of it is read.
    let declared = request(
        port,
        &format!(
            "POST /reload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{}Content-Length: 10485760\r\nConnection: close\r\n\r\n",
            bearer(TOKEN)
        ),
        &[b'x'; 65_536],
    );
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    // 100 KB chunked (no length declared): cut off at the cap.
    let chunk = format!("{:x}\r\n{}\r\n", 1024, "y".repeat(1024));
    let chunked = request(
        port,
        &format!(
            "POST /reload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            bearer(TOKEN)
        ),
        format!("{}0\r\n\r\n", chunk.repeat(100)).as_bytes(),
    );
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert_eq!(reloads(port), before, "no refused request reloaded anything");

    let same_origin = format!(
        "{}Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\n",
        bearer(TOKEN)
    );
    let ok = call(port, "POST", "/reload", &same_origin);
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("\"ok\":true"), "{ok}");
    assert_eq!(reloads(port), before + 1);

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("HTTP request refused"), "refusals are logged: {logged}");
    assert!(
        !logged.contains(TOKEN) && !logged.contains("0123456789abcde"),
        "the token never reaches the log"
    );
}

/// `POST path` with a JSON body and `headers`.
fn post(port: u16, path: &str, headers: &str, body: &str) -> String {
    request(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ),
        body.as_bytes(),
    )
}

fn json_body(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

/// What the API's changes may touch: the dead letters, the paused routes, the reload count.
fn api_state(port: u16) -> (usize, Vec<String>, u64) {
    let letters = json_body(&call(port, "GET", "/api/dead-letters", ""));
    let overview = json_body(&call(port, "GET", "/api/overview", ""));
    let paused = overview["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["paused"].is_null())
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    (letters.as_array().unwrap().len(), paused, reloads(port))
}

#[test]
fn every_change_of_the_api_and_the_console_needs_the_token_and_without_it_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config(
        dir.path(),
        &format!("listen: \"127.0.0.1:{port}\", token: \"${{SWITCHYARD_HTTP_TOKEN}}\""),
    );
    let log = dir.path().join("run.log");
    let mut service = start(&config, &log);
    wait_until_up(port, &mut service, &log);
    // A line that is not an event: one dead letter to retry or purge.
    std::fs::write(dir.path().join("events.jsonl"), "{not json\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while api_state(port).0 != 1 {
        assert!(
            Instant::now() < deadline,
            "no dead letter: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let route = "provision-on-activating";
    let pause = format!("/api/routes/{route}/pause");
    let resume = format!("/api/routes/{route}/resume");
    let changes: [(&str, &str); 6] = [
        ("/api/reload", ""),
        ("/reload", ""),
        ("/api/dead-letters/retry", r#"{"all": true}"#),
        ("/api/dead-letters/purge", r#"{"all": true}"#),
        (&pause, ""),
        (&resume, ""),
    ];
    let before = api_state(port);
    assert_eq!(before.1, Vec::<String>::new());
    for (path, body) in changes {
        let none = post(port, path, "", body);
        assert!(none.starts_with("HTTP/1.1 401"), "{path} without the token: {none}");
        let wrong = post(port, path, &bearer("console-wrong-token-0123456789abc"), body);
        assert!(wrong.starts_with("HTTP/1.1 401"), "{path} with a wrong token: {wrong}");
        let cross = post(
            port,
            path,
            &format!("{}Origin: http://evil.example\r\n", bearer(TOKEN)),
            body,
        );
        assert!(cross.starts_with("HTTP/1.1 403"), "{path} cross-site: {cross}");
        let get = call(port, "GET", path, &bearer(TOKEN));
        assert!(get.starts_with("HTTP/1.1 405"), "GET {path}: {get}");
        assert_eq!(api_state(port), before, "a refused {path} changed nothing");
    }

    // With the token: the same operations as the CLI.
    let paused = post(port, &pause, &bearer(TOKEN), "");
    assert!(paused.starts_with("HTTP/1.1 200"), "{paused}");
    assert_eq!(api_state(port).1, vec![route.to_string()]);
    let refused = post(port, &resume, "", "");
    assert!(refused.starts_with("HTTP/1.1 401"));
    assert_eq!(api_state(port).1, vec![route.to_string()], "still paused");
    let resumed = post(port, &resume, &bearer(TOKEN), "");
    assert!(
        resumed.starts_with("HTTP/1.1 200") && resumed.contains("resumed"),
        "{resumed}"
    );
    assert_eq!(api_state(port).1, Vec::<String>::new());
    // A malformed line cannot be retried (it is not an event): said so, and kept.
    let retried = post(port, "/api/dead-letters/retry", &bearer(TOKEN), r#"{"all": true}"#);
    assert!(
        retried.starts_with("HTTP/1.1 409") && retried.contains("undecodable"),
        "{retried}"
    );
    assert_eq!(api_state(port).0, 1);
    let bad = post(port, "/api/dead-letters/purge", &bearer(TOKEN), r#"{"everything": 1}"#);
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let id = json_body(&call(port, "GET", "/api/dead-letters", ""))[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let shown = call(port, "GET", &format!("/api/dead-letters/{id}"), "");
    assert!(
        shown.starts_with("HTTP/1.1 200") && shown.contains("not json"),
        "{shown}"
    );
    let purged = post(
        port,
        "/api/dead-letters/purge",
        &bearer(TOKEN),
        &format!(r#"{{"ids": ["{id}"]}}"#),
    );
    assert!(
        purged.starts_with("HTTP/1.1 200") && purged.contains("purged 1"),
        "{purged}"
    );
    assert_eq!(api_state(port).0, 0);

    // Explaining an event changes nothing: a read, open on loopback, still same-site only.
    let event = std::fs::read_to_string(common::repo().join("examples/events/order-lifecycle.jsonl")).unwrap();
    let event = event.lines().next().unwrap();
    let explained = post(port, "/api/explain", "", event);
    assert!(
        explained.starts_with("HTTP/1.1 200") && explained.contains(route),
        "{explained}"
    );
    let cross = post(port, "/api/explain", "Sec-Fetch-Site: cross-site\r\n", event);
    assert!(cross.starts_with("HTTP/1.1 403"), "{cross}");
    let not_event = post(port, "/api/explain", "", "{\"id\": 1}");
    assert!(
        not_event.starts_with("HTTP/1.1 400") && not_event.contains("not an event"),
        "{not_event}"
    );
    // The console's pages read on loopback without a token.
    for page in [
        "/ui",
        "/ui/decisions?id=801",
        "/ui/dead-letters",
        "/ui/rules",
        "/ui/try",
    ] {
        let got = call(port, "GET", page, "");
        assert!(
            got.starts_with("HTTP/1.1 200") && got.contains("switchyard"),
            "{page}: {got}"
        );
    }
}

#[test]
fn a_listener_other_machines_reach_needs_a_token_to_start_and_then_for_reads() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();

    // No token: the config is refused where the listener is named, and nothing listens.
    let config_path = config(dir.path(), &format!("listen: \"0.0.0.0:{port}\""));
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    let at = format!("{}:10:", config_path.display());
    assert!(said.contains(&at) && said.contains("http.token"), "{said}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    let validate = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!validate.status.success(), "`validate` catches it before a deploy");

    // With a token: reads need it too, the probes do not.
    let config_path = config(
        dir.path(),
        &format!("listen: \"0.0.0.0:{port}\", token: \"${{SWITCHYARD_HTTP_TOKEN}}\""),
    );
    let log = dir.path().join("run.log");
    let mut service = start(&config_path, &log);
    wait_until_up(port, &mut service, &log);
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert!(
            call(port, "GET", path, "").starts_with("HTTP/1.1 200"),
            "{path} stays open"
        );
    }
    for path in [
        "/rules",
        "/api/journal?id=801",
        "/api/tap",
        "/api/overview",
        "/api/dead-letters",
        "/nowhere",
    ] {
        let refused = call(port, "GET", path, "");
        assert!(refused.starts_with("HTTP/1.1 401"), "{path}: {refused}");
    }
    let explain = post(port, "/api/explain", "", "{}");
    assert!(explain.starts_with("HTTP/1.1 401"), "{explain}");
    assert!(call(port, "GET", "/rules", &bearer(TOKEN)).starts_with("HTTP/1.1 200"));
    // A browser's navigation carries no token: the console answers with its sign-in page, which asks for it
    // and keeps it in the tab (its script and stylesheet are served to anyone).
    for page in ["/ui", "/ui/dead-letters"] {
        let sign_in = call(port, "GET", page, "");
        assert!(
            sign_in.starts_with("HTTP/1.1 401") && sign_in.contains("This console needs the token"),
            "{page}: {sign_in}"
        );
        assert!(!sign_in.contains("Dead letters</h1>"), "nothing of the page itself");
        let page = call(port, "GET", page, &bearer(TOKEN));
        assert!(page.starts_with("HTTP/1.1 200") && page.contains("<nav>"), "{page}");
    }
    let script = call(port, "GET", "/ui/assets/console.js", "");
    assert!(
        script.starts_with("HTTP/1.1 200") && script.contains("sessionStorage"),
        "{script}"
    );
    drop(service);

    // The explicit opt-out: reads open to all, changes still refused (there is no token to give).
    let port = free_port();
    let config_path = config(
        dir.path(),
        &format!("listen: \"0.0.0.0:{port}\", allow_unauthenticated: true"),
    );
    let mut service = start(&config_path, &log);
    wait_until_up(port, &mut service, &log);
    assert!(call(port, "GET", "/rules", "").starts_with("HTTP/1.1 200"));
    let change = call(port, "POST", "/reload", &bearer("anything-at-all-0123456789"));
    assert!(
        change.starts_with("HTTP/1.1 403") && change.contains("http.token"),
        "{change}"
    );
}

#[test]
fn many_and_slow_clients_leave_the_probes_answering_and_slow_ones_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config(dir.path(), &format!("listen: \"127.0.0.1:{port}\""));
    let log = dir.path().join("run.log");
    let mut service = start(&config, &log);
    wait_until_up(port, &mut service, &log);

    // 500 clients that connect and send half a request line, then nothing.
    let mut slow: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /healthz HT").unwrap();
            s
        })
        .collect();
    // And 500 that come and go at the same time.
    let busy: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                (0..125)
                    .filter(|_| call(port, "GET", "/healthz", "").starts_with("HTTP/1.1 200"))
                    .count()
            })
        })
        .collect();
    let started = Instant::now();
    assert!(call(port, "GET", "/healthz", "").starts_with("HTTP/1.1 200"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "healthz took {:?}",
        started.elapsed()
    );
    let served: usize = busy.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(served, 500);

    // The header timeout (10 s) closes the slow ones: a read sees the end of the stream (or a reset).
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    let mut buf = [0u8; 512];
    let closed = slow
        .iter_mut()
        .take(20)
        .map(|s| match s.read(&mut buf) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
        })
        .filter(|&closed| closed)
        .count();
    assert_eq!(closed, 20, "every slow client was closed");
    assert!(call(port, "GET", "/healthz", "").starts_with("HTTP/1.1 200"));
}
