use super::*;
use crate::secret_file::{Stamp, TempFile};

fn file(contents: &str) -> TempFile {
    TempFile::new(contents)
}

fn headers(authorization: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", authorization.parse().unwrap());
    headers
}

#[test]
fn tokens_file_skips_comments_and_blank_lines() {
    let f = file("# ops team\n\n  alpha  \nbeta\n");
    let tokens = Tokens::load(&f.0).unwrap();
    assert!(tokens.accepts(b"alpha"));
    assert!(tokens.accepts(b"beta"));
    assert!(!tokens.accepts(b"# ops team"));
    assert!(!tokens.accepts(b"alph"));
    assert!(!tokens.accepts(b"alphaa"));
    assert!(!tokens.accepts(b""));
}

#[test]
fn an_empty_file_is_refused_at_start_and_denies_all_on_reload() {
    let empty = file("# nothing\n");
    assert!(matches!(Tokens::load(&empty.0), Err(AuthError::Empty(_))));
    let f = file("gamma\n");
    let tokens = Tokens::load(&f.0).unwrap();
    std::fs::write(&f.0, "# all revoked\n").unwrap();
    tokens.reload().unwrap();
    assert!(!tokens.accepts(b"gamma"));
    assert!(tokens.check(&headers("Bearer gamma")).is_err());
    std::fs::write(&f.0, "delta\n").unwrap();
    tokens.reload().unwrap();
    assert!(tokens.accepts(b"delta"));
    assert!(!tokens.accepts(b"gamma"));
}

#[test]
fn an_unreadable_file_keeps_the_previous_tokens() {
    let f = file("epsilon\n");
    let tokens = Tokens::load(&f.0).unwrap();
    std::fs::remove_file(&f.0).unwrap();
    assert!(matches!(tokens.reload(), Err(AuthError::Read { .. })));
    assert!(tokens.accepts(b"epsilon"));
}

/// A file still being written while it is read (here: the rest of a
/// token arrives during the read) is not installed, so a truncated token
/// never becomes acceptable; the complete file is, on a later reload.
#[test]
fn a_file_changing_while_read_is_never_installed() {
    let f = file("old-token\n");
    let tokens = Tokens::load(&f.0).unwrap();
    std::fs::write(&f.0, "new-to").unwrap();
    let result = tokens.reload_with(|path| {
        let partial = std::fs::read(path)?;
        // The writer finishes after the reader saw half the file.
        std::fs::write(path, "new-token-complete\n")?;
        Ok(partial)
    });
    assert!(matches!(result, Err(AuthError::Changing(_))), "{result:?}");
    assert!(
        !tokens.accepts(b"new-to"),
        "a truncated token was installed"
    );
    assert!(tokens.accepts(b"old-token"));
    tokens.reload().unwrap();
    assert!(tokens.accepts(b"new-token-complete"));
    assert!(!tokens.accepts(b"old-token"));
}

/// The text read must be the whole file, even if the file's size and time
/// did not move during the read (a short read).
#[test]
fn a_short_read_is_never_installed() {
    let f = file("zeta-token\n");
    let tokens = Tokens::load(&f.0).unwrap();
    let result = tokens.reload_with(|_| Ok(b"zeta".to_vec()));
    assert!(matches!(result, Err(AuthError::Changing(_))));
    assert!(!tokens.accepts(b"zeta"));
}

/// The watcher reloads a changed file only once it looked the same on two
/// checks in a row.
#[test]
fn the_watcher_waits_for_the_file_to_settle() {
    let f = file("eta\n");
    let a = Stamp::of(&f.0).unwrap();
    let b = Stamp {
        len: a.len + 1,
        ..a
    };
    let c = Stamp {
        len: a.len + 2,
        ..a
    };
    assert!(!settled_change(Some(a), Some(a), Some(a)), "unchanged");
    assert!(!settled_change(Some(a), Some(a), Some(b)), "just changed");
    assert!(settled_change(Some(a), Some(b), Some(b)), "settled");
    assert!(!settled_change(Some(a), Some(b), Some(c)), "still changing");
    assert!(settled_change(Some(a), None, None), "gone: report it");
}

