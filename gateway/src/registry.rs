//! The providers this gateway can route to, fed by mesh events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_shared::protocol::{ModelCard, ModelDigest};

/// How long a provider that failed is skipped (LiteLLM's router uses 5 s).
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Entry {
    models: Vec<ModelCard>,
    in_flight: usize,
    /// Tried last until then (it failed recently), but still tried when nothing else serves.
    cooldown_until: Option<Instant>,
    /// Not routed to at all until then (its answer failed an audit).
    benched_until: Option<Instant>,
    first_seen: u64,
    /// Serialises this gateway's stream opens to the provider (see `inference::try_start`).
    open_gate: Arc<tokio::sync::Mutex<()>>,
    /// Its audit record on this gateway.
    reputation: Reputation,
}

/// A provider's audit record on this gateway. It changes only when an audit reaches a verdict
/// about the provider: never on transport failures, and never because of a referee's fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reputation {
    /// Audits passed.
    pub passed: u32,
    /// Audits failed.
    pub failed: u32,
}

impl Reputation {
    /// Whether the provider is still on probation: fewer than `probation` audits passed, or any
    /// failed. Such providers get more steps challenged.
    pub fn on_probation(&self, probation: u32) -> bool {
        self.passed < probation || self.failed > 0
    }
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
    /// Providers exist, but all are benched after failed audits.
    AllBenched,
    /// Nobody serves it.
    UnknownModel,
    /// No provider at all is connected.
    NoProviders,
}

