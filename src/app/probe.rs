//! `switchyard health`: the container's health check. The image has no curl, so the binary asks its own listener
//! for `/healthz` and turns the answer into an exit code.

use std::time::Duration;

use serde_json::Value;

/// Where `health` looks when neither `--url` nor `--config` is given: the port of the shipped configs and image.
pub const DEFAULT_BASE: &str = "http://127.0.0.1:9464";

/// The listener's base URL: `--url`, else the config's `http.listen`, else [`DEFAULT_BASE`].
pub fn base_url(url: Option<&str>, listen: Option<&str>) -> String {
    match (url, listen) {
        (Some(url), _) => url.trim_end_matches('/').trim_end_matches("/healthz").to_string(),
        (None, Some(listen)) => super::why::listener_url(listen),
        (None, None) => DEFAULT_BASE.to_string(),
    }
}

/// GET `<base>/healthz`: a one-line summary when it answers 200 with `"status": "ok"`, the reason otherwise.
pub async fn check(base: &str, timeout: Duration) -> Result<String, String> {
    let url = format!("{base}/healthz");
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("no answer from {url}: {}", reqwest_reason(&e)))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("{url} answered {status} with a body that is not JSON: {e}"))?;
    if !status.is_success() || body["status"] != "ok" {
        return Err(format!("{url} answered {status}: {body}"));
    }
    let channels = body["channels"]
        .as_object()
        .map(|channels| {
            channels
                .iter()
                // A state is a word (`streaming`) or an object (`{"stopped": why}`).
                .map(|(channel, state)| {
                    format!(
                        "{channel} {}",
                        state.as_str().map_or_else(|| state.to_string(), str::to_string)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    Ok(format!(
        "ok: {} {}, role {}, {} routes{}",
        body["version"].as_str().unwrap_or("?"),
        body["rules_version"].as_str().unwrap_or("?"),
        body["role"].as_str().unwrap_or("?"),
        body["routes"],
        if channels.is_empty() {
            String::new()
        } else {
            format!(", {channels}")
        }
    ))
}

/// The innermost cause (`Connection refused`), which is what a person reading a failed health check needs.
fn reqwest_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_comes_from_the_flag_then_the_config_then_the_image_default() {
        assert_eq!(
            base_url(Some("http://10.0.0.5:9000/healthz"), None),
            "http://10.0.0.5:9000"
        );
        assert_eq!(base_url(Some("http://h:1/"), Some("0.0.0.0:9")), "http://h:1");
        assert_eq!(base_url(None, Some("0.0.0.0:9465")), "http://127.0.0.1:9465");
        assert_eq!(base_url(None, None), DEFAULT_BASE);
    }

    #[tokio::test]
    async fn a_port_with_no_listener_is_a_failure_that_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = check(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.contains("no answer from") && err.contains("refused"), "{err}");
    }
}
