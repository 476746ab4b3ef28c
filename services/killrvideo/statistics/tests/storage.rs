//! Every RPC of the statistics service, in process, on SQLite and on the real PostgreSQL.

use keel_protos::killrvideo::{
    common::Uuid as PbUuid,
    statistics::{
        GetNumberOfPlaysRequest, RecordPlaybackStartedRequest,
        statistics_service_server::StatisticsService,
    },
};
use killrvideo::{
    ids::uuid as pb_uuid,
    testsuite::{self, pb},
};
use statistics::{MIGRATIONS, Statistics};
use tonic::{Code, Request};
use uuid::Uuid;

#[tokio::test]
async fn plays_are_counted_and_every_requested_id_answered_in_order() {
    for db in testsuite::databases().await {
        let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
        let svc = Statistics::new(pool);
        let b = db.backend;
        let videos: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let plays = [13, 17, 9, 21, 15];
        for (v, n) in videos.iter().zip(plays) {
            for _ in 0..n {
                svc.record_playback_started(Request::new(RecordPlaybackStartedRequest {
                    video_id: pb(*v),
                }))
                .await
                .unwrap();
            }
        }
        let never = Uuid::new_v4();
        let mut ask: Vec<PbUuid> = videos.iter().rev().map(|v| pb_uuid(*v)).collect();
        ask.push(pb_uuid(never));
        let stats = svc
            .get_number_of_plays(Request::new(GetNumberOfPlaysRequest { video_ids: ask }))
            .await
            .unwrap()
            .into_inner()
            .stats;
        let got: Vec<(String, i64)> = stats
            .iter()
            .map(|s| (s.video_id.clone().unwrap().value, s.views))
            .collect();
        let mut want: Vec<(String, i64)> = videos
            .iter()
            .zip(plays)
            .rev()
            .map(|(v, n)| (v.to_string(), n))
            .collect();
        want.push((never.to_string(), 0));
        assert_eq!(got, want, "{b}");

        let err = svc
            .get_number_of_plays(Request::new(GetNumberOfPlaysRequest {
                video_ids: (0..21).map(|_| pb_uuid(Uuid::new_v4())).collect(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{b}");
    }
}
