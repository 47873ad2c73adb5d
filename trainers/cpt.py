"""Continual pretraining (seed 002, section 3.3.1): phase 1 (reconstruction / continuation + plain LM) or
phase 2 (continuation, QA, summarization, reconstruction + plain LM); encoder, projection and decoder jointly.

    python -m memcomp.trainers.cpt --recipe tiny_cpu                       # the demo, on a CPU
    python -m memcomp.trainers.cpt --recipe qwen2.5-7b compressor.model_dir=/models/Qwen2.5-7B data.text_file=cpt.jsonl
    deepspeed --num_gpus 8 -m memcomp.trainers.cpt --recipe qwen2.5-7b --stage cpt2 ...   # ZeRO-3
"""

import sys

from memcomp.trainers.distributed import run_cli
from memcomp.trainers.loop import train


def main(argv=None) -> int:
    return run_cli("python -m memcomp.trainers.cpt", ("cpt1", "cpt2"), argv, train)


if __name__ == "__main__":
    sys.exit(main())
