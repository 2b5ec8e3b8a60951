"""layer_impact and restore on tiny saved models, against float64 computations from the models themselves."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import laet_fast.merge.impact as impact
from laet_fast.kernels.slerp import slerp_reference
from laet_fast.measure import measure_cpu_peak
from laet_fast.merge import layer_impact, policy_t, restore
from laet_fast.merge.checkpoint import Checkpoint, SafetensorsWriter
from laet_fast.scores import LayerScores
from merge_models import random_texts, save_pair
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), layers=4)


@pytest.fixture(scope="module")
def sharded_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("sharded"), layers=4, shard="100KB", seed=3)


def block_tensors(model, index, ndim=2):
    return {name: p.detach() for name, p in model.named_parameters()
            if name.startswith(f"model.layers.{index}.") and p.dim() >= ndim}


def expected_weight_metrics(base, tuned, index, rank=8):
    """The four weight metrics of block ``index`` in float64, written out from the parameters."""
    wb, wt = block_tensors(base, index), block_tensors(tuned, index)
    b = {n: w.double() for n, w in wb.items()}
    t = {n: wt[n].double() for n in wb}
    base_sq = sum((w ** 2).sum() for w in b.values())
    tuned_sq = sum((w ** 2).sum() for w in t.values())
    diff_sq = sum(((t[n] - b[n]) ** 2).sum() for n in b)
    numel = sum(w.numel() for w in b.values())
    snr = sum(((t[n] - b[n]) ** 2).sum() / b[n].var(correction=0) for n in b) / numel
    svb = sum(torch.linalg.svdvals(w)[:rank].sum() for w in b.values())
    svt = sum(torch.linalg.svdvals(w)[:rank].sum() for w in t.values())
    return {
        "weight_rel_change": float((diff_sq / base_sq).sqrt()),
        "weight_cosine": float(sum((b[n] * t[n]).sum() for n in b) / (base_sq * tuned_sq).sqrt()),
        "weight_snr_change": float(snr.sqrt()),
        "sv_drop": float(1 - svt / svb),
    }


def test_reader_matches_safetensors_single_and_sharded(pair, sharded_pair):
    for folder in (pair[0], sharded_pair[1]):
        checkpoint = Checkpoint(folder)
        want = {}
        for file in checkpoint.files:
            want.update(load_file(os.path.join(folder, file)))
        assert set(checkpoint.tensors) == set(want)
        for name, tensor in want.items():
            assert torch.equal(checkpoint.read(name), tensor), name
    assert len(Checkpoint(sharded_pair[1]).files) > 1


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7), "c": torch.tensor(2.5),
               "d": torch.empty(0, 4), "e": torch.randn(2, 3, 4).half()}
    path = str(tmp_path / "x.safetensors")
    writer = SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    got = load_file(path)
    assert set(got) == set(tensors) and all(torch.equal(got[n], tensors[n]) for n in tensors)


def test_weight_metrics_match_float64(pair):
    _, _, base, tuned = pair
    scores = layer_impact(pair[0], pair[1])
    assert scores.names == [f"model.layers.{i}" for i in range(4)] and scores.num_tokens == 0
    for index in range(4):
        want = expected_weight_metrics(base, tuned, index)
        for metric, value in want.items():
            got = scores[metric][index]
            tolerance = 1e-6 if metric == "weight_cosine" else 1e-4 * abs(value) + 1e-7
            assert abs(got - value) <= tolerance, f"block {index} {metric}: {got} vs {value}"
    # Later blocks were perturbed more: the metrics see it.
    assert scores["weight_rel_change"] == sorted(scores["weight_rel_change"])


def test_sharded_checkpoints_give_the_same_scores(sharded_pair):
    _, _, base, tuned = sharded_pair
    scores = layer_impact(sharded_pair[0], sharded_pair[1])
    want = expected_weight_metrics(base, tuned, 2)
    assert abs(scores["weight_rel_change"][2] - want["weight_rel_change"]) <= 1e-4 * want["weight_rel_change"]


def test_randomized_singular_values_match_exact(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(150, 150, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(130, 130, generator=gen)).Q[:, :130]
    sigma = 10.0 * 0.7 ** torch.arange(130.0)
    w = (u[:, :130] * sigma) @ v.T
    exact = impact.top_singular_values(w, 8)
    monkeypatch.setattr(impact, "EXACT_SVD_MAX_DIM", 16)
    approximate = impact.top_singular_values(w, 8, seed=3)
    torch.testing.assert_close(approximate, sigma[:8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exact, sigma[:8], rtol=1e-4, atol=1e-5)


def block_bytes(model, index):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.startswith(f"model.layers.{index}."))


def model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_layer_impact_memory_is_one_block_of_each(tmp_path):
    base_dir, tuned_dir, base, tuned = save_pair(tmp_path, layers=8)
    peak = measure_cpu_peak(lambda: layer_impact(base_dir, tuned_dir))
    largest = max(p.numel() for n, p in base.named_parameters() if "layers" in n and p.dim() == 2) * 4
    # One block of each model in its stored dtype, plus float32 working copies of one matrix pair
    # (their difference, SVD workspace). Holding two blocks of each would exceed it.
    bound = 2 * block_bytes(base, 0) + 4 * largest
    assert peak <= bound, f"peak {peak} B > bound {bound} B"
    assert bound < model_bytes(base)  # the bound is far from two full models


def test_restore_endpoints_and_middle(pair, tmp_path):
    base_dir, tuned_dir, base, tuned = pair
    out = str(tmp_path / "merged")
    applied = restore(base_dir, tuned_dir, out=out, t={0: 0.0, 2: 1.0, 3: 0.4})
    assert applied == {0: 0.0, 2: 1.0, 3: 0.4}
    merged = load_file(os.path.join(out, "model.safetensors"))
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    for name, tensor in merged.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(tensor, base_sd[name]), name
        elif name.startswith("model.layers.3."):
            want = slerp_reference(base_sd[name], tuned_sd[name], 0.4)
            torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-6)
            assert not torch.equal(tensor, tuned_sd[name])
        else:
            assert torch.equal(tensor, tuned_sd[name]), name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(out).pad_token == "[PAD]"
    assert torch.isfinite(loaded(torch.tensor([[3, 4, 5]])).logits).all()


def test_restore_sharded_keeps_shards_and_bf16(tmp_path):
    base_dir, tuned_dir, base, tuned = save_pair(tmp_path, layers=3, shard="60KB", dtype=torch.bfloat16, seed=5)
    out = str(tmp_path / "merged")
    restore(base_dir, tuned_dir, out=out, t={1: 0.0})
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index == json.load(open(os.path.join(tuned_dir, "model.safetensors.index.json"))) | {
        "metadata": index["metadata"]}
    merged = Checkpoint(out)
    assert merged.files == Checkpoint(tuned_dir).files
    for name, param in base.state_dict().items():
        want = param if name.startswith("model.layers.1.") else tuned.state_dict()[name]
        got = merged.read(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_restore_memory_is_a_few_tensors(tmp_path):
    base_dir, tuned_dir, base, _ = save_pair(tmp_path, layers=8)
    t = {i: 0.5 for i in range(8)}
    peak = measure_cpu_peak(lambda: restore(base_dir, tuned_dir, out=str(tmp_path / "m"), t=t))
    largest = max(p.numel() * p.element_size() for p in base.parameters())
    bound = 8 * largest  # base, tuned, result and float32/interpreter working copies of one tensor
    assert peak <= bound, f"peak {peak} B > bound {bound} B"
    assert bound < model_bytes(base)


def test_policies_rank_by_impact():
    scores = LayerScores({"weight_rel_change": [0.1, 0.5, 0.3, 0.2, 0.4, 0.05]}, [f"l.{i}" for i in range(6)])
    assert policy_t(scores, "conservative") == {1: 0.25, 2: 0.25, 4: 0.25}
    assert policy_t(scores, "balanced") == {1: 0.5, 4: 0.5}
    assert policy_t(scores, "aggressive") == {1: 0.75, 4: 0.75}
    with_data = LayerScores({"weight_rel_change": [0.1] * 6, "general_ppl_delta": [0.2, -1, 0.1, -3, 0, 0.5]},
                            [f"l.{i}" for i in range(6)])
    assert policy_t(with_data, "balanced") == {1: 0.5, 3: 0.5}
    # Only blocks whose restoration helps (delta < 0) or that changed at all are candidates.
    assert policy_t(with_data, "conservative") == {1: 0.25, 3: 0.25}
    unchanged = LayerScores({"weight_rel_change": [0.0, 0.3, 0.0, 0.0, 0.1, 0.0]}, [f"l.{i}" for i in range(6)])
    assert policy_t(unchanged, "conservative") == {1: 0.25, 4: 0.25}
    with pytest.raises(ValueError, match="unknown policy 'wild'"):
        policy_t(scores, "wild")


def test_restore_with_policy_uses_layer_impact(pair, tmp_path):
    applied = restore(pair[0], pair[1], out=str(tmp_path / "m"), policy="conservative")
    assert applied == policy_t(layer_impact(pair[0], pair[1]), "conservative") == {2: 0.25, 3: 0.25}


@pytest.mark.parametrize("side", ["right", "left"])
def test_mean_token_nll_matches_float64_row_by_row(side):
    # Independent reference: each row's real tokens alone (no padding, no mask), log-softmax in float64, token t+1
    # scored from the logits at t; token-weighted over the rows.
    from tiny_models import random_batch

    model = tiny_model("llama", seed=2)
    ids, mask = random_batch(model.config.vocab_size, batch=3, seq=9, side=side,
                             generator=torch.Generator().manual_seed(4))
    total = count = 0
    for row_ids, row_mask in zip(ids, mask):
        real = row_ids[row_mask.bool()][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=real).logits[0].double(), -1)
        total -= float(logp[:-1].gather(1, real[0, 1:, None]).sum())
        count += real.shape[1] - 1
    nll, tokens = impact.mean_token_nll(model, [{"input_ids": ids, "attention_mask": mask}])
    assert tokens == count and nll == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_restore_impact_on_data_matches_direct_evaluation(pair, tmp_path):
    base_dir, tuned_dir, base, tuned = pair
    general, domain = tmp_path / "general.txt", tmp_path / "domain.txt"
    general.write_text("\n".join(random_texts(6, seed=1)) + "\n")
    domain.write_text("\n".join(random_texts(5, seed=2)) + "\n")
    scores = layer_impact(base_dir, tuned_dir, general_data=str(general), domain_data=str(domain),
                          batch_size=4, device="cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tuned_dir)

    def mean_nll(model, path):
        # One text at a time (no padding), token-weighted: independent of the batched code.
        total = count = 0
        for text in open(path).read().split("\n"):
            if text:
                ids = tokenizer(text, return_tensors="pt").input_ids
                with torch.no_grad():
                    total += float(model(ids, labels=ids).loss.double()) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
        return total / count

    tuned_general, tuned_domain = mean_nll(tuned, general), mean_nll(tuned, domain)
    for index in (0, 3):
        restored = AutoModelForCausalLM.from_pretrained(tuned_dir).eval()
        restored.model.layers[index].load_state_dict(base.model.layers[index].state_dict())
        want_general = math.exp(mean_nll(restored, general)) - math.exp(tuned_general)
        want_domain = mean_nll(restored, domain) - tuned_domain
        assert abs(scores["general_ppl_delta"][index] - want_general) <= 1e-4 * math.exp(tuned_general)
        assert abs(scores["domain_loss_delta"][index] - want_domain) <= 1e-5


def test_different_shapes_and_architectures_are_refused(tmp_path, pair):
    other = tiny_model("llama", seed=0, num_hidden_layers=4, intermediate_size=140)
    other.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \[72, 136\]"):
        layer_impact(pair[0], str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="down_proj.weight' has shape"):
        restore(pair[0], str(tmp_path / "wide"), out=str(tmp_path / "m"), t={0: 0.5})
    tiny_model("gpt2", seed=0).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="different architectures: model_type"):
        layer_impact(pair[0], str(tmp_path / "gpt2"))
    deeper = tiny_model("llama", seed=0, num_hidden_layers=5)
    deeper.config.num_hidden_layers = 4  # same config keys, one more block of tensors
    deeper.save_pretrained(str(tmp_path / "deeper"))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.4.input_layernorm.weight' is in .*deeper but not"):
        restore(pair[0], str(tmp_path / "deeper"), out=str(tmp_path / "m"), t={0: 0.5})
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("t,match", [({0: 1.5}, r"in \[0, 1\]"), ({1: -0.1}, r"in \[0, 1\]"),
                                     ({0: float("nan")}, r"in \[0, 1\]"), ({7: 0.5}, "blocks are the integers 0..3"),
                                     ({"0": 0.5}, "blocks are the integers")])
def test_bad_t_is_refused(pair, tmp_path, t, match):
    with pytest.raises(ValueError, match=match):
        restore(pair[0], pair[1], out=str(tmp_path / "m"), t=t)
    assert os.listdir(tmp_path) == []


def test_policy_and_t_exclusive(pair, tmp_path):
    with pytest.raises(ValueError, match="exactly one of policy"):
        restore(pair[0], pair[1], out=str(tmp_path / "m"))
    with pytest.raises(ValueError, match="exactly one of policy"):
        restore(pair[0], pair[1], out=str(tmp_path / "m"), policy="balanced", t={0: 0.5})


def test_non_finite_weights_are_named(pair, tmp_path):
    broken = tiny_model("llama", seed=0, num_hidden_layers=4)
    with torch.no_grad():
        broken.model.layers[2].self_attn.v_proj.weight[3, 1] = float("inf")
        broken.model.embed_tokens.weight[0, 0] = float("nan")
    broken.save_pretrained(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match=r"'model.layers.2.self_attn.v_proj.weight' in .*broken has 1 non-finite"):
        layer_impact(pair[0], str(tmp_path / "broken"))
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' in .*broken has 1 non-finite"):
        restore(pair[0], str(tmp_path / "broken"), out=str(tmp_path / "m"), t={0: 0.5})
    assert sorted(os.listdir(tmp_path)) == ["broken"]  # no partial output left behind


def test_out_must_be_new_or_empty_and_not_an_input(pair, tmp_path):
    for out in (pair[0], pair[1], pair[1] + "/"):
        with pytest.raises(ValueError, match="is one of the input folders"):
            restore(pair[0], pair[1], out=out, t={0: 0.5})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        restore(pair[0], pair[1], out=str(tmp_path / "full"), t={0: 0.5})
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    restore(pair[0], pair[1], out=str(tmp_path / "empty"), t={0: 0.5})
    assert os.path.isfile(tmp_path / "empty" / "model.safetensors")


def test_folder_without_safetensors_is_refused(tmp_path, pair):
    (tmp_path / "bin").mkdir()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        layer_impact(pair[0], str(tmp_path / "bin"))


def test_missing_shard_is_named(tmp_path):
    base_dir, tuned_dir, _, _ = save_pair(tmp_path, layers=3, shard="60KB", seed=9)
    shard = Checkpoint(tuned_dir).files[-1]
    os.remove(os.path.join(tuned_dir, shard))
    with pytest.raises(ValueError, match=f"{shard} is missing"):
        layer_impact(base_dir, tuned_dir)


def test_non_finite_base_weights_are_named(pair, tmp_path):
    broken = tiny_model("llama", seed=0, num_hidden_layers=4)
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[0, 2] = float("nan")
    broken.save_pretrained(str(tmp_path / "broken_base"))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' in .*broken_base has 1 non-finite"):
        layer_impact(str(tmp_path / "broken_base"), pair[1])
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' in .*broken_base has 1 non-finite"):
        restore(str(tmp_path / "broken_base"), pair[1], out=str(tmp_path / "m"), t={1: 0.5})
    assert sorted(os.listdir(tmp_path)) == ["broken_base"]


def test_non_finite_weights_outside_the_blocks_are_named_before_scoring_data(pair, tmp_path):
    # Restoring blocks one by one runs the whole tuned model: a NaN in its embeddings would make every
    # delta NaN, so it is refused by name first.
    broken = tiny_model("llama", seed=0, num_hidden_layers=4)
    with torch.no_grad():
        broken.model.norm.weight[5] = float("inf")
    broken.save_pretrained(str(tmp_path / "broken"))
    for name in os.listdir(pair[1]):
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy(os.path.join(pair[1], name), tmp_path / "broken" / name)
    general = tmp_path / "general.txt"
    general.write_text("\n".join(random_texts(6, seed=4)) + "\n")
    assert layer_impact(pair[0], str(tmp_path / "broken")).num_layers == 4  # weights only: the blocks are finite
    with pytest.raises(ValueError, match=r"'model.norm.weight' in .*broken has 1 non-finite"):
        layer_impact(pair[0], str(tmp_path / "broken"), general_data=str(general))


def test_out_that_is_a_link_to_an_input_or_a_file_is_refused(pair, tmp_path):
    os.symlink(pair[1], tmp_path / "link")
    with pytest.raises(ValueError, match="is one of the input folders"):
        restore(pair[0], pair[1], out=str(tmp_path / "link"), t={0: 0.5})
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        restore(pair[0], pair[1], out=str(tmp_path / "file"), t={0: 0.5})
    assert (tmp_path / "file").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["file", "link"]
