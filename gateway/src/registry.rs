//! The providers this gateway can route to, fed by mesh events: what each advertises and its
//! current load. Nothing here is a verdict about a peer: reputation, failures and benching are
//! the auditor's, in its durable book, so they survive reconnects and restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
#[cfg(test)]
use proofmesh_shared::protocol::GENERATE_STREAMS_PER_GATEWAY;
use proofmesh_shared::protocol::{GENERATE_STREAMS_PER_PROVIDER, ModelCard, ModelDigest};

/// How long a provider that failed is tried last (LiteLLM's router uses 5 s); each further
/// failure in a row doubles it, up to [`MAX_COOLDOWN`].
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(5);
/// The longest a failing provider's circuit stays open.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(80);

#[derive(Debug)]
struct Entry {
    models: Vec<ModelCard>,
    in_flight: usize,
    /// Tried last until then (it failed recently), but still tried when nothing else serves.
    cooldown_until: Option<Instant>,
    /// Failures since its last success: the circuit breaker's count.
    failures_in_row: u32,
    first_seen: u64,
    /// Time to first token, moving average (ms), measured here.
    latency_ms: Option<f64>,
    /// The queue depth it last reported (a claim: only ever makes it look busier).
    reported_queue: u32,
}

impl Entry {
    /// How long a request sent now would wait for its first token, up to a constant: the
    /// measured time to first token (`unmeasured` when there is none yet), times the square of
    /// the requests ahead of it plus one (this gateway's own in flight, and the queue the
    /// provider reported, which only ever makes it look busier). Squared, so that requests
    /// spread over idle providers before they pile onto a quick one.
    /// No latency counts for less than `floor`.
    fn expected_wait(&self, unmeasured: f64, floor: f64) -> f64 {
        let ahead = self.in_flight as f64 + f64::from(self.reported_queue) + 1.0;
        let latency = self.latency_ms.unwrap_or(unmeasured).max(floor).max(1.0);
        latency * ahead * ahead
    }
}

/// The most queued jobs a provider's report counts for (a provider engine queues at most 64).
pub const MAX_REPORTED_QUEUE: u32 = 64;

/// Weight of the newest measurement in a provider's moving average latency.
const LATENCY_WEIGHT: f64 = 0.2;

/// What the gateway sees of one connected provider right now.
#[derive(Debug, Clone)]
pub struct ProviderView {
    /// The provider.
    pub peer: PeerId,
    /// What it advertises.
    pub models: Vec<ModelCard>,
    /// Requests it is serving for this gateway.
    pub in_flight: usize,
    /// Its time to first token, moving average (ms), as this gateway measured it.
    pub latency_ms: Option<u64>,
    /// Whether it failed recently and is tried last.
    pub cooling_down: bool,
    /// The queue depth it last reported (a claim).
    pub reported_queue: u32,
}

/// Known providers and their load. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<PeerId, Entry>>>,
}

/// A provider chosen for one model.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The provider.
    pub peer: PeerId,
    /// What it serves under that name.
    pub card: ModelCard,
}

/// Result of looking a model up.
#[derive(Debug)]
pub enum Lookup {
    /// Providers to try, best first.
    Found(Vec<Candidate>),
    /// Nobody serves it.
    UnknownModel,
    /// No provider at all is connected.
    NoProviders,
}

/// A model (one digest) as `/v1/models` lists it.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// One provider's card for it.
    pub card: ModelCard,
    /// Providers serving this digest.
    pub providers: usize,
    /// Distinct devices.
    pub devices: Vec<String>,
    /// Smallest context among them.
    pub context_size: u32,
    /// When the gateway first saw it.
    pub first_seen: u64,
}

