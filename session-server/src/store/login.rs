//! The login rate limiter: attempts per client address and per account, in a
//! sliding window, with resets that clear only what a successful login proves.
//!
//! # Why a bucketed sliding-window counter
//!
//! The contract is "no subject gets more than its limit allowed in any
//! interval of RATE_LIMIT_WINDOW". A fixed window breaks it at the boundary
//! (2 × limit within a moment). The usual alternatives break it too:
//! Cloudflare's weighted two-window counter estimates the previous window's
//! share and lets limit/2 extra through when those attempts came late in it,
//! and GCRA with a burst of `limit` lets a full burst through and then one
//! more every window/limit, up to 2 × limit in one window. An exact sliding
//! log keeps one entry per attempt. So each subject keeps one hash of N + 1
//! per-bucket counts (buckets of window/N, N = [`BUCKETS_PER_WINDOW`]), and an
//! attempt is allowed while the last N + 1 buckets hold fewer than `limit`
//! allowed attempts: that span always covers the whole window behind the
//! attempt, so the contract holds exactly, memory is O(1) per subject (at most
//! N + 1 fields, whatever the attack rate), and `retry_after` is exact (the
//! moment enough old buckets leave the span). The price is that an attempt
//! may be refused up to window/N longer than an exact log would refuse it.
//! Refused attempts are not counted, so hammering does not extend a lockout.
//!
//! # Address and account across slots
//!
//! The address's keys (its counter and the (address, account) pair counter)
//! share the address's hash tag; the account's counter has the account's.
//! Putting all of them in one slot would need one hash tag for every login
//! key, one hot slot for the whole cluster, so instead the call stays correct
//! across slots: it takes an attempt from the address (one script), then from
//! the account (another); when the account refuses, it gives the address's
//! attempt back. Each take is atomic in its slot, and a give-back only lowers
//! a count and only while the pair counter still holds the attempt (a reset
//! with that account in between has already taken it off, and a second
//! decrement would erase a guess against another account), so at every
//! moment a counter holds at least the attempts its subject was allowed: no
//! subject ever passes its limit, even with calls racing. A call that fails between the two steps leaves the address's
//! attempt counted, which errs towards refusing.
//!
//! # Reset without the bypass
//!
//! Every attempt that names an account is counted twice on the address's
//! side: in the address's counter and in the pair counter of (address,
//! account), in the same bucket. Resetting with an account deletes the
//! account's counter and subtracts the pair's buckets from the address's
//! counter, so the address keeps every attempt it made against other
//! accounts: logging in to one's own account no longer wipes the guesses
//! made against someone else's.
//!
//! A reset without an account deletes the address's counter and leaves its
//! pair counters to expire; a later reset with an account then subtracts a
//! pair's old buckets from the new counter, which can clear up to that many
//! newer attempts in those buckets. A caller that mixes both resets is
//! therefore no stronger than the reset without an account, which is already
//! documented as the weak one.
//!
//! # Trusted devices
//!
//! Anyone can lock an account for untrusted clients (its limit of attempts
//! from any addresses), so a login that presents a device token issued to
//! it after an earlier successful login of the same account counts against
//! that device's own counter alone (OWASP's device cookies): not against
//! the address, not against the account. The account's devices, their
//! refusals and each device's counter are tagged by the account's hash, so
//! one script (`login_device_attempt.lua`) sees the device's trust and its
//! counter atomically, in one round trip; a trusted attempt costs that one
//! round trip, fewer than an attempt naming an account without a device
//! (two, three when the account refuses). An untrusted token (made up,
//! expired, forgotten, another account's) costs what an attempt without one
//! does: the same script, finding the token untrusted, takes the attempt
//! from the account's counter, then the address's step follows, and when
//! the address refuses the account's attempt is given back. That is the
//! order above reversed, and the give-back needs its own proof: a reset of
//! the account deletes its counter, and a give-back arriving after it and
//! after new attempts in the same bucket would erase one of those. So the
//! account's reset moves a reset epoch on (`login_account_reset.lua`), the
//! attempt carries the epoch it was counted at, and the give-back
//! (`login_account_undo.lua`) changes nothing once the epoch has moved. A
//! device's refusals add up
//! over the token's life, and at LOGIN_DEVICE_LOCKOUT_FACTOR times its limit
//! the token is forgotten, so a stolen token yields at most its limit per
//! window and a bounded total before it is worth nothing.
//!
//! A reset presenting a trusted device clears only that device's counter:
//! a login from a trusted device proves nothing about the untrusted
//! attempts, and clearing them would hand a botnet a fresh set of guesses
//! each time the real user logs in.

