"""Private inference: a model owner's network on a data owner's inputs, both secret.

Both compute parties call :func:`private_inference` with the same options; the model owner passes
its model, the data owner its inputs (and, to get an accuracy, its labels). The model owner's
parameters and the data owner's inputs are secret-shared; the outputs are revealed to the data
owner alone. The model owner learns the number of inputs and their shape (it must, to run the
layers), nothing else; the data owner learns the architecture (the graph) and the outputs.

Per batch (``batch_size`` inputs at a time): share the batch, run the graph on shares, reveal the
logits (``reveal="logits"``, one message) or only the predicted class (``reveal="label"``: the argmax
is computed on shares first, ``5 ceil(log2 classes)`` more rounds, and the logits stay hidden).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from veil.net.transport import PartyError
from veil.nn.graph import Graph
from veil.nn.model import SecureModel, share_model

if TYPE_CHECKING:
    from veil.mpc.session import Session

REVEALS = ("logits", "label")


class InputShapeError(ValueError):
    """The data owner's inputs do not fit the model."""


@dataclass
class InferenceResult:
    """What one party ends with. ``predictions``, ``outputs`` and ``accuracy`` are None except at
    the data owner (``outputs`` is None there too with ``reveal="label"``)."""

    party: str
    images: int
    seconds: float
    batch_size: int
    predictions: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    accuracy: float | None = None
    traffic: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of this party (no predictions)."""
        out = {"party": self.party, "images": self.images, "batch_size": self.batch_size,
               "seconds": round(self.seconds, 3),
               "ms_per_image": round(1000 * self.seconds / max(self.images, 1), 3), **self.traffic}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out


def check_input_shape(graph: Graph, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Run the graph in the clear on zeros (zero parameters: nothing secret is needed) to check that
    inputs of ``shape`` fit it; return the output shape or raise :class:`InputShapeError`."""
    params = {k: torch.zeros(s) for k, s in graph.params.items()}
    try:
        with torch.no_grad():
            out = SecureModel(graph, params)(torch.zeros(shape))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise InputShapeError(f"inputs of shape {tuple(shape)} do not fit the model: {e}") from None
    return tuple(out.shape)


def _plan(session: Session, images: torch.Tensor | None, data_owner: str, batch_size: int) -> tuple[int, list[int]]:
    """The data owner tells the model owner how many inputs of which shape will come."""
    if session.party == data_owner:
        if images is None:
            raise ValueError(f"{session.party} is the data owner but passed no inputs")
        if images.dim() < 1 or len(images) == 0:
            raise InputShapeError(f"the inputs need a batch dimension and at least one input, got "
                                  f"shape {tuple(images.shape)}")
        header = {"images": len(images), "shape": list(images.shape[1:]), "batch_size": batch_size}
        session.transport.send(session.peer, json.dumps(header).encode())
        return len(images), list(images.shape[1:])
    if images is not None:
        raise ValueError(f"{session.party} is not the data owner ({data_owner!r} is): pass no inputs")
    try:
        header = json.loads(bytes(session.transport.recv(data_owner)))
        n, shape, theirs = int(header["images"]), [int(d) for d in header["shape"]], int(header["batch_size"])
    except (ValueError, KeyError, TypeError):
        raise PartyError(f"{session.party}: malformed inference plan from {data_owner!r}") from None
    if theirs != batch_size:
        raise ValueError(f"{session.party}: batch size {batch_size} but {data_owner!r} uses {theirs}")
    return n, shape


def _binary(shape: torch.Size) -> bool:
    """One score per input, (N,) or (N, 1): a binary classifier, decided by a threshold."""
    return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)


