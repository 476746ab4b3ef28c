//! `keel call SERVICE Package.Service/Method -d JSON`: grpcurl by service name. The service is found through
//! Consul DNS SRV and called through the platform's client channel (balancing, deadline, trace id); the method's
//! types are learnt from the service itself through server reflection (`grpc.reflection.v1`), the JSON request
//! is encoded with them (proto3 JSON mapping), and the reply printed as JSON.
//!
//! Without a method, `keel call SERVICE` lists the gRPC services and methods the service offers.

use std::{collections::HashSet, io::Read as _, time::Duration};

use anyhow::Context as _;
use bytes::Buf;
use keel_common::{
    ClientFactory, Metrics, Settings,
    config::Env,
    context::{DRY_RUN, TRACE_ID_HEADER, new_trace_id},
};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// `keel call` options.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  keel call echo                                   # what echo offers\n  keel call echo keel.example.v1.Echo/Echo -d '{\"message\": \"hi\"}'\n  keel call accounts keel.accounts.v1.Accounts/CreateAccount -d @account.json --dry-run"
)]
pub struct Args {
    /// The service's Consul name.
    pub service: String,
    /// `package.Service/Method` (or `package.Service.Method`); without it, list what the service offers.
    pub method: Option<String>,
    /// The request as JSON (proto3 JSON mapping); `@FILE` reads a file, `-` stdin.
    #[arg(short = 'd', long = "data", default_value = "{}")]
    pub data: String,
    /// The call's deadline (sent as `grpc-timeout`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Trace id to send (`x-trace-id`); default: a new one, printed on stderr for `keel logs --trace-id`.
    #[arg(long)]
    pub trace_id: Option<String>,
    /// Ask the service to validate and report without side effects (`dry-run: true` metadata).
    #[arg(long)]
    pub dry_run: bool,
    /// Extra metadata, `key: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Print fields that hold their default value too.
    #[arg(long)]
    pub emit_defaults: bool,
    /// Consul DNS server (`host:port`).
    #[arg(long, env = "KEEL_CONSUL__DNS_ADDR", default_value = "127.0.0.1:8600")]
    pub consul_dns: String,
    /// Call this instance (`host:port`) instead of finding the service through Consul DNS.
    #[arg(long)]
    pub address: Option<String>,
}

