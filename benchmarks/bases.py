"""Subspace bases compared: refresh cost, captured gradient energy, training quality.

Three parts (``--parts``, default all):

* ``refresh``: the cost of one refresh step (new basis + R = down(G)) for each basis on the decoder-block
  weight shapes of LLaMA configurations (default llama_1b at rank 512 and llama_7b at rank 1024, GaLore's
  recipes), with the energy each basis captures relative to the exact top-r subspace. The test matrices
  have exactly known singular values: ``--spectrum recorded`` (default) transplants the mean normalised
  spectrum of gradients recorded from a small LLaMA (part ``energy``), ``--spectrum power:A`` uses
  σ_i = i^-A. A stress table at one shape (``--stress-shape``) adds slowly decaying power laws.
* ``energy``: gradients recorded from a small LlamaForCausalLM trained with AdamW on the Python standard
  library's source (byte level, no download); the energy each basis captures relative to the exact top-r
  subspace, per recorded step (randomized SVD also warm-started from its basis at the previous record).
* ``training``: the same small LLaMA trained with GaLoreAdamW and each basis (and moment rule) for the
  same steps on the same batches; held-out loss at the end.
* ``warm``: one warm ``randomized_svd`` refresh (the default basis's regular refresh, q = 1) per decoder-block
  shape of ``--warm-models`` at rank hidden/4, as ``RandomizedSVDProjector`` calls it: with its power iteration's
  G Z in float32 and in the dtype ``proj_dtype="auto"`` chose for the matrix (decided by timing, as in training),
  side by side in rotated rounds with ``--baseline REF``'s ``randomized_svd`` (the function at that git commit),
  process CPU time; and the energy each captures relative to the exact top-r subspace.

    PYTHONPATH=. python benchmarks/bases.py [--parts refresh energy training warm] [--device cuda]
        [--models llama_1b llama_7b] [--steps 150] [--json out.json] [--plot docs/bases_training.png]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import time

import torch
from tqdm import tqdm

import gradproj
from common import LLAMA, byte_llama, machine, median_time, stdlib_bytes, sync
from gradproj.projectors import get_projector, randomized_svd
from gradproj.projectors.base import AUTO_CHOICES, AUTO_KEY
from refresh_stall import EighFP32Projector, baseline_randomized_svd  # noqa: F401  (registers "eigh_fp32")

#: GaLore's ranks for the large configurations
RANKS = {"llama_1b": 512, "llama_7b": 1024}

#: (label, projector, group options, warm): the bases of the refresh table
REFRESH_BASES = [
    ("svd (exact)", "svd", {}, False),
    ("eigh (Gram)", "eigh", {}, False),
    ("eigh (Gram, float32 eigensolver)", "eigh_fp32", {}, False),
    ("randomized_svd q=1", "randomized_svd", {"rsvd_power_iters": 1}, False),
    ("randomized_svd q=1 warm", "randomized_svd", {"rsvd_power_iters": 1}, True),
    ("randomized_svd q=2", "randomized_svd", {"rsvd_power_iters": 2}, False),
    ("dct (matmul)", "dct", {"dct_impl": "matmul"}, False),
    ("dct (fft)", "dct", {"dct_impl": "fft"}, False),
    ("random gaussian", "random", {"random_kind": "gaussian"}, False),
    ("random orthonormal", "random", {"random_kind": "orthonormal"}, False),
]


# ------------------------------------------------------------------------------------------------ data
def batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + seq] for s in starts]).to(device)


# ---------------------------------------------------------------------------------------- measuring
def captured_energy(G: torch.Tensor, proj, state) -> float:
    R = G.double()
    b = proj.basis_matrices(state)
    if "left" in b:
        R = b["left"].to(R).t() @ R
    if "right" in b:
        R = R @ b["right"].to(R).t()
    return R.square().sum().item()


def exact_energy(G: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(G.double())
    return (s[:r] ** 2).sum().item()


def new_projector(name, shape, rank, options, index=0):
    proj = get_projector(name)(tuple(shape), rank, "std", {"update_proj_gap": 1, **options})
    proj.param_index = index
    return proj


def refresh_once(name, options, G, rank, warm_state=None, step=0):
    proj = new_projector(name, G.shape, rank, options)
    state = copy.deepcopy(warm_state) if warm_state is not None else {}
    proj.refresh(G, state, step)
    R = proj.down(G, state)
    return proj, state, R


def spectrum_matrix(m, n, s, seed, device):
    """m x n float32 matrix with singular values s (length min(m, n)) and Haar-random singular vectors."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g).to(device))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g).to(device))[0]
    return ((U * s.to(device)) @ V.t()).contiguous()


