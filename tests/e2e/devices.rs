//! Trusted devices (#24): a login that presents a device token issued to it
//! by an earlier successful login of the same account counts against that
//! device alone, so an attacker who locks the account (or a shared address)
//! for untrusted clients does not lock out its owner; a stolen token is held
//! to its own limit and forgotten after the lockout factor.

use std::time::Duration;

use session_server::{
    Config,
    model::{AccountKey, DeviceToken},
};
use sessionstore::v1::{
    ForgetLoginDevicesRequest, LoginLimit as PbLimit, RecordLoginAttemptRequest,
    ResetLoginAttemptsRequest, session_store_client::SessionStoreClient,
};
use tonic::{Code, transport::Channel};

use crate::support::{
    TestServer, inspect, login_account_key, pttl, record_attempt as attempt,
    reset_attempts as login, server_script, test_config,
};

type Client = SessionStoreClient<Channel>;

/// Runs every future as its own task, all in flight at once; their outputs
/// in order.
async fn all<T, F>(futures: impl IntoIterator<Item = F>) -> Vec<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}

/// A new device token for `account`, as a first successful login gets it.
async fn issue(c: &mut Client, account: &str) -> String {
    let token = login(c, "198.51.100.200", account, "", true)
        .await
        .device_token;
    assert!(token.len() >= 32, "at least 128 bits: {token:?}");
    token
}