/// Runs the call; returns the process exit code (0 for OK, 1 for a non-OK status, printed on stderr).
///
/// # Errors
/// Bad arguments, an unknown method, JSON that does not fit the request type, reflection failing.
pub async fn run(args: &Args) -> anyhow::Result<i32> {
    let env = match &args.address {
        Some(addr) => Env::default()
            .with("KEEL_CONSUL__DNS_ENABLED", "false")
            .with(
                "KEEL_CLIENT__STATIC_ENDPOINTS",
                format!("{}={addr}", args.service),
            ),
        None => Env::default()
            .with("KEEL_CONSUL__DNS_ENABLED", "true")
            .with("KEEL_CONSUL__DNS_ADDR", &args.consul_dns),
    }
    .with(
        "KEEL_CLIENT__DEFAULT_TIMEOUT",
        humantime::format_duration(args.deadline).to_string(),
    )
    .with("KEEL_CONSUL__DISCOVERY_INTERVAL", "1s");
    let settings = Settings::from_env("keel", &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let channel = ClientFactory::new(&settings, Metrics::disabled())
        .channel(&args.service)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let trace_id = args
        .trace_id
        .clone()
        .unwrap_or_else(|| new_trace_id().to_string());
    let Some(method) = &args.method else {
        for line in list(channel, args).await? {
            println!("{line}");
        }
        return Ok(0);
    };
    let (service_name, method_name) = split_method(method)?;
    let pool = descriptors(channel.clone(), args, service_name).await?;
    let service = pool
        .get_service_by_name(service_name)
        .with_context(|| format!("{} does not offer {service_name}", args.service))?;
    let method = service
        .methods()
        .find(|m| m.name() == method_name)
        .with_context(|| {
            let names: Vec<String> = service.methods().map(|m| m.name().to_owned()).collect();
            format!(
                "{service_name} has no method {method_name} (it has {})",
                names.join(", ")
            )
        })?;
    anyhow::ensure!(
        !method.is_client_streaming(),
        "{} streams from the client: keel call sends one request (unary and server-streaming methods)",
        method.full_name()
    );
    let request = request_message(&method, &read_data(&args.data)?)?;

    let mut req = tonic::Request::new(request);
    req.set_timeout(args.deadline);
    let md = req.metadata_mut();
    md.insert(
        TRACE_ID_HEADER,
        trace_id
            .parse()
            .context("--trace-id: not a valid header value")?,
    );
    if args.dry_run {
        md.insert(DRY_RUN, "true".parse().expect("ascii"));
    }
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?}: expected `key: value`"))?;
        let key =
            tonic::metadata::MetadataKey::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
                .with_context(|| format!("--header {h:?}: not a metadata key"))?;
        md.insert(
            key,
            v.trim()
                .parse()
                .with_context(|| format!("--header {h:?}: not a metadata value"))?,
        );
    }
    eprintln!("trace id: {trace_id}");

    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let path: http::uri::PathAndQuery =
        format!("/{}/{}", service.full_name(), method.name()).parse()?;
    let codec = DynamicCodec(method.output());
    let options = SerializeOptions::new().skip_default_fields(!args.emit_defaults);
    let print = |m: &DynamicMessage| -> anyhow::Result<()> {
        let mut out = serde_json::Serializer::pretty(std::io::stdout().lock());
        m.serialize_with_options(&mut out, &options)?;
        println!();
        Ok(())
    };
    let status = if method.is_server_streaming() {
        match grpc.server_streaming(req, path, codec).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => print(&m)?,
                        Ok(None) => break None,
                        Err(s) => break Some(s),
                    }
                }
            }
            Err(s) => Some(s),
        }
    } else {
        match grpc.unary(req, path, codec).await {
            Ok(resp) => {
                print(resp.get_ref())?;
                None
            }
            Err(s) => Some(s),
        }
    };
    Ok(match status {
        None => 0,
        Some(s) => {
            eprintln!("ERROR:\n  Code: {:?}\n  Message: {}", s.code(), s.message());
            1
        }
    })
}

/// `pkg.Service/Method`, `/pkg.Service/Method` or `pkg.Service.Method` → (`pkg.Service`, `Method`).
fn split_method(m: &str) -> anyhow::Result<(&str, &str)> {
    let m = m.trim_start_matches('/');
    let split = m.rsplit_once('/').or_else(|| m.rsplit_once('.'));
    match split {
        Some((s, name)) if !s.is_empty() && !name.is_empty() => Ok((s, name)),
        _ => anyhow::bail!("{m:?}: expected package.Service/Method"),
    }
}

/// `-d`'s text: inline JSON, `@FILE`, or `-` for stdin.
fn read_data(data: &str) -> anyhow::Result<String> {
    if data == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else if let Some(path) = data.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("-d @{path}"))
    } else {
        Ok(data.to_owned())
    }
}

/// The request message of `method` from its JSON; unknown fields and wrong types are errors naming them.
fn request_message(method: &MethodDescriptor, json: &str) -> anyhow::Result<DynamicMessage> {
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize(method.input(), &mut de)
        .with_context(|| format!("-d does not fit {}", method.input().full_name()))?;
    de.end()
        .with_context(|| format!("-d does not fit {}", method.input().full_name()))?;
    Ok(msg)
}

/// One reflection exchange: `request` out, the answer back.
async fn reflect(
    channel: keel_common::Channel,
    args: &Args,
    request: MessageRequest,
) -> anyhow::Result<MessageResponse> {
    let mut client = ServerReflectionClient::new(channel);
    let mut req = tonic::Request::new(tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]));
    req.set_timeout(args.deadline);
    let failed = |s: tonic::Status| {
        anyhow::anyhow!(
            "server reflection of {}: {:?}: {}",
            args.service,
            s.code(),
            s.message()
        )
    };
    let mut answers = client
        .server_reflection_info(req)
        .await
        .map_err(failed)?
        .into_inner();
    let answer = answers
        .message()
        .await
        .map_err(failed)?
        .and_then(|a| a.message_response)
        .with_context(|| format!("server reflection of {} answered nothing", args.service))?;
    if let MessageResponse::ErrorResponse(e) = &answer {
        anyhow::bail!("server reflection of {}: {}", args.service, e.error_message);
    }
    Ok(answer)
}

