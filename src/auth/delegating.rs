//! Authentication settings read from the cluster, as extension API servers read them: the
//! `kube-system/extension-apiserver-authentication` ConfigMap that kube-apiserver publishes
//! holds its client CA and its front-proxy (requestheader) CA, header names and allowed names.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use super::requestheader::RequestHeaderConfig;
use super::x509::ChainVerifier;

pub const AUTHENTICATION_CONFIGMAP: &str = "extension-apiserver-authentication";
pub const AUTHENTICATION_NAMESPACE: &str = "kube-system";

/// What the ConfigMap provides; either part may be absent.
#[derive(Default)]
pub struct ClusterAuthentication {
    pub client_ca: Option<ChainVerifier>,
    pub requestheader: Option<RequestHeaderConfig>,
}

fn json_list(data: &std::collections::BTreeMap<String, String>, key: &str) -> Result<Option<Vec<String>>, String> {
    data.get(key).map(|v| serde_json::from_str(v).map_err(|e| format!("{key}: {e}"))).transpose()
}

/// Reads the ConfigMap. Missing keys leave their part out; malformed ones are errors.
pub async fn load(client: Client) -> Result<ClusterAuthentication, String> {
    let what = format!("configmap {AUTHENTICATION_NAMESPACE}/{AUTHENTICATION_CONFIGMAP}");
    let map = Api::<ConfigMap>::namespaced(client, AUTHENTICATION_NAMESPACE)
        .get(AUTHENTICATION_CONFIGMAP)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let data = map.data.unwrap_or_default();
    let client_ca = data
        .get("client-ca-file")
        .map(|pem| ChainVerifier::from_pem(pem.as_bytes(), &format!("{what}: client-ca-file")))
        .transpose()
        .map_err(|e| e.to_string())?;
    let requestheader = match data.get("requestheader-client-ca-file") {
        None => None,
        Some(pem) => {
            let verifier = ChainVerifier::from_pem(pem.as_bytes(), &format!("{what}: requestheader-client-ca-file"))
                .map_err(|e| e.to_string())?;
            let allowed = json_list(&data, "requestheader-allowed-names")?.unwrap_or_default();
            let mut config = RequestHeaderConfig::with_default_headers(verifier, allowed);
            let lists = [
                ("requestheader-username-headers", &mut config.username_headers),
                ("requestheader-uid-headers", &mut config.uid_headers),
                ("requestheader-group-headers", &mut config.group_headers),
                ("requestheader-extra-headers-prefix", &mut config.extra_headers_prefix),
            ];
            for (key, field) in lists {
                if let Some(list) = json_list(&data, key)? {
                    *field = list;
                }
            }
            Some(config)
        }
    };
    Ok(ClusterAuthentication { client_ca, requestheader })
}
