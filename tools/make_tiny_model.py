"""Write a tiny random Qwen2/Qwen3/Llama HF model over the char tokenizer: `--size teacher|student|test`."""

import argparse

from rlad_megatron.tiny import SIZES, make_tiny_model

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default="test")
    p.add_argument("--arch", choices=["qwen2", "qwen3", "llama"], default="qwen2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--untied", action="store_true")
    a = p.parse_args()
    print(make_tiny_model(a.out, a.size, seed=a.seed, arch=a.arch, tie=not a.untied))
