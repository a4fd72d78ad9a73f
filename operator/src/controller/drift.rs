//! Drift: whether a live child already carries everything the builders want, compared the
//! way the API server stores objects (defaults added, empty maps and lists dropped, resource
//! quantities rewritten in canonical form). Only real differences lead to a write.

pub use crate::quantity::same_quantity;

/// Whether every field of `want` is present in `have` with the same value, as the API server
/// stores it (objects recursively, arrays element by element with equal length). The server
/// adds defaults and status, drops empty maps and lists, and rewrites resource quantities in
/// canonical form (`0.5` becomes `500m`, `1.5Gi` becomes `1536Mi`); none of that is drift.
pub fn is_subset(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    subset_at("", want, have)
}

/// [`is_subset`] for the value found under the object key `key`.
fn subset_at(key: &str, want: &serde_json::Value, have: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => {
            let quantities = matches!(key, "limits" | "requests");
            w.iter().all(|(k, v)| match (h.get(k), v) {
                (None | Some(Value::Null), v) => is_empty(v),
                (Some(Value::String(hv)), Value::String(wv)) if quantities || k == "sizeLimit" => {
                    same_quantity(wv, hv)
                }
                (Some(hv), v) => subset_at(k, v, hv),
            })
        }
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| subset_at(key, a, b))
        }
        _ => want == have,
    }
}

/// Values the API server omits when stored: `null`, `{}` and `[]`.
fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(o) => o.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_are_not_drift_but_changed_values_are() {
        let want = json!({"spec": {"ports": [{"port": 80}], "type": "ClusterIP"}});
        let have = json!({"spec": {"ports": [{"port": 80, "protocol": "TCP"}], "type": "ClusterIP", "clusterIP": "10.0.0.1"}});
        assert!(is_subset(&want, &have));
        let edited = json!({"spec": {"ports": [{"port": 81}], "type": "ClusterIP"}});
        assert!(!is_subset(&want, &edited));
        let extra_port =
            json!({"spec": {"ports": [{"port": 80}, {"port": 90}], "type": "ClusterIP"}});
        assert!(!is_subset(&want, &extra_port));
    }

    #[test]
    fn quantities_in_canonical_form_and_dropped_empty_maps_are_not_drift() {
        // Without this a spec with `cpu: "0.5"` re-applied its Deployments every pass and
        // never became Ready, because the server stores `500m`.
        let want = json!({"resources": {"requests": {"cpu": "0.5", "memory": "1.5Gi"}, "limits": {}},
            "volumes": [{"emptyDir": {"sizeLimit": "1G"}}], "nodeSelector": {}});
        let have = json!({"resources": {"requests": {"cpu": "500m", "memory": "1536Mi"}},
            "volumes": [{"emptyDir": {"sizeLimit": "1e9"}}]});
        assert!(is_subset(&want, &have));
        let raised = json!({"resources": {"requests": {"cpu": "600m", "memory": "1536Mi"}},
            "volumes": [{"emptyDir": {"sizeLimit": "1G"}}]});
        assert!(!is_subset(&want, &raised));
        // Only quantity fields compare by amount; other strings compare as written.
        assert!(!is_subset(
            &json!({"env": {"value": "0.5"}}),
            &json!({"env": {"value": "500m"}})
        ));
    }
}
