"""Checkpoint reads (cwa_dist/modeling/checkpoint.py) of tensors larger than one read(2) call can return.

Linux returns at most 2,147,479,552 bytes from one read(2); one `readinto` of an unbuffered file
is one such call, so a tensor above that (Qwen2-72B's 2.49 GB embedding, float32 checkpoints of
large vocabularies) must be read in a loop.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pandas as pd
import pytest
import torch

from cwa_dist.modeling.checkpoint import Checkpoint, read_into

LINUX_READ_MAX = 2_147_479_552


def sparse_safetensors(path, numel: int, marks: dict[int, float]) -> None:
    """A one-tensor float32 safetensors file of `numel` elements, zero but for `marks`, written
    sparse (the zeros take no disk), so a >2 GiB tensor costs seconds, not gigabytes of writes."""
    header = json.dumps({"big": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(start + 4 * numel)
        for index, value in marks.items():
            f.seek(start + 4 * index)
            f.write(struct.pack("<f", value))


def test_a_tensor_larger_than_one_read_call_is_read_whole(tmp_path):
    numel = LINUX_READ_MAX // 4 + 3_000_000  # 2.16 GB
    marks = {0: 1.5, LINUX_READ_MAX // 4 - 1: 2.5, LINUX_READ_MAX // 4 + 1: -3.0, numel - 1: 4.0}
    (tmp_path / "ckpt").mkdir()
    sparse_safetensors(tmp_path / "ckpt" / "model.safetensors", numel, marks)
    ckpt = Checkpoint(tmp_path / "ckpt")
    try:
        whole = ckpt.read("big")
        assert whole.numel() == numel and whole.nbytes > LINUX_READ_MAX
        assert {i: float(whole[i]) for i in marks} == marks
        assert float(whole.abs().sum()) == sum(abs(v) for v in marks.values())  # nothing else was written
        del whole
        tail = ckpt.read_flat("big", numel - 5, 100)  # clipped at the end
        assert tail.tolist() == [0.0, 0.0, 0.0, 0.0, 4.0]
    finally:
        ckpt.close()


def test_a_short_read_loops_and_the_end_of_a_file_stops_it(tmp_path):
    class Trickle:  # a file that returns at most 3 bytes per call, as read(2) may
        def __init__(self, data: bytes):
            self.data, self.at = data, 0

        def readinto(self, view) -> int:
            n = min(3, len(view), len(self.data) - self.at)
            view[:n] = self.data[self.at:self.at + n]
            self.at += n
            return n

    buffer = bytearray(10)
    assert read_into(Trickle(b"0123456789abc"), memoryview(buffer)) == 10 and bytes(buffer) == b"0123456789"
    assert read_into(Trickle(b"0123"), memoryview(bytearray(10))) == 4  # the file ended: fewer bytes


@pytest.mark.extended
@pytest.mark.ray
def test_a_tied_model_with_an_embedding_over_2_gib_runs_end_to_end(tiny_model_dir, tmp_path):
    """A real run: the gradient rank reads the 2.15 GB tied embedding, the evaluation actor loads it
    again, and the ranking's weights are the checkpoint's values at the ranked indices."""
    from transformers import LlamaConfig

    vocab, hidden = 262_208, 2048  # 537M weights, 2,148,007,936 bytes in float32: past one read(2)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True,
                         max_position_embeddings=64)
    from accelerate.utils import set_module_tensor_to_device

    from cwa_dist.modeling.loading import empty_model

    # Built empty (buffers real), then each parameter given random values: no 2 GB initialisation pass.
    net = empty_model(config, dtype=torch.float32, trust_remote_code=False)
    g = torch.Generator().manual_seed(0)
    for name, p in list(net.named_parameters()):
        set_module_tensor_to_device(net, name, "cpu", value=torch.randn(p.shape, generator=g) * 0.05)
    net.tie_weights()
    embedding_bytes = net.get_input_embeddings().weight.nbytes
    assert embedding_bytes > LINUX_READ_MAX
    path = tmp_path / "tied"
    net.save_pretrained(path, max_shard_size="10GB")
    del net
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tiny_model_dir["llama"] / f).read_bytes())
    cmd = [sys.executable, "-m", "cwa_dist.run", "--model", str(path), "--seq-len", "16", "--eval-limit", "4",
           "--batch-size", "2", "--topk", "10", "--perturbation-ratios", "1.0", "--random-seeds", "1",
           "--super-weights", "0", "--num-eval-actors", "1", "--replay-memory-gb", "0",
           "--output", str(tmp_path / "runs"), "--experiment-id", "tied"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "tied"
    rankings = pd.read_parquet(run / "rankings.parquet")
    results = pd.read_parquet(run / "perturbation_results.parquet")
    assert (results["status"] == "ok").all() and results["restored_exact"].all()
    ckpt = Checkpoint(path)
    try:
        for row in rankings.itertuples(index=False):  # the weights the rank read are the stored ones
            key = ckpt.key_for(row.param, "model")
            assert float(ckpt.read_flat(key, int(row.flat_index), 1)[0]) == row.weight
    finally:
        ckpt.close()
    assert "model.embed_tokens.weight" in set(rankings["param"])  # the large tensor was scored
