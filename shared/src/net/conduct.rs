//! Who has misbehaved towards this node, and for how long they are shut out.
//!
//! Strikes come only from what this node saw itself on an authenticated connection: streams its
//! doors refused (a peer past its quota, or flooding) and protocol violations the application
//! reports through [`Client::report`](super::Client::report). They are counted over a window of
//! [`WINDOW`]; a peer that gathers [`STRIKES_TO_BAN`] within one is disconnected and refused (in
//! both directions) for [`BAN`]. An honest peer never gets near: a gateway opens fewer streams
//! than a provider's quota, and no honest node breaks the protocol.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// What a peer did wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Offence {
    /// A stream refused at the door: over its quota, or with the queue full.
    Refused,
    /// It broke the protocol: an unreadable, oversized or out-of-order frame, or a reply no
    /// honest node sends.
    Violation,
}

impl Offence {
    fn weight(self) -> u32 {
        match self {
            // A burst at saturation costs a few; only a flood adds up.
            Self::Refused => 1,
            // Four in a window and the peer is out.
            Self::Violation => STRIKES_TO_BAN / 4,
        }
    }
}

/// How long strikes count.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Strikes within one window that get a peer banned.
pub const STRIKES_TO_BAN: u32 = 256;
/// How long a ban lasts.
pub const BAN: Duration = Duration::from_secs(600);
/// Peers whose strikes are tracked at once; sybils cannot grow the table past it.
const MAX_TRACKED: usize = 8192;

#[derive(Debug, Clone, Copy)]
struct Tally {
    since: Instant,
    strikes: u32,
}

/// Strikes and bans.
#[derive(Debug, Default)]
pub(crate) struct Conduct {
    tallies: HashMap<PeerId, Tally>,
    banned: HashMap<PeerId, Instant>,
}

impl Conduct {
    /// Counts an offence; true when it gets the peer banned now.
    pub(crate) fn strike(&mut self, peer: PeerId, offence: Offence, now: Instant) -> bool {
        if self.banned.contains_key(&peer) {
            return false;
        }
        if self.tallies.len() >= MAX_TRACKED && !self.tallies.contains_key(&peer) {
            self.forget_old(now);
            if self.tallies.len() >= MAX_TRACKED {
                return false;
            }
        }
        let tally = self.tallies.entry(peer).or_insert(Tally {
            since: now,
            strikes: 0,
        });
        if now.duration_since(tally.since) > WINDOW {
            *tally = Tally {
                since: now,
                strikes: 0,
            };
        }
        tally.strikes = tally.strikes.saturating_add(offence.weight());
        if tally.strikes < STRIKES_TO_BAN {
            return false;
        }
        self.tallies.remove(&peer);
        self.banned.insert(peer, now + BAN);
        true
    }

    /// Bans that are over by `now`, removed from the list.
    pub(crate) fn lift_expired(&mut self, now: Instant) -> Vec<PeerId> {
        self.forget_old(now);
        let over: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in &over {
            self.banned.remove(peer);
        }
        over
    }

    /// While more peers are banned than [`MAX_TRACKED`], the ban that would end first, lifted
    /// early: a crowd of identities banned one after another cannot grow the list forever.
    pub(crate) fn lift_excess(&mut self) -> Option<PeerId> {
        if self.banned.len() <= MAX_TRACKED {
            return None;
        }
        let (&peer, _) = self.banned.iter().min_by_key(|(_, until)| **until)?;
        self.banned.remove(&peer);
        Some(peer)
    }

    /// Whether `peer` is banned now.
    #[cfg(test)]
    pub(crate) fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains_key(peer)
    }

    fn forget_old(&mut self, now: Instant) {
        self.tallies
            .retain(|_, tally| now.duration_since(tally.since) <= WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_banned_and_the_ban_ends() {
        let mut conduct = Conduct::default();
        let peer = PeerId::random();
        let start = Instant::now();
        for _ in 1..STRIKES_TO_BAN {
            assert!(!conduct.strike(peer, Offence::Refused, start));
        }
        assert!(conduct.strike(peer, Offence::Refused, start));
        assert!(conduct.is_banned(&peer));
        assert!(conduct.lift_expired(start + BAN / 2).is_empty());
        assert_eq!(conduct.lift_expired(start + BAN), vec![peer]);
        assert!(!conduct.is_banned(&peer));
    }

    #[test]
    fn strikes_spread_over_windows_do_not_add_up() {
        let mut conduct = Conduct::default();
        let peer = PeerId::random();
        let mut now = Instant::now();
        for _ in 0..10 {
            for _ in 0..STRIKES_TO_BAN / 2 {
                assert!(!conduct.strike(peer, Offence::Refused, now));
            }
            now += WINDOW + Duration::from_secs(1);
        }
        assert!(!conduct.is_banned(&peer));
    }

    #[test]
    fn the_ban_list_is_bounded() {
        let mut conduct = Conduct::default();
        let now = Instant::now();
        let first = PeerId::random();
        for _ in 0..4 {
            conduct.strike(first, Offence::Violation, now);
        }
        for i in 0..MAX_TRACKED {
            let later = now + Duration::from_millis(1 + i as u64);
            let peer = PeerId::random();
            for _ in 0..4 {
                conduct.strike(peer, Offence::Violation, later);
            }
        }
        assert_eq!(
            conduct.lift_excess(),
            Some(first),
            "the ban ending first goes"
        );
        assert_eq!(conduct.lift_excess(), None);
        assert_eq!(conduct.banned.len(), MAX_TRACKED);
    }

    #[test]
    fn four_violations_ban_and_other_peers_are_untouched() {
        let mut conduct = Conduct::default();
        let (cheat, honest) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        assert!(!conduct.strike(honest, Offence::Refused, now));
        let banned: Vec<bool> = (0..4)
            .map(|_| conduct.strike(cheat, Offence::Violation, now))
            .collect();
        assert_eq!(banned, vec![false, false, false, true]);
        assert!(!conduct.is_banned(&honest));
    }
}
