//! Test-only: a scripted fake API server for the reconcile loop, in the tower-test style.
//!
//! A [`Client`] is built over `tower_test::mock::pair`; [`ApiServerVerifier`] awaits every
//! expected request in order, asserts its method, path, query (`fieldManager`, `force`) and
//! body, and answers like a real API server: the applied object (a Deployment applied
//! without `replicas` comes back with the default of 1), or a `Status` failure with the
//! code and reason a real server uses (422 `Invalid`, 403 `Forbidden` for quota and
//! admission, 409 `Conflict`, 500, …). A missing request makes the test time out; an extra
//! request finds the handle dropped and fails the reconcile. Every request is also checked
//! against the rules `vm-operator rbac` prints.
//!
//! The pass reads children and Secret metadata from the controller's caches, so a scenario
//! names the live objects (the "world") that [`seed`] puts into them; only requests the
//! pass really makes appear in its script.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::Serialize;
use serde_json::{Value, json};

use crate::controller::Context;
use crate::crd::VmWebapp;
use crate::metrics::Metrics;

/// The test side of the mocked API server.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type BodyCheck = Box<dyn Fn(&Value) + Send>;

/// The fixed clock of tests.
pub fn test_now() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A context whose client talks to the returned mock handle.
pub fn test_context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::with_parts(
        client,
        Metrics::default(),
        Reporter {
            controller: "vm-operator".into(),
            instance: None,
        },
        test_now,
    )
    .with_concurrency(1);
    (Arc::new(ctx), handle)
}

