//! Deadlines from durations the user chose, which may be too long for an
//! [`Instant`] (`Duration::MAX` for "no limit"): `Instant + Duration` would
//! panic on those.

use std::time::Duration;

use tokio::time::Instant;

/// Where a deadline too far away to represent is put instead: about 30
/// years ahead, as Tokio does for its own far-future timers.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The instant `timeout` from now, or a far-future instant when that cannot
/// be represented.
pub(crate) fn after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or(now + FAR_FUTURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrepresentable_timeouts_are_far_away_not_a_panic() {
        let start = Instant::now();
        let near = after(Duration::from_secs(5));
        assert!(near >= start + Duration::from_secs(5));
        assert!(near < start + Duration::from_secs(60));
        assert!(after(Duration::MAX) >= start + FAR_FUTURE);
    }
}
