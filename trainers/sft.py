"""Instruction tuning (seed 002, section 3.3.2): QA samples in ChatML, the projection frozen, encoder and
decoder trained; usually continues from a CPT checkpoint (``compressor.init_from=``). Stage ``reasoner``: the
LycheeMemory reasoner's SFT on ideal working-memory traces (``memcomp.lychee.traces``, mixture ``reasoner``).

    python -m memcomp.trainers.sft --recipe tiny_cpu init_from=runs/demo/cpt/compressor
    python -m memcomp.trainers.sft --recipe tiny_cpu --stage reasoner init_from=runs/demo/cpt/compressor
    deepspeed --num_gpus 8 -m memcomp.trainers.sft --recipe qwen2.5-7b init_from=... data.qa_file=qa.jsonl
"""

import sys

from memcomp.trainers.distributed import run_cli
from memcomp.trainers.loop import train


def main(argv=None) -> int:
    return run_cli("python -m memcomp.trainers.sft", ("sft", "reasoner"), argv, train)


if __name__ == "__main__":
    sys.exit(main())