/// The descriptors of `symbol`'s file and every file it imports, asked one file at a time.
async fn descriptors(
    channel: keel_common::Channel,
    args: &Args,
    symbol: &str,
) -> anyhow::Result<DescriptorPool> {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    let mut ask = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
    while let Some(request) = ask.pop() {
        let MessageResponse::FileDescriptorResponse(answer) =
            reflect(channel.clone(), args, request).await?
        else {
            anyhow::bail!(
                "server reflection of {} answered another question",
                args.service
            );
        };
        for bytes in answer.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice())?;
            if !seen.insert(file.name().to_owned()) {
                continue;
            }
            for dep in &file.dependency {
                if !seen.contains(dep) {
                    ask.push(MessageRequest::FileByFilename(dep.clone()));
                }
            }
            files.push(file);
        }
    }
    DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet { file: files })
        .with_context(|| {
            format!(
                "the descriptors {} serves do not fit together",
                args.service
            )
        })
}

/// `Package.Service/Method` lines for everything `args.service` serves but reflection and health.
async fn list(channel: keel_common::Channel, args: &Args) -> anyhow::Result<Vec<String>> {
    let MessageResponse::ListServicesResponse(answer) = reflect(
        channel.clone(),
        args,
        MessageRequest::ListServices(String::new()),
    )
    .await?
    else {
        anyhow::bail!(
            "server reflection of {} answered another question",
            args.service
        );
    };
    let mut lines = Vec::new();
    for s in answer.service {
        if s.name.starts_with("grpc.reflection.") || s.name.starts_with("grpc.health.") {
            continue;
        }
        let pool = descriptors(channel.clone(), args, &s.name).await?;
        if let Some(svc) = pool.get_service_by_name(&s.name) {
            lines.extend(
                svc.methods()
                    .map(|m| format!("{}/{}", svc.full_name(), m.name())),
            );
        }
    }
    Ok(lines)
}

/// Encodes [`DynamicMessage`]s, decodes the replies with the method's output descriptor.
struct DynamicCodec(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;
    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }
    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder(self.0.clone())
    }
}

struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: DynamicMessage,
        dst: &mut EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encoding the request: {e}")))
    }
}

struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding the reply: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_named_as_grpcurl_names_them() {
        for m in [
            "keel.example.v1.Echo/Echo",
            "/keel.example.v1.Echo/Echo",
            "keel.example.v1.Echo.Echo",
        ] {
            assert_eq!(
                split_method(m).unwrap(),
                ("keel.example.v1.Echo", "Echo"),
                "{m}"
            );
        }
        assert!(split_method("Echo").is_err());
        assert!(split_method("keel.Echo/").is_err());
    }

    #[test]
    fn json_requests_are_checked_against_the_request_type() {
        let pool = DescriptorPool::decode(keel_protos::FILE_DESCRIPTOR_SET).unwrap();
        let method = pool
            .get_service_by_name("keel.example.v1.Echo")
            .unwrap()
            .methods()
            .find(|m| m.name() == "Echo")
            .unwrap();
        let ok = request_message(&method, r#"{"message": "hi", "delayMs": 5}"#).unwrap();
        assert_eq!(
            ok.get_field_by_name("message").unwrap().as_str(),
            Some("hi")
        );
        let unknown = request_message(&method, r#"{"mesage": "hi"}"#).unwrap_err();
        assert!(format!("{unknown:#}").contains("mesage"), "{unknown:#}");
        assert!(request_message(&method, r#"{"delayMs": "soon"}"#).is_err());
        assert!(request_message(&method, r#"{} trailing"#).is_err());
    }
}
