"""veil.he.latency: one image, a few ciphertexts, rotations; decryptions against the plaintext plan."""

import pytest
import torch
from torch import nn

from veil.he.keys import HEParams, keygen, load_keys, save_keys
from veil.he.latency import LatencyEvaluator, decrypt_logits, encrypt_image, input_layout, rotation_steps
from veil.he.models import HEError, Poly, Square, run_plan, to_plan


def _model(first):
    torch.manual_seed(1)
    model = nn.Sequential(first, nn.BatchNorm2d(3) if isinstance(first, nn.Conv2d) else nn.Identity(), Poly(),
                          nn.Flatten(), nn.LazyLinear(20), Square(), nn.Linear(20, 10))
    model(torch.rand(2, 1, 8, 8))  # materialise the lazy layer
    return model.eval()


@pytest.mark.parametrize("first", [nn.Conv2d(1, 3, 3, stride=1, padding=1), nn.Conv2d(1, 3, 3, stride=2),
                                   nn.Sequential(nn.Flatten(), nn.Linear(64, 24))],
                         ids=["padded-conv", "strided-conv", "dense"])
def test_single_image_decryptions_match_the_plaintext_plan(first, tmp_path):
    model = _model(first)
    plan = to_plan(model, (1, 8, 8))
    params = HEParams()
    steps = rotation_steps(plan, params.slots)
    save_keys(keygen(params, steps), tmp_path / "c.key", tmp_path / "s.key")
    client, server = load_keys(tmp_path / "c.key"), load_keys(tmp_path / "s.key")
    evaluator = LatencyEvaluator(server, plan)
    x = torch.rand(3, 1, 8, 8)
    for image in x:
        logits = decrypt_logits(client, evaluator(encrypt_image(client, evaluator.layout, image)), 10)
        want = run_plan(plan, image[None])[0]
        # stated bound: 1e-2 absolute at a 2^28 scale (measured ~3e-3 on MNIST logits up to ~40)
        assert float((logits - want).abs().max()) < 1e-2, (logits, want)


def test_server_keys_without_the_rotation_keys_are_refused():
    plan = to_plan(_model(nn.Conv2d(1, 3, 3, stride=2)), (1, 8, 8))
    keys = keygen(HEParams(), galois_steps=[1, 2])
    with pytest.raises(HEError, match="lack Galois keys for rotation steps"):
        LatencyEvaluator(keys, plan)


def test_the_layout_of_a_convolution_reads_each_window_and_zeros_in_the_padding():
    plan = to_plan(_model(nn.Conv2d(1, 3, 3, stride=1, padding=1)), (1, 8, 8))
    layout = input_layout(plan, HEParams().slots)
    assert layout.gather.shape == (3 * 64, 9) and layout.period == 256 and layout.per_ct == 16
    assert layout.gather[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 8, 9]  # top-left output: padding around
    assert layout.ciphertexts == 1
    with pytest.raises(HEError, match="reads 64 input values, the image has 10"):
        encrypt_image(keygen(HEParams()), layout, torch.rand(10))


def test_average_pooling_runs_encrypted_in_both_modes():
    from veil.he import ciphertexts

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Square(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    plan = to_plan(model.eval(), (1, 8, 8))
    assert plan.depth == 3  # conv, square, pool + flatten + linear folded into one affine layer
    params = HEParams()
    keys = keygen(params, rotation_steps(plan, params.slots))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        want = model.double()(x.double())
    for mode in ("batched", "latency"):
        got = ciphertexts.decrypt(keys, ciphertexts.evaluate(keys, plan, ciphertexts.encrypt(keys, x, mode, plan)))
        assert float((got - want).abs().max()) < 1e-2, mode  # the bound of the test above
