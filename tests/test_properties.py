"""Property-based differential tests (issue 11, "keep it closed"): every public loss on every backend
against its float64 PyTorch composition (tests/oracle.py), loss and gradients with a random upstream
gradient, on drawn shapes around the kernels' block and chunk sizes, all dtypes, K-dim, probability
targets, class weights with zero and negative entries, label smoothing, ignore_index on none / some /
all rows, logit_scale / softcap / z_loss, non-contiguous, transposed and expanded inputs, and injected
NaN / +-inf / +-1e30.

Properties: where PyTorch raises, celoss raises, and where PyTorch returns, celoss returns; then,
for the loss and every gradient (``oracle.compare``), PyTorch's shape and dtype, NaN / +-inf exactly
where the float64 oracle has them, and elsewhere no farther from the oracle than PyTorch's own
result in the same dtype plus a margin (entry by entry for fp32/fp64; as ``lowp_error_bound`` for
fp16/bf16). Each kind of failure raises its own exception type, so Hypothesis shrinks and reports
every distinct one. The profile is fixed: derandomized, bounded examples, no example database.
"""
import dataclasses
import math
import os
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import celoss
import oracle
from conftest import backend_device, backend_params, lowp_margin

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes, inf - inf

settings.register_profile("celoss-properties", derandomize=True, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile("celoss-properties")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# examples per (loss, backend): the interpreter runs every Triton program through numpy
EXAMPLES = {"cython": 40, "torch": 40, "triton": 25 if INTERPRETED else 40}
MAX_ELEMENTS = 50_000  # logits per softmax example (the float64 oracle and autograd dominate on CPU)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPECIAL = (math.nan, math.inf, -math.inf, 1e30, -1e30)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
REDUCTIONS = ("mean", "sum", "none")
# class counts at the kernels' edges (+-1): Triton CE/distillation blocks 64..4096 (jsd 2048),
# CPU chunks of 1024 (ce_rows.h CE_CHUNK, family.h FAM_CHUNK), SIMD widths 8/16
EDGE_C = (1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 2047, 2048, 2049,
          4095, 4096, 4097, 8191, 8192, 8193)
# fused linear CE tiles (kernels/linear_cross_entropy.py; the interpreter's BLOCK_M/V/D = 16/32/16)
EDGE_M, EDGE_V, EDGE_D = (1, 2, 15, 16, 17, 31, 32, 33), (1, 2, 31, 32, 33, 63, 64, 65, 129), (1, 15, 16, 17, 33)


class PropertyFailure(AssertionError):
    """Base of the per-kind failures (one class per kind: Hypothesis reports each separately)."""


_FAILURES = {}


def failure(kind: str) -> type:
    name = "".join(w.capitalize() for w in kind.replace("/", " ").replace("[", " ").replace("]", " ").split())
    return _FAILURES.setdefault(kind, type(name, (PropertyFailure,), {}))


# ------------------------------------------------------------------------------------------------
# Inputs: storage tensors (the leaves), the views the loss sees, and the differential run
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Arg:
    """A tensor argument: its ``storage`` (a leaf if ``grad``) and the ``view`` passed to the loss."""
    storage: torch.Tensor
    view: Callable = lambda s: s
    grad: bool = False


def layout(shape: tuple, kind: str):
    """(storage shape, view) giving a tensor of ``shape`` laid out as ``kind``."""
    if kind == "transposed" and len(shape) >= 2:
        return shape[:-2] + (shape[-1], shape[-2]), lambda s: s.transpose(-1, -2)
    if kind == "strided" and len(shape) >= 1:
        return shape[:-1] + (2 * shape[-1],), lambda s: s[..., ::2]
    if kind == "expanded" and len(shape) >= 2:
        return (1,) + shape[1:], lambda s: s.expand(shape)
    return shape, lambda s: s


def values(gen, shape, dtype, scale=3.0, specials=(), shift=0.0):
    """Normal values (in float64, then rounded to ``dtype``) with ``specials`` = [(position, value)]."""
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)
    flat = x.view(-1)
    for pos, v in specials:
        if flat.numel():
            flat[pos % flat.numel()] = v
    return x


def tensor_arg(gen, shape, dtype, kind, grad=True, **kw):
    storage_shape, view = layout(tuple(shape), kind)
    return Arg(values(gen, storage_shape, dtype, **kw), view, grad)