use std::time::Duration;

use super::{Store, connection::Op, millis};
use crate::{
    error::Error,
    model::{AccountKey, ClientAddr, DeviceToken, LoginLimit, LoginReset, LoginVerdict},
};

/// Buckets per window (N): the finer, the closer to an exact sliding log (an
/// attempt is refused at most window/N too long) and the more fields a
/// counter holds (N + 1).
pub(crate) const BUCKETS_PER_WINDOW: u64 = 10;

/// What login_attempt.lua answers for one subject.
#[derive(Clone, Copy, Debug)]
struct Take {
    allowed: bool,
    /// Allowed attempts in the span before this one.
    before: u64,
    retry_ms: u64,
    bucket: i64,
    now_ms: u64,
}

impl Take {
    fn attempts(&self) -> u32 {
        u32::try_from(self.before.saturating_add(1)).unwrap_or(u32::MAX)
    }

    fn remaining(&self, max: u32) -> u32 {
        if self.allowed {
            max.saturating_sub(self.attempts())
        } else {
            0
        }
    }
}

/// What login_device_attempt.lua made of a device token.
#[derive(Debug)]
enum Device {
    /// Trusted for the account: its own counter decided.
    Trusted(LoginVerdict),
    /// Untrusted: the attempt was counted for the account as without a
    /// token, at the account's reset `epoch`.
    Untrusted { at_account: Take, epoch: i64 },
}

impl Store {
    /// The bucket length: ceil(window / N), so N buckets span at least a window.
    fn bucket_ms(&self) -> u64 {
        millis(self.settings().rate_limit_window)
            .div_ceil(BUCKETS_PER_WINDOW)
            .max(1)
    }

    /// Runs login_attempt.lua on one subject's keys.
    async fn take(
        &self,
        op: &mut Op,
        keys: &[String],
        limit: u32,
        take: bool,
    ) -> Result<Take, Error> {
        let mut invocation = self.shared.scripts.login_attempt.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation
            .arg(self.bucket_ms())
            .arg(BUCKETS_PER_WINDOW)
            .arg(limit)
            .arg(if take { "take" } else { "peek" });
        let (allowed, before, retry_ms, bucket, now_ms): (u8, u64, u64, i64, u64) =
            op.invoke(&invocation).await?;
        Ok(Take {
            allowed: allowed == 1,
            before,
            retry_ms,
            bucket,
            now_ms,
        })
    }

