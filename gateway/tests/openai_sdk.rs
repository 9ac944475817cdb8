//! The official `openai` Python package against a real mesh: what a user who only changes
//! `base_url` sees. Needs `python3` with `openai` installed (scripts/test.sh installs it).

mod support;

use support::{HONEST, MODEL, Mesh};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_client_works_unchanged() {
    let mesh = Mesh::start(&[HONEST]).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/openai_sdk_check.py"
    );
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("{}/v1", mesh.base))
        .arg(MODEL)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai client check failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
}

/// The official `openai` npm package (6.x; Node 20 here) against a real mesh. Needs `node` and
/// `npm ci --prefix scripts/node` (scripts/test.sh runs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_node_client_works_unchanged() {
    let mesh = Mesh::start(&[HONEST]).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/node/openai_sdk_check.mjs"
    );
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(format!("{}/v1", mesh.base))
        .arg(MODEL)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai-node check failed (did `npm ci --prefix scripts/node` run?):\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
}
