"""No process holds more than its share: the driver reads no weights, actors and ranks load from
multi-file checkpoints and compute what a plain single process computes."""

import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_wide_llama, saved_model, token_chunks, wide_llama_config

from cwa_dist.analysis.evaluate import perplexity
from cwa_dist.distributed.eval_actors import EvalPool


def _vm_hwm(pid: int) -> int | None:
    """The kernel's high-water mark of a process's resident memory, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def driver_peak_rss(args: list[str], timeout_s: float = 900) -> int:
    """Run the CLI in a fresh process and return its own peak RSS (not its children's), read
    from outside it until it exits."""
    proc = subprocess.Popen([sys.executable, "-m", "cwa_dist.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak, deadline = 0, time.monotonic() + timeout_s
    while proc.poll() is None:
        peak = max(peak, _vm_hwm(proc.pid) or 0)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    return peak


def _llama_dir(path, hidden, layers, tokenizer_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    net = AutoModelForCausalLM.from_config(cfg)
    net.save_pretrained(path, max_shard_size="100MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, path)
    return sum(p.numel() * 4 for p in net.parameters())


@pytest.mark.extended
def test_driver_does_not_hold_the_model(tiny_model_dir, tmp_path):
    """A whole run (gradients, ranking, perturbations) on a 300+ MB checkpoint: the driver's peak
    RSS exceeds that of the same run on a 10 MB model by less than 20% of the checkpoint."""
    tok = tiny_model_dir["llama"]
    assert _llama_dir(tmp_path / "small", 64, 1, tok) < 20e6
    big_bytes = _llama_dir(tmp_path / "big", 512, 11, tok)
    assert big_bytes >= 300e6 and len(list((tmp_path / "big").glob("*.safetensors"))) > 1
    common = ["--seq-len", "32", "--eval-limit", "6", "--batch-size", "2", "--topk", "20", "--perturbation-ratios",
              "1.0", "--random-seeds", "1", "--num-eval-actors", "1", "--output", str(tmp_path / "runs")]
    small = driver_peak_rss(["--model", str(tmp_path / "small"), *common, "--experiment-id", "small"])
    big = driver_peak_rss(["--model", str(tmp_path / "big"), *common, "--experiment-id", "big"])
    assert big - small < 0.2 * big_bytes, (small / 2**20, big / 2**20, big_bytes / 2**20)


def test_eval_actors_load_a_multi_file_checkpoint_and_match_one_process(ray_local, tmp_path):
    net = build_wide_llama(seed=2)
    model = saved_model(net, tmp_path, max_shard_size="2MB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    chunks = token_chunks(3, 128, wide_llama_config().vocab_size, seed=2)
    pool = EvalPool(model, chunks, num_actors=2, device="cpu", gpus_per_actor=0, batch_size=2)
    try:
        baselines = pool.describe()
        memory = pool.memory()
    finally:
        pool.shutdown()
    want = perplexity(net, chunks, 2)
    for _, got in baselines:
        assert got.tokens == want.tokens
        assert got.nll_sum == pytest.approx(want.nll_sum, rel=1e-6)
    model_bytes = sum(p.numel() * 4 for p in net.parameters())
    for m in memory:
        assert m["peak_rss_bytes"] > model_bytes and m["load_s"] > 0
