"""A deliberately plain, single-file reference of GaLore and Fira, written from docs/algorithms.md (GaLore, Fira).

It shares no code with gradproj: one function per step, explicit formulas, no fusion. Tests step it side
by side with the composed optimizers.
"""

from __future__ import annotations

import math

import torch


class ReferenceGaLore:
    """GaLore-AdamW (and Fira when ``fira=True``) for a list of matrices, all projected the same way."""

    def __init__(self, params, lr, rank, gap, alpha, proj_type="std", betas=(0.9, 0.999), eps=1e-6, wd=0.0,
                 fira=False, gamma=1.01):
        self.params = list(params)
        self.lr, self.rank, self.gap, self.alpha, self.proj_type = lr, rank, gap, alpha, proj_type
        self.b1, self.b2, self.eps, self.wd = betas[0], betas[1], eps, wd
        self.fira, self.gamma = fira, gamma
        self.state = [dict(t=0) for _ in self.params]

    def side(self, W):
        m, n = W.shape
        if self.proj_type == "std":
            return "right" if m >= n else "left"
        if self.proj_type == "reverse_std":
            return "left" if m >= n else "right"
        return self.proj_type

    def basis(self, G, side):
        U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        r = self.rank
        if side == "right":
            return Vh[:r, :].to(G.dtype)
        if side == "left":
            return U[:, :r].to(G.dtype)
        return (U[:, :r].to(G.dtype), Vh[:r, :].to(G.dtype))

    @staticmethod
    def project(G, P, side):
        if side == "right":
            return G @ P.T
        if side == "left":
            return P.T @ G
        return P[0].T @ G @ P[1].T

    @staticmethod
    def back(X, P, side):
        if side == "right":
            return X @ P
        if side == "left":
            return P @ X
        return P[0] @ X @ P[1]

    def zero_grad(self):
        """As torch.optim's (set_to_none): so the tests' shared training loop drives it like an optimizer."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for W, st in zip(self.params, self.state):
            G = W.grad
            side = self.side(W)
            if st["t"] % self.gap == 0:
                st["P"] = self.basis(G, side)
            P = st["P"]
            R = self.project(G, P, side)
            if "m" not in st:
                st["m"] = torch.zeros_like(R)
                st["v"] = torch.zeros_like(R)
            st["m"] = self.b1 * st["m"] + (1 - self.b1) * R
            st["v"] = self.b2 * st["v"] + (1 - self.b2) * R * R
            psi = st["m"] / (st["v"].sqrt() + self.eps)
            st["t"] += 1
            t = st["t"]
            step_size = self.lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t)
            update = self.alpha * self.back(psi, P, side)
            if self.fira:
                sub = self.alpha * self.back(R, P, side)
                axis = 1 if side == "right" else 0
                phi = psi.norm(dim=axis, keepdim=True) / (R.norm(dim=axis, keepdim=True) + 1e-8)
                S = (G - sub) * phi
                norm = S.norm()
                if "N" in st:
                    k = max(norm / (st["N"] + 1e-8), self.gamma) / self.gamma
                    S = S / k
                    st["N"] = norm / k
                else:
                    st["N"] = norm
                update = update + S
            W -= step_size * update
            W -= self.lr * self.wd * W


class ReferenceAdamW:
    """Full-rank AdamW with GaLore's folding of the bias correction and decay after the update."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, wd=0.0):
        self.params = list(params)
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, wd
        self.state = [dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in self.params]

    def zero_grad(self):
        """As torch.optim's (set_to_none): so the tests' shared training loop drives it like an optimizer."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for W, st in zip(self.params, self.state):
            G = W.grad
            st["m"] = self.b1 * st["m"] + (1 - self.b1) * G
            st["v"] = self.b2 * st["v"] + (1 - self.b2) * G * G
            st["t"] += 1
            t = st["t"]
            W -= self.lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t) * st["m"] / (st["v"].sqrt() + self.eps)
            W -= self.lr * self.wd * W
