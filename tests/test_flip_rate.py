"""Flip rates on CIFAR-P arrays and ImageNet-P videos the tests write, scored by models whose
predictions and rankings the tests choose, against values worked out by hand."""

import io
import itertools
import json
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import advews
from advews.data.perturbation_sets import (
    PERTURBATIONS,
    open_cifar_p,
    open_imagenet_p,
    open_perturbation_set,
    read_video,
)
from advews.errors import AdvewsError
from advews.evaluation.flip_rate import evaluate_flip_rates, format_flip_table, top5_distances


class RowScores(nn.Module):
    """Class scores = the first 10 pixels of channel 0's first row: a frame spells its own ranking."""

    def forward(self, x):
        return x[:, 0, 0, :10]


class BrightnessLevel(nn.Module):
    """Level = floor(10 x mean pixel); scores fall with the distance to it (lower class first on
    ties), so the ranking survives video compression of flat grey frames."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append((len(x), self.training, torch.is_grad_enabled()))
        level = (x.mean(dim=(1, 2, 3)) * 10).floor().clamp(0, 9)
        k = torch.arange(10.0)
        return -(k - level[:, None]) ** 2 - 0.01 * k


# Top-1 class of each frame: 3 sequences of 5 frames.
PREDICTIONS = [[0, 1, 1, 1, 1], [2, 2, 2, 2, 2], [3, 4, 3, 4, 3]]
# Previous frame: A flips 1 of 4, B 0, C 4 of 4. First frame: A 4 of 4, B 0, C 2 of 4.
FP_CONSECUTIVE = (1 / 4 + 0 + 1) / 3
FP_FIRST = (1 + 0 + 2 / 4) / 3
# RowScores ranks the top class p first, then the others in class order. Top-5 distances:
# 0 -> 1 and 1 -> 0: 2 (two places swap); 3 -> 4 and 4 -> 3: 8 (the top class drops to 5th and the
# 5th climbs to 1st: |1 - 5| + |5 - 1|). Previous frame: A (2 + 0 + 0 + 0) / 4, B 0, C 8.
# First frame: A 2 for all 4, B 0, C (8 + 0 + 8 + 0) / 4.
T5D_CONSECUTIVE = (0.5 + 0 + 8) / 3
T5D_FIRST = (2 + 0 + 4) / 3


def row_frame(top: int) -> np.ndarray:
    row = np.array([100 - k for k in range(10)], np.uint8)
    row[top] = 200
    return np.stack([np.stack([row] * 3, axis=-1)] * 2)  # (2, 10, 3)


def grey_frame(level: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), int((level + 0.5) * 25.5), np.uint8)


def write_cifar_p(root, frame=row_frame, names=("brightness", "gaussian_noise")):
    array = np.stack([np.stack([frame(p) for p in seq]) for seq in PREDICTIONS])
    for name in names:
        np.save(root / f"{name}.npy", array)
    return array


def write_video(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 1, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame[:, :, ::-1].copy())  # OpenCV writes BGR
    writer.release()


def write_imagenet_p(root, names=("brightness", "gaussian_noise")):
    wnids = ["n01440764", "n01440764", "n01443537"]  # two videos of one class, one of another
    for name in names:
        for i, (wnid, seq) in enumerate(zip(wnids, PREDICTIONS)):
            write_video(root / name / wnid / f"ILSVRC2012_val_{i:08d}.mp4", [grey_frame(p) for p in seq])


def scores_of(order):
    """Scores giving ``order`` (classes, best first) as the ranking."""
    scores = torch.zeros(len(order))
    scores[list(order)] = torch.arange(len(order), 0, -1, dtype=torch.float)
    return scores


def test_top5_distance_on_hand_made_rankings():
    identity = list(range(10))
    cases = {  # compared ranking -> distance from the identity ranking
        tuple(identity): 0,
        (1, 0, 2, 3, 4, 5, 6, 7, 8, 9): 2,  # top two swap
        (1, 2, 3, 4, 5, 6, 0, 7, 8, 9): 9,  # class 0 falls to 7th: |1 - 6| + 4 places move up by 1
        (5, 6, 7, 8, 9, 0, 1, 2, 3, 4): 15,  # a new top 5: 5 + 4 + 3 + 2 + 1
        (0, 1, 2, 3, 4, 9, 8, 7, 6, 5): 0,  # below the top 5 does not count
    }
    compared = torch.stack([scores_of(order) for order in cases])
    reference = scores_of(identity).expand_as(compared)
    assert top5_distances(reference, compared).tolist() == list(cases.values())
    # Ties rank the lower class first (scipy's 'ordinal'): all-equal scores rank 0..9, and a
    # one-hot on class 9 puts it first and pushes 0..4 down one place each.
    assert int(top5_distances(torch.zeros(10), torch.eye(10)[9])) == 5


def test_top5_distance_matches_the_papers_double_sum():
    generator = torch.Generator().manual_seed(0)
    reference, compared = torch.randn(200, 12, generator=generator), torch.randn(200, 12, generator=generator)
    reference[:100, 5:] = -10  # some pairs with overlapping top 5s, not only disjoint ones
    compared[:100] = reference[:100] + 0.3 * compared[:100]

    def paper(ref, cmp):
        """sum_{i=1..5} sum_{j=min(i, s(i))+1..max(i, s(i))} 1(1 <= j - 1 <= 5), s(i) = rank in cmp of ref's i-th."""
        ref_order, cmp_rank = np.argsort(-ref, kind="stable"), np.argsort(np.argsort(-cmp, kind="stable")) + 1
        sigma = {i: cmp_rank[ref_order[i - 1]] for i in range(1, 6)}
        return sum(1 <= j - 1 <= 5 for i in range(1, 6) for j in range(min(i, sigma[i]) + 1, max(i, sigma[i]) + 1))

    expected = [paper(r.numpy(), c.numpy()) for r, c in zip(reference, compared)]
    assert top5_distances(reference, compared).tolist() == expected
    assert len(set(expected)) > 5  # many different distances, not one case repeated


