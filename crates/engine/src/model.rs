//! A Llama-family or Mixtral-style model: its weights, gathered from the
//! loader, and its forward pass.
//!
//! Blocks: RMSNorm → attention (grouped-query, rotary embedding, KV cache)
//! → residual → RMSNorm → SwiGLU feed-forward, dense or a mixture of
//! experts (top-k router) → residual. The output projection is the token
//! embedding when the model ties them.

use crate::cache::{CacheStats, Lru};
use crate::chat::ChatTemplate;
use crate::config::{Config, RopeStyle, RouterNorm};
use crate::kernels::{self, Activations, Bytes, Input, Matrix, OutPtr, QuantizedActs, WeightType};
use crate::team::Team;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use tpde_format::ggml::GgmlType;
use tpde_format::FileContent;
use tpde_ingest::gguf;
use tpde_loader::{LoadOptions, LoadedStep, Loader, MemoryPlan, StepSet, StreamReport};
use tpde_pack::{Container, Error, ExpertReader, ExtractedTensor, Fidelity, Result};

/// Where a container's model description lives.
pub enum Metadata {
    /// The header of its GGUF file (hyper-parameters and tokenizer).
    Gguf(Box<gguf::Header>),
    /// A Hugging Face folder: `config.json`, and `tokenizer.json` if present.
    Hf {
        config: Vec<u8>,
        tokenizer: Option<Vec<u8>>,
        tokenizer_config: Option<Vec<u8>>,
    },
}

fn read_blob(c: &Container, blob: &tpde_format::Blob, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (i, chunk) in blob.chunks.iter().enumerate() {
        out.extend(c.read_blob_chunk(chunk, || format!("{what} chunk {i}"))?);
    }
    Ok(out)
}

impl Metadata {
    /// Finds the model description among the container's files.
    pub fn read(c: &Container) -> Result<Metadata> {
        let files = &c.manifest.files;
        for f in files {
            if let FileContent::Gguf { header, .. } = &f.content {
                let bytes = read_blob(c, header, &format!("file {:?} header", f.path))?;
                let (h, _) =
                    gguf::read_header(&bytes[..], f.len).map_err(|source| Error::Gguf {
                        path: c.path.join(&f.path),
                        source,
                    })?;
                return Ok(Metadata::Gguf(Box::new(h)));
            }
        }
        // The file of that name nearest the top of the folder (a model
        // folder may hold other `config.json` files in sub-folders).
        let find = |name: &str| {
            files
                .iter()
                .filter_map(|f| match &f.content {
                    FileContent::Blob { blob } if f.path.rsplit('/').next() == Some(name) => {
                        Some((f, blob))
                    }
                    _ => None,
                })
                .min_by_key(|(f, _)| f.path.matches('/').count())
        };
        let Some((f, blob)) = find("config.json") else {
            return Err(Error::input(
                &c.path,
                "no model description: the container holds neither a GGUF file nor a config.json (tpde bench --stream-only measures the loader alone)",
            ));
        };
        let config = read_blob(c, blob, &format!("file {:?}", f.path))?;
        let optional = |name: &str| -> Result<Option<Vec<u8>>> {
            match find(name) {
                Some((f, blob)) => Ok(Some(read_blob(c, blob, &format!("file {:?}", f.path))?)),
                None => Ok(None),
            }
        };
        Ok(Metadata::Hf {
            config,
            tokenizer: optional("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json")?,
        })
    }

    /// The model's tokenizer and chat template, when it carries them.
    pub fn tokenizer(&self, path: &Path) -> Result<Option<(Tokenizer, Option<ChatTemplate>)>> {
        let bad = |m: String| Error::input(path, m);
        match self {
            Metadata::Gguf(h) => {
                if h.get("tokenizer.ggml.model").is_none() {
                    return Ok(None);
                }
                let tok = Tokenizer::from_gguf(h).map_err(bad)?;
                let chat = match h.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
                    Some(src) => Some(ChatTemplate::new(src).map_err(bad)?),
                    None => None,
                };
                Ok(Some((tok, chat)))
            }
            Metadata::Hf {
                tokenizer: None, ..
            } => Ok(None),
            Metadata::Hf {
                tokenizer: Some(t),
                tokenizer_config,
                ..
            } => {
                let tok = Tokenizer::from_tokenizer_json(t).map_err(bad)?;
                let chat = match tokenizer_config {
                    Some(b) => {
                        let j: serde_json::Value = serde_json::from_slice(b)
                            .map_err(|e| bad(format!("tokenizer_config.json is not JSON: {e}")))?;
                        match j["chat_template"].as_str() {
                            Some(src) => Some(ChatTemplate::new(src).map_err(bad)?),
                            None => None,
                        }
                    }
                    None => None,
                };
                Ok(Some((tok, chat)))
            }
        }
    }

    pub fn config(&self, path: &Path) -> Result<Config> {
        match self {
            Metadata::Gguf(h) => Config::from_gguf(h),
            Metadata::Hf { config, .. } => Config::from_hf_json(config),
        }
        .map_err(|m| Error::input(path, m))
    }
}

/// A tensor as the loader delivered it.
struct Raw {
    dtype: String,
    shape: Vec<u64>,
    bytes: Bytes,
    /// The bytes are the tensor's tpde base blocks of this layout (base
    /// fidelity), not values in `dtype`.
    base: Option<tpde_format::BaseLayout>,
}

