//! Every RPC of the accounts service, in process, on SQLite and on the real PostgreSQL.

use accounts::{Accounts, MIGRATIONS, token_digest};
use keel_common::{config::Secret, testsuite};
use keel_protos::rpc::{
    Account, CreateAccountReq, GetByTokenReq, ListAccountsReq, ReleaseKeysReq, ReserveKeysReq,
    UpdateAccountReq, accounts_server::Accounts as _,
};
use tonic::{Code, Request};
use tonic_types::StatusExt;

/// The operator's credential of the accounts under test.
const ADMIN: &str = "test-admin-token";

/// `msg` as the operator sends it (`authorization: Bearer <accounts.admin_token>`).
fn admin<T>(msg: T) -> Request<T> {
    bearer(msg, ADMIN)
}

/// `msg` sent with `authorization: Bearer <token>`.
fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    keel_common::context::set_bearer_token(&mut r, &Secret::new(token));
    r
}

fn dry<T>(msg: T) -> Request<T> {
    let mut r = admin(msg);
    r.metadata_mut().insert("dry-run", "true".parse().unwrap());
    r
}

async fn service(db: &testsuite::TestDatabase) -> (Accounts, keel_common::db::Pool) {
    let (pool, _) = testsuite::open(db, &MIGRATIONS).await;
    (Accounts::new(pool.clone(), Secret::new(ADMIN)), pool)
}

/// A reservation of `count` keys of `account_id` (`up_to`: as many as are left, up to `count`).
fn keys(account_id: &str, count: i64, up_to: bool) -> ReserveKeysReq {
    ReserveKeysReq {
        account_id: account_id.to_owned(),
        count,
        up_to,
        ..Default::default()
    }
}

/// [`keys`] with the idempotency key `id`.
fn keys_once(account_id: &str, count: i64, id: &str) -> ReserveKeysReq {
    ReserveKeysReq {
        reservation_id: id.to_owned(),
        ..keys(account_id, count, true)
    }
}

/// The ReleaseKeys undoing reservation `id`.
fn undo(account_id: &str, id: &str) -> ReleaseKeysReq {
    ReleaseKeysReq {
        account_id: account_id.to_owned(),
        reservation_id: id.to_owned(),
        ..Default::default()
    }
}

