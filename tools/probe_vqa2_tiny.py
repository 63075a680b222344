"""How much of the MOS a model's encoders pass on: a ridge regression on each video's encodings, fitted on
one labelled set and measured (SRCC) on another.

    python tools/probe_vqa2_tiny.py TRAIN/labels.csv HELDOUT/labels.csv [--model vqa2-tiny]

Features per video: the mean, std and max of its projected keyframe tokens and of its projected motion tokens
(what the LLM receives; 6 x the LLM width). If this probe scores the held-out set about as well as the model
itself (`vqa2 eval`), the LLM is reading what the encoders give it and a better model needs better towers. For
vqa2-tiny on the build's data (`vqa2 synth --count 700 --seed 1`, held-out as in build_vqa2_tiny.py) it gave
0.772, against 0.786 for the model.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from vqa2cli.batch import Prefetcher
from vqa2cli.errors import InputError, SetupError, Vqa2Error
from vqa2cli.evaluation import read_labels
from vqa2cli.metrics import srcc
from vqa2cli.pipeline import load_model

ALPHAS = np.logspace(-2, 4, 13)
FOLDS = 5


def encodings(model, labels_csv) -> tuple[np.ndarray, np.ndarray]:
    """[videos, 6 H] pooled encodings and [videos] MOS of a `path,mos` file; a video that does not decode is
    left out with a warning."""
    net = model.model
    rows = read_labels(labels_csv).rows

    def decode(path):
        return model.load_video(path, views=False)

    features, kept = [], []
    with Prefetcher([str(row.video) for row in rows], decode) as prefetcher:
        for row, (_, sample, error, _) in zip(rows, prefetcher):  # in input order
            if error:
                print(f"warning: skipped {error}", file=sys.stderr)
                continue
            with torch.inference_mode():
                encoded = net.encode_video(sample.keyframes, sample.motion)
            tokens = (encoded.keyframe_block[:-1], encoded.motion_block)  # the last keyframe row is image_newline
            features.append(torch.cat([s for t in tokens for s in (t.mean(0), t.std(0), t.amax(0))]).float().numpy())
            kept.append(row.mos)
    if not features:
        raise InputError(f"{labels_csv}: no video decoded")
    return np.stack(features), np.array(kept)


def ridge(x, y, alpha):
    """The predictor of a ridge regression of y on standardised x."""
    mean, std = x.mean(0), x.std(0) + 1e-8
    z = (x - mean) / std
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda q: ((q - mean) / std) @ w + y.mean()


def best_alpha(x, y, seed=0):
    """The ridge strength with the best cross-validated SRCC on the fitting set."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(y)), FOLDS)

    def cv_srcc(alpha):
        pred = np.empty(len(y))
        for fold in folds:
            rest = np.setdiff1d(np.arange(len(y)), fold)
            pred[fold] = ridge(x[rest], y[rest], alpha)(x[fold])
        return srcc(pred, y)

    return max(ALPHAS, key=cv_srcc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fit", help="path,mos CSV the probe is fitted on")
    parser.add_argument("heldout", help="path,mos CSV it is measured on")
    parser.add_argument("--model", default="vqa2-tiny")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        model = load_model(args.model, device="cpu")
        x, y = encodings(model, args.fit)
        hx, hy = encodings(model, args.heldout)
    except Vqa2Error as error:  # a bad label file or model, or no video decoded: one line, not a traceback
        print(f"probe_vqa2_tiny: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, SetupError) else 1)
    alpha = best_alpha(x, y)
    predict = ridge(x, y, alpha)
    print(f"ridge alpha {alpha:g} on {x.shape[1]} features: SRCC fitting set {srcc(predict(x), y):.3f}, "
          f"held-out {srcc(predict(hx), hy):.3f} ({len(hy)} videos)")


if __name__ == "__main__":
    main()
