//! Verifies a session, then signs its user out everywhere: the two calls an
//! auth service makes most, against a SessionStore at http://127.0.0.1:50051
//! (or `SESSIONSTORE_URL`).
//!
//! ```text
//! cargo run -p session-client --example verify -- [USER_ID] [TOKEN_ID]
//! ```
//!
//! So that there is something to verify, it first creates the session (a
//! no-op if the token id already has one).

use std::{collections::HashMap, process::ExitCode, time::Duration};

use session_client::{Error, SessionClient};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let url = std::env::var("SESSIONSTORE_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut args = std::env::args().skip(1);
    let user_id = args.next().unwrap_or_else(|| "demo-user".into());
    let token_id = args.next().unwrap_or_else(|| "demo-token".into());

    let client = SessionClient::builder(&url)
        .timeout(Duration::from_secs(1))
        .connect()
        .await?;

    let metadata = HashMap::from([("device".to_string(), "verify example".to_string())]);
    let created = client.create_session(&user_id, &token_id, metadata).await?;
    println!("create {token_id} for {user_id}: created={created}");

    // What a gateway does on each request: is this JWT's session alive?
    match client.get_user_session(&user_id, &token_id).await? {
        Some(session) => {
            let left = session
                .expires_at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            println!("verify: valid, about {} s left", left.as_secs());
        }
        None => println!("verify: no live session (revoked, expired or another user's)"),
    }

    // "Sign out everywhere".
    let ended = client.revoke_all_user_sessions(&user_id).await?;
    println!("sign out everywhere: {ended} session(s) ended");

    let still = client.get_user_session(&user_id, &token_id).await?;
    println!(
        "verify again: {}",
        if still.is_some() {
            "still valid"
        } else {
            "revoked"
        }
    );
    Ok(())
}