/// Keys account `id` has in use.
async fn used(svc: &Accounts, id: &str) -> i64 {
    let page = svc
        .list_accounts(admin(ListAccountsReq {
            page_size: 1000,
            page_token: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    page.accounts
        .into_iter()
        .find(|a| a.id == id)
        .expect("listed")
        .used_cache_keys
}

/// A new account allowed `max` keys.
async fn create(svc: &Accounts, name: &str, max: i64) -> Account {
    svc.create_account(admin(CreateAccountReq {
        name: name.into(),
        max_cache_keys: max,
    }))
    .await
    .unwrap()
    .into_inner()
    .account
    .unwrap()
}

#[tokio::test]
async fn accounts_are_created_found_by_token_updated_and_listed() {
    for db in testsuite::databases().await {
        let (svc, pool) = service(&db).await;
        let b = db.backend;
        let created = svc
            .create_account(admin(CreateAccountReq {
                name: "ngrok".into(),
                max_cache_keys: 100,
            }))
            .await
            .unwrap()
            .into_inner();
        let acct = created.account.unwrap();
        assert!(
            created.token.starts_with("kc_") && created.token.len() > 40,
            "{b}"
        );
        let stored: String = sqlx::query_scalar("SELECT token_hash FROM accounts")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            stored,
            token_digest(&created.token),
            "{b}: only the digest is stored"
        );
        assert!(!stored.contains(&created.token[3..]));

        let found = svc
            .get_by_token(Request::new(GetByTokenReq {
                token: created.token.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .account
            .unwrap();
        assert_eq!(
            (found.id.as_str(), found.max_cache_keys),
            (acct.id.as_str(), 100),
            "{b}"
        );
        for bad in ["", "kc_nope", &created.token[..created.token.len() - 1]] {
            let err = svc
                .get_by_token(Request::new(GetByTokenReq { token: bad.into() }))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{b}: {bad:?}");
        }

        let updated = svc
            .update_account(admin(UpdateAccountReq {
                id: acct.id.clone(),
                name: String::new(),
                max_cache_keys: 5,
            }))
            .await
            .unwrap()
            .into_inner()
            .account
            .unwrap();
        assert_eq!(
            (updated.name.as_str(), updated.max_cache_keys),
            ("ngrok", 5),
            "{b}"
        );
        let err = svc
            .update_account(admin(UpdateAccountReq {
                id: "missing".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{b}");

        for i in 0..4 {
            svc.create_account(admin(CreateAccountReq {
                name: format!("a{i}"),
                max_cache_keys: 1,
            }))
            .await
            .unwrap();
        }
        let p1 = svc
            .list_accounts(admin(ListAccountsReq {
                page_size: 3,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let p2 = svc
            .list_accounts(admin(ListAccountsReq {
                page_size: 3,
                page_token: p1.next_page_token.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        let names: Vec<String> = p1
            .accounts
            .iter()
            .chain(&p2.accounts)
            .map(|a| a.name.clone())
            .collect();
        assert_eq!(
            names,
            vec!["ngrok", "a0", "a1", "a2", "a3"],
            "{b}: oldest first"
        );
        assert_eq!(p2.next_page_token, "", "{b}");

        let err = svc
            .create_account(admin(CreateAccountReq {
                name: " ".into(),
                max_cache_keys: 1,
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{b}");
    }
}

#[tokio::test]
async fn the_key_quota_holds_exactly_under_concurrent_reservations() {
    for db in testsuite::databases().await {
        let (svc, _) = service(&db).await;
        let b = db.backend;
        let acct = create(&svc, "q", 100).await;
        let results = futures::future::join_all((0..150).map(|_| {
            let svc = svc.clone();
            let id = acct.id.clone();
            async move { svc.reserve_keys(admin(keys(&id, 1, false))).await }
        }))
        .await;
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            100,
            "{b}: exactly the quota"
        );
        let err = results.into_iter().find_map(Result::err).unwrap();
        assert_eq!(err.code(), Code::FailedPrecondition, "{b}");
        let v = &err
            .get_details_quota_failure()
            .expect("QuotaFailure detail")
            .violations[0];
        assert_eq!(v.subject, format!("account:{}", acct.id), "{b}");

        svc.release_keys(admin(ReleaseKeysReq {
            account_id: acct.id.clone(),
            count: 2,
            ..Default::default()
        }))
        .await
        .unwrap();
        let r = svc
            .reserve_keys(admin(keys(&acct.id, 2, false)))
            .await
            .unwrap();
        assert_eq!(r.into_inner().used_cache_keys, 100, "{b}");
        let err = svc
            .reserve_keys(admin(keys(&acct.id, 0, false)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{b}");
    }
}

/// `up_to` takes what is left, up to `count`, in one statement; concurrent ones together never pass the limit.
#[tokio::test]
async fn up_to_reservations_take_what_is_left() {
    for db in testsuite::databases().await {
        let (svc, _) = service(&db).await;
        let b = db.backend;
        let acct = create(&svc, "batch", 100).await;
        let up_to = |count: i64| keys(&acct.id, count, true);
        let r = svc
            .reserve_keys(admin(up_to(30)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.granted, r.used_cache_keys), (30, 30), "{b}");
        let dry_run = svc
            .reserve_keys(dry(up_to(100)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            dry_run.granted, 70,
            "{b}: a dry run says what it would take"
        );
        // 20 concurrent batches of 7 (140 keys asked) against the 70 left: exactly 70 granted.
        let results =
            futures::future::join_all((0..20).map(|_| svc.reserve_keys(admin(up_to(7))))).await;
        let granted: i64 = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.get_ref().granted)
            .sum();
        assert_eq!(granted, 70, "{b}: exactly what was left");
        assert!(
            results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| e.code() == Code::FailedPrecondition),
            "{b}"
        );
        let none_left = svc.reserve_keys(admin(up_to(5))).await.unwrap_err();
        assert_eq!(none_left.code(), Code::FailedPrecondition, "{b}");
        assert!(none_left.get_details_quota_failure().is_some(), "{b}");
        let all_or_nothing = svc
            .reserve_keys(admin(keys(&acct.id, 1, false)))
            .await
            .unwrap_err();
        assert_eq!(all_or_nothing.code(), Code::FailedPrecondition, "{b}");
    }
}

/// A reservation or release sent again with its idempotency key changes the count once; a reservation whose
/// answer was lost is undone by its id, whether it was applied or has not arrived yet; racing the two leaves
/// the count exact.
#[tokio::test]
async fn reservations_and_releases_with_an_idempotency_key_count_once() {
    for db in testsuite::databases().await {
        let (svc, _) = service(&db).await;
        let b = db.backend;
        let acct = create(&svc, "once", 100).await;
        let other = create(&svc, "other", 100).await;
        let id = &acct.id;

        // Sent twice: taken once, the same answer.
        let first = svc
            .reserve_keys(admin(keys_once(id, 5, "r-1")))
            .await
            .unwrap();
        let again = svc
            .reserve_keys(admin(keys_once(id, 5, "r-1")))
            .await
            .unwrap();
        assert_eq!(first.get_ref().granted, 5, "{b}");
        assert_eq!(again.get_ref().granted, 5, "{b}: what the first took");
        assert_eq!(used(&svc, id).await, 5, "{b}: taken once");

        // Undone (its answer lost): the keys come back, once however often it is undone.
        for _ in 0..2 {
            svc.release_keys(admin(undo(id, "r-1"))).await.unwrap();
            assert_eq!(used(&svc, id).await, 0, "{b}: given back once");
        }
        let late = svc
            .reserve_keys(admin(keys_once(id, 5, "r-1")))
            .await
            .unwrap_err();
        assert_eq!(late.code(), Code::Aborted, "{b}: {late:?}");

        // Undone before it arrives: it takes nothing when it does.
        svc.release_keys(admin(undo(id, "r-2"))).await.unwrap();
        let late = svc
            .reserve_keys(admin(keys_once(id, 3, "r-2")))
            .await
            .unwrap_err();
        assert_eq!(late.code(), Code::Aborted, "{b}");
        assert_eq!(used(&svc, id).await, 0, "{b}: nothing taken");

        // A release retried with its id gives back once.
        svc.reserve_keys(admin(keys(id, 10, false))).await.unwrap();
        let release = ReleaseKeysReq {
            account_id: id.clone(),
            count: 4,
            release_id: "g-1".into(),
            ..Default::default()
        };
        for _ in 0..3 {
            svc.release_keys(admin(release.clone())).await.unwrap();
        }
        assert_eq!(used(&svc, id).await, 6, "{b}: 10 taken, 4 given back once");

        // Another account's id, and an id too long: INVALID_ARGUMENT, nothing changed.
        let foreign = svc
            .reserve_keys(admin(keys_once(&other.id, 1, "r-1")))
            .await
            .unwrap_err();
        assert_eq!(foreign.code(), Code::InvalidArgument, "{b}");
        svc.release_keys(admin(undo(&other.id, "g-1")))
            .await
            .unwrap();
        assert_eq!(
            used(&svc, id).await,
            6,
            "{b}: another account cannot undo it"
        );
        let long = svc
            .reserve_keys(admin(keys_once(id, 1, &"x".repeat(65))))
            .await
            .unwrap_err();
        assert_eq!(long.code(), Code::InvalidArgument, "{b}");
        assert_eq!(used(&svc, &other.id).await, 0, "{b}");

        // Each reservation raced by its undoing: whichever comes first, nothing stays taken.
        let races = (0..40).map(|i| {
            let svc = svc.clone();
            let id = id.clone();
            let rid = format!("race-{i}");
            async move {
                let reserve = svc.reserve_keys(admin(keys_once(&id, 1, &rid)));
                let cancel = svc.release_keys(admin(undo(&id, &rid)));
                let (r, c) = tokio::join!(reserve, cancel);
                c.unwrap();
                if let Err(e) = r {
                    assert_eq!(e.code(), Code::Aborted, "{e:?}");
                }
            }
        });
        futures::future::join_all(races).await;
        assert_eq!(
            used(&svc, id).await,
            6,
            "{b}: every raced reservation undone"
        );
    }
}

#[tokio::test]
async fn dry_runs_validate_and_change_nothing() {
    for db in testsuite::databases().await {
        let (svc, pool) = service(&db).await;
        let b = db.backend;
        let r = svc
            .create_account(dry(CreateAccountReq {
                name: "trial".into(),
                max_cache_keys: 3,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.account.unwrap().name.as_str(), r.token.as_str()),
            ("trial", ""),
            "{b}"
        );
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{b}: nothing written");
        let err = svc
            .create_account(dry(CreateAccountReq {
                name: "x".into(),
                max_cache_keys: 0,
            }))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{b}: a dry run still validates"
        );

        let acct = svc
            .create_account(admin(CreateAccountReq {
                name: "real".into(),
                max_cache_keys: 1,
            }))
            .await
            .unwrap()
            .into_inner()
            .account
            .unwrap();
        let would = svc
            .reserve_keys(dry(keys(&acct.id, 1, false)))
            .await
            .unwrap();
        assert_eq!(
            would.into_inner().used_cache_keys,
            1,
            "{b}: what would happen"
        );
        let err = svc
            .reserve_keys(dry(keys(&acct.id, 2, false)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{b}");
        let renamed = svc
            .update_account(dry(UpdateAccountReq {
                id: acct.id.clone(),
                name: "renamed".into(),
                max_cache_keys: 0,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(renamed.account.unwrap().name, "renamed", "{b}");
        let (name, used): (String, i64) =
            sqlx::query_as("SELECT name, used_cache_keys FROM accounts WHERE id = $1")
                .bind(&acct.id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((name.as_str(), used), ("real", 0), "{b}: nothing changed");
    }
}

/// The open door is shut: administration needs the operator's credential, a tenant acts only on its own
/// account (it may not list accounts, raise its own quota or release another's keys), and a call without a
/// credential, or with one nobody issued, is UNAUTHENTICATED; each refusal carries ErrorInfo.
#[tokio::test]
async fn administration_is_the_operators_and_tenants_act_only_on_their_own_account() {
    let db = testsuite::sqlite().await;
    let (svc, _) = service(&db).await;
    let issue = |name: &str| {
        let svc = svc.clone();
        let name = name.to_owned();
        async move {
            let r = svc
                .create_account(admin(CreateAccountReq {
                    name,
                    max_cache_keys: 10,
                }))
                .await
                .unwrap()
                .into_inner();
            (r.account.unwrap(), r.token)
        }
    };
    let (alice, alice_token) = issue("alice").await;
    let (bob, _) = issue("bob").await;
    let reason = |s: &tonic::Status| s.get_error_details().error_info().unwrap().reason.clone();

    let none = svc
        .list_accounts(Request::new(ListAccountsReq::default()))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    assert_eq!(reason(&none), "UNAUTHENTICATED");
    let forged = svc
        .update_account(bearer(
            UpdateAccountReq {
                id: alice.id.clone(),
                max_cache_keys: 1_000_000,
                ..Default::default()
            },
            "kc_forged",
        ))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated);

    let as_alice = |msg| bearer(msg, &alice_token);
    for denied in [
        svc.list_accounts(bearer(ListAccountsReq::default(), &alice_token))
            .await
            .map(drop),
        svc.update_account(as_alice(UpdateAccountReq {
            id: alice.id.clone(),
            max_cache_keys: 1_000_000,
            ..Default::default()
        }))
        .await
        .map(drop),
        svc.create_account(bearer(
            CreateAccountReq {
                name: "mallory".into(),
                max_cache_keys: 5,
            },
            &alice_token,
        ))
        .await
        .map(drop),
        svc.release_keys(bearer(
            ReleaseKeysReq {
                account_id: bob.id.clone(),
                count: 1,
                ..Default::default()
            },
            &alice_token,
        ))
        .await
        .map(drop),
        svc.reserve_keys(bearer(keys(&bob.id, 1, false), &alice_token))
            .await
            .map(drop),
    ] {
        let err = denied.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert_eq!(reason(&err), "PERMISSION_DENIED");
    }
    svc.reserve_keys(bearer(keys(&alice.id, 1, false), &alice_token))
        .await
        .expect("a tenant reserves on its own account");
    let listed = svc
        .list_accounts(admin(ListAccountsReq::default()))
        .await
        .unwrap()
        .into_inner()
        .accounts;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed
            .iter()
            .find(|a| a.id == alice.id)
            .unwrap()
            .max_cache_keys,
        10,
        "the tenant could not raise its own quota"
    );
}

/// An account name over 256 characters is INVALID_ARGUMENT on `name`, on create and on update.
#[tokio::test]
async fn account_names_are_bounded() {
    let db = testsuite::sqlite().await;
    let (svc, _) = service(&db).await;
    let long = "n".repeat(accounts::MAX_NAME_CHARS + 1);
    let err = svc
        .create_account(admin(CreateAccountReq {
            name: long.clone(),
            max_cache_keys: 1,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("name"), "{}", err.message());
    let acct = create(&svc, "fits", 1).await;
    let err = svc
        .update_account(admin(UpdateAccountReq {
            id: acct.id,
            name: long,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
