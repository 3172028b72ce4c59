"""The arithmetic path never imports transformers (issue 16: ~3 s of every `bv compute`,
`merge` or sanitise process went to importing it). Each check runs in a fresh interpreter, since
this test process has imported transformers long ago."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Llama-shaped checkpoints: a config.json that no model family claims, as the arithmetic bench's
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch

    from mergeshield import checkpoints
    from mergeshield.cli import main
    from mergeshield.ibvs import sanitise
    from mergeshield.pipeline import ScanContext, ScanRequest, scan
    from mergeshield.task_vectors import TaskVector

    work = Path(sys.argv[1])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
              "num_hidden_layers": 1, "vocab_size": 16}
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.0.w{i}": torch.randn(8, 8, generator=gen) for i in range(3)}
    for name, shift in (("base", 0.0), ("clean", 0.01), ("bd", 0.02)):
        state = {k: v + shift * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        checkpoints.save_checkpoint(work / name, state, config=config)
    loaded = {"imports": "transformers" in sys.modules}
    codes = [main(["bv", "compute", "--clean", str(work / "clean"), "--backdoored",
                   str(work / "bd"), "--out", str(work / "bv")]),
             main(["merge", str(work / "clean"), str(work / "bd"), "--base", str(work / "base"),
                   "--method", "ties", "--subtract", str(work / "bv"), "--out",
                   str(work / "merged")])]
    loaded["cli"] = "transformers" in sys.modules
    src = {k: checkpoints.resolve(str(work / k)) for k in ("base", "bd", "bv")}
    with checkpoints.open_checkpoint(src["base"]) as b, \\
            checkpoints.open_checkpoint(src["bd"]) as s, \\
            checkpoints.open_checkpoint(src["bv"]) as v:
        bv = TaskVector.stored(v)
        checkpoints.save_checkpoint(work / "sanitised", sanitise(s, bv, 0.5),
                                    specs={k: s.info(k) for k in s})
        tau = TaskVector.between(b, s, list(s))
        checkpoints.save_checkpoint(work / "tau", (tau - 0.5 * bv).apply_lazily(b, 1.0),
                                    specs={k: s.info(k) for k in s})
    loaded["sanitise"] = "transformers" in sys.modules
    report = scan(ScanRequest(suspect=str(work / "bd"), base=str(work / "base")),
                  ScanContext(out_dir=None))
    loaded["scan"] = "transformers" in sys.modules
    print(json.dumps({"loaded": loaded, "codes": codes, "tensors": report.task_vector.n_tensors,
                      "incomplete": [r.code for r in report.incomplete]}))
""")


def test_the_arithmetic_path_does_not_import_transformers(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["codes"] == [0, 0]
    assert got["tensors"] == 3  # the scan's task-vector step ran
    assert "unsupported_model" in got["incomplete"]  # no family: nothing to build a model with
    assert got["loaded"] == {"imports": False, "cli": False, "sanitise": False, "scan": False}
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_building_a_model_still_imports_it() -> None:
    """The deferral moved the import, it did not lose it: a model family still builds."""
    code = ("import sys; from mergeshield.models import HFImageFamily; "
            "ok = HFImageFamily.matches({'model_type': 'vit'}); "
            "print(ok, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.stdout.split() == ["True", "True"], proc.stderr[-2000:]
