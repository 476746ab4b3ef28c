//! Structure-aware fuzzing of a running server, in process: for every unary and server-streaming method of the
//! named services, requests built from the method's own descriptor (`keel_protos::FILE_DESCRIPTOR_SET`, read
//! with `prost-reflect`) with hostile values in every field — empty, huge and non-UTF-8-looking strings, valid
//! and broken UUIDs, boundary numbers, unknown enum values, long repeated fields, nested messages, dry-run
//! and credential metadata — sent over real gRPC. Every call must come back within its deadline with a status
//! the stack documents for bad input (never INTERNAL, UNKNOWN, DATA_LOSS or a reset stream, which is what a
//! panic or an unmapped error looks like).
//!
//! Cases per service: `KEEL_FUZZ_CASES` (default 300; `make fuzz` runs 100,000); the seed is printed with
//! any failure and can be set with `KEEL_FUZZ_SEED` to replay it.

use std::{net::SocketAddr, time::Duration};

use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    Value,
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tonic::{Code, transport::Channel};
use tonic_prost::ProstCodec;

/// Statuses a hostile request may get: the documented answers to bad input.
pub const ALLOWED: &[Code] = &[
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::OutOfRange,
    Code::Unauthenticated,
    Code::PermissionDenied,
    Code::Unimplemented,
    Code::ResourceExhausted,
];

/// One call that broke the contract.
#[derive(Debug)]
pub struct Finding {
    /// `/package.Service/Method`.
    pub method: String,
    /// What came back.
    pub outcome: String,
    /// The request, as protobuf text.
    pub request: String,
}

/// Fuzzes every method of `services` (full names, e.g. `killrvideo.comments.CommentsService`) served at
/// `addr` with `cases` requests per service, half of them carrying one of `credentials` (as
/// `authorization: Bearer`, so the paths behind authentication are reached too); returns what broke the
/// contract.
///
/// # Panics
/// A service is not in the descriptor set, or the server cannot be reached.
pub async fn run(
    addr: SocketAddr,
    services: &[&str],
    cases: usize,
    seed: u64,
    credentials: &[String],
) -> Vec<Finding> {
    let pool = DescriptorPool::decode(keel_protos::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect()
        .await
        .expect("the server under fuzzing answers");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut findings = Vec::new();
    for name in services {
        let service = pool
            .get_service_by_name(name)
            .unwrap_or_else(|| panic!("{name} is not in the descriptor set"));
        let methods: Vec<MethodDescriptor> = service
            .methods()
            .filter(|m| !m.is_client_streaming())
            .collect();
        for i in 0..cases {
            let method = &methods[i % methods.len()];
            let request = message(&mut rng, &method.input(), 0);
            if let Some(f) = call(&channel, method, request, &mut rng, credentials).await {
                findings.push(f);
                if findings.len() >= 10 {
                    return findings;
                }
            }
        }
    }
    findings
}

/// The seed and case count of this run: `KEEL_FUZZ_SEED` or a fresh one, `KEEL_FUZZ_CASES` or `default`.
pub fn settings(default: usize) -> (u64, usize) {
    let seed = std::env::var("KEEL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases = std::env::var("KEEL_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (seed, cases)
}

async fn call(
    channel: &Channel,
    method: &MethodDescriptor,
    request: DynamicMessage,
    rng: &mut StdRng,
    credentials: &[String],
) -> Option<Finding> {
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let text = format!("{request}");
    let mut req = tonic::Request::new(request);
    req.set_timeout(Duration::from_secs(5));
    if rng.random_bool(0.2) {
        req.metadata_mut()
            .insert(crate::context::DRY_RUN, "true".parse().expect("ascii"));
    }
    if !credentials.is_empty() && rng.random_bool(0.5) {
        let token = &credentials[rng.random_range(0..credentials.len())];
        if let Ok(v) = format!("Bearer {token}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
    } else if rng.random_bool(0.2) {
        // Within what HTTP/2 servers take in headers (a 300 kB header is refused by the transport, 431).
        let token: String = string(rng).chars().take(512).collect();
        if let Ok(v) = format!("Bearer {token}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
    }
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
        let codec = ProstCodec::<DynamicMessage, ()>::default();
        let path: http::uri::PathAndQuery = path.parse().map_err(|e| format!("{e}"))?;
        let status = if method.is_server_streaming() {
            match grpc.server_streaming(req, path, codec).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    let mut last = None;
                    loop {
                        match stream.message().await {
                            Ok(Some(())) => {}
                            Ok(None) => break,
                            Err(s) => {
                                last = Some(s);
                                break;
                            }
                        }
                    }
                    last
                }
                Err(s) => Some(s),
            }
        } else {
            grpc.unary(req, path, codec).await.err()
        };
        Ok::<_, String>(status)
    })
    .await;
    let outcome = match outcome {
        Err(_) => "no answer within 15 s".to_owned(),
        Ok(Err(e)) => e,
        Ok(Ok(None)) => return None,
        Ok(Ok(Some(s))) if ALLOWED.contains(&s.code()) => return None,
        Ok(Ok(Some(s))) => format!("{:?}: {}", s.code(), s.message()),
    };
    Some(Finding {
        method: path,
        outcome,
        request: text.chars().take(2_000).collect(),
    })
}

