#!/usr/bin/env python3
"""Independent reference for a CPU forward pass of SmolLM2-135M-Instruct (GGUF Q4_1).

Hugging Face `transformers` loads the GGUF file (dequantizing every tensor to
float32 through the `gguf` package) and runs the stock LlamaForCausalLM on the
CPU. Nothing here shares code with the Rust engine, so the JSON it writes can
be used to check the engine's tokenizer, forward pass and greedy decoding.

Usage:
    tests/reference/.venv/bin/python tests/reference/smollm2_reference.py \
        --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/reference/smollm2-135m-q4_1.json
"""

import argparse
import hashlib
import json
import os
import platform
import sys

NUM_THREADS = 2
ROUND = 5
TOP_K = 10
GEN_TOKENS = 24

TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "a  b\n\n c",
    "12345 3.14159",
    "I'm sure we'll see, don't you think? They've gone; it's fine.",
    "Hello, world! (yes) -- \"quotes\" & <tags> #1 @user $5.00 100% ...?!",
    "naïve café 東京",
    "emoji: 🙂🚀 ok 👍🏽",
    "def f(x):\n\treturn x * 2  # double\n\tpass",
    "<|im_start|>user\nHi<|im_end|>",
    "Mixed<|endoftext|>special tokens",
    "\n",
    "",
]

CHAT_PROMPT = "What is the capital of France?"

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling "
    "after years of storms. Every evening the keeper climbed the narrow stairs to "
    "light the lamp and watch the ships pass safely through the dark water below."
)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r(x):
    return round(float(x), ROUND)


def smollm_pretokenizer_variant(tok):
    """The same BPE, but with the pre-tokenizer of the original SmolLM2 tokenizer.json
    (and llama.cpp's "smollm" pre-type): split digits individually, then GPT-2 byte-level regex.
    transformers' GGUF converter uses a plain ByteLevel pre-tokenizer instead."""
    from tokenizers import Tokenizer, pre_tokenizers

    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return t


