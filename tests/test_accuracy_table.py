"""benchmarks/accuracy.py: merging part files into the table and plots, and one real run of a row on a tiny model."""
import json
import os
import random
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import accuracy  # noqa: E402

SETTINGS = {"dataset": "toy", "model": "m", "n_train": 10, "n_val": 4, "n_test": 6, "classes": ["a", "b", "c"],
            "steps": 3, "k": 2, "batch_size": 2, "max_length": 8, "score_batches": 1, "reselect_every": 1,
            "lr_grid": [1e-4, 1e-3], "lr_beyond": [[1e-5], [1e-2]], "threads": 1, "protocol": accuracy.PROTOCOL}


def _run(row, seed, rng, lowest=3):
    return {"row": row, "seed": seed, "lr": 1e-3, "selection": [lowest, 5], "lowest_block": lowest,
            "test_accuracy": rng.random(), "test_macro_f1": rng.random(), "val_accuracy": rng.random(),
            "peak_memory": rng.randint(1, 2**31), "time_per_step": rng.random() * 3, "total_time": rng.random() * 90,
            "trainable_params": 1000}


def _part(row, seeds, rng, lr=1e-3, settings=SETTINGS, lowest=3):
    return {"settings": dict(settings), "row": row, "chosen_lr": lr, "seeds": list(seeds),
            # the top of the grid won, and the rate beyond it (1e-2) was tried: a complete search
            "lr_search": [{"lr": 1e-4, "val_accuracy": 0.1}, {"lr": lr, "val_accuracy": 0.2},
                          {"lr": 1e-2, "val_accuracy": 0.15}] if 0 in seeds else [],
            "runs": [_run(row, s, rng, lowest + s) for s in seeds]}


def _write(folder, parts):
    os.makedirs(folder, exist_ok=True)
    for i, part in enumerate(parts):
        with open(os.path.join(folder, f"part{i}.json"), "w") as handle:
            json.dump(part, handle)


def test_summary_pools_seeds_across_parts_with_mean_and_sample_std():
    rng = random.Random(7)
    parts = [_part("last", [0, 1], rng), _part("full", [0, 1, 2], rng), _part("last", [2, 3, 4], rng)]
    summary = accuracy.summarize(parts)
    rows = summary["toy"]["rows"]
    assert [r["row"] for r in rows] == ["full", "last"]  # ROWS order, not file order
    last = rows[1]
    runs = parts[0]["runs"] + parts[2]["runs"]
    assert last["seeds"] == [0, 1, 2, 3, 4]
    for key in ("test_accuracy", "test_macro_f1", "peak_memory", "time_per_step"):
        values = [r[key] for r in runs]
        assert last[key] == pytest.approx(statistics.fmean(values))
        assert last[key + "_std"] == pytest.approx(statistics.stdev(values))
    assert last["lowest_block_range"] == [3, 7]


def test_a_seed_run_twice_counts_once():
    rng = random.Random(1)
    first, again = _part("last", [0, 1], rng), _part("last", [1], rng)
    row = accuracy.summarize([first, again])["toy"]["rows"][0]
    assert row["seeds"] == [0, 1]
    assert row["test_accuracy"] == pytest.approx(statistics.fmean(r["test_accuracy"] for r in first["runs"]))


def test_parts_that_disagree_are_refused():
    rng = random.Random(2)
    with pytest.raises(ValueError, match="learning rates"):  # no seed 0 to say which rate is the row's
        accuracy.summarize([_part("last", [1], rng, lr=1e-3), _part("last", [2], rng, lr=1e-4)])
    # CPU seconds at 2 threads are not those at 1, and another protocol measured differently: refused too.
    for other in ({**SETTINGS, "steps": 4}, {**SETTINGS, "threads": 2}, {**SETTINGS, "protocol": 1}):
        with pytest.raises(ValueError, match="different settings"):
            accuracy.summarize([_part("last", [0], rng), _part("full", [0], rng, settings=other)])


def test_a_later_seed_at_a_rate_seed_0_no_longer_chose_is_stale():
    rng = random.Random(5)
    parts = [_part("last", [0], rng, lr=1e-3), _part("last", [1], rng, lr=1e-4), _part("last", [2], rng, lr=1e-3)]
    summary = accuracy.summarize(parts)
    assert summary["toy"]["rows"][0]["seeds"] == [0, 2]
    assert summary["toy"]["stale"] == ["last seed 1 (rate 0.0001, seed 0 chose 0.001)"]
    assert "Stale parts, left out until run again: last seed 1" in accuracy.markdown(summary)


