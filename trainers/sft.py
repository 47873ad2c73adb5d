"""Instruction tuning (seed 002, section 3.3.2): QA samples in ChatML, the projection frozen, encoder and
decoder trained; usually continues from a CPT checkpoint (``init_from=``).

    python -m memcomp.trainers.sft --recipe tiny_cpu init_from=runs/demo/cpt/compressor
    deepspeed --num_gpus 8 -m memcomp.trainers.sft --recipe qwen2.5-7b init_from=... qa_file=qa.jsonl
"""

import sys

from memcomp.trainers.common import config_from_cli, train


def main(argv=None) -> int:
    train(config_from_cli("sft", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
