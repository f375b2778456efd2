//! The login rate limiter: attempts per client address in a fixed window.

use std::time::Duration;

use super::{Store, millis};
use crate::{
    error::Error,
    model::{ClientAddr, LoginVerdict},
};

impl Store {
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn record_login_attempt(&self, addr: &ClientAddr) -> Result<LoginVerdict, Error> {
        let settings = self.settings();
        let mut op = self.op("record_login_attempt").await?;
        let (attempts, left_ms): (u64, u64) = op
            .invoke(
                self.shared
                    .scripts
                    .login_attempt
                    .key(self.rate_limit_key(addr))
                    .arg(millis(settings.rate_limit_window)),
            )
            .await?;
        let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        let max = settings.rate_limit_max_attempts;
        let allowed = attempts <= max;
        Ok(LoginVerdict {
            allowed,
            attempts,
            remaining: max.saturating_sub(attempts),
            retry_after: (!allowed).then(|| Duration::from_millis(left_ms)),
        })
    }

    /// Clears the login attempt counter of `addr`; returns whether one existed.
    ///
    /// # Errors
    ///
    /// Redis failures as [`Error::Unavailable`] or [`Error::Timeout`].
    pub async fn reset_login_attempts(&self, addr: &ClientAddr) -> Result<bool, Error> {
        let mut op = self.op("reset_login_attempts").await?;
        let deleted: i64 = op
            .query(redis::cmd("DEL").arg(self.rate_limit_key(addr)))
            .await?;
        Ok(deleted == 1)
    }
}
