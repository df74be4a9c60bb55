"""RunConfig in sections: flat names in and out, each section validating itself, no default twice."""

import dataclasses
import json

import pytest

from cwa_dist.analysis.perturb import ModeOptions
from cwa_dist.config import RunConfig, config_from_mapping, operational_settings
from cwa_dist.errors import UsageError
from cwa_dist.run import build_parser, config_from_args
from cwa_dist.settings import leaves
from cwa_dist.sharding import ZeroSettings


def test_flat_names_round_trip_through_config_json():
    cfg = RunConfig.of(model="m", topk=(50, 10), perturbation_scale=0.25, zero_max_reuse_distance=7,
                       offload_params=True, seq_len=64, stride=32, shard_backend="zero3")
    stored = json.loads(json.dumps(cfg.to_dict()))  # as config.json holds it
    again = config_from_mapping(stored, "config.json")
    assert again == cfg
    assert again.perturbation.options == ModeOptions(scale=0.25)
    assert again.sharding.zero == ZeroSettings(offload_params=True, max_reuse_distance=7)
    assert again.analysis.topk == (10, 50) and again.data.stride == 32


def test_every_setting_has_one_flat_name_a_flag_and_a_docstring():
    names = [leaf.flat for leaf in leaves(RunConfig)]
    assert len(names) == len(set(names))
    assert set(RunConfig.of(model="m").to_dict()) == set(names)
    for leaf in leaves(RunConfig):
        assert leaf.doc, f"{leaf.flat} has no docstring (its --help text)"
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == set(names)


def test_nested_sections_keep_their_own_defaults():
    # The defaults of ZeRO's knobs and the modes' options are written once, in their own classes.
    cfg = RunConfig.of(model="m")
    assert cfg.sharding.zero == ZeroSettings()
    assert cfg.perturbation.options == ModeOptions()
    by_flat = {leaf.flat: leaf.default for leaf in leaves(RunConfig)}
    for f in dataclasses.fields(ZeroSettings):
        assert by_flat[f.metadata["flat"] or f.name] == f.default


def test_the_command_line_builds_the_same_config():
    argv = ["--model", "m", "--metric", "grad_squared", "fisher", "--perturbation-bit", "3",
            "--gradient-checkpointing", "--zero-prefetch-bucket-size", "123"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.analysis.metrics == ("grad_squared", "fisher")
    assert cfg.perturbation.options.bit == 3
    assert cfg.sharding.gradient_checkpointing and cfg.sharding.zero.prefetch_bucket_size == 123
    assert cfg == RunConfig.of(model="m", metrics=("grad_squared", "fisher"), perturbation_bit=3,
                               gradient_checkpointing=True, zero_prefetch_bucket_size=123)


@pytest.mark.parametrize(("flat", "value", "message"), [
    ("device", "tpu", "--device 'tpu' is not one of auto, cpu, cuda"),
    ("dtype", "float16", "--dtype float16 is not supported"),
    ("shard_backend", "fsdp", "--shard-backend 'fsdp' is not one of auto, zero3, fsdp2, none"),
    ("perturbation_noise", 0.0, "--perturbation-noise 0.0 must be a positive number"),
    ("zero_max_live_parameters", 0, "--zero-max-live-parameters 0 is too small"),
])
def test_each_section_refuses_its_bad_values(flat, value, message):
    with pytest.raises(UsageError, match=message):
        RunConfig.of(model="m", **{flat: value})


def test_a_changed_copy_is_validated_anew():
    cfg = RunConfig.of(model="m", seq_len=64)
    assert cfg.replace(stride=16).data.stride == 16 and cfg.data.stride is None
    with pytest.raises(UsageError, match="--stride 100 is outside 1..--seq-len"):
        cfg.replace(stride=100)


def test_a_sweep_entry_is_checked_by_flat_name():
    with pytest.raises(UsageError, match="unknown setting 'zero_max_reuse'. Did you mean 'zero_max_reuse_distance'"):
        config_from_mapping({"model": "m", "zero_max_reuse": 1}, "sweep.yaml")
    with pytest.raises(UsageError, match="sweep.yaml: seq_len should be int"):
        config_from_mapping({"model": "m", "seq_len": "long"}, "sweep.yaml")
    with pytest.raises(UsageError, match="'fast' is not one of"):
        config_from_mapping({"model": "m", "device": "fast"}, "sweep.yaml")


def test_operational_settings_include_every_zero_knob_and_no_result_setting():
    ops = operational_settings()
    assert {"zero_reduce_bucket_size", "offload_params", "num_workers", "output"} <= ops
    assert not {"model", "topk", "seed", "perturbation_scale", "shard_backend", "dtype"} & ops
