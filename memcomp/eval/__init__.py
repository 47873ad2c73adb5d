"""memcomp.eval: the evaluation data and scoring of the long-context benchmarks (RULER-HQA, NIAH, a synthetic
multi-hop task) that LycheeMemory, MemAgent and the full-context baseline are measured on.

- ``scoring``: answer normalisation, exact match, MemAgent's sub-string exact match (``sub_em``), answer
  extraction (``\\boxed{}``, else after "Answer:", else the last 20 words) and Wilson intervals for accuracies.
  The normalisation and ``\\boxed{}`` parsing are ``memcomp.rl.rewards``' (one rule for rewards and metrics).
- ``documents``: the "Document i:" context format shared by the tasks, and the cutting of a tokenised context
  into B-token blocks labelled related / unrelated (the gate's training labels).
- ``ruler_hqa``: RULER-HQA built from a HotpotQA dev-distractor file, as MemAgent builds it.
- ``niah``: needle in a haystack at depths x lengths (seed 002's needle and question).
- ``synthetic``: an invented-entity multi-hop task with gold evidence labels and ideal working-memory traces.

Pure Python (no torch); a tokenizer is passed in where lengths are counted in tokens (a Hugging Face fast
tokenizer: offsets are needed to map tokens to characters). Nothing here downloads data: the HotpotQA file and
the haystack are the user's.
"""
