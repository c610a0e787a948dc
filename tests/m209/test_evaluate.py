"""Test-set evaluation (veil.m209.evaluate): exact accuracies on hand-built predictions, the breakdowns,
refusals of bad input, the PNG plots and the JSON summary."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from veil.m209.dataset import PackedSet
from veil.m209.evaluate import (
    HISTOGRAM_EDGES,
    evaluate_predictions,
    per_key_pin_accuracy,
    plot_accuracy_vs_letters,
    plot_test,
    write_summary,
)
from veil.m209.machine import LUG_PAIRS, NUM_PINS, WHEEL_STARTS

PNG = b"\x89PNG\r\n\x1a\n"


def _lugs(singles: int, overlaps: int) -> np.ndarray:
    """(22,) counts: ``singles`` bars with one lug (round-robin over wheels 1..6), ``overlaps`` with two
    (round-robin over the 15 overlap pairs), the rest with none."""
    counts = np.zeros(len(LUG_PAIRS), np.uint8)
    for i in range(singles):
        counts[1 + i % 6] += 1
    for i in range(overlaps):
        counts[7 + i % 15] += 1
    counts[0] = 27 - singles - overlaps
    return counts


def _one_hot(lugs: np.ndarray) -> np.ndarray:
    return np.eye(28, dtype=np.float32)[lugs]


def _random_truth(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lugs = np.stack([np.bincount(rng.integers(0, 22, 27), minlength=22) for _ in range(n)]).astype(np.uint8)
    return {"pins": rng.integers(0, 2, (n, NUM_PINS), dtype=np.uint8), "lugs": lugs,
            "overlaps": lugs[:, 7:].sum(1).astype(np.uint8), "letters": 104}


def test_perfect_predictions_score_one_everywhere():
    t = _random_truth(40)
    s = evaluate_predictions(t["pins"].astype(np.float32), _one_hot(t["lugs"]), **t)
    assert s["keys"] == 40 and s["letters"] == 104
    assert s["pin_accuracy"] == s["keys_all_pins_right"] == s["lug_accuracy"] == s["lug_exact_fraction"] == 1.0
    assert s["pin_accuracy_per_wheel"] == [1.0] * 6
    for breakdown in (s["by_overlaps"], s["by_non_shared"]):
        assert sum(g["keys"] for g in breakdown.values()) == 40
        assert all(g["pin_accuracy"] == g["lug_accuracy"] == g["keys_all_pins_right"] == 1.0
                   for g in breakdown.values())
    assert s["by_overlaps"].keys() == {str(v) for v in np.unique(t["overlaps"])}
    assert s["by_non_shared"].keys() == {str(v) for v in np.unique(t["lugs"][:, 1:7].sum(1))}
    assert s["per_key_pin_accuracy_histogram"]["counts"] == [0] * 20 + [40]
    np.testing.assert_array_equal(per_key_pin_accuracy(t["pins"], t["pins"]), np.ones(40))


def _hand_built() -> tuple[np.ndarray, np.ndarray, dict]:
    """Three keys. Key 0 (2 overlaps, 10 single lugs): truth all pins 0; 2 wrong on wheel 1, all 17 wrong on
    wheel 6. Key 1 (3 overlaps, 10 singles): all pins 1, one wrong on wheel 2, one lug count wrong; a probability
    of exactly 0.5 counts as effective. Key 2 (2 overlaps, 12 singles): perfect."""
    pins = np.array([[0] * 131, [1] * 131, [0, 1] * 65 + [1]], np.uint8)
    lugs = np.stack([_lugs(10, 2), _lugs(10, 3), _lugs(12, 2)])
    probs = pins.astype(np.float32) * 0.9 + 0.05
    probs[0, [3, 20]] = 0.7
    probs[0, WHEEL_STARTS[5]:] = 0.99
    probs[1, WHEEL_STARTS[1] + 4] = 0.2
    probs[1, 0] = 0.5
    lug_probs = _one_hot(lugs) * 0.8 + 0.2 / 28
    lug_probs[1, 5] = np.roll(lug_probs[1, 5], 1)
    truth = {"pins": pins, "lugs": lugs, "overlaps": np.array([2, 3, 2], np.uint8), "letters": 52}
    return probs, lug_probs, truth


def test_hand_built_errors_give_exact_accuracies_and_breakdowns():
    probs, lug_probs, truth = _hand_built()
    s = evaluate_predictions(probs, lug_probs, **truth)
    assert s["keys"] == 3 and s["letters"] == 52
    assert s["pin_accuracy"] == pytest.approx(1 - 20 / 393)
    assert s["pin_accuracy_per_wheel"] == pytest.approx([76 / 78, 74 / 75, 1, 1, 1, 34 / 51])
    assert s["keys_all_pins_right"] == pytest.approx(1 / 3)
    assert s["lug_accuracy"] == pytest.approx(65 / 66)
    assert s["lug_exact_fraction"] == pytest.approx(2 / 3)
    assert s["by_overlaps"] == {
        "2": {"keys": 2, "pin_accuracy": pytest.approx(243 / 262), "lug_accuracy": 1.0,
              "keys_all_pins_right": 0.5},
        "3": {"keys": 1, "pin_accuracy": pytest.approx(130 / 131), "lug_accuracy": pytest.approx(21 / 22),
              "keys_all_pins_right": 0.0}}
    assert s["by_non_shared"] == {
        "10": {"keys": 2, "pin_accuracy": pytest.approx(242 / 262), "lug_accuracy": pytest.approx(43 / 44),
               "keys_all_pins_right": 0.0},
        "12": {"keys": 1, "pin_accuracy": 1.0, "lug_accuracy": 1.0, "keys_all_pins_right": 1.0}}
    per_key = per_key_pin_accuracy(probs, truth["pins"])
    np.testing.assert_allclose(per_key, [112 / 131, 130 / 131, 1.0])
    hist = s["per_key_pin_accuracy_histogram"]
    assert hist["edges"] == list(HISTOGRAM_EDGES) and len(hist["edges"]) == 22
    assert hist["edges"][:2] == [0.0, 0.5] and hist["edges"][-1] == pytest.approx(1.0)
    assert hist["counts"][15] == 1 and hist["counts"][20] == 2 and sum(hist["counts"]) == 3


def test_keys_below_half_fall_in_the_first_bin():
    t = _random_truth(5)
    s = evaluate_predictions(1.0 - t["pins"], _one_hot(t["lugs"]), **t)
    assert s["pin_accuracy"] == 0.0 and s["per_key_pin_accuracy_histogram"]["counts"] == [5] + [0] * 20


def test_packed_set_input_takes_letters_from_meta():
    probs, lug_probs, t = _hand_built()
    data = PackedSet(path=Path("x"), meta={"letters": 52}, keystream=np.zeros((3, 52), np.uint8),
                     ciphertext=np.zeros((3, 52), np.uint8), plaintext=np.zeros((3, 52), np.uint8),
                     positions=np.zeros((3, 6), np.uint8), pins=t["pins"], lugs=t["lugs"], overlaps=t["overlaps"],
                     fingerprints=np.zeros((3, 16), np.uint8))
    assert evaluate_predictions(probs, lug_probs, data) == evaluate_predictions(probs, lug_probs, **t)
    with pytest.raises(ValueError, match="pass either data or letters, not both"):
        evaluate_predictions(probs, lug_probs, data, letters=52)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p, lp, t: (p[:, :130], lp, t), r"pin_probs: expected shape \(N, 131\), got \(3, 130\)"),
    (lambda p, lp, t: (p, lp[:, :, :27], t), r"lug_probs: expected shape \(N, 22, 28\), got \(3, 22, 27\)"),
    (lambda p, lp, t: (p[:2], lp, t), r"disagree on N.*'pin_probs': 2"),
    (lambda p, lp, t: (np.where(np.eye(3, 131) > 0, np.nan, p), lp, t), r"pin_probs: probabilities must be finite"),
    (lambda p, lp, t: (p, lp * np.nan, t), r"lug_probs: probabilities must be finite"),
    (lambda p, lp, t: (p, lp, {**t, "pins": t["pins"] * 2}), r"pins: values must be 0 or 1"),
    (lambda p, lp, t: (p, lp, {**t, "lugs": t["lugs"][:, :21]}), r"lugs: expected shape \(N, 22\), got \(3, 21\)"),
    (lambda p, lp, t: (p, lp, {**t, "lugs": t["lugs"] + 1}), r"lugs: .* sum to 27"),
    (lambda p, lp, t: (p, lp, {**t, "overlaps": t["overlaps"] + 1}), r"overlaps: must equal"),
    (lambda p, lp, t: (p, lp, {**t, "letters": 0}), r"letters: expected a positive int, got 0"),
    (lambda p, lp, t: (p, lp, {k: v for k, v in t.items() if k != "lugs"}), r"pass all of pins=, lugs="),
    (lambda p, lp, t: (p[:0], lp[:0], {**t, **{k: t[k][:0] for k in ("pins", "lugs", "overlaps")}}), r"N = 0"),
])
def test_bad_input_is_refused_with_the_argument_and_shape(change, message):
    probs, lug_probs, truth = change(*_hand_built())
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(probs, lug_probs, **truth)


def test_every_problem_is_reported_at_once():
    probs, lug_probs, truth = _hand_built()
    with pytest.raises(ValueError) as e:
        evaluate_predictions(probs[:, :5], lug_probs[:, :3], **{**truth, "letters": -1})
    assert "pin_probs: expected shape" in str(e.value) and "lug_probs: expected shape" in str(e.value)
    assert "letters: expected a positive int" in str(e.value)
    with pytest.raises(ValueError, match=r"per_key_pin_accuracy: pin_probs: found NaN"):
        per_key_pin_accuracy(probs * np.nan, truth["pins"])
    with pytest.raises(ValueError, match=r"pins: expected shape \(N, 131\), got \(131,\)"):
        per_key_pin_accuracy(probs, truth["pins"][0])


def test_plots_are_png_files_and_the_summary_round_trips(tmp_path):
    probs, lug_probs, truth = _hand_built()
    s = evaluate_predictions(probs, lug_probs, **truth)
    paths = plot_test(s, per_key_pin_accuracy(probs, truth["pins"]), tmp_path / "plots", prefix="t")
    assert [p.name for p in paths] == ["t-pin-histogram.png", "t-by-overlaps.png", "t-per-wheel.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    runs = [{**s, "letters": n, "pin_accuracy": a, "pin_accuracy_per_wheel": [a] * 6}
            for n, a in ((200, 0.95), (52, 0.7), (104, 0.85))]
    out = plot_accuracy_vs_letters(runs, tmp_path / "vs.png")
    assert out.read_bytes().startswith(PNG)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["plots", "vs.png", *(p.name for p in paths)])
    write_summary(s, tmp_path / "summary.json")
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text) == s and text.startswith('{\n  "keys": 3')
    with pytest.raises(ValueError, match=r"per_key_accuracy: expected shape \(3,\)"):
        plot_test(s, np.ones(2), tmp_path)
    with pytest.raises(ValueError, match="one per number of letters"):
        plot_accuracy_vs_letters([s, s], tmp_path / "x.png")


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    probs, lug_probs, truth = _hand_built()
    s = evaluate_predictions(probs, lug_probs, **truth)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"veil\[plots\]"):
        plot_test(s, np.ones(3), tmp_path)
    assert not list(tmp_path.iterdir())
