//! A model's vocabulary, read from its GGUF file without llama.cpp, so the gateway can turn the
//! tokens a provider committed into the text the client reads, itself.
//!
//! Each token's bytes are what llama.cpp's `token_to_piece` gives without special tokens (the
//! provider's engine streams exactly those): control and unknown tokens are empty, and so are
//! end-of-generation tokens; BPE (GPT-2 style) tokens are mapped back from their byte-level
//! alphabet; SentencePiece tokens have `▁` turned into a space, and byte tokens `<0xXX>` become
//! that byte; user-defined tokens are their text. A test compares every token of the default
//! model with llama.cpp's own answer.
//!
//! A [`Transcript`] then assembles one answer's text with the same UTF-8 and stop-sequence rule
//! as the provider ([`proofmesh_shared::text`]).

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use proofmesh_shared::constraint::{ConstraintError, TokenSpace};
use proofmesh_shared::text::{Pushed, TextStream};

/// Most tokens a vocabulary may have (the largest vocabularies in use are ~260k).
const MAX_TOKENS: u64 = 1 << 21;
/// Longest metadata string accepted (a chat template is a few KiB; token texts are short).
const MAX_STRING: u64 = 1 << 20;
/// Most metadata entries read.
const MAX_ENTRIES: u64 = 1 << 16;
/// Longest array of non-string values skipped over (merges, scores).
const MAX_ARRAY: u64 = 1 << 24;

/// Token texts llama.cpp treats as end-of-generation (and so as control tokens) whatever type
/// the file gives them.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<end_of_utterance>",
    "<|return|>",
    "<|call|>",
    "</s>",
];

/// Fill-in-the-middle marker texts (pad, repository, file separator) that llama.cpp also
/// treats as end-of-generation when the file does not name them by id.
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim▁pad|>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
    "<file-sep>",
    "<FILE_SEP>",
];

/// Why a vocabulary could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VocabError {
    /// The file could not be read.
    #[error("cannot read the model file: {0}")]
    Io(#[from] std::io::Error),
    /// Not a GGUF file this reader understands.
    #[error("not a GGUF file this gateway can read: {0}")]
    Format(String),
    /// A tokenizer this reader does not implement.
    #[error("tokenizer '{0}' is not supported for text checks")]
    Unsupported(String),
}

/// Which detokenization rule the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// GPT-2 style byte-level BPE (`tokenizer.ggml.model = gpt2`).
    Bpe,
    /// SentencePiece (`llama`).
    Spm,
}

/// A model's token → bytes table.
#[derive(Debug)]
pub struct Vocabulary {
    pieces: Vec<Vec<u8>>,
    /// End-of-generation tokens, ascending.
    eog: Vec<u32>,
    /// The grammar engine's view of it, built on the first constrained request.
    space: std::sync::OnceLock<Result<Arc<TokenSpace>, ConstraintError>>,
}

impl Vocabulary {
    /// Reads the vocabulary of the GGUF file at `path`.
    pub fn from_gguf(path: &Path) -> Result<Self, VocabError> {
        let file = std::fs::File::open(path)?;
        Self::read(&mut BufReader::with_capacity(1 << 20, file))
    }

    /// Tokens in the vocabulary.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The bytes `token` shows as, `None` outside the vocabulary.
    pub fn piece(&self, token: u32) -> Option<&[u8]> {
        self.pieces.get(token as usize).map(Vec::as_slice)
    }

