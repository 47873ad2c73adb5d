"""The trainers' configuration: nested frozen dataclasses, ``key=value`` overrides, the command line.

A trainer's config is made of sections, each handed to the one component that reads it: ``compressor``
(which model and how it compresses: ``trainers.build.build_compressor``), ``fqlora`` (the FQLoRA adapters),
``optim`` (optimizer, schedule, step size: ``build_optimizer`` and the loop), ``data`` (files, task mixture,
prompt format: ``build_stream``), ``run`` (seed, device, output folder, checkpoints, DeepSpeed) and, for DAPO,
``rl`` (rollouts, rewards, the DAPO objective). ``TrainConfig`` (CPT / SFT) and ``DAPOConfig`` hold them.

Overrides are ``section.key=value`` (``optim.lr_full=1e-4``, ``compressor.chunk_size=8``,
``fqlora.rank=16``); a key that names exactly one field of any section may be given without its section
(``steps=3`` is ``optim.steps=3``). Values are JSON (``true``, ``1e-4``, ``"a b"``), else plain strings; an
unknown key, an ambiguous short key or a value of the wrong type raises ``ValueError`` naming the choices.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Union

from memcomp.config import PROJECTION_INITS, CompressorConfig
from memcomp.data import MIXTURES

STAGES = ("cpt1", "cpt2", "sft", "reasoner")  # "reasoner": LycheeMemory's reasoner SFT (memcomp.lychee.traces)


@dataclass(frozen=True)
class CompressorSettings:
    """Which model, and how it compresses. ``model_dir``: a registered model name, HF folder or GGUF
    (``memcomp.models``); "" builds the tiny demo model (``tiny_*``, with the tokenizer in ``tokenizer_dir``).
    ``init_from``: a saved ``MemoryCompressor`` to continue from (SFT after CPT, DAPO after SFT)."""

    model_dir: str = ""
    init_from: str = ""
    tokenizer_dir: str = ""
    tiny_hidden: int = 256
    tiny_layers: int = 4
    tiny_vocab: int = 2048
    chunk_size: int = 16
    wrapper: str = "per_embedding"
    projection_init: str = CompressorConfig.projection_init  # where the projection starts (memcomp.projection)
    freeze_projection: bool = False
    activation_checkpointing: bool = False  # recompute decoder layers in backward (packed-safe; the 7B/32B recipes)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"compressor.chunk_size must be >= 1, got {self.chunk_size}")
        if self.wrapper not in ("per_embedding", "per_block"):
            raise ValueError(f"compressor.wrapper must be per_embedding or per_block, got {self.wrapper!r}")
        if self.projection_init not in PROJECTION_INITS:
            raise ValueError(f"compressor.projection_init must be one of {', '.join(PROJECTION_INITS)}, "
                             f"got {self.projection_init!r}")
        if min(self.tiny_hidden, self.tiny_layers, self.tiny_vocab) < 1:
            raise ValueError("compressor.tiny_hidden, tiny_layers and tiny_vocab must be >= 1")


@dataclass(frozen=True)
class FQLoRASettings:
    """FQLoRA (``memcomp.fqlora``): full fine-tuning of every ~third layer, NF4 QLoRA on the rest."""

    enabled: bool = True
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"fqlora needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got {self.rank}, "
                             f"{self.alpha}, {self.dropout}")


@dataclass(frozen=True)
class OptimSettings:
    """AdamW (betas 0.9 / 0.95) with one group per parameter kind, cosine schedule with linear warm-up, gradient
    clipping; ``steps`` optimizer steps of ``samples_per_step`` samples packed into rows of ``max_tokens``."""

    steps: int = 1000
    samples_per_step: int = 64
    max_tokens: int = 2048
    lr_lora: float = 1e-4
    lr_full: float = 5e-5
    lr_proj: float = 3e-4
    wd_lora: float = 0.0
    wd_full: float = 0.1
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.samples_per_step < 1 or self.max_tokens < 1:
            raise ValueError("optim.steps, samples_per_step and max_tokens must be >= 1")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if min(self.lr_lora, self.lr_full, self.lr_proj, self.wd_lora, self.wd_full) < 0 or self.max_grad_norm <= 0:
            raise ValueError("optim learning rates and weight decays must be >= 0 and max_grad_norm > 0")


@dataclass(frozen=True)
class DataSettings:
    """JSONL data, read streaming: ``{"text"}`` documents, ``{"context", "question", "answer"}`` QA (DAPO:
    ``"answers"``, a list), ``{"text", "summary"}``, reasoner traces (``memcomp.lychee.traces``). ``mixture``: a
    task mixture other than the stage's (``memcomp.data.MIXTURES``)."""

    mixture: str = ""
    prompt_format: str = "flat"
    instructions: str = "all"       # instruction pools: "all" lengths (the paper) or "short" only
    text_file: str = ""
    qa_file: str = ""
    summary_file: str = ""
    val_text_file: str = ""
    val_qa_file: str = ""
    trace_file: str = ""            # reasoner SFT records (memcomp.lychee.traces; mixture "reasoner")
    val_trace_file: str = ""
    doc_tokens: int = 512
    max_bad_fraction: float = 0.01
    eval_samples: int = 32

    def __post_init__(self) -> None:
        if self.mixture and self.mixture not in MIXTURES:
            raise ValueError(f"data.mixture must be one of {', '.join(MIXTURES)}, got {self.mixture!r}")
        if self.prompt_format not in ("flat", "chatml"):
            raise ValueError(f"data.prompt_format must be flat or chatml, got {self.prompt_format!r}")
        if self.instructions not in ("all", "short"):
            raise ValueError(f"data.instructions must be all or short, got {self.instructions!r}")
        if self.doc_tokens < 1 or not 0 <= self.max_bad_fraction <= 1:
            raise ValueError("data.doc_tokens must be >= 1 and max_bad_fraction in [0, 1]")


