//! kube-aggregation-proxy: the Kubernetes API aggregation layer as a standalone proxy.
//!
//! ```text
//!  sources ──snapshots──▶ routing::writer ──ArcSwap──▶ RoutingTable
//!  (files | cluster)       (single writer)                  │ load_full() per request
//!                                                           ▼
//!  client ─TLS─▶ server ─▶ authenticate ─▶ strip identity ─▶ route ─▶ proxy::forward ─▶ backend::send
//!                (rustls,   (x509, tokens,   (X-Remote-*,              (X-Remote-* set)   (P2C pick, stream-aware
//!                 limits)    front proxy)     Impersonate-*)                                pools, retry) ─▶ server
//! ```
//!
//! Module map, named as kube-aggregator names things: [`apiservice`] (model, validation,
//! ordering), [`source`] (where APIServices come from), [`routing`] (the table and its writer,
//! service resolution), [`server`] (TLS front end and the request pipeline), [`auth`]
//! (authenticators, identity headers, TokenReview and SubjectAccessReview in cluster mode),
//! [`proxy`] (forwarding, protocol switches), [`backend`] (the one way out: endpoints,
//! stream-aware connection pools, balancing and ejection, backend TLS), [`availability`] (probes and
//! the `Available` condition), [`check`] (the troubleshooting command), [`compare`] (two kubeconfigs side by side), [`testbed`] (a real control plane on loopback),
//! [`discovery`] (`/apis`, aggregated discovery v2 and OpenAPI v2/v3, fetched in the
//! background), [`status`] (errors as Kubernetes `Status`), [`metrics`], [`audit`] (kube's audit events), [`telemetry`] (OpenTelemetry tracing), [`runtime`] (work-stealing or per-core), [`config`], [`app`]
//! (wiring), [`demo`], [`pki`] and [`tls`] (certificates). The sample extension API server
//! is part of the [`testbed`], not of the proxy.
#![forbid(unsafe_code)]

pub mod apiservice;
pub mod app;
pub mod audit;
pub mod auth;
pub mod availability;
pub mod backend;
pub mod check;
pub mod compare;
pub mod config;
#[cfg(feature = "testbed")]
pub mod demo;
pub mod discovery;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod source;
pub mod status;
pub mod telemetry;
#[cfg(feature = "testbed")]
pub mod testbed;
pub mod tls;