    /// Counts one login attempt from `addr`, and for `account` when given,
    /// and says whether it may proceed (see the module docs for the method).
    ///
    /// A `device` valid for `account` makes the attempt count against that
    /// device alone (see the module docs); any other device counts as none.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn record_login_attempt(
        &self,
        addr: &ClientAddr,
        account: Option<&AccountKey>,
        device: Option<&DeviceToken>,
    ) -> Result<LoginVerdict, Error> {
        let settings = self.settings();
        let addr_max = settings.rate_limit_max_attempts;
        let account_max = settings.rate_limit_account_max_attempts;
        // One operation, so one deadline, for the whole call.
        let mut op = self.op("record_login_attempt").await?;
        if let (Some(account), Some(device)) = (account, device) {
            return match self.take_device(&mut op, account, device).await? {
                Device::Trusted(verdict) => Ok(verdict),
                Device::Untrusted { at_account, epoch } => {
                    self.take_address_after_account(&mut op, addr, account, at_account, epoch)
                        .await
                }
            };
        }
        let mut addr_keys = vec![self.rate_limit_key(addr)];
        if let Some(account) = account {
            addr_keys.push(self.login_pair_key(addr, account));
        }
        let at_addr = self.take(&mut op, &addr_keys, addr_max, true).await?;
        let Some(account) = account else {
            return Ok(verdict(at_addr, addr_max, None));
        };
        let account_keys = [self.login_account_key(account)];
        // Taken from the account only when the address allowed it: a refused
        // attempt counts nowhere. Otherwise the account is only asked how long
        // it would refuse, so that retry_after covers both limits.
        let at_account = self
            .take(&mut op, &account_keys, account_max, at_addr.allowed)
            .await?;
        if at_addr.allowed && !at_account.allowed {
            let mut undo = self.shared.scripts.login_undo.prepare_invoke();
            for key in &addr_keys {
                undo.key(key);
            }
            undo.arg(at_addr.bucket);
            let _: i64 = op.invoke(&undo).await?;
        }
        Ok(verdict(at_addr, addr_max, Some((at_account, account_max))))
    }

    /// Runs login_device_attempt.lua: a trusted `device` is counted alone
    /// and decides the call; an untrusted one was counted for `account` (the
    /// account's side of the call, see the module docs).
    async fn take_device(
        &self,
        op: &mut Op,
        account: &AccountKey,
        device: &DeviceToken,
    ) -> Result<Device, Error> {
        let settings = self.settings();
        let max = settings.rate_limit_device_max_attempts;
        let lockout = max.saturating_mul(settings.login_device_lockout_factor);
        let hash = device.key();
        let mut invocation = self.shared.scripts.login_device_attempt.prepare_invoke();
        invocation
            .key(self.login_devices_key(account))
            .key(self.login_device_refusals_key(account))
            .key(self.login_device_key(account, &hash))
            .key(self.login_account_key(account))
            .key(self.login_account_epoch_key(account))
            .arg(&hash)
            .arg(self.bucket_ms())
            .arg(BUCKETS_PER_WINDOW)
            .arg(max)
            .arg(lockout)
            .arg(settings.rate_limit_account_max_attempts);
        let (trusted, allowed, before, retry_ms, now_ms, bucket, epoch): (
            u8,
            u8,
            u64,
            u64,
            u64,
            i64,
            i64,
        ) = op.invoke(&invocation).await?;
        let take = Take {
            allowed: allowed == 1,
            before,
            retry_ms,
            bucket,
            now_ms,
        };
        if trusted == 0 {
            return Ok(Device::Untrusted {
                at_account: take,
                epoch,
            });
        }
        Ok(Device::Trusted(LoginVerdict {
            allowed: take.allowed,
            attempts: take.attempts(),
            remaining: take.remaining(max),
            retry_after: (!take.allowed).then(|| Duration::from_millis(retry_ms)),
            refused_by: (!take.allowed).then_some(LoginLimit::Device),
            decided_at_ms: now_ms,
            device_trusted: true,
        }))
    }

    /// The address's side of an attempt whose untrusted device token had it
    /// counted for `account` first (`at_account`): today's two steps in the
    /// other order, so the call still costs two round trips, three when the
    /// second step refuses. The address is taken only when the account
    /// allowed the attempt (otherwise only asked how long it would refuse,
    /// for retry_after); when the address refuses, the account's attempt is
    /// given back, unless a reset of the account (`epoch` moved on) already
    /// cleared it.
    async fn take_address_after_account(
        &self,
        op: &mut Op,
        addr: &ClientAddr,
        account: &AccountKey,
        at_account: Take,
        epoch: i64,
    ) -> Result<LoginVerdict, Error> {
        let settings = self.settings();
        let addr_max = settings.rate_limit_max_attempts;
        let account_max = settings.rate_limit_account_max_attempts;
        let addr_keys = [
            self.rate_limit_key(addr),
            self.login_pair_key(addr, account),
        ];
        let at_addr = self
            .take(op, &addr_keys, addr_max, at_account.allowed)
            .await?;
        if at_account.allowed && !at_addr.allowed {
            let mut undo = self.shared.scripts.login_account_undo.prepare_invoke();
            undo.key(self.login_account_key(account))
                .key(self.login_account_epoch_key(account))
                .arg(at_account.bucket)
                .arg(epoch);
            let _: i64 = op.invoke(&undo).await?;
        }
        Ok(verdict(at_addr, addr_max, Some((at_account, account_max))))
    }

    /// Clears login attempts after a successful login: with `account`, the
    /// account's counter and `addr`'s attempts for that account (its other
    /// attempts stay counted); without, `addr`'s whole counter. With a
    /// `device` trusted for `account`, only that device's counter (see the
    /// module docs). With `account` and `issue`, also issues a new device
    /// token for it (replacing a trusted `device`). Returns whether any
    /// counted attempt was cleared, and the new token.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`];
    /// [`Error::Internal`] when the system's random generator fails.
    pub async fn reset_login_attempts(
        &self,
        addr: &ClientAddr,
        account: Option<&AccountKey>,
        device: Option<&DeviceToken>,
        issue: bool,
    ) -> Result<LoginReset, Error> {
        let mut op = self.op("reset_login_attempts").await?;
        let mut issued = None;
        if let Some(account) = account.filter(|_| issue || device.is_some()) {
            issued = issue.then(DeviceToken::generate).transpose()?;
            let settings = self.settings();
            let presented = device.map(DeviceToken::key);
            let mut reset = self.shared.scripts.login_device_reset.prepare_invoke();
            reset
                .key(self.login_devices_key(account))
                .key(self.login_device_refusals_key(account));
            if let Some(hash) = &presented {
                reset.key(self.login_device_key(account, hash));
            }
            reset
                .arg(presented.as_deref().unwrap_or(""))
                .arg(issued.as_ref().map(DeviceToken::key).unwrap_or_default())
                .arg(millis(settings.login_device_ttl))
                .arg(settings.login_device_max);
            let (trusted, cleared, _forgotten): (u8, u8, u64) = op.invoke(&reset).await?;
            if trusted == 1 {
                return Ok(LoginReset {
                    reset: cleared == 1,
                    device_token: issued,
                });
            }
        }
        let reset = self.reset_untrusted(&mut op, addr, account).await?;
        Ok(LoginReset {
            reset,
            device_token: issued,
        })
    }

    /// Forgets every device of `account`; returns how many were unexpired.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn forget_login_devices(&self, account: &AccountKey) -> Result<u32, Error> {
        let mut op = self.op("forget_login_devices").await?;
        let mut forget = self.shared.scripts.login_device_forget.prepare_invoke();
        forget
            .key(self.login_devices_key(account))
            .key(self.login_device_refusals_key(account));
        let forgotten: u64 = op.invoke(&forget).await?;
        Ok(u32::try_from(forgotten).unwrap_or(u32::MAX))
    }

    /// The reset without a trusted device (see [`Store::reset_login_attempts`]).
    async fn reset_untrusted(
        &self,
        op: &mut Op,
        addr: &ClientAddr,
        account: Option<&AccountKey>,
    ) -> Result<bool, Error> {
        let Some(account) = account else {
            let deleted: i64 = op
                .query(redis::cmd("DEL").arg(self.rate_limit_key(addr)))
                .await?;
            return Ok(deleted == 1);
        };
        let mut reset = self.shared.scripts.login_reset.prepare_invoke();
        reset
            .key(self.rate_limit_key(addr))
            .key(self.login_pair_key(addr, account));
        let cleared: i64 = op.invoke(&reset).await?;
        // The account's counter lives in another slot: a script of its own,
        // which also moves its reset epoch on (login_account_undo.lua).
        let mut account_reset = self.shared.scripts.login_account_reset.prepare_invoke();
        account_reset
            .key(self.login_account_key(account))
            .key(self.login_account_epoch_key(account))
            .arg(self.bucket_ms() * (BUCKETS_PER_WINDOW + 1));
        let deleted: i64 = op.invoke(&account_reset).await?;
        Ok(cleared > 0 || deleted == 1)
    }
}

