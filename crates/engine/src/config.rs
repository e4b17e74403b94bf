//! Hyper-parameters of a Llama-family or Mixtral-style model, from GGUF
//! metadata or a Hugging Face `config.json`.

use serde_json::Value as Json;
use tpde_ingest::gguf::{Header, Value};

/// How rotary embedding pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF llama-family files, whose converters
    /// permute the query and key rows to this layout.
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints.
    Halves,
}

/// How router weights are formed from the router's logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterNorm {
    /// Softmax over all experts, keep the top k, renormalize (Mixtral).
    TopKSoftmax,
    /// Softmax over all experts, keep the top k as they are (Qwen-MoE
    /// without `norm_topk_prob`).
    Softmax,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `llama`, `mistral`, `qwen2`, `mixtral`, … as the source names it.
    pub arch: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab: usize,
    pub ctx_len: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Dimensions of a head that are rotated (the first `rope_dim`).
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    /// Per rotated pair, a divisor of its frequency (Llama-3 scaling);
    /// empty: none.
    pub rope_freq_factors: Vec<f32>,
    /// Experts per MoE layer (0: dense) and experts used per token.
    pub n_experts: usize,
    pub n_experts_used: usize,
    pub router_norm: RouterNorm,
}

fn gguf_u(h: &Header, key: &str) -> Result<usize, String> {
    h.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("GGUF metadata {key:?} is missing or not an unsigned integer"))
}

fn gguf_f(h: &Header, key: &str) -> Option<f32> {
    match h.get(key)? {
        Value::F32(v) => Some(*v),
        Value::F64(v) => Some(*v as f32),
        _ => None,
    }
}

/// Architectures whose blocks are Llama's (RMSNorm, RoPE, GQA, SwiGLU).
const LLAMA_LIKE: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "mixtral"];

impl Config {
    pub fn from_gguf(h: &Header) -> Result<Config, String> {
        let arch = h
            .architecture()
            .ok_or("GGUF metadata has no general.architecture")?
            .to_string();
        if !LLAMA_LIKE.contains(&arch.as_str()) {
            return Err(format!(
                "architecture {arch:?} is not supported by the engine (supported: {})",
                LLAMA_LIKE.join(", ")
            ));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let d_model = gguf_u(h, &k("embedding_length"))?;
        let n_heads = gguf_u(h, &k("attention.head_count"))?;
        let n_kv_heads = gguf_u(h, &k("attention.head_count_kv")).unwrap_or(n_heads);
        let head_dim = gguf_u(h, &k("attention.key_length"))
            .unwrap_or_else(|_| d_model.checked_div(n_heads).unwrap_or(0));
        let vocab = match h.get(&k("vocab_size")).and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => match h.get("tokenizer.ggml.tokens") {
                Some(Value::Array(_, t)) => t.len(),
                _ => 0,
            },
        };
        let n_experts = gguf_u(h, &k("expert_count")).unwrap_or(0);
        let c = Config {
            n_layers: gguf_u(h, &k("block_count"))?,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff: gguf_u(h, &k("feed_forward_length"))?,
            vocab,
            ctx_len: gguf_u(h, &k("context_length")).unwrap_or(4096),
            rms_eps: gguf_f(h, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_base: gguf_f(h, &k("rope.freq_base")).unwrap_or(10_000.0),
            rope_dim: gguf_u(h, &k("rope.dimension_count")).unwrap_or(head_dim),
            rope_style: if arch.starts_with("qwen") {
                RopeStyle::Halves
            } else {
                RopeStyle::Interleaved
            },
            rope_freq_factors: Vec::new(),
            n_experts,
            n_experts_used: if n_experts > 0 {
                gguf_u(h, &k("expert_used_count"))?
            } else {
                0
            },
            router_norm: RouterNorm::TopKSoftmax,
            arch,
        };
        c.check()
    }

    pub fn from_hf_json(bytes: &[u8]) -> Result<Config, String> {
        let j: Json =
            serde_json::from_slice(bytes).map_err(|e| format!("config.json is not JSON: {e}"))?;
        let arch = j["model_type"]
            .as_str()
            .ok_or("config.json has no model_type")?
            .to_string();
        let supported = [
            "llama",
            "mistral",
            "qwen2",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
        ];
        if !supported.contains(&arch.as_str()) {
            return Err(format!(
                "model_type {arch:?} is not supported by the engine (supported: {})",
                supported.join(", ")
            ));
        }
        let u = |key: &str| -> Result<usize, String> {
            j[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| format!("config.json {key:?} is missing or not an unsigned integer"))
        };
        let f = |key: &str| j[key].as_f64().map(|v| v as f32);
        let d_model = u("hidden_size")?;
        let n_heads = u("num_attention_heads")?;
        let head_dim = u("head_dim").unwrap_or(d_model.checked_div(n_heads).unwrap_or(0));
        let n_experts = u("num_local_experts")
            .or_else(|_| u("num_experts"))
            .unwrap_or(0);
        let is_qwen_moe = arch.starts_with("qwen") && n_experts > 0;
        let d_ff = if is_qwen_moe {
            u("moe_intermediate_size").or_else(|_| u("intermediate_size"))?
        } else {
            u("intermediate_size")?
        };
        let mut c = Config {
            n_layers: u("num_hidden_layers")?,
            d_model,
            n_heads,
            n_kv_heads: u("num_key_value_heads").unwrap_or(n_heads),
            head_dim,
            d_ff,
            vocab: u("vocab_size")?,
            ctx_len: u("max_position_embeddings").unwrap_or(4096),
            rms_eps: f("rms_norm_eps").unwrap_or(1e-6),
            rope_base: f("rope_theta").unwrap_or(10_000.0),
            rope_dim: head_dim,
            rope_style: RopeStyle::Halves,
            rope_freq_factors: Vec::new(),
            n_experts,
            n_experts_used: if n_experts > 0 {
                u("num_experts_per_tok")?
            } else {
                0
            },
            router_norm: if is_qwen_moe && !j["norm_topk_prob"].as_bool().unwrap_or(false) {
                RouterNorm::Softmax
            } else {
                RouterNorm::TopKSoftmax
            },
            arch,
        };
        if let Some(s) = j.get("rope_scaling").filter(|s| !s.is_null()) {
            let kind = s["rope_type"].as_str().or(s["type"].as_str()).unwrap_or("");
            if kind != "llama3" {
                return Err(format!("rope_scaling type {kind:?} is not supported"));
            }
            let g = |key: &str| {
                s[key]
                    .as_f64()
                    .ok_or_else(|| format!("config.json rope_scaling.{key} is missing"))
            };
            c.rope_freq_factors = llama3_freq_factors(
                c.rope_base,
                c.rope_dim,
                g("factor")?,
                g("low_freq_factor")?,
                g("high_freq_factor")?,
                g("original_max_position_embeddings")?,
            );
        }
        c.check()
    }

    fn check(self) -> Result<Config, String> {
        let bad = |what: &str| Err(format!("model hyper-parameters: {what}"));
        if self.n_layers == 0 || self.d_model == 0 || self.n_heads == 0 || self.vocab == 0 {
            return bad("a layer count, width, head count or vocabulary of 0");
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("the head count is not a multiple of the key/value head count");
        }
        if self.head_dim == 0 || self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return bad("head or rotary dimension is 0, odd, or inconsistent");
        }
        if self.n_experts > 0 && (self.n_experts_used == 0 || self.n_experts_used > self.n_experts)
        {
            return bad("experts used per token must be between 1 and the expert count");
        }
        if self.d_ff == 0 {
            return bad("a feed-forward width of 0");
        }
        if self.n_layers > 4096
            || self.d_model > 1 << 16
            || self.vocab > 1 << 24
            || self.d_ff > 1 << 20
            || self.head_dim > 1 << 12
            || self.n_experts > 1 << 12
        {
            return bad("sizes beyond any supported model");
        }
        Ok(self)
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The rotary embedding's inverse frequency for each pair of
    /// dimensions: `base^(−2i/rope_dim)`, divided by the pair's factor
    /// (Llama-3 scaling, or a GGUF's `rope_freqs`).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        (0..self.rope_dim / 2)
            .map(|i| {
                let f = self.rope_base.powf(-2.0 * i as f32 / self.rope_dim as f32);
                f / self.rope_freq_factors.get(i).copied().unwrap_or(1.0)
            })
            .collect()
    }

