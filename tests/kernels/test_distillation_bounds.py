"""``celoss.kernels.distillation`` never reads out of bounds whatever the targets (issue 12 B): on
the device side celoss checks class indices with a queued ``torch._assert_async``, which does not
stop the kernels launched after it, so an out-of-range target must read class 0 (and make its
row's loss NaN, as the cross-entropy kernel does), not ``s_row + y``.

Rows are views into a NaN-padded buffer, so a read just past either end of a row shows up in the
gradient, and a target 2^40 classes away is a wild address that Triton's interpreter faults on."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

from celoss.backends import reference as rb  # noqa: E402
from celoss.kernels import distillation as kd  # noqa: E402

INTERPRETED = type(kd._distill_kernel).__name__ == "InterpretedFunction"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = [
    pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                       reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]
PAD = 32


def _padded_rows(n, v, seed):
    """(n, v) logits inside a NaN buffer: PAD NaN columns before and after every row."""
    buf = torch.full((n, v + 2 * PAD), torch.nan, device=DEVICE)
    buf[:, PAD:PAD + v] = (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)
    return buf[:, PAD:PAD + v]


@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.4), (3.0, 0.4), (2.0, 1.0)],
                         ids=["hard_T1", "hard_T3", "target_only"])
def test_out_of_range_targets_read_class_zero(kind, temperature, alpha):
    n, v = 5, 300
    s, t = _padded_rows(n, v, 1), _padded_rows(n, v, 2)
    y = torch.tensor([1, v, -5, 1 << 40, 7], device=DEVICE)
    kw = dict(kind=kind, temperature=temperature, beta=0.3, alpha=alpha, ignore_index=-100)
    coef = torch.tensor([0.5, 1.5, 2.0, 0.75, 1.25], device=DEVICE)
    g = torch.full((n, v), torch.nan, device=DEVICE)
    loss = kd.distill(s, t, y, coef, g, **kw)
    assert loss[1:4].isnan().all()
    # the bad rows read class 0 (and nothing outside their row): the gradient of a class-0 target
    y0 = torch.where((y >= 0) & (y < v), y, 0)
    g0 = torch.full((n, v), torch.nan, device=DEVICE)
    loss0 = kd.distill(s, t, y0, coef, g0, **kw)
    assert g.isfinite().all()
    torch.testing.assert_close(g, g0, rtol=0, atol=0)
    torch.testing.assert_close(loss[[0, 4]], loss0[[0, 4]], rtol=0, atol=0)
    # and the good rows are the float64 reference's
    g_ref = torch.empty(n, v, dtype=torch.float64, device=DEVICE)
    loss_ref = rb.distill_fused(s.double(), t.double(), y0, coef.double(), g_ref, None, **kw)
    torch.testing.assert_close(loss0.double(), loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)