@dataclass(frozen=True)
class RunSettings:
    """Where and how the run happens: seed, device and dtype, output folder, checkpoints, evaluation, stopping,
    DeepSpeed, CPU threads."""

    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"
    out_dir: str = "runs/train"
    save_every: int = 500
    eval_every: int = 0
    patience: int = 0               # early stopping: evaluations without improvement (0 = off)
    log_every: int = 1
    stop_after: int = 0             # end this invocation after N steps, with a checkpoint (preemptible jobs)
    time_limit_min: float = 0.0     # end training after this many minutes of steps, with a checkpoint (0 = none)
    deepspeed: bool = False
    zero_stage: int = 3
    threads: int = 0                # CPU threads for torch: 0 = choose (memcomp.runtime.choose_threads)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"run.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.time_limit_min < 0:
            raise ValueError(f"run.time_limit_min must be >= 0 (0 = no limit), got {self.time_limit_min}")
        if min(self.save_every, self.eval_every, self.patience, self.stop_after, self.threads) < 0:
            raise ValueError("run.save_every, eval_every, patience, stop_after and threads must be >= 0")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"run.zero_stage must be 1, 2 or 3, got {self.zero_stage}")


@dataclass(frozen=True)
class TrainConfig:
    """A CPT or SFT run: ``stage`` is cpt1 | cpt2 | sft (the paper's stage settings and, by default, its task
    mixture)."""

    recipe: str
    stage: str
    compressor: CompressorSettings = field(default_factory=CompressorSettings)
    fqlora: FQLoRASettings = field(default_factory=FQLoRASettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")


@dataclass(frozen=True)
class RLSettings:
    """DAPO (seed 002 section 3.3.3, Table 10). Each step: ``prompts_per_step`` prompts with ``group_size``
    rollouts each (temperature, top-p, ``max_response_tokens``), rewards (``reward``: "rule" matches the
    ``\\boxed{}`` answer, ``match`` "em" or "sub_em" on SQuAD-normalised answers, or "exact" on the first word of
    an unboxed answer; "judge" asks an OpenAI-compatible endpoint), overlong
    shaping (``overlong_buffer`` tokens before the maximum, ``overlong_factor``), group advantages, dynamic
    sampling (after ``dynamic_warmup_steps``, at most ``max_gen_batches`` generation batches of
    ``gen_prompts`` prompts per step), then ``prompts_per_step / mini_batch_prompts`` clipped-ratio updates
    (``eps_low``, ``eps_high``) against the rollout-time log-probabilities, token-mean over each mini-batch.
    ``memory_dir``: where the precomputed memories live (default ``out_dir/memories``)."""

    group_size: int = 16
    prompts_per_step: int = 128
    mini_batch_prompts: int = 64
    gen_prompts: int = 0            # prompts per generation batch; 0 = prompts_per_step
    max_gen_batches: int = 10
    dynamic_warmup_steps: int = 25
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_tokens: int = 600
    overlong_buffer: int = 100
    overlong_factor: float = 0.5
    eps_low: float = 0.2
    eps_high: float = 0.28
    reward: str = "rule"
    match: str = "sub_em"
    boxed: bool = True
    judge_url: str = ""
    judge_model: str = ""
    engine: str = "hf"
    engine_batch: int = 0           # rows per engine generate call; 0 = all at once
    memory_dir: str = ""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"rl.group_size must be >= 2 (group advantages need two responses), got "
                             f"{self.group_size}")
        if self.prompts_per_step < 1 or self.mini_batch_prompts < 1 or self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(f"rl.prompts_per_step ({self.prompts_per_step}) must be a positive multiple of "
                             f"rl.mini_batch_prompts ({self.mini_batch_prompts})")
        if self.gen_prompts < 0 or self.max_gen_batches < 1 or self.dynamic_warmup_steps < 0:
            raise ValueError("rl.gen_prompts >= 0, rl.max_gen_batches >= 1 and rl.dynamic_warmup_steps >= 0 needed")
        if self.max_response_tokens < 1 or not 1 <= self.overlong_buffer <= self.max_response_tokens:
            raise ValueError(f"rl.max_response_tokens must be >= 1 and 1 <= overlong_buffer <= it, got "
                             f"{self.max_response_tokens}, {self.overlong_buffer}")
        if self.overlong_factor < 0 or not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError("rl.overlong_factor >= 0, 0 <= rl.eps_low < 1 and rl.eps_high >= 0 needed")
        if self.reward not in ("rule", "judge"):
            raise ValueError(f"rl.reward must be rule or judge, got {self.reward!r}")
        if self.match not in ("em", "sub_em", "exact"):
            raise ValueError(f"rl.match must be em, sub_em or exact, got {self.match!r}")
        if self.match == "exact" and (self.boxed or self.reward != "rule"):
            raise ValueError("rl.match=exact (the first word verbatim) is for unboxed rule rewards: set rl.boxed=false")
        if self.reward == "judge" and not (self.judge_url and self.judge_model):
            raise ValueError("rl.reward=judge needs rl.judge_url (an OpenAI-compatible endpoint) and rl.judge_model")
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rl.engine must be hf (HF generate) or vllm (memcomp.serving.VLLMEngine), got "
                             f"{self.engine!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.engine_batch < 0:
            raise ValueError("rl.temperature > 0, 0 < rl.top_p <= 1 and rl.engine_batch >= 0 needed")


