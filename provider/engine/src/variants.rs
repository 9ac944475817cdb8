//! Cheaper or altered copies of a model, for testing and calibrating the audit: the weights a
//! cheating provider would serve while claiming the original's digest.
//!
//! Quantized variants come from llama.cpp's own quantize API (`llama_model_quantize`, with
//! per-tensor type overrides): a whole model at Q4_0 or Q2_K, every `ffn_down` at q4_0, or one
//! tensor at q4_0. Tensors whose type does not change are copied byte for byte. The
//! "other weights, same tokenizer" variant rewrites the quantized values of every tensor of one
//! transformer block with pseudo-random ones.
//!
//! This is the one module with `unsafe` code: calls into llama.cpp's C API.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The variants the audit tests and the calibration harness use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The whole model requantized to Q4_0.
    Q4_0,
    /// The whole model requantized to Q2_K (on SmolLM2-135M only `ffn_down` takes K-quants;
    /// the rest falls back to q4_0).
    Q2K,
    /// Every `ffn_down` tensor at q4_0, the rest untouched.
    FfnDownQ4_0,
    /// One tensor (`blk.14.ffn_down.weight`) at q4_0, the rest untouched: the subtle case.
    OneTensorQ4_0,
    /// Every quantized tensor of block 14 given other (pseudo-random) values: same tokenizer,
    /// other weights.
    PerturbedBlock,
}

impl Variant {
    /// Every variant.
    pub const ALL: [Self; 5] = [
        Self::Q4_0,
        Self::Q2K,
        Self::FfnDownQ4_0,
        Self::OneTensorQ4_0,
        Self::PerturbedBlock,
    ];

    /// A short stable name, also the file name stem.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q2K => "q2_k",
            Self::FfnDownQ4_0 => "ffn-down-q4_0",
            Self::OneTensorQ4_0 => "one-tensor-q4_0",
            Self::PerturbedBlock => "perturbed-block",
        }
    }
}

/// The tensor [`Variant::OneTensorQ4_0`] requantizes and the block [`Variant::PerturbedBlock`]
/// rewrites: the middle of SmolLM2-135M's 30 blocks.
pub const TARGET_BLOCK: u32 = 14;

/// Failures making a variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VariantError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// llama.cpp refused.
    #[error("{0}")]
    Llama(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VariantError + '_ {
    move |source| VariantError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `variant` of `original` at `target` unless it is there already; returns `target`.
pub fn ensure(original: &Path, variant: Variant, target: &Path) -> Result<PathBuf, VariantError> {
    if target.is_file() {
        return Ok(target.to_path_buf());
    }
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let partial = target.with_extension("gguf.part");
    let block = format!("blk\\.{TARGET_BLOCK}\\.ffn_down\\.weight");
    match variant {
        Variant::Q4_0 => quantize(original, &partial, Ftype::Q4_0, &[])?,
        Variant::Q2K => quantize(original, &partial, Ftype::Q2K, &[])?,
        Variant::FfnDownQ4_0 => quantize(original, &partial, Ftype::Q4_1, &[("ffn_down", Q4_0)])?,
        Variant::OneTensorQ4_0 => quantize(original, &partial, Ftype::Q4_1, &[(&block, Q4_0)])?,
        Variant::PerturbedBlock => perturb_block(original, &partial, TARGET_BLOCK)?,
    }
    std::fs::rename(&partial, target).map_err(io_err(target))?;
    Ok(target.to_path_buf())
}

/// Every variant of `original` in `dir`, made when missing, in [`Variant::ALL`] order.
pub fn ensure_all(original: &Path, dir: &Path) -> Result<Vec<(Variant, PathBuf)>, VariantError> {
    let stem = original
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    Variant::ALL
        .iter()
        .map(|&v| {
            let path = dir.join(format!("{stem}.{}.gguf", v.name()));
            ensure(original, v, &path).map(|p| (v, p))
        })
        .collect()
}

/// Target file types of a whole-model quantization.
#[derive(Debug, Clone, Copy)]
enum Ftype {
    Q4_0,
    Q4_1,
    Q2K,
}

const Q4_0: llama_cpp_sys_2::ggml_type = llama_cpp_sys_2::GGML_TYPE_Q4_0;

fn quantize(
    input: &Path,
    output: &Path,
    ftype: Ftype,
    overrides: &[(&str, llama_cpp_sys_2::ggml_type)],
) -> Result<(), VariantError> {
    let path = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| VariantError::Llama(format!("{} contains a NUL byte", p.display())))
    };
    let (input_c, output_c) = (path(input)?, path(output)?);
    let patterns: Vec<CString> = overrides
        .iter()
        .map(|(p, _)| CString::new(*p).map_err(|_| VariantError::Llama("bad pattern".into())))
        .collect::<Result<_, _>>()?;
    let mut table: Vec<llama_cpp_sys_2::llama_model_tensor_override> = patterns
        .iter()
        .zip(overrides)
        .map(
            |(p, (_, ty))| llama_cpp_sys_2::llama_model_tensor_override {
                pattern: p.as_ptr(),
                type_: *ty,
            },
        )
        .collect();
    // The list ends with a null pattern.
    table.push(llama_cpp_sys_2::llama_model_tensor_override {
        pattern: std::ptr::null(),
        type_: 0,
    });
    // SAFETY: plain C call returning a struct by value.
    let mut params = unsafe { llama_cpp_sys_2::llama_model_quantize_default_params() };
    params.ftype = match ftype {
        Ftype::Q4_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_0,
        Ftype::Q4_1 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_1,
        Ftype::Q2K => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q2_K,
    };
    params.allow_requantize = true;
    params.nthread = 2;
    if !overrides.is_empty() {
        params.tt_overrides = table.as_ptr();
    }
    // SAFETY: the paths are NUL-terminated and outlive the call; `table` (and the patterns it
    // points to) outlive it too and end with a null pattern, as llama.cpp requires.
    let status = unsafe {
        llama_cpp_sys_2::llama_model_quantize(input_c.as_ptr(), output_c.as_ptr(), &params)
    };
    if status != 0 {
        return Err(VariantError::Llama(format!(
            "llama_model_quantize({}) failed with status {status}",
            input.display()
        )));
    }
    Ok(())
}

