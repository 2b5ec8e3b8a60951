"""LayerScores: read-only mapping, JSON round trip (NaN included), text table, PNG plot."""
import json
import math
import random

import pytest

from laet_fast import LayerScores

NAMES = [f"model.layers.{i}" for i in range(5)]


def make_scores(seed=0):
    rng = random.Random(seed)
    metrics = {
        "act_rms": [rng.uniform(0.1, 3.0) for _ in NAMES],
        "block_influence": [rng.uniform(0.0, 0.5) for _ in NAMES[:-1]] + [float("nan")],
        "custom_metric": [rng.uniform(-1e7, 1e7) for _ in NAMES[:-1]] + [float("inf")],
    }
    history = {"grad_norm": [[rng.uniform(0, 2) for _ in NAMES] for _ in range(3)]}
    history["grad_norm"][1][2] = float("nan")
    return LayerScores(metrics, NAMES, num_tokens=1234, history=history), metrics, history


def same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def test_mapping_behaviour():
    scores, metrics, history = make_scores()
    assert len(scores) == 3
    # Known metrics first, in the documented order, then the others sorted.
    assert list(scores) == ["block_influence", "act_rms", "custom_metric"] == scores.metrics
    assert "act_rms" in scores and "grad_norm" not in scores
    assert same(scores["act_rms"], metrics["act_rms"])
    assert dict(scores.items()).keys() == set(metrics)
    assert scores.names == NAMES and scores.num_layers == 5 and scores.num_tokens == 1234
    assert same(scores.history["grad_norm"][1], history["grad_norm"][1])
    with pytest.raises(KeyError, match="available"):
        scores["missing"]


def test_read_only():
    scores, metrics, _ = make_scores()
    with pytest.raises(TypeError):
        scores["act_rms"] = [0.0] * 5
    with pytest.raises(TypeError):
        del scores["act_rms"]
    # Edits of what was handed out, or of the inputs, do not reach the scores.
    scores["act_rms"][0] = -1.0
    scores.names[0] = "changed"
    scores.history["grad_norm"][0][0] = -1.0
    metrics["act_rms"][1] = -1.0
    assert scores["act_rms"][0] != -1.0 and scores["act_rms"][1] != -1.0
    assert scores.names[0] == NAMES[0] and scores.history["grad_norm"][0][0] != -1.0


def test_wrong_length_is_refused():
    with pytest.raises(ValueError, match="has 2 values but there are 3 layers"):
        LayerScores({"x": [1.0, 2.0]}, ["a", "b", "c"])


def test_json_round_trip_with_nan_and_inf(tmp_path):
    scores, metrics, history = make_scores(seed=1)
    path = tmp_path / "scores.json"
    scores.to_json(str(path))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    json.loads(text)
    back = LayerScores.from_json(str(path))
    assert back.names == NAMES and back.num_tokens == 1234 and list(back) == list(scores)
    for metric in metrics:
        assert same(back[metric], metrics[metric]), metric
    assert math.isnan(back["block_influence"][-1]) and back["custom_metric"][-1] == math.inf
    assert same(back.history["grad_norm"][1], history["grad_norm"][1])
    assert back.to_dict().keys() == scores.to_dict().keys()


def test_from_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read layer scores"):
        LayerScores.from_json(str(bad))
    other = tmp_path / "other.json"
    other.write_text('{"something": 1}')
    with pytest.raises(ValueError, match="not a LayerScores record"):
        LayerScores.from_json(str(other))


