"""Model sources, the checkpoint reader, replicas built tensor by tensor, the conversion cache."""

import json
import shutil

import pytest
import torch
from conftest import FAMILIES, build_tiny_model, saved_model

from cwa_dist.errors import UsageError
from cwa_dist.modeling.checkpoint import Checkpoint
from cwa_dist.modeling.loading import load_config, load_replica
from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source


def _replica(path, dtype=torch.float32):
    return load_replica(Checkpoint(path), load_config(path, trust_remote_code=False), dtype=dtype,
                        trust_remote_code=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_replica_from_the_files_equals_the_saved_model(tiny_model_dir, family):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir[family]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rebuilt = _replica(path)
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
    tied = reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    assert (rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight) == tied
    assert not any(p.is_meta for p in rebuilt.parameters())


def test_bfloat16_replica_holds_the_checkpoint_bits_and_ties_once(tmp_path):
    net = build_tiny_model("llama_tied").to(torch.bfloat16)
    model = saved_model(net, tmp_path / "bf16", max_shard_size="4KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1  # really several files
    rebuilt = _replica(model.checkpoint_dir, torch.bfloat16)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    for (n, a), (_, b) in zip(net.state_dict().items(), rebuilt.state_dict().items()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16)), n


def test_checkpoint_reads_exactly_the_elements_asked_for(tmp_path):
    net = build_tiny_model("llama_odd")
    saved_model(net, tmp_path, max_shard_size="10KB")
    ckpt = Checkpoint(tmp_path)
    state = net.state_dict()
    assert ckpt.nbytes() == sum(t.numel() * 4 for k, t in state.items() if k in ckpt.tensors)
    g = torch.Generator().manual_seed(0)
    for key, info in ckpt.tensors.items():
        flat = state[key].reshape(-1)
        assert torch.equal(ckpt.read(key), state[key])
        for _ in range(5):
            start = int(torch.randint(0, info.numel, (1,), generator=g))
            length = int(torch.randint(0, info.numel + 5, (1,), generator=g))
            assert torch.equal(ckpt.read_flat(key, start, length), flat[start : start + length])
        assert ckpt.read_flat(key, 0, 3, torch.float64).dtype == torch.float64


def test_truncated_checkpoint_is_refused(tmp_path):
    saved_model(build_tiny_model("llama"), tmp_path, max_shard_size="1GB")
    (f,) = tmp_path.glob("*.safetensors")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        Checkpoint(tmp_path)


def test_source_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(UsageError, match="holds no config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf"):
        resolve_source(str(tmp_path / "weights.bin"))
    assert resolve_source("meta-llama/Llama-2-70b-hf").kind == "hub"
    # A worker on a node where the driver's path does not exist says so, naming its node.
    import socket

    from cwa_dist.modeling.loading import ModelRef

    gone = ModelRef(str(tmp_path / "gone.gguf"), str(tmp_path / "cache-elsewhere"), "float32")
    with pytest.raises(UsageError, match=rf"does not exist on node {socket.gethostname()}.*shares.*Hub id"):
        gone.open()


def test_corrupt_gguf_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CWA_DIST_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UsageError, match="cannot read GGUF file"):
        resolve_checkpoint(resolve_source(str(bad)), announce=print)
    assert not list((tmp_path / "cache" / "checkpoints").glob("broken*/"))  # nothing half-written kept


def test_hub_model_offline_gives_clear_error(monkeypatch):
    # This machine has no network; force the offline answer so the test is the same elsewhere.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-cwa-dist-hf-home")
    with pytest.raises(UsageError, match="Hub is unreachable"):
        resolve_checkpoint(resolve_source("gpt2"), announce=print)


def test_pickle_checkpoint_is_converted_once_reused_and_rebuilt_when_corrupt(tiny_model_dir, tmp_path, monkeypatch):
    """A directory with only pytorch_model.bin: converted into the cache once (in a child
    process), reused by the next run without converting, and rebuilt when an entry is damaged."""
    monkeypatch.setenv("CWA_DIST_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "pickled"
    net = build_tiny_model("gpt2")
    net.config.save_pretrained(src)
    torch.save(net.state_dict(), src / "pytorch_model.bin")
    shutil.copy(tiny_model_dir["gpt2"] / "tokenizer.json", src)
    shutil.copy(tiny_model_dir["gpt2"] / "tokenizer_config.json", src)
    said = []
    first = resolve_checkpoint(resolve_source(str(src)), announce=said.append)
    assert first.parent == tmp_path / "cache" / "checkpoints" and "Converting" in said[-1]
    rebuilt = _replica(first)
    ids = torch.randint(0, 90, (1, 10))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, net(input_ids=ids).logits)
    assert resolve_checkpoint(resolve_source(str(src)), announce=said.append) == first
    assert "Reusing" in said[-1] and "Converting" not in said[-1]
    (weights,) = first.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the cached weights
    weights.write_bytes(bytes(data))
    assert resolve_checkpoint(resolve_source(str(src)), announce=said.append) == first
    assert "corrupt" in said[-2] and "Converting" in said[-1]
    assert json.loads((first / "cwa_dist_conversion.json").read_text())["converter_version"] == 1
    with torch.no_grad():
        assert torch.equal(_replica(first)(input_ids=ids).logits, net(input_ids=ids).logits)