def private_inference(session: Session, model: SecureModel | torch.nn.Module | None,
                      images: torch.Tensor | None, *, model_owner: str, data_owner: str,
                      labels: torch.Tensor | None = None, batch_size: int = 64, reveal: str = "logits",
                      progress: bool = True) -> InferenceResult:
    """Run ``model`` (held by ``model_owner``) on ``images`` (held by ``data_owner``) on shares.

    ``model``: the owner's module or :class:`SecureModel` (None at the other party), or a model both
    parties shared earlier with :func:`share_model` (to run many jobs on one sharing).
    Returns this party's :class:`InferenceResult`: predictions (argmax over dimension 1; for one
    output per input, ``(N,)`` or ``(N, 1)``, a binary decision: above 0.5 after a final sigmoid, above
    0 otherwise), outputs and accuracy (if ``labels``) at the data owner only; time and traffic at both.
    """
    if model_owner == data_owner:
        raise ValueError("model owner and data owner must be different compute parties")
    for who in (model_owner, data_owner):
        if who not in session.parties:
            raise ValueError(f"{who!r} is not a compute party of this session {list(session.parties)}")
    if reveal not in REVEALS:
        raise ValueError(f"reveal must be one of {list(REVEALS)}, got {reveal!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if labels is not None and session.party != data_owner:
        raise ValueError("only the data owner holds labels")
    me = session.party
    t_setup = time.perf_counter()
    with session.measure() as setup:
        if isinstance(model, SecureModel) and model.shared:  # shared earlier: both parties pass it
            net = model
        else:
            net = share_model(session, model, owner=model_owner)
    setup["seconds"] = round(time.perf_counter() - t_setup, 4)
    n, shape = _plan(session, images, data_owner, batch_size)
    if images is not None and labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} inputs")
    if labels is not None:
        lab = torch.as_tensor(labels).double()
        bad = ~torch.isfinite(lab) | (lab < 0) | (lab != lab.round())
        if bool(bad.any()):
            raise ValueError(f"{int(bad.sum())} label(s) are not class indices (e.g. {float(lab[bad][0]):g}): "
                             f"labels must be integers >= 0")
    check_input_shape(net.graph, (1, *shape))
    outputs: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with session.measure() as traffic, tqdm(total=n, desc=f"{me}: private inference", unit="img",
                                            disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            mine = images[start:stop] if images is not None else None
            x = session.share(mine, owner=data_owner, shape=(stop - start, *shape))
            y = net(x)
            if reveal == "label":
                y = (y.reshape(-1) > net.binary_threshold) if _binary(y.shape) else y.argmax(dim=1)
            opened = y.reveal(to=data_owner)
            if opened is not None:
                outputs.append(opened)
            bar.update(stop - start)
    seconds = time.perf_counter() - t0
    result = InferenceResult(me, n, seconds, batch_size, setup=setup,
                             traffic={k: traffic[k] for k in ("rounds", "bytes_with_peer", "bytes_with_dealer")})
    if me == data_owner:
        out = torch.cat(outputs)
        if reveal == "label":
            result.predictions = out.round().long()
        else:
            result.outputs = out
            result.predictions = ((out.reshape(-1) > net.binary_threshold).long() if _binary(out.shape)
                                  else out.argmax(dim=1))
        classes = None  # known from the logits only; revealed labels say nothing of the others
        if reveal == "logits":
            classes = 2 if _binary(out.shape) else out.shape[1] if out.dim() > 1 else None
        if labels is not None and classes is not None and int(labels.max()) >= classes:
            warnings.warn(f"no accuracy: label {int(labels.max())} is not one of the model's {classes} classes",
                          stacklevel=2)
        elif labels is not None and labels.numel() == result.predictions.numel():
            result.accuracy = float((result.predictions == labels.reshape(result.predictions.shape)).double().mean())
        elif labels is not None:  # e.g. one label per input but a prediction per pixel: keep the predictions
            warnings.warn(f"no accuracy: {labels.numel()} labels for predictions of shape "
                          f"{tuple(result.predictions.shape)}", stacklevel=2)
    return result



# ---- a whole job, as `veil infer` runs it in each party ------------------------------------------
@dataclass(frozen=True)
class InferenceJob:
    """Everything a party needs for ``veil infer``; each party reads only its own files: the model
    owner ``model`` (and ``architecture`` for a state_dict), the data owner ``data``."""

    model: str | None = None
    data: str | None = None
    architecture: str | None = None
    trust_pickle: bool = False
    split: str = "test"
    limit: int | None = None
    mnist_path: str | None = None
    batch_size: int = 64
    reveal: str = "logits"
    model_owner: str = "bob"
    data_owner: str = "alice"
    out: str | None = None
    progress: bool = True
    progress_party: str | None = None  # only this party draws a bar (all parties in one terminal)


def resolve_architecture(spec: str) -> torch.nn.Module:
    """A module instance from a name of :data:`veil.nn.zoo.ARCHITECTURES` (e.g. ``lenet``) or from
    ``package.module:ClassName`` (constructed without arguments)."""
    import importlib

    from veil.nn.zoo import ARCHITECTURES

    if ":" not in spec:
        if spec.lower() not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {spec!r}: use one of {sorted(ARCHITECTURES)} or "
                             f"'package.module:ClassName'")
        return ARCHITECTURES[spec.lower()]()
    mod_name, _, cls_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import architecture {spec!r}: {e}") from None
    module = cls()
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{spec} is not a torch.nn.Module class")
    return module


def run_job(session: Session, job: InferenceJob) -> dict[str, Any]:
    """One party's part of ``veil infer``; returns its summary (accuracy at the data owner only).
    The data owner writes its predictions to ``job.out`` (``.npy``, atomically) if given."""
    me = session.party
    model = images = labels = None
    if me == job.model_owner:
        from veil.nn.load import load_model

        if job.model is None:
            raise ValueError(f"{me} is the model owner: give the model file (--model)")
        arch = resolve_architecture(job.architecture) if job.architecture else None
        model = load_model(job.model, architecture=arch, trust_pickle=job.trust_pickle)
    if me == job.data_owner:
        from veil.data.images import load_images

        if job.data is None:
            raise ValueError(f"{me} is the data owner: give the inputs (--data)")
        images, labels = load_images(job.data, split=job.split, limit=job.limit, mnist_path=job.mnist_path)
    result = private_inference(session, model, images, model_owner=job.model_owner, data_owner=job.data_owner,
                               labels=labels, batch_size=job.batch_size, reveal=job.reveal,
                               progress=job.progress and job.progress_party in (None, me))
    if result.predictions is not None and job.out:
        import io

        import numpy as np

        from veil.files import write_atomic

        buf = io.BytesIO()
        np.save(buf, result.predictions.numpy())
        write_atomic(job.out, buf.getvalue())
    summary = result.summary()
    summary["setup"] = result.setup
    return summary