def test_table_content():
    scores, metrics, _ = make_scores(seed=2)
    table = scores.table()
    assert str(scores) == table
    lines = table.splitlines()
    header = lines[0].split()
    assert header == ["layer", "name", "block_influence", "act_rms", "custom_metric"]
    rows = lines[2:2 + len(NAMES)]
    assert len(rows) == len(NAMES)
    for i, row in enumerate(rows):
        cells = row.split()
        assert cells[0] == str(i) and cells[1] == NAMES[i]
        assert float(cells[3]) == pytest.approx(metrics["act_rms"][i], abs=1e-4)
        assert float(cells[4]) == pytest.approx(metrics["custom_metric"][i], rel=1e-3)
    assert rows[-1].split()[2] == "nan" and rows[-1].split()[4] == "inf"
    # Aligned: every metric column ends at the same character position in every row.
    ends = {len(line) for line in [lines[0]] + rows}
    assert len(ends) == 1
    assert "5 layers, 1234 tokens" in lines[-1]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    scores, _, _ = make_scores(seed=3)
    path = tmp_path / "scores.png"
    scores.plot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib_names_the_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    scores, _, _ = make_scores()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        scores.plot(str(tmp_path / "x.png"))


@pytest.mark.parametrize("suffix,magic", [(".jpg", b"\xff\xd8\xff"), (".pdf", b"%PDF"), (".svg", b"<?xml"),
                                          (".PNG", b"\x89PNG")])
def test_plot_honours_the_suffix(tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    scores, _, _ = make_scores(seed=4)
    path = tmp_path / f"scores{suffix}"
    scores.plot(str(path))
    assert path.read_bytes().startswith(magic)


@pytest.mark.parametrize("name", ["scores.xyz", "scores"])
def test_plot_refuses_a_suffix_it_cannot_write(tmp_path, name):
    pytest.importorskip("matplotlib")
    scores, _, _ = make_scores(seed=4)
    with pytest.raises(ValueError, match=r"is not an image format matplotlib writes; use one of .*\.png"):
        scores.plot(str(tmp_path / name))
    assert not (tmp_path / name).exists()


def test_plot_log_scale_title_and_selection(tmp_path):
    pytest.importorskip("matplotlib")
    from laet_fast.selection import Selection

    metrics = {"block_influence": [0.1, 0.2, 0.05, 0.3, 0.15], "act_rms": [0.5, 3.0, 80.0, 900.0, 26000.0],
               "act_absmax": [1.0, float("nan"), 10.0, 100.0, 1000.0], "relative_change": [0.1] * 5}
    scores = LayerScores(metrics, NAMES, num_tokens=99,
                         metadata={"model": "/models/smollm2-laet/", "data": "/data/reviews.csv"})
    fig = scores.plot(str(tmp_path / "s.png"), selection=Selection((1, 3), num_layers=5))
    axes = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_visible()}
    assert axes["act_rms"].get_yscale() == "log" and axes["act_absmax"].get_yscale() == "log"
    assert axes["block_influence"].get_yscale() == "linear"
    title = fig._suptitle.get_text()
    assert "model smollm2-laet" in title and "data reviews.csv" in title and "2 selected" in title
    for metric, ax in axes.items():  # the selected blocks are marked on every panel
        marked = [line for line in ax.get_lines() if line.get_label() == "selected"]
        assert len(marked) == 1 and list(marked[0].get_xdata()) == [1, 3], metric
    with pytest.raises(ValueError, match=r"selection blocks \[7\] are out of range"):
        scores.plot(str(tmp_path / "t.png"), selection=[7])
    # A metric with a non-positive value stays linear.
    linear = LayerScores({"act_rms": [0.0, 1.0, 2.0, 3.0, 4.0]}, NAMES).plot(str(tmp_path / "u.png"))
    assert linear.axes[0].get_yscale() == "linear"


def test_metadata_round_trips(tmp_path):
    scores, _, _ = make_scores(seed=5)
    meta = {"model": "m", "data": "d.csv", "batches": 3, "max_length": 64, "version": "0.1.0"}
    scored = LayerScores(dict(scores.items()), NAMES, num_tokens=7, metadata=meta)
    scored.to_json(str(tmp_path / "s.json"))
    assert LayerScores.from_json(str(tmp_path / "s.json")).metadata == meta
    assert scores.metadata == {}