/// Fill the context's caches with `world` (live objects as the API server returns them,
/// each with its `kind`; Secrets go into the metadata cache only) and mark every cache
/// ready, as after the watches' first lists.
pub fn seed(ctx: &Context, world: &[Value]) {
    fn fill<K>(writer: &mut Writer<K>, world: &[Value], kind: &str)
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned,
    {
        writer.apply_watcher_event(&watcher::Event::Init);
        for obj in world.iter().filter(|o| o["kind"] == kind) {
            let mut typed: K = serde_json::from_value(obj.clone()).expect("world object parses");
            crate::controller::caches_slim(&mut typed);
            writer.apply_watcher_event(&watcher::Event::InitApply(typed));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }
    let mut w = ctx.take_writers().expect("fresh context");
    fill(&mut w.deployments, world, "Deployment");
    fill(&mut w.jobs, world, "Job");
    fill(&mut w.config_maps, world, "ConfigMap");
    fill(&mut w.services, world, "Service");
    fill(&mut w.service_accounts, world, "ServiceAccount");
    fill(&mut w.pdbs, world, "PodDisruptionBudget");
    fill(&mut w.hpas, world, "HorizontalPodAutoscaler");
    fill(&mut w.cron_jobs, world, "CronJob");
    fill_meta::<Secret>(&mut w.secrets, world, "Secret");
    fill_meta::<ConfigMap>(&mut w.config_map_meta, world, "ConfigMap");
}

/// Fill a metadata-only cache with the metadata of `world`'s objects of `kind`.
fn fill_meta<K>(writer: &mut Writer<PartialObjectMeta<K>>, world: &[Value], kind: &str)
where
    K: Resource<DynamicType = ()> + Clone,
    PartialObjectMeta<K>: Resource<DynamicType = ()> + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for obj in world.iter().filter(|o| o["kind"] == kind) {
        let meta: PartialObjectMeta<K> = PartialObjectMeta {
            types: None,
            metadata: serde_json::from_value(obj["metadata"].clone()).expect("metadata"),
            _phantom: Default::default(),
        };
        writer.apply_watcher_event(&watcher::Event::InitApply(meta));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

/// How the fake API server answers one request.
pub enum Reply {
    /// 200 with this object.
    Object(Value),
    /// 404 NotFound.
    NotFound,
    /// 200 with the request body (what an apply returns, near enough).
    Echo,
    /// A `Status` failure: HTTP `code`, `reason` (`Invalid`, `Forbidden`, `Conflict`,
    /// `InternalError`, …) and the server's `message`.
    Status(u16, &'static str, String),
}

impl Reply {
    /// 403 Forbidden from a ResourceQuota, worded as kube-apiserver words it.
    pub fn quota_exceeded(resource: &str, name: &str) -> Self {
        Self::Status(
            403,
            "Forbidden",
            format!(
                "{resource} \"{name}\" is forbidden: exceeded quota: no-deploy, requested: count/{resource}=1, used: count/{resource}=0, limited: count/{resource}=0"
            ),
        )
    }
}

/// One expected request.
pub struct Expect {
    pub(crate) method: Method,
    path: String,
    query: Vec<String>,
    pub(crate) check: Option<BodyCheck>,
    reply: Reply,
}

impl Expect {
    /// `GET path`, answered with `reply`.
    pub fn get(path: impl Into<String>, reply: Reply) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            query: vec![],
            check: None,
            reply,
        }
    }

    /// A server-side apply `PATCH path` under the operator's field manager, forced.
    pub fn apply(path: impl Into<String>, check: impl Fn(&Value) + Send + 'static) -> Self {
        Self {
            method: Method::PATCH,
            path: path.into(),
            query: vec!["fieldManager=vm-operator&".into(), "force=true".into()],
            check: Some(Box::new(check)),
            reply: Reply::Echo,
        }
    }

    /// A forced server-side apply `PATCH path` under the field manager `manager`.
    pub fn apply_as(
        path: impl Into<String>,
        manager: &str,
        check: impl Fn(&Value) + Send + 'static,
    ) -> Self {
        Self {
            query: vec![format!("fieldManager={manager}&"), "force=true".into()],
            ..Self::apply(path, check)
        }
    }

    /// A JSON merge `PATCH path` (not server-side apply), answered with `reply`.
    pub fn merge_patch(
        path: impl Into<String>,
        check: impl Fn(&Value) + Send + 'static,
        reply: Value,
    ) -> Self {
        Self {
            method: Method::PATCH,
            path: path.into(),
            query: vec![],
            check: Some(Box::new(check)),
            reply: Reply::Object(reply),
        }
    }

    /// The same request, answered with `reply` instead.
    pub fn answer(self, reply: Reply) -> Self {
        Self { reply, ..self }
    }

    /// `DELETE path`.
    pub fn delete(path: impl Into<String>) -> Self {
        Self {
            method: Method::DELETE,
            path: path.into(),
            query: vec![],
            check: None,
            reply: Reply::Object(json!({})),
        }
    }

    /// An events.k8s.io/v1 event created in `ns`.
    pub fn event(ns: &str, check: impl Fn(&Value) + Send + 'static) -> Self {
        Self {
            method: Method::POST,
            path: format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"),
            query: vec![],
            check: Some(Box::new(check)),
            reply: Reply::Echo,
        }
    }
}

/// Runs a script of expected requests against the mock handle.
pub struct ApiServerVerifier {
    handle: Handle,
    /// Every request body seen, for assertions across the whole pass.
    pub bodies: Arc<Mutex<Vec<String>>>,
}

impl ApiServerVerifier {
    /// Wrap a handle.
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            bodies: Arc::default(),
        }
    }

    /// Serve `script` in order on a task; the handle is dropped when it ends.
    pub fn run(mut self, script: Vec<Expect>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for (i, expect) in script.into_iter().enumerate() {
                let (request, send) = self
                    .handle
                    .next_request()
                    .await
                    .expect("the reconcile stopped calling the API server");
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                assert_eq!(
                    format!("{method} {path}"),
                    format!("{} {}", expect.method, expect.path),
                    "request #{i} is not the expected one"
                );
                // Every request a scenario makes must be allowed by `vm-operator rbac`.
                // (SelfSubjectAccessReviews are granted to every authenticated user.)
                if !path.starts_with("/apis/authorization.k8s.io/") {
                    let (group, resource, verb) = crate::rbac::classify(method.as_str(), &path)
                        .expect("a namespaced API path");
                    assert!(
                        crate::rbac::allows(&group, &resource, verb),
                        "RBAC rules lack {verb} on {group}/{resource}"
                    );
                }
                let query_and = format!("{query}&");
                for q in &expect.query {
                    assert!(
                        query_and.contains(q.as_str()),
                        "request #{i} {path}: query {query:?} lacks {q}"
                    );
                }
                let bytes = request
                    .into_body()
                    .collect_bytes()
                    .await
                    .expect("request body");
                let text = String::from_utf8_lossy(&bytes).into_owned();
                if let Ok(mut b) = self.bodies.lock() {
                    b.push(text.clone());
                }
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("JSON body")
                };
                if let Some(check) = &expect.check {
                    check(&body);
                }
                let (status, reply) = match expect.reply {
                    Reply::Object(v) => (StatusCode::OK, v),
                    Reply::Echo if body.get("metadata").is_some() => {
                        (StatusCode::OK, as_stored(body))
                    }
                    // A status apply carries only apiVersion, kind and status; the server
                    // answers with the whole object.
                    Reply::Echo => {
                        let mut whole = json!({"metadata": {"name": "x"}, "spec": {"image": "x"}});
                        whole["apiVersion"] = body["apiVersion"].clone();
                        whole["kind"] = body["kind"].clone();
                        whole["status"] = body["status"].clone();
                        (StatusCode::OK, whole)
                    }
                    Reply::NotFound => (
                        StatusCode::NOT_FOUND,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                    Reply::Status(code, reason, message) => (
                        StatusCode::from_u16(code).expect("valid code"),
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "reason": reason, "code": code, "message": message}),
                    ),
                };
                let response = Response::builder()
                    .status(status)
                    .body(Body::from(
                        serde_json::to_vec(&reply).expect("reply serialises"),
                    ))
                    .expect("response builds");
                send.send_response(response);
            }
        })
    }
}