def check_qk_unpermute(model, gguf_path, n_head, n_kv_head):
    """Compare transformers' q_proj/k_proj weights with the raw (dequantized) GGUF rows."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}

    def raw(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))

    def unpermute(w, heads):
        # Inverse of llama.cpp convert_hf_to_gguf.py LlamaModel.permute:
        # GGUF rows within a head are interleaved pairs (2i, 2i+1); HF rows are
        # half-split (i, i + head_dim/2).
        dim = w.shape[0] // heads // 2
        return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

    out = {}
    for name, hf, heads in [
        ("blk.0.attn_q.weight", model.model.layers[0].self_attn.q_proj.weight, n_head),
        ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj.weight, n_kv_head),
    ]:
        g = raw(name)
        h = hf.detach().cpu().numpy()
        out[name] = {
            "hf_equals_gguf_rows_as_stored": bool(np.array_equal(h, g)),
            "hf_equals_gguf_rows_unpermuted": bool(np.array_equal(h, unpermute(g, heads))),
        }
    emb = raw("token_embd.weight")
    out["token_embd.weight"] = {
        "hf_embed_equals_gguf": bool(np.array_equal(model.model.embed_tokens.weight.detach().numpy(), emb)),
        "hf_lm_head_equals_gguf": bool(np.array_equal(model.lm_head.weight.detach().numpy(), emb)),
    }
    return out


def logits_record(logits_row, probe_ids):
    import torch

    top = torch.topk(logits_row, TOP_K)
    return {
        "argmax": int(torch.argmax(logits_row).item()),
        "top": [[int(i), r(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())],
        "logsumexp": r(torch.logsumexp(logits_row, dim=-1).item()),
        "probe": [r(v) for v in logits_row[probe_ids].tolist()],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", required=True, help="output JSON path")
    args = ap.parse_args()

    import gguf
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(0)

    model_path = os.path.abspath(args.model)
    model_dir, model_file = os.path.split(model_path)

    try:
        from importlib.metadata import version as pkg_version

        gguf_version = pkg_version("gguf")
    except Exception:  # pragma: no cover
        gguf_version = getattr(gguf, "__version__", "unknown")

    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---- tokenizer -------------------------------------------------------
    smollm_tok = smollm_pretokenizer_variant(tok)
    tokenizer_cases = []
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        alt = smollm_tok.encode(text, add_special_tokens=False).ids
        case = {
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": decode(ids),
            "smollm_pretokenizer_agrees": alt == ids,
        }
        if alt != ids:
            case["ids_smollm_pretokenizer"] = alt
        tokenizer_cases.append(case)

    # ---- chat + greedy generation ---------------------------------------
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tok.encode(chat_text, add_special_tokens=False)

    # (1) transformers' generate(): greedy, KV cache, stops after emitting eos (<|im_end|>).
    with torch.no_grad():
        out = model.generate(
            torch.tensor([chat_ids]),
            attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
            max_new_tokens=GEN_TOKENS,
            do_sample=False,
            num_beams=1,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
        )
    generate_ids = out[0, len(chat_ids):].tolist()

    # (2) Plain loop: full-sequence forward each step, no cache, no eos stop: exactly GEN_TOKENS.
    seq = list(chat_ids)
    no_stop = []
    with torch.no_grad():
        for _ in range(GEN_TOKENS):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            nxt = int(torch.argmax(logits).item())
            no_stop.append(nxt)
            seq.append(nxt)
    eos_index = no_stop.index(cfg.eos_token_id) if cfg.eos_token_id in no_stop else None

    chat = {
        "prompt": CHAT_PROMPT,
        "text": chat_text,
        "ids": chat_ids,
        "generated_ids": generate_ids,
        "generated_text": decode(generate_ids),
        "generated_ids_no_stop": no_stop,
        "generated_text_no_stop": decode(no_stop),
        "first_eos_index_in_no_stop": eos_index,
        "generate_agrees_with_no_cache_loop": generate_ids == no_stop[: len(generate_ids)],
    }

    # ---- logits ----------------------------------------------------------
    vocab = cfg.vocab_size
    probe_ids = list(range(16)) + [int(x) for x in np.linspace(16, vocab - 1, 48).round()]
    assert len(probe_ids) == 64 and len(set(probe_ids)) == 64

    paragraph_ids = tok.encode(PARAGRAPH, add_special_tokens=False)
    logits_cases = []
    for name, text, ids in [
        ("chat_prompt", chat_text, chat_ids),
        ("paragraph", PARAGRAPH, paragraph_ids),
    ]:
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
        logits_cases.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "positions": [logits_record(logits[p], probe_ids) for p in range(len(ids))],
            }
        )

    result = {
        "description": "SmolLM2-135M-Instruct GGUF Q4_1, forward pass by Hugging Face transformers "
        "(GGUF dequantized to float32) on CPU; see tests/reference/README.md",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": gguf_version,
            "numpy": np.__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
        "model_file": model_file,
        "model_sha256": sha256_file(model_path),
        "torch_num_threads": torch.get_num_threads(),
        "dtype": "float32",
        "attn_implementation": "eager",
        "config": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        },
        "gguf_weight_checks": check_qk_unpermute(
            model, model_path, cfg.num_attention_heads, cfg.num_key_value_heads
        ),
        "tokenizer_notes": {
            "encode_add_special_tokens_true_prepends": tok.encode("Hi", add_special_tokens=True)[
                : len(tok.encode("Hi", add_special_tokens=True)) - len(tok.encode("Hi", add_special_tokens=False))
            ],
            "tokenizer_bos_token": tok.bos_token,
            "tokenizer_eos_token": tok.eos_token,
            "pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer),
            "decode_clean_up_tokenization_spaces": False,
        },
        "tokenizer_cases": tokenizer_cases,
        "chat": chat,
        "probe_ids": probe_ids,
        "logits_round_decimals": ROUND,
        "logits_cases": logits_cases,
    }

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes", file=sys.stderr)
    print(f"generated: {chat['generated_text']!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
