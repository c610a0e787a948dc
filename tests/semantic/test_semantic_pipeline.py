"""veil.semantic on the 8x8 digits: permutation, translator, decoy files, composed classifier, audit."""

import stat

import numpy as np
import pytest
import torch
from torch import nn

from veil.audit.semantic import audit_decoys, frequency_attack, rank_match
from veil.data.digits import load_digits
from veil.semantic import (
    ClassPermutation,
    ComposedClassifier,
    PermutationError,
    SemanticError,
    TranslatorSettings,
    fit_translator,
    load_decoys,
    load_translator,
    save_translator,
    train_remote,
    write_decoys,
)
from veil.semantic.networks import local_classifier
from veil.semantic.translator import accuracy, train_classifier


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits()
    x = x.reshape(-1, 1, 8, 8)  # pixels already in [0, 1]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    x, y, _, _ = digits
    perm = ClassPermutation.random(10)
    ckpt = tmp_path_factory.mktemp("sem") / "translator.ckpt"
    settings = TranslatorSettings(epochs=20, batch_size=32, lr=1e-3, classifier_epochs=10)
    net, history = fit_translator(x, y, perm, settings=settings, checkpoint=ckpt, progress=False)
    return net, history, perm, ckpt, settings


def test_a_random_permutation_is_a_secret_derangement():
    seen = set()
    for _ in range(20):
        p = ClassPermutation.random(10)
        assert sorted(p.mapping) == list(range(10)) and all(i != d for i, d in enumerate(p.mapping))
        assert str(p.mapping) not in repr(p)
        labels = torch.arange(10)
        assert torch.equal(p.to_secret(p.to_decoy(labels)), labels)
        seen.add(p.mapping)
    assert len(seen) == 20  # drawn from the OS, not a fixed seed


@pytest.mark.parametrize(("values", "message"), [([0, 0, 1], "not a permutation"), ([0], "at least 2 classes"),
                                                 (["a", 1], "not a list of class indices")])
def test_bad_permutations_are_refused(values, message):
    with pytest.raises(PermutationError, match=message):
        ClassPermutation.from_list(values)
    with pytest.raises(PermutationError, match=r"labels must lie in 0\.\.2"):
        ClassPermutation((1, 2, 0)).to_decoy(torch.tensor([3]))


def test_a_translator_of_a_few_minutes_beats_chance_by_far(digits, trained):
    x, y, xt, yt = digits
    net, history, perm, _, _ = trained
    assert history.classifier_accuracy > 0.9
    decoys = net.translate(xt)
    assert decoys.shape == xt.shape and float(decoys.min()) >= 0 and float(decoys.max()) <= 1
    # an independent classifier trained on real digits reads the decoys as their decoy class
    torch.manual_seed(1)
    judge = train_classifier(local_classifier(1, (8, 8)), x, y, epochs=15, batch_size=32)
    assert accuracy(judge, xt, yt) > 0.9
    realism = accuracy(judge, decoys, perm.to_decoy(yt))
    assert realism > 0.5, realism  # chance: 0.1
    # the remote side trains on decoys only; the composition answers the secret classes
    remote = train_remote(net.translate(x), perm.to_decoy(y), arch=local_classifier(1, (8, 8)), epochs=15,
                          progress=False)
    composed = ComposedClassifier(net, remote)
    end_to_end = float((composed.classify(xt) == yt).float().mean())
    assert end_to_end > 0.7, end_to_end


def test_composed_predictions_map_back_through_the_inverse_permutation(trained, digits):
    net, _, perm, _, _ = trained
    xt = digits[2][:5]
    for decoy in range(10):
        class Constant(nn.Module):
            def forward(self, d, decoy=decoy):
                return nn.functional.one_hot(torch.full((len(d),), decoy), 10).float()

        got = ComposedClassifier(net, Constant()).classify(xt)
        assert got.tolist() == [perm.inverse().mapping[decoy]] * 5