def _hub_cache(root, model_dir, *, repo="cwa-test--tiny-llama", weights=True,
               revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache holding one repository at one commit, as the Hub client lays it out."""
    snapshot = root / "hub" / f"models--{repo}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        if weights or not f.name.endswith(".safetensors"):
            shutil.copy(f, snapshot / f.name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    return snapshot, revision


def _use_hub_cache(monkeypatch, cache):
    """This process's Hub client reads its cache from `cache`, offline (it read the environment when
    imported, so its constant is what changes)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_hub_model_is_pinned_to_one_commit_and_the_driver_reads_only_headers(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    from cwa_dist.modeling.loading import ModelRef
    from cwa_dist.modeling.sources import headers_digest, resolve_origin

    snapshot, commit = _hub_cache(tmp_path, tiny_model_dir["llama"])
    _use_hub_cache(monkeypatch, tmp_path / "hub")
    origin = resolve_origin(resolve_source("cwa-test/tiny-llama"), revision=None, announce=print)
    assert origin.kind == "hub" and origin.revision == commit and origin.directory == snapshot
    local = resolve_origin(resolve_source(str(tiny_model_dir["llama"])), revision=None, announce=print)
    assert origin.headers_sha256 == local.headers_sha256 == headers_digest(Checkpoint(tiny_model_dir["llama"]))
    assert origin.identity == commit and local.revision is None and origin.content_sha256 is None
    assert local.identity == local.content_sha256 and len(local.content_sha256) == 64
    # A worker on another node resolves the same commit in its own cache.
    ref = ModelRef(source="cwa-test/tiny-llama", checkpoint_dir="/elsewhere", dtype="float32", revision=commit)
    ckpt, config = ref.open()
    assert ckpt.path == snapshot and config.model_type == "llama"
    ckpt.close()
    with pytest.raises(UsageError, match="names a Hub commit or branch"):
        resolve_origin(resolve_source(str(tiny_model_dir["llama"])), revision="main", announce=print)


def test_a_hub_checkpoint_whose_weights_are_not_cached_offline_says_so(tiny_model_dir, tmp_path, monkeypatch):
    from cwa_dist.modeling.sources import resolve_origin

    # Configs and tokenizer cached (what the driver downloads), the weights not: reading their
    # headers needs the Hub.
    _hub_cache(tmp_path, tiny_model_dir["llama"], weights=False)
    _use_hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(UsageError, match="cannot read the tensor headers of 'cwa-test/tiny-llama' at 0123456789ab"):
        resolve_origin(resolve_source("cwa-test/tiny-llama"), revision=None, announce=print)
    with pytest.raises(UsageError, match="Hub is unreachable"):
        resolve_origin(resolve_source("cwa-test/tiny-llama"), revision="v2", announce=print)  # not cached


def test_the_checkpoints_headers_alone_describe_its_tensors(tiny_model_dir):
    """The driver's view of a Hub checkpoint is built from headers (as range requests return them);
    it names the same tensors, shapes and dtypes as the files."""
    files = Checkpoint(tiny_model_dir["gpt2"])
    headers = {}
    for f in files.files:
        raw = (tiny_model_dir["gpt2"] / f).read_bytes()
        headers[f] = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    remote = Checkpoint("/not/here", headers=headers)
    assert {n: (t.shape, t.dtype, t.file) for n, t in remote.tensors.items()} == \
        {n: (t.shape, t.dtype, t.file) for n, t in files.tensors.items()}
    assert remote.nbytes() == files.nbytes()


CUSTOM_CONFIG = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


@pytest.mark.parametrize("model_type", ["tiny_custom", "llama"])
def test_a_model_with_its_own_code_asks_for_trust_remote_code(tmp_path, model_type, capsys):
    """A config with an auto_map is refused in one line naming --trust-remote-code, whether
    transformers knows its model_type (it would silently build its own Llama) or not; with the
    flag, the model's own code is what is planned."""
    from cwa_dist.run import main

    d = tmp_path / "custom"
    saved_model(build_tiny_model("llama"), d)
    (d / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (d / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}
    if model_type == "tiny_custom":
        config["auto_map"]["AutoConfig"] = "configuration_tiny.TinyCustomConfig"
    (d / "config.json").write_text(json.dumps(config))

    with pytest.raises(UsageError, match=r"runs its own code \(modeling_tiny\.TinyCustomForCausalLM.*"
                                         r"pass --trust-remote-code"):
        load_config(d, trust_remote_code=False)
    capsys.readouterr()  # (saving printed its progress)
    assert main(["--model", str(d), "--dry-run"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--trust-remote-code" in err[0], err

    from cwa_dist.modeling.loading import empty_model

    trusted = load_config(d, trust_remote_code=True)
    assert type(empty_model(trusted, dtype=torch.float32, trust_remote_code=True)).__name__ == "TinyCustomForCausalLM"


@pytest.mark.slow
def test_a_converted_gguf_is_planned_from_its_cached_config(smollm2_path, tmp_path, monkeypatch):
    """A .gguf that an earlier run converted: the plan reads the cached conversion's config.json,
    whose architecture is the one parsing the .gguf gives; with nothing converted yet, the .gguf
    itself is parsed, and nothing is converted for it."""
    from pathlib import Path

    from cwa_dist.modeling import convert
    from cwa_dist.modeling.loading import read_config

    source = resolve_source(str(smollm2_path))
    gguf = Path(source.location) / source.gguf_file
    resolve_checkpoint(source, announce=print)  # converted (once per cache; a no-op after setup)
    entry = convert.cached("gguf", gguf, [gguf])
    assert entry is not None and (entry / "config.json").is_file()
    from_cache = read_config(source, trust_remote_code=False)
    assert from_cache.name_or_path == str(entry)  # read from the conversion, not the .gguf
    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps")
    monkeypatch.setenv("CWA_DIST_CACHE", str(tmp_path / "empty-cache"))
    assert convert.cached("gguf", gguf, [gguf]) is None
    parsed = read_config(source, trust_remote_code=False)  # transformers' own parse of the .gguf itself
    assert [getattr(from_cache, f) for f in fields] == [getattr(parsed, f) for f in fields]
    assert not list((tmp_path / "empty-cache").glob("checkpoints/*/"))