async fn forget(c: &mut Client, account: &str) -> u32 {
    c.forget_login_devices(ForgetLoginDevicesRequest {
        account: account.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .forgotten
}

fn device_key(config: &Config, account: &str, token: &str) -> String {
    let device = DeviceToken::parse(token).unwrap().key();
    format!("{}:{device}", login_account_key(config, "device", account))
}

/// How many trusted devices `account` has.
async fn devices(config: &Config, account: &str) -> i64 {
    inspect(
        config,
        redis::cmd("ZCARD").arg(login_account_key(config, "devices", account)),
    )
    .await
}

/// Whether an attempt from `ip` for `account` presenting `token` is counted
/// as a trusted device's.
async fn trusted(c: &mut Client, ip: &str, account: &str, token: &str) -> bool {
    attempt(c, ip, account, token).await.device_trusted
}

/// 1,000 wrong attempts for one account from 100 addresses lock it for
/// untrusted clients (ACCOUNT), while its owner, presenting the device token
/// an earlier login issued, is allowed throughout, from a new address and
/// from one the attacker used; the owner's logins clear only the device's
/// attempts, so the account stays locked for the botnet.
#[tokio::test]
async fn an_attacker_cannot_lock_out_a_trusted_device() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let victim = "victim@example.com";
    let token = issue(&mut c, victim).await;
    let mut untrusted_refused = 0;
    for round in 0..10u32 {
        // 100 attempts per round, one from each of the 100 addresses.
        let attempts = (0..100u32).map(|host| {
            let mut c = c.clone();
            async move {
                attempt(&mut c, &format!("10.24.0.{host}"), victim, "")
                    .await
                    .allowed
            }
        });
        let allowed = all(attempts).await;
        untrusted_refused += allowed.iter().filter(|a| !**a).count();
        // The owner, from a new address and from one the attacker uses.
        for ip in [format!("203.0.113.{round}"), format!("10.24.0.{round}")] {
            let verdict = attempt(&mut c, &ip, victim, &token).await;
            assert!(verdict.allowed, "round {round} from {ip}: {verdict:?}");
            assert!(verdict.device_trusted);
            assert_eq!(verdict.refused_by, PbLimit::Unspecified as i32);
        }
        // Its successful login clears the device's attempts only.
        assert!(
            login(&mut c, "203.0.113.1", victim, &token, false)
                .await
                .reset
        );
        // Still locked for everyone untrusted, from a fresh address too.
        let fresh = attempt(&mut c, &format!("198.51.100.{round}"), victim, "").await;
        assert!(!fresh.allowed, "round {round}: {fresh:?}");
        assert_eq!(fresh.refused_by, PbLimit::Account as i32);
        assert!(!fresh.device_trusted);
    }
    // RATE_LIMIT_ACCOUNT_MAX_ATTEMPTS (10) of the 1,000 got through.
    assert_eq!(untrusted_refused, 990);
}

/// A stolen device token hammered is refused after its own limit (DEVICE),
/// does not lock the account for its other devices or for untrusted
/// clients, and once refused LOGIN_DEVICE_LOCKOUT_FACTOR times its limit is
/// untrusted for good.
#[tokio::test]
async fn a_stolen_device_token_is_limited_then_forgotten() {
    let mut config = test_config();
    config.rate_limit_device_max_attempts = 3;
    config.login_device_lockout_factor = 2;
    let server = TestServer::start_with(config.clone()).await;
    let mut c = server.client().await;
    let account = "owner@example.com";
    let stolen = issue(&mut c, account).await;
    let other = issue(&mut c, account).await;
    for n in 1..=3 {
        let verdict = attempt(&mut c, "192.0.2.66", account, &stolen).await;
        assert!(
            verdict.allowed && verdict.device_trusted,
            "{n}: {verdict:?}"
        );
        assert_eq!(verdict.attempts, n);
        assert_eq!(verdict.remaining, 3 - n);
    }
    // Six refusals (2 x 3): each refused by the device, with a retry_after.
    for n in 1..=6 {
        let verdict = attempt(&mut c, "192.0.2.66", account, &stolen).await;
        assert!(!verdict.allowed, "refusal {n}: {verdict:?}");
        assert!(verdict.device_trusted);
        assert_eq!(verdict.refused_by, PbLimit::Device as i32);
        assert!(verdict.retry_after.is_some());
        // The account is not locked: the other device and an untrusted
        // client are allowed.
        if n == 3 {
            let mine = attempt(&mut c, "203.0.113.9", account, &other).await;
            assert!(mine.allowed && mine.device_trusted, "{mine:?}");
            let untrusted = attempt(&mut c, "203.0.113.10", account, "").await;
            assert!(untrusted.allowed && !untrusted.device_trusted);
        }
    }
    // Forgotten: from now on it counts as no token (the address's limit of
    // 5 applies to it), and a login presenting it does not revive it.
    let verdict = attempt(&mut c, "192.0.2.66", account, &stolen).await;
    assert!(!verdict.device_trusted, "{verdict:?}");
    assert!(verdict.allowed, "counted as untrusted: {verdict:?}");
    let _ = login(&mut c, "192.0.2.67", account, &stolen, false).await;
    assert!(!trusted(&mut c, "192.0.2.68", account, &stolen).await);
    let members = devices(&config, account).await;
    assert_eq!(members, 1, "only the other device is left");
    assert!(trusted(&mut c, "192.0.2.69", account, &other).await);
}

/// A device token trusts only its own account; a made-up one is untrusted;
/// neither is an error.
#[tokio::test]
async fn a_device_token_trusts_only_its_account() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a_token = issue(&mut c, "a@example.com").await;
    let _b_token = issue(&mut c, "b@example.com").await;
    assert!(trusted(&mut c, "192.0.2.1", "a@example.com", &a_token).await);
    let crossed = attempt(&mut c, "192.0.2.1", "b@example.com", &a_token).await;
    assert!(crossed.allowed && !crossed.device_trusted, "{crossed:?}");
    let made_up = "f".repeat(64);
    let guessed = attempt(&mut c, "192.0.2.1", "a@example.com", &made_up).await;
    assert!(guessed.allowed && !guessed.device_trusted, "{guessed:?}");
    // A token without an account trusts nothing.
    let bare = attempt(&mut c, "192.0.2.1", "", &a_token).await;
    assert!(!bare.device_trusted);
    // Presenting another account's token at reset clears the account's
    // counter as a login without a token does (and issues nothing unasked).
    let reset = login(&mut c, "192.0.2.1", "b@example.com", &a_token, false).await;
    assert!(reset.reset);
    assert!(reset.device_token.is_empty());
}