def test_the_remote_side_file_holds_decoys_and_decoy_labels_only(trained, digits, tmp_path):
    net, _, perm, _, _ = trained
    x, y, xt, yt = digits
    counts = write_decoys(net, x, tmp_path / "decoys.npz", y=y, x_test=xt, y_test=yt)
    with np.load(tmp_path / "decoys.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert f["x_train"].dtype == np.uint8 and f["x_train"].shape[1:] == (1, 8, 8)
        per_class = np.bincount(f["y_train"], minlength=10)
        assert (per_class == per_class[0]).all() and per_class.sum() == counts["train"]  # balanced
        assert not any(np.array_equal(f[k].ravel()[:10], np.array(perm.mapping)) for k in f.files)
    loaded = load_decoys(tmp_path / "decoys.npz")
    # the labels are decoy labels: the owner's classifier reads each decoy image as its file label (with
    # secret labels in the file it would agree almost never: the permutation moves every class)
    with torch.no_grad():
        read = net.classifier(loaded["x_train"]).argmax(1)
    assert float((read == loaded["y_train"]).float().mean()) > 0.9
    unbalanced = write_decoys(net, x, tmp_path / "all.npz", y=y, balance=False)
    assert unbalanced["train"] == len(x)
    raw = bytes((tmp_path / "decoys.npz").read_bytes())
    assert bytes(perm.mapping) not in raw


def test_translator_file_is_private_and_round_trips(trained, digits, tmp_path):
    net, _, perm, _, _ = trained
    path = save_translator(net, tmp_path / "t.pt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = load_translator(path)
    assert back.permutation == perm
    xt = digits[2][:50]
    assert torch.equal(back.decoy_classes(xt), net.decoy_classes(xt))
    (tmp_path / "bad.pt").write_bytes(b"not a translator")
    with pytest.raises(SemanticError, match="not a readable translator file"):
        load_translator(tmp_path / "bad.pt")


def test_training_resumes_from_its_checkpoint(trained, digits):
    x, y, _, _ = digits
    _, history, perm, ckpt, settings = trained
    more = TranslatorSettings(**{**settings.__dict__, "epochs": settings.epochs + 1})
    _, resumed = fit_translator(x, y, perm, settings=more, checkpoint=ckpt, resume=True, progress=False)
    assert [e["epoch"] for e in resumed.epochs] == list(range(1, settings.epochs + 2))
    assert resumed.epochs[:-1] == history.epochs
    with pytest.raises(SemanticError, match="another permutation"):
        fit_translator(x, y, ClassPermutation.random(10), settings=more, checkpoint=ckpt, resume=True,
                       progress=False)


@pytest.mark.parametrize(("change", "message"), [
    (lambda x, y: (x * 2, y), r"pixels must lie in \[0, 1\]"),
    (lambda x, y: (x.masked_fill(torch.zeros_like(x, dtype=torch.bool).index_fill_(0, torch.tensor([3]), True),
                                 float("nan")), y), "NaN or infinite"),
    (lambda x, y: (x[:, :, :6, :6], y), "multiples of 4"),
    (lambda x, y: (x, y[:-1]), r"labels: expected shape \(1400,\)"),
    (lambda x, y: (x[y != 3], y[y != 3]), r"no training image of class\(es\) \[3\]"),
])
def test_bad_training_data_is_refused_with_its_cause(digits, change, message):
    x, y, _, _ = digits
    bx, by = change(x, y)
    with pytest.raises(SemanticError, match=message):
        fit_translator(bx, by, ClassPermutation.random(10), settings=TranslatorSettings(epochs=1), progress=False)


def test_frequency_attack_recovers_the_permutation_when_counts_are_known_and_distinct():
    perm = ClassPermutation.random(5)
    secret = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 40, 30, 20, 10])])
    prior = [50, 40, 30, 20, 10]
    assert frequency_attack(perm.to_decoy(secret), secret, prior) == 1.0
    assert rank_match([1, 9, 5], [0.2, 0.3, 0.5]) == [0, 2, 1]  # most frequent observed -> most probable


def test_the_audit_runs_on_a_tiny_decoy_set(trained, digits):
    net, _, perm, _, _ = trained
    x, y, xt, yt = digits
    decoys = net.translate(x)
    judge = train_classifier(local_classifier(1, (8, 8)), x, y, epochs=10, batch_size=32)
    prior = torch.bincount(y, minlength=10).float() / len(y)
    report = audit_decoys(decoys, perm.to_decoy(y), y, prior.tolist(), judge=judge, real_x=xt, real_y=yt,
                          probe_sizes=(10, 200))
    d = report.as_dict()
    for key in ("chance", "frequency_attack_accuracy", "cluster_attack_accuracy", "decoy_realism"):
        assert 0.0 <= d[key] <= 1.0, key
    assert d["feature_distance"] >= 0 and d["real_feature_distance"] >= 0
    assert set(d["probe_accuracy"]) == {"10", "200"}
    assert d["probe_accuracy"]["200"] > 0.5  # labelled pairs give the permutation away


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    from veil.audit.semantic import frechet_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 4, generator=g), torch.randn(20000, 4, generator=g) * 2 + 1
    assert abs(frechet_distance(a, a)) < 1e-9
    # |mu|^2 = 4, tr(I + 4I - 2 * 2I) = 4
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.03)
