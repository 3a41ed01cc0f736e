//! Service resolution: from an APIService's `spec.service` to the addresses to dial.

use std::collections::HashMap;

use http::uri::Authority;

use crate::apiservice::ServiceReference;

/// Why a service has nowhere to send requests. Worded for the client; holds no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("service {namespace}/{name} not found")]
    ServiceNotFound { namespace: String, name: String },
    #[error("no service port {port} found for service {namespace}/{name}")]
    PortNotFound { namespace: String, name: String, port: u16 },
    #[error("no endpoints available for service {namespace}/{name}")]
    NoEndpoints { namespace: String, name: String },
    #[error("cannot route to service {namespace}/{name}: {reason}")]
    Unroutable { namespace: String, name: String, reason: String },
}

impl ResolveError {
    pub fn not_found(service: &ServiceReference) -> Self {
        Self::ServiceNotFound { namespace: service.namespace.to_string(), name: service.name.to_string() }
    }
}

/// Resolves a service reference to one or more `host:port` targets.
pub trait ServiceResolver: Send + Sync {
    fn resolve(&self, service: &ServiceReference) -> Result<Vec<Authority>, ResolveError>;
}

/// Standalone mode: a fixed map from `namespace/name:port` to one or more `host:port`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaticResolver {
    services: HashMap<String, Vec<Authority>>,
}

impl StaticResolver {
    pub fn new(services: HashMap<String, Vec<Authority>>) -> Self {
        Self { services }
    }
}

impl ServiceResolver for StaticResolver {
    fn resolve(&self, service: &ServiceReference) -> Result<Vec<Authority>, ResolveError> {
        self.services.get(&service.key()).cloned().ok_or_else(|| ResolveError::not_found(service))
    }
}