#[test]
fn the_scheme_is_case_insensitive_and_the_token_exact() {
    let f = file("theta-secret\n");
    let tokens = Tokens::load(&f.0).unwrap();
    for ok in [
        "Bearer theta-secret",
        "bearer theta-secret",
        "BEARER theta-secret",
        "Bearer   theta-secret ",
    ] {
        assert!(tokens.check(&headers(ok)).is_ok(), "{ok:?}");
    }
    for bad in [
        "Bearer theta-secre",
        "Bearer theta-secretX",
        "Basic theta-secret",
        "Bearertheta-secret",
        "Bearer ",
        "theta-secret",
    ] {
        let status = tokens.check(&headers(bad)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
    }
    let missing = tokens.check(&HeaderMap::new()).unwrap_err();
    assert!(missing.message().contains("missing bearer token"));
}

fn digests(tokens: &[&str]) -> Vec<Digest> {
    tokens.iter().map(|t| digest(t.as_bytes())).collect()
}

/// A subscription to `token`'s removal, as a stream opened with it has.
fn subscribe(accepted: &Accepted, token: &str) -> watch::Receiver<bool> {
    let index = accepted.position(&digest(token.as_bytes())).unwrap();
    accepted.removed[index].subscribe()
}

/// A reload keeps the signal of every token still listed, whatever else
/// changed, and hands back exactly the signals of the tokens it removed:
/// rotation (old and new both listed, then old removed), an unchanged
/// file, duplicates, an emptied file.
#[test]
fn a_reload_signals_exactly_the_removed_tokens() {
    let mut accepted = Accepted::new(digests(&["old", "other", "old"]));
    assert_eq!(accepted.digests.len(), 2, "a duplicate is one token");
    let old = subscribe(&accepted, "old");
    let other = subscribe(&accepted, "other");

    // Rotation, first step: the new token is added.
    assert!(
        accepted
            .replace(digests(&["other", "new", "old"]))
            .is_empty()
    );
    let new = subscribe(&accepted, "new");
    // The same file again.
    assert!(
        accepted
            .replace(digests(&["old", "new", "other"]))
            .is_empty()
    );
    assert!(!old.has_changed().unwrap() && !other.has_changed().unwrap());
    assert!(accepted.position(&digest(b"old")).is_some());

    // Rotation, second step: the old token is removed.
    let removed = accepted.replace(digests(&["new", "other"]));
    assert_eq!(removed.len(), 1);
    assert!(removed[0].subscribe().same_channel(&old));
    assert!(accepted.position(&digest(b"old")).is_none());
    assert!(accepted.position(&digest(b"nope")).is_none());
    for signal in removed {
        signal.send_replace(true);
    }
    assert!(*old.borrow(), "the old token's streams are told");
    assert!(!*other.borrow() && !*new.borrow());
    assert!(!other.has_changed().unwrap() && !new.has_changed().unwrap());

    // Emptied: every token goes.
    let removed = accepted.replace(Vec::new());
    assert_eq!(removed.len(), 2);
    assert!(removed.iter().any(|s| s.subscribe().same_channel(&other)));
    assert!(removed.iter().any(|s| s.subscribe().same_channel(&new)));
    assert!(accepted.digests.is_empty() && accepted.removed.is_empty());
}

/// The index found is the presented token's, wherever it sits.
#[test]
fn position_finds_each_token() {
    let tokens = ["a", "b", "c", "d", "e"];
    let accepted = Accepted::new(digests(&tokens));
    for token in tokens {
        let index = accepted.position(&digest(token.as_bytes())).unwrap();
        assert_eq!(accepted.digests[index], digest(token.as_bytes()));
    }
    assert!(Accepted::new(Vec::new()).position(&digest(b"a")).is_none());
}