/// Decrements a provider's in-flight count when dropped.
#[derive(Debug)]
pub struct LoadGuard {
    registry: Registry,
    peer: PeerId,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some(entry) = self.registry.lock().get_mut(&self.peer) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Entry>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records (or refreshes) what a provider serves.
    pub fn upsert(&self, peer: PeerId, models: Vec<ModelCard>) {
        let mut map = self.lock();
        let entry = map.entry(peer).or_insert_with(|| Entry {
            models: Vec::new(),
            in_flight: 0,
            cooldown_until: None,
            failures_in_row: 0,
            first_seen: crate::openai::response::unix_now(),
            latency_ms: None,
            reported_queue: 0,
        });
        if entry.models != models {
            entry.models = models;
            tracing::info!(%peer, models = ?entry.models.iter().map(|m| &m.name).collect::<Vec<_>>(), "provider available");
        }
    }

    /// Whether `peer` is a provider this gateway routes to now.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.lock().contains_key(peer)
    }

    /// Forgets a provider (its last connection closed, or only relayed ones are left).
    pub fn remove(&self, peer: &PeerId) {
        if self.lock().remove(peer).is_some() {
            tracing::info!(%peer, "provider gone");
        }
    }

    /// Opens a failing provider's circuit: it is tried after the others for
    /// [`FAILURE_COOLDOWN`], doubled for each failure in a row (up to [`MAX_COOLDOWN`]). With
    /// no other provider it is still tried (half-open): a transient failure must not turn into
    /// seconds of 503s, and one success closes the circuit again.
    pub fn failed(&self, peer: &PeerId) {
        if let Some(entry) = self.lock().get_mut(peer) {
            entry.failures_in_row = entry.failures_in_row.saturating_add(1);
            let doublings = entry.failures_in_row.saturating_sub(1).min(8);
            let cooldown = (FAILURE_COOLDOWN * (1 << doublings)).min(MAX_COOLDOWN);
            entry.cooldown_until = Some(Instant::now() + cooldown);
        }
    }

    /// Closes a provider's circuit: it answered.
    pub fn succeeded(&self, peer: &PeerId) {
        if let Some(entry) = self.lock().get_mut(peer) {
            entry.failures_in_row = 0;
            entry.cooldown_until = None;
        }
    }

    /// Folds one measured time to first token into `peer`'s moving average.
    pub fn observed_latency(&self, peer: &PeerId, latency: Duration) {
        if let Some(entry) = self.lock().get_mut(peer) {
            let ms = latency.as_secs_f64() * 1000.0;
            entry.latency_ms = Some(match entry.latency_ms {
                Some(avg) => avg + LATENCY_WEIGHT * (ms - avg),
                None => ms,
            });
        }
    }

    /// Records the queue depth `peer` reported as it accepted a request (at most the engine's
    /// own queue bound, [`MAX_REPORTED_QUEUE`]).
    pub fn reported_queue(&self, peer: &PeerId, depth: u32) {
        if let Some(entry) = self.lock().get_mut(peer) {
            entry.reported_queue = depth.min(MAX_REPORTED_QUEUE);
        }
    }

    /// Every connected provider, as the gateway sees it now.
    pub fn providers(&self) -> Vec<ProviderView> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(peer, e)| ProviderView {
                peer: *peer,
                models: e.models.clone(),
                in_flight: e.in_flight,
                latency_ms: e.latency_ms.map(|ms| ms.round() as u64),
                cooling_down: e.cooldown_until.is_some_and(|t| t > now),
                reported_queue: e.reported_queue,
            })
            .collect()
    }

    /// How long until the first of these providers leaves its cool-down (zero if one is not
    /// cooling down): what a client told to come back later should wait.
    pub fn soonest_ready(&self, peers: &[PeerId]) -> Duration {
        let now = Instant::now();
        let map = self.lock();
        peers
            .iter()
            .map(|peer| {
                map.get(peer)
                    .and_then(|e| e.cooldown_until)
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
            })
            .min()
            .unwrap_or(Duration::ZERO)
    }

    /// Providers of `digest` that offer to referee, other than `except`, with the numerics
    /// classes they advertise. (Whether the gateway trusts any of them is the auditor's call.)
    pub fn referees(&self, digest: &ModelDigest, except: &PeerId) -> Vec<(PeerId, String)> {
        self.lock()
            .iter()
            .filter(|(peer, _)| *peer != except)
            .filter_map(|(peer, entry)| {
                entry
                    .models
                    .iter()
                    .find(|card| card.referee && &card.digest == digest)
                    .map(|card| (*peer, card.numerics.clone()))
            })
            .collect()
    }

    /// Number of providers connected.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no provider is connected.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Counts a request against a provider's load until the guard drops; `None` when this
    /// gateway already holds [`GENERATE_STREAMS_PER_PROVIDER`] streams to it, below the
    /// provider's own quota for one gateway, so that an honest gateway is never refused at
    /// the provider's door.
    pub fn try_track(&self, peer: PeerId) -> Option<LoadGuard> {
        if let Some(entry) = self.lock().get_mut(&peer) {
            if entry.in_flight >= GENERATE_STREAMS_PER_PROVIDER {
                return None;
            }
            entry.in_flight += 1;
        }
        Some(LoadGuard {
            registry: self.clone(),
            peer,
        })
    }

    /// Providers of the model `digest`, whatever name they advertise it under, in the order to
    /// try them: healthy before cooling down, then a draw weighted by how soon each would
    /// answer (its expected wait, below): a provider twice as quick to answer is drawn first
    /// twice as often, and none is starved (the slower ones keep some traffic, and so keep
    /// being measured).
    pub fn lookup(&self, digest: &ModelDigest) -> Lookup {
        let map = self.lock();
        if map.is_empty() {
            return Lookup::NoProviders;
        }
        let now = Instant::now();
        let serving: Vec<(&PeerId, &Entry, &ModelCard)> = map
            .iter()
            .filter_map(|(peer, entry)| {
                let card = entry.models.iter().find(|card| &card.digest == digest)?;
                Some((peer, entry, card))
            })
            .collect();
        if serving.is_empty() {
            return Lookup::UnknownModel;
        }
        // No provider counts as more than ten times quicker than the median one (a time to
        // first token is partly the provider's doing); one not measured yet counts as quick as
        // the quickest, so that it is tried and measured.
        let mut measured: Vec<f64> = serving
            .iter()
            .filter_map(|(_, entry, _)| entry.latency_ms)
            .collect();
        measured.sort_by(f64::total_cmp);
        let floor = measured.get(measured.len() / 2).map_or(1.0, |m| m / 10.0);
        let quickest = measured.first().map_or(floor, |q| q.max(floor));
        let mut keyed: Vec<((bool, f64), Candidate)> = serving
            .into_iter()
            .map(|(peer, entry, card)| {
                let cooling = entry.cooldown_until.is_some_and(|t| t > now);
                let wait = entry.expected_wait(quickest, floor);
                // The exponential race (Efraimidis-Spirakis): ordering by -ln(u)/w draws each
                // place in proportion to weight w = 1/wait among those not yet placed.
                let u: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
                let race = -u.ln() * wait;
                (
                    (cooling, race),
                    Candidate {
                        peer: *peer,
                        card: card.clone(),
                    },
                )
            })
            .collect();
        keyed.sort_by(|(a, _), (b, _)| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        Lookup::Found(keyed.into_iter().map(|(_, c)| c).collect())
    }

    /// The digests advertised under `name`, most providers first: what a client asking for an
    /// unpinned name is told to ask for instead. Never used to route.
    pub fn advertised_as(&self, name: &str) -> Vec<ModelDigest> {
        let mut counts: HashMap<ModelDigest, usize> = HashMap::new();
        for entry in self.lock().values() {
            for card in entry.models.iter().filter(|c| c.name == name) {
                *counts.entry(card.digest).or_default() += 1;
            }
        }
        let mut digests: Vec<(ModelDigest, usize)> = counts.into_iter().collect();
        digests.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        digests.into_iter().map(|(d, _)| d).collect()
    }

    /// Models served right now, one per digest.
    pub fn models(&self) -> Vec<ServedModel> {
        let map = self.lock();
        let mut grouped: HashMap<ModelDigest, ServedModel> = HashMap::new();
        for entry in map.values() {
            for card in &entry.models {
                let served = grouped.entry(card.digest).or_insert_with(|| ServedModel {
                    card: card.clone(),
                    providers: 0,
                    devices: Vec::new(),
                    context_size: card.context_size,
                    first_seen: entry.first_seen,
                });
                served.providers += 1;
                served.context_size = served.context_size.min(card.context_size);
                served.first_seen = served.first_seen.min(entry.first_seen);
                if !served.devices.contains(&card.device) {
                    served.devices.push(card.device.clone());
                }
            }
        }
        let mut models: Vec<ServedModel> = grouped.into_values().collect();
        models.sort_by(|a, b| {
            b.providers
                .cmp(&a.providers)
                .then(a.card.digest.cmp(&b.card.digest))
        });
        models
    }
}

