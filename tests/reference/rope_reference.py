"""Rotary frequencies with Llama-3 scaling, computed by Hugging Face transformers.

Writes tests/reference/llama3-rope.json: for a few configs (the rope settings of
Llama-3.1-8B, Llama-3.2-1B and a small made-up one whose scaling bends inside its
few frequencies), transformers' `inv_freq` from `ROPE_INIT_FUNCTIONS["llama3"]`.
The engine's test (`tests/engine.rs`) builds its Config from the same config.json
fields and compares its per-pair inverse frequencies.

    tests/reference/.venv/bin/python tests/reference/rope_reference.py \
        --out tests/reference/llama3-rope.json
"""

import argparse
import json

import torch
import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

CONFIGS = {
    "llama-3.1-8b": dict(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_hidden_layers=1, vocab_size=16,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, num_hidden_layers=1, vocab_size=16,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "small-bent": dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, num_hidden_layers=1, vocab_size=16,
        rope_theta=10000.0, max_position_embeddings=4096,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 2.0, "original_max_position_embeddings": 64},
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": {},
    }
    for name, cfg in CONFIGS.items():
        c = LlamaConfig(model_type="llama", **cfg)
        inv, scaling = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
        cfg_json = dict(cfg, model_type="llama")
        out["cases"][name] = {
            "config": cfg_json,
            "inv_freq": [float(x) for x in inv.to(torch.float64)],
            "attention_scaling": float(scaling),
        }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
