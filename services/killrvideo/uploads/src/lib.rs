//! KillrVideo `UploadsService` (spec `killrvideo-semantics.md` §11): registered so clients get a clear
//! answer, and every call is UNIMPLEMENTED "Uploading videos is currently not supported", as in every reference
//! implementation. It has no state.

use keel_common::{Resources, Server, Service, ServiceError};
use keel_protos::killrvideo::uploads::{
    GetStatusOfVideoRequest, GetStatusOfVideoResponse, GetUploadDestinationRequest,
    GetUploadDestinationResponse, MarkUploadCompleteRequest, MarkUploadCompleteResponse,
    uploads_service_server::{UploadsService, UploadsServiceServer},
};
use tonic::{Request, Response, Status};

/// Consul service name.
pub const SERVICE: &str = "uploads";

/// The message of every call (C# reference).
pub const UNSUPPORTED: &str = "Uploading videos is currently not supported";

/// The gRPC handler.
#[derive(Clone, Copy, Debug, Default)]
pub struct Uploads;

impl Service for Uploads {
    const NAME: &'static str = SERVICE;
    type Settings = ();

    async fn open(_: Resources<()>) -> anyhow::Result<Self> {
        Ok(Self)
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(UploadsServiceServer::new(self))
    }
}

fn unsupported() -> Status {
    ServiceError::Unimplemented(UNSUPPORTED.into()).into()
}

#[tonic::async_trait]
impl UploadsService for Uploads {
    async fn get_upload_destination(
        &self,
        _: Request<GetUploadDestinationRequest>,
    ) -> Result<Response<GetUploadDestinationResponse>, Status> {
        Err(unsupported())
    }

    async fn mark_upload_complete(
        &self,
        _: Request<MarkUploadCompleteRequest>,
    ) -> Result<Response<MarkUploadCompleteResponse>, Status> {
        Err(unsupported())
    }

    async fn get_status_of_video(
        &self,
        _: Request<GetStatusOfVideoRequest>,
    ) -> Result<Response<GetStatusOfVideoResponse>, Status> {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_call_is_unimplemented_with_a_clear_message() {
        let s = Uploads;
        let e = s
            .get_upload_destination(Request::new(GetUploadDestinationRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::Unimplemented, UNSUPPORTED)
        );
        let e = s
            .mark_upload_complete(Request::new(MarkUploadCompleteRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        let e = s
            .get_status_of_video(Request::new(GetStatusOfVideoRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    }
}
