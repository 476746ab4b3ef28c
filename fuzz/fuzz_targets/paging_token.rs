//! Paging tokens (`killrvideo::paging`, `keel_common::tokens`): whatever a client sends as `paging_state`
//! decodes to a cursor only when this service sealed it for this list; a token changed in any character, or
//! sealed for another list, is refused (INVALID_ARGUMENT), and nothing panics.
#![no_main]

use arbitrary::Arbitrary;
use killrvideo::paging;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    /// A token as a client may send it.
    sent: &'a str,
    /// A cursor the service sealed, and where a client changed its token.
    cursor: (i64, String),
    at: usize,
    with: char,
}

fuzz_target!(|input: Input<'_>| {
    // Anything at all: a cursor or a refusal, never a panic.
    let _ = paging::decode::<(i64, String)>("videos.latest", input.sent);
    let _ = paging::decode::<String>("comments.by_video:1", input.sent);

    let token = paging::encode("videos.latest", &input.cursor);
    assert_eq!(
        paging::decode::<(i64, String)>("videos.latest", &token).expect("own token"),
        Some(input.cursor.clone()),
        "a sealed cursor opens unchanged"
    );
    assert!(
        paging::decode::<(i64, String)>("videos.by_user:1", &token).is_err(),
        "a token of another list is refused"
    );
    let mut changed: Vec<char> = token.chars().collect();
    if !changed.is_empty() {
        let i = input.at % changed.len();
        if changed[i] != input.with {
            changed[i] = input.with;
            let changed: String = changed.into_iter().collect();
            assert!(
                paging::decode::<(i64, String)>("videos.latest", &changed).is_err(),
                "a changed token is refused: {changed}"
            );
        }
    }
});
