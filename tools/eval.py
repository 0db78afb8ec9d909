"""Front end of `rlad-eval` (same flags): Mean@k / Pass@k of a checkpoint on JSONL or reasoning-gym sets.

    python tools/eval.py --model outputs/tiny/rlad_student --data builtin:addition --k 8 --no-chat-template
"""

import sys

from rlad_megatron.eval import main

if __name__ == "__main__":
    main(sys.argv[1:])
