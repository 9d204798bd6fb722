"""INT8 / INT4 bases (``basis_bits``): captured gradient energy and the effect on training loss.

Two parts (``--parts``, default both):

* ``energy``: for matrices with LLaMA-like gradient spectra, the energy ‖PᵀG‖²/‖G‖² (‖G Pᵀ‖² for a right
  basis) that the exact top-r basis P captures, and that its INT8 / INT4 storage P̂ (the dequantized basis the
  GEMMs use) captures. Also ‖P̂ᵀP̂ − I‖_max, and the energy of the subspace P̂ spans (orthonormalised), which
  separates "the subspace moved" from "the basis is no longer an isometry". Matrices: (a) the decoder-block
  gradients of a small byte-level LLaMA trained with AdamW on the Python standard library's source
  (``--record-steps``), (b) synthetic G = U diag(σ) Vᵀ at LLaMA block shapes (``--models``, GaLore's
  ranks) with Haar-random U, V and σ the mean normalised spectrum of the recorded gradients (and power
  laws σ_i = i^-α, ``--alphas``); their exact basis is known (rows of Vᵀ / columns of U), no SVD needed.
* ``training``: ``benchmarks/quality.py``'s small LLaMA trained with GaLoreAdamW and with its basis stored
  INT8 and INT4 (same steps, same batches, in lockstep), for each of ``--seeds``; final validation loss.

    PYTHONPATH=. python benchmarks/quantized_bases.py --threads 2 [--parts energy training] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import time
import types
from pathlib import Path

import torch

import quality
from common import LLAMA, byte_llama, cpu_name, stdlib_bytes
from gradproj.projectors import quantized as Q

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}


# ------------------------------------------------------------------------------------------ energy
def energies(G: torch.Tensor, P: torch.Tensor, side: str, bits_list=(8, 4)) -> dict:
    """Captured energy of the exact basis P (float32) and of its quantized storage, as fractions of ‖G‖²."""
    Gd = G.double()
    total = Gd.square().sum().item()

    def captured(B):
        B = B.double()
        return ((Gd @ B.t()) if side == "right" else (B.t() @ Gd)).square().sum().item() / total

    def orth(B):  # an orthonormal basis of the same subspace
        B = B.double()
        return torch.linalg.qr(B.t())[0].t() if side == "right" else torch.linalg.qr(B)[0]

    out = {"exact": captured(P)}
    r = min(P.shape)
    for bits in bits_list:
        codes, scales = Q.quantize(P, bits)
        Ph = Q.dequantize(codes, scales, tuple(P.shape))
        gram = Ph.double() @ Ph.double().t() if side == "right" else Ph.double().t() @ Ph.double()
        out[f"int{bits}"] = captured(Ph)
        out[f"int{bits}_span"] = captured(orth(Ph))
        out[f"int{bits}_orth_err"] = (gram - torch.eye(r, dtype=torch.float64)).abs().max().item()
        out[f"int{bits}_rel_entry_err"] = ((Ph - P).norm() / P.norm()).item()
    return out


def record_gradients(args, data):
    """The decoder-block Linear gradients of a small LLaMA trained with AdamW, at ``args.record_steps``."""
    model = byte_llama(args.rec_hidden, args.rec_intermediate, args.rec_layers, 4, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    records = []
    for step in range(max(args.record_steps) + 1):
        starts = torch.randint(0, len(data) - args.seq - 1, (8,), generator=g)
        x = torch.stack([data[s : s + args.seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        if step in args.record_steps:
            records += [p.grad.detach().clone() for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]
        opt.step()
    return records


def side_of(m, n):
    return "right" if m >= n else "left"  # proj_type="std"


def exact_basis(G, r):
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    return Vh[:r].contiguous() if side_of(*G.shape) == "right" else U[:, :r].contiguous()


def resample(profile: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.linspace(0, 1, len(profile), dtype=torch.float64)
    xi = torch.linspace(0, 1, k, dtype=torch.float64)
    idx = torch.searchsorted(x, xi).clamp(1, len(x) - 1)
    w = (xi - x[idx - 1]) / (x[idx] - x[idx - 1])
    lp = profile.double().clamp_min(1e-12).log()
    return torch.exp(lp[idx - 1] * (1 - w) + lp[idx] * w)


def synthetic(m, n, s, r, seed):
    """G = U diag(s) Vᵀ with Haar-random U, V; returns G and its exact top-r basis for the std side."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    G = (U * s.float()) @ V.t()
    P = V[:, :r].t().contiguous() if side_of(m, n) == "right" else U[:, :r].contiguous()
    return G, P


def mean_rows(rows):
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    return {k: statistics.fmean(r[k] for r in rows) for k in keys} | {"min_int4_ratio": min(r["int4"] / r["exact"] for r in rows)}


