//! Recognises the routed experts of a mixture-of-experts model from its
//! tensor names (and, for stacked tensors, their shapes), so that the packer
//! can lay out one contiguous shard per (layer, expert).
//!
//! ```
//! use tpde_ingest::moe::{classify, plan, MoeRole};
//!
//! let role = classify("model.layers.3.block_sparse_moe.experts.5.w1.weight", &[14336, 4096]);
//! assert_eq!(role, MoeRole::Expert { layer: 3, expert: 5, part: "w1".into() });
//! assert_eq!(classify("blk.0.ffn_up_exps.weight", &[8, 14336, 4096]),
//!            MoeRole::Stacked { layer: 0, count: 8, part: "ffn_up_exps".into() });
//!
//! let plan = plan(&[
//!     ("model.layers.0.mlp.gate.weight", &[2, 64][..]),
//!     ("model.layers.0.mlp.experts.0.down_proj.weight", &[64, 32][..]),
//!     ("model.layers.0.mlp.experts.1.down_proj.weight", &[64, 32][..]),
//! ]).unwrap();
//! assert!(plan.is_moe());
//! assert_eq!(plan.layers[0].experts, 2);
//! ```
//!
//! # Names recognised
//!
//! Checked against Hugging Face transformers (`modeling_mixtral.py`,
//! `modeling_qwen2_moe.py`, `modeling_qwen3_moe.py`, `modeling_deepseek_v3.py`,
//! `modeling_gpt_oss.py`) and llama.cpp (`gguf-py/gguf/constants.py`,
//! `gguf-py/gguf/tensor_mapping.py`):
//!
//! - one tensor per expert, `….{layer}.….experts.{expert}.{part}[.{suffix}]`:
//!   Mixtral and Phi-MoE (`model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight`),
//!   Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, Jamba
//!   (`….mlp.experts.{e}.gate_proj.weight`), Mistral's consolidated files
//!   (`layers.{l}.feed_forward.experts.{e}.w1.weight`). The layer is the
//!   nearest numeric component before `experts`. The part is the component
//!   after the expert index; a suffix other than `weight` (a quantized
//!   checkpoint's `weight_scale`, `weight_scale_inv`, `bias`, `qweight`, …)
//!   is kept in the part (`down_proj.weight_scale_inv`), so companions stay
//!   with their expert;
//! - all experts of a layer stacked in one tensor along dimension 0 (the
//!   slowest, row-major): gpt-oss and transformers' fused layout
//!   (`….experts.gate_up_proj`, `….experts.down_proj`, with the `_bias`,
//!   `_blocks` and `_scales` variants), and GGUF
//!   (`blk.{l}.ffn_{gate,up,down,gate_up}_exps.{weight,bias}`, whose GGUF
//!   `ne[2] = n_expert` becomes dimension 0 once reversed to row-major);
//! - early GGUF Mixtral files with one tensor per expert,
//!   `blk.{l}.ffn_{gate,up,down}.{e}.weight`.
//!
//! Routers (`….gate.weight`, `….router.*`, `ffn_gate_inp`), DeepSeek's
//! `e_score_correction_bias` / GGUF `exp_probs_b`, and shared experts
//! (`shared_expert`, `shared_experts`, `shared_expert_gate`, GGUF `*_shexp`)
//! run for every token, so they are [`MoeRole::Dense`] and stay with their
//! layer's dense part. So is everything unrecognised: a name that looks like
//! an expert but has a non-numeric (or non-canonical, like `01`) index, or a
//! stacked tensor with fewer than 2 dimensions. Classification never panics.

use std::collections::{BTreeMap, HashSet};

use thiserror::Error;

/// What a tensor is in a mixture-of-experts model, judged from its name (and shape for stacked tensors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoeRole {
    /// Not part of any expert: attention, norms, embeddings, routers, shared
    /// experts (they run for every token and stay with their layer's dense part).
    Dense,
    /// One expert's own tensor: `layer`, `expert`, and `part` (e.g. "w1",
    /// "gate_proj", "down_proj" — the name's last meaningful component).
    Expert {
        /// Layer (block) index.
        layer: u32,
        /// Expert index within the layer.
        expert: u32,
        /// Which tensor of the expert, with any non-`weight` suffix kept
        /// (`"w1"`, `"down_proj.weight_scale_inv"`).
        part: String,
    },
    /// One tensor holding every expert of a layer, stacked along the slowest
    /// dimension (row-major dim 0): expert e is the e-th of `count` equal
    /// contiguous slices.
    Stacked {
        /// Layer (block) index.
        layer: u32,
        /// Number of experts, the tensor's dimension 0.
        count: u64,
        /// Which tensor of the experts (`"gate_up_proj_blocks"`, `"ffn_down_exps"`,
        /// `"ffn_gate_exps.bias"`).
        part: String,
    },
}

/// Fused-expert tensor names that transformers and gpt-oss put directly
/// under `experts` (before the `_bias`, `_blocks`, `_scales` variants).
const STACKED_PARTS: [&str; 4] = ["gate_up_proj", "down_proj", "gate_proj", "up_proj"];
/// Suffixes of the gpt-oss stacked tensors (bias, MXFP4 blocks and scales).
const STACKED_SUFFIXES: [&str; 3] = ["_bias", "_blocks", "_scales"];
/// GGUF stacked-expert tensors (`MODEL_TENSOR.FFN_*_EXP` in llama.cpp).
const GGUF_STACKED: [&str; 4] = [
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
    "ffn_gate_up_exps",
];
/// GGUF feed-forward tensors that early Mixtral files split per expert
/// (`blk.{l}.ffn_gate.{e}.weight`).
const GGUF_PER_EXPERT: [&str; 3] = ["ffn_gate", "ffn_up", "ffn_down"];

