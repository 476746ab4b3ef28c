//! The video lab's storage on a fresh SQLite file and a fresh database on the real PostgreSQL.

use keel_common::testsuite;
use video_lab::{MIGRATIONS, Record, Store};

#[tokio::test]
async fn videos_are_added_once_found_by_id_and_paged_in_id_order() {
    for db in testsuite::databases().await {
        let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
        let store = Store::new(pool);
        let v = |id: &str| Record {
            id: id.into(),
            title: format!("title {id}"),
            author: "John Doe".into(),
            url: "https://example.com/sample.mp4".into(),
            duration: 120,
        };
        for id in ["b", "a", "c"] {
            assert!(store.add(&v(id)).await.unwrap(), "{}", db.backend);
        }
        assert!(
            !store
                .add(&Record {
                    title: "other".into(),
                    ..v("a")
                })
                .await
                .unwrap(),
            "{}: id taken",
            db.backend
        );
        assert_eq!(
            store.get("a").await.unwrap(),
            Some(v("a")),
            "{}: unchanged",
            db.backend
        );
        assert_eq!(store.get("zz").await.unwrap(), None);
        let first = store.page("", 2).await.unwrap();
        assert_eq!(
            first.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"],
            "{}",
            db.backend
        );
        let rest = store.page("b", 2).await.unwrap();
        assert_eq!(rest, [v("c")], "{}", db.backend);
    }
}
