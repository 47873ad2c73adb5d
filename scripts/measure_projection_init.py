"""Which projection initialisation should an untrained compressor on a real LLM start from?

For each candidate on SmolLM2-135M-Instruct at 4x (4-token chunks) -- the ``CompressorConfig.projection_init``
options, plus two that need statistics and so are not config options: ``moment`` (per-dimension moment matching
of the pooled encoder outputs to the embedding table, statistics from chunks of random token ids) and ``lstsq`` (a
ridge least-squares map from pooled outputs to the mean input embedding of the chunk's tokens, fitted on text):

- the norm of the memory embeddings against the norm of the input embeddings of the same text;
- held-out reconstruction loss (nats per target token, teacher-forced: "Restore the text held in memory." then
  the passage) with the passage's own memory, with another passage's memory (the control), and with no
  memory at all (the LM alone, the same for every candidate), at step 0 and after ``--steps`` steps of
  projection-only training (the LM frozen, AdamW, ``--batch`` training passages per step);
- the greedy reconstruction of one held-out passage at step 0.

The encoder's pooled, final-normed hidden states are computed once (the LM is frozen and the projection comes
after them), so each step is one decoder forward and backward. The defaults reproduce the README's table; on one
core (``OMP_NUM_THREADS=1``, on a shared machine) they take ~5 minutes.

    OMP_NUM_THREADS=1 python scripts/measure_projection_init.py [--seed 1 --candidates normal,scaled_normal]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def passages(tok, split: str, n: int, n_tokens: int, skip: int = 0) -> list[list[int]]:
    from memcomp.demo.corpus import stdlib_passages

    out = []
    for text in stdlib_passages()[split]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            out.append(ids[:n_tokens])
    if len(out) < skip + n:
        raise RuntimeError(f"only {len(out)} {split} passages of {n_tokens} tokens")
    return out[skip:skip + n]


def pooled(comp, docs: list[list[int]]) -> list[torch.Tensor]:
    """mean(RMSNorm(h)) per chunk, [n_chunks, d] per passage: the encoder output before the projection."""
    proj = comp.projection
    saved = proj.weight.detach().clone(), proj.bias.detach().clone()
    with torch.no_grad():
        proj.weight.copy_(torch.eye(comp.hidden_size))
        proj.bias.zero_()
        out = [p.detach() for p in comp.encode_chunks([torch.tensor(d) for d in docs])]
        proj.weight.copy_(saved[0])
        proj.bias.copy_(saved[1])
    return out


def lstsq_map(comp, pooled_cal: list[torch.Tensor], docs_cal: list[list[int]], ridge: float) -> tuple:
    """W, b minimising ||P W^T + b - mean input embedding of the chunk's tokens||^2 + ridge ||W||^2."""
    C = comp.config.chunk_size
    emb = comp.model.get_input_embeddings().weight.detach()
    P = torch.cat(pooled_cal).double()
    T = torch.cat([emb[torch.tensor(d)].reshape(-1, C, emb.shape[1]).mean(1) for d in docs_cal]).double()
    mu_p, mu_t = P.mean(0), T.mean(0)
    Pc, Tc = P - mu_p, T - mu_t
    A = Pc.T @ Pc + ridge * torch.eye(P.shape[1], dtype=torch.float64)
    W = torch.linalg.solve(A, Pc.T @ Tc).T  # [d_out, d_in]
    b = mu_t - W @ mu_p
    return W.float(), b.float()


def moment_map(comp, pooled_ref: list[torch.Tensor]) -> tuple:
    """Per-dimension moment matching: W = diag(sd_E / sd_P), b = mean_E - W mean_P, with the embedding table's
    per-dimension mean and std (E) and those of pooled encoder outputs (P) of the given chunks."""
    emb = comp.model.get_input_embeddings().weight.detach().float()
    P = torch.cat(pooled_ref).float()
    scale = emb.std(0) / P.std(0)
    return torch.diag(scale), emb.mean(0) - scale * P.mean(0)


def recon_loss(comp, mems: list[torch.Tensor], docs: list[list[int]], after: list[int], grad: bool = False):
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        out = comp(instructions=[after] * len(docs), targets=docs, memories=mems, append_eos=False)
    return out.loss


