"""DP-SGD on MNIST at several epsilons, the non-private model beside it, and a membership-inference audit.

Recipe (``veil.dp.models``, Tramer & Boneh 2021): fixed scattering features (no privacy cost),
normalised per example, then a head trained with DP-SGD through Opacus (Poisson sampling,
per-example clipping, PRV accountant; the noise calibrated so that the target epsilon is spent at
the last epoch). The linear head trains with augmentation multiplicity (``veil.dp.views``, De et al.
2022): each image and 4 copies shifted by one pixel (``--views``), each record's gradient averaged over
its 5 views before clipping. Hyperparameters per architecture and epsilon come from ``veil.dp.recipes``
(other batches below epsilon 2) unless overridden.

One JSON object per line:

* ``what: dp-sgd`` per target epsilon: ``target_epsilon``, ``epsilon`` (spent, PRV accountant),
  ``epsilon_rdp`` (RDP accountant, a looser cross-check), ``delta``, ``test_accuracy`` (10,000
  MNIST test images), ``epochs``, ``minutes`` (DP-SGD training; ``feature_minutes`` once for the
  scattering of every training view and test image), ``noise_multiplier``, ``batch_size``, ``arch``,
  ``views`` (per record).
* ``what: non-private``: the same architecture on the same views trained with plain SGD (the
  plaintext PyTorch figure for the same work).
* ``what: audit`` per model (on by default; ``--no-audit``): membership inference on a small
  training set (``members`` natural images plus ``canaries``, mislabeled images), for the non-DP
  model and the DP model at the smallest epsilon, side by side: each attack's ``*_auc`` and the
  ``*_epsilon_lower_bound`` it certifies (loss threshold, shadow models, reference models on the
  natural members; loss threshold on the canaries).

PNG plots in ``--plots`` (default ``.cache/dp``): accuracy against epsilon, the privacy-loss curves.

    python benchmarks/dp_mnist.py                        # epsilons 1, 3, 8; audit
    python benchmarks/dp_mnist.py --epsilons 3 --no-audit
    python benchmarks/dp_mnist.py --quick                # 10,000 training images, 3 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from veil.data.mnist import load_mnist
from veil.dp.models import ScatterFeatures, scatter_cnn, scatter_linear
from veil.dp.recipes import recipe_for
from veil.dp.standardize import clip_norms_for, private_standardizer
from veil.dp.train import DPSGDConfig, features, train_dp
from veil.dp.views import ViewCrossEntropy, apply_fixed, shifted_views, shifts_for, split_for_views
from veil.nn.zoo import evaluate

PUBLISHED = [  # (epsilon, accuracy, label) at delta = 1e-5, for the plot
    {"epsilon": 3.0, "test_accuracy": 0.987, "label": "Tramer & Boneh 2021, ScatterNet+linear"},
    {"epsilon": 1.19, "test_accuracy": 0.946, "label": "Opacus MNIST example"},
    {"epsilon": 3.01, "test_accuracy": 0.968, "label": "Opacus MNIST example"},
    {"epsilon": 2.93, "test_accuracy": 0.981, "label": "Papernot et al. 2020, tempered sigmoids"},
]


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _head(arch: str, norm: nn.Module | None = None) -> nn.Module:
    return scatter_linear(norm=norm) if arch == "scatter-linear" else scatter_cnn()


def _plain_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
               test: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch_size):
            opt.zero_grad()
            ViewCrossEntropy()(model(x[idx]), y[idx]).backward()  # (batch, views, classes): mean over views
            opt.step()
    return model.eval()


def _views_of(frontend: nn.Module, x: torch.Tensor, views: int, progress: bool) -> torch.Tensor:
    """(N, 1 + views, ...) scattering features of each image and its shifted copies."""
    return shifted_views(x, shifts_for(views), transform=lambda im: features(frontend, im, progress=progress,
                                                                 what="scattering (shifted views)"))


def run_accuracy(args: argparse.Namespace, plots: Path) -> list[dict]:
    x, y = load_mnist("train", normalize=False)
    xt, yt = load_mnist("test", normalize=False)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    views = args.views if args.arch == "scatter-linear" else 0
    t0 = time.perf_counter()
    frontend = ScatterFeatures((28, 28))
    fx = (_views_of(frontend, x, views, not args.no_progress) if views
          else features(frontend, x, progress=not args.no_progress, what="scattering (train)"))
    ft = features(frontend, xt, progress=not args.no_progress, what="scattering (test)")
    feature_minutes = (time.perf_counter() - t0) / 60
    norm, prior = None, None
    if args.normalize == "private" and args.arch == "scatter-linear":
        # per-channel mean and variance with DP (2 Gaussian steps, sigma 8; composed below), from the
        # unshifted images; the clip norms follow from ||pixels|| <= 28 and the scattering being
        # non-expansive: nothing is fitted
        norm, prior = private_standardizer(fx[:, 0] if views else fx, noise_multiplier=8.0,
                                           clip_norms=clip_norms_for(28.0, 49))
    if views:
        # the head's fixed front (normalisation, flattening) once for all runs; DP-SGD trains the linear layer
        fixed, _ = split_for_views(_head(args.arch, norm))
        fx = apply_fixed(fixed, fx, views=True, overwrite=True)
        ft = apply_fixed(fixed, ft, views=False)

    def head() -> nn.Module:
        return split_for_views(_head(args.arch, norm))[1] if views else _head(args.arch, norm)

    rows, histories = [], {}
    for eps in args.epsilons:
        recipe = recipe_for(args.arch, eps)
        recipe.pop("views")  # --views decides (the recipe's 4 by default)
        if args.epochs:
            recipe["epochs"] = args.epochs
        if args.lr:
            recipe["lr"] = args.lr
        config = DPSGDConfig(target_epsilon=eps, delta=args.delta, optimizer="sgd", momentum=0.9,
                             accountant="prv", clipping="ghost", **recipe)
        result = train_dp(head(), (fx, y), config=config, test=(ft, yt), progress=not args.no_progress,
                          prior_privacy=prior, views=bool(views))
        last = result.history[-1]
        row = {"what": "dp-sgd", "arch": args.arch, "target_epsilon": eps, "epsilon": round(result.epsilon, 4),
               "epsilon_rdp": round(last.epsilon_rdp, 4), "delta": args.delta,
               "test_accuracy": result.test_accuracy, "epochs": config.epochs,
               "minutes": round(result.seconds / 60, 2), "feature_minutes": round(feature_minutes, 2),
               "noise_multiplier": round(result.noise_multiplier, 4), "batch_size": config.batch_size,
               "max_grad_norm": config.max_grad_norm, "steps": result.steps, "train_records": len(x),
               "views": 1 + views, "normalize": args.normalize if args.arch == "scatter-linear" else "group"}
        _emit(row)
        rows.append(row)
        histories[f"epsilon {eps:g}"] = result.history
    recipe = recipe_for(args.arch)
    t0 = time.perf_counter()
    epochs = min(args.epochs or 10, 10)  # plain SGD converges in far fewer epochs than DP-SGD
    plain = _plain_sgd(head(), fx, y, epochs=epochs, batch_size=256, lr=0.05)
    plain_acc = evaluate(plain, ft, yt)
    _emit({"what": "non-private", "arch": args.arch, "test_accuracy": plain_acc, "epochs": epochs,
           "minutes": round((time.perf_counter() - t0) / 60, 2), "epsilon": None, "batch_size": 256,
           "dp_batch_size": recipe["batch_size"], "views": 1 + views})
    from veil.dp.plots import plot_accuracy_vs_epsilon, plot_privacy_curves

    plot_accuracy_vs_epsilon([{**r, "label": f"Veil, {args.arch}"} for r in rows], plots / "accuracy_vs_epsilon.png",
                             references=PUBLISHED, non_private=plain_acc,
                             title=f"MNIST, delta = {args.delta:g}")
    plot_privacy_curves(histories, plots / "privacy_loss.png", delta=args.delta)
    return rows


def run_audit(args: argparse.Namespace, plots: Path) -> None:
    """Two audits of a non-DP and a DP model (the DP recipe's architecture on scattering features),
    trained on ``--audit-members`` natural training images plus ``--audit-canaries`` canaries:

    * natural members against as many unseen images (loss-threshold, shadow-model and reference-model
      attacks; shadows trained the target's way on 4x as many other images);
    * canaries (Jagielski et al. 2020; Nasr et al. 2021): images given a wrong label at random; half
      are put in the training set, half held out. A model that memorises shows it on them at once;
      DP bounds what any attack can see on them as on any record.
    """
    from veil.audit.membership import MembershipAudit, audit_membership, loss_threshold_attack, plot_roc

    x, y = load_mnist("train", normalize=False)
    m, c = args.audit_members, args.audit_canaries
    gen = torch.Generator().manual_seed(0)  # which public MNIST images play members: not a secret
    perm = torch.randperm(len(x), generator=gen)[:6 * m + 2 * c]
    fx = features(ScatterFeatures((28, 28)), x[perm])
    fy = y[perm].clone()
    fy[6 * m:] = (fy[6 * m:] + torch.randint(1, 10, (2 * c,), generator=gen)) % 10  # canaries: wrong labels
    members, nonmembers, shadow = (fx[:m], fy[:m]), (fx[m:2 * m], fy[m:2 * m]), (fx[2 * m:6 * m], fy[2 * m:6 * m])
    canary_in, canary_out = (fx[6 * m:6 * m + c], fy[6 * m:6 * m + c]), (fx[6 * m + c:], fy[6 * m + c:])
    epochs, eps = args.audit_epochs, min(args.epsilons)
    recipe = recipe_for(args.arch)

    def non_private(xs: torch.Tensor, ys: torch.Tensor) -> nn.Module:
        return _plain_sgd(_head(args.arch), xs, ys, epochs=epochs, batch_size=64, lr=0.05)

    def private(xs: torch.Tensor, ys: torch.Tensor) -> nn.Module:
        config = DPSGDConfig(target_epsilon=eps, delta=args.delta, epochs=epochs, batch_size=max(1, len(xs) // 8),
                             lr=recipe["lr"] / 2, max_grad_norm=recipe["max_grad_norm"], ema_decay=0.9)
        return train_dp(_head(args.arch), (xs, ys), config=config, progress=False).model

    audits = {}
    for name, train_fn, epsilon in (("non-DP", non_private, None), (f"DP eps={eps:g}", private, eps)):
        t0 = time.perf_counter()
        model = train_fn(torch.cat([members[0], canary_in[0]]), torch.cat([members[1], canary_in[1]]))
        audit = audit_membership(model, members, nonmembers, train_fn=train_fn, shadow_data=shadow,
                                 delta=args.delta, num_shadows=args.audit_shadows)
        canary = loss_threshold_attack(model, canary_in, canary_out, delta=args.delta)
        audits[name] = audit
        audits[f"{name}, canaries"] = MembershipAudit(loss=canary, shadow=None, delta=args.delta)
        row = {"what": "audit", "model": name, "arch": args.arch, "epsilon": epsilon, "members": m,
               "canaries": c, "epochs": epochs, "train_accuracy": evaluate(model, *members),
               "test_accuracy": evaluate(model, *nonmembers)}
        for attack in audit.attacks:
            key = attack.name.replace(" ", "_")
            row[f"{key}_auc"] = round(attack.auc, 4)
            row[f"{key}_epsilon_lower_bound"] = round(attack.epsilon_lower_bound, 4)
        row["canary_auc"] = round(canary.auc, 4)
        row["canary_epsilon_lower_bound"] = round(canary.epsilon_lower_bound, 4)
        row["minutes"] = round((time.perf_counter() - t0) / 60, 2)
        _emit(row)
    plot_roc(audits, plots / "membership_roc.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilons", default="1,3,8", help="comma-separated target epsilons (default 1,3,8)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--arch", default="scatter-linear", choices=["scatter-cnn", "scatter-linear"])
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs")
    ap.add_argument("--lr", type=float, help="override the recipe's learning rate")
    ap.add_argument("--normalize", default="group", choices=["private", "group"],
                    help="scatter-linear: per-example GroupNorm (default) or per-channel statistics with DP")
    ap.add_argument("--views", type=int, default=4, choices=[0, 4, 8],
                    help="scatter-linear: shifted copies of each image (augmentation multiplicity: each record's "
                         "gradient averaged over its views; default 4: one pixel up, down, left, right; 0: none)")
    ap.add_argument("--limit", type=int, help="train on the first N training images only")
    ap.add_argument("--no-audit", dest="audit", action="store_false", help="skip the membership audit")
    ap.add_argument("--audit-only", action="store_true", help="only the membership audit")
    ap.add_argument("--audit-members", type=int, default=1000)
    ap.add_argument("--audit-canaries", type=int, default=200, help="canaries per side (in / held out)")
    ap.add_argument("--audit-epochs", type=int, default=100)
    ap.add_argument("--audit-shadows", type=int, default=4)
    ap.add_argument("--plots", default=".cache/dp", help="directory of the PNG plots")
    ap.add_argument("--quick", action="store_true", help="10,000 training images, 3 epochs, small audit")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    args.epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    if args.quick:
        args.limit, args.epochs = args.limit or 10_000, args.epochs or 3
        args.audit_members, args.audit_canaries, args.audit_epochs, args.audit_shadows = 300, 50, 15, 1
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    if not args.audit_only:
        run_accuracy(args, plots)
    if args.audit or args.audit_only:
        run_audit(args, plots)


if __name__ == "__main__":
    main()
