"""A synthetic LLM project shaped like a real Hugging Face checkpoint, for demos and benchmarks.

Real weights cannot be downloaded here, and what matters to kitfs is the
shape of the data, not its meaning: several safetensors shards of BF16
tensors in the order a transformer loader reads them, an index file, JSON
configs, a tokenizer, docs and a Kitfile. Content is seeded so two runs
produce the same bytes (and the same layer digests).
"""

from __future__ import annotations

import argparse
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PIECE = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "BF16"

    @property
    def nbytes(self) -> int:
        n = 2 if self.dtype in ("BF16", "F16") else 4
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def layer_plan(total_bytes: int, hidden: int = 2048) -> list[TensorSpec]:
    """Tensors of a llama-like model whose weights add up to about `total_bytes`."""
    inter = hidden * 11 // 4
    per_layer = [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden // 4, hidden)),
        ("self_attn.v_proj.weight", (hidden // 4, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]
    layer_bytes = sum(TensorSpec("x", s).nbytes for _, s in per_layer)
    vocab = 8192
    embed = TensorSpec("model.embed_tokens.weight", (vocab, hidden))
    head = TensorSpec("lm_head.weight", (vocab, hidden))
    n_layers = max(1, (total_bytes - 2 * embed.nbytes) // layer_bytes)
    specs = [embed]
    for i in range(n_layers):
        specs += [TensorSpec(f"model.layers.{i}.{n}", s) for n, s in per_layer]
    specs += [TensorSpec("model.norm.weight", (hidden,)), head]
    return specs


def _write_shard(path: Path, tensors: list[TensorSpec], rng: np.random.Generator) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            left = t.nbytes
            while left:
                n = min(PIECE, left)
                # Values around 1.0 in BF16 so the weights look like weights to zstd/gzip too.
                vals = rng.normal(0, 0.02, n // 2).astype(np.float32)
                f.write((vals.view(np.uint32) >> 16).astype(np.uint16).tobytes())
                left -= n


def make_model(out: Path, size: int, *, shards: int = 0, seed: int = 7) -> Path:
    """Write the project to `out` and return it; `size` is the total weight bytes."""
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    model.mkdir(exist_ok=True)
    specs = layer_plan(size)
    total = sum(t.nbytes for t in specs)
    shards = shards or max(1, round(total / (512 << 20)))
    per_shard = total / shards
    groups: list[list[TensorSpec]] = [[] for _ in range(shards)]
    acc = 0
    for t in specs:
        groups[min(shards - 1, int(acc // per_shard))].append(t)
        acc += t.nbytes
    groups = [g for g in groups if g]
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(model / name, group, rng)
        weight_map.update({t.name: name for t in group})
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": specs[0].shape[1],
        "num_hidden_layers": (len(specs) - 3) // 9, "vocab_size": specs[0].shape[0],
        "torch_dtype": "bfloat16"}, indent=2))
    (model / "generation_config.json").write_text('{"do_sample": false}\n')
    vocab = {f"tok{i}": i for i in range(specs[0].shape[0])}
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}))
    (model / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    (out / "docs").mkdir(exist_ok=True)
    (out / "docs" / "README.md").write_text("# synthetic-llm\n\nRandom BF16 weights for kitfs.\n")
    (out / "src").mkdir(exist_ok=True)
    (out / "src" / "serve.py").write_text("print('serve the model')\n")
    (out / "Kitfile").write_text(
        "manifestVersion: 1.0.0\n"
        "package:\n  name: synthetic-llm\n  version: 1.0.0\n  authors: [kitfs]\n"
        "model:\n  name: synthetic-llm\n  path: ./model\n  framework: transformers\n"
        "  format: safetensors\n"
        "code:\n  - path: ./src\n    description: serving code\n"
        "docs:\n  - path: ./docs\n    description: model card\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="256M", help="total weight bytes, e.g. 256M, 2G, 20G")
    parser.add_argument("--shards", type=int, default=0)
    args = parser.parse_args()
    make_model(args.out, parse_size(args.size), shards=args.shards)
    print(args.out)


if __name__ == "__main__":
    main()
