//! The gateway's front door, over real HTTP: API keys and their rates, and the HTTP server's
//! own limits (a client that sends its headers byte by byte, slowloris, or keeps a connection
//! idle is cut off while the gateway keeps serving others).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use proofmesh_gateway::access::KeyFile;
use serde_json::json;
use support::{GatewayOptions, HONEST, MODEL, Mesh, chat_body, start_gateway_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits until the server closes `stream` (a read returns 0 or fails), for at most `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off() {
    let header_timeout = Duration::from_secs(2);
    let (mesh, started) = start_gateway_with(GatewayOptions {
        no_local_referee: true,
        no_vocabulary: true,
        header_read_timeout: Some(header_timeout),
        body_read_timeout: Some(Duration::from_secs(2)),
        ..GatewayOptions::default()
    })
    .await;
    let addr = started.http_addr;

    // Slowloris: a request line and one header, then a byte now and then, never the end.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
        .await
        .expect("write");
    let dribble = async {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if slow.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    let (_, idle_closed) = tokio::join!(dribble, closed_within(&mut idle, Duration::from_secs(20)));
    let idle_closed = idle_closed.expect("an idle connection is closed");
    assert!(idle_closed < Duration::from_secs(15), "{idle_closed:?}");
    let slow_closed = closed_within(&mut slow, Duration::from_secs(5))
        .await
        .expect("the slowloris connection is closed");
    eprintln!(
        "idle connection closed after {idle_closed:?}; the dribbling one by then too ({slow_closed:?} more)"
    );

    // A body sent a byte at a time is cut off when its whole-body deadline passes, however
    // regularly the bytes come.
    let mut dribbling = TcpStream::connect(addr).await.expect("connect");
    dribbling
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        )
        .await
        .expect("write");
    let started_body = Instant::now();
    let mut answer = String::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if dribbling.write_all(b" ").await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), dribbling.read(&mut buf)).await
        {
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
            if n == 0 || answer.contains("\r\n\r\n") {
                break;
            }
        }
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(started_body.elapsed() < Duration::from_secs(8));

    // Meanwhile, and after, others are served.
    let health = reqwest::get(mesh.url("/healthz")).await.expect("healthz");
    assert_eq!(health.status(), 200);
}

/// Opens a TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all
/// loopback on Linux, so one machine can play several client hosts).
async fn connect_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    socket.connect(to).await.expect("connect")
}

/// One host holding many idle connections cannot take the gateway's places from the others:
/// past its own cap, its new connections are closed at once, and another host is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_connection() {
    let cap = 8;
    let (mesh, started) = start_gateway_with(GatewayOptions {
        no_local_referee: true,
        no_vocabulary: true,
        max_connections_per_address: Some(cap),
        ..GatewayOptions::default()
    })
    .await;
    let addr = started.http_addr;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(connect_from("127.0.0.2", addr).await);
    }
    // Past the cap (and long before the 10 s header deadline would close it), a new
    // connection from the same host is closed as soon as it is accepted.
    let mut extra = connect_from("127.0.0.2", addr).await;
    let closed = closed_within(&mut extra, Duration::from_secs(5))
        .await
        .expect("the connection past the cap is closed");
    assert!(closed < Duration::from_secs(5), "{closed:?}");
    // The held ones stay open, and another host is served meanwhile.
    assert!(
        closed_within(&mut held[0], Duration::from_millis(500))
            .await
            .is_none(),
        "a connection within the cap was closed"
    );
    let mut other = connect_from("127.0.0.3", addr).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let health = reqwest::get(mesh.url("/healthz")).await.expect("healthz");
    assert_eq!(health.status(), 200);
    // Once the host closes some, it may open as many again.
    held.truncate(cap - 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = connect_from("127.0.0.2", addr).await;
    assert!(
        closed_within(&mut again, Duration::from_millis(500))
            .await
            .is_none(),
        "a place given back was not free again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_checked_and_rate_limited() {
    let mut keys = KeyFile::default();
    let alice = keys.create("alice", None, None).expect("key");
    let limited = keys.create("limited", Some(2), None).expect("key");
    let other = keys.create("other", None, None).expect("key");
    let mesh = Mesh::start_with(
        &[HONEST],
        GatewayOptions {
            api_keys: Some(keys),
            ..GatewayOptions::default()
        },
    )
    .await;
    let http = reqwest::Client::new();
    let body = chat_body("Say hello.", json!({"max_tokens": 4, "model": MODEL}));
    let chat = |key: Option<&str>| {
        let mut request = http.post(mesh.url("/v1/chat/completions")).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    for (key, why) in [(None, "no key"), (Some("pm-0000"), "a wrong key")] {
        let response = chat(key).await.expect("send");
        assert_eq!(response.status(), 401, "{why}");
        let error: serde_json::Value = response.json().await.expect("json");
        assert_eq!(error["error"]["code"], "invalid_api_key", "{why}");
    }
    let response = chat(Some(&alice)).await.expect("send");
    assert_eq!(response.status(), 200);
    // Two requests a minute: the third is turned away with the wait.
    for _ in 0..2 {
        assert_eq!(chat(Some(&limited)).await.expect("send").status(), 200);
    }
    let response = chat(Some(&limited)).await.expect("send");
    assert_eq!(response.status(), 429);
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&wait), "{wait}");
    // Another key is not held back by it; the model list and health stay open by default.
    assert_eq!(chat(Some(&alice)).await.expect("send").status(), 200);
    // A fraud answer's audit record is its key's: another key cannot tell it exists.
    let audit_id = {
        let mut body = body.clone();
        body["verification_mode"] = json!("fraud");
        let response = http
            .post(mesh.url("/v1/chat/completions"))
            .bearer_auth(&alice)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200);
        response.headers()["x-proofmesh-audit-id"]
            .to_str()
            .expect("ascii")
            .to_string()
    };
    let read = |key: &str| {
        http.get(mesh.url(&format!("/v1/audits/{audit_id}")))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(read(&alice).await.expect("send").status(), 200);
    assert_eq!(read(&limited).await.expect("send").status(), 429);
    assert_eq!(read(&other).await.expect("send").status(), 404);
    for path in ["/v1/models", "/healthz"] {
        let response = http.get(mesh.url(path)).send().await.expect("send");
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[test]
fn the_keys_command_creates_lists_and_revokes_keys_stored_as_hashes() {
    let dir = std::env::temp_dir().join(format!(
        "pm-keys-cli-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let file = dir.join("keys.toml");
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_proofmesh-gateway"))
            .arg("keys")
            .args(args)
            .arg("--file")
            .arg(&file)
            .output()
            .expect("run proofmesh-gateway keys");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).trim().to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (ok, key, _) = run(&["create", "alice", "--requests-per-minute", "60"]);
    assert!(ok && key.starts_with("pm-"), "{key}");
    let stored = std::fs::read_to_string(&file).expect("key file");
    assert!(
        !stored.contains(&key["pm-".len()..]),
        "the key itself is not stored"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (ok, _, stderr) = run(&["create", "alice"]);
    assert!(!ok && stderr.contains("exists already"), "{stderr}");
    let (ok, list, _) = run(&["list"]);
    assert!(
        ok && list.contains("alice") && list.contains("requests/min 60"),
        "{list}"
    );
    assert!(!list.contains(&key["pm-".len()..]));
    let (ok, _, _) = run(&["revoke", "alice"]);
    assert!(ok);
    let (ok, list, _) = run(&["list"]);
    assert!(ok && !list.contains("alice"), "{list}");
    let (ok, _, stderr) = run(&["revoke", "alice"]);
    assert!(!ok && stderr.contains("no key named"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}