@dataclass(frozen=True)
class DAPOConfig:
    """A DAPO run: the decoder (FQLoRA or full) trained from a SFT compressor (``compressor.init_from``) on
    memory-conditioned rollouts. ``data.qa_file`` / ``data.val_qa_file`` hold the QA records;
    ``optim.steps`` counts train batches."""

    recipe: str
    stage: str = "dapo"
    compressor: CompressorSettings = field(default_factory=CompressorSettings)
    fqlora: FQLoRASettings = field(default_factory=FQLoRASettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    run: RunSettings = field(default_factory=RunSettings)
    rl: RLSettings = field(default_factory=RLSettings)

    def __post_init__(self) -> None:
        if self.stage != "dapo":
            raise ValueError(f"DAPOConfig.stage must be dapo, got {self.stage!r}")


AnyConfig = Union[TrainConfig, DAPOConfig]


# --------------------------------------------------------------------------------------------------
# key=value overrides
# --------------------------------------------------------------------------------------------------

def option_keys(cfg: Any) -> dict[str, Any]:
    """Every settable option of a config as ``{"section.key": current value}`` (top-level ``recipe`` and
    ``stage`` are chosen on the command line, not overridden)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
    return out


def resolve_key(cfg: Any, key: str) -> str:
    """The dotted key ``key`` names: itself when dotted and known, else the one section field of that name.
    Raises ``ValueError`` for an unknown key (listing the known ones) or a short key two sections share."""
    keys = option_keys(cfg)
    if key in keys:
        return key
    matches = [k for k in keys if "." not in key and k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(f"option {key!r} is ambiguous: {', '.join(matches)}")
    import difflib

    close = difflib.get_close_matches(key, [*keys, *{k.split(".", 1)[-1] for k in keys}], n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"unknown option {key!r}{hint} Known: {', '.join(sorted(keys))}")


def _parse(key: str, raw: str, current: Any) -> Any:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    kind = type(current)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and not isinstance(value, str):
        value = raw  # a path or name that happens to parse as JSON (e.g. out_dir=2024) stays a string
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"option {key} expects {kind.__name__}, got {raw!r}")
    return value


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """``cfg`` with ``key=value`` overrides applied (see the module docstring); the sections re-validate."""
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        dotted = resolve_key(cfg, key)
        section, name = dotted.split(".", 1)
        changes.setdefault(section, {})[name] = _parse(dotted, raw, getattr(getattr(cfg, section), name))
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **c) for s, c in changes.items()})


def options_help(cfg_type: type, cfg: Any = None, recipe_name: str = "", recipes: bool = True) -> str:
    """The ``key=value`` options of a config type: with ``cfg`` (a recipe's config), the values that recipe
    runs with; else the types' defaults (a recipe sets many of them; ``recipes=False`` for a command without
    recipes)."""
    where = (f"the values of --recipe {recipe_name}" if cfg is not None
             else "the defaults; the recipe's values replace them (add --recipe R to --help to see them)" if recipes
             else "their defaults")
    lines = [f"options (section.key=value, or key=value where the key is unique), with {where}:"]
    for f in dataclasses.fields(cfg_type):
        if f.default_factory is dataclasses.MISSING:
            continue
        section = getattr(cfg, f.name) if cfg is not None else f.default_factory()
        lines.append(f"  {f.name}:")
        for g in dataclasses.fields(section):
            lines.append(f"    {f.name}.{g.name}={getattr(section, g.name)!r}".replace("'", ""))
    return "\n".join(lines)


def config_from_cli(prog: str, stages: tuple[str, ...], argv: list[str] | None = None) -> Any:
    """``prog [--recipe R] [--stage S] [key=value ...]`` -> the recipe's config with the overrides. ``--help``
    lists the recipes, stages and every option."""
    import argparse

    from memcomp.trainers.recipes import RECIPES, recipe

    cfg_type = DAPOConfig if stages == ("dapo",) else TrainConfig
    names = [n for n, r in RECIPES.items() if set(stages) & set(r.stages)]
    # With --recipe (and --stage) before --help, the help shows that recipe's values.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--stage", default=stages[0])
    known, _ = pre.parse_known_args(argv)
    shown = None
    if known.recipe in names and known.stage in stages:
        try:
            shown = recipe(known.recipe, known.stage)
        except (ValueError, KeyError):
            shown = None
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=options_help(cfg_type, shown, known.recipe or ""))
    p.add_argument("--recipe", default="tiny_cpu", choices=names, help="default tiny_cpu")
    p.add_argument("--stage", default=stages[0], choices=stages, help=f"default {stages[0]}")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any option below (JSON values, else strings)")
    args = p.parse_args(argv)
    return apply_overrides(recipe(args.recipe, args.stage), args.overrides)