/// A canonical decimal `u32`: ASCII digits only, no sign, no leading zero
/// (so that each index has exactly one spelling).
fn index(component: &str) -> Option<u32> {
    let bytes = component.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return None;
    }
    component.parse().ok()
}

/// The part named by `rest` (the components after the expert index, or after
/// the stacked tensor's own name): a trailing lone `weight` is dropped, any
/// other suffix kept; an empty component makes it no part at all.
fn part_name(rest: &[&str]) -> Option<String> {
    if rest.iter().any(|component| component.is_empty()) {
        return None;
    }
    match rest {
        [] => None,
        [part, "weight"] => Some((*part).to_owned()),
        _ => Some(rest.join(".")),
    }
}

/// Dimension 0 of a stacked tensor, or `None` when it has fewer than 2 dimensions.
fn stacked_count(shape: &[u64]) -> Option<u64> {
    match shape {
        [count, _, ..] => Some(*count),
        _ => None,
    }
}

/// Classifies one tensor by its `name` and row-major `shape` (slowest
/// dimension first); see the [module documentation](self) for the names
/// recognised.
pub fn classify(name: &str, shape: &[u64]) -> MoeRole {
    let components: Vec<&str> = name.split('.').collect();
    classify_gguf(&components, shape)
        .or_else(|| classify_experts(&components, shape))
        .unwrap_or(MoeRole::Dense)
}

/// `blk.{l}.ffn_*_exps.*` (stacked) or `blk.{l}.ffn_*.{e}.*` (per expert).
fn classify_gguf(components: &[&str], shape: &[u64]) -> Option<MoeRole> {
    let ["blk", layer, tensor, rest @ ..] = components else {
        return None;
    };
    let layer = index(layer)?;
    if GGUF_STACKED.contains(tensor) {
        let mut full = vec![*tensor];
        full.extend_from_slice(rest);
        return Some(MoeRole::Stacked {
            layer,
            count: stacked_count(shape)?,
            part: part_name(&full)?,
        });
    }
    if GGUF_PER_EXPERT.contains(tensor) {
        let [expert, suffix @ ..] = rest else {
            return None;
        };
        let expert = index(expert)?;
        let mut full = vec![*tensor];
        full.extend_from_slice(suffix);
        return Some(MoeRole::Expert {
            layer,
            expert,
            part: part_name(&full)?,
        });
    }
    None
}

/// `….{l}.….experts.{e}.{part}…` (per expert) or `….{l}.….experts.{fused}` (stacked).
fn classify_experts(components: &[&str], shape: &[u64]) -> Option<MoeRole> {
    let at = components.iter().position(|c| *c == "experts")?;
    let layer = components[..at].iter().rev().find_map(|c| index(c))?;
    let after = &components[at + 1..];
    let (first, rest) = after.split_first()?;
    if let Some(expert) = index(first) {
        return Some(MoeRole::Expert {
            layer,
            expert,
            part: part_name(rest)?,
        });
    }
    // Fused: exactly one known component after `experts`, as gpt-oss and
    // transformers write them; anything else (DBRX's `experts.mlp.w1`, whose
    // dim 0 is n_experts × ffn) is not a clean stack.
    if !rest.is_empty() {
        return None;
    }
    let base = STACKED_SUFFIXES
        .iter()
        .find_map(|suffix| first.strip_suffix(suffix))
        .unwrap_or(first);
    if !STACKED_PARTS.contains(&base) {
        return None;
    }
    Some(MoeRole::Stacked {
        layer,
        count: stacked_count(shape)?,
        part: (*first).to_owned(),
    })
}

/// The experts of a whole model, layer by layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MoePlan {
    /// The layers that hold experts, sorted by layer index (empty for a dense model).
    pub layers: Vec<MoeLayer>,
}

impl MoePlan {
    /// Whether any layer holds experts.
    pub fn is_moe(&self) -> bool {
        !self.layers.is_empty()
    }
}

/// The experts of one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeLayer {
    /// Layer (block) index.
    pub layer: u32,
    /// Number of experts; the indices are `0..experts`.
    pub experts: u32,
    /// The layer's expert tensors: stacked ones first, then by expert, each
    /// group sorted by name.
    pub tensors: Vec<ExpertTensor>,
}

/// One expert tensor of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertTensor {
    /// The tensor's full name.
    pub name: String,
    /// The expert it belongs to, or `None` for a stacked tensor holding all of them.
    pub expert: Option<u32>,
    /// Which tensor of the expert (see [`MoeRole`]).
    pub part: String,
}