def class_weight(gen, c, mode, dtype):
    """None or C weights on a 1/4 grid (exact in every dtype, so sums of them are exact)."""
    if mode == "none":
        return None
    q = torch.randint(1, 9, (c,), generator=gen)
    if mode == "zeros":
        q[torch.rand(c, generator=gen) < 0.4] = 0
    elif mode == "negative":
        q = torch.randint(-8, 9, (c,), generator=gen)
    elif mode == "all_zero":
        q.zero_()
    return (q / 4).to(dtype)


def upstream(gen, shape, dtype):
    """Random upstream gradient, |g| in [0.5, 1.5) with random signs, rounded to the loss dtype."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(shape, generator=gen) < 0.25, -1.0, 1.0).double()
    return (u * sign).to(dtype)


def _run(fn, args: dict, kwargs: dict, cast, device, up_seed, up_dtype=None):
    """Forward on the views of ``args`` cast by ``cast``, then backward with the seeded upstream
    gradient rounded to ``up_dtype`` (default: the loss dtype). Returns (loss, {name: grad})."""
    leaves, inputs = {}, {}
    for name, a in args.items():
        if a is None:
            inputs[name] = None
            continue
        s = cast(a.storage).to(device).detach().clone()
        if a.grad:
            s.requires_grad_()
            leaves[name] = s
        inputs[name] = a.view(s)
    out = fn(**inputs, **kwargs)
    grads = {}
    if leaves and out.requires_grad:
        up = upstream(torch.Generator().manual_seed(up_seed), out.shape, up_dtype or out.dtype)
        got = torch.autograd.grad(out, list(leaves.values()), up.to(device=out.device, dtype=out.dtype),
                                  allow_unused=True)
        grads = dict(zip(leaves, got))
    return out.detach(), grads


def _float64(t):
    return t.double() if t.dtype.is_floating_point else t


def differential(name: str, backend: str, args: dict, kwargs: dict, seed: int, extra=None):
    """celoss.<name> on ``backend`` (with celoss-only keywords ``extra``) against oracle.<name>: error
    parity, then loss and gradients; the three runs (celoss, PyTorch in the inputs' dtypes, PyTorch
    in float64) share one upstream gradient, rounded to the dtype of PyTorch's result."""
    dev = backend_device(backend)
    ours_fn = lambda **kw: getattr(celoss, name)(backend=backend, **kw, **(extra or {}))  # noqa: E731
    ref_fn = getattr(oracle, name)
    try:
        same = _run(ref_fn, args, kwargs, lambda t: t, "cpu", seed)
    except Exception as e:  # PyTorch refuses: so must celoss
        try:
            _run(ours_fn, args, kwargs, lambda t: t, dev, seed)
        except Exception:
            return
        raise failure("celoss accepts what PyTorch rejects")(f"PyTorch raises {type(e).__name__}: {e}")
    try:
        ours = _run(ours_fn, args, kwargs, lambda t: t, dev, seed, up_dtype=same[0].dtype)
    except Exception as e:
        raise failure("celoss raises where PyTorch returns")(f"{type(e).__name__}: {e}") from e
    ref = _run(ref_fn, args, kwargs, _float64, "cpu", seed, up_dtype=same[0].dtype)
    fails = oracle.compare(ours[0], same[0], ref[0], *tolerance(backend, same[0].dtype), what="loss")
    for k, g in ref[1].items():
        if g is None:
            continue
        mine = ours[1].get(k)
        if mine is None:
            fails.append(("shape/dtype", f"grad[{k}]: celoss gives no gradient"))
            continue
        fails += [(f"grad[{k}] {kind}", msg) for kind, msg in
                  oracle.compare(mine, same[1][k], g, *tolerance(backend, same[1][k].dtype), what=f"grad[{k}]")]
    if fails:
        kind = fails[0][0]
        raise failure(("loss " if not kind.startswith("grad") else "") + kind)("\n".join(m for _, m in fails))


def tolerance(backend: str, dtype: torch.dtype):
    """(margin, elementwise) of ``oracle.compare``: fp64 and fp32 entry by entry with a tight margin
    (PyTorch's own error is then tiny anyway); fp16/bf16 the suite's ``lowp_error_bound`` criterion."""
    if dtype == torch.float64:
        return 1e-9, True
    if dtype == torch.float32:
        return 2e-5, True
    return lowp_margin(backend, dtype, 2e-3), False


def run(backend: str, strategy, check):
    """Run ``check(backend, case)`` on the profile's examples of ``strategy(backend)``."""
    @settings(PROFILE, max_examples=EXAMPLES[backend])
    @given(strategy(backend))
    def prop(case):
        check(backend, case)
    prop()


