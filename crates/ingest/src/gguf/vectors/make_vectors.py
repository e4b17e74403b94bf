"""Writes the GGUF test vectors of `gguf/tests.rs` with llama.cpp's own
writer (the `gguf` package from PyPI, 0.19.0), and prints what its reader
sees, so that the Rust tests check our reader against the reference writer.

    python3 -m venv /tmp/ggufpy && /tmp/ggufpy/bin/pip install gguf==0.19.0
    /tmp/ggufpy/bin/python make_vectors.py   # in this folder
"""

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType as Q


def tiny(path, alignment=None):
    w = GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_bool("tpde.flag", True)
    w.add_uint64("tpde.u64", 2**63 + 1)
    w.add_int8("tpde.i8", -7)
    w.add_float64("tpde.f64", -0.5)
    # A byte-fallback style token that is not UTF-8.
    w.add_token_list(["<unk>", "<s>", "\u2581the", b"\xe2\x96"])
    w.add_token_scores([0.0, -1.0, -2.5, -3.0])
    w.add_token_types([2, 3, 1, 6])
    rng = np.random.default_rng(7)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(8).astype(np.float16))
    # Q8_0: 2 rows of 32 elements, 34 bytes a block.
    q8 = rng.integers(0, 256, size=(2, 34), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=Q.Q8_0)
    w.add_tensor("output.weight", rng.integers(-5, 5, size=(3, 5)).astype(np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def vocab_only(path):
    w = GGUFWriter(path, "llama")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


tiny("gguf-py-tiny.gguf")
tiny("gguf-py-aligned-64.gguf", alignment=64)
vocab_only("gguf-py-vocab-only.gguf")

for path in ["gguf-py-tiny.gguf", "gguf-py-aligned-64.gguf", "gguf-py-vocab-only.gguf"]:
    r = GGUFReader(path)
    print(path, "size", r.data.size, "alignment", r.alignment, "data_offset", r.data_offset,
          "kv", [k for k in r.fields if not k.startswith("GGUF.")])
    for t in r.tensors:
        print("  ", t.name, t.tensor_type.name, list(map(int, t.shape)), int(t.n_bytes), int(t.data_offset))
