"""Training with celoss.linear_cross_entropy follows the same loss curve as logits + F.cross_entropy.

A tiny decoder-only LM (the one of examples/train_lm.py, so the example is exercised too) is trained
for 40 steps on Python's byte-level pydoc topics, from the same seed with both losses, fp32 on CPU.
"""
import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"
STEPS = 40
CONFIG = dict(steps=STEPS, d_model=32, layers=2, heads=2, vocab=512, seq_len=32, batch_size=8, lr=3e-3,
              device="cpu", seed=0)


def _example():
    spec = importlib.util.spec_from_file_location("celoss_example_train_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def curves():
    example = _example()
    return {kind: example.train(kind, **CONFIG)["losses"] for kind in ("celoss", "torch")}


def test_curves_match(curves):
    ours, ref = curves["celoss"], curves["torch"]
    assert len(ours) == len(ref) == STEPS
    assert all(math.isfinite(x) for x in ours)
    # same initial loss (a uniform-ish prediction over 512 ids) ...
    assert ours[0] == pytest.approx(ref[0], rel=1e-6, abs=1e-6)
    # ... and the same trajectory: fp32 rounding differences only, not compounding into drift
    worst = max(abs(a - b) for a, b in zip(ours, ref))
    assert worst < 1e-4, f"loss curves diverge: max |difference| {worst:.3g}"


def test_loss_goes_down(curves):
    ours = curves["celoss"]
    assert ours[0] == pytest.approx(math.log(CONFIG["vocab"]), abs=0.1)
    last = sum(ours[-5:]) / 5
    assert last < ours[0] - 2.0, f"loss went from {ours[0]:.3f} to {last:.3f} in {STEPS} steps"
    assert last < sum(ours[:5]) / 5 - 2.0


def test_example_cli_single_run(tmp_path, capsys):
    """The example's command line (one loss, in process) runs and reports its measurements."""
    example = _example()
    result = example.main(["--loss", "celoss", "--steps", "3", "--d-model", "16", "--layers", "1", "--heads", "2",
                           "--vocab", "300", "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
                           "--log-every", "0", "--out", str(tmp_path)])
    assert len(result["losses"]) == 3 and result["peak_mem_bytes"] > 0 and result["step_ms"] > 0
    assert '"peak_mem_bytes"' in capsys.readouterr().out