def profile_values(profile: torch.Tensor, k: int) -> torch.Tensor:
    """Resample a normalised spectrum (σ_i / σ_1 over i / len) to k values (log-linear interpolation)."""
    x = torch.linspace(0, 1, len(profile), dtype=torch.float64)
    xi = torch.linspace(0, 1, k, dtype=torch.float64)
    logp = profile.double().clamp_min(1e-12).log()
    idx = torch.searchsorted(x, xi).clamp(1, len(x) - 1)
    w = (xi - x[idx - 1]) / (x[idx] - x[idx - 1])
    return torch.exp(logp[idx - 1] * (1 - w) + logp[idx] * w).float()


def block_shapes(name):
    h, i, _, _ = LLAMA[name]
    return [(h, h), (i, h), (h, i)]


# ------------------------------------------------------------------------------------ part: energy
def record_gradients(args, data):
    """Train a small LLaMA with AdamW; record the block Linear gradients at the steps in args.record_steps."""
    model = byte_llama(args.rec_hidden, args.rec_intermediate, args.rec_layers, 4, args.seed).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    records = {}
    last = max(args.record_steps)
    for step, x in enumerate(tqdm(batches(data, last + 1, args.rec_batch, args.seq, args.seed, args.device),
                                  total=last + 1, desc="record gradients", leave=False)):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        if step in args.record_steps:
            records[step] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.dim() == 2 and ".layers." in n}
        opt.step()
    return records


WARM = "randomized_svd q=1 warm"
#: the warm randomized SVD with its power iteration's G Z in bfloat16 (what a matrix whose proj_dtype="auto" chose
#: bfloat16 gets at a warm refresh: the decision stored in the state)
LOW = "randomized_svd q=1 warm, bfloat16 G Z"
LOW_OPTIONS = {"rsvd_power_iters": 1, "proj_dtype": "auto"}


def energy_part(args, data):
    records = record_gradients(args, data)
    steps = sorted(records)
    bases = [("eigh", "eigh", {}), ("eigh float32 eigensolver", "eigh_fp32", {}),
             ("randomized_svd q=1", "randomized_svd", {"rsvd_power_iters": 1}),
             ("randomized_svd q=2", "randomized_svd", {"rsvd_power_iters": 2}),
             ("dct l1", "dct", {"dct_norm": "l1"}), ("dct l2", "dct", {"dct_norm": "l2"}),
             ("random gaussian", "random", {"random_kind": "gaussian"}),
             ("random orthonormal", "random", {"random_kind": "orthonormal"})]
    ratios = {}
    for rank in args.rec_ranks:
        per_rank = {label: [] for label, _, _ in bases}
        for label in (WARM, LOW):
            per_rank[label] = []
        warm_states = {}
        for step in steps:
            for name, G in records[step].items():
                best = exact_energy(G, rank)
                for label, proj_name, opts in bases:
                    proj, state, _ = refresh_once(proj_name, opts, G, rank, step=step)
                    per_rank[label].append(captured_energy(G, proj, state) / best)
                # warm start from this matrix's basis at the previous record
                prev = warm_states.get(name)
                proj, state, _ = refresh_once("randomized_svd", {"rsvd_power_iters": 1}, G, rank, warm_state=prev, step=step)
                if prev is not None:
                    per_rank[WARM].append(captured_energy(G, proj, state) / best)
                    proj, low_state, _ = refresh_once("randomized_svd", LOW_OPTIONS, G, rank,
                                                      warm_state={**prev, AUTO_KEY: 1}, step=step)
                    per_rank[LOW].append(captured_energy(G, proj, low_state) / best)
                warm_states[name] = state
        ratios[rank] = per_rank
    # the normalised spectrum profile of the recorded gradients (resampled to the longest)
    profiles = []
    for step in steps:
        for G in records[step].values():
            s = torch.linalg.svdvals(G.double())
            profiles.append(s / s[0])
    k = max(len(p) for p in profiles)
    profile = torch.stack([profile_values(p, k) for p in profiles]).mean(0)
    top = {f: sum(((p[: max(1, int(f * len(p)))] ** 2).sum() / (p ** 2).sum()).item() for p in profiles) / len(profiles)
           for f in (1 / 32, 1 / 8, 1 / 4)}
    return {"ranks": args.rec_ranks, "matrices": len(profiles), "steps": steps, "ratios": ratios,
            "profile": profile.tolist(), "top_energy_fraction": top}