    fn read(r: &mut impl Read) -> Result<Self, VocabError> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(VocabError::Format("bad magic".into()));
        }
        let version = read_u32(r)?;
        if !(2..=3).contains(&version) {
            return Err(VocabError::Format(format!("version {version}")));
        }
        let _tensors = read_u64(r)?;
        let entries = read_u64(r)?;
        if entries > MAX_ENTRIES {
            return Err(VocabError::Format(format!("{entries} metadata entries")));
        }
        let mut model = None;
        let mut tokens: Option<Vec<String>> = None;
        let mut types: Option<Vec<i64>> = None;
        let mut eog: Vec<u32> = Vec::new();
        for _ in 0..entries {
            let key = read_string(r)?;
            let kind = read_u32(r)?;
            match key.as_str() {
                "tokenizer.ggml.model" => model = Some(read_value(r, kind)?.string()?),
                "tokenizer.ggml.tokens" => tokens = Some(read_value(r, kind)?.strings()?),
                "tokenizer.ggml.token_type" => types = Some(read_value(r, kind)?.integers()?),
                "tokenizer.ggml.eos_token_id"
                | "tokenizer.ggml.eot_token_id"
                | "tokenizer.ggml.eom_token_id"
                | "tokenizer.ggml.fim_pad_token_id"
                | "tokenizer.ggml.fim_rep_token_id"
                | "tokenizer.ggml.fim_sep_token_id" => {
                    if let Some(id) = read_value(r, kind)?.integer() {
                        eog.push(id as u32);
                    }
                }
                _ => skip_value(r, kind)?,
            }
        }
        let model = model.ok_or_else(|| VocabError::Format("no tokenizer.ggml.model".into()))?;
        let kind = match model.as_str() {
            "gpt2" => Kind::Bpe,
            "llama" => Kind::Spm,
            other => return Err(VocabError::Unsupported(other.into())),
        };
        let tokens = tokens.ok_or_else(|| VocabError::Format("no tokenizer.ggml.tokens".into()))?;
        let types = types.unwrap_or_default();
        let decoder = byte_decoder();
        for (id, text) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&text.as_str()) || FIM_EOG_TEXTS.contains(&text.as_str()) {
                eog.push(id as u32);
            }
        }
        eog.retain(|&id| (id as usize) < tokens.len());
        eog.sort_unstable();
        eog.dedup();
        let pieces = tokens
            .iter()
            .enumerate()
            .map(|(id, text)| {
                let control = eog.binary_search(&(id as u32)).is_ok();
                let ty = if control {
                    TOKEN_CONTROL
                } else {
                    types.get(id).copied().unwrap_or(TOKEN_NORMAL)
                };
                piece(kind, ty, text, &decoder)
            })
            .collect();
        Ok(Self {
            pieces,
            eog,
            space: std::sync::OnceLock::new(),
        })
    }

    /// The end-of-generation tokens (end of sequence, of turn, of message), ascending.
    pub fn eog(&self) -> &[u32] {
        &self.eog
    }

    /// The grammar engine's view of this vocabulary (built once, on first use).
    pub fn token_space(&self) -> Result<Arc<TokenSpace>, ConstraintError> {
        self.space
            .get_or_init(|| TokenSpace::new(self.pieces.clone(), &self.eog).map(Arc::new))
            .clone()
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_BYTE: i64 = 6;

/// llama.cpp's `token_to_piece` without special tokens.
fn piece(kind: Kind, ty: i64, text: &str, decoder: &HashMap<char, u8>) -> Vec<u8> {
    match ty {
        TOKEN_USER_DEFINED => text.as_bytes().to_vec(),
        TOKEN_NORMAL => match kind {
            Kind::Spm => text.replace('\u{2581}', " ").into_bytes(),
            Kind::Bpe => decode_bpe(text, decoder),
        },
        TOKEN_BYTE if kind == Kind::Spm => text
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .map(|b| vec![b])
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// GPT-2's byte-level alphabet back to bytes (llama.cpp's `llama_decode_text`).
fn decode_bpe(text: &str, decoder: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match decoder.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut utf8 = [0u8; 4];
                let encoded = c.encode_utf8(&mut utf8);
                out.extend_from_slice(b"[UNK_BYTE_0x");
                for b in encoded.bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// GPT-2's `bytes_to_unicode`, inverted.
fn byte_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = HashMap::new();
    let mut next = 256u32;
    for b in 0..=255u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            let c = next;
            next += 1;
            c
        };
        if let Some(c) = char::from_u32(c) {
            map.insert(c, b as u8);
        }
    }
    map
}

/// One metadata value, as far as this reader keeps it.
enum Value {
    Integer(i64),
    String(String),
    Strings(Vec<String>),
    Integers(Vec<i64>),
    Other,
}

impl Value {
    fn string(self) -> Result<String, VocabError> {
        match self {
            Self::String(s) => Ok(s),
            _ => Err(VocabError::Format("expected a string".into())),
        }
    }

    fn strings(self) -> Result<Vec<String>, VocabError> {
        match self {
            Self::Strings(s) => Ok(s),
            _ => Err(VocabError::Format("expected an array of strings".into())),
        }
    }

    fn integers(self) -> Result<Vec<i64>, VocabError> {
        match self {
            Self::Integers(v) => Ok(v),
            _ => Err(VocabError::Format("expected an array of integers".into())),
        }
    }

    fn integer(self) -> Option<i64> {
        match self {
            Self::Integer(v) => Some(v),
            _ => None,
        }
    }
}

/// GGUF value types.
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

/// Bytes of a fixed-size GGUF scalar type.
fn scalar_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn read_value(r: &mut impl Read, kind: u32) -> Result<Value, VocabError> {
    match kind {
        GGUF_STRING => Ok(Value::String(read_string(r)?)),
        GGUF_ARRAY => {
            let item = read_u32(r)?;
            let len = read_u64(r)?;
            if len > MAX_TOKENS {
                return Err(VocabError::Format(format!("array of {len}")));
            }
            if item == GGUF_STRING {
                let mut v = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    v.push(read_string(r)?);
                }
                Ok(Value::Strings(v))
            } else {
                let mut v = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    v.push(read_integer(r, item)?);
                }
                Ok(Value::Integers(v))
            }
        }
        _ => match read_integer(r, kind) {
            Ok(v) => Ok(Value::Integer(v)),
            Err(_) => Ok(Value::Other),
        },
    }
}