fn values_f32(name: &str, dtype: &str, b: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let conv = |w: usize, f: &dyn Fn(&[u8]) -> f32| -> std::result::Result<Vec<f32>, String> {
        if !b.len().is_multiple_of(w) {
            return Err(format!("{name}: {} bytes of {dtype}", b.len()));
        }
        Ok(b.chunks_exact(w).map(f).collect())
    };
    match dtype {
        "F32" => conv(4, &|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        "F16" => conv(2, &|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        "BF16" => conv(2, &|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        other => {
            let ty = GgmlType::from_name(other)
                .filter(|t| tpde_codecs::ggml::supports(*t))
                .ok_or_else(|| format!("{name}: dtype {other} is not supported by the engine"))?;
            let blocks = b.len() as u64 / ty.block_bytes();
            let mut out = vec![0.0f32; (blocks * ty.block_elems()) as usize];
            tpde_codecs::ggml::dequantize(ty, b, &mut out).map_err(|e| format!("{name}: {e}"))?;
            Ok(out)
        }
    }
}

impl Raw {
    /// Its values as f32.
    fn values(&self, name: &str) -> std::result::Result<Vec<f32>, String> {
        match &self.base {
            Some(layout) => {
                let numel: u64 = self.shape.iter().product();
                let rows = numel as usize / layout.cols.max(1);
                kernels::base_values_f32(layout, rows, &self.bytes)
                    .map_err(|m| format!("{name}: {m}"))
            }
            None => values_f32(name, &self.dtype, &self.bytes),
        }
    }

    fn vector(&self, name: &str, len: usize) -> std::result::Result<Vec<f32>, String> {
        let v = self.values(name)?;
        if v.len() != len {
            return Err(format!("{name}: {} values, expected {len}", v.len()));
        }
        Ok(v)
    }

    /// As `count` matrices of `rows × cols` (a stacked tensor holds
    /// `count` of them back to back).
    fn matrices(
        &self,
        name: &str,
        count: usize,
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Vec<Matrix>, String> {
        // Sizes come from the model's metadata: checked, so that a count
        // that wraps cannot pass for the tensor's size, and a matrix with
        // no elements is refused rather than cut into empty pieces.
        let want = count
            .checked_mul(rows)
            .and_then(|n| n.checked_mul(cols))
            .filter(|&n| n > 0);
        let numel = self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        if want.is_none()
            || numel != want.map(|n| n as u64)
            || self.shape.last() != Some(&(cols as u64))
        {
            return Err(format!(
                "{name}: shape {:?}, expected {count} × {rows} × {cols} (and not empty)",
                self.shape
            ));
        }
        // A tpde base computes as the GGML blocks that hold its values.
        let repacked = match &self.base {
            Some(layout) if layout.cols == cols => {
                kernels::base_as_ggml(layout, count * rows, &self.bytes)
                    .map_err(|m| format!("{name}: {m}"))?
            }
            _ => None,
        };
        if let Some((t, v)) = repacked {
            let b = Bytes::from_vec(v);
            let each = rows * cols / kernels::QK * t.block_bytes();
            return (0..count)
                .map(|e| {
                    Matrix::blocks(t, rows, cols, b.slice(e * each..(e + 1) * each))
                        .map_err(|m| format!("{name}: {m}"))
                })
                .collect();
        }
        let wtype = match (self.base.is_some(), self.dtype.as_str()) {
            (false, "Q8_0") => Some(WeightType::Q8_0),
            (false, "Q4_0") => Some(WeightType::Q4_0),
            (false, "Q4_1") => Some(WeightType::Q4_1),
            _ => None,
        };
        match wtype {
            Some(t) if cols.is_multiple_of(kernels::QK) => {
                let each = rows * cols / kernels::QK * t.block_bytes();
                (0..count)
                    .map(|e| {
                        let b = self.bytes.slice(e * each..(e + 1) * each);
                        Matrix::blocks(t, rows, cols, b).map_err(|m| format!("{name}: {m}"))
                    })
                    .collect()
            }
            _ => {
                let v = self.values(name)?;
                v.chunks_exact(rows * cols)
                    .map(|c| {
                        Matrix::f32(rows, cols, c.to_vec()).map_err(|m| format!("{name}: {m}"))
                    })
                    .collect()
            }
        }
    }
}

/// A feed-forward block.
pub enum Ffn {
    Dense {
        gate: Matrix,
        up: Matrix,
        down: Matrix,
    },
    Moe {
        router: Matrix,
        /// Every routed expert, or none when they are fetched on demand
        /// (streamed from expert shards).
        experts: Vec<Arc<Expert>>,
        /// An expert every token goes through (Qwen-MoE, DeepSeek), and the
        /// one-row projection whose sigmoid scales it, when present.
        shared: Option<(Expert, Option<Matrix>)>,
    },
}

pub struct Expert {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

pub struct Model {
    pub config: Config,
    pub embed: Matrix,
    pub out_norm: Vec<f32>,
    /// The output projection (the embedding itself when tied).
    pub output: Matrix,
    /// Bytes of weights held resident (the expert cache not included).
    pub weight_bytes: usize,
    weights: Weights,
}

/// Where the layers' weights are.
enum Weights {
    /// Every layer resident.
    Resident(Vec<Layer>),
    /// Streamed from the container on every forward pass.
    Streamed(Box<Streamer>),
}

/// Layers streamed from the container for every forward pass (the hot
/// tier is not resident either), and the routed experts fetched from their
/// shards through an LRU cache that uses what the budget leaves.
struct Streamer {
    loader: Mutex<Loader>,
    /// A second handle on the container for expert fetches, when its
    /// experts are in shards (otherwise they stream with their layer).
    shards: Option<Container>,
    /// Expert shards read with `O_DIRECT` too (the layers' `direct`).
    direct: bool,
    fidelity: Fidelity,
    cache: Mutex<Lru<(usize, usize), Arc<Expert>>>,
    stats: Mutex<StreamStats>,
}

/// What streaming did over the model's life.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StreamStats {
    /// Passes over the layers (one per forward call).
    pub passes: u64,
    /// Bytes the loader read for the layers.
    pub layer_bytes: u64,
    /// Bytes read for experts the cache did not hold.
    pub expert_bytes: u64,
    /// Wall seconds of the passes, and of those with a read in flight.
    pub wall_seconds: f64,
    pub read_seconds: f64,
    pub cache: CacheStats,
}

impl StreamStats {
    /// Every byte read while streaming.
    pub fn bytes(&self) -> u64 {
        self.layer_bytes + self.expert_bytes
    }
}

/// Placement choices for [`Model::load_with`].
#[derive(Clone, Debug, Default)]
pub struct Placing {
    /// Positions a session will hold (for the KV cache in the budget).
    pub ctx: usize,
    /// Stream the layers even when the budget could hold them.
    pub stream: bool,
    /// At most this much for the expert cache (default: what the budget
    /// leaves; with no budget, every expert once fetched).
    pub expert_cache: Option<u64>,
}

/// How a model was placed in memory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Placement {
    /// Layers streamed per forward pass (`false`: every weight resident).
    pub streamed: bool,
    /// The loader's memory plan.
    pub loader: MemoryPlan,
    /// Weights held resident: every one, or the embedding and output.
    pub resident_weight_bytes: u64,
    /// Kept for the KV cache and the activations.
    pub session_bytes: u64,
    /// What the expert cache may hold.
    pub expert_cache_bytes: u64,
}

/// What loading a model cost.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub seconds: f64,
    pub stream: StreamReport,
    pub hot_bytes: u64,
    /// The container's manifest digest (BLAKE3, hex) and format version.
    pub manifest_blake3: String,
    pub format_version: u32,
    pub placement: Placement,
}

/// The role of a tensor, from its name in either naming scheme.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Role {
    Embed,
    OutNorm,
    Output,
    RopeFreqs,
    /// Per layer: a role name (`wq`, `ffn_gate`, …), and the expert for a
    /// per-expert tensor.
    Layer(usize, &'static str, Option<usize>),
}

fn role(name: &str) -> Option<Role> {
    let n = name.strip_suffix(".weight").unwrap_or(name);
    let bias = name.ends_with(".bias");
    match n {
        "token_embd" | "model.embed_tokens" => return Some(Role::Embed),
        "output_norm" | "model.norm" => return Some(Role::OutNorm),
        "output" | "lm_head" => return Some(Role::Output),
        "rope_freqs" => return Some(Role::RopeFreqs),
        _ => {}
    }
    let (layer, rest) = if let Some(r) = n.strip_prefix("blk.") {
        r.split_once('.')?
    } else if let Some(r) = n.strip_prefix("model.layers.") {
        r.split_once('.')?
    } else {
        return None;
    };
    let layer: usize = layer.parse().ok()?;
    let rest = rest.strip_suffix(".bias").unwrap_or(rest);
    // Per-expert tensors of either scheme.
    for prefix in ["block_sparse_moe.experts.", "mlp.experts."] {
        if let Some(r) = rest.strip_prefix(prefix) {
            let (e, w) = r.split_once('.')?;
            let e: usize = e.parse().ok()?;
            let w = match w {
                "w1" | "gate_proj" => "exp_gate",
                "w3" | "up_proj" => "exp_up",
                "w2" | "down_proj" => "exp_down",
                _ => return None,
            };
            return Some(Role::Layer(layer, w, Some(e)));
        }
    }
    let r: &'static str = match (rest, bias) {
        ("attn_norm" | "input_layernorm", false) => "attn_norm",
        ("attn_q" | "self_attn.q_proj", false) => "wq",
        ("attn_k" | "self_attn.k_proj", false) => "wk",
        ("attn_v" | "self_attn.v_proj", false) => "wv",
        ("attn_q" | "self_attn.q_proj", true) => "bq",
        ("attn_k" | "self_attn.k_proj", true) => "bk",
        ("attn_v" | "self_attn.v_proj", true) => "bv",
        ("attn_output" | "self_attn.o_proj", false) => "wo",
        ("ffn_norm" | "post_attention_layernorm", false) => "ffn_norm",
        ("ffn_gate" | "mlp.gate_proj", false) => "ffn_gate",
        ("ffn_up" | "mlp.up_proj", false) => "ffn_up",
        ("ffn_down" | "mlp.down_proj", false) => "ffn_down",
        ("ffn_gate_inp" | "block_sparse_moe.gate" | "mlp.gate", false) => "router",
        ("ffn_gate_shexp" | "mlp.shared_expert.gate_proj", false) => "sh_gate",
        ("ffn_up_shexp" | "mlp.shared_expert.up_proj", false) => "sh_up",
        ("ffn_down_shexp" | "mlp.shared_expert.down_proj", false) => "sh_down",
        ("ffn_gate_inp_shexp" | "mlp.shared_expert_gate", false) => "sh_gate_inp",
        ("ffn_gate_exps", false) => "exps_gate",
        ("ffn_up_exps", false) => "exps_up",
        ("ffn_down_exps", false) => "exps_down",
        _ => return None,
    };
    Some(Role::Layer(layer, r, None))
}

/// Bytes the engine holds for a tensor: quantized blocks and f32 as they
/// are, every other type as f32.
fn held_bytes(t: &tpde_format::Tensor, fidelity: Fidelity) -> u64 {
    let numel: u64 = t.shape.iter().product();
    match (t.base_layout(), fidelity) {
        // Base blocks become GGML blocks of 32: 18 or 34 bytes each.
        (Some(l), Fidelity::Base) => match l.codec {
            tpde_format::BaseCodec::Q4 => numel / 32 * 18,
            tpde_format::BaseCodec::Q8 => numel / 32 * 34,
        },
        _ => match t.dtype.as_str() {
            "Q4_0" | "Q4_1" | "Q8_0" | "F32" => t.byte_len,
            _ => numel * 4,
        },
    }
}

/// What a session of `ctx` positions holds besides the weights: the KV
/// cache, the activations of a batch of `ctx` tokens, the logits, and a
/// margin for the tokenizer (128 bytes a token), thread stacks and the
/// allocator.
pub fn session_bytes(c: &Config, ctx: usize) -> u64 {
    let ctx = ctx.min(c.ctx_len.max(1)) as u64;
    let kv = 2 * c.n_layers as u64 * ctx * c.kv_dim() as u64 * 4;
    let per_token = (6 * c.d_model + 3 * c.q_dim() + 2 * c.kv_dim() + 3 * c.d_ff) as u64 * 4;
    kv + ctx * per_token + 2 * c.vocab as u64 * 4 + (4 << 20) + c.vocab as u64 * 128
}

/// The tensors of a delivered step by role (zero-copy views of `data`);
/// the names no role matches go to `unknown`.
fn collect_roles(
    step: &LoadedStep,
    data: &Arc<Vec<u8>>,
    raw: &mut HashMap<Role, Raw>,
    unknown: &mut Vec<String>,
) {
    for t in &step.tensors {
        match role(&t.name) {
            Some(r) => {
                raw.insert(
                    r,
                    Raw {
                        dtype: t.dtype.clone(),
                        shape: t.shape.clone(),
                        bytes: Bytes::new(data.clone(), t.range.clone()),
                        base: t.base,
                    },
                );
            }
            None => unknown.push(t.name.clone()),
        }
    }
}

/// Tensors the engine does not use would be computed wrong if ignored (a
/// shared expert, a bias it does not apply): an error.
fn refuse_unknown(unknown: &[String]) -> std::result::Result<(), String> {
    match unknown.iter().find(|n| !n.contains("rotary_emb.inv_freq")) {
        Some(n) => Err(format!("tensor {n:?} has no place in the engine's model")),
        None => Ok(()),
    }
}

fn one_matrix(x: Raw, name: &str, rows: usize, cols: usize) -> std::result::Result<Matrix, String> {
    x.matrices(name, 1, rows, cols)
        .map(|mut v| v.pop().expect("one matrix"))
}

fn take_role(raw: &mut HashMap<Role, Raw>, r: Role) -> std::result::Result<Raw, String> {
    raw.remove(&r)
        .ok_or_else(|| format!("the model has no tensor for {r:?}"))
}

impl Model {
    /// Opens a container and loads its weights at the loader's fidelity,
    /// for sessions of up to `ctx` positions. Every weight is resident when
    /// the RAM budget allows (or there is none); otherwise the embedding and
    /// output stay resident, the layers stream from the container on every
    /// forward pass, and routed experts are fetched from their shards
    /// through an LRU cache that gets what the budget leaves.
    pub fn load(
        path: &Path,
        options: LoadOptions,
        ctx: usize,
    ) -> Result<(Model, Metadata, LoadReport)> {
        Model::load_with(
            path,
            options,
            &Placing {
                ctx,
                ..Placing::default()
            },
        )
    }

    /// [`Model::load`] with the placement choices spelled out.
    pub fn load_with(
        path: &Path,
        options: LoadOptions,
        placing: &Placing,
    ) -> Result<(Model, Metadata, LoadReport)> {
        let t0 = std::time::Instant::now();
        // At base fidelity the engine computes on the base blocks
        // themselves. The engine keeps what the loader delivers, so the
        // loader need not keep the hot tier too (that would double the
        // memory while loading): each step reads its own hot extents.
        let options = LoadOptions {
            base_blocks: true,
            hot_resident: false,
            ..options
        };
        let c = Container::open(path)?;
        let meta = Metadata::read(&c)?;
        let config = meta.config(path)?;
        let session = session_bytes(&config, placing.ctx);
        let held: u64 = c
            .manifest
            .tensors
            .iter()
            .map(|t| held_bytes(t, options.fidelity))
            .sum();
        let resident = match options.ram_budget {
            _ if placing.stream => false,
            None => true,
            Some(b) => {
                Loader::memory_plan(&c, &options).is_ok_and(|p| p.total + held + session <= b)
            }
        };
        let digest = tpde_format::hex(&c.header.manifest_blake3);
        let format_version = c.header.version;
        let (model, stream, placement, hot_bytes) = if resident {
            let mut loader = Loader::with_container(c, options)?;
            let mut raw: HashMap<Role, Raw> = HashMap::new();
            let mut unknown = Vec::new();
            let stream = loader.stream(|step| {
                let data = Arc::new(std::mem::take(&mut step.data));
                collect_roles(step, &data, &mut raw, &mut unknown);
                Ok(())
            })?;
            let model =
                Model::assemble(config, raw, &unknown).map_err(|m| Error::input(path, m))?;
            let placement = Placement {
                streamed: false,
                loader: loader.memory.clone(),
                resident_weight_bytes: model.weight_bytes as u64,
                session_bytes: session,
                expert_cache_bytes: 0,
            };
            (model, stream, placement, loader.hot_bytes())
        } else {
            Model::load_streamed(c, config, options, session, placing.expert_cache)?
        };
        Ok((
            model,
            meta,
            LoadReport {
                seconds: t0.elapsed().as_secs_f64(),
                stream,
                hot_bytes,
                manifest_blake3: digest,
                format_version,
                placement,
            },
        ))
    }

    /// The streamed placement: see [`Model::load`].
    fn load_streamed(
        c: Container,
        mut config: Config,
        options: LoadOptions,
        session: u64,
        cache_cap: Option<u64>,
    ) -> Result<(Model, StreamReport, Placement, u64)> {
        let path = c.path.clone();
        let budget = options.ram_budget.unwrap_or(u64::MAX);
        let has_shards = !c.manifest.experts.is_empty();
        // First the tensors outside the layers, read once with a loader of
        // their own (its buffers are as large as the embedding), then a
        // loader sized for one layer, kept to stream them all per token.
        let outside = LoadOptions {
            hot_resident: false,
            stream_experts: !has_shards,
            steps: StepSet::OutsideLayers,
            prefetch: 1,
            ..options.clone()
        };
        // Layers are small and compute fast: reading four ahead keeps a read
        // in flight through more of the pass than two (the part of the pass
        // without one went from 5.5-7 ms to 1.7-2 ms on SmolLM2 here).
        let options = LoadOptions {
            steps: StepSet::Layers,
            prefetch: options.prefetch.max(4),
            // Each layer is computed on as soon as it arrives: its values
            // stay in the cache.
            stores: tpde_loader::StepStores::Cached,
            ..outside.clone()
        };
        let shards = if has_shards {
            let shards = Container::open(&path)?;
            // Its experts are planned now, so that a layout the reader
            // cannot use is an error here rather than at the first token;
            // with `direct`, they are read with O_DIRECT like the layers.
            let reader = ExpertReader::new(&shards)?;
            if options.direct {
                reader.with_direct_reads()?;
            }
            Some(shards)
        } else {
            None
        };
        let mut first = Loader::with_container(Container::open(&path)?, outside)?;
        // Held resident: the tensors outside the layers (embedding, output).
        let globals: u64 = first
            .steps()
            .iter()
            .flat_map(|s| s.tensors.iter())
            .map(|&i| {
                let t = &c.manifest.tensors[i];
                held_bytes(t, options.fidelity)
            })
            .sum();
        let mut raw: HashMap<Role, Raw> = HashMap::new();
        let mut unknown = Vec::new();
        let mut stream = first.stream(|step| {
            let data = Arc::new(std::mem::take(&mut step.data));
            collect_roles(step, &data, &mut raw, &mut unknown);
            Ok(())
        })?;
        drop(first);
        // The process now holds the embedding and output: the plan counts
        // them in its baseline.
        let plan = Loader::memory_plan(&c, &options)?;
        // An expert reader keeps its read buffer between fetches.
        let reader = match has_shards {
            true => ExpertReader::kept_bytes(&c, options.direct),
            false => 0,
        };
        let need = plan.total + session + reader;
        if need > budget {
            return Err(Error::input(
                &path,
                format!(
                    "a RAM budget of {budget} bytes is too small to run this model even with its layers streamed: it needs {need} bytes (the process with the embedding and output ({globals} bytes) {}, the loader's buffers {}, the KV cache and activations {session}{})",
                    plan.baseline_rss,
                    plan.total - plan.baseline_rss,
                    if reader > 0 {
                        format!(", the expert reader's buffer {reader}")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        let mut loader = Loader::with_container(c, options.clone())?;
        // Layers arrive at disk speed: the team's helpers sleep soon
        // between them rather than spin through most of the pass beside
        // the loader's threads (no difference in tokens/s was measurable on
        // this 2-core machine, but it frees the cores).
        crate::team::Team::global().set_patience(
            std::time::Duration::from_micros(20),
            std::time::Duration::ZERO,
        );
        let bad = |m: String| Error::input(&path, m);
        refuse_unknown(&unknown).map_err(bad)?;
        let (embed, out_norm, output, tied) =
            Model::assemble_globals(&mut config, &mut raw).map_err(bad)?;
        if let Some(r) = raw.keys().next() {
            return Err(bad(format!(
                "tensor for {r:?} is outside the model's layers"
            )));
        }
        // One pass over the layers now, so that a tensor missing or out of
        // place is an error at load rather than in the middle of a reply.
        let mut next = 0usize;
        let check = loader.stream(|step| {
            let data = Arc::new(std::mem::take(&mut step.data));
            let (mut raw, mut unknown) = (HashMap::new(), Vec::new());
            collect_roles(step, &data, &mut raw, &mut unknown);
            refuse_unknown(&unknown)
                .and_then(|()| layer_from_step(&config, next, &step.name, raw, has_shards))
                .map_err(bad)?;
            next += 1;
            Ok(())
        })?;
        if next != config.n_layers {
            return Err(bad(format!(
                "{next} layers in the container, the config says {}",
                config.n_layers
            )));
        }
        stream.read_bytes += check.read_bytes;
        stream.wall_seconds += check.wall_seconds;
        let mut weight_bytes = embed.bytes() + out_norm.len() * 4;
        if !tied {
            weight_bytes += output.bytes();
        }
        let cache_bytes = match has_shards {
            true => (budget - need).min(cache_cap.unwrap_or(u64::MAX)),
            false => 0,
        };
        let placement = Placement {
            streamed: true,
            loader: loader.memory.clone(),
            resident_weight_bytes: weight_bytes as u64,
            session_bytes: session,
            expert_cache_bytes: cache_bytes,
        };
        let model = Model {
            config,
            embed,
            out_norm,
            output,
            weight_bytes,
            weights: Weights::Streamed(Box::new(Streamer {
                loader: Mutex::new(loader),
                shards,
                direct: options.direct,
                fidelity: options.fidelity,
                cache: Mutex::new(Lru::new(cache_bytes)),
                stats: Mutex::default(),
            })),
        };
        Ok((model, stream, placement, 0))
    }

    /// Whether the layers stream from the container on every forward pass.
    pub fn is_streamed(&self) -> bool {
        matches!(self.weights, Weights::Streamed(_))
    }

    /// What streaming read so far (`None`: every weight resident).
    pub fn stream_stats(&self) -> Option<StreamStats> {
        match &self.weights {
            Weights::Resident(_) => None,
            Weights::Streamed(st) => {
                let mut s = *lock(&st.stats);
                s.cache = lock(&st.cache).stats();
                Some(s)
            }
        }
    }

    /// The embedding, the output norm, the output projection (and whether
    /// it is the embedding), and the rotary frequency factors into `config`.
    fn assemble_globals(
        config: &mut Config,
        raw: &mut HashMap<Role, Raw>,
    ) -> std::result::Result<(Matrix, Vec<f32>, Matrix, bool), String> {
        let (d, vocab) = (config.d_model, config.vocab);
        let embed = one_matrix(take_role(raw, Role::Embed)?, "token embedding", vocab, d)?;
        let out_norm = take_role(raw, Role::OutNorm)?.vector("output norm", d)?;
        let (output, tied) = match take_role(raw, Role::Output) {
            Ok(x) => (one_matrix(x, "output", vocab, d)?, false),
            Err(_) => (embed.clone(), true),
        };
        if let Ok(f) = take_role(raw, Role::RopeFreqs) {
            config.rope_freq_factors = f.vector("rope_freqs", config.rope_dim / 2)?;
        }
        Ok((embed, out_norm, output, tied))
    }

    fn assemble(
        mut config: Config,
        mut raw: HashMap<Role, Raw>,
        unknown: &[String],
    ) -> std::result::Result<Model, String> {
        refuse_unknown(unknown)?;
        let (embed, out_norm, output, tied) = Model::assemble_globals(&mut config, &mut raw)?;
        let layers = (0..config.n_layers)
            .map(|l| assemble_layer(&config, l, &mut raw, false))
            .collect::<std::result::Result<Vec<_>, String>>()?;
        if let Some(r) = raw.keys().next() {
            return Err(format!(
                "tensor for {r:?} has no place in this model's config"
            ));
        }
        let mut weight_bytes = embed.bytes() + out_norm.len() * 4;
        if !tied {
            weight_bytes += output.bytes();
        }
        weight_bytes += layers.iter().map(layer_bytes).sum::<usize>();
        Ok(Model {
            config,
            embed,
            out_norm,
            output,
            weight_bytes,
            weights: Weights::Resident(layers),
        })
    }

    /// A fresh inference session with room for `ctx` positions.
    pub fn session(&self, ctx: usize) -> Session<'_> {
        Session::new(self, ctx)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Layer `l` from its tensors in `raw` (taken out). With `experts_apart`,
/// a mixture-of-experts layer's routed experts are not among them: they
/// are fetched when the router picks them.
fn assemble_layer(
    c: &Config,
    l: usize,
    raw: &mut HashMap<Role, Raw>,
    experts_apart: bool,
) -> std::result::Result<Layer, String> {
    let (d, q_dim, kv_dim, ff) = (c.d_model, c.q_dim(), c.kv_dim(), c.d_ff);
    macro_rules! get {
        ($r:expr) => {
            take_role(raw, Role::Layer(l, $r, None))
        };
    }
    let name = |r: &str| format!("layer {l} {r}");
    let bias = |x: std::result::Result<Raw, String>, r: &str, len: usize| {
        x.ok().map(|x| x.vector(&name(r), len)).transpose()
    };
    let ffn = if c.n_experts == 0 {
        Ffn::Dense {
            gate: one_matrix(get!("ffn_gate")?, &name("ffn_gate"), ff, d)?,
            up: one_matrix(get!("ffn_up")?, &name("ffn_up"), ff, d)?,
            down: one_matrix(get!("ffn_down")?, &name("ffn_down"), d, ff)?,
        }
    } else {
        let router = one_matrix(get!("router")?, &name("router"), c.n_experts, d)?;
        let e = c.n_experts;
        let experts = if experts_apart {
            Vec::new()
        } else {
            match get!("exps_gate") {
                Ok(g) => {
                    let g = g.matrices(&name("ffn_gate_exps"), e, ff, d)?;
                    let u = get!("exps_up")?.matrices(&name("ffn_up_exps"), e, ff, d)?;
                    let dn = get!("exps_down")?.matrices(&name("ffn_down_exps"), e, d, ff)?;
                    g.into_iter()
                        .zip(u)
                        .zip(dn)
                        .map(|((gate, up), down)| Arc::new(Expert { gate, up, down }))
                        .collect()
                }
                Err(_) => (0..e)
                    .map(|x| {
                        let mut g = |r: &'static str| take_role(raw, Role::Layer(l, r, Some(x)));
                        let nm = |r: &str| format!("layer {l} expert {x} {r}");
                        Ok(Arc::new(Expert {
                            gate: one_matrix(g("exp_gate")?, &nm("gate"), ff, d)?,
                            up: one_matrix(g("exp_up")?, &nm("up"), ff, d)?,
                            down: one_matrix(g("exp_down")?, &nm("down"), d, ff)?,
                        }))
                    })
                    .collect::<std::result::Result<Vec<_>, String>>()?,
            }
        };
        let shared = match get!("sh_gate") {
            Ok(g) => {
                // Its width may differ from the routed experts'.
                let sff = g.shape.first().copied().unwrap_or(0) as usize;
                let e = Expert {
                    gate: one_matrix(g, &name("shared gate"), sff, d)?,
                    up: one_matrix(get!("sh_up")?, &name("shared up"), sff, d)?,
                    down: one_matrix(get!("sh_down")?, &name("shared down"), d, sff)?,
                };
                let gi = match get!("sh_gate_inp") {
                    Ok(x) => Some(one_matrix(x, &name("shared expert gate"), 1, d)?),
                    Err(_) => None,
                };
                Some((e, gi))
            }
            Err(_) => None,
        };
        Ffn::Moe {
            router,
            experts,
            shared,
        }
    };
    Ok(Layer {
        attn_norm: get!("attn_norm")?.vector(&name("attn_norm"), d)?,
        wq: one_matrix(get!("wq")?, &name("wq"), q_dim, d)?,
        wk: one_matrix(get!("wk")?, &name("wk"), kv_dim, d)?,
        wv: one_matrix(get!("wv")?, &name("wv"), kv_dim, d)?,
        wo: one_matrix(get!("wo")?, &name("wo"), d, q_dim)?,
        bq: bias(get!("bq"), "bq", q_dim)?,
        bk: bias(get!("bk"), "bk", kv_dim)?,
        bv: bias(get!("bv"), "bv", kv_dim)?,
        ffn_norm: get!("ffn_norm")?.vector(&name("ffn_norm"), d)?,
        ffn,
    })
}

/// Layer `l` from a streamed step named `step` holding its tensors (and
/// nothing else).
fn layer_from_step(
    c: &Config,
    l: usize,
    step: &str,
    mut raw: HashMap<Role, Raw>,
    experts_apart: bool,
) -> std::result::Result<Layer, String> {
    if step != format!("layer.{l}") {
        return Err(format!("step {step} streamed where layer.{l} was expected"));
    }
    let layer = assemble_layer(c, l, &mut raw, experts_apart)?;
    match raw.keys().next() {
        Some(r) => Err(format!("tensor for {r:?} has no place in layer {l}")),
        None => Ok(layer),
    }
}

fn expert_bytes(e: &Expert) -> usize {
    e.gate.bytes() + e.up.bytes() + e.down.bytes()
}

/// Bytes of weights a layer holds (its routed experts included).
fn layer_bytes(l: &Layer) -> usize {
    let attn = [&l.wq, &l.wk, &l.wv, &l.wo]
        .iter()
        .map(|m| m.bytes())
        .sum::<usize>();
    attn + match &l.ffn {
        Ffn::Dense { gate, up, down } => gate.bytes() + up.bytes() + down.bytes(),
        Ffn::Moe {
            router,
            experts,
            shared,
        } => {
            shared.as_ref().map_or(0, |(e, g)| {
                expert_bytes(e) + g.as_ref().map_or(0, |g| g.bytes())
            }) + router.bytes()
                + experts.iter().map(|e| expert_bytes(e)).sum::<usize>()
        }
    }
}

/// Expert `e` of layer `l` from the tensors fetched from its shard.
fn expert_from_tensors(
    c: &Config,
    l: usize,
    e: usize,
    tensors: Vec<ExtractedTensor>,
) -> std::result::Result<Expert, String> {
    let mut parts: HashMap<&'static str, Raw> = HashMap::new();
    for t in tensors {
        let part = match role(&t.name) {
            Some(Role::Layer(tl, r, x)) if tl == l && x.is_none_or(|x| x == e) => match r {
                "exp_gate" | "exps_gate" => Some("gate"),
                "exp_up" | "exps_up" => Some("up"),
                "exp_down" | "exps_down" => Some("down"),
                _ => None,
            },
            _ => None,
        };
        let Some(part) = part else {
            return Err(format!(
                "layer {l} expert {e}: tensor {:?} has no place in an expert",
                t.name
            ));
        };
        let len = t.data.len();
        parts.insert(
            part,
            Raw {
                dtype: t.dtype,
                shape: t.shape,
                bytes: Bytes::new(Arc::new(t.data), 0..len),
                base: t.base,
            },
        );
    }
    let (d, ff) = (c.d_model, c.d_ff);
    let mut take = |part: &str, rows: usize, cols: usize| {
        let x = parts
            .remove(part)
            .ok_or_else(|| format!("layer {l} expert {e}: no {part} projection in its shard"))?;
        one_matrix(x, &format!("layer {l} expert {e} {part}"), rows, cols)
    };
    Ok(Expert {
        gate: take("gate", ff, d)?,
        up: take("up", ff, d)?,
        down: take("down", d, ff)?,
    })
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xo, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xo.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let k = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(xo).zip(w) {
            *o = v * k * g;
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rotates one head's vector in place for position `pos`.
fn rope(v: &mut [f32], pos: usize, c: &Config, inv_freq: &[f32]) {
    let half = c.rope_dim / 2;
    for (i, &f) in inv_freq.iter().enumerate() {
        let (sin, cos) = (pos as f32 * f).sin_cos();
        let (a, b) = match c.rope_style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Halves => (i, i + half),
        };
        let (x, y) = (v[a], v[b]);
        v[a] = x * cos - y * sin;
        v[b] = x * sin + y * cos;
    }
}

/// Scratch buffers of a forward pass, reused between calls.
#[derive(Default)]
struct Scratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    qa: Prepared,
    qa2: Prepared,
    mm: Vec<f32>,
}

/// A conversation's state: the KV cache and the position reached.
pub struct Session<'m> {
    pub model: &'m Model,
    ctx: usize,
    pos: usize,
    /// Per layer, keys and values: `ctx × kv_dim` each.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    inv_freq: Vec<f32>,
    scratch: Scratch,
    /// Experts chosen, counted per (layer, expert) over the session.
    pub expert_hits: Vec<Vec<u64>>,
    /// Fetches experts from their shards (layers streamed).
    experts: Option<ExpertReader<'m>>,
}

/// An input prepared for block weights: its per-block sums, or its 8-bit
/// form, computed once for every matrix that reads it.
#[derive(Default)]
struct Prepared {
    xsum: Vec<f32>,
    q: QuantizedActs,
}

/// Applies `w` to `x` (`n` rows), preparing `x` into `prep` first when `w`
/// is quantized and `prep` does not already hold it (`fresh`).
fn project(
    w: &Matrix,
    x: &[f32],
    n: usize,
    prep: &mut Prepared,
    fresh: &mut bool,
    out: &mut Vec<f32>,
    mm: &mut Vec<f32>,
) {
    let mode = activations();
    if w.wtype != WeightType::F32 && !*fresh {
        match mode {
            Activations::F32 => kernels::block_sums(x, &mut prep.xsum),
            Activations::Q8 => prep.q.quantize(x, w.cols),
        }
        *fresh = true;
    }
    out.resize(n * w.rows, 0.0);
    let input = Input {
        x,
        n,
        mode,
        xsum: &prep.xsum,
        q: &prep.q,
    };
    kernels::matmul(w, &input, out, mm);
}

/// [`project`] of one input by several matrices of its width, in one
/// parallel job (see [`kernels::matmul_many`]).
fn project_many(
    ws: &[&Matrix],
    x: &[f32],
    n: usize,
    prep: &mut Prepared,
    outs: &mut [&mut Vec<f32>],
    mm: &mut Vec<f32>,
) {
    let mode = activations();
    if ws.iter().any(|w| w.wtype != WeightType::F32) {
        match mode {
            Activations::F32 => kernels::block_sums(x, &mut prep.xsum),
            Activations::Q8 => prep.q.quantize(x, ws[0].cols),
        }
    }
    for (w, o) in ws.iter().zip(outs.iter_mut()) {
        o.resize(n * w.rows, 0.0);
    }
    let input = Input {
        x,
        n,
        mode,
        xsum: &prep.xsum,
        q: &prep.q,
    };
    let mut outs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
    kernels::matmul_many(ws, &input, &mut outs, mm);
}

/// The engine's activation precision: f32 where the CPU has a fast kernel
/// for it (AVX-512) or none for 8-bit inputs either; 8-bit inputs on an
/// AVX2-only CPU, or when `TPDE_Q8_ACTIVATIONS` is set (for comparison).
pub fn activations() -> Activations {
    static A: std::sync::OnceLock<Activations> = std::sync::OnceLock::new();
    *A.get_or_init(|| {
        if std::env::var_os("TPDE_Q8_ACTIVATIONS").is_some() {
            Activations::Q8
        } else {
            kernels::preferred_activations()
        }
    })
}

/// The scratch parts the feed-forward block uses.
struct FfnScratch<'a> {
    g: &'a mut Vec<f32>,
    u: &'a mut Vec<f32>,
    o: &'a mut Vec<f32>,
    qa: &'a mut Prepared,
    qa2: &'a mut Prepared,
    mm: &'a mut Vec<f32>,
}

/// The feed-forward block's part of [`Scratch`] (disjoint from `xn`).
macro_rules! ffn_scratch {
    ($s:expr) => {
        FfnScratch {
            g: &mut $s.g,
            u: &mut $s.u,
            o: &mut $s.o,
            qa: &mut $s.qa,
            qa2: &mut $s.qa2,
            mm: &mut $s.mm,
        }
    };
}

impl<'m> Session<'m> {
    fn new(model: &'m Model, ctx: usize) -> Session<'m> {
        let c = &model.config;
        let ctx = ctx.clamp(1, c.ctx_len.max(1));
        let inv_freq = c.rope_inv_freq();
        Session {
            model,
            ctx,
            pos: 0,
            k_cache: vec![Vec::new(); c.n_layers],
            v_cache: vec![Vec::new(); c.n_layers],
            inv_freq,
            scratch: Scratch::default(),
            expert_hits: vec![vec![0; c.n_experts]; c.n_layers],
            experts: match &model.weights {
                // Planned at load already: the plan cannot fail here.
                Weights::Streamed(st) => st.shards.as_ref().and_then(|c| {
                    let r = ExpertReader::new(c).ok()?;
                    if !st.direct {
                        return Some(r);
                    }
                    // O_DIRECT worked at load; through the page cache should
                    // the file no longer allow it.
                    r.with_direct_reads().or_else(|_| ExpertReader::new(c)).ok()
                }),
                Weights::Resident(_) => None,
            },
        }
    }

    /// Positions filled so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn context(&self) -> usize {
        self.ctx
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.pos = 0;
        for k in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            k.clear();
        }
    }

    /// Runs `tokens` at the next positions; returns the logits of the last
    /// token (`all = false`) or of every token (`all = true`, `n × vocab`).
    pub fn forward(&mut self, tokens: &[u32], all: bool) -> std::result::Result<Vec<f32>, String> {
        let m = self.model;
        let c = &m.config;
        let n = tokens.len();
        if n == 0 {
            return Err("no tokens to run".into());
        }
        if self.pos + n > self.ctx {
            return Err(format!(
                "context full: {} + {n} tokens exceed {} positions",
                self.pos, self.ctx
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(format!(
                "token id {t} is outside the vocabulary of {}",
                c.vocab
            ));
        }
        let d = c.d_model;
        let mut x = vec![0.0f32; n * d];
        for (t, row) in tokens.iter().zip(x.chunks_exact_mut(d)) {
            m.embed.row_into(*t as usize, row);
        }
        match &m.weights {
            Weights::Resident(layers) => {
                for (l, lw) in layers.iter().enumerate() {
                    self.layer(l, lw, &mut x, n)?;
                }
            }
            Weights::Streamed(st) => self.stream_layers(st, &mut x, n)?,
        }
        self.pos += n;
        let s = &mut self.scratch;
        let rows = if all { n } else { 1 };
        let last = &x[(n - rows) * d..];
        s.xn.resize(rows * d, 0.0);
        rms_norm(last, &m.out_norm, c.rms_eps, &mut s.xn);
        let mut logits = Vec::new();
        let mut fresh = false;
        project(
            &m.output,
            &s.xn,
            rows,
            &mut s.qa,
            &mut fresh,
            &mut logits,
            &mut s.mm,
        );
        Ok(logits)
    }

    /// Runs every layer as the loader streams it from the container.
    fn stream_layers(
        &mut self,
        st: &'m Streamer,
        x: &mut [f32],
        n: usize,
    ) -> std::result::Result<(), String> {
        let c = &self.model.config;
        let mut loader = lock(&st.loader);
        let path = loader.container.path.clone();
        let mut next = 0usize;
        let report = loader
            .stream(|step| {
                let data = Arc::new(std::mem::take(&mut step.data));
                let (mut raw, mut unknown) = (HashMap::new(), Vec::new());
                collect_roles(step, &data, &mut raw, &mut unknown);
                let bad = |m: String| Error::integrity(&path, m);
                refuse_unknown(&unknown).map_err(bad)?;
                let lw =
                    layer_from_step(c, next, &step.name, raw, st.shards.is_some()).map_err(bad)?;
                let r = self.layer(next, &lw, x, n);
                drop(lw);
                // The views are gone: the loader gets its buffer back.
                if let Ok(v) = Arc::try_unwrap(data) {
                    step.data = v;
                }
                next += 1;
                r.map_err(bad)
            })
            .map_err(|e| e.to_string())?;
        if next != c.n_layers {
            return Err(format!("{next} of {} layers streamed", c.n_layers));
        }
        let mut s = lock(&st.stats);
        s.passes += 1;
        s.layer_bytes += report.read_bytes;
        s.wall_seconds += report.wall_seconds;
        s.read_seconds += report.stages.read;
        Ok(())
    }

    fn layer(
        &mut self,
        l: usize,
        lw: &Layer,
        x: &mut [f32],
        n: usize,
    ) -> std::result::Result<(), String> {
        let m = self.model;
        let c = &m.config;
        let (d, hd, kv_dim, q_dim) = (c.d_model, c.head_dim, c.kv_dim(), c.q_dim());
        let s = &mut self.scratch;
        s.xn.resize(n * d, 0.0);
        rms_norm(x, &lw.attn_norm, c.rms_eps, &mut s.xn);
        project_many(
            &[&lw.wq, &lw.wk, &lw.wv],
            &s.xn,
            n,
            &mut s.qa,
            &mut [&mut s.q, &mut s.k, &mut s.v],
            &mut s.mm,
        );
        for (b, v) in [(&lw.bq, &mut s.q), (&lw.bk, &mut s.k), (&lw.bv, &mut s.v)] {
            if let Some(b) = b {
                for row in v.chunks_exact_mut(b.len()) {
                    for (a, &bb) in row.iter_mut().zip(b) {
                        *a += bb;
                    }
                }
            }
        }
        for t in 0..n {
            let pos = self.pos + t;
            for h in s.q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(hd) {
                rope(h, pos, c, &self.inv_freq);
            }
            for h in s.k[t * kv_dim..(t + 1) * kv_dim].chunks_exact_mut(hd) {
                rope(h, pos, c, &self.inv_freq);
            }
        }
        self.k_cache[l].extend_from_slice(&s.k[..n * kv_dim]);
        self.v_cache[l].extend_from_slice(&s.v[..n * kv_dim]);
        let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let pos0 = self.pos;
        s.att.resize(n * q_dim, 0.0);
        let q = &s.q;
        // Causal attention over the cache, one (token, head) at a time;
        // member `m` of `k` takes every k-th of them, which balances the
        // longer rows of later tokens.
        let att = OutPtr(s.att.as_mut_ptr());
        Team::global().run(&|m, k| {
            let mut scores = Vec::new();
            for i in (m..n * c.n_heads).step_by(k) {
                // SAFETY: item `i` is this member's alone, inside `att`.
                let out = unsafe { att.part(i * hd, hd) };
                let (t, h) = (i / c.n_heads, i % c.n_heads);
                let qh = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
                let kvh = h / group;
                let len = pos0 + t + 1;
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for p in 0..len {
                    let k = &kc[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd];
                    let sc = kernels::dot_f32(qh, k) * scale;
                    max = max.max(sc);
                    scores.push(sc);
                }
                let mut sum = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                out.fill(0.0);
                for (p, &w) in scores.iter().enumerate() {
                    let v = &vc[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd];
                    let w = w / sum;
                    for (o, &vv) in out.iter_mut().zip(v) {
                        *o += w * vv;
                    }
                }
            }
        });
        let mut fresh = false;
        project(
            &lw.wo, &s.att, n, &mut s.qa, &mut fresh, &mut s.o, &mut s.mm,
        );
        for (a, b) in x.iter_mut().zip(&s.o) {
            *a += b;
        }
        rms_norm(x, &lw.ffn_norm, c.rms_eps, &mut s.xn);
        match &lw.ffn {
            Ffn::Dense { gate, up, down } => {
                swiglu(gate, up, down, &s.xn, n, ffn_scratch!(s), x);
            }
            Ffn::Moe {
                router,
                experts,
                shared,
            } => {
                if let Some((ex, gate)) = shared {
                    let mut ys = vec![0.0f32; n * d];
                    swiglu(
                        &ex.gate,
                        &ex.up,
                        &ex.down,
                        &s.xn,
                        n,
                        ffn_scratch!(s),
                        &mut ys,
                    );
                    let mut gl = Vec::new();
                    if let Some(g) = gate {
                        let mut fresh = false;
                        project(g, &s.xn, n, &mut s.qa, &mut fresh, &mut gl, &mut s.mm);
                    }
                    for t in 0..n {
                        let w = gl.get(t).map_or(1.0, |&z| 1.0 / (1.0 + (-z).exp()));
                        for (a, b) in x[t * d..(t + 1) * d]
                            .iter_mut()
                            .zip(&ys[t * d..(t + 1) * d])
                        {
                            *a += w * b;
                        }
                    }
                }
                let mut logits = Vec::new();
                let mut fresh = false;
                project(
                    router,
                    &s.xn,
                    n,
                    &mut s.qa,
                    &mut fresh,
                    &mut logits,
                    &mut s.mm,
                );
                let e_n = c.n_experts;
                // Per expert, the tokens routed to it and their weights.
                let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_n];
                for (t, lg) in logits.chunks_exact(e_n).enumerate() {
                    for (e, w) in route(lg, c.n_experts_used, c.router_norm) {
                        routed[e].push((t, w));
                        self.expert_hits[l][e] += 1;
                    }
                }
                let mut xe = Vec::new();
                let mut ye = Vec::new();
                for (e, toks) in routed.iter().enumerate() {
                    if toks.is_empty() {
                        continue;
                    }
                    xe.clear();
                    for &(t, _) in toks {
                        xe.extend_from_slice(&s.xn[t * d..(t + 1) * d]);
                    }
                    ye.clear();
                    ye.resize(toks.len() * d, 0.0);
                    let ex = match experts.get(e) {
                        Some(ex) => ex.clone(),
                        None => fetch_expert(m, self.experts.as_ref(), l, e)?,
                    };
                    swiglu(
                        &ex.gate,
                        &ex.up,
                        &ex.down,
                        &xe,
                        toks.len(),
                        ffn_scratch!(s),
                        &mut ye,
                    );
                    for (k, &(t, w)) in toks.iter().enumerate() {
                        for (a, b) in x[t * d..(t + 1) * d]
                            .iter_mut()
                            .zip(&ye[k * d..(k + 1) * d])
                        {
                            *a += w * b;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Expert `e` of layer `l` from the model's expert cache, fetched from its
/// shard (and kept if the cache has room) when the cache does not hold it.
fn fetch_expert(
    m: &Model,
    reader: Option<&ExpertReader>,
    l: usize,
    e: usize,
) -> std::result::Result<Arc<Expert>, String> {
    let (Weights::Streamed(st), Some(reader)) = (&m.weights, reader) else {
        return Err(format!(
            "layer {l}: expert {e} is neither resident nor in a shard"
        ));
    };
    let shards = st.shards.as_ref().expect("a reader means shards");
    lock(&st.cache).get_or_fetch(&(l, e), || {
        let before = shards.bytes_read();
        // At base fidelity, the base blocks themselves (as the loader
        // delivers the layers').
        let tensors = match st.fidelity {
            Fidelity::Base => reader.fetch_base_blocks(l as u32, e as u32),
            Fidelity::Exact => reader.fetch(l as u32, e as u32, st.fidelity),
        }
        .map_err(|err| err.to_string())?;
        lock(&st.stats).expert_bytes += shards.bytes_read() - before;
        let ex = expert_from_tensors(&m.config, l, e, tensors)?;
        let bytes = expert_bytes(&ex) as u64;
        Ok((Arc::new(ex), bytes))
    })
}

/// `x += down(silu(gate(xn)) · up(xn))`.
fn swiglu(
    gate: &Matrix,
    up: &Matrix,
    down: &Matrix,
    xn: &[f32],
    n: usize,
    s: FfnScratch,
    x: &mut [f32],
) {
    project_many(&[gate, up], xn, n, s.qa, &mut [s.g, s.u], s.mm);
    for (g, u) in s.g.iter_mut().zip(s.u.iter()) {
        *g = silu(*g) * u;
    }
    let mut fresh = false;
    project(down, s.g, n, s.qa2, &mut fresh, s.o, s.mm);
    for (a, b) in x.iter_mut().zip(s.o.iter()) {
        *a += b;
    }
}

/// The experts a token goes to, with their weights.
pub fn route(logits: &[f32], k: usize, norm: RouterNorm) -> Vec<(usize, f32)> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let p: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = p.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // Highest first; ties to the lower index, as a stable sort does.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(k);
    let chosen: f32 = idx.iter().map(|&e| p[e]).sum();
    idx.into_iter()
        .map(|e| {
            let w = match norm {
                RouterNorm::TopKSoftmax => p[e] / chosen,
                RouterNorm::Softmax => p[e] / total,
            };
            (e, w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_both_schemes_map_to_roles() {
        assert_eq!(
            role("blk.3.attn_q.weight"),
            Some(Role::Layer(3, "wq", None))
        );
        assert_eq!(
            role("model.layers.3.self_attn.q_proj.bias"),
            Some(Role::Layer(3, "bq", None))
        );
        assert_eq!(
            role("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
            Some(Role::Layer(1, "exp_up", Some(2)))
        );
        assert_eq!(
            role("blk.0.ffn_down_exps.weight"),
            Some(Role::Layer(0, "exps_down", None))
        );
        assert_eq!(role("model.embed_tokens.weight"), Some(Role::Embed));
        assert_eq!(
            role("model.layers.0.mlp.shared_expert.up_proj.weight"),
            Some(Role::Layer(0, "sh_up", None))
        );
        assert_eq!(role("model.layers.0.mlp.shared_expert.bogus.weight"), None);
        assert_eq!(role("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn routing_picks_top_k_and_normalizes() {
        let r = route(&[0.0, 2.0, 1.0, 2.0], 2, RouterNorm::TopKSoftmax);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((r[0].1 - 0.5).abs() < 1e-6 && (r[1].1 - 0.5).abs() < 1e-6);
        let r = route(&[0.0, 0.0], 1, RouterNorm::Softmax);
        assert_eq!(r, vec![(0, 0.5)]);
    }

    #[test]
    fn rope_styles_rotate_their_pairs() {
        let mut c = Config::from_hf_json(
            br#"{"model_type":"llama","hidden_size":8,"intermediate_size":8,
            "num_attention_heads":2,"num_hidden_layers":1,"vocab_size":4}"#,
        )
        .unwrap();
        let inv = vec![1.0, 0.0];
        let mut v = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut v, 1, &c, &inv);
        // Halves: dimension 0 pairs with 2.
        assert!((v[0] - 1f32.cos()).abs() < 1e-6 && (v[2] - 1f32.sin()).abs() < 1e-6);
        c.rope_style = RopeStyle::Interleaved;
        let mut v = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut v, 1, &c, &inv);
        assert!((v[1] - 1f32.sin()).abs() < 1e-6 && v[2] == 0.0);
    }
}
