//! Traces over OTLP: a real receiver (HTTP, protobuf, decoded with the OpenTelemetry proto
//! definitions) gets the gatekeeper's and the worker's spans of one job in the client's trace —
//! the worker's under the gatekeeper's, the gatekeeper's under the client's span — and no span
//! carries the payload. Its own binary: the in-process gatekeeper exports through this
//! process's global subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_client::Method;
use gatehouse_e2e::{Options, TestSystem};
use http_body_util::BodyExt as _;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    /// Every attribute as `key=value`.
    attributes: Vec<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A collector's OTLP/HTTP traces endpoint: answers every POST 200 and keeps the spans.
async fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let keep = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let keep = keep.clone();
            tokio::spawn(async move {
                let serve = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let keep = keep.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let request =
                            ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
                        for resource in request.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .map(|a| text(a.value.as_ref().and_then(|v| v.value.as_ref())))
                                .unwrap_or_default();
                            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                                keep.lock().unwrap().push(Got {
                                    service: service.clone(),
                                    name: span.name,
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent: hex(&span.parent_span_id),
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .map(|a| {
                                            format!(
                                                "{}={}",
                                                a.key,
                                                text(a.value.as_ref().and_then(|v| v.value.as_ref()))
                                            )
                                        })
                                        .collect(),
                                });
                            }
                        }
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            hyper::body::Bytes::new(),
                        )))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, serve).await;
            });
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_holds_the_gatekeepers_and_the_workers_spans_of_a_job_and_nothing_secret() {
    let (url, got) = receiver().await;
    // The in-process gatekeeper's spans: this process's subscriber exports them (built on a
    // plain thread: the exporter's HTTP client is a blocking one).
    let settings = gatehouse_broker::telemetry::TelemetrySettings { otlp_endpoint: Some(url.clone()) };
    let (layer, exporting) = std::thread::spawn(move || {
        gatehouse_broker::telemetry::layer("gatehouse-gatekeeper", &settings).unwrap().expect("export is on")
    })
    .join()
    .unwrap();
    tracing_subscriber::registry().with(tracing_subscriber::EnvFilter::new("info")).with(layer).init();
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        otlp_endpoint: Some(url),
        ..Options::default()
    })
    .await;

    let (client_trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut conn = sys.connect().await;
    let body = br#"{"kind":"vault.put","payload":{"record":{"card":"4111-SECRET-MARKER"}}}"#.to_vec();
    let traceparent = format!("00-{client_trace}-{client_span}-01");
    let headers =
        [("content-type", "application/json"), ("prefer", "wait=10"), ("traceparent", traceparent.as_str())];
    let res = conn.request(Method::POST, "/v1/jobs", &headers, body).await.unwrap();
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let echoed = res.traceparent.clone().expect("a traceparent in the response");

    // Spans are sent each second; both components' must arrive.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<Got> =
            got.lock().unwrap().iter().filter(|s| s.trace_id == client_trace).cloned().collect();
        let has = |service: &str, name: &str| spans.iter().any(|s| s.service == service && s.name == name);
        if has("gatehouse-gatekeeper", "submit")
            && has("gatehouse-worker", "job")
            && has("gatehouse-worker", "settle")
        {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans of the trace so far: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_id: HashMap<&str, &Got> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let submit = spans.iter().find(|s| s.name == "submit").unwrap();
    assert_eq!(submit.parent, client_span, "the gatekeeper's span continues the client's");
    assert_eq!(
        echoed,
        format!("00-{client_trace}-{}-01", submit.span_id),
        "the response names the gatekeeper's span"
    );
    let job = spans.iter().find(|s| s.service == "gatehouse-worker" && s.name == "job").unwrap();
    assert_eq!(job.parent, submit.span_id, "the worker's delivery span is the gatekeeper's child");
    // The worker's work is inside its delivery span: the decision (and its storage
    // transaction) and the settling.
    let under_job = |s: &Got| {
        let mut at = s;
        while let Some(parent) = by_id.get(at.parent.as_str()) {
            if parent.span_id == job.span_id {
                return true;
            }
            at = parent;
        }
        false
    };
    for name in ["decide and run", "storage", "settle"] {
        assert!(
            spans.iter().any(|s| s.service == "gatehouse-worker" && s.name == name && under_job(s)),
            "no {name:?} span under the job: {spans:#?}"
        );
    }
    // Nothing secret: every span the receiver got, this trace's or not.
    let all = got.lock().unwrap().clone();
    for s in &all {
        assert!(s.attributes.iter().all(|a| !a.contains("SECRET") && !a.contains("4111")), "{s:?}");
        assert!(!s.name.contains("SECRET"), "{s:?}");
    }
    sys.stop().await;
    tokio::task::spawn_blocking(move || drop(exporting)).await.unwrap();
}
