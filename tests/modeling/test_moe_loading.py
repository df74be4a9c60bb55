"""Mixture-of-experts checkpoints: transformers 5 saves each expert as its own tensor and fuses
them when it loads; every cwa_dist loader must build what transformers' own loader builds, and
read any slice of a fused tensor without building it (modeling/fusion.py)."""

import json

import pytest
import torch
from conftest import MOE_FAMILIES
from safetensors.torch import save_file

from cwa_dist.errors import UsageError
from cwa_dist.modeling.checkpoint import Checkpoint, Segment
from cwa_dist.modeling.fusion import Layout, concatenate, stack
from cwa_dist.modeling.loading import checkpoint_keys, empty_model, load_config, load_replica


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_replica_is_what_transformers_loads_bit_for_bit(tiny_moe_dir, family):
    path = tiny_moe_dir[family]
    stored = Checkpoint(path)
    assert not any("gate_up_proj" in k for k in stored.tensors), "the checkpoint stores experts one by one"
    want = transformers_model(path)
    got = load_replica(stored, load_config(path, trust_remote_code=False), dtype=torch.float32,
                       trust_remote_code=False)
    w, g = want.state_dict(), got.state_dict()
    assert set(w) == set(g)
    assert [k for k in w if not torch.equal(w[k], g[k])] == []
    assert any(p.ndim == 3 for p in got.parameters())  # fused experts, as transformers builds them
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(want(input_ids=ids).logits, got(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_any_slice_of_a_fused_tensor_reads_only_its_elements(tiny_moe_dir, family):
    """What a ZeRO-3 or FSDP2 rank reads: partitions that start and end mid-expert and mid-row."""
    path = tiny_moe_dir[family]
    want = dict(transformers_model(path).named_parameters())
    ckpt = Checkpoint(path)
    net = empty_model(load_config(path, trust_remote_code=False), dtype=torch.float32, trust_remote_code=False)
    keys = checkpoint_keys(net, ckpt)
    fused = [n for n in keys if n in ckpt.fused]
    assert fused and all(want[n].ndim == 3 for n in fused)
    for name in fused:
        flat = want[name].detach().reshape(-1)
        n = flat.numel()
        for start, length in [(0, n), (1, n // 3), (n // 3 + 7, n // 2), (n - 5, 50), (n // 2, 0)]:
            got = ckpt.read_flat(keys[name], start, length, torch.float32)
            assert torch.equal(got, flat[start : start + length]), (name, start, length)
        assert torch.equal(ckpt.read(keys[name]), want[name].detach())


def test_layouts_follow_torch_stack_and_cat(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(3, 5, generator=g) for i in range(4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)

    def layout(key):
        return Layout((3, 5), (Segment(key, 0, 15),))

    def read(lay):
        ckpt.fused.pop("x", None)
        ckpt.add_fused("x", lay.shape, list(lay.segments))
        return ckpt.read("x")

    stacked = [stack([layout("t0"), layout("t1")], 0), stack([layout("t2"), layout("t3")], 0)]
    want_stacked = [torch.stack([tensors["t0"], tensors["t1"]]), torch.stack([tensors["t2"], tensors["t3"]])]
    for dim in (0, 1, 2):  # gate and up joined as transformers does (dim 1), and the other ways
        got = read(concatenate(stacked, dim))
        assert torch.equal(got, torch.cat(want_stacked, dim)), dim
    assert torch.equal(read(concatenate([layout("t0"), layout("t3")], 1)),
                       torch.cat([tensors["t0"], tensors["t3"]], 1))
    with pytest.raises(ValueError):  # a stack along another dim would interleave the tensors
        stack([layout("t0"), layout("t1")], 1)


def test_a_conversion_that_permutes_elements_is_refused_by_name(tmp_path):
    from transformers.core_model_loading import Transpose, WeightConverter

    from cwa_dist.modeling.fusion import _replay

    converter = WeightConverter(source_patterns="a.*.w", target_patterns="a.fused", operations=[Transpose(0, 1)])
    with pytest.raises(UsageError, match="Transpose"):
        _replay(converter, {"a.*.w": [Layout((2, 2), (Segment("a.0.w", 0, 4),))]}, "a.fused")


def test_a_checkpoint_short_of_an_expert_is_refused(tiny_moe_dir, tmp_path):
    from safetensors.torch import load_file

    src = tiny_moe_dir["mixtral"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(src / file)))
    for proj in ("w1", "w2", "w3"):
        del tensors[f"model.layers.1.block_sparse_moe.experts.3.{proj}.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    net = empty_model(load_config(tmp_path, trust_remote_code=False), dtype=torch.float32, trust_remote_code=False)
    with pytest.raises(UsageError, match=r"experts\.(gate_up_proj|down_proj).*\(3, .*\(4, "):
        checkpoint_keys(net, Checkpoint(tmp_path))