/// Why a model's expert tensors do not form a consistent plan.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MoeError {
    /// The same tensor name is listed twice.
    #[error("tensor {name:?} is listed twice")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
    },
    /// Two tensors claim the same part of the same expert.
    #[error("layer {layer} expert {expert} has two {part:?} tensors: {first:?} and {second:?}")]
    DuplicateExpertPart {
        /// Layer index.
        layer: u32,
        /// Expert index.
        expert: u32,
        /// The part both claim.
        part: String,
        /// The first tensor seen.
        first: String,
        /// The second tensor seen.
        second: String,
    },
    /// Two stacked tensors of one layer claim the same part.
    #[error("layer {layer} has two stacked {part:?} tensors: {first:?} and {second:?}")]
    DuplicateStackedPart {
        /// Layer index.
        layer: u32,
        /// The part both claim.
        part: String,
        /// The first tensor seen.
        first: String,
        /// The second tensor seen.
        second: String,
    },
    /// Expert indices of a layer have a gap (or do not start at 0).
    #[error("layer {layer} has tensors for expert {last} but none for expert {missing}")]
    MissingExpert {
        /// Layer index.
        layer: u32,
        /// The first absent index.
        missing: u32,
        /// The largest index present.
        last: u32,
    },
    /// An expert lacks a part that a sibling in its layer has.
    #[error("layer {layer} expert {expert} has no {part:?} tensor, but expert {sibling} has {example:?}")]
    MissingPart {
        /// Layer index.
        layer: u32,
        /// The expert that lacks the part.
        expert: u32,
        /// The missing part.
        part: String,
        /// An expert that has it.
        sibling: u32,
        /// The sibling's tensor for that part.
        example: String,
    },
    /// A stacked tensor's dimension 0 disagrees with another expert count of its layer.
    #[error(
        "layer {layer} tensor {tensor:?} holds {got} experts, but {reference:?} says {expected}"
    )]
    CountMismatch {
        /// Layer index.
        layer: u32,
        /// The disagreeing stacked tensor.
        tensor: String,
        /// Its dimension 0.
        got: u64,
        /// The count established first.
        expected: u64,
        /// Where that count comes from: the first stacked tensor, or the
        /// highest-indexed per-expert tensor.
        reference: String,
    },
    /// A stacked tensor's dimension 0 is 0.
    #[error("layer {layer} stacked tensor {tensor:?} holds no experts (dimension 0 is 0)")]
    EmptyStack {
        /// Layer index.
        layer: u32,
        /// The tensor.
        tensor: String,
    },
    /// A stacked tensor holds more experts than a `u32` can index.
    #[error("layer {layer} stacked tensor {tensor:?} holds {count} experts, more than {max}")]
    TooManyExperts {
        /// Layer index.
        layer: u32,
        /// The tensor.
        tensor: String,
        /// Its dimension 0.
        count: u64,
        /// The limit, `u32::MAX`.
        max: u64,
    },
}

/// The expert tensors of one layer while [`plan`] collects them.
#[derive(Default)]
struct LayerTensors<'a> {
    /// Per-expert tensors: expert → part → name.
    experts: BTreeMap<u32, BTreeMap<String, &'a str>>,
    /// Stacked tensors: part → (name, count), and the first one seen.
    stacked: BTreeMap<String, (&'a str, u64)>,
    first_stacked: Option<(&'a str, u64)>,
}

/// Groups a whole model's tensors (name, row-major shape) into layers of
/// experts, checking that every layer is consistent: expert indices `0..n`
/// without gaps, every expert with the same parts, every stacked tensor of a
/// layer with the same dimension 0 (and the same as the per-expert count, if
/// a layer has both), no duplicate names or parts.
pub fn plan(tensors: &[(&str, &[u64])]) -> Result<MoePlan, MoeError> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut layers: BTreeMap<u32, LayerTensors<'_>> = BTreeMap::new();
    for &(name, shape) in tensors {
        if !seen.insert(name) {
            return Err(MoeError::DuplicateTensor { name: name.into() });
        }
        match classify(name, shape) {
            MoeRole::Dense => {}
            MoeRole::Expert {
                layer,
                expert,
                part,
            } => {
                let parts = layers
                    .entry(layer)
                    .or_default()
                    .experts
                    .entry(expert)
                    .or_default();
                if let Some(first) = parts.get(&part) {
                    return Err(MoeError::DuplicateExpertPart {
                        layer,
                        expert,
                        part,
                        first: (*first).into(),
                        second: name.into(),
                    });
                }
                parts.insert(part, name);
            }
            MoeRole::Stacked { layer, count, part } => {
                if count == 0 {
                    return Err(MoeError::EmptyStack {
                        layer,
                        tensor: name.into(),
                    });
                }
                if count > u64::from(u32::MAX) {
                    return Err(MoeError::TooManyExperts {
                        layer,
                        tensor: name.into(),
                        count,
                        max: u64::from(u32::MAX),
                    });
                }
                let entry = layers.entry(layer).or_default();
                let &mut (reference, expected) = entry.first_stacked.get_or_insert((name, count));
                if count != expected {
                    return Err(MoeError::CountMismatch {
                        layer,
                        tensor: name.into(),
                        got: count,
                        expected,
                        reference: reference.into(),
                    });
                }
                if let Some((first, _)) = entry.stacked.get(&part) {
                    return Err(MoeError::DuplicateStackedPart {
                        layer,
                        part,
                        first: (*first).into(),
                        second: name.into(),
                    });
                }
                entry.stacked.insert(part, (name, count));
            }
        }
    }
    let layers = layers
        .into_iter()
        .map(|(layer, collected)| check_layer(layer, collected))
        .collect::<Result<_, _>>()?;
    Ok(MoePlan { layers })
}