def energy_part(args, data):
    records = record_gradients(args, data)
    recorded = {}
    for r in args.rec_ranks:
        recorded[r] = mean_rows([energies(G, exact_basis(G, r), side_of(*G.shape)) for G in records])
    profiles = []
    for G in records:
        s = torch.linalg.svdvals(G.double())
        profiles.append(s / s[0])
    k = max(len(p) for p in profiles)
    profile = torch.stack([resample(p, k) for p in profiles]).mean(0)
    spectra = {"recorded": None, **{f"power {a:g}": a for a in args.alphas}}
    synth = []
    for model in args.models:
        h, i, _, _ = LLAMA[model]
        r = RANKS[model]
        for label, alpha in spectra.items():
            rows = []
            for si, (m, n) in enumerate([(h, h), (i, h), (h, i)]):
                kk = min(m, n)
                s = resample(profile, kk) if alpha is None else torch.arange(1, kk + 1, dtype=torch.float64) ** -alpha
                G, P = synthetic(m, n, s, r, seed=si)
                rows.append(energies(G, P, side_of(m, n)))
            synth.append({"model": model, "rank": r, "spectrum": label, **mean_rows(rows)})
    return {"recorded": recorded, "recorded_matrices": len(records), "synthetic": synth}


# ---------------------------------------------------------------------------------------- training
def training_part(args):
    out = []
    for seed in args.seeds:
        qargs = types.SimpleNamespace(
            steps=args.steps, batch=8, seq=args.train_seq, hidden=128, intermediate=352, layers=args.train_layers, heads=4,
            rank=32, gap=args.gap,
            scale=0.25, optimizers=["GaLoreAdamW", "GaLoreAdamW-int8", "GaLoreAdamW-int4"], lr_adamw=3e-3,
            lr_galore=1e-2, lr_frugal=3e-3, warmup=0.1, min_lr=0.1, eval_every=args.steps, eval_batches=8,
            data_bytes=4_000_000, seed=seed,
        )
        res = quality.run(qargs)
        out.append({"seed": seed, **{r["optimizer"]: {"val_loss": r["val_loss"], "train_loss": r["train_loss"],
                                                         "state_bytes": r["state_bytes"]} for r in res["rows"]}})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["energy", "training"], choices=["energy", "training"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=["llama_130m", "llama_350m"], choices=list(RANKS))
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.5, 1.0])
    ap.add_argument("--record-steps", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--rec-ranks", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--rec-hidden", type=int, default=128)
    ap.add_argument("--rec-intermediate", type=int, default=352)
    ap.add_argument("--rec-layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-layers", type=int, default=4, help="decoder layers of quality.py's LLaMA (its default 4)")
    ap.add_argument("--train-seq", type=int, default=128, help="sequence length (quality.py's default 128)")
    ap.add_argument("--gap", type=int, default=50)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    if "energy" in args.parts:
        e = result["energy"] = energy_part(args, stdlib_bytes(2_000_000))
        print(f"### Captured energy, {e['recorded_matrices']} recorded gradients of a {args.rec_layers}-layer byte LLaMA\n")
        print("| rank | exact | INT8 | INT4 | INT4 span | INT8 / INT4 max |P̂ᵀP̂−I| | INT4 worst ratio |")
        print("|---|---|---|---|---|---|---|")
        for r, row in e["recorded"].items():
            print(f"| {r} | {row['exact']:.4f} | {row['int8']:.4f} | {row['int4']:.4f} | {row['int4_span']:.4f} "
                  f"| {row['int8_orth_err']:.4f} / {row['int4_orth_err']:.3f} | {row['min_int4_ratio']:.4f} |")
        print("\n### Captured energy, synthetic G at LLaMA block shapes (mean of q/k/v/o, gate/up, down)\n")
        print("| model (rank) | spectrum | exact | INT8 | INT4 | INT4 span | INT8 / INT4 max |P̂ᵀP̂−I| |")
        print("|---|---|---|---|---|---|---|")
        for row in e["synthetic"]:
            print(f"| {row['model']} ({row['rank']}) | {row['spectrum']} | {row['exact']:.4f} | {row['int8']:.4f} "
                  f"| {row['int4']:.4f} | {row['int4_span']:.4f} | {row['int8_orth_err']:.4f} / {row['int4_orth_err']:.3f} |")
    if "training" in args.parts:
        t = result["training"] = training_part(args)
        names = ["GaLoreAdamW", "GaLoreAdamW-int8", "GaLoreAdamW-int4"]
        print(f"\n### Training: quality.py's LLaMA (hidden 128, {args.train_layers} layers, rank 32), {args.steps} steps "
              f"x 8 x {args.train_seq} tokens, gap {args.gap}, seeds {args.seeds}\n")
        print("| basis | " + " | ".join(f"val loss seed {r['seed']}" for r in t) + " | mean | mean − fp32's | state |")
        print("|---|" + "---|" * (len(t) + 3))
        base = statistics.fmean(r["GaLoreAdamW"]["val_loss"] for r in t)
        for n in names:
            vals = [r[n]["val_loss"] for r in t]
            print(f"| {n} | " + " | ".join(f"{v:.4f}" for v in vals)
                  + f" | {statistics.fmean(vals):.4f} | {statistics.fmean(vals) - base:+.4f} "
                  f"| {t[0][n]['state_bytes'] / 2**10:.0f} KiB |")
    result["seconds"] = time.perf_counter() - t0
    print(f"\nCPU: {result['cpu']}, {result['threads']} threads, torch {result['torch']}; {result['seconds'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
