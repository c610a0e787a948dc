"""``veil train --dp``: DP-SGD on your own (plaintext) data, with the privacy guarantee saved beside the weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DP-SGD (--dp): train here on your own data with differential privacy (Opacus)")
    g.add_argument("--dp", action="store_true", help="train with DP-SGD on plaintext data instead of on shares")
    g.add_argument("--data", help="training data: mnist, digits, or a .npz/.npy/.pt file (with --dp)")
    g.add_argument("--test-data", help="test data (default: the test split of --data when it has one)")
    g.add_argument("--limit", type=int, help="use only the first N training records")
    g.add_argument("--epsilon", type=float, help="target epsilon; the noise is calibrated to reach it")
    g.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5; keep it below 1/n)")
    g.add_argument("--noise-multiplier", type=float, help="fixed noise multiplier instead of --epsilon")
    g.add_argument("--max-grad-norm", type=float, help="per-example clipping norm C")
    g.add_argument("--accountant", default="prv", choices=["prv", "rdp"], help="privacy accountant (default prv)")
    g.add_argument("--clipping", default="ghost", choices=["ghost", "hooks"],
                   help="per-example clipping: ghost (norms without per-example gradients) or hooks")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="average the weights (e.g. 0.99; default: the recipe's); free post-processing")
    g.add_argument("--views", type=int, choices=[0, 4, 8],
                   help="augmentation multiplicity: train on each image and 4 or 8 copies shifted by one pixel, "
                        "each record's gradient averaged over its views before clipping (0: none; default: the "
                        "recipe's, 4 for scatter-linear). Needs a model whose first trained layer is linear")
    g.add_argument("--device", help="torch device (default cpu, or cuda when available)")


def run_dp(args: argparse.Namespace) -> int:
    import torch

    from veil.data.images import load_images
    from veil.dp.models import ARCHITECTURES, build
    from veil.dp.recipes import recipe_for
    from veil.dp.train import DPSGDConfig, save_dp_model, train_dp

    if not args.data:
        raise ValueError("--dp needs --data (mnist, digits, or a .npz/.npy/.pt file of images and labels)")
    if args.epsilon is None and args.noise_multiplier is None:
        raise ValueError("--dp needs --epsilon (target) or --noise-multiplier")
    x, y = load_images(args.data, split="train", limit=args.limit)
    if y is None:
        raise ValueError(f"{args.data} has no labels: DP-SGD training needs labelled data")
    test = None
    if args.test_data or args.data == "mnist":
        xt, yt = load_images(args.test_data or args.data, split="test")
        test = (xt, yt) if yt is not None else None
    num_classes = int(max(int(y.max()), int(test[1].max()) if test else 0)) + 1
    if args.arch in ARCHITECTURES:
        if x.ndim != 4:
            raise ValueError(f"{args.arch} takes images (N, C, H, W); {args.data} has shape {tuple(x.shape)}")
        c, h, w = (int(d) for d in x.shape[1:])
        model, frontend = build(args.arch, image_shape=(c, h, w), num_classes=num_classes)
    else:
        from veil.nn.infer import resolve_architecture

        model, frontend = resolve_architecture(args.arch), None
    recipe = recipe_for(args.arch, args.epsilon if args.noise_multiplier is None else None)
    config = DPSGDConfig(
        target_epsilon=args.epsilon if args.noise_multiplier is None else None, delta=args.delta,
        epochs=args.epochs if args.epochs is not None else int(recipe["epochs"]),
        batch_size=args.batch_size or int(recipe["batch_size"]), lr=args.lr or recipe["lr"],
        max_grad_norm=args.max_grad_norm or recipe["max_grad_norm"], optimizer=args.optimizer,
        momentum=args.momentum if args.momentum is not None else 0.9, noise_multiplier=args.noise_multiplier,
        accountant=args.accountant, clipping=args.clipping,
        ema_decay=args.ema if args.ema is not None else recipe["ema_decay"])
    views = args.views if args.views is not None else int(recipe["views"])
    if views:
        from veil.dp.views import shifted_views, shifts_for

        if x.ndim != 4:
            raise ValueError(f"--views shifts images (N, C, H, W); {args.data} has shape {tuple(x.shape)}")
        x = shifted_views(x, shifts_for(views))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = Path(args.checkpoint_dir) / "dp-sgd.ckpt" if args.checkpoint_dir else None
    if checkpoint is not None and checkpoint.exists() and not args.resume:
        raise ValueError(f"{checkpoint} exists: add --resume to continue that run, or remove it to start over")
    result = train_dp(model, (x, y), config=config, test=test, frontend=frontend, device=device,
                      progress=not args.no_progress, checkpoint=checkpoint, views=bool(views))
    summary: dict[str, Any] = {"arch": args.arch, "views": 1 + views, **result.to_dict()}
    if args.out:
        summary["weights"] = str(save_dp_model(args.out, result, arch=args.arch))
    if args.plot:
        from veil.dp.plots import plot_privacy_curve

        summary["plot"] = str(plot_privacy_curve(result.history, args.plot, delta=config.delta,
                                                 target_epsilon=config.target_epsilon,
                                                 title=f"DP-SGD on {args.data} ({args.arch})"))
    if args.history:
        from veil.files import write_atomic

        write_atomic(args.history, (json.dumps(summary, indent=1) + "\n").encode())
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    else:
        for note in result.fixes:
            print(f"model fixed for DP-SGD: {note}")
        acc = f", test accuracy {100 * result.test_accuracy:.2f}%" if result.test_accuracy is not None else ""
        print(f"DP-SGD: epsilon {result.epsilon:.3f} at delta {config.delta:g} ({config.accountant} accountant; "
              f"noise multiplier {result.noise_multiplier:.4f}, {result.steps} steps){acc}; {result.seconds:.0f} s")
        for key in ("weights", "plot"):
            if key in summary:
                print(f"{key}: {summary[key]}")
    return 0