def small(backend: str) -> bool:
    return backend == "triton" and INTERPRETED


def sizes(edges, lo, hi):
    """A size in [lo, hi]: one of the kernels' edge sizes, or any."""
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


@dataclasses.dataclass
class Case:
    """What every drawn example has (the loss-specific cases add their fields)."""
    seed: int
    dtype: torch.dtype
    specials: list      # [(position, value)] injected into one input
    layout: str         # of the (main) input: LAYOUTS
    reduction: str


IGNORED = st.sampled_from(("none", "some", "all"))  # rows set to ignore_index
CLASS_WEIGHTS = st.sampled_from(("none", "positive", "zeros", "negative", "all_zero"))  # class_weight modes


def target_dtypes(base: dict):
    """Probability / binary targets: the input's dtype, or promoted (float32, float64)."""
    return st.sampled_from((base["dtype"], torch.float32, torch.float64))


def common(d, dtypes=DTYPES, reductions=REDUCTIONS) -> dict:
    """Draw the fields of ``Case``."""
    return dict(seed=d(st.integers(0, 1 << 16)), dtype=d(st.sampled_from(dtypes)),
                specials=d(st.lists(st.tuples(st.integers(0, 1 << 20), st.sampled_from(SPECIAL)), max_size=3)),
                layout=d(st.sampled_from(LAYOUTS)), reduction=d(st.sampled_from(reductions)))


# ------------------------------------------------------------------------------------------------
# cross_entropy and focal_loss (softmax over dim 1)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CrossEntropyCase(Case):
    """The options of cross_entropy and linear_cross_entropy."""
    ignore: str             # "none" / "some" / "all" rows
    ignore_index: int
    weight: str             # CLASS_WEIGHTS
    label_smoothing: float
    logit_scale: float
    softcap: Optional[float]
    z_loss: float

    def options(self, ignore_index: int) -> dict:
        return dict(ignore_index=ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
                    logit_scale=self.logit_scale, softcap=self.softcap, z_loss=self.z_loss)


@dataclasses.dataclass
class SoftmaxCase(CrossEntropyCase):
    shape: tuple            # input shape: (C,), (N, C) or (N, C, d1)
    scale: float            # logits ~ N(0, scale); 1e4, 1e10: large finite logits (cancellation, overflow)
    target: str             # "int64", "uint8", "int32" class indices, or "prob" (float) targets
    target_dtype: Optional[torch.dtype]
    target_grad: bool


