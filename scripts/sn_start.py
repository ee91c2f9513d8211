"""How far each spectral-norm start is from the true σ in its first train-mode calls.

    python scripts/sn_start.py        # seconds on a CPU

For the authors' discriminator shapes on SmolLM2 (576 -> 512 input projection, 512 -> 512 head
layer), three seeds each: the estimate of σ after 1, 2, 5 and 10 train-mode calls (each runs one
power iteration), as a share of the true σ. `--disc_sn torch` (ours) starts after 15 iterations;
`--disc_sn legacy` (the authors' torch.nn.utils.spectral_norm) from random vectors. A layer whose σ
is underestimated by a share s acts 1/s times larger than 1-Lipschitz.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ganpo  # noqa: E402

CALLS = (1, 2, 5, 10)


def estimates(sn, seed):
    """-> {layer: [σ_est / σ after each of CALLS train-mode calls]} for one fresh discriminator."""
    torch.manual_seed(seed)
    d = ganpo.Discriminator(576, 512, sn=sn)
    out = {}
    for name, layer, d_in in (("576 -> 512", d.proj, 576), ("512 -> 512", d.head[0], 512)):
        shares = []
        for call in range(1, max(CALLS) + 1):
            layer.train()(torch.zeros(1, d_in))  # one power iteration
            weight = layer.eval().weight.detach()  # W / σ_est, read without iterating
            shares.append(1 / float(torch.linalg.matrix_norm(weight, 2)))
        out[name] = [shares[c - 1] for c in CALLS]
    return out


def main():
    print("σ estimate / true σ after 1, 2, 5, 10 train-mode calls (seeds 0, 1, 2)")
    for sn in ("torch", "legacy"):
        runs = [estimates(sn, seed) for seed in range(3)]
        for layer in runs[0]:
            cells = [f"{min(r[layer][i] for r in runs):.2f}-{max(r[layer][i] for r in runs):.2f}"
                     for i in range(len(CALLS))]
            print(f"--disc_sn {sn:<6} {layer}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