def test_cifar_p_flip_probability_and_top5_distance_by_hand(tmp_path):
    write_cifar_p(tmp_path)
    result = evaluate_flip_rates(RowScores(), open_cifar_p(str(tmp_path)))
    brightness, noise = result["perturbations"]["brightness"], result["perturbations"]["gaussian_noise"]
    assert brightness["compared_with"] == "previous frame" and noise["compared_with"] == "first frame"
    assert brightness["flip_probability"] == pytest.approx(FP_CONSECUTIVE)
    assert noise["flip_probability"] == pytest.approx(FP_FIRST)
    assert brightness["top5_distance"] == pytest.approx(T5D_CONSECUTIVE)
    assert noise["top5_distance"] == pytest.approx(T5D_FIRST)
    assert result["mean_flip_probability"] == pytest.approx((FP_CONSECUTIVE + FP_FIRST) / 2)
    assert result["mean_top5_distance"] == pytest.approx((T5D_CONSECUTIVE + T5D_FIRST) / 2)
    assert result["n_sequences"] == 6 and brightness["n_sequences"] == 3
    assert result["mfr"] is None and result["mt5d"] is None and not result["standard_set"]
    assert list(result["perturbations"]) == ["gaussian_noise", "brightness"]  # the paper's order


def test_baseline_normalisation(tmp_path):
    write_cifar_p(tmp_path)
    data = open_cifar_p(str(tmp_path))
    baseline = {"brightness": {"flip_probability": 0.5, "top5_distance": 4.0},
                "gaussian_noise": {"flip_probability": 0.25, "top5_distance": 1.0}}
    result = evaluate_flip_rates(RowScores(), data, baseline=baseline)
    rows = result["perturbations"]
    assert rows["brightness"]["flip_rate"] == pytest.approx(FP_CONSECUTIVE / 0.5)
    assert rows["gaussian_noise"]["top5_rate"] == pytest.approx(T5D_FIRST / 1.0)
    assert result["mfr"] == pytest.approx((FP_CONSECUTIVE / 0.5 + FP_FIRST / 0.25) / 2)
    assert result["mt5d"] == pytest.approx((T5D_CONSECUTIVE / 4.0 + T5D_FIRST / 1.0) / 2)
    assert "mFR 141.67%" in format_flip_table(result)
    # An earlier result is a baseline as it stands: normalised by itself, every rate is 1.
    again = evaluate_flip_rates(RowScores(), data, baseline=rows)
    assert again["mfr"] == pytest.approx(1.0) and again["mt5d"] == pytest.approx(1.0)
    with pytest.raises(AdvewsError, match="'gaussian_noise'"):
        evaluate_flip_rates(RowScores(), data, baseline={"brightness": baseline["brightness"]})