/// A model card for unit tests: `name` under the digest `[digest; 32]`.
#[cfg(test)]
pub(crate) fn test_card(name: &str, digest: u8) -> ModelCard {
    ModelCard {
        name: name.into(),
        digest: ModelDigest([digest; 32]),
        quantization: "Q4_1".into(),
        context_size: 2048,
        parallel: 4,
        device: "cpu".into(),
        gpu_layers: 0,
        numerics: "det/test".into(),
        referee: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_opens_fewer_streams_to_a_provider_than_it_takes_from_one() {
        const { assert!(GENERATE_STREAMS_PER_PROVIDER < GENERATE_STREAMS_PER_GATEWAY) };
        let r = Registry::default();
        let a = PeerId::random();
        r.upsert(a, vec![card("m", 1)]);
        let mut held: Vec<LoadGuard> = (0..GENERATE_STREAMS_PER_PROVIDER)
            .map(|_| r.try_track(a).expect("room"))
            .collect();
        assert!(r.try_track(a).is_none(), "one stream past the cap");
        held.pop();
        assert!(
            r.try_track(a).is_some(),
            "a finished stream gives its place back"
        );
    }

    #[test]
    fn failures_in_a_row_keep_the_circuit_open_longer() {
        let r = Registry::default();
        let a = PeerId::random();
        r.upsert(a, vec![card("m", 1)]);
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            r.failed(&a);
            let open = r.soonest_ready(&[a]);
            assert!(open >= last.min(MAX_COOLDOWN - Duration::from_millis(50)));
            assert!(open <= MAX_COOLDOWN);
            last = open;
        }
        assert!(last > MAX_COOLDOWN / 2, "{last:?}");
        r.succeeded(&a);
        assert_eq!(r.soonest_ready(&[a]), Duration::ZERO);
    }

    fn card(name: &str, digest: u8) -> ModelCard {
        test_card(name, digest)
    }

    #[test]
    fn reported_queues_and_latency_are_recorded_and_bounded() {
        let r = Registry::default();
        let peer = PeerId::random();
        r.upsert(peer, vec![card("m", 1)]);
        r.observed_latency(&peer, Duration::from_millis(100));
        r.observed_latency(&peer, Duration::from_millis(600));
        r.reported_queue(&peer, u32::MAX);
        let view = &r.providers()[0];
        assert_eq!(view.latency_ms, Some(200), "a moving average");
        assert_eq!(view.reported_queue, MAX_REPORTED_QUEUE);
    }

    /// Who `lookup` puts first.
    fn first_of(r: &Registry, digest: &ModelDigest) -> PeerId {
        let Lookup::Found(found) = r.lookup(digest) else {
            panic!("expected providers")
        };
        found[0].peer
    }

    /// How often each of `peers` comes first in `draws` lookups.
    fn shares(r: &Registry, digest: &ModelDigest, peers: &[PeerId], draws: usize) -> Vec<f64> {
        let mut firsts = vec![0usize; peers.len()];
        for _ in 0..draws {
            let first = first_of(r, digest);
            if let Some(i) = peers.iter().position(|p| *p == first) {
                firsts[i] += 1;
            }
        }
        firsts.iter().map(|&n| n as f64 / draws as f64).collect()
    }

    #[test]
    fn quicker_and_idler_providers_are_drawn_first_more_often_and_none_is_starved() {
        let r = Registry::default();
        let digest = ModelDigest([1; 32]);
        let (quick, slow, new) = (PeerId::random(), PeerId::random(), PeerId::random());
        for peer in [quick, slow] {
            r.upsert(peer, vec![card("m", 1)]);
        }
        r.observed_latency(&quick, Duration::from_millis(100));
        r.observed_latency(&slow, Duration::from_millis(300));
        // Weights 1/100 and 1/300: first three times in four, and once in four.
        let s = shares(&r, &digest, &[quick, slow], 4_000);
        assert!((0.70..0.80).contains(&s[0]), "{s:?}");
        assert!((0.20..0.30).contains(&s[1]), "{s:?}");
        // One request in flight at the quick one: (1+1)² = 4 times the wait, 400 against 300.
        let busy = r.try_track(quick).expect("room");
        let s = shares(&r, &digest, &[quick, slow], 4_000);
        assert!((0.38..0.48).contains(&s[0]), "{s:?}");
        drop(busy);
        // A reported queue only ever makes its reporter look busier.
        r.reported_queue(&quick, 1);
        let s = shares(&r, &digest, &[quick, slow], 4_000);
        assert!(s[0] < 0.48, "{s:?}");
        r.reported_queue(&quick, 0);
        // Not measured yet: drawn as if as quick as the quickest, so that it gets measured.
        r.upsert(new, vec![card("m", 1)]);
        let s = shares(&r, &digest, &[quick, slow, new], 6_000);
        assert!((0.37..0.49).contains(&s[2]), "{s:?}");
        assert!(s[1] > 0.08, "the slow one keeps some traffic: {s:?}");
        // A time to first token far below the others' counts as a tenth of the median one.
        let sprinter = PeerId::random();
        r.upsert(sprinter, vec![card("m", 1)]);
        r.observed_latency(&sprinter, Duration::from_millis(1));
        r.observed_latency(&new, Duration::from_millis(300));
        // Latencies 1, 100, 300, 300: the median 300, so 30 against 100, 300, 300; weights
        // 1/30, 1/100, 1/300, 1/300: first two times in three, not the 98 % that 1 ms buys.
        let s = shares(&r, &digest, &[sprinter], 4_000);
        assert!((0.61..0.73).contains(&s[0]), "{s:?}");
    }

    #[test]
    fn lookup_goes_by_digest_never_by_name() {
        let r = Registry::default();
        let one = ModelDigest([1; 32]);
        assert!(matches!(r.lookup(&one), Lookup::NoProviders));
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        r.upsert(a, vec![card("m", 1)]);
        r.upsert(b, vec![card("other name", 1)]);
        // Two peers advertise "m" under another digest: that is no vote.
        r.upsert(c, vec![card("m", 2)]);
        let d = PeerId::random();
        r.upsert(d, vec![card("m", 2)]);
        assert_eq!(r.advertised_as("m"), vec![ModelDigest([2; 32]), one]);
        assert!(matches!(
            r.lookup(&ModelDigest([3; 32])),
            Lookup::UnknownModel
        ));
        let Lookup::Found(found) = r.lookup(&one) else {
            panic!("expected providers")
        };
        let mut peers: Vec<PeerId> = found.iter().map(|c| c.peer).collect();
        peers.sort_unstable();
        let mut both = vec![a, b];
        both.sort_unstable();
        assert_eq!(peers, both);
        // A provider whose circuit is open is tried after the healthy ones...
        r.failed(&b);
        let Lookup::Found(found) = r.lookup(&one) else {
            panic!("expected providers")
        };
        assert_eq!(found.iter().map(|c| c.peer).collect::<Vec<_>>(), vec![a, b]);
        // ...and drawn with the others again once it answered.
        r.succeeded(&b);
        assert!(
            (0..200).any(|_| first_of(&r, &one) == b),
            "b is drawn again"
        );
        r.remove(&a);
        r.remove(&b);
        assert_eq!(r.models().len(), 1);
    }
}
