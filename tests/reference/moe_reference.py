#!/usr/bin/env python3
"""Independent reference logits for the three tiny synthetic mixture-of-experts fixtures.

Hugging Face `transformers` runs its stock MixtralForCausalLM and Qwen2MoeForCausalLM in
float32 on the CPU (eager attention, eval, no_grad, 2 threads) over one fixed list of 24 ids,
and the JSON records the full logits. The fixtures are made by fixtures/make_moe.py:

  mixtral       moe-mixtral-tiny/{config.json,model.safetensors}   (BF16, upcast exactly to F32)
  qwen          moe-qwen-tiny/{config.json,model.safetensors}      (BF16, upcast exactly to F32)
  mixtral_gguf  moe-mixtral-tiny-gguf/model.gguf                   (F16 / Q8_0 / F32, arch "llama")

transformers 4.57.6 cannot load the GGUF as a Mixtral: from_pretrained(dir, gguf_file=...)
builds a dense LlamaForCausalLM (its GGUF "llama" mapping has no expert keys) and leaves the
MLP weights randomly initialized, and MixtralForCausalLM.from_pretrained(..., gguf_file=...)
raises NotImplementedError (gguf-py has no "mixtral" arch). So this script dequantizes the
GGUF itself with the gguf package, undoes llama.cpp's Q/K row permutation, unstacks the
experts, and loads the float32 state dict (strict) into MixtralForCausalLM with the config of
moe-mixtral-tiny (checked against the GGUF metadata). The attempt is recorded in the JSON.

Nothing here shares code with the Rust engine.

Usage:
    tests/reference/.venv/bin/python tests/reference/moe_reference.py \
        --fixtures "$HOME/.cache/tpde-fixtures" --out tests/reference/moe-tiny.json
"""

import argparse
import hashlib
import json
import os
import platform
import sys

NUM_THREADS = 2
ROUND = 5
IDS = [1, 17, 200, 3, 45, 99, 128, 255, 0, 64, 7, 7, 7, 31, 150, 222, 2, 90, 11, 180, 33, 66, 120, 250]

MIXTRAL_DIR = "moe-mixtral-tiny"
QWEN_DIR = "moe-qwen-tiny"
GGUF_DIR = "moe-mixtral-tiny-gguf"
GGUF_FILE = "model.gguf"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r(x, nd=ROUND):
    return round(float(x), nd)


def pkg_version(name):
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # pragma: no cover
        return "unknown"


# ---- loading ---------------------------------------------------------------------------------


def load_safetensors_model(model_dir):
    """Stock from_pretrained in float32 (BF16 -> F32 is exact), eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def check_upcast_exact(model, st_path):
    """Every parameter equals the safetensors tensor upcast to float32, bit for bit."""
    import torch
    from safetensors import safe_open

    sd = model.state_dict()
    n, bad = 0, []
    with safe_open(st_path, framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name not in sd or not torch.equal(sd[name], t.to(torch.float32)):
                bad.append(name)
            n += 1
    missing = sorted(set(sd) - set(_st_keys(st_path)))
    return {"tensors_compared": n, "all_equal_bf16_upcast": not bad, "mismatched": bad, "params_not_in_file": missing}


def _st_keys(st_path):
    from safetensors import safe_open

    with safe_open(st_path, framework="pt") as f:
        return list(f.keys())


def try_transformers_gguf(gguf_dir, mixtral_dir):
    """Record what transformers' own GGUF loading does with this file (it is not used)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    notes = {}
    try:
        m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
        has_moe = any("experts" in n for n, _ in m.named_parameters())
        notes["auto_from_pretrained"] = (
            f"loads as {type(m).__name__} (model_type {m.config.model_type!r}), "
            f"{'with' if has_moe else 'WITHOUT'} experts: the llama GGUF mapping ignores "
            "llama.expert_count, so ffn_*_exps are dropped and mlp.* is randomly initialized; unusable"
        )
        del m
    except Exception as e:  # pragma: no cover
        notes["auto_from_pretrained"] = f"{type(e).__name__}: {e}"
    try:
        cfg = MixtralConfig.from_pretrained(mixtral_dir)
        MixtralForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, config=cfg, dtype=torch.float32)
        notes["mixtral_from_pretrained_with_config"] = "loaded (unexpected)"
    except Exception as e:
        notes["mixtral_from_pretrained_with_config"] = f"{type(e).__name__}: {e}"
    return notes


