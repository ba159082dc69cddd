"""Print a named configuration (or a checkpoint folder's) and its exact parameter count.

    python -m model.info llama2-70b
    python -m model.info checkpoints/sft
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.checkpoint import load_args
from model.config import CONFIGS, get_config
from model.llama import count_parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"one of {', '.join(CONFIGS)}, or a checkpoint folder")
    opts = parser.parse_args(argv)
    try:
        args = load_args(opts.name) if Path(opts.name).is_dir() else get_config(opts.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(opts.name)
    for key, value in args.to_dict().items():
        print(f"  {key:<20} {value}")
    print(f"  {'head_dim':<20} {args.head_dim}")
    print(f"  {'ffn_hidden_dim':<20} {args.ffn_hidden_dim}")
    print(f"parameters: {count_parameters(args):,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
