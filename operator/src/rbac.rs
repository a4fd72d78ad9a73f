//! `vm-operator rbac`: the exact RBAC rules the operator needs, as a ClusterRole, so the Helm
//! chart can be checked against it. A test replays the requests of the mocked-API scenarios
//! against these rules, so a new kind of request fails until the rule is added here.
//!
//! `vm-operator run` checks these rules with SelfSubjectAccessReviews at start-up and
//! refuses to start when one is missing: an RBAC gap otherwise fails silently (a list
//! allowed but a watch denied).
//!
//! With `--namespace` the same rules can be bound with a RoleBinding instead (the Lease
//! rule is needed in the operator's own namespace either way).

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const READ: &[&str] = &["get", "list", "watch"];

/// (API group, resources, verbs) the operator uses.
pub const RULES: &[(&str, &[&str], &[&str])] = &[
    ("webapp.vm.dev", &["vmwebapps"], READ),
    (
        "webapp.vm.dev",
        &["vmwebapps/status"],
        &["get", "patch", "update"],
    ),
    (
        "",
        &["configmaps", "services", "serviceaccounts"],
        &["get", "list", "watch", "create", "patch"],
    ),
    // Read only: the operator hashes referenced keys and never writes Secrets.
    ("", &["secrets"], READ),
    (
        "apps",
        &["deployments"],
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "batch",
        &["jobs", "cronjobs"],
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "policy",
        &["poddisruptionbudgets"],
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "autoscaling",
        &["horizontalpodautoscalers"],
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("events.k8s.io", &["events"], &["create", "patch"]),
    (
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "patch", "update"],
    ),
];

/// The rules as a ClusterRole named `name`.
pub fn cluster_role(name: &str) -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(
            RULES
                .iter()
                .map(|(group, resources, verbs)| PolicyRule {
                    api_groups: Some(vec![(*group).to_owned()]),
                    resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
                    verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
                    ..PolicyRule::default()
                })
                .collect(),
        ),
        aggregation_rule: None,
    }
}

/// Ask the API server (SelfSubjectAccessReview) whether this process holds every rule;
/// returns the missing ones as `verb group/resource`. Resources are checked in
/// `watch_namespace` (every namespace when `None`); Leases only in `lease_namespace`, and
/// not at all without leader election.
pub async fn missing_permissions(
    client: kube::Client,
    watch_namespace: Option<&str>,
    lease_namespace: Option<&str>,
) -> Result<Vec<String>, kube::Error> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let reviews: kube::Api<SelfSubjectAccessReview> = kube::Api::all(client);
    let mut missing = Vec::new();
    for (group, resources, verbs) in RULES {
        let namespace = if *group == "coordination.k8s.io" {
            match lease_namespace {
                Some(ns) => Some(ns),
                None => continue,
            }
        } else {
            watch_namespace
        };
        for resource in *resources {
            let (resource, subresource) = match resource.split_once('/') {
                Some((r, sub)) => (r, Some(sub.to_owned())),
                None => (*resource, None),
            };
            for verb in *verbs {
                let review = SelfSubjectAccessReview {
                    spec: SelfSubjectAccessReviewSpec {
                        resource_attributes: Some(ResourceAttributes {
                            group: Some((*group).to_owned()),
                            resource: Some(resource.to_owned()),
                            subresource: subresource.clone(),
                            verb: Some((*verb).to_owned()),
                            namespace: namespace.map(str::to_owned),
                            ..ResourceAttributes::default()
                        }),
                        ..SelfSubjectAccessReviewSpec::default()
                    },
                    ..SelfSubjectAccessReview::default()
                };
                let answer = reviews
                    .create(&kube::api::PostParams::default(), &review)
                    .await?;
                if !answer.status.is_some_and(|s| s.allowed) {
                    let sub = subresource
                        .as_deref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default();
                    missing.push(format!("{verb} {group}/{resource}{sub}"));
                }
            }
        }
    }
    Ok(missing)
}

/// Whether the rules allow `verb` on `resource` (with subresource, e.g. `vmwebapps/status`)
/// in `group`.
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    RULES
        .iter()
        .any(|(g, rs, vs)| *g == group && rs.contains(&resource) && vs.contains(&verb))
}