/// Checks one layer's collected tensors and turns them into a [`MoeLayer`].
fn check_layer(layer: u32, collected: LayerTensors<'_>) -> Result<MoeLayer, MoeError> {
    // Indices 0..n without gaps: the k-th smallest index must be k.
    let last = collected.experts.keys().next_back().copied();
    for (position, &expert) in collected.experts.keys().enumerate() {
        if u64::try_from(position).ok() != Some(u64::from(expert)) {
            return Err(MoeError::MissingExpert {
                layer,
                missing: u32::try_from(position).unwrap_or(u32::MAX),
                last: last.unwrap_or(expert),
            });
        }
    }
    // Every expert has every part that any sibling has.
    let mut owner: BTreeMap<&str, (u32, &str)> = BTreeMap::new();
    for (&expert, parts) in &collected.experts {
        for (part, name) in parts {
            owner.entry(part.as_str()).or_insert((expert, name));
        }
    }
    for (&expert, parts) in &collected.experts {
        if let Some((part, &(sibling, example))) =
            owner.iter().find(|(part, _)| !parts.contains_key(**part))
        {
            return Err(MoeError::MissingPart {
                layer,
                expert,
                part: (*part).into(),
                sibling,
                example: example.into(),
            });
        }
    }
    let per_expert = last.map(|last| u64::from(last) + 1);
    let experts = match (per_expert, collected.first_stacked) {
        (Some(n), Some((tensor, count))) if n != count => {
            let reference = collected
                .experts
                .values()
                .next_back()
                .and_then(|parts| parts.values().next())
                .copied()
                .unwrap_or_default();
            return Err(MoeError::CountMismatch {
                layer,
                tensor: tensor.into(),
                got: count,
                expected: n,
                reference: reference.into(),
            });
        }
        (Some(n), _) | (None, Some((_, n))) => n,
        (None, None) => 0,
    };
    let mut tensors: Vec<ExpertTensor> = collected
        .stacked
        .into_iter()
        .map(|(part, (name, _))| ExpertTensor {
            name: name.into(),
            expert: None,
            part,
        })
        .chain(collected.experts.into_iter().flat_map(|(expert, parts)| {
            parts.into_iter().map(move |(part, name)| ExpertTensor {
                name: name.into(),
                expert: Some(expert),
                part,
            })
        }))
        .collect();
    tensors.sort_by(|a, b| (a.expert, &a.name).cmp(&(b.expert, &b.name)));
    Ok(MoeLayer {
        layer,
        // Both sources are at most u32::MAX + 1 only in theory; counts over
        // u32::MAX are rejected above, and 2^32 experts cannot fit in memory.
        experts: u32::try_from(experts).unwrap_or(u32::MAX),
        tensors,
    })
}

#[cfg(test)]
mod tests {
    //! Real name lists of small two-layer models of each family, every
    //! consistency error, and never-panic properties over garbage names.

    use super::*;
    use proptest::prelude::*;

    /// An owned (name, shape) list, so tests can build names with `format!`.
    type Model = Vec<(String, Vec<u64>)>;

    fn add(model: &mut Model, name: impl Into<String>, shape: &[u64]) {
        model.push((name.into(), shape.to_vec()));
    }

    fn plan_of(model: &Model) -> Result<MoePlan, MoeError> {
        let borrowed: Vec<(&str, &[u64])> = model
            .iter()
            .map(|(name, shape)| (name.as_str(), shape.as_slice()))
            .collect();
        plan(&borrowed)
    }

    /// Plans `model`, which must be rejected; checks the message style.
    fn reject(model: &Model) -> MoeError {
        match plan_of(model) {
            Ok(plan) => panic!("accepted an inconsistent model: {plan:?}"),
            Err(e) => {
                let message = e.to_string();
                assert!(!message.contains('\n'), "{message:?}");
                assert!(!message.ends_with('.'), "{message:?}");
                assert!(
                    message.starts_with(|c: char| c.is_lowercase()),
                    "{message:?}"
                );
                e
            }
        }
    }

    fn expert(layer: u32, expert: u32, part: &str) -> MoeRole {
        MoeRole::Expert {
            layer,
            expert,
            part: part.into(),
        }
    }

    fn stacked(layer: u32, count: u64, part: &str) -> MoeRole {
        MoeRole::Stacked {
            layer,
            count,
            part: part.into(),
        }
    }

    /// The expected layer for per-expert tensors named `{prefix}.{e}.{part}{suffix}`,
    /// each in `parts` as (part as named, part as classified).
    fn per_expert_layer(
        layer: u32,
        experts: u32,
        prefix: &str,
        parts: &[(&str, &str)],
    ) -> MoeLayer {
        let mut tensors = Vec::new();
        for e in 0..experts {
            let mut group: Vec<ExpertTensor> = parts
                .iter()
                .map(|(named, part)| ExpertTensor {
                    name: format!("{prefix}.{e}.{named}"),
                    expert: Some(e),
                    part: (*part).into(),
                })
                .collect();
            group.sort_by(|a, b| a.name.cmp(&b.name));
            tensors.extend(group);
        }
        MoeLayer {
            layer,
            experts,
            tensors,
        }
    }