/// The call's verdict from the address's answer and, when an account was
/// named, the account's.
fn verdict(addr: Take, addr_max: u32, account: Option<(Take, u32)>) -> LoginVerdict {
    let decided_at_ms = addr.now_ms;
    let (refusing, refused_by, retry_ms) = match account {
        None => (addr, LoginLimit::Address, addr.retry_ms),
        Some((acct, _)) => {
            let retry_ms = addr.retry_ms.max(acct.retry_ms);
            if !addr.allowed && (acct.allowed || addr.retry_ms >= acct.retry_ms) {
                (addr, LoginLimit::Address, retry_ms)
            } else if addr.allowed && acct.allowed {
                (addr, LoginLimit::Address, 0)
            } else {
                (acct, LoginLimit::Account, retry_ms)
            }
        }
    };
    let allowed = addr.allowed && account.is_none_or(|(acct, _)| acct.allowed);
    let remaining = match account {
        Some((acct, acct_max)) if allowed => addr.remaining(addr_max).min(acct.remaining(acct_max)),
        _ if allowed => addr.remaining(addr_max),
        _ => 0,
    };
    LoginVerdict {
        allowed,
        attempts: refusing.attempts(),
        remaining,
        retry_after: (!allowed).then(|| Duration::from_millis(retry_ms)),
        refused_by: (!allowed).then_some(refused_by),
        decided_at_ms,
        device_trusted: false,
    }
}
