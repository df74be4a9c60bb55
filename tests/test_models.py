import pytest
import torch

from conftest import FAMILIES
from cwa_dist.errors import UsageError
from cwa_dist.models import ModelBlob, load_model, resolve_source


@pytest.mark.parametrize("family", FAMILIES)
def test_local_directory_loads_and_blob_rebuilds_identically(tiny_model_dir, family):
    net, tok, source = load_model(str(tiny_model_dir[family]), dtype=torch.float32, trust_remote_code=False)
    assert source.kind == "local" and tok.eos_token_id is not None
    rebuilt = ModelBlob.pack(net, trust_remote_code=False).build()
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
    tied = net.get_output_embeddings().weight is net.get_input_embeddings().weight
    assert (rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight) == tied


def test_blob_keeps_bfloat16_bits_and_shares_tied_weights_once(tiny_model_dir):
    net, _, _ = load_model(str(tiny_model_dir["llama_tied"]), dtype=torch.bfloat16, trust_remote_code=False)
    blob = ModelBlob.pack(net, trust_remote_code=False)
    assert blob.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    rebuilt = blob.build()
    for (n, a), (_, b) in zip(net.state_dict().items(), rebuilt.state_dict().items()):
        assert a.dtype == b.dtype == torch.bfloat16 or a.dtype == b.dtype
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b), n


def test_source_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(UsageError, match="holds no config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf"):
        resolve_source(str(tmp_path / "weights.bin"))
    assert resolve_source("meta-llama/Llama-2-70b-hf").kind == "hub"


def test_corrupt_gguf_is_reported(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UsageError, match="cannot read GGUF file"):
        load_model(str(bad), dtype=torch.float32, trust_remote_code=False)


def test_hub_model_offline_gives_clear_error(monkeypatch):
    # This machine has no network; force the offline answer so the test is the same elsewhere.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-cwa-dist-hf-home")
    with pytest.raises(UsageError, match="Hub is unreachable"):
        load_model("gpt2", dtype=torch.float32, trust_remote_code=False)