/// With LOGIN_DEVICE_TTL=1 a token is trusted at once and untrusted after a
/// second.
#[tokio::test]
async fn an_expired_device_token_is_untrusted() {
    let server = TestServer::start_tuned(|c| c.login_device_ttl = 1).await;
    let mut c = server.client().await;
    let token = issue(&mut c, "brief@example.com").await;
    assert!(trusted(&mut c, "192.0.2.2", "brief@example.com", &token).await);
    let config = server.config.clone();
    let ttl = pttl(
        &config,
        &login_account_key(&config, "devices", "brief@example.com"),
    )
    .await;
    assert!(
        (1..=1000).contains(&ttl),
        "the set expires with its device: {ttl}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late = attempt(&mut c, "192.0.2.2", "brief@example.com", &token).await;
    assert!(!late.device_trusted, "{late:?}");
}

/// ForgetLoginDevices untrusts every token of the account at once, and only
/// that account's.
#[tokio::test]
async fn forgetting_devices_untrusts_them_all() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let account = "reset@example.com";
    let tokens = [issue(&mut c, account).await, issue(&mut c, account).await];
    let elsewhere = issue(&mut c, "kept@example.com").await;
    assert_eq!(forget(&mut c, account).await, 2);
    for token in &tokens {
        assert!(!trusted(&mut c, "192.0.2.3", account, token).await);
    }
    assert!(trusted(&mut c, "192.0.2.3", "kept@example.com", &elsewhere).await);
    assert_eq!(forget(&mut c, account).await, 0);
}