def test_imagenet_p_videos_read_back_and_score_as_the_arrays(tmp_path):
    write_imagenet_p(tmp_path / "inp")
    frames = read_video(str(tmp_path / "inp" / "brightness" / "n01443537" / "ILSVRC2012_val_00000002.mp4"))
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    levels = np.floor(frames.mean(axis=(1, 2, 3)) / 25.5)
    assert levels.tolist() == PREDICTIONS[2]  # lossy, but every frame stays in its level
    (tmp_path / "cp").mkdir()
    write_cifar_p(tmp_path / "cp", frame=grey_frame)
    from_videos = evaluate_flip_rates(BrightnessLevel(), open_imagenet_p(str(tmp_path / "inp")))
    from_arrays = evaluate_flip_rates(BrightnessLevel(), open_cifar_p(str(tmp_path / "cp")))
    assert from_videos["benchmark"] == "imagenet-p" and from_videos["n_sequences"] == 6
    assert from_videos["perturbations"]["brightness"]["flip_probability"] == pytest.approx(FP_CONSECUTIVE)
    assert from_videos["perturbations"]["gaussian_noise"]["flip_probability"] == pytest.approx(FP_FIRST)
    assert from_videos["perturbations"] == from_arrays["perturbations"]


def test_imagenet_p_limit_takes_classes_in_turn(tmp_path):
    write_imagenet_p(tmp_path, names=("tilt",))
    data = open_perturbation_set(f"imagenet-p:{tmp_path}", max_sequences=2)
    assert data.perturbations == ("tilt",) and data.n_sequences("tilt") == 2
    assert [p.split("/")[-2] for p in data.sources["tilt"]] == ["n01440764", "n01443537"]


def test_batched_in_eval_mode_without_gradients(tmp_path):
    write_cifar_p(tmp_path, frame=grey_frame)
    data = open_perturbation_set(f"cifar10-p:{tmp_path}", perturbations=["brightness"])
    model = BrightnessLevel().train()
    small = evaluate_flip_rates(model, data, batch_size=3)
    assert model.training  # restored
    assert [size for size, _, _ in model.calls] == [3, 3, 3, 3, 3]  # 15 frames, batches across sequences
    assert not any(training or grad for _, training, grad in model.calls)
    assert small == evaluate_flip_rates(model, data, batch_size=256)


def test_a_set_of_the_ten_is_standard(tmp_path):
    write_cifar_p(tmp_path, names=PERTURBATIONS + ("spatter",))
    data = open_cifar_p(str(tmp_path), max_sequences=1)
    assert data.perturbations == PERTURBATIONS + ("spatter",) and data.n_sequences("tilt") == 1
    standard = evaluate_flip_rates(RowScores(), open_cifar_p(str(tmp_path), perturbations=PERTURBATIONS))
    assert standard["standard_set"] and "Table 3" not in format_flip_table(standard)
    assert "Table 3" in format_flip_table(evaluate_flip_rates(RowScores(), data))


BAD_ARRAYS = {
    "float32": np.zeros((2, 3, 4, 4, 3), np.float32),
    "4-D": np.zeros((2, 4, 4, 3), np.uint8),
    "one frame": np.zeros((2, 1, 4, 4, 3), np.uint8),
    "grey": np.zeros((2, 3, 4, 4), np.uint8),
}


@pytest.mark.parametrize("kind", BAD_ARRAYS)
def test_bad_arrays_are_refused(tmp_path, kind):
    np.save(tmp_path / "rotate.npy", BAD_ARRAYS[kind])
    with pytest.raises(AdvewsError, match=r"rotate\.npy must be uint8 \(sequences, frames >= 2.*got "):
        open_cifar_p(str(tmp_path))


def test_bad_input_is_refused_with_the_value_named(tmp_path):
    cases = [
        (lambda: open_cifar_p(str(tmp_path / "missing")), "cifar10-p directory not found: .*missing"),
        (lambda: open_cifar_p(str(tmp_path)), "no cifar10-p perturbation found in .*<root>/<perturbation>.npy"),
        (lambda: open_imagenet_p(str(tmp_path)), "no imagenet-p perturbation found"),
        (lambda: open_cifar_p(str(tmp_path), perturbations=["fog"]), "unknown perturbation 'fog'"),
        (lambda: open_cifar_p(str(tmp_path), perturbations=["tilt"]), r"file not found: .*tilt\.npy"),
        (lambda: open_cifar_p(str(tmp_path), max_sequences=0), "max_sequences must be at least 1, got 0"),
        (lambda: open_perturbation_set("cifar10-c:" + str(tmp_path)), "bad perturbation set 'cifar10-c:"),
    ]
    for call, message in cases:
        with pytest.raises(AdvewsError, match=message):
            call()
    (tmp_path / "scale" / "n01440764").mkdir(parents=True)
    with pytest.raises(AdvewsError, match=r"no \.mp4 videos in .*scale"):
        open_imagenet_p(str(tmp_path))
    (tmp_path / "scale" / "n01440764" / "broken.mp4").write_bytes(b"not a video" * 10)
    data = open_imagenet_p(str(tmp_path))
    with pytest.raises(AdvewsError, match=r"cannot read .*broken\.mp4 as a video"):
        evaluate_flip_rates(BrightnessLevel(), data)