# ----------------------------------------------------------------------------------- part: refresh
def refresh_part(args, profile):
    rows = []
    torch.manual_seed(0)
    # warm up the LAPACK / BLAS paths once at a small size so the first timing carries no set-up cost
    small = torch.randn(64, 96, device=args.device)
    for _, name, opts, _ in REFRESH_BASES:
        refresh_once(name, opts, small, 8)
    for model in args.models:
        rank = args.rank or RANKS.get(model, LLAMA[model][0] // 4)
        for si, (m, n) in enumerate(block_shapes(model)):
            k = min(m, n)
            s = profile_values(profile, k) if profile is not None else torch.arange(1, k + 1).float() ** -args.power
            G = spectrum_matrix(m, n, s, seed=si, device=args.device)
            best = (s[:rank].double() ** 2).sum().item()
            # warm-started bases refresh from the basis of a previous, slightly different gradient
            warm_states = {label: refresh_once(name, opts, G * 0.9 + 0.1 * G.roll(1, 0), rank)[1]
                           for label, name, opts, warm in REFRESH_BASES if warm}
            times = {label: [] for label, *_ in REFRESH_BASES}
            for rep in tqdm(range(args.repeats), desc=f"{model} {m}x{n}", leave=False):
                for label, name, opts, warm in REFRESH_BASES:  # interleaved, so load drift hits every basis alike
                    if rep > 0 and name in ("svd", "eigh") and m * n > 4e6:
                        continue  # one timing of the slow exact refreshes at the large shapes
                    t0 = time.perf_counter()
                    refresh_once(name, opts, G, rank, warm_states.get(label), step=1 if warm else 0)
                    sync(args.device)
                    times[label].append(time.perf_counter() - t0)
            for label, name, opts, warm in REFRESH_BASES:
                proj, state, _ = refresh_once(name, opts, G, rank, warm_states.get(label), step=1 if warm else 0)
                rows.append({"model": model, "shape": [m, n], "rank": rank, "basis": label,
                             "seconds": statistics.median(times[label]), "repeats": len(times[label]),
                             "energy": captured_energy(G, proj, state) / best})
                if label == "randomized_svd q=1":
                    cold_rsvd = state
            # a regular (non-refresh) step's projection with a stored basis, for reference
            stored = new_projector("randomized_svd", G.shape, rank, {})
            t_down = median_time(lambda: stored.down(G, cold_rsvd), args.repeats, warmup=1, device=args.device)
            rows.append({"model": model, "shape": [m, n], "rank": rank, "basis": "down(G) with a stored basis",
                         "seconds": t_down, "energy": float("nan")})
            del G
    return rows


def stress_part(args):
    """Energy of randomized SVD on slowly decaying power-law spectra at one shape (values only: no SVD timing)."""
    m, n = args.stress_shape
    rank = args.stress_rank
    out = []
    for a in args.stress_decays:
        k = min(m, n)
        s = torch.arange(1, k + 1).float() ** -a
        G = spectrum_matrix(m, n, s, seed=7, device=args.device)
        best = (s[:rank].double() ** 2).sum().item()
        for q in (1, 2, 3):
            opts = {"rsvd_power_iters": q}
            proj, state, _ = refresh_once("randomized_svd", opts, G, rank)
            cold = captured_energy(G, proj, state) / best
            # warm: refresh on a perturbed gradient first (as the previous refresh), then on G
            Gp = G + 0.3 * spectrum_matrix(m, n, s, seed=8, device=args.device)
            _, prev, _ = refresh_once("randomized_svd", opts, Gp, rank)
            proj, state, _ = refresh_once("randomized_svd", opts, G, rank, warm_state=prev, step=1)
            warm = captured_energy(G, proj, state) / best
            out.append({"decay": a, "q": q, "cold": cold, "warm": warm})
            if q == 1:  # a warm refresh with G Z in bfloat16 (where proj_dtype="auto" chose bfloat16)
                low = {**opts, "proj_dtype": "auto"}
                proj, state, _ = refresh_once("randomized_svd", low, G, rank, warm_state={**prev, AUTO_KEY: 1}, step=1)
                out.append({"decay": a, "q": "randomized_svd q=1, bfloat16 G Z", "cold": float("nan"),
                            "warm": captured_energy(G, proj, state) / best})
        for label, name, opts in [("dct", "dct", {}), ("random", "random", {"random_kind": "orthonormal"})]:
            proj, state, _ = refresh_once(name, opts, G, rank)
            out.append({"decay": a, "q": label, "cold": captured_energy(G, proj, state) / best, "warm": float("nan")})
    return out


# -------------------------------------------------------------------------------------- part: warm
def warm_part(args, profile):
    """Warm randomized SVD refreshes per block shape: the baseline commit, float32 G Z, auto's dtype for G Z."""
    baseline = baseline_randomized_svd(args.baseline) if args.baseline else None
    rows = []
    for model in args.warm_models:
        rank = LLAMA[model][0] // 4
        for si, (m, n) in enumerate(block_shapes(model)):
            k = min(m, n)
            s = profile_values(profile, k) if profile is not None else torch.arange(1, k + 1).float() ** -args.power
            G = spectrum_matrix(m, n, s, seed=si, device=args.device)
            best = (s[:rank].double() ** 2).sum().item()
            # the projector's first refresh, from a different gradient, decides proj_dtype="auto" (by timing) and
            # gives the warm start; the std side decomposes Gᵀ for a wide G (its left basis)
            proj = new_projector("randomized_svd", G.shape, rank, {"proj_dtype": "auto"})
            state: dict = {}
            proj.refresh(G * 0.9 + 0.1 * G.roll(1, 0), state, 0)
            low = AUTO_CHOICES[int(state[AUTO_KEY])]
            A = G.t() if proj.side == "left" else G
            start = (state["proj"] if proj.side == "left" else state["proj"].t()).float()
            gen = lambda: torch.Generator(device=args.device).manual_seed(1)  # noqa: E731
            variants = {"float32 G Z": lambda: randomized_svd(A, rank, generator=gen(), start=start),
                        "auto's G Z": lambda: randomized_svd(A, rank, generator=gen(), start=start, power_dtype=low)}
            if baseline is not None:
                variants = {"baseline": lambda: baseline(A, rank, generator=gen(), start=start), **variants}
            names = list(variants)
            times: dict = {label: [] for label in names}
            for f in variants.values():
                f()  # first-call costs
            for rep in range(args.repeats):
                for label in names[rep % len(names):] + names[: rep % len(names)]:
                    sync(args.device)
                    t0 = time.process_time()
                    variants[label]()
                    sync(args.device)
                    times[label].append(time.process_time() - t0)
            for label in names:
                Vh = variants[label]()[1]
                rows.append({"model": model, "shape": [m, n], "rank": rank, "variant": label,
                             "auto": str(low).replace("torch.", "") if low is not None else "float32",
                             "seconds": statistics.median(times[label]), "repeats": args.repeats,
                             "energy": (A.double() @ Vh.double().t()).square().sum().item() / best})
    return rows


# ---------------------------------------------------------------------------------- part: training
TRAIN_CONFIGS = [  # GaLoreAdamW, rank 32, lr 1e-2, scale 0.25 (the small byte-level LLaMA of common.byte_llama)
    ("svd", {"projector": "svd"}),
    ("eigh", {"projector": "eigh"}),
    ("randomized_svd", {"projector": "randomized_svd"}),
    ("dct", {"projector": "dct"}),
    ("random", {"projector": "random"}),
    ("golore (svd, random after 80 %)", {"projector": "golore"}),
    ("svd, moments reset", {"projector": "svd", "moments_on_refresh": "reset"}),
    ("svd, moments project", {"projector": "svd", "moments_on_refresh": "project"}),
    ("dct, moments project", {"projector": "dct", "moments_on_refresh": "project"}),
    ("random, moments project", {"projector": "random", "moments_on_refresh": "project"}),
]


def training_part(args, data):
    """Every configuration trains the same model from the same init on the same batches, once per seed."""
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val = list(batches(val_data, 4, args.batch, args.seq, 1234, args.device))
    rows, curves = [], {}
    runs = [(label, group, seed) for seed in args.train_seeds for label, group in TRAIN_CONFIGS]
    for label, group, seed in tqdm(runs, desc="training", leave=False):
        model = byte_llama(seed=seed).to(args.device)
        extra = {"total_steps": args.steps} if group["projector"] == "golore" else {}
        groups = gradproj.param_groups(model, rank=32, update_proj_gap=args.gap, scale=0.25, **group, **extra)
        opt = gradproj.GaLoreAdamW(groups, lr=1e-2)
        losses, t0 = [], time.perf_counter()
        for x in batches(train_data, args.steps, args.batch, args.seq, seed, args.device):
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sync(args.device)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            val_loss = sum(model(input_ids=x, labels=x).loss.item() for x in val) / len(val)
        if seed == args.train_seeds[0]:
            curves[label] = losses
        rows.append({"config": label, "seed": seed, "train_loss_last10": sum(losses[-10:]) / 10,
                     "val_loss": val_loss, "seconds": seconds})
    return rows, curves


def plot_curves(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab10").colors
    base_color = {}
    for label, losses in curves.items():
        basis = label.split(",")[0].split(" ")[0]
        color = base_color.setdefault(basis, colors[len(base_color) % len(colors)])
        style = "--" if "project" in label else (":" if "reset" in label else "-")
        w = 10
        smooth = [sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(smooth, label=label, lw=1.3, color=color, linestyle=style)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of 10 steps)")
    ax.set_title("Small LLaMA on the Python stdlib, GaLoreAdamW rank 32 with each basis\n"
                 "(dashed: moments projected at a refresh, dotted: reset)", fontsize=10)
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["energy", "refresh", "stress", "training"],
                    choices=["energy", "refresh", "stress", "training", "warm"])
    ap.add_argument("--warm-models", nargs="+", default=["llama_130m", "llama_350m"],
                    help="models whose block shapes the warm part times (rank hidden/4)")
    ap.add_argument("--baseline", help="git commit whose randomized_svd the warm part times side by side")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["llama_1b", "llama_7b"])
    ap.add_argument("--rank", type=int, help="rank for every refresh shape (default: GaLore's per model)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per basis and shape (median reported)")
    ap.add_argument("--spectrum", default="recorded", help="'recorded' or 'power:A' (σ_i = i^-A)")
    ap.add_argument("--stress-shape", nargs=2, type=int, default=[2048, 5461])
    ap.add_argument("--stress-rank", type=int, default=512)
    ap.add_argument("--stress-decays", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--record-steps", nargs="+", type=int, default=[10, 20, 30])
    ap.add_argument("--rec-hidden", type=int, default=256)
    ap.add_argument("--rec-intermediate", type=int, default=688)
    ap.add_argument("--rec-layers", type=int, default=2)
    ap.add_argument("--rec-batch", type=int, default=8)
    ap.add_argument("--rec-ranks", nargs="+", type=int, default=[8, 64],
                    help="ranks of the energy part (default 1/32 and 1/4 of the hidden size)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per configuration")
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--gap", type=int, default=25, help="update_proj_gap in the training part")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: multi-threaded BLAS timings are unstable on a shared machine)")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--plot", help="write the training curves to this PNG")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    data = stdlib_bytes(3_000_000)
    results = {"machine": machine(), "args": vars(args)}
    print(f"machine: {machine()}\n")

    profile = None
    if "energy" in args.parts:
        e = energy_part(args, data)
        results["energy"] = e
        profile = torch.tensor(e["profile"])
        print(f"### Captured energy on recorded gradients ({e['matrices']} matrices of a {args.rec_layers}-layer LLaMA, "
              f"hidden {args.rec_hidden}, intermediate {args.rec_intermediate}; AdamW steps {e['steps']})\n")
        print("Mean share of ‖G‖² in the top 1/32, 1/8, 1/4 of the spectrum: "
              + ", ".join(f"{v:.4f}" for v in e["top_energy_fraction"].values()) + "\n")
        ranks = e["ranks"]
        print("| basis | " + " | ".join(f"rank {r}: mean | min" for r in ranks) + " |")
        print("|---|" + "---|---|" * len(ranks))
        for label in e["ratios"][ranks[0]]:
            cells = []
            for r in ranks:
                vals = e["ratios"][r][label]
                cells += [f"{sum(vals) / len(vals):.4f}", f"{min(vals):.4f}"] if vals else ["", ""]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()
        for r in ranks:
            rr = e["ratios"][r]
            warm = max(a - b for a, b in zip(rr[WARM], rr[LOW]))
            print(f"rank {r}: largest energy lost by the bfloat16 G Z against float32 (warm), per matrix: {warm:.1e}")
        print()
    if args.spectrum.startswith("power:"):
        profile, args.power = None, float(args.spectrum.split(":")[1])
    elif profile is None and ("refresh" in args.parts or "warm" in args.parts):
        raise SystemExit("--spectrum recorded needs the energy part (or use --spectrum power:A)")

    if "warm" in args.parts:
        rows = warm_part(args, profile)
        results["warm"] = rows
        print(f"### Warm randomized_svd refresh (q = 1, p = 8) on {args.device}, spectrum {args.spectrum}, "
              f"{args.repeats} rotated rounds, process CPU time\n")
        print("| model | shape | rank | auto's dtype | variant | ms | vs first | energy / exact |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            ref = next(x["seconds"] for x in rows if x["shape"] == r["shape"] and x["model"] == r["model"])
            print(f"| {r['model']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | {r['auto']} | {r['variant']} "
                  f"| {r['seconds'] * 1e3:.1f} | {r['seconds'] / ref:.2f} | {r['energy']:.6f} |")
        print()

    if "refresh" in args.parts:
        rows = refresh_part(args, profile)
        results["refresh"] = rows
        print(f"### Refresh step cost (new basis + R) on {args.device}, spectrum {args.spectrum}\n")
        print("| model | shape | rank | basis | seconds | vs svd | energy / exact |\n|---|---|---|---|---|---|---|")
        for r in rows:
            ref = next(x["seconds"] for x in rows if x["shape"] == r["shape"] and x["model"] == r["model"]
                       and x["basis"] == "svd (exact)")
            energy = "" if math.isnan(r["energy"]) else f"{r['energy']:.4f}"
            print(f"| {r['model']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | {r['basis']} | {r['seconds']:.3f} "
                  f"| {ref / r['seconds']:.1f}x faster | {energy} |")
        print()
    if "stress" in args.parts:
        out = stress_part(args)
        results["stress"] = out
        m, n = args.stress_shape
        print(f"### Energy / exact top-r energy on power-law spectra σ_i = i^-a, {m}x{n}, rank {args.stress_rank}\n")
        print("| a | basis | cold | warm |\n|---|---|---|---|")
        for r in out:
            label = f"randomized_svd q={r['q']}" if isinstance(r["q"], int) else r["q"]
            warm = "" if math.isnan(r["warm"]) else f"{r['warm']:.6f}"
            cold = "" if math.isnan(r["cold"]) else f"{r['cold']:.6f}"
            print(f"| {r['decay']} | {label} | {cold} | {warm} |")
        print()
    if "training" in args.parts:
        rows, curves = training_part(args, data)
        results["training"] = rows
        results["curves"] = curves
        print(f"### Training quality: {args.steps} steps, batch {args.batch}x{args.seq}, rank 32, T = {args.gap}, "
              f"seeds {args.train_seeds}\n")
        print("| configuration | held-out loss: mean | per seed | train loss (last 10), mean | seconds, mean |")
        print("|---|---|---|---|---|")
        for label, _ in TRAIN_CONFIGS:
            rs = [r for r in rows if r["config"] == label]
            mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            per_seed = " / ".join(f"{r['val_loss']:.3f}" for r in rs)
            print(f"| {label} | {mean('val_loss'):.3f} | {per_seed} "
                  f"| {mean('train_loss_last10'):.3f} | {mean('seconds'):.0f} |")
        if args.plot:
            plot_curves(curves, args.plot)
            print(f"\ncurves: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