/// LOGIN_DEVICE_MAX bounds an account's devices: issuing past it forgets the
/// oldest; a trusted token presented with an issue is replaced.
#[tokio::test]
async fn issuing_past_the_device_max_forgets_the_oldest() {
    let server = TestServer::start_tuned(|c| c.login_device_max = 3).await;
    let mut c = server.client().await;
    let account = "many@example.com";
    let mut tokens = Vec::new();
    for _ in 0..4 {
        tokens.push(issue(&mut c, account).await);
        // Distinct expiries, so "oldest" is well defined.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!trusted(&mut c, "192.0.2.4", account, &tokens[0]).await);
    for token in &tokens[1..] {
        assert!(trusted(&mut c, "192.0.2.4", account, token).await);
    }
    // A re-login from a trusted device rotates its token.
    let renewed = login(&mut c, "192.0.2.4", account, &tokens[3], true)
        .await
        .device_token;
    assert!(!trusted(&mut c, "192.0.2.4", account, &tokens[3]).await);
    assert!(trusted(&mut c, "192.0.2.4", account, &renewed).await);
    let config = server.config.clone();
    let members = devices(&config, account).await;
    assert_eq!(members, 3);
}

/// 50 concurrent attempts presenting one device token: exactly the device's
/// limit (RATE_LIMIT_DEVICE_MAX_ATTEMPTS, 10) is allowed.
#[tokio::test]
async fn concurrent_attempts_with_one_device_allow_exactly_its_limit() {
    let server = TestServer::start().await;
    let c = server.client().await;
    let token = issue(&mut c.clone(), "busy@example.com").await;
    let attempts = (0..50u32).map(|i| {
        let mut c = c.clone();
        let token = token.clone();
        async move { attempt(&mut c, &format!("192.0.2.{i}"), "busy@example.com", &token).await }
    });
    let verdicts = all(attempts).await;
    assert!(verdicts.iter().all(|v| v.device_trusted));
    let allowed = verdicts.iter().filter(|v| v.allowed).count();
    assert_eq!(allowed, 10);
    assert!(
        verdicts
            .iter()
            .filter(|v| !v.allowed)
            .all(|v| v.refused_by == PbLimit::Device as i32)
    );
}

/// The device keys hold hashes only (never the account or the token) and
/// every one of them has a TTL.
#[tokio::test]
async fn device_keys_hold_hashes_and_expire() {
    let server = TestServer::start_tuned(|c| c.rate_limit_device_max_attempts = 1).await;
    let mut c = server.client().await;
    let account = "keys@example.com";
    let token = issue(&mut c, account).await;
    attempt(&mut c, "192.0.2.5", account, &token).await;
    let refused = attempt(&mut c, "192.0.2.5", account, &token).await;
    assert_eq!(refused.refused_by, PbLimit::Device as i32);
    let config = server.config.clone();
    for key in [
        login_account_key(&config, "devices", account),
        device_key(&config, account, &token),
        login_account_key(&config, "device_refusals", account),
    ] {
        assert!(!key.contains(account) && !key.contains(&token), "{key}");
        let ttl = pttl(&config, &key).await;
        assert!(ttl > 0, "{key} has no TTL: {ttl}");
    }
    let members: Vec<String> = inspect(
        &config,
        redis::cmd("ZRANGE")
            .arg(login_account_key(&config, "devices", account))
            .arg(0)
            .arg(-1),
    )
    .await;
    assert_eq!(members, [DeviceToken::parse(&token).unwrap().key()]);
}

/// A device token over 256 bytes or not printable ASCII is INVALID_ARGUMENT
/// naming device_token, in both calls that take one.
#[tokio::test]
async fn a_bad_device_token_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for bad in [
        "a".repeat(257),
        "has space".into(),
        "é".into(),
        "nul\u{0}".into(),
    ] {
        let status = c
            .record_login_attempt(RecordLoginAttemptRequest {
                ip: "192.0.2.6".into(),
                account: "x@example.com".into(),
                device_token: bad.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains("device_token"), "{status:?}");
        let status = c
            .reset_login_attempts(ResetLoginAttemptsRequest {
                ip: "192.0.2.6".into(),
                account: "x@example.com".into(),
                device_token: bad.clone(),
                issue_device_token: true,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains("device_token"), "{status:?}");
    }
    let status = c
        .forget_login_devices(ForgetLoginDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("account"), "{status:?}");
}

/// An untrusted device token (here a made-up one) counts exactly as no token:
/// the account's limit refuses with ACCOUNT and that attempt is not counted
/// at the address; the address's limit refuses with ADDRESS and that attempt
/// is not counted for the account (its give-back, since an untrusted token
/// is counted for the account first).
#[tokio::test]
async fn an_untrusted_token_counts_as_no_token() {
    let server = TestServer::start_tuned(|c| {
        c.rate_limit_max_attempts = 3;
        c.rate_limit_account_max_attempts = 2;
    })
    .await;
    let mut c = server.client().await;
    let made_up = "e".repeat(64);
    for (round, token) in [(1, ""), (2, made_up.as_str())] {
        let account = format!("x{round}@example.com");
        let other = format!("y{round}@example.com");
        let (ip, fresh_ip) = (format!("192.0.2.{round}"), format!("198.51.100.{round}"));
        for _ in 0..2 {
            assert!(attempt(&mut c, &ip, &account, token).await.allowed);
        }
        let by_account = attempt(&mut c, &ip, &account, token).await;
        assert!(!by_account.allowed, "round {round}: {by_account:?}");
        assert_eq!(
            by_account.refused_by,
            PbLimit::Account as i32,
            "round {round}"
        );
        assert!(!by_account.device_trusted && by_account.retry_after.is_some());
        // Not counted at the address: it has made two attempts of three.
        assert!(attempt(&mut c, &ip, &other, token).await.allowed);
        let by_address = attempt(&mut c, &ip, &other, token).await;
        assert_eq!(
            by_address.refused_by,
            PbLimit::Address as i32,
            "round {round}: {by_address:?}"
        );
        // Not counted for the other account: one of its two attempts is used,
        // so from a fresh address exactly one more is allowed.
        assert!(attempt(&mut c, &fresh_ip, &other, token).await.allowed);
        let other_locked = attempt(&mut c, &fresh_ip, &other, token).await;
        assert_eq!(
            other_locked.refused_by,
            PbLimit::Account as i32,
            "round {round}: {other_locked:?}"
        );
    }
}

/// The account's give-back (an untrusted token's attempt, refused by the
/// address) that lands after a reset of the account gives nothing back: the
/// reset already cleared that attempt, and a decrement would erase an
/// attempt made after the reset. The server's scripts, run by hand in the
/// order a race produces; the same give-back without the reset does give
/// back.
#[tokio::test]
async fn an_account_give_back_after_a_reset_erases_nothing() {
    let config = test_config();
    let attempt_script = server_script("login_device_attempt");
    let reset_script = server_script("login_account_reset");
    let undo_script = server_script("login_account_undo");
    let account = format!("{}give-back@example.com", config.key_prefix);
    let account = AccountKey::parse(&account).unwrap();
    let tagged = |name: &str| {
        format!(
            "{}rate_limit:login:{name}:{{{}}}",
            config.key_prefix,
            account.as_str()
        )
    };
    let (counter, epoch) = (tagged("account"), tagged("account_epoch"));
    let keys = [
        tagged("devices"),
        tagged("device_refusals"),
        tagged("device"),
        counter.clone(),
        epoch.clone(),
    ];
    // An untrusted attempt: one huge bucket, so every step lands in it.
    let take = || {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&attempt_script).arg(keys.len()).arg(&keys[..]);
        cmd.arg("0".repeat(64)).arg(1_000_000_000_u64).arg(10);
        cmd.arg(10).arg(10).arg(5);
        cmd
    };
    let give_back = |bucket: i64, epoch_seen: i64| {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&undo_script).arg(2).arg(&counter).arg(&epoch);
        cmd.arg(bucket).arg(epoch_seen);
        cmd
    };
    let counted = || async {
        let counts: Vec<i64> = inspect(&config, redis::cmd("HVALS").arg(&counter)).await;
        counts.iter().sum::<i64>()
    };
    type Reply = (u8, u8, u64, u64, u64, i64, i64);
    // Without a reset in between, the give-back takes the attempt off.
    let (trusted, allowed, _, _, _, bucket, seen): Reply = inspect(&config, &take()).await;
    assert_eq!((trusted, allowed), (0, 1));
    let undone: i64 = inspect(&config, &give_back(bucket, seen)).await;
    assert_eq!((undone, counted().await), (1, 0));
    // An attempt, then the account's reset, then a new attempt in the same
    // bucket, then the first attempt's give-back: nothing to give back.
    let (_, _, _, _, _, bucket, seen): Reply = inspect(&config, &take()).await;
    let deleted: i64 = inspect(
        &config,
        redis::cmd("EVAL")
            .arg(&reset_script)
            .arg(2)
            .arg(&counter)
            .arg(&epoch)
            .arg(60_000),
    )
    .await;
    assert_eq!(deleted, 1);
    let _: Reply = inspect(&config, &take()).await;
    let undone: i64 = inspect(&config, &give_back(bucket, seen)).await;
    assert_eq!(undone, 0, "a give-back across a reset");
    assert_eq!(
        counted().await,
        1,
        "the attempt after the reset still counts"
    );
    let epoch_ttl: i64 = inspect(&config, redis::cmd("PTTL").arg(&epoch)).await;
    assert!(epoch_ttl > 0 && epoch_ttl <= 60_000, "{epoch_ttl}");
    let _: i64 = inspect(&config, redis::cmd("DEL").arg(&counter).arg(&epoch)).await;
}