def unpermute_qk(w, n_head, n_head_kv=None):
    """Inverse of llama.cpp convert_hf_to_gguf.py LlamaModel.permute (same as transformers'
    LlamaTensorProcessor._reverse_permute_weights): GGUF interleaved pairs -> HF half-split."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def load_gguf_mixtral(gguf_path, mixtral_dir):
    """Build MixtralForCausalLM (float32, eager) from the GGUF by hand; returns (model, checks)."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = GGUFReader(gguf_path)
    fields = reader.fields
    meta = {k: fields[k].contents() for k in fields if not k.startswith("GGUF.")}
    cfg = AutoConfig.from_pretrained(mixtral_dir)

    # The GGUF metadata must describe the same model as config.json.
    expect_meta = {
        "general.architecture": "llama",
        "llama.embedding_length": cfg.hidden_size,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.expert_count": cfg.num_local_experts,
        "llama.expert_used_count": cfg.num_experts_per_tok,
        "llama.vocab_size": cfg.vocab_size,
        "llama.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
    }
    for k, v in expect_meta.items():
        if meta.get(k) != v:
            raise SystemExit(f"moe_reference.py: GGUF {k} = {meta.get(k)!r}, config.json says {v!r}")
    # Float metadata is stored as F32: compare in F32.
    for k, v in (("llama.rope.freq_base", cfg.rope_theta), ("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)):
        if np.float32(meta[k]) != np.float32(v):
            raise SystemExit(f"moe_reference.py: GGUF {k} = {meta[k]!r}, config.json says {v!r}")

    H, L, E = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_local_experts
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    tensors = {t.name: t for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True)

    sd = {
        "model.embed_tokens.weight": deq("token_embd.weight"),
        "model.norm.weight": deq("output_norm.weight"),
        "lm_head.weight": deq("output.weight"),
    }
    for l in range(L):
        b, p = f"blk.{l}", f"model.layers.{l}"
        sd[f"{p}.input_layernorm.weight"] = deq(f"{b}.attn_norm.weight")
        sd[f"{p}.post_attention_layernorm.weight"] = deq(f"{b}.ffn_norm.weight")
        sd[f"{p}.self_attn.q_proj.weight"] = unpermute_qk(deq(f"{b}.attn_q.weight"), nh, nh)
        sd[f"{p}.self_attn.k_proj.weight"] = unpermute_qk(deq(f"{b}.attn_k.weight"), nh, nkv)
        sd[f"{p}.self_attn.v_proj.weight"] = deq(f"{b}.attn_v.weight")
        sd[f"{p}.self_attn.o_proj.weight"] = deq(f"{b}.attn_output.weight")
        sd[f"{p}.block_sparse_moe.gate.weight"] = deq(f"{b}.ffn_gate_inp.weight")
        for kind, wid in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            stacked = deq(f"{b}.{kind}.weight")  # numpy [n_expert, rows, cols] (GGUF ne reversed)
            if stacked.shape[0] != E:
                raise SystemExit(f"moe_reference.py: {b}.{kind} has shape {stacked.shape}")
            for e in range(E):
                sd[f"{p}.block_sparse_moe.experts.{e}.{wid}.weight"] = np.ascontiguousarray(stacked[e])
    used = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{l}.{k}.weight"
        for l in range(L)
        for k in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp",
                  "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    }
    if used != set(tensors):
        raise SystemExit(f"moe_reference.py: unexpected GGUF tensors {sorted(set(tensors) ^ used)}")

    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    model.eval()

    # Compare with the BF16 safetensors this GGUF was made from: everything but the Q8_0
    # down-projections should be bit-equal (all values are exact in F16).
    exact, diff = [], {}
    with safe_open(os.path.join(mixtral_dir, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            ref = f.get_tensor(name).to(torch.float32).numpy()
            if np.array_equal(sd[name], ref):
                exact.append(name)
            else:
                diff[name] = float(np.abs(sd[name] - ref).max())
    q_raw_equal = bool(np.array_equal(deq("blk.0.attn_q.weight"), sd["model.layers.0.self_attn.q_proj.weight"]))
    checks = {
        "loaded_by": "manual: gguf.dequantize -> un-permute attn_q/attn_k -> unstack ffn_*_exps -> "
        "MixtralForCausalLM.load_state_dict(strict=True), config from moe-mixtral-tiny/config.json",
        "transformers_gguf_attempts": None,  # filled in by main()
        "gguf_tensor_types": {k: types[k] for k in sorted(types)},
        "gguf_metadata": {k: (v if not isinstance(v, float) else float(np.float32(v))) for k, v in sorted(meta.items())},
        "tensors_equal_to_safetensors_bf16": len(exact),
        "tensors_differing_from_safetensors_bf16_max_abs": {k: diff[k] for k in sorted(diff)},
        "attn_q_unpermuted_equals_safetensors": all(
            f"model.layers.{l}.self_attn.{x}_proj.weight" in exact for l in range(L) for x in ("q", "k")
        ),
        "attn_q_rows_as_stored_equal_hf": q_raw_equal,
    }
    return model, checks


# ---- forward -----------------------------------------------------------------------------------


def forward_record(model, ids, router_attr):
    """Full logits for one forward pass, plus the routing each MoE layer chose."""
    import torch

    captured = []
    hooks = []
    for layer in model.model.layers:
        gate = getattr(layer, router_attr).gate
        hooks.append(gate.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().clone())))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    for h in hooks:
        h.remove()
    assert len(captured) == len(model.model.layers)

    top_k = model.config.num_experts_per_tok
    routing = []
    for l, router_logits in enumerate(captured):
        probs = torch.softmax(router_logits.float(), dim=-1)
        srt = torch.sort(probs, dim=-1, descending=True)
        margin = srt.values[:, top_k - 1] - srt.values[:, top_k]
        routing.append(
            {
                "layer": l,
                "selected": srt.indices[:, :top_k].tolist(),
                "softmax_of_selected": [[r(v, 6) for v in row] for row in srt.values[:, :top_k].tolist()],
                "router_logits": [[r(v, 6) for v in row] for row in router_logits.tolist()],
                "min_margin_kth_vs_next": r(margin.min().item(), 7),
            }
        )
    top2 = torch.topk(logits, 2, dim=-1).values
    return {
        "ids": list(ids),
        "logits": [[r(v) for v in row] for row in logits.tolist()],
        "argmax": torch.argmax(logits, dim=-1).tolist(),
        "argmax_margin": [r(a - b, 6) for a, b in top2.tolist()],
        "logsumexp": [r(v) for v in torch.logsumexp(logits, dim=-1).tolist()],
        "routing": routing,
    }, logits


def float64_check(model, logits32, ids):
    """Rerun the same weights in float64: how far the float32 reference is from exact."""
    import torch

    model.double()
    with torch.no_grad():
        logits64 = model(torch.tensor([ids]), use_cache=False).logits[0]
    model.float()
    return {
        "max_abs_logit_diff_float32_vs_float64": r((logits32.double() - logits64).abs().max().item(), 9),
        "argmax_agree": torch.equal(torch.argmax(logits32, -1), torch.argmax(logits64, -1)),
    }


def config_record(cfg):
    keys = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
        "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "num_local_experts", "num_experts", "num_experts_per_tok", "norm_topk_prob",
        "decoder_sparse_step", "mlp_only_layers", "rms_norm_eps", "rope_theta", "rope_scaling", "sliding_window",
        "use_sliding_window", "tie_word_embeddings", "hidden_act", "qkv_bias",
    ]
    out = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    out["_attn_implementation"] = cfg._attn_implementation
    return out


def dump(result, path):
    """indent=1 JSON, but each logits row (and routing row) on one line."""
    placeholders = {}

    def compact(obj, key):
        token = f"@@{len(placeholders)}@@"
        placeholders[token] = json.dumps(obj, separators=(", ", ": "))
        return token

    def walk(o, parent_key=None):
        if isinstance(o, dict):
            return {k: walk(v, k) for k, v in o.items()}
        if isinstance(o, list):
            if o and all(isinstance(x, list) for x in o) and parent_key in (
                "logits", "selected", "softmax_of_selected", "router_logits"
            ):
                return [compact(x, parent_key) for x in o]
            if parent_key in ("ids", "argmax", "argmax_margin", "logsumexp"):
                return compact(o, parent_key)
            return [walk(x) for x in o]
        return o

    text = json.dumps(walk(result), ensure_ascii=False, indent=1)
    for token, s in placeholders.items():
        text = text.replace(f'"{token}"', s, 1)
    json.loads(text)  # still valid
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--fixtures",
        default=os.environ.get("TPDE_FIXTURES", os.path.expanduser("~/.cache/tpde-fixtures")),
        help="fixture directory (default: $TPDE_FIXTURES or ~/.cache/tpde-fixtures)",
    )
    ap.add_argument("--out", required=True, help="output JSON path")
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(0)

    fx = os.path.abspath(args.fixtures)
    mixtral_dir = os.path.join(fx, MIXTRAL_DIR)
    qwen_dir = os.path.join(fx, QWEN_DIR)
    gguf_path = os.path.join(fx, GGUF_DIR, GGUF_FILE)

    models = {}
    all_logits = {}

    # -- mixtral (safetensors) --
    m = load_safetensors_model(mixtral_dir)
    st = os.path.join(mixtral_dir, "model.safetensors")
    rec, all_logits["mixtral"] = forward_record(m, IDS, "block_sparse_moe")
    models["mixtral"] = {
        "fixture": f"{MIXTRAL_DIR}/model.safetensors",
        "class": type(m).__name__,
        "model_sha256": sha256_file(st),
        "config_sha256": sha256_file(os.path.join(mixtral_dir, "config.json")),
        "config": config_record(m.config),
        "weight_checks": check_upcast_exact(m, st),
        **rec,
        "float64_check": float64_check(m, all_logits["mixtral"], IDS),
    }
    del m

    # -- qwen (safetensors) --
    m = load_safetensors_model(qwen_dir)
    st = os.path.join(qwen_dir, "model.safetensors")
    rec, all_logits["qwen"] = forward_record(m, IDS, "mlp")
    models["qwen"] = {
        "fixture": f"{QWEN_DIR}/model.safetensors",
        "class": type(m).__name__,
        "model_sha256": sha256_file(st),
        "config_sha256": sha256_file(os.path.join(qwen_dir, "config.json")),
        "config": config_record(m.config),
        "weight_checks": check_upcast_exact(m, st),
        **rec,
        "float64_check": float64_check(m, all_logits["qwen"], IDS),
    }
    del m

    # -- mixtral (GGUF) --
    attempts = try_transformers_gguf(os.path.dirname(gguf_path), mixtral_dir)
    m, gchecks = load_gguf_mixtral(gguf_path, mixtral_dir)
    gchecks["transformers_gguf_attempts"] = attempts
    rec, all_logits["mixtral_gguf"] = forward_record(m, IDS, "block_sparse_moe")
    models["mixtral_gguf"] = {
        "fixture": f"{GGUF_DIR}/{GGUF_FILE}",
        "class": type(m).__name__,
        "model_sha256": sha256_file(gguf_path),
        "config": config_record(m.config),
        "weight_checks": gchecks,
        **rec,
        "float64_check": float64_check(m, all_logits["mixtral_gguf"], IDS),
    }
    del m

    d = (all_logits["mixtral"] - all_logits["mixtral_gguf"]).abs()
    comparisons = {
        "mixtral_vs_mixtral_gguf_max_abs_logit_diff": r(d.max().item(), 7),
        "mixtral_vs_mixtral_gguf_argmax_agree": models["mixtral"]["argmax"] == models["mixtral_gguf"]["argmax"],
        "mixtral_vs_mixtral_gguf_routing_agree": [
            a["selected"] == b["selected"] for a, b in zip(models["mixtral"]["routing"], models["mixtral_gguf"]["routing"])
        ],
    }

    result = {
        "description": "Tiny synthetic MoE fixtures (fixtures/make_moe.py): full logits of one forward pass by "
        "Hugging Face transformers, float32, CPU, eager attention; see tests/reference/README.md",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": pkg_version("gguf"),
            "numpy": np.__version__,
            "safetensors": pkg_version("safetensors"),
        },
        "torch_num_threads": torch.get_num_threads(),
        "dtype": "float32",
        "attn_implementation": "eager",
        "logits_round_decimals": ROUND,
        "ids": IDS,
        "comparisons": comparisons,
        **models,
    }
    dump(result, args.out)
    print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes", file=sys.stderr)
    for k, v in models.items():
        print(f"{k:13s} argmax[:8] = {v['argmax'][:8]}", file=sys.stderr)
    print(json.dumps(comparisons), file=sys.stderr)


if __name__ == "__main__":
    main()