def test_videos_of_different_sizes_and_models_without_five_classes_are_refused(tmp_path):
    for i, size in enumerate((32, 16)):
        write_video(tmp_path / "rotate" / "n01440764" / f"{i}.mp4", [grey_frame(p, size) for p in (1, 2)])
    with pytest.raises(AdvewsError, match=r"1\.mp4 has 16x16 frames but the videos before it have 32x32"):
        evaluate_flip_rates(BrightnessLevel(), open_imagenet_p(str(tmp_path)))
    write_cifar_p(tmp_path)
    two_classes = nn.Sequential(RowScores(), nn.Linear(10, 2))
    with pytest.raises(AdvewsError, match=r"classes >= 5.*shape \(15, 2\)"):
        evaluate_flip_rates(two_classes, open_cifar_p(str(tmp_path)))


def test_every_ordering_of_a_swap_is_symmetric():
    """Swapping two of the top 5 costs 2 x their distance whichever frame is the reference."""
    for a, b in itertools.combinations(range(5), 2):
        order = list(range(10))
        order[a], order[b] = order[b], order[a]
        forward = top5_distances(scores_of(range(10)), scores_of(order))
        backward = top5_distances(scores_of(order), scores_of(range(10)))
        assert int(forward) == int(backward) == 2 * (b - a)


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    write_cifar_p(tmp_path)
    data = open_cifar_p(str(tmp_path))
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        evaluate_flip_rates(RowScores(), data)
        assert ("brightness" in stream.getvalue()) == shown


def test_cli_perturbations_table_json_and_baseline(tmp_path, monkeypatch, capsys):
    """advews-eval --perturbations prints the table and writes it under 'perturbations'; a baseline
    file (here the run itself) normalises every rate to 1."""
    from advews.cli.eval import main as eval_main

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "cifar10p"
    root.mkdir()
    write_cifar_p(root)
    np.savez(tmp_path / "d.npz", x=np.stack([row_frame(p) for p in (0, 1)]), y=np.array([0, 1]))
    flags = ["--model", "test_flip_rate:RowScores", "--data", f"npz:{tmp_path / 'd.npz'}",
             "--perturbations", f"cifar10-p:{root}"]
    assert eval_main([*flags, "--output", "fr.json"]) == 0
    out = capsys.readouterr().out
    assert "brightness" in out and "mean flip probability" in out and "mFR" not in out
    rows = json.loads((tmp_path / "fr.json").read_text())["perturbations"]["perturbations"]
    assert rows["brightness"]["flip_probability"] == pytest.approx(FP_CONSECUTIVE)
    assert rows["gaussian_noise"]["flip_probability"] == pytest.approx(FP_FIRST)
    assert rows["brightness"]["top5_distance"] == pytest.approx(T5D_CONSECUTIVE)
    assert eval_main([*flags, "--perturbation-baseline", "fr.json", "--output", "norm.json"]) == 0
    assert "mFR 100.00%, mT5D 100.00%" in capsys.readouterr().out
    result = advews.evaluate(RowScores(), data=f"npz:{tmp_path / 'd.npz'}", perturbations=f"cifar10-p:{root}",
                             perturbation_baseline="fr.json")
    assert result["perturbations"]["mfr"] == pytest.approx(1.0) and result["attacks"] == {}


def test_cli_perturbation_flags_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from advews.cli.eval import main as eval_main

    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.stack([row_frame(p) for p in (0, 1)]), y=np.array([0, 1]))
    (tmp_path / "bad.json").write_text('{"clean_acc": 1}')
    write_cifar_p(tmp_path)
    flags = ["--model", "test_flip_rate:RowScores", "--data", f"npz:{tmp_path / 'd.npz'}"]
    for extra, message in ((["--perturbations", "cifar10-q:x"], "cifar10-q:x"),
                           (["--perturbations", f"cifar10-p:{tmp_path}", "--perturbation-baseline", "bad.json"],
                            "bad.json holds no per-perturbation flip rates"),
                           (["--perturbation-baseline", "bad.json"], "give both")):
        assert eval_main([*flags, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