    /// Llama-style attention and norms of one HF layer.
    fn hf_attention(model: &mut Model, l: u32, hidden: u64) {
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            add(
                model,
                format!("model.layers.{l}.self_attn.{proj}.weight"),
                &[hidden, hidden],
            );
        }
        add(
            model,
            format!("model.layers.{l}.input_layernorm.weight"),
            &[hidden],
        );
        add(
            model,
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &[hidden],
        );
    }

    fn hf_ends(model: &mut Model, hidden: u64) {
        add(model, "model.embed_tokens.weight", &[1000, hidden]);
        add(model, "model.norm.weight", &[hidden]);
        add(model, "lm_head.weight", &[1000, hidden]);
    }

    // --- families -----------------------------------------------------------

    /// Mixtral (modeling_mixtral.py): `block_sparse_moe.gate` router and
    /// `block_sparse_moe.experts.{e}.w1|w2|w3`.
    #[test]
    fn mixtral() {
        let mut model = Model::new();
        hf_ends(&mut model, 64);
        for l in 0..2 {
            hf_attention(&mut model, l, 64);
            add(
                &mut model,
                format!("model.layers.{l}.block_sparse_moe.gate.weight"),
                &[4, 64],
            );
            for e in 0..4 {
                for (w, shape) in [("w1", [112, 64]), ("w2", [64, 112]), ("w3", [112, 64])] {
                    let name = format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight");
                    add(&mut model, name, &shape);
                }
            }
        }
        let plan = plan_of(&model).unwrap();
        let parts = [
            ("w1.weight", "w1"),
            ("w2.weight", "w2"),
            ("w3.weight", "w3"),
        ];
        let expected: Vec<MoeLayer> = (0..2)
            .map(|l| {
                let prefix = format!("model.layers.{l}.block_sparse_moe.experts");
                per_expert_layer(l, 4, &prefix, &parts)
            })
            .collect();
        assert!(plan.is_moe());
        assert_eq!(plan.layers, expected);
        assert_eq!(
            classify("model.layers.1.block_sparse_moe.gate.weight", &[4, 64]),
            MoeRole::Dense
        );
        assert_eq!(
            classify(
                "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                &[64, 112]
            ),
            expert(1, 3, "w2")
        );
    }

    /// Mistral's consolidated files (`layers.{l}.feed_forward.experts.{e}.w1`).
    #[test]
    fn mistral_consolidated() {
        assert_eq!(
            classify("layers.7.feed_forward.experts.2.w3.weight", &[14336, 4096]),
            expert(7, 2, "w3")
        );
        assert_eq!(
            classify("layers.7.feed_forward.gate.weight", &[8, 4096]),
            MoeRole::Dense
        );
    }

    /// Qwen2-MoE (modeling_qwen2_moe.py): router `mlp.gate`, routed
    /// `mlp.experts.{e}`, and one shared expert with its sigmoid gate.
    #[test]
    fn qwen2_moe() {
        let mut model = Model::new();
        hf_ends(&mut model, 64);
        for l in 0..2 {
            hf_attention(&mut model, l, 64);
            for proj in ["q_proj", "k_proj", "v_proj"] {
                add(
                    &mut model,
                    format!("model.layers.{l}.self_attn.{proj}.bias"),
                    &[64],
                );
            }
            add(
                &mut model,
                format!("model.layers.{l}.mlp.gate.weight"),
                &[4, 64],
            );
            add(
                &mut model,
                format!("model.layers.{l}.mlp.shared_expert_gate.weight"),
                &[1, 64],
            );
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                add(
                    &mut model,
                    format!("model.layers.{l}.mlp.shared_expert.{proj}.weight"),
                    &[128, 64],
                );
                for e in 0..4 {
                    add(
                        &mut model,
                        format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight"),
                        &[32, 64],
                    );
                }
            }
        }
        let plan = plan_of(&model).unwrap();
        let parts = [
            ("down_proj.weight", "down_proj"),
            ("gate_proj.weight", "gate_proj"),
            ("up_proj.weight", "up_proj"),
        ];
        let expected: Vec<MoeLayer> = (0..2)
            .map(|l| per_expert_layer(l, 4, &format!("model.layers.{l}.mlp.experts"), &parts))
            .collect();
        assert_eq!(plan.layers, expected);
        for dense in [
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.0.mlp.shared_expert.down_proj.weight",
        ] {
            assert_eq!(classify(dense, &[64, 64]), MoeRole::Dense, "{dense}");
        }
    }

    /// Qwen3-MoE (modeling_qwen3_moe.py) and OLMoE: no shared expert, q/k norms.
    #[test]
    fn qwen3_moe() {
        let mut model = Model::new();
        hf_ends(&mut model, 64);
        for l in 0..2 {
            hf_attention(&mut model, l, 64);
            add(
                &mut model,
                format!("model.layers.{l}.self_attn.q_norm.weight"),
                &[16],
            );
            add(
                &mut model,
                format!("model.layers.{l}.self_attn.k_norm.weight"),
                &[16],
            );
            add(
                &mut model,
                format!("model.layers.{l}.mlp.gate.weight"),
                &[8, 64],
            );
            // Listed expert-major in reverse, as a shuffled index might.
            for e in (0..8).rev() {
                for proj in ["gate_proj", "up_proj", "down_proj"] {
                    add(
                        &mut model,
                        format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight"),
                        &[24, 64],
                    );
                }
            }
        }
        let plan = plan_of(&model).unwrap();
        assert_eq!(plan.layers.len(), 2);
        assert_eq!(plan.layers[1].layer, 1);
        assert_eq!(plan.layers[1].experts, 8);
        assert_eq!(plan.layers[1].tensors.len(), 24);
        assert_eq!(
            plan.layers[1].tensors[0],
            ExpertTensor {
                name: "model.layers.1.mlp.experts.0.down_proj.weight".into(),
                expert: Some(0),
                part: "down_proj".into(),
            }
        );
        // The plan does not depend on the order of the list.
        model.reverse();
        assert_eq!(plan_of(&model).unwrap(), plan);
    }

    /// DeepSeek-V3 (modeling_deepseek_v3.py) in its FP8 checkpoint: the first
    /// layer is dense (`first_k_dense_replace`), the router carries
    /// `e_score_correction_bias`, experts and shared experts carry
    /// `weight_scale_inv` companions.
    #[test]
    fn deepseek_v3_fp8() {
        let mut model = Model::new();
        hf_ends(&mut model, 64);
        for l in 0..2 {
            for (proj, shape) in [
                ("q_a_proj", [32, 64]),
                ("q_b_proj", [128, 32]),
                ("kv_a_proj_with_mqa", [40, 64]),
                ("kv_b_proj", [128, 32]),
                ("o_proj", [64, 128]),
            ] {
                add(
                    &mut model,
                    format!("model.layers.{l}.self_attn.{proj}.weight"),
                    &shape,
                );
                add(
                    &mut model,
                    format!("model.layers.{l}.self_attn.{proj}.weight_scale_inv"),
                    &[1, 1],
                );
            }
            add(
                &mut model,
                format!("model.layers.{l}.self_attn.q_a_layernorm.weight"),
                &[32],
            );
            add(
                &mut model,
                format!("model.layers.{l}.self_attn.kv_a_layernorm.weight"),
                &[32],
            );
            add(
                &mut model,
                format!("model.layers.{l}.input_layernorm.weight"),
                &[64],
            );
            add(
                &mut model,
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                &[64],
            );
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            add(
                &mut model,
                format!("model.layers.0.mlp.{proj}.weight"),
                &[128, 64],
            );
            add(
                &mut model,
                format!("model.layers.0.mlp.{proj}.weight_scale_inv"),
                &[1, 1],
            );
            add(
                &mut model,
                format!("model.layers.1.mlp.shared_experts.{proj}.weight"),
                &[32, 64],
            );
            add(
                &mut model,
                format!("model.layers.1.mlp.shared_experts.{proj}.weight_scale_inv"),
                &[1, 1],
            );
            for e in 0..4 {
                add(
                    &mut model,
                    format!("model.layers.1.mlp.experts.{e}.{proj}.weight"),
                    &[32, 64],
                );
                add(
                    &mut model,
                    format!("model.layers.1.mlp.experts.{e}.{proj}.weight_scale_inv"),
                    &[1, 1],
                );
            }
        }
        add(&mut model, "model.layers.1.mlp.gate.weight", &[4, 64]);
        add(
            &mut model,
            "model.layers.1.mlp.gate.e_score_correction_bias",
            &[4],
        );

        let plan = plan_of(&model).unwrap();
        let parts = [
            ("down_proj.weight", "down_proj"),
            ("down_proj.weight_scale_inv", "down_proj.weight_scale_inv"),
            ("gate_proj.weight", "gate_proj"),
            ("gate_proj.weight_scale_inv", "gate_proj.weight_scale_inv"),
            ("up_proj.weight", "up_proj"),
            ("up_proj.weight_scale_inv", "up_proj.weight_scale_inv"),
        ];
        assert_eq!(
            plan.layers,
            vec![per_expert_layer(1, 4, "model.layers.1.mlp.experts", &parts)]
        );
        assert_eq!(
            classify("model.layers.1.mlp.gate.e_score_correction_bias", &[4]),
            MoeRole::Dense
        );
    }

    /// Other quantized companions (compressed-tensors, GPTQ, biases) stay with their expert.
    #[test]
    fn quantized_companions() {
        let cases = [
            (
                "model.layers.2.mlp.experts.5.down_proj.weight_scale",
                "down_proj.weight_scale",
            ),
            (
                "model.layers.2.mlp.experts.5.down_proj.bias",
                "down_proj.bias",
            ),
            (
                "model.layers.2.mlp.experts.5.down_proj.qweight",
                "down_proj.qweight",
            ),
            ("model.layers.2.mlp.experts.5.w1", "w1"),
        ];
        for (name, part) in cases {
            assert_eq!(classify(name, &[4, 4]), expert(2, 5, part), "{name}");
        }
    }

    /// gpt-oss (modeling_gpt_oss.py and the MXFP4 checkpoint): every expert of
    /// a layer in one tensor per part, experts along dimension 0; the router
    /// is `mlp.router`.
    #[test]
    fn gpt_oss_stacked() {
        let mut model = Model::new();
        hf_ends(&mut model, 64);
        for l in 0..2 {
            hf_attention(&mut model, l, 64);
            add(
                &mut model,
                format!("model.layers.{l}.self_attn.sinks"),
                &[8],
            );
            add(
                &mut model,
                format!("model.layers.{l}.mlp.router.weight"),
                &[4, 64],
            );
            add(
                &mut model,
                format!("model.layers.{l}.mlp.router.bias"),
                &[4],
            );
            let experts = format!("model.layers.{l}.mlp.experts");
            add(
                &mut model,
                format!("{experts}.gate_up_proj_blocks"),
                &[4, 256, 2, 16],
            );
            add(
                &mut model,
                format!("{experts}.gate_up_proj_scales"),
                &[4, 256, 2],
            );
            add(
                &mut model,
                format!("{experts}.gate_up_proj_bias"),
                &[4, 256],
            );
            add(
                &mut model,
                format!("{experts}.down_proj_blocks"),
                &[4, 64, 4, 16],
            );
            add(
                &mut model,
                format!("{experts}.down_proj_scales"),
                &[4, 64, 4],
            );
            add(&mut model, format!("{experts}.down_proj_bias"), &[4, 64]);
        }
        let plan = plan_of(&model).unwrap();
        let expected: Vec<MoeLayer> = (0..2)
            .map(|l| {
                let mut tensors: Vec<ExpertTensor> = [
                    "down_proj_bias",
                    "down_proj_blocks",
                    "down_proj_scales",
                    "gate_up_proj_bias",
                    "gate_up_proj_blocks",
                    "gate_up_proj_scales",
                ]
                .iter()
                .map(|part| ExpertTensor {
                    name: format!("model.layers.{l}.mlp.experts.{part}"),
                    expert: None,
                    part: (*part).into(),
                })
                .collect();
                tensors.sort_by(|a, b| a.name.cmp(&b.name));
                MoeLayer {
                    layer: l,
                    experts: 4,
                    tensors,
                }
            })
            .collect();
        assert_eq!(plan.layers, expected);
        assert_eq!(
            classify("model.layers.0.mlp.router.weight", &[4, 64]),
            MoeRole::Dense
        );
    }

    /// transformers' fused in-memory layout and Llama 4 (`feed_forward.experts`).
    #[test]
    fn fused_gate_up() {
        assert_eq!(
            classify("model.layers.3.mlp.experts.gate_up_proj", &[8, 64, 256]),
            stacked(3, 8, "gate_up_proj")
        );
        assert_eq!(
            classify(
                "language_model.model.layers.1.feed_forward.experts.down_proj",
                &[16, 128, 64]
            ),
            stacked(1, 16, "down_proj")
        );
    }

    /// GGUF (llama.cpp constants.py): `ffn_*_exps` stacked with n_expert as
    /// row-major dimension 0; router, shared experts and `exp_probs_b` dense.
    #[test]
    fn gguf() {
        let mut model = Model::new();
        add(&mut model, "token_embd.weight", &[1000, 64]);
        add(&mut model, "output_norm.weight", &[64]);
        add(&mut model, "output.weight", &[1000, 64]);
        for l in 0..2 {
            for t in ["attn_q", "attn_k", "attn_v", "attn_output"] {
                add(&mut model, format!("blk.{l}.{t}.weight"), &[64, 64]);
            }
            add(&mut model, format!("blk.{l}.attn_norm.weight"), &[64]);
            add(&mut model, format!("blk.{l}.ffn_norm.weight"), &[64]);
            add(&mut model, format!("blk.{l}.ffn_gate_inp.weight"), &[8, 64]);
            add(&mut model, format!("blk.{l}.exp_probs_b.bias"), &[8]);
            add(
                &mut model,
                format!("blk.{l}.ffn_gate_inp_shexp.weight"),
                &[64],
            );
            for t in ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"] {
                add(&mut model, format!("blk.{l}.{t}.weight"), &[128, 64]);
            }
            add(
                &mut model,
                format!("blk.{l}.ffn_gate_exps.weight"),
                &[8, 32, 64],
            );
            add(
                &mut model,
                format!("blk.{l}.ffn_up_exps.weight"),
                &[8, 32, 64],
            );
            add(
                &mut model,
                format!("blk.{l}.ffn_down_exps.weight"),
                &[8, 64, 32],
            );
        }
        let plan = plan_of(&model).unwrap();
        let expected: Vec<MoeLayer> = (0..2)
            .map(|l| MoeLayer {
                layer: l,
                experts: 8,
                tensors: ["ffn_down_exps", "ffn_gate_exps", "ffn_up_exps"]
                    .iter()
                    .map(|part| ExpertTensor {
                        name: format!("blk.{l}.{part}.weight"),
                        expert: None,
                        part: (*part).into(),
                    })
                    .collect(),
            })
            .collect();
        assert_eq!(plan.layers, expected);
        for dense in [
            "blk.0.ffn_gate_inp.weight",
            "blk.0.exp_probs_b.bias",
            "blk.0.ffn_gate_inp_shexp.weight",
            "blk.0.ffn_down_shexp.weight",
            "blk.0.ffn_gate.weight",
        ] {
            assert_eq!(classify(dense, &[8, 64]), MoeRole::Dense, "{dense}");
        }
    }

    /// GGUF gpt-oss biases, the fused `ffn_gate_up_exps`, and early per-expert Mixtral GGUF.
    #[test]
    fn gguf_variants() {
        assert_eq!(
            classify("blk.4.ffn_gate_exps.bias", &[32, 2880]),
            stacked(4, 32, "ffn_gate_exps.bias")
        );
        assert_eq!(
            classify("blk.0.ffn_gate_up_exps.weight", &[64, 512, 128]),
            stacked(0, 64, "ffn_gate_up_exps")
        );
        assert_eq!(
            classify("blk.2.ffn_gate.7.weight", &[14336, 4096]),
            expert(2, 7, "ffn_gate")
        );
        // ne = [n_embd, n_ff, n_expert] reversed to row-major.
        let ne = [4096u64, 14336, 8];
        let row_major: Vec<u64> = ne.iter().rev().copied().collect();
        assert_eq!(
            classify("blk.31.ffn_up_exps.weight", &row_major),
            stacked(31, 8, "ffn_up_exps")
        );
    }

    #[test]
    fn dense_llama_is_not_moe() {
        let mut model = Model::new();
        hf_ends(&mut model, 64);
        for l in 0..2 {
            hf_attention(&mut model, l, 64);
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                add(
                    &mut model,
                    format!("model.layers.{l}.mlp.{proj}.weight"),
                    &[128, 64],
                );
            }
        }
        let plan = plan_of(&model).unwrap();
        assert!(!plan.is_moe());
        assert_eq!(plan, MoePlan::default());
        assert!(!plan_of(&Model::new()).unwrap().is_moe());
    }

    #[test]
    fn lookalikes_are_dense() {
        let cases: [(&str, &[u64]); 13] = [
            ("model.layers.0.mlp.experts.x.w1.weight", &[4, 4]),
            ("model.layers.0.mlp.experts.01.w1.weight", &[4, 4]),
            ("model.layers.0.mlp.experts.-1.w1.weight", &[4, 4]),
            ("model.layers.0.mlp.experts.99999999999.w1.weight", &[4, 4]),
            ("model.layers.0.mlp.experts.3", &[4, 4]),
            ("model.layers.0.mlp.experts.3.", &[4, 4]),
            ("model.layers.0.mlp.experts.3.w1..weight", &[4, 4]),
            ("mlp.experts.3.w1.weight", &[4, 4]),
            ("model.layers.0.mlp.experts.gate_up_proj", &[4]),
            ("model.layers.0.mlp.experts.gate_up_proj", &[]),
            ("transformer.blocks.0.ffn.experts.mlp.w1", &[4096, 64]),
            ("blk.0.ffn_down_exps.weight", &[8]),
            ("blk.x.ffn_down_exps.weight", &[8, 4, 4]),
        ];
        for (name, shape) in cases {
            assert_eq!(classify(name, shape), MoeRole::Dense, "{name} {shape:?}");
        }
    }

    // --- consistency errors ---------------------------------------------------

    /// Two layers of `experts` experts with gate/up/down, as Qwen3-MoE names them.
    fn qwen3(experts: u32) -> Model {
        let mut model = Model::new();
        for l in 0..2 {
            for e in 0..experts {
                for proj in ["gate_proj", "up_proj", "down_proj"] {
                    add(
                        &mut model,
                        format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight"),
                        &[8, 8],
                    );
                }
            }
        }
        model
    }

    #[test]
    fn missing_part() {
        let mut model = qwen3(4);
        model.retain(|(name, _)| name != "model.layers.1.mlp.experts.2.up_proj.weight");
        assert_eq!(
            reject(&model),
            MoeError::MissingPart {
                layer: 1,
                expert: 2,
                part: "up_proj".into(),
                sibling: 0,
                example: "model.layers.1.mlp.experts.0.up_proj.weight".into(),
            }
        );
    }

    #[test]
    fn missing_expert() {
        let mut model = qwen3(4);
        model.retain(|(name, _)| !name.starts_with("model.layers.0.mlp.experts.1."));
        assert_eq!(
            reject(&model),
            MoeError::MissingExpert {
                layer: 0,
                missing: 1,
                last: 3
            }
        );
        let mut model = qwen3(4);
        model.retain(|(name, _)| !name.starts_with("model.layers.1.mlp.experts.0."));
        assert_eq!(
            reject(&model),
            MoeError::MissingExpert {
                layer: 1,
                missing: 0,
                last: 3
            }
        );
        // A huge index alone allocates nothing and reports the gap.
        let model = vec![(
            "model.layers.0.mlp.experts.4294967295.w1.weight".to_owned(),
            vec![1, 1],
        )];
        assert!(matches!(
            reject(&model),
            MoeError::MissingExpert { missing: 0, .. }
        ));
    }

    #[test]
    fn stacked_count_mismatch() {
        let mut model = Model::new();
        add(&mut model, "blk.0.ffn_gate_exps.weight", &[8, 32, 64]);
        add(&mut model, "blk.0.ffn_up_exps.weight", &[8, 32, 64]);
        add(&mut model, "blk.0.ffn_down_exps.weight", &[7, 64, 32]);
        assert_eq!(
            reject(&model),
            MoeError::CountMismatch {
                layer: 0,
                tensor: "blk.0.ffn_down_exps.weight".into(),
                got: 7,
                expected: 8,
                reference: "blk.0.ffn_gate_exps.weight".into(),
            }
        );
    }

    #[test]
    fn stacked_and_per_expert_disagree() {
        let mut model = qwen3(4);
        add(
            &mut model,
            "model.layers.1.mlp.experts.gate_up_proj",
            &[5, 8, 16],
        );
        assert!(matches!(
            reject(&model),
            MoeError::CountMismatch {
                layer: 1,
                got: 5,
                expected: 4,
                ..
            }
        ));
        // Agreeing counts are accepted.
        let mut model = qwen3(4);
        add(
            &mut model,
            "model.layers.1.mlp.experts.gate_up_proj",
            &[4, 8, 16],
        );
        let plan = plan_of(&model).unwrap();
        assert_eq!(plan.layers[1].experts, 4);
        assert_eq!(plan.layers[1].tensors[0].expert, None);
    }

    #[test]
    fn duplicates() {
        let mut model = qwen3(2);
        model.push(model[0].clone());
        assert_eq!(
            reject(&model),
            MoeError::DuplicateTensor {
                name: "model.layers.0.mlp.experts.0.gate_proj.weight".into()
            }
        );
        let mut model = qwen3(2);
        add(
            &mut model,
            "model.layers.0.mlp.experts.1.gate_proj",
            &[8, 8],
        );
        assert!(matches!(
            reject(&model),
            MoeError::DuplicateExpertPart {
                layer: 0,
                expert: 1,
                ..
            }
        ));
        let mut model = Model::new();
        add(&mut model, "blk.3.ffn_up_exps.weight", &[8, 4, 4]);
        add(&mut model, "blk.3.ffn_up_exps", &[8, 4, 4]);
        assert!(matches!(
            reject(&model),
            MoeError::DuplicateStackedPart { layer: 3, .. }
        ));
    }

    #[test]
    fn empty_and_oversized_stacks() {
        let model = vec![("blk.0.ffn_up_exps.weight".to_owned(), vec![0, 4, 4])];
        assert!(matches!(
            reject(&model),
            MoeError::EmptyStack { layer: 0, .. }
        ));
        let model = vec![("blk.0.ffn_up_exps.weight".to_owned(), vec![1 << 32, 4])];
        assert!(
            matches!(reject(&model), MoeError::TooManyExperts { count, .. } if count == 1 << 32)
        );
    }

    // --- never panic ------------------------------------------------------------

    /// Names assembled from the components that matter, so that near-misses are common.
    fn near_miss_name() -> impl Strategy<Value = String> {
        let component = prop_oneof![
            Just("model".to_owned()),
            Just("layers".to_owned()),
            Just("blk".to_owned()),
            Just("mlp".to_owned()),
            Just("experts".to_owned()),
            Just("shared_experts".to_owned()),
            Just("w1".to_owned()),
            Just("gate_up_proj".to_owned()),
            Just("down_proj_blocks".to_owned()),
            Just("ffn_up_exps".to_owned()),
            Just("ffn_gate".to_owned()),
            Just("weight".to_owned()),
            Just(String::new()),
            (0u64..6).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "[a-z0-9_]{0,6}",
        ];
        prop::collection::vec(component, 0..8).prop_map(|parts| parts.join("."))
    }

    proptest! {
        #[test]
        fn classify_never_panics(name in any::<String>(), shape in prop::collection::vec(any::<u64>(), 0..5)) {
            let _ = classify(&name, &shape);
        }

        #[test]
        fn plan_never_panics_and_is_consistent(
            tensors in prop::collection::vec(
                (near_miss_name(), prop::collection::vec(0u64..6, 0..4)),
                0..24,
            ),
        ) {
            if let Ok(plan) = plan_of(&tensors) {
                for pair in plan.layers.windows(2) {
                    prop_assert!(pair[0].layer < pair[1].layer);
                }
                for layer in &plan.layers {
                    prop_assert!(layer.experts > 0);
                    for tensor in &layer.tensors {
                        prop_assert!(tensor.expert.is_none_or(|e| e < layer.experts));
                    }
                }
            }
        }
    }
}
