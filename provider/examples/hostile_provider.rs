//! A provider that misbehaves on purpose, as its own process, for `bench/pressure.py`: it joins
//! the mesh like any provider, then lies in one of the ways the tests use (`Tamper`). The
//! command line cannot make the real provider do this; only this example and the tests can.
//!
//!     cargo run --release -p proofmesh-provider --example hostile_provider -- \
//!         MODEL BOOTSTRAP_ADDR endless|stall|busy MODEL_NAME
//!
//! `endless` streams tokens without end (ignoring `max_tokens`), `stall` accepts and then says
//! nothing, `busy` refuses every request as overloaded. It advertises `MODEL_NAME` under a
//! digest of its own (all bytes 0xee), so honest traffic for the default model never reaches
//! it; a client asks for that name to be served by it. Listens on a free loopback port; stops on
//! Ctrl-C or SIGTERM.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::Duration;

use libp2p::identity::Keypair;
use proofmesh_provider::engine::EngineConfig;
use proofmesh_provider::{ProviderConfig, Tamper};
use proofmesh_shared::protocol::ModelDigest;

const USAGE: &str = "usage: hostile_provider MODEL BOOTSTRAP_ADDR endless|stall|busy MODEL_NAME";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, bootstrap, tamper, name] = args.as_slice() else {
        return Err(USAGE.into());
    };
    let tamper = match tamper.as_str() {
        "endless" => Tamper::Endless,
        "stall" => Tamper::Stall,
        "busy" => Tamper::Busy,
        other => return Err(format!("unknown misbehaviour {other:?}; {USAGE}").into()),
    };
    let mut engine = EngineConfig::new(PathBuf::from(model));
    engine.threads = 1;
    engine.context_size = 512;
    engine.parallel = 2;
    engine.referee_slots = 0;
    let config = ProviderConfig {
        engine,
        model_name: Some(name.clone()),
        keypair: Keypair::generate_secp256k1(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        bootstrap: vec![bootstrap.parse()?],
        mdns: false,
        mesh_key: None,
        traversal: Default::default(),
        serve_gateways: Vec::new(),
        leaf_store_bytes: 1 << 20,
        http_listen: None,
        drain_timeout: Duration::from_secs(1),
        referee_rate_per_minute: 0,
        referee_for: Vec::new(),
        referee_slots_per_gateway: 0,
        tamper,
        tamper_model: None,
        stake: 0,
        claim_digest: Some(ModelDigest([0xee; 32])),
        claim_numerics: None,
    };
    let (started, up) = tokio::sync::oneshot::channel();
    let run = proofmesh_provider::run(
        config,
        proofmesh_shared::process::shutdown_signal(),
        Some(started),
    );
    tokio::pin!(run);
    tokio::select! {
        up = up => {
            let started = up?;
            eprintln!("hostile provider ({args:?}) up as peer={}", started.peer_id);
            run.await?;
        }
        result = &mut run => result?,
    }
    Ok(())
}