@pytest.mark.parametrize("scores, to_try", [
    ((0.6, 0.7), 1e-2),   # the top of the grid is strictly best: the rate above it
    ((0.7, 0.6), 1e-5),   # the bottom is strictly best: the rate below it
    ((0.7, 0.7), None),   # a tie: the best rate lies between, nothing beyond to try
])
def test_the_search_goes_beyond_the_edge_of_the_grid_that_wins(scores, to_try):
    grid, beyond = [1e-4, 1e-3], [[1e-5], [1e-2]]
    search = [{"lr": lr, "val_accuracy": acc, "val_macro_f1": 0.5} for lr, acc in zip(grid, scores)]
    assert accuracy.beyond_edge(search, grid, beyond) == to_try
    if to_try is not None:  # once tried, the search is complete, whatever the rate beyond scored
        assert accuracy.beyond_edge(search + [{"lr": to_try, "val_accuracy": 0.9, "val_macro_f1": 0.5}],
                                    grid, beyond) is None
    assert accuracy._best(search)["lr"] == (1e-3 if scores == (0.6, 0.7) else 1e-4)  # a tie goes lower


def test_the_search_goes_on_past_the_edge_while_the_outermost_rate_wins():
    grid, beyond = [1e-4, 1e-3], [[1e-5], [3e-3, 1e-2, 3e-2]]

    def search(*scores):
        return [{"lr": lr, "val_accuracy": acc} for lr, acc in zip([1e-4, 1e-3, 3e-3, 1e-2], scores)]

    assert accuracy.beyond_edge(search(0.6, 0.7), grid, beyond) == 3e-3
    assert accuracy.beyond_edge(search(0.6, 0.7, 0.8), grid, beyond) == 1e-2      # 3e-3 won too: on
    assert accuracy.beyond_edge(search(0.6, 0.7, 0.65), grid, beyond) is None     # 3e-3 lost: 1e-3 is the rate
    assert accuracy.beyond_edge(search(0.6, 0.7, 0.8, 0.9), grid, beyond) == 3e-2
    assert accuracy.beyond_edge(search(0.6, 0.7, 0.8, 0.9) + [{"lr": 3e-2, "val_accuracy": 0.95}], grid,
                                beyond) is None                                       # the ladder is spent


def test_the_notes_name_the_widest_gap_between_two_timings_of_the_same_work():
    def part(row, seed, lr, blocks, per_step):
        run = {"seed": seed, "lr": lr, "selection": blocks, "time_per_step": per_step}
        return {"settings": SETTINGS, "row": row, "seeds": [seed], "runs": [run], "lr_search": []}

    parts = [part("laet", 0, 1e-3, [1, 2], 1.0), part("laet_cost", 0, 1e-3, [1, 2], 1.2),  # the same work
             part("last", 1, 1e-3, [4, 5], 2.0), part("cost_aware", 1, 1e-3, [4, 5], 3.0),  # the same work
             part("laet", 1, 1e-3, [1, 2], 1.0), part("laet_cost", 1, 1e-3, [2], 9.0),  # other blocks
             part("random", 0, 1e-3, [1, 2], 9.0)]  # trains its blocks another way than LAET
    note = accuracy._same_work_spread(parts)
    assert note.startswith("2 pair(s)")
    assert "up to 50% (toy seed 1, last and cost_aware at 0.001, blocks [4, 5])" in note
    assert accuracy._same_work_spread(parts[4:]).startswith("no pair")


def test_markdown_has_one_line_per_row_with_mean_and_std():
    rng = random.Random(3)
    parts = [_part("laet", [0, 1, 2], rng), _part("last", [0, 1, 2], rng)]
    vote = _part("probe_vote", [0, 1], rng)
    for run in vote["runs"]:
        run.update(time_per_step=None, lowest_block=None, trainable_params=0)
    summary = accuracy.summarize(parts + [vote])
    text = accuracy.markdown(summary)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 3  # header + rows
    laet = summary["toy"]["rows"][2]
    assert laet["row"] == "laet"
    assert f"{laet['test_accuracy']:.3f} ± {laet['test_accuracy_std']:.3f}" in lines[3]
    assert lines[1].startswith("| LAET probe vote") and "| - |" in lines[1]  # no step time, no trained block