/// An applied object as the API server stores it: server-set metadata, and the defaults a
/// scenario depends on (a Deployment applied without `replicas` runs 1).
fn as_stored(mut body: Value) -> Value {
    if body["metadata"].get("generation").is_none() {
        body["metadata"]["generation"] = json!(1);
    }
    body["metadata"]["uid"] = json!("child-uid");
    if body["kind"] == "Deployment" && body["spec"].get("replicas").is_none() {
        body["spec"]["replicas"] = json!(1);
    }
    body
}

/// Run `reconcile` with the caches holding `world` against `script`; return its result and
/// every request body.
pub async fn reconcile_with(
    app: VmWebapp,
    world: &[Value],
    script: Vec<Expect>,
) -> (
    Result<kube::runtime::controller::Action, crate::controller::Error>,
    Vec<String>,
) {
    let (ctx, handle) = test_context();
    seed(&ctx, world);
    reconcile_in(app, ctx, handle, script).await
}

/// Run `reconcile` in a prepared context against `script`.
pub async fn reconcile_in(
    app: VmWebapp,
    ctx: Arc<Context>,
    handle: Handle,
    script: Vec<Expect>,
) -> (
    Result<kube::runtime::controller::Action, crate::controller::Error>,
    Vec<String>,
) {
    let verifier = ApiServerVerifier::new(handle);
    let bodies = verifier.bodies.clone();
    let task = verifier.run(script);
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        crate::controller::reconcile(Arc::new(app), ctx),
    )
    .await
    .expect("reconcile finished in time");
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("every expected request was made")
        .expect("every request matched the script");
    let bodies = bodies.lock().map(|b| b.clone()).unwrap_or_default();
    (result, bodies)
}

/// A `VmWebapp` from an example manifest, as the API server would hand it over.
pub fn app_from_example(yaml: &str, namespace: &str) -> VmWebapp {
    let mut app: VmWebapp = serde_yaml::from_str(yaml).expect("example parses");
    app.metadata.namespace = Some(namespace.into());
    app.metadata.uid = Some("0c6f5a52-0000-4000-8000-000000000001".into());
    app.metadata.generation = Some(1);
    app.metadata.resource_version = Some("100".into());
    app
}

/// A child as the API server returns it: the desired object plus server-set metadata,
/// defaults and, for Deployments, a completed rollout.
pub fn live<K: Serialize + Resource>(obj: &K) -> Value {
    let mut v = serde_json::to_value(obj).expect("object serialises");
    v["metadata"]["uid"] = json!("child-uid");
    v["metadata"]["resourceVersion"] = json!("7");
    v["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    v["metadata"]["generation"] = json!(1);
    match v["kind"].as_str() {
        Some("Deployment") => {
            let replicas = v["spec"]["replicas"].as_i64().unwrap_or(2);
            v["spec"]["progressDeadlineSeconds"] = json!(600);
            v["status"] = json!({
                "observedGeneration": 1,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            });
        }
        Some("Service") => {
            v["spec"]["clusterIP"] = json!("10.96.0.10");
            v["spec"]["sessionAffinity"] = json!("None");
        }
        _ => {}
    }
    v
}

/// A Secret with string values, as the API server returns it.
pub fn secret(ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            resource_version: Some("41".into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Secret::default()
    };
    serde_json::to_value(s).expect("secret serialises")
}