def main() -> None:
    from memcomp import CompressorConfig, MemoryCompressor
    from memcomp.models import load_pretrained
    from memcomp.projection import embedding_scale, init_projection
    from memcomp.tasks import INSTRUCTIONS, SampleBuilder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=32)
    ap.add_argument("--train", type=int, default=8, help="training passages")
    ap.add_argument("--eval", type=int, default=8, help="held-out passages")
    ap.add_argument("--calibration", type=int, default=96, help="passages for the least-squares fit")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="random inits and the random chunks moment matching uses")
    ap.add_argument("--candidates", default="identity,scaled_identity,normal,scaled_normal,moment,lstsq")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(0)
    model, tok = load_pretrained(args.model)
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=args.chunk_size))
    comp.model.requires_grad_(False)
    _, after = SampleBuilder(tok, "flat", chunk_size=args.chunk_size).prompt(INSTRUCTIONS["reconstruction"][0])
    train = passages(tok, "train", args.train, args.doc_tokens)
    cal = passages(tok, "train", args.calibration, args.doc_tokens, skip=args.train)
    held = passages(tok, "heldout", args.eval, args.doc_tokens)
    p_train, p_held, p_cal = pooled(comp, train), pooled(comp, held), pooled(comp, cal)
    # Text-free statistics for moment matching: chunks of uniformly random token ids (fixed seed).
    gen = torch.Generator().manual_seed(args.seed)
    vocab = comp.model.get_input_embeddings().weight.shape[0]
    p_rand = pooled(comp, [torch.randint(0, vocab, (args.chunk_size * 16,), generator=gen).tolist()
                           for _ in range(4)])
    emb = comp.model.get_input_embeddings().weight.detach()
    emb_norm = float(emb[torch.tensor(held)].norm(dim=-1).mean())
    no_memory = float(recon_loss(comp, [torch.zeros(0, comp.hidden_size)] * len(held), held, after))
    P = torch.cat(p_cal)
    mean = P.mean(0)
    shared = float(mean.norm() / P.norm(dim=-1).mean())
    scale = embedding_scale(comp.model)
    nearest = [tok.decode([i]) for i in (scale * mean @ emb[: len(tok) - 2].T).topk(3).indices.tolist()]
    norm_w = comp.base.norm.weight.detach()
    print(f"{args.model}, {args.chunk_size}x, {args.doc_tokens}-token passages: input-embedding norm {emb_norm:.2f} "
          f"(table rows {float(emb.norm(dim=-1).mean()):.2f}), pooled final-norm output norm "
          f"{float(torch.cat(p_held).norm(dim=-1).mean()):.2f} (RMS(norm weight) * sqrt(d) = "
          f"{float(norm_w.pow(2).mean().sqrt()) * comp.hidden_size ** 0.5:.2f}), s = {scale:.4f}; "
          f"|mean| / mean norm of the pooled vectors {shared:.2f}, tokens nearest s * mean {nearest}; "
          f"reconstruction loss without memory {no_memory:.3f} (set-up {time.time() - t_start:.0f} s)")

    results = {}
    for kind in args.candidates.split(","):
        t0 = time.time()
        torch.manual_seed(args.seed)
        if kind in ("lstsq", "moment"):
            W, b = lstsq_map(comp, p_cal, cal, args.ridge) if kind == "lstsq" else moment_map(comp, p_rand)
            with torch.no_grad():
                comp.projection.weight.copy_(W)
                comp.projection.bias.copy_(b)
        else:
            init_projection(comp.projection, comp.model, kind)
        proj = comp.projection

        def mems(ps, proj=proj):
            return [proj(p) for p in ps]

        rec = {"memory_norm": float(torch.cat(mems(p_held)).detach().norm(dim=-1).mean())}
        rotated = p_held[1:] + p_held[:1]
        rec["step0"] = float(recon_loss(comp, mems(p_held), held, after))
        rec["step0_control"] = float(recon_loss(comp, mems(rotated), held, after))
        with torch.no_grad():
            gen = comp.generate(mems(p_held[:1]), [after], max_new_tokens=24)[0]
        rec["step0_greedy"] = gen
        opt = torch.optim.AdamW(proj.parameters(), lr=args.lr, weight_decay=0.0)
        train_losses = []
        for step in range(args.steps):
            idx = [(step * args.batch + j) % len(train) for j in range(args.batch)]
            loss = recon_loss(comp, mems([p_train[i] for i in idx]), [train[i] for i in idx], after, grad=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_losses.append(float(loss.detach()))
        rec["train_first"], rec["train_last"] = train_losses[0], sum(train_losses[-5:]) / min(5, len(train_losses))
        rec["trained"] = float(recon_loss(comp, mems(p_held), held, after))
        rec["trained_control"] = float(recon_loss(comp, mems(rotated), held, after))
        rec["seconds"] = time.time() - t0
        results[kind] = rec
        print(f"{kind:>16}: |m| {rec['memory_norm']:6.2f}  step 0: {rec['step0']:.3f} (control "
              f"{rec['step0_control']:.3f})  after {args.steps}: {rec['trained']:.3f} (control "
              f"{rec['trained_control']:.3f})  train {rec['train_first']:.3f} -> {rec['train_last']:.3f}  "
              f"[{rec['seconds']:.0f} s]  greedy@0: {gen[:60]!r}", flush=True)
    summary = {"args": vars(args), "input_embedding_norm": emb_norm, "no_memory_loss": no_memory,
               "shared_fraction": shared, "scale": scale, "nearest_tokens_to_shared": nearest,
               "results": results, "total_seconds": time.time() - t_start,
               "threads": torch.get_num_threads(), "nats_to_ppl": {k: math.exp(v["trained"])
                                                                    for k, v in results.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