/// The (group, resource, verb) of a namespaced API request path and HTTP method.
pub fn classify(method: &str, path: &str) -> Option<(String, String, &'static str)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => return None,
    };
    let resource = match rest {
        ["namespaces", _, resource] | ["namespaces", _, resource, _] => (*resource).to_owned(),
        ["namespaces", _, resource, _, sub] => format!("{resource}/{sub}"),
        _ => return None,
    };
    let verb = match method {
        "GET" => "get",
        "POST" => "create",
        "PATCH" => "patch",
        "PUT" => "update",
        "DELETE" => "delete",
        _ => return None,
    };
    Some((group, resource, verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_are_classified_by_group_resource_and_verb() {
        assert_eq!(
            classify(
                "PATCH",
                "/apis/webapp.vm.dev/v1alpha1/namespaces/a/vmwebapps/x/status"
            ),
            Some(("webapp.vm.dev".into(), "vmwebapps/status".into(), "patch"))
        );
        assert_eq!(
            classify("GET", "/api/v1/namespaces/a/secrets/db"),
            Some((String::new(), "secrets".into(), "get"))
        );
        assert_eq!(
            classify("POST", "/apis/events.k8s.io/v1/namespaces/a/events"),
            Some(("events.k8s.io".into(), "events".into(), "create"))
        );
    }

    #[test]
    fn every_kind_the_controller_watches_can_be_listed_and_watched() {
        // Mirrors `controller::run`: the primary kind, the owned kinds and Secrets.
        let watched = [
            ("webapp.vm.dev", "vmwebapps"),
            ("apps", "deployments"),
            ("batch", "jobs"),
            ("batch", "cronjobs"),
            ("", "configmaps"),
            ("", "services"),
            ("", "serviceaccounts"),
            ("policy", "poddisruptionbudgets"),
            ("autoscaling", "horizontalpodautoscalers"),
            ("", "secrets"),
        ];
        for (group, resource) in watched {
            for verb in ["list", "watch"] {
                assert!(allows(group, resource, verb), "{verb} {group}/{resource}");
            }
        }
    }

    #[tokio::test]
    async fn start_up_check_reports_exactly_the_denied_permissions() {
        use crate::fixtures::{ApiServerVerifier, Expect, Reply, test_context};
        use serde_json::json;
        let (ctx, handle) = test_context();
        let mut script = Vec::new();
        for (group, resources, verbs) in RULES {
            for resource in *resources {
                for verb in *verbs {
                    let denied = *resource == "secrets" && *verb == "watch";
                    let mut expect = Expect::get(
                        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                        Reply::Object(json!({
                            "apiVersion": "authorization.k8s.io/v1",
                            "kind": "SelfSubjectAccessReview",
                            "metadata": {},
                            "spec": {},
                            "status": {"allowed": !denied},
                        })),
                    );
                    expect.method = http::Method::POST;
                    let (g, r, v, ns) = (
                        *group,
                        *resource,
                        *verb,
                        if *group == "coordination.k8s.io" {
                            "ops"
                        } else {
                            "apps"
                        },
                    );
                    expect.check = Some(Box::new(move |b: &serde_json::Value| {
                        let attrs = &b["spec"]["resourceAttributes"];
                        let full = match attrs["subresource"].as_str() {
                            Some(sub) => {
                                format!("{}/{sub}", attrs["resource"].as_str().unwrap_or_default())
                            }
                            None => attrs["resource"].as_str().unwrap_or_default().to_owned(),
                        };
                        assert_eq!(
                            (
                                attrs["group"].as_str(),
                                full.as_str(),
                                attrs["verb"].as_str()
                            ),
                            (Some(g), r, Some(v))
                        );
                        assert_eq!(attrs["namespace"].as_str(), Some(ns));
                    }));
                    script.push(expect);
                }
            }
        }
        let task = ApiServerVerifier::new(handle).run(script);
        let missing = missing_permissions(ctx.client.clone(), Some("apps"), Some("ops"))
            .await
            .expect("reviews answered");
        task.await.expect("every review was asked in order");
        assert_eq!(missing, ["watch /secrets"]);
    }

    #[test]
    fn secrets_are_never_writable() {
        for verb in ["create", "patch", "update", "delete"] {
            assert!(!allows("", "secrets", verb), "{verb}");
        }
    }
}