/// A message of type `desc` with hostile values; nested messages down to depth 3.
fn message(rng: &mut StdRng, desc: &MessageDescriptor, depth: usize) -> DynamicMessage {
    let mut msg = DynamicMessage::new(desc.clone());
    for field in desc.fields() {
        if !rng.random_bool(0.8) || field.is_map() {
            continue;
        }
        if field.is_list() {
            let n = match rng.random_range(0..10) {
                0 => rng.random_range(100..2_000),
                _ => rng.random_range(0..5),
            };
            let items: Vec<Value> = (0..n).filter_map(|_| value(rng, &field, depth)).collect();
            msg.set_field(&field, Value::List(items));
        } else if let Some(v) = value(rng, &field, depth) {
            msg.set_field(&field, v);
        }
    }
    msg
}

fn value(rng: &mut StdRng, field: &FieldDescriptor, depth: usize) -> Option<Value> {
    Some(match field.kind() {
        Kind::Double => Value::F64(
            *[
                0.0,
                -1.0,
                f64::NAN,
                f64::INFINITY,
                f64::MAX,
                1e-300,
                91.0,
                -181.0,
            ]
            .get(rng.random_range(0..8))?,
        ),
        Kind::Float => Value::F32(
            *[
                0.0,
                -1.0,
                f32::NAN,
                f32::INFINITY,
                f32::MAX,
                45.5,
                91.0,
                -181.0,
            ]
            .get(rng.random_range(0..8))?,
        ),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(
            *[0, 1, -1, 5, 20, 21, 100, 1001, i32::MAX, i32::MIN].get(rng.random_range(0..10))?,
        ),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(
            *[
                0,
                1,
                -1,
                1_700_000_000,
                -62_135_596_801,
                253_402_300_800,
                i64::MAX,
                i64::MIN,
            ]
            .get(rng.random_range(0..8))?,
        ),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(*[0, 1, u32::MAX].get(rng.random_range(0..3))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(*[0, 1, u64::MAX].get(rng.random_range(0..3))?),
        Kind::Bool => Value::Bool(rng.random_bool(0.5)),
        Kind::String => Value::String(string(rng)),
        Kind::Bytes => {
            let n = match rng.random_range(0..10) {
                0 => rng.random_range(10_000..200_000),
                _ => rng.random_range(0..64),
            };
            Value::Bytes(
                (0..n)
                    .map(|_| rng.random::<u8>())
                    .collect::<Vec<u8>>()
                    .into(),
            )
        }
        Kind::Enum(e) => Value::EnumNumber(match rng.random_range(0..3) {
            0 => rng.random_range(-5..100),
            _ => e.values().next().map_or(0, |v| v.number()),
        }),
        Kind::Message(m) if depth < 3 => {
            let mut nested = message(rng, &m, depth + 1);
            // A uuid-shaped message (killrvideo.common.Uuid / TimeUuid): a valid id most of the time.
            if let Some(f) = m.get_field_by_name("value")
                && matches!(f.kind(), Kind::String)
                && m.fields().len() == 1
                && rng.random_bool(0.6)
            {
                let id = if m.name() == "TimeUuid" {
                    uuid::Uuid::now_v1(&[1, 2, 3, 4, 5, 6])
                } else {
                    uuid::Uuid::new_v4()
                };
                nested.set_field(&f, Value::String(id.to_string()));
            }
            Value::Message(nested)
        }
        Kind::Message(_) => return None,
    })
}

fn string(rng: &mut StdRng) -> String {
    match rng.random_range(0..12) {
        0 => String::new(),
        1 => " ".repeat(rng.random_range(1..5)),
        2 => "x".repeat(rng.random_range(1_000..300_000)),
        3 => (0..rng.random_range(1..2_000))
            .map(|i| format!("w{i} "))
            .collect(),
        4 => uuid::Uuid::new_v4().to_string(),
        5 => "é🦀\u{0}\u{202e}%_\\'\"".repeat(rng.random_range(1..50)),
        6 => "POLYGON((0 0,1 0,1 1,0 1,0 0))".into(),
        7 => format!("a{}@example.com", rng.random::<u32>()),
        8 => "kc_not-a-real-token".into(),
        _ => (0..rng.random_range(1..20))
            .map(|_| rng.random_range(b'a'..=b'z') as char)
            .collect(),
    }
}