def test_merge_writes_json_markdown_and_both_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rng = random.Random(4)
    _write(tmp_path / "parts", [_part(row, [0, 1, 2], rng) for row in ("last", "laet", "full")])
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n## The table\n\n{accuracy.README_BEGIN}\nold\n{accuracy.README_END}\n\nAfter.\n")
    accuracy.merge(str(tmp_path / "parts"), str(tmp_path / "out"), name="acc", readme=str(readme))
    data = json.loads((tmp_path / "out" / "acc.json").read_text())
    assert [r["row"] for r in data["datasets"]["toy"]["rows"]] == ["full", "last", "laet"]
    assert "device" in data and "date_utc" in data
    assert "| LAET |" in (tmp_path / "out" / "acc.md").read_text()
    for name in ("acc_time.png", "acc_memory.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    # The README's copy: the table between the markers, its headings one level down, the rest untouched.
    text = readme.read_text()
    assert text.startswith("# title\n\n## The table\n\n") and text.endswith(f"{accuracy.README_END}\n\nAfter.\n")
    assert "old" not in text and "\n#### toy: 3 classes" in text and "| LAET |" in text
    with pytest.raises(ValueError, match="markers"):
        accuracy.readme_with_table("# no markers\n", "### toy\n")


def test_the_readme_quotes_the_committed_table():
    """README.md's accuracy section is accuracy.md as committed (``--merge`` writes both)."""
    with open(accuracy.README, encoding="utf-8") as handle:
        readme = handle.read()
    with open(os.path.join(accuracy.RESULTS_DIR, "accuracy.md"), encoding="utf-8") as handle:
        assert accuracy.readme_with_table(readme, handle.read()) == readme


def _tiny_setup(tmp_path):
    from train_fixtures import labelled_texts, save_model

    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.data import TextData, encode_labels

    folder = save_model(tmp_path / "model", layers=4, seed=0)
    model, tokenizer = load_model_and_tokenizer(folder, dtype="float32", device="cpu")

    def data(count, seed):
        texts, labels = labelled_texts(count, seed)
        ids, classes = encode_labels(labels, ["high", "low"])
        return TextData(texts, ids, classes)

    return model, tokenizer, data(32, 1), data(8, 2), data(12, 3)


@pytest.mark.slow  # a few seconds alone; minutes on a loaded machine (transformers, peft, accelerate)
def test_one_row_trains_a_copy_and_reports_its_costs(tmp_path, monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")  # the pooling kernel has its own tests
    model, tokenizer, train, val, test = _tiny_setup(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    result = accuracy.run_one(model, tokenizer, "last", train, val, test, lr=1e-3, seed=0, steps=2, k=2,
                              batch_size=4, max_length=16, score_batches=1, reselect_every=1,
                              out=str(tmp_path / "run"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the base model is untouched
    assert result["selection"] == [2, 3] and result["lowest_block"] == 2 and result["steps"] == 2
    blocks = sum(p.numel() for i in (2, 3) for p in model.model.layers[i].parameters())
    head = model.config.hidden_size * 2 + 2  # one linear head, 2 classes, on the last block
    assert result["trainable_params"] == blocks + head
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["val_accuracy"] is not None
    assert result["time_per_step"] > 0 and result["total_time"] >= result["time_per_step"] * 2
    assert not os.path.exists(tmp_path / "run" / "model")  # the export is skipped


@pytest.mark.slow
def test_probe_vote_trains_nothing_and_lora_trains_only_adapters(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    model, tokenizer, train, val, test = _tiny_setup(tmp_path)
    common = dict(seed=0, steps=1, k=2, batch_size=4, max_length=16, score_batches=2, reselect_every=1)
    vote = accuracy.run_one(model, tokenizer, "probe_vote", train, None, test, lr=None, out=str(tmp_path / "v"),
                            **common)
    assert vote["trainable_params"] == 0 and vote["lowest_block"] is None and len(vote["head_layers"]) == 2
    lora = accuracy.run_one(model, tokenizer, "lora_all", train, val, test, lr=1e-3, out=str(tmp_path / "l"),
                            **common)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    # r=8 adapters on every linear of every block, plus the head; far fewer than the blocks' weights.
    block_weights = sum(p.numel() for p in model.model.layers.parameters())
    assert hidden * 2 + 2 < lora["trainable_params"] < block_weights
    assert lora["lowest_block"] == 0 and lora["selection"] == list(range(layers))


@pytest.mark.slow
def test_lora_adapters_start_from_the_runs_seed_whatever_ran_before_in_the_process(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    model, tokenizer, train, _, test = _tiny_setup(tmp_path)
    starts = []
    wrap = peft.get_peft_model

    def recording(*args, **kwargs):  # the adapters as PEFT drew them, before any step
        wrapped = wrap(*args, **kwargs)
        starts.append({n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_A" in n})
        return wrapped

    monkeypatch.setattr(peft, "get_peft_model", recording)
    for seed, left_by_an_earlier_run in ((0, 11), (0, 12), (1, 11)):
        torch.manual_seed(left_by_an_earlier_run)
        accuracy.run_one(model, tokenizer, "lora_all", train, None, test, lr=1e-3, seed=seed, steps=1, k=2,
                         batch_size=4, max_length=16, score_batches=1, reselect_every=1,
                         out=str(tmp_path / f"l{len(starts)}"))
    same_seed, other_seed = starts[1], starts[2]
    assert starts[0] and all(torch.equal(starts[0][n], same_seed[n]) for n in starts[0])
    assert not all(torch.equal(starts[0][n], other_seed[n]) for n in starts[0])


@pytest.mark.slow
def test_frozen_probe_picks_its_block_on_validation_and_k_rows_take_laets_k(tmp_path, monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    model, tokenizer, train, val, test = _tiny_setup(tmp_path)
    common = dict(seed=0, steps=1, batch_size=4, max_length=16, score_batches=1, reselect_every=1,
                  probe_examples=32)
    probe = accuracy.run_one(model, tokenizer, "frozen_probe", train, val, test, lr=None, k=None,
                             out=str(tmp_path / "p"), **common)
    per_block = probe["val_accuracy_per_block"]
    assert len(per_block) == 4 and probe["selection"] == [per_block.index(max(per_block))]
    assert probe["val_accuracy"] == max(per_block) and probe["trainable_params"] == 0
    # Every seed extracts its features on its own copy of the model, inside its measured window, as the training
    # rows train their own copy: a cache of features from an earlier seed counted them in one seed's cost only.
    import laet_fast.embed

    extracted_from = []
    real_extract = laet_fast.embed.layer_embeddings

    def counted(model_, *args, **kwargs):
        extracted_from.append(model_)
        return real_extract(model_, *args, **kwargs)

    monkeypatch.setattr(laet_fast.embed, "layer_embeddings", counted)
    for seed in (1, 2):
        accuracy.run_one(model, tokenizer, "frozen_probe", train, val, test, lr=None, k=None,
                         out=str(tmp_path / f"p{seed}"), **{**common, "seed": seed})
    assert len(extracted_from) == 6 and all(m is not model for m in extracted_from)  # train, val, test per seed
    laet = accuracy.run_one(model, tokenizer, "laet", train, val, test, lr=1e-3, k=None, out=str(tmp_path / "a"),
                            **common)
    last = accuracy.run_one(model, tokenizer, "last", train, val, test, lr=1e-3, k=None, out=str(tmp_path / "b"),
                            **common)
    k = len(laet["first_selection"])
    assert last["laet_selection"] == laet["first_selection"]  # LAET's own choice, made as the Trainer makes it
    assert last["selection"] == list(range(4 - k, 4))


def _vader_sdist(path, lines):
    import io
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        add(tar, "hutto_ICWSM_2014/tweets_GroundTruth.txt", "\r\n".join(lines).encode())
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "vaderSentiment-3.3.2/" + accuracy.VADER_ARCHIVE, inner.getvalue())
    return str(path)


def test_vader_labels_come_from_the_mean_rating_with_a_neutral_band(tmp_path):
    # The layout of the vaderSentiment 3.3.2 sdist: a tarball inside the tarball, id<TAB>rating<TAB>text, CRLF.
    sdist = _vader_sdist(tmp_path / "v.tar.gz", ["1\t-0.51\ta\tb", "2\t-0.5\tc", "3\t0.5\td", "4\t0.500001\te"])
    texts, labels = accuracy.read_vader("tweets_GroundTruth.txt", sdist)
    assert texts == ["a\tb", "c", "d", "e"]
    assert labels == ["negative", "neutral", "neutral", "positive"]


def test_a_row_with_one_seed_shows_no_spread_and_is_marked_incomplete():
    rng = random.Random(9)
    summary = accuracy.summarize([_part("last", [0], rng), _part("laet", [0, 1, 2], rng)])
    lines = [line for line in accuracy.markdown(summary).splitlines() if line.startswith("| last-k")]
    assert len(lines) == 1 and "±" not in lines[0] and lines[0].endswith("| 1 (incomplete) |")


def _row(row, accuracies, total_time):
    return {"row": row, "title": row, "seeds": list(range(len(accuracies))), "total_time": total_time,
            "test_accuracy": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}


def test_the_defaults_rule_picks_the_cheapest_row_within_one_std_of_the_best():
    # best: full (0.84 ± 0.02); laet (0.83) is within one std and costs half; last (0.80) is not.
    block = {"rows": [_row("frozen_probe", [0.78, 0.79, 0.80], 200.0), _row("full", [0.82, 0.84, 0.86], 700.0),
                      _row("laet", [0.82, 0.83, 0.84], 350.0), _row("last", [0.79, 0.80, 0.81], 100.0)]}
    rec = accuracy.recommend(block)
    assert (rec["best"], rec["pick"], rec["pick_fine_tuned"]) == ("full", "laet", "laet")
    assert rec["within_fine_tuned"] == ["full", "laet"]
    assert not rec["complete"]  # rows of the list are missing
    others = [_row(row, [0.6, 0.61, 0.62], 50.0) for row in accuracy.ROWS if row not in ("frozen_probe", "full",
                                                                                          "laet", "last")]
    assert accuracy.recommend({"rows": block["rows"] + others})["complete"]
    assert rec["fine_tuning_gain"] == pytest.approx(0.84 - 0.79)
    # A frozen probe within one std of the best wins on cost among every row, not among the fine-tuned ones.
    block["rows"][0] = _row("frozen_probe", [0.81, 0.83, 0.85], 200.0)
    rec = accuracy.recommend(block)
    assert (rec["pick"], rec["pick_fine_tuned"]) == ("frozen_probe", "laet")
    # Totals within TIME_TIE of the cheapest are a tie, which accuracy breaks.
    dearer = 660.0 * (1 + 0.9 * accuracy.TIME_TIE)
    tied = {"rows": [_row("full", [0.82, 0.84, 0.86], dearer), _row("laet", [0.82, 0.83, 0.84], 660.0)]}
    assert accuracy.recommend(tied)["pick"] == "full"
    tied["rows"][0]["total_time"] = 660.0 * (1 + 1.1 * accuracy.TIME_TIE)  # no longer a tie
    assert accuracy.recommend(tied)["pick"] == "laet"
    # A row with one seed makes the pick provisional, and the markdown says so.
    block["rows"].append(_row("random", [0.5], 300.0))
    assert not accuracy.recommend(block)["complete"]
    assert "provisional" in "\n".join(accuracy._recommendation_lines(block))


def test_the_default_across_datasets_is_within_one_std_on_the_most_datasets_then_cheapest():
    def lr_row(row, accuracies, total_time, lr, search=()):
        return {**_row(row, accuracies, total_time), "lr": lr,
                "lr_search": [{"lr": rate, "val_accuracy": val} for rate, val in search]
                             or [{"lr": lr, "val_accuracy": 0.5}]}

    # a: full best (0.84 ± 0.02), laet and grad_norm within; b: laet best (0.73 ± 0.02), full within, grad_norm
    # not. LoRA is best on both, but no TrainConfig method trains it: not in the trainer's pool.
    summary = {"a": {"rows": [lr_row("full", [0.82, 0.84, 0.86], 700.0, 3e-4),
                              lr_row("laet", [0.82, 0.83, 0.84], 400.0, 3e-3,
                                     [(3e-4, 0.70), (1e-3, 0.72), (3e-3, 0.83), (1e-2, 0.60)]),
                              lr_row("grad_norm", [0.82, 0.83, 0.84], 300.0, 3e-4),
                              lr_row("lora_laet", [0.9, 0.9, 0.9], 100.0, 1e-3)]},
               "b": {"rows": [lr_row("full", [0.70, 0.72, 0.74], 700.0, 3e-4),
                              lr_row("laet", [0.71, 0.73, 0.75], 380.0, 1e-3,
                                     [(3e-4, 0.74), (1e-3, 0.75), (3e-3, 0.74)]),
                              lr_row("grad_norm", [0.60, 0.61, 0.62], 300.0, 3e-4),
                              lr_row("lora_laet", [0.9, 0.9, 0.9], 100.0, 1e-3)]}}
    rec = accuracy.recommend_default(summary)
    assert rec["within_on"] == {"full": ["a", "b"], "laet": ["a", "b"], "grad_norm": ["a"]}
    assert (rec["candidates"], rec["row"], rec["method"]) == (["full", "laet"], "laet", "laet")
    assert rec["per_second"] == "laet" and rec["cost"] == {"full": 1400.0, "laet": 780.0}
    # The rate each dataset chose differs; of those trained on both, 3e-3 has the best mean validation accuracy
    # (0.785 against 0.735 for 1e-3 and 0.72 for 3e-4; 1e-2 ran on a only).
    assert rec["lrs"] == {"a": 3e-3, "b": 1e-3} and rec["lr"] == 3e-3
    assert rec["val_by_lr"] == pytest.approx({3e-4: 0.72, 1e-3: 0.735, 3e-3: 0.785})
    # A rate that diverged on one dataset is not a candidate, and a tie goes to the lower rate.
    summary["b"]["rows"][1]["lr_search"][2] = {"lr": 3e-3, "val_accuracy": 0.0, "failed": "diverged"}
    assert accuracy.recommend_default(summary)["lr"] == 1e-3
    summary["a"]["rows"][1]["lr_search"][1]["val_accuracy"] = 0.70
    summary["b"]["rows"][1]["lr_search"][1]["val_accuracy"] = 0.74
    assert accuracy.recommend_default(summary)["lr"] == 3e-4  # 0.72 each
    assert not rec["complete"]
    # The callback's pool: full and grad_norm; on b grad_norm is not within one std of full.
    callback = accuracy.recommend_default(summary, accuracy.CALLBACK_ROWS)
    assert (callback["row"], callback["method"], callback["within_on"]) == ("full", "all", {"full": ["a", "b"],
                                                                                             "grad_norm": ["a"]})
    # Summed costs within TIME_TIE are a tie that mean accuracy breaks: full at 790 s against laet's 780 s.
    summary["a"]["rows"][0]["total_time"] = summary["b"]["rows"][0]["total_time"] = 395.0
    rec = accuracy.recommend_default(summary)
    assert rec["row"] == "full"
    # Accuracy per CPU second alone (no tie) takes laet, 780 s against 790 s; the markdown shows both.
    assert rec["per_second"] == "laet"
    assert "780 CPU s summed against 790" in "\n".join(accuracy._default_lines(summary))
    # The markdown names both defaults.
    for block in summary.values():
        block.update(settings={**SETTINGS, "majority": 0.5}, stale=[])
        for r in block["rows"]:
            r.update(test_macro_f1=None, test_macro_f1_std=None, peak_memory=None, peak_memory_std=None,
                     time_per_step=None, time_per_step_std=None, total_time_std=0.0, trainable_params=0,
                     lowest_block_range=None)
    text = accuracy.markdown(summary)
    assert "Across the datasets: the trainer's default (provisional)" in text
    assert "**full fine-tuning (all blocks)** (`all`)" in text
    assert "Across the datasets: LaetCallback's default (provisional)" in text


def _fake_table_run(tmp_path, monkeypatch, val, fail_at=()):
    """accuracy.main with load_split, the model and run_one faked: run_one scores ``val[lr]`` (raising TrainError
    at ``fail_at``) and records (lr, seed) in the list returned."""
    import bench_utils

    import laet_fast.loading
    from laet_fast.data import TextData
    from laet_fast.train.trainer import TrainError

    data = TextData(["a", "b", "c", "d"], [0, 1, 0, 1], ["neg", "pos"])
    monkeypatch.setattr(accuracy, "load_split", lambda *a: (data, data, data))
    monkeypatch.setattr(laet_fast.loading, "load_model_and_tokenizer", lambda *a, **k: (None, None))
    monkeypatch.setattr(bench_utils, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(accuracy, "PARTS_DIR", str(tmp_path / "accuracy_parts"))
    calls = []

    def run_one(model, tokenizer, row, train, val_data, test, *, lr, seed, **kwargs):
        calls.append((lr, seed))
        if lr in fail_at:
            raise TrainError("the loss was NaN or inf 5 steps in a row")
        return {"row": row, "lr": lr, "seed": seed, "selection": [1], "val_accuracy": val[lr], "val_macro_f1": 0.5,
                "test_accuracy": val[lr], "time_per_step": 1.0, "wall_per_step": 1.0, "total_time": 9.0,
                "peak_memory": 1, "lowest_block": 1, "test_macro_f1": 0.5, "trainable_params": 1}

    monkeypatch.setattr(accuracy, "run_one", run_one)
    return calls


def test_a_rate_beyond_the_grid_that_diverges_ends_the_search_at_the_grid(tmp_path, monkeypatch):
    calls = _fake_table_run(tmp_path, monkeypatch, {3e-5: 0.6, 3e-4: 0.7}, fail_at=(1e-3,))
    accuracy.main(["--dataset", "rt", "--rows", "last", "--seeds", "0,1"])
    assert calls == [(3e-5, 0), (3e-4, 0), (1e-3, 0), (3e-4, 1)]  # the process went on
    part = json.loads((tmp_path / "accuracy_parts" / "rt__last__s0.json").read_text())
    assert part["chosen_lr"] == 3e-4 and "NaN" in part["lr_search"][2]["failed"]
    row = accuracy.summarize([part])["rt"]["rows"][0]
    assert row["lr_to_try"] is None and row["lr_search"][2]["failed"]


def test_a_grid_rate_that_diverges_ends_the_search_in_its_direction_and_a_row_that_always_diverges_is_skipped(
        tmp_path, monkeypatch):
    # 3e-4 diverges, 3e-5 trains: 3e-5 is the best that trained, but going down from it is not called for by a
    # divergence above it.
    calls = _fake_table_run(tmp_path, monkeypatch, {3e-5: 0.6}, fail_at=(3e-4,))
    accuracy.main(["--dataset", "rt", "--rows", "last", "--seeds", "0,1"])
    assert calls == [(3e-5, 0), (3e-4, 0), (3e-5, 1)]
    # Every rate diverges: the part says so (no run, no rate), the later seeds do not run, and the process goes on
    # to the next row.
    calls = _fake_table_run(tmp_path, monkeypatch, {None: 0.5}, fail_at=(3e-5, 3e-4))
    accuracy.main(["--dataset", "rt", "--rows", "full,probe_vote", "--seeds", "0,1"])
    assert calls == [(3e-5, 0), (3e-4, 0), (None, 0), (None, 1)]
    part = json.loads((tmp_path / "accuracy_parts" / "rt__full__s0.json").read_text())
    assert (part["chosen_lr"], part["runs"]) == (None, [])
    summary = accuracy.summarize([part])
    assert summary["rt"]["rows"][0]["diverged"] and "every rate diverged" in accuracy.markdown(summary)
    calls.clear()
    accuracy.main(["--dataset", "rt", "--rows", "full", "--seeds", "0,1"])
    assert calls == []  # nothing left to run


def test_a_table_with_every_row_at_3_seeds_is_complete():
    """The rows that train nothing have no search: they never wait on a rate to try."""
    rng = random.Random(4)
    parts = [_part(row, [0, 1, 2], rng, lr=None if row in accuracy.NO_TRAINING else 1e-3)
             for row in accuracy.ROWS]
    for part in parts:
        if part["row"] in accuracy.NO_TRAINING:
            part["lr_search"] = []
    summary = accuracy.summarize(parts)
    assert all(r["lr_to_try"] is None for r in summary["toy"]["rows"])
    assert accuracy.recommend(summary["toy"])["complete"]
    assert accuracy.recommend_default(summary)["complete"]
    parts[-1]["runs"] = parts[-1]["runs"][:2]  # one row with 2 seeds: provisional
    assert not accuracy.recommend(accuracy.summarize(parts)["toy"])["complete"]


def test_a_search_won_at_the_grid_edge_goes_beyond_it_on_resume_and_later_seeds_follow(tmp_path, monkeypatch):
    """Parts from a search that stopped at the grid's winning edge are finished on resume: the rate beyond runs,
    and when it wins, the later seeds trained at the old rate run again at the new one."""
    calls = _fake_table_run(tmp_path, monkeypatch, {3e-5: 0.6, 3e-4: 0.7, 1e-3: 0.8, 3e-3: 0.75})
    argv = ["--dataset", "rt", "--rows", "last", "--seeds", "0,1"]
    accuracy.main(argv)
    assert calls == [(3e-5, 0), (3e-4, 0), (1e-3, 0), (3e-3, 0), (1e-3, 1)]  # on past 1e-3 until 3e-3 lost
    # The parts as the old search left them: it stopped at the grid's top, and seed 1 trained at that rate.
    parts = tmp_path / "accuracy_parts"
    first, second = (json.loads((parts / f"rt__last__s{s}.json").read_text()) for s in (0, 1))
    first["lr_search"] = first["lr_search"][:2]
    first["chosen_lr"], first["runs"] = 3e-4, [first["lr_search"][1]]
    second["chosen_lr"], second["runs"][0]["lr"] = 3e-4, 3e-4
    (parts / "rt__last__s0.json").write_text(json.dumps(first))
    (parts / "rt__last__s1.json").write_text(json.dumps(second))
    calls.clear()
    accuracy.main(argv)
    assert calls == [(1e-3, 0), (3e-3, 0), (1e-3, 1)]  # the search goes on from the edge; seed 1 again at 1e-3
    assert [json.loads((parts / f"rt__last__s{s}.json").read_text())["chosen_lr"] for s in (0, 1)] == [1e-3, 1e-3]
    calls.clear()
    accuracy.main(argv)
    assert calls == []  # complete: nothing runs again


def test_a_search_cut_in_the_middle_resumes_where_it_was(tmp_path, monkeypatch):
    """The seed-0 part is written after every run of the search: a process killed in the middle of it (the end
    of a session) keeps the rates it finished, and the next process runs only the rest."""
    calls = _fake_table_run(tmp_path, monkeypatch, {3e-5: 0.6, 3e-4: 0.7, 1e-3: 0.8, 3e-3: 0.75})
    real_run_one = accuracy.run_one

    def killed_at_1e_3(*args, lr, **kwargs):
        if lr == 1e-3:
            raise KeyboardInterrupt  # the process ends here
        return real_run_one(*args, lr=lr, **kwargs)

    monkeypatch.setattr(accuracy, "run_one", killed_at_1e_3)
    argv = ["--dataset", "rt", "--rows", "last", "--seeds", "0"]
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(argv)
    part = json.loads((tmp_path / "accuracy_parts" / "rt__last__s0.json").read_text())
    assert [r["lr"] for r in part["lr_search"]] == [3e-5, 3e-4] and part["chosen_lr"] == 3e-4
    row = accuracy.summarize([part])["rt"]["rows"][0]
    assert row["lr_to_try"] == 1e-3 and "search unfinished" in accuracy.markdown(accuracy.summarize([part]))
    monkeypatch.setattr(accuracy, "run_one", real_run_one)
    calls.clear()
    accuracy.main(argv)
    assert calls == [(1e-3, 0), (3e-3, 0)]
    # Cut after the grid's first rate: the next process runs the grid's second one, then goes on.
    (tmp_path / "accuracy_parts" / "rt__last__s0.json").write_text(json.dumps(
        {**part, "lr_search": part["lr_search"][:1], "runs": part["lr_search"][:1], "chosen_lr": 3e-5}))
    calls.clear()
    accuracy.main(argv)
    assert calls == [(3e-4, 0), (1e-3, 0), (3e-3, 0)]


def test_a_grid_outside_the_rates_beyond_it_is_refused():
    with pytest.raises(SystemExit, match="must lie between the rates tried beyond its edges"):
        accuracy.main(["--dataset", "rt", "--rows", "last", "--lrs", "1e-4,3e-3"])
