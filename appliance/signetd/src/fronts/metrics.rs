//! Prometheus metrics over plain HTTP: `GET /metrics` on the `[metrics] listen`
//! endpoints (loopback by default), served by the same bounded listeners as the client
//! API ([`crate::serve`]). The text is [`crate::services::scrape::exposition`]'s; what
//! each metric means is in docs/METRICS.md. Signing does not depend on it: an endpoint
//! that cannot be bound is logged with the fix and left out.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use signet_protocol::endpoint::Endpoint;
use signet_protocol::transport::Listener;

use crate::config::MetricsConfig;
use crate::services::daemon::Daemon;
use crate::services::metrics::CONTENT_TYPE;
use crate::services::supervise::Supervisor;

/// Connections one metrics listener serves at once: a scraper or two, and a person.
pub const MAX_CONNECTIONS: usize = 16;

/// Why an endpoint of `[metrics] listen` is not served.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {endpoint} for the metrics: {message}; free the port, change [metrics] listen, or set [metrics] enabled = false")]
pub struct ListenError {
    pub endpoint: String,
    pub message: String,
}

/// `GET /metrics`; every other path is not found.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(daemon)
}

async fn scrape(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    let text = crate::services::scrape::exposition(&daemon).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}

/// Binds each endpoint of `cfg`; those that cannot be bound are answered as errors.
pub async fn bind(cfg: &MetricsConfig) -> Vec<Result<(Listener, Endpoint), ListenError>> {
    let mut out = Vec::new();
    for ep in &cfg.listen {
        let err = |message: String| ListenError {
            endpoint: ep.to_string(),
            message,
        };
        let bound = match Listener::bind(ep).await {
            Ok(l) => l
                .local_endpoint()
                .map(|local| (l, local))
                .map_err(|e| err(e.to_string())),
            Err(e) => Err(err(e.to_string())),
        };
        out.push(bound);
    }
    out
}

/// Serves the metrics on `cfg`'s endpoints until `stop`, as tasks of `tasks`; logs
/// each endpoint served (`serving metrics endpoint=…`), and each that cannot be at
/// error with the fix, and a warning for each beyond loopback. Nothing when
/// `enabled = false`.
pub async fn start(
    daemon: Arc<Daemon>,
    cfg: &MetricsConfig,
    header_timeout: Duration,
    stop: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut Supervisor,
) {
    if !cfg.enabled {
        tracing::info!("metrics are not served ([metrics] enabled = false)");
        return;
    }
    for ep in cfg.beyond_loopback() {
        tracing::warn!(endpoint = %ep, "the metrics are served beyond loopback: whoever reaches this endpoint reads them (no login); keep it behind a firewall that admits only the Prometheus server");
    }
    let app = router(daemon);
    for bound in bind(cfg).await {
        match bound {
            Ok((l, local)) => {
                tracing::info!(endpoint = %local, "serving metrics");
                tasks.spawn_until_stop(
                    format!("metrics server on {local}"),
                    crate::serve::serve(
                        l,
                        app.clone(),
                        header_timeout,
                        MAX_CONNECTIONS,
                        None,
                        stop.clone(),
                    ),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "the metrics are not served there; signing goes on without them")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn daemon(dir: &std::path::Path) -> Arc<Daemon> {
        let cfg = crate::config::Config::parse(
            &dir.join("signetd.toml"),
            &format!(
                "agent = \"unix:{0}/agent.sock\"\nstate_dir = \"{0}/state\"\ndbus = \"none\"\n[profiles.release]\n[queue]\nspool_quota_mb = 3\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        Arc::new(Daemon::open(cfg).unwrap())
    }

    async fn get(app: Router, method: &str, uri: &str) -> (u16, Option<String>, String) {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn get_metrics_answers_the_exposition_and_nothing_else_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let app = router(daemon(dir.path()));
        let (status, ct, text) = get(app.clone(), "GET", "/metrics").await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(ct.as_deref(), Some(CONTENT_TYPE));
        for want in [
            "signet_agent_up 0",
            "signet_jobs_live{state=\"queued\"} 0",
            "signet_spool_quota_bytes 3145728",
            "signet_pin_state{state=\"unknown\"} 1",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} in\n{text}");
        }
        assert_eq!(get(app.clone(), "GET", "/").await.0, 404);
        assert_eq!(get(app.clone(), "GET", "/v1/status").await.0, 404);
        assert_eq!(get(app, "POST", "/metrics").await.0, 405);
    }

    #[tokio::test]
    async fn an_endpoint_in_use_is_an_error_that_names_the_fix_and_the_others_are_bound() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let cfg = MetricsConfig {
            enabled: true,
            listen: vec![
                format!("tcp:127.0.0.1:{port}").parse().unwrap(),
                "tcp:127.0.0.1:0".parse().unwrap(),
            ],
        };
        let bound = bind(&cfg).await;
        let e = bound[0].as_ref().err().unwrap().to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("enabled = false"),
            "{e}"
        );
        let Ok((_, Endpoint::Tcp { port, .. })) = &bound[1] else {
            panic!("the free endpoint is bound")
        };
        assert_ne!(*port, 0, "the port the system chose is named");
    }
}