/// Where one tensor's data lies in a GGUF file.
#[derive(Debug)]
struct TensorSpan {
    name: String,
    kind: llama_cpp_sys_2::ggml_type,
    offset: u64,
    size: u64,
}

/// Reads the tensor table of a GGUF file through llama.cpp's gguf reader.
fn tensor_spans(path: &Path) -> Result<Vec<TensorSpan>, VariantError> {
    let path_c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VariantError::Llama("path contains a NUL byte".into()))?;
    let params = llama_cpp_sys_2::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: the path is NUL-terminated; with no_alloc and no ggml context, llama.cpp reads only
    // the metadata.
    let ctx = unsafe { llama_cpp_sys_2::gguf_init_from_file(path_c.as_ptr(), params) };
    if ctx.is_null() {
        return Err(VariantError::Llama(format!(
            "{} is not a readable GGUF file",
            path.display()
        )));
    }
    let mut spans = Vec::new();
    // SAFETY: `ctx` is a live gguf context until the gguf_free below; tensor ids are within
    // 0..n_tensors; the name pointer is a NUL-terminated string owned by the context, copied
    // before the context is freed.
    unsafe {
        let data = llama_cpp_sys_2::gguf_get_data_offset(ctx) as u64;
        for id in 0..llama_cpp_sys_2::gguf_get_n_tensors(ctx) {
            let name = std::ffi::CStr::from_ptr(llama_cpp_sys_2::gguf_get_tensor_name(ctx, id))
                .to_string_lossy()
                .into_owned();
            spans.push(TensorSpan {
                name,
                kind: llama_cpp_sys_2::gguf_get_tensor_type(ctx, id),
                offset: data + llama_cpp_sys_2::gguf_get_tensor_offset(ctx, id) as u64,
                size: llama_cpp_sys_2::gguf_get_tensor_size(ctx, id) as u64,
            });
        }
        llama_cpp_sys_2::gguf_free(ctx);
    }
    Ok(spans)
}

/// Copies `input` to `output` with the 4-bit values of every Q4_0/Q4_1 tensor of block `block`
/// replaced by pseudo-random ones (the per-block scales and minimums stay, so the weights keep
/// their range but lose their meaning).
fn perturb_block(input: &Path, output: &Path, block: u32) -> Result<(), VariantError> {
    let spans = tensor_spans(input)?;
    std::fs::copy(input, output).map_err(io_err(output))?;
    let prefix = format!("blk.{block}.");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(output)
        .map_err(io_err(output))?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(block);
    let mut changed = 0;
    for span in spans.iter().filter(|s| s.name.starts_with(&prefix)) {
        // Block layouts: Q4_0 = f16 scale + 16 bytes of nibbles; Q4_1 = f16 scale, f16 min + 16.
        let (block_bytes, header) = match span.kind {
            llama_cpp_sys_2::GGML_TYPE_Q4_0 => (18usize, 2usize),
            llama_cpp_sys_2::GGML_TYPE_Q4_1 => (20, 4),
            _ => continue,
        };
        let mut data = vec![0u8; usize::try_from(span.size).unwrap_or(0)];
        file.seek(SeekFrom::Start(span.offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(io_err(output))?;
        for chunk in data.chunks_exact_mut(block_bytes) {
            for byte in &mut chunk[header..] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = (state >> 24) as u8;
            }
        }
        file.seek(SeekFrom::Start(span.offset))
            .and_then(|_| file.write_all(&data))
            .map_err(io_err(output))?;
        changed += 1;
    }
    file.sync_all().map_err(io_err(output))?;
    if changed == 0 {
        return Err(VariantError::Llama(format!(
            "block {block} has no Q4_0/Q4_1 tensors to perturb"
        )));
    }
    Ok(())
}