    /// Width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Llama-3's frequency scaling as per-pair divisors of the frequency:
/// long wavelengths slowed by `factor`, short ones kept, a smooth blend in
/// between.
pub fn llama3_freq_factors(
    base: f32,
    rope_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original_ctx: f64,
) -> Vec<f32> {
    let low_wavelen = original_ctx / low;
    let high_wavelen = original_ctx / high;
    (0..rope_dim / 2)
        .map(|i| {
            let inv = 1.0 / f64::from(base).powf(2.0 * i as f64 / rope_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            let scaled = if wavelen < high_wavelen {
                inv
            } else if wavelen > low_wavelen {
                inv / factor
            } else {
                let smooth = (original_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * inv / factor + smooth * inv
            };
            (inv / scaled) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_of_a_mixtral() {
        let c = Config::from_hf_json(
            br#"{"model_type":"mixtral","hidden_size":64,"intermediate_size":128,
            "num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,
            "vocab_size":256,"rms_norm_eps":1e-5,"rope_theta":1e6,
            "num_local_experts":4,"num_experts_per_tok":2}"#,
        )
        .unwrap();
        assert_eq!((c.head_dim, c.kv_dim(), c.n_experts_used), (16, 32, 2));
        assert_eq!(c.rope_style, RopeStyle::Halves);
        assert_eq!(c.router_norm, RouterNorm::TopKSoftmax);
    }

    #[test]
    fn bad_configs_are_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"model_type":"bert"}"#,
            br#"{"model_type":"llama","hidden_size":64}"#,
            br#"{"model_type":"llama","hidden_size":64,"intermediate_size":8,"num_attention_heads":3,
               "num_key_value_heads":2,"num_hidden_layers":1,"vocab_size":9}"#,
            br#"{"model_type":"llama","hidden_size":64,"intermediate_size":8,"num_attention_heads":4,
               "num_hidden_layers":1,"vocab_size":9,"rope_scaling":{"type":"yarn"}}"#,
        ] {
            assert!(Config::from_hf_json(bad).is_err());
        }
    }

    #[test]
    fn llama3_factors_keep_short_and_slow_long_wavelengths() {
        let f = llama3_freq_factors(500_000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(f.len(), 64);
        assert!((f[0] - 1.0).abs() < 1e-6);
        assert!((f[63] - 8.0).abs() < 1e-4);
        assert!(f.windows(2).all(|w| w[0] <= w[1] + 1e-6));
    }
}