/// A model as `/v1/models` lists it.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// The advertised name.
    pub name: String,
    /// One provider's card for it.
    pub card: ModelCard,
    /// Providers serving this exact digest under this name.
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
            benched_until: None,
            first_seen: crate::openai::response::unix_now(),
            open_gate: Arc::default(),
            reputation: Reputation::default(),
        });
        entry.models = models;
        tracing::info!(%peer, models = ?entry.models.iter().map(|m| &m.name).collect::<Vec<_>>(), "provider available");
    }

    /// Forgets a provider (its last connection closed).
    pub fn remove(&self, peer: &PeerId) {
        if self.lock().remove(peer).is_some() {
            tracing::info!(%peer, "provider gone");
        }
    }

    /// Tries a provider that just failed after the others for `duration` (LiteLLM-style
    /// cool-down). With no other provider it is still tried: a transient failure must not turn
    /// into seconds of 503s.
    pub fn cool_down(&self, peer: &PeerId, duration: Duration) {
        if let Some(entry) = self.lock().get_mut(peer) {
            entry.cooldown_until = Some(Instant::now() + duration);
        }
    }

    /// Takes a provider out of routing for `duration`: its answer failed verification.
    pub fn bench(&self, peer: &PeerId, duration: Duration) {
        if let Some(entry) = self.lock().get_mut(peer) {
            entry.benched_until = Some(Instant::now() + duration);
        }
    }

    /// Records an audit verdict about `peer`.
    pub fn record_audit(&self, peer: &PeerId, passed: bool) {
        if let Some(entry) = self.lock().get_mut(peer) {
            if passed {
                entry.reputation.passed = entry.reputation.passed.saturating_add(1);
            } else {
                entry.reputation.failed = entry.reputation.failed.saturating_add(1);
            }
        }
    }

    /// `peer`'s audit record (empty for an unknown peer).
    pub fn reputation(&self, peer: &PeerId) -> Reputation {
        self.lock()
            .get(peer)
            .map(|e| e.reputation)
            .unwrap_or_default()
    }

    /// Providers of `digest` that offer to referee, other than `except`, with their numerics
    /// classes. Benched providers are left out: a provider caught cheating is no referee.
    pub fn referees(&self, digest: &ModelDigest, except: &PeerId) -> Vec<(PeerId, String)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(peer, entry)| {
                *peer != except
                    && entry.reputation.failed == 0
                    && entry.benched_until.is_none_or(|t| t <= now)
            })
            .filter_map(|(peer, entry)| {
                entry
                    .models
                    .iter()
                    .find(|card| card.referee && &card.digest == digest)
                    .map(|card| (*peer, card.numerics.clone()))
            })
            .collect()
    }

    /// The lock this gateway holds while opening a stream to `peer`.
    pub fn open_gate(&self, peer: &PeerId) -> Arc<tokio::sync::Mutex<()>> {
        self.lock()
            .get(peer)
            .map(|e| Arc::clone(&e.open_gate))
            .unwrap_or_default()
    }

    /// Number of providers connected.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no provider is connected.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Counts a request against a provider's load until the guard drops.
    pub fn track(&self, peer: PeerId) -> LoadGuard {
        if let Some(entry) = self.lock().get_mut(&peer) {
            entry.in_flight += 1;
        }
        LoadGuard {
            registry: self.clone(),
            peer,
        }
    }

    /// Providers for `model` (a name or `sha256:<hex>`), least loaded first, ties random. A
    /// name served under several digests resolves to the digest most providers serve.
    pub fn lookup(&self, model: &str) -> Lookup {
        let map = self.lock();
        if map.is_empty() {
            return Lookup::NoProviders;
        }
        let by_digest = ModelDigest::parse(model);
        let now = Instant::now();
        // (peer, card, cooling down, load, benched)
        let mut matching: Vec<(PeerId, ModelCard, bool, usize, bool)> = Vec::new();
        for (peer, entry) in map.iter() {
            for card in &entry.models {
                if card.name == model || by_digest == Some(card.digest) {
                    let cooling = entry.cooldown_until.is_some_and(|t| t > now);
                    let benched = entry.benched_until.is_some_and(|t| t > now);
                    matching.push((*peer, card.clone(), cooling, entry.in_flight, benched));
                }
            }
        }
        if matching.is_empty() {
            return Lookup::UnknownModel;
        }
        let mut counts: HashMap<ModelDigest, usize> = HashMap::new();
        for (_, card, ..) in &matching {
            *counts.entry(card.digest).or_default() += 1;
        }
        let best = counts
            .into_iter()
            .max_by_key(|(d, n)| (*n, *d))
            .map(|(d, _)| d);
        matching.retain(|(_, card, _, _, benched)| Some(card.digest) == best && !benched);
        if matching.is_empty() {
            return Lookup::AllBenched;
        }
        // Healthy before cooling down, then least loaded, ties at random.
        let mut keyed: Vec<((bool, usize, u64), Candidate)> = matching
            .into_iter()
            .map(|(peer, card, cooling, load, _)| {
                (
                    (cooling, load, rand::random::<u64>()),
                    Candidate { peer, card },
                )
            })
            .collect();
        keyed.sort_by_key(|(key, _)| *key);
        Lookup::Found(keyed.into_iter().map(|(_, c)| c).collect())
    }

    /// Models served right now, grouped by name and digest.
    pub fn models(&self) -> Vec<ServedModel> {
        let map = self.lock();
        let mut grouped: HashMap<(String, ModelDigest), ServedModel> = HashMap::new();
        for entry in map.values() {
            for card in &entry.models {
                let served = grouped
                    .entry((card.name.clone(), card.digest))
                    .or_insert_with(|| ServedModel {
                        name: card.name.clone(),
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
        models.sort_by(|a, b| a.name.cmp(&b.name).then(b.providers.cmp(&a.providers)));
        models
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(name: &str, digest: u8) -> ModelCard {
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

    #[test]
    fn lookup_prefers_least_loaded_and_majority_digest() {
        let r = Registry::default();
        assert!(matches!(r.lookup("m"), Lookup::NoProviders));
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        r.upsert(a, vec![card("m", 1)]);
        r.upsert(b, vec![card("m", 1)]);
        r.upsert(c, vec![card("m", 2)]);
        assert!(matches!(r.lookup("other"), Lookup::UnknownModel));
        let _busy = r.track(a);
        let Lookup::Found(found) = r.lookup("m") else {
            panic!("expected providers")
        };
        assert_eq!(found.iter().map(|c| c.peer).collect::<Vec<_>>(), vec![b, a]);
        let Lookup::Found(found) = r.lookup(&ModelDigest([2; 32]).to_string()) else {
            panic!("expected providers")
        };
        assert_eq!(found[0].peer, c);
        // A provider cooling down is still tried when it is the only one...
        r.cool_down(&c, Duration::from_secs(60));
        let Lookup::Found(found) = r.lookup(&ModelDigest([2; 32]).to_string()) else {
            panic!("expected providers")
        };
        assert_eq!(found[0].peer, c);
        // ...and after the healthy ones otherwise.
        r.cool_down(&b, Duration::from_secs(60));
        let Lookup::Found(found) = r.lookup("m") else {
            panic!("expected providers")
        };
        assert_eq!(found.iter().map(|c| c.peer).collect::<Vec<_>>(), vec![a, b]);
        // A benched provider is not tried at all.
        r.bench(&a, Duration::from_secs(60));
        r.bench(&b, Duration::from_secs(60));
        assert!(matches!(r.lookup("m"), Lookup::AllBenched));
        r.remove(&a);
        r.remove(&b);
        assert_eq!(r.models().len(), 1);
    }
}
