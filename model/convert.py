"""Convert between our checkpoint folder and Hugging Face's LlamaForCausalLM layout.

    python -m model.convert from-hf  path/to/Llama-2-7b-hf  checkpoints/llama2-7b
    python -m model.convert to-hf    checkpoints/chat       exported/chat-hf  [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys

import torch

from model.checkpoint import CheckpointError
from model.hf import export_hf, import_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    from_hf = sub.add_parser("from-hf", help="HF LlamaForCausalLM folder -> our checkpoint folder")
    from_hf.add_argument("src")
    from_hf.add_argument("dst")
    from_hf.add_argument("--max-seq-len", type=int, help="context length (default: max_position_embeddings)")
    to_hf = sub.add_parser("to-hf", help="our checkpoint folder -> HF LlamaForCausalLM folder")
    to_hf.add_argument("src")
    to_hf.add_argument("dst")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    opts = parser.parse_args(argv)
    try:
        if opts.direction == "from-hf":
            import_hf(opts.src, opts.dst, opts.max_seq_len)
        else:
            export_hf(opts.src, opts.dst, getattr(torch, opts.dtype) if opts.dtype else None)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {opts.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