def softmax_cases(backend, *, focal=False):
    rows_hi, c_hi = (4, 4097) if small(backend) else (40, 8193)

    @st.composite
    def draw(d):
        kind = d(st.sampled_from(("2d", "1d", "kdim")))
        c = d(sizes(EDGE_C, 1, c_hi))
        n_hi = max(1, min(rows_hi, MAX_ELEMENTS // c))
        if kind == "1d":
            shape = (c,)
        elif kind == "2d":
            shape = (d(st.integers(1, n_hi)), c)
        else:
            n = d(st.integers(1, max(1, n_hi // 3)))
            shape = (n, c, d(st.integers(1, 3)))
        # int32 targets only check that celoss refuses them as PyTorch does: drawn less often
        target = "int64" if focal else d(st.sampled_from(("int64", "prob", "int64", "prob", "uint8", "int32")))
        base = common(d)
        return SoftmaxCase(
            **base, shape=shape, scale=d(st.sampled_from((3.0, 0.01, 50.0, 1e4, 1e10))), target=target,
            target_dtype=d(target_dtypes(base)) if target == "prob" else None,
            target_grad=target == "prob" and d(st.booleans()),
            ignore=d(IGNORED),
            ignore_index=d(st.sampled_from((-100, 0, c - 1))),
            weight=d(CLASS_WEIGHTS),
            label_smoothing=0.0 if focal else d(st.sampled_from((0.0, 0.1, 0.5, 1.0))),
            logit_scale=1.0 if focal else d(st.sampled_from((1.0, 0.7, 1.1, 3.0))),
            softcap=None if focal else d(st.sampled_from((None, 0.5, 5.0, 30.0))),
            z_loss=0.0 if focal else d(st.sampled_from((0.0, 1e-4, 1e-2))))
    return draw()


def class_targets(gen, shape, c, ignore, ignore_index, dtype):
    """Class indices of ``shape`` with ``ignore`` (none / some / all) positions set to ignore_index."""
    t = torch.randint(0, c, shape, generator=gen)
    if ignore == "none" and 0 <= ignore_index < c:
        if c == 1:
            return t.to(dtype), -100
        t = torch.where(t == ignore_index, (t + 1) % c, t)
    elif ignore != "none" and t.numel():
        mask = torch.rand(shape, generator=gen) < 0.4 if ignore == "some" else torch.ones(shape, dtype=torch.bool)
        mask.view(-1)[0] = True
        t[mask] = ignore_index
    if dtype == torch.uint8 and not bool(((t >= 0) & (t < 256)).all()):
        dtype = torch.int64  # a uint8 target can't hold ignore_index -100: keep the row set as drawn
    return t.to(dtype), ignore_index


def softmax_args(case: SoftmaxCase):
    gen = torch.Generator().manual_seed(case.seed)
    c = case.shape[0] if len(case.shape) == 1 else case.shape[1]
    # K-dim: "transposed" puts the classes last in memory (channels-last)
    x = tensor_arg(gen, case.shape, case.dtype, case.layout, scale=case.scale, specials=case.specials)
    ignore_index = case.ignore_index
    if case.target == "prob":
        p = torch.softmax(torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2,
                          dim=1 if len(case.shape) > 1 else 0)
        target = Arg(p.to(case.target_dtype), grad=case.target_grad)
    else:
        t_shape = case.shape[:1] + case.shape[2:] if len(case.shape) > 1 else ()
        t, ignore_index = class_targets(gen, t_shape, c, case.ignore, ignore_index,
                                        getattr(torch, case.target))
        target = Arg(t)
    w = class_weight(gen, c, case.weight, case.dtype)
    return x, target, (None if w is None else Arg(w)), ignore_index


def check_cross_entropy(backend, case: SoftmaxCase):
    x, target, w, ignore_index = softmax_args(case)
    differential("cross_entropy", backend, dict(input=x, target=target, weight=w), case.options(ignore_index),
                 case.seed)


@dataclasses.dataclass
class FocalCase:
    base: SoftmaxCase
    gamma: float
    alpha: str  # "none", "float", "tensor"
    alpha_value: float


def focal_cases(backend):
    return st.builds(FocalCase, softmax_cases(backend, focal=True), st.sampled_from((2.0, 0.0, 0.5, 1.0, 2.5)),
                     st.sampled_from(("none", "float", "tensor")), st.sampled_from((0.25, 1.0, 0.0, -0.5)))


def check_focal(backend, case: FocalCase):
    x, target, w, ignore_index = softmax_args(case.base)
    alpha = {"none": None, "float": case.alpha_value, "tensor": None if w is None else w}[case.alpha]
    kwargs = dict(gamma=case.gamma, ignore_index=ignore_index, reduction=case.base.reduction)
    args = dict(input=x, target=target, alpha=alpha)
    if not isinstance(alpha, Arg):
        kwargs["alpha"] = args.pop("alpha")
    differential("focal_loss", backend, args, kwargs, case.base.seed)


# ------------------------------------------------------------------------------------------------
# linear_cross_entropy
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LinearCase(CrossEntropyCase):  # layout: of the hidden states
    w_layout: str       # of the classifier: "contiguous" or "transposed"
    special_in: str     # "input" or "linear_weight"
    lead: tuple         # (N,) or (B, T)
    d: int
    v: int
    bias: bool
    shift: bool
    chunk_bytes: Optional[int]


def linear_cases(backend):
    m_hi, v_hi, d_hi = (17, 129, 33) if small(backend) else (33, 600, 40)

    @st.composite
    def draw(d):
        m = d(sizes(EDGE_M, 1, m_hi))
        lead = (m,) if d(st.booleans()) else (d(st.integers(1, 2)), m)
        v = d(sizes(EDGE_V, 1, v_hi))
        dtypes = (torch.float32, torch.float16, torch.float64) if small(backend) else DTYPES
        return LinearCase(
            # bf16 tl.dot is wrong in Triton's interpreter (Triton issue 11584): bf16 runs on a GPU only
            **common(d, dtypes), w_layout=d(st.sampled_from(("contiguous", "transposed"))),
            special_in=d(st.sampled_from(("input", "linear_weight"))), lead=lead, d=d(sizes(EDGE_D, 1, d_hi)), v=v,
            bias=d(st.booleans()),
            shift=len(lead) == 2 and m >= 2 and d(st.booleans()),
            ignore=d(IGNORED), ignore_index=d(st.sampled_from((-100, 0, v - 1))),
            weight=d(CLASS_WEIGHTS),
            label_smoothing=d(st.sampled_from((0.0, 0.1, 1.0))), logit_scale=d(st.sampled_from((1.0, 0.7, 3.0))),
            softcap=d(st.sampled_from((None, 0.5, 30.0))), z_loss=d(st.sampled_from((0.0, 1e-2))),
            chunk_bytes=d(st.sampled_from((None, 1, 4096))))
    return draw()


def check_linear(backend, case: LinearCase):
    gen = torch.Generator().manual_seed(case.seed)
    sp = dict(input=(), linear_weight=())
    sp[case.special_in] = case.specials
    x = tensor_arg(gen, case.lead + (case.d,), case.dtype, case.layout, scale=1.0, specials=sp["input"])
    w = tensor_arg(gen, (case.v, case.d), case.dtype, case.w_layout, scale=1.5 / math.sqrt(case.d),
                   specials=sp["linear_weight"])
    b = tensor_arg(gen, (case.v,), case.dtype, "contiguous", scale=0.5) if case.bias else None
    t, ignore_index = class_targets(gen, case.lead, case.v, case.ignore, case.ignore_index, torch.int64)
    cw = class_weight(gen, case.v, case.weight, case.dtype)
    kwargs = dict(case.options(ignore_index), shift=case.shift)
    args = dict(input=x, linear_weight=w, target=Arg(t), linear_bias=b, weight=None if cw is None else Arg(cw))
    differential("linear_cross_entropy", backend, args, kwargs, case.seed,
                 extra=None if case.chunk_bytes is None else dict(chunk_bytes=case.chunk_bytes))


# ------------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits and sigmoid_focal_loss (elementwise)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BinaryCase(Case):
    shape: tuple
    target_dtype: torch.dtype
    target_grad: bool
    special_in: str     # "input" or "target"
    weight: str         # "none", "class" (C,), "row" (..., 1), "full"
    pos_weight: str     # "none", "class", "full"
    weight_values: str  # "positive", "zeros", "negative"


def binary_cases(backend):
    @st.composite
    def draw(d):
        kind = d(st.sampled_from(("2d", "0d", "1d", "3d")))
        c = d(sizes(EDGE_C, 1, 2049 if small(backend) else 5000))
        shape = {"0d": (), "1d": (c,), "2d": (d(st.integers(1, max(1, 4000 // c))), c),
                 "3d": (d(st.integers(1, 3)), d(st.integers(1, max(1, 2000 // c))), c)}[kind]
        base = common(d)
        return BinaryCase(
            **base, shape=shape, target_dtype=d(target_dtypes(base)),
            target_grad=d(st.booleans()),
            special_in=d(st.sampled_from(("input", "target"))),
            weight=d(st.sampled_from(("none", "class", "row", "full"))),
            pos_weight=d(st.sampled_from(("none", "class", "full"))),
            weight_values=d(st.sampled_from(("positive", "zeros", "negative"))))
    return draw()


def binary_args(case: BinaryCase, target_grad: bool):
    gen = torch.Generator().manual_seed(case.seed)
    sp = dict(input=(), target=())
    sp[case.special_in] = case.specials
    x = tensor_arg(gen, case.shape, case.dtype, case.layout, specials=sp["input"])
    y = torch.rand(case.shape, generator=gen, dtype=torch.float64)
    if y.dim():
        y[..., ::3] = (y[..., ::3] > 0.5).double()  # hard and soft labels
    y = y.to(case.target_dtype)
    for pos, v in sp["target"]:
        if y.numel():
            y.view(-1)[pos % y.numel()] = v
    c = case.shape[-1] if case.shape else 1

    def weights(kind):
        shape = {"class": (c,), "row": case.shape[:-1] + (1,), "full": case.shape}.get(kind)
        if shape is None or not case.shape:
            return None
        w = class_weight(gen, math.prod(shape), case.weight_values, case.dtype)
        return Arg(w.reshape(shape))
    return x, Arg(y, grad=target_grad), weights(case.weight), weights(case.pos_weight)


def check_binary(backend, case: BinaryCase):
    x, y, w, pw = binary_args(case, case.target_grad)
    differential("binary_cross_entropy_with_logits", backend, dict(input=x, target=y, weight=w, pos_weight=pw),
                 dict(reduction=case.reduction), case.seed)


@dataclasses.dataclass
class SigmoidFocalCase:
    base: BinaryCase
    alpha: float
    gamma: float


def sigmoid_focal_cases(backend):
    return st.builds(SigmoidFocalCase, binary_cases(backend), st.sampled_from((0.25, -1.0, 0.0, 1.0)),
                     st.sampled_from((2.0, 0.0, 0.5, 1.0)))


def check_sigmoid_focal(backend, case: SigmoidFocalCase):
    # targets are documented as not differentiated (celoss raises if they require grad), and as
    # probabilities: finite targets outside [0, 1] (the +-1e30 specials) are outside the loss's
    # domain (celoss.sigmoid_focal_loss's docstring); NaN / +-inf targets stay
    base = case.base
    if base.special_in == "target":
        base = dataclasses.replace(base, specials=[(p, v) for p, v in base.specials if not math.isfinite(v)])
    x, y, _, _ = binary_args(base, target_grad=False)
    differential("sigmoid_focal_loss", backend, dict(inputs=x, targets=y),
                 dict(alpha=case.alpha, gamma=case.gamma, reduction=base.reduction), base.seed)


# ------------------------------------------------------------------------------------------------
# distillation_loss (softmax over the last dim)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DistillCase(Case):
    teacher_dtype: torch.dtype
    special_in: str     # "student" or "teacher"
    shape: tuple        # (V,), (N, V) or (B, T, V)
    kind: str
    temperature: float
    beta: float
    target: bool
    alpha: float
    ignore: str
    ignore_index: int
    teacher_grad: bool


def distill_cases(backend):
    rows_hi, v_hi = (4, 4097) if small(backend) else (40, 8193)

    @st.composite
    def draw(d):
        v = d(sizes(EDGE_C, 1, v_hi))
        n_hi = max(1, min(rows_hi, MAX_ELEMENTS // v))
        shape = d(st.sampled_from((
            st.tuples(st.integers(1, n_hi), st.just(v)), st.tuples(st.just(v)),
            st.tuples(st.integers(1, 2), st.integers(1, max(1, n_hi // 2)), st.just(v)))).flatmap(lambda s: s))
        base = common(d, reductions=("batchmean", "sum", "mean", "none"))
        target = d(st.booleans())
        return DistillCase(
            **base, teacher_dtype=d(st.sampled_from((base["dtype"], torch.float32))),
            special_in=d(st.sampled_from(("student", "teacher"))), shape=shape,
            kind=d(st.sampled_from(("kl", "reverse_kl", "ce", "jsd"))),
            temperature=d(st.sampled_from((1.0, 0.5, 2.0, 4.0))), beta=d(st.sampled_from((0.5, 0.0, 0.1, 1.0))),
            target=target, alpha=d(st.sampled_from((1.0, 0.5, 0.0))) if target else 1.0,
            ignore=d(IGNORED), ignore_index=d(st.sampled_from((-100, 0))),
            teacher_grad=d(st.booleans()))
    return draw()


def check_distill(backend, case: DistillCase):
    gen = torch.Generator().manual_seed(case.seed)
    sp = dict(student=(), teacher=())
    sp[case.special_in] = case.specials
    s = tensor_arg(gen, case.shape, case.dtype, case.layout, specials=sp["student"])
    t = tensor_arg(gen, case.shape, case.teacher_dtype, case.layout, grad=case.teacher_grad, shift=0.5,
                   specials=sp["teacher"])
    target, ignore_index = None, case.ignore_index
    if case.target:
        y, ignore_index = class_targets(gen, case.shape[:-1], case.shape[-1], case.ignore, case.ignore_index,
                                        torch.int64)
        target = Arg(y)
    kwargs = dict(temperature=case.temperature, kind=case.kind, beta=case.beta, alpha=case.alpha,
                  ignore_index=ignore_index, reduction=case.reduction)
    differential("distillation_loss", backend, dict(student_logits=s, teacher_logits=t, target=target), kwargs,
                 case.seed)


# ------------------------------------------------------------------------------------------------
# the properties: each public loss on each backend
# ------------------------------------------------------------------------------------------------

LOSSES = {"cross_entropy": (softmax_cases, check_cross_entropy), "focal_loss": (focal_cases, check_focal),
          "linear_cross_entropy": (linear_cases, check_linear),
          "binary_cross_entropy_with_logits": (binary_cases, check_binary),
          "sigmoid_focal_loss": (sigmoid_focal_cases, check_sigmoid_focal),
          "distillation_loss": (distill_cases, check_distill)}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss", list(LOSSES))
def test_matches_pytorch(loss, backend):
    run(backend, *LOSSES[loss])
