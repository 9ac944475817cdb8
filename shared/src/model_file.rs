//! Facts about a GGUF file that do not need llama.cpp: its digest, a display name, its
//! quantization.

use std::io::Read;
use std::path::Path;

use crate::protocol::ModelDigest;
use sha2::Digest;

/// SHA-256 of a file, read in 1 MiB chunks.
pub fn file_digest(path: &Path) -> std::io::Result<ModelDigest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ModelDigest(hasher.finalize().into()))
}

/// The model id clients use: the file name without `.gguf`
/// (`SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1`).
pub fn model_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The quantization named in the file name (`…Q4_1.gguf` → `Q4_1`), or `unknown`.
pub fn quantization(path: &Path) -> String {
    let name = model_name(path);
    name.rsplit(['.', '-'])
        .find(|part| {
            let upper = part.to_ascii_uppercase();
            upper.starts_with('Q') && upper[1..].starts_with(|c: char| c.is_ascii_digit())
                || upper == "F16"
                || upper == "F32"
                || upper == "BF16"
                || upper.starts_with("IQ")
        })
        .map(str::to_ascii_uppercase)
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quantizations() {
        let p = Path::new("/x/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(model_name(p), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(quantization(p), "Q4_1");
        assert_eq!(
            quantization(Path::new("gemma-3-270m-it-Q4_K_M.gguf")),
            "Q4_K_M"
        );
        assert_eq!(quantization(Path::new("model.gguf")), "unknown");
    }
}
