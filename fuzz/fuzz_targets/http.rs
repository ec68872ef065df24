//! The HTTP listener's router (every route of `/api`, `/ui`, the probes, behind the access guard) on the embedded
//! demo's in-memory service, with a token configured: any method, path, query, headers and body get a response,
//! never a panic. The input's first line is `METHOD PATH`, then header lines, an empty line, and the body.
#![no_main]
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use switchyard::app::http::{AppState, access::Access, router};
use switchyard::app::service::Service;
use switchyard::config::{HttpConfig, LoadedConfig, Secret};

struct Target {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
}

static TARGET: LazyLock<Target> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(async {
        let loaded = LoadedConfig::demo().expect("the embedded demo config loads");
        let service = Service::start(loaded, true).await.expect("the embedded demo starts");
        let state = AppState {
            reloader: service.reloader.clone(),
            metrics: switchyard::obs::metrics::install(),
            main_redis: None,
            sink_redis: service.sinks.redis_checks.clone(),
            channels: service.channels.clone(),
            ops: service.ops(),
            instance: "fuzz".into(),
            started: std::time::Instant::now(),
            sparks: Default::default(),
        };
        let http = HttpConfig {
            listen: "127.0.0.1:9464".into(),
            token: Some(Secret::new("fuzz-token-0123456789abcdef")),
            allow_unauthenticated: false,
        };
        let access = Access::new(&http, "127.0.0.1:9464".parse().unwrap()).unwrap();
        router(state, Arc::new(access))
    });
    Target { runtime, app }
});

fuzz_target!(|data: &[u8]| {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let mut lines = head.lines();
    let Some((method, path)) = lines.next().and_then(|l| l.split_once(' ')) else {
        return;
    };
    let mut request = axum::http::Request::builder().method(method).uri(path);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            request = request.header(name.trim(), value.trim());
        }
    }
    let Ok(request) = request.body(axum::body::Body::from(body.to_vec())) else {
        return;
    };
    let target = &*TARGET;
    let mut app = target.app.clone();
    target.runtime.block_on(async move {
        if let Ok(response) = tower_service::Service::call(&mut app, request).await {
            // The tap never ends: read the head only.
            let _ = response.status();
        }
    });
});