fn read_integer(r: &mut impl Read, kind: u32) -> Result<i64, VocabError> {
    let size = scalar_size(kind).ok_or_else(|| VocabError::Format(format!("type {kind}")))?;
    let mut buf = [0u8; 8];
    r.read_exact(&mut buf[..size as usize])?;
    Ok(match kind {
        0 | 7 => i64::from(buf[0]),
        1 => i64::from(buf[0] as i8),
        2 => i64::from(u16::from_le_bytes([buf[0], buf[1]])),
        3 => i64::from(i16::from_le_bytes([buf[0], buf[1]])),
        4 => i64::from(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]])),
        5 => i64::from(i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]])),
        10 | 11 => i64::from_le_bytes(buf),
        // Floats are not integers; their value is not needed.
        _ => 0,
    })
}

fn skip_value(r: &mut impl Read, kind: u32) -> Result<(), VocabError> {
    match kind {
        GGUF_STRING => {
            let len = read_u64(r)?;
            skip(r, len)
        }
        GGUF_ARRAY => {
            let item = read_u32(r)?;
            let len = read_u64(r)?;
            if len > MAX_ARRAY {
                return Err(VocabError::Format(format!("array of {len}")));
            }
            if item == GGUF_STRING {
                for _ in 0..len {
                    let n = read_u64(r)?;
                    skip(r, n)?;
                }
                Ok(())
            } else {
                let size =
                    scalar_size(item).ok_or_else(|| VocabError::Format(format!("type {item}")))?;
                skip(r, len * size)
            }
        }
        _ => {
            let size =
                scalar_size(kind).ok_or_else(|| VocabError::Format(format!("type {kind}")))?;
            skip(r, size)
        }
    }
}

fn skip(r: &mut impl Read, n: u64) -> Result<(), VocabError> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
    if copied != n {
        return Err(VocabError::Format("truncated".into()));
    }
    Ok(())
}

fn read_u32(r: &mut impl Read) -> Result<u32, VocabError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64, VocabError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> Result<String, VocabError> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(VocabError::Format(format!("string of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(|_| VocabError::Format("string not UTF-8".into()))
}

/// One answer's text, assembled by the gateway from the tokens it received.
#[derive(Debug)]
pub struct Transcript {
    vocabulary: Arc<Vocabulary>,
    text: TextStream,
    stopped: bool,
}

/// What the gateway's own detokenization says one step shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// This text (possibly empty).
    Text(String),
    /// This text, and a stop sequence ended the answer here.
    Stopped(String),
    /// The token is not in the vocabulary, or came after the answer ended.
    Invalid,
}

impl Transcript {
    /// A transcript of an answer that ends on any of `stops`.
    pub fn new(vocabulary: Arc<Vocabulary>, stops: &[String]) -> Self {
        Self {
            vocabulary,
            text: TextStream::new(stops),
            stopped: false,
        }
    }

    /// The text the next token releases.
    pub fn push(&mut self, token: u32) -> Expected {
        if self.stopped {
            return Expected::Invalid;
        }
        let Some(piece) = self.vocabulary.piece(token) else {
            return Expected::Invalid;
        };
        match self.text.push(piece) {
            Pushed::Text(t) => Expected::Text(t),
            Pushed::Stopped(t) => {
                self.stopped = true;
                Expected::Stopped(t)
            }
        }
    }

    /// The text still held back, released at the end.
    pub fn finish(&mut self) -> String {
        self.text.finish()
    }

    /// Whether one of the request's stop sequences ended the answer.
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_alphabet_round_trips() {
        let decoder = byte_decoder();
        assert_eq!(decoder.len(), 256);
        assert_eq!(decode_bpe("Ġworld", &decoder), b" world");
        assert_eq!(decode_bpe("Ċ", &decoder), b"\n");
        assert_eq!(
            piece(Kind::Spm, TOKEN_NORMAL, "\u{2581}hi", &decoder),
            b" hi"
        );
        assert_eq!(piece(Kind::Spm, TOKEN_BYTE, "<0x0A>", &decoder), b"\n");
        assert!(piece(Kind::Bpe, TOKEN_CONTROL, "<|im_end|>", &decoder).is_empty());
    }

    #[test]
    fn hostile_files_are_refused_not_read_to_the_end() {
        let mut not_gguf: &[u8] = b"GGML\x03\x00\x00\x00";
        assert!(Vocabulary::read(&mut not_gguf).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(b"GGUF");
        huge.extend_from_slice(&3u32.to_le_bytes());
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Vocabulary::read(&mut huge.as_slice()).is_err());
    }
}
