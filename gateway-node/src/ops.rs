//! Ops endpoints on their own listener, so probes and scrapes never queue behind tunnel traffic.

use actix_web::{web, HttpResponse};

use crate::node::{NodeState, Phase};

/// Registers `/healthz`, `/readyz` and `/metrics`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(|| async { HttpResponse::Ok().body("ok\n") }))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

/// Ready when serving and the store answers; a draining node says so, so a load balancer stops
/// sending it work.
async fn readyz(node: web::Data<NodeState>) -> HttpResponse {
    match node.phase() {
        Phase::Ready => {}
        p => return HttpResponse::ServiceUnavailable().body(format!("{p:?}\n").to_lowercase()),
    }
    match node.store.ping().await {
        Ok(()) => HttpResponse::Ok().body("ready\n"),
        Err(e) => {
            tracing::warn!(error = %e, "readyz: store unreachable");
            HttpResponse::ServiceUnavailable().body("store unreachable\n")
        }
    }
}

async fn metrics(node: web::Data<NodeState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(node.metrics.render())
}
