"""The compile-test registry: every kernel's launch plans on CPU stand-in tensors.

Each ``*_plan`` function returns what the launcher of ``celoss.kernels`` would launch,
``(kernel, grid, kwargs, options, result)``, with small CPU tensors standing in for CUDA ones
(only their dtypes and alignments matter to the compiler; the launch configuration is the GPU
one when TRITON_INTERPRET is unset); each ``*_cases`` function lists the flag combinations the
launcher can produce. :func:`aot.compile_many` compiles them by name (``"plans", "ce_plan"``) in
fresh processes; tests/kernels and scripts/gpu-check use them, the wheel does not ship them.
"""
import itertools

import torch

from celoss.kernels import binary as kb
from celoss.kernels import cross_entropy as ce
from celoss.kernels import distillation as kd
from celoss.kernels import linear_cross_entropy as lce
from celoss.kernels import logprobs as lp
from celoss.kernels import scale as ks

# ----------------------------------------------------------------------------------------------
# Cross-entropy rows (celoss.kernels.cross_entropy)
# ----------------------------------------------------------------------------------------------
CE_KERNELS = ("fused", "stats", "grad")


def ce_plan(kernel="fused", dtype="bfloat16", block=ce.MAX_BLOCK, aligned=True, *, weight=False,
             smoothing=False, softcap=False, soft_target=False, focal=False, grad=None, split=False,
             exclude_target=False):
    """The plan (kernel, grid, kwargs, options, outputs) a launch would use for rows whose
    ``block_config`` is ``block``, with small CPU tensors standing in for CUDA ones (only their
    dtypes and alignments matter to the compiler). ``aligned=False``: odd C and row strides and a
    logits pointer off the 16-byte grid (a class slice), so no divisibility specialization.
    ``grad``: None, "scalar" or "row" (fused kernel: coefficient shape). ``split``: the fused
    kernel's split-vocabulary mode (two splits; rows of several blocks, so MAX_BLOCK only);
    ``exclude_target``: the statistics kernel as that mode launches it."""
    dt = getattr(torch, dtype)
    c = block if aligned else block - 1  # same block_config, opposite divisibility
    if block == ce.MAX_BLOCK:
        c = 2 * block + (0 if aligned else 1)
    assert ce.block_config(c)[0] == block
    n = 2

    def rows():
        return torch.zeros(n, c, dtype=dt) if aligned else torch.zeros(n, c + 2, dtype=dt)[:, 1:c + 1]

    logits = rows()
    target = torch.zeros(n, dtype=torch.int64)
    weights = torch.rand(c) if weight else None
    cap = 30.0 if softcap else None
    if kernel == "fused":
        soft = rows() if soft_target else None
        coef = torch.ones(n if grad == "row" else 1)
        grad_out = (rows() if aligned else logits) if grad else None  # unaligned: in place
        return ce.fused_plan(logits, None if soft_target else target, soft, weights, coef, grad_out,
                             ignore_index=-100, label_smoothing=0.1 if smoothing else 0.0,
                             logit_scale=1.0, softcap=cap, z_loss=1e-4, focal_gamma=2.0 if focal else None,
                             split_stats=torch.zeros(2, n, 4) if split else None)
    if kernel == "stats":
        return ce.stats_plan(logits, target, weights, class_start=0, ignore_index=-100, logit_scale=1.0,
                             softcap=cap, exclude_target=exclude_target)
    if kernel == "grad":
        return ce.grad_plan(logits, target, weights, torch.zeros(n), torch.zeros(n, 3), rows(),
                            class_start=0, logit_scale=1.0, softcap=cap)
    raise ValueError(kernel)


def ce_cases(kernel="fused", heaviest=False):
    """Flag combinations the launchers can produce for ``kernel``. Focal excludes smoothing and
    probability targets, as celoss validates. ``heaviest``: per mode (stats, grad; fused with
    index targets, probability targets, focal) the combination with every option on, which has
    the most registers summed over all configurations in the full sweep (the single largest
    variant, fp32 unaligned weight + smoothing without softcap, 128 registers, is close behind)."""
    if kernel in ("stats", "grad"):
        combos = [dict(weight=wt, softcap=sc) for wt in (False, True) for sc in (False, True)]
        if kernel == "stats":  # the split mode's variant: all options off and all on
            combos += [dict(c, exclude_target=True) for c in (combos[0], combos[-1])]
        return combos[-1:] if heaviest else combos
    combos = []
    for mode in ("index", "soft", "focal"):
        for wt in (False, True):
            for sm in ((False,) if mode == "focal" else (False, True)):
                for sc in (False, True):
                    for g in (None, "scalar", "row"):
                        combos.append(dict(weight=wt, smoothing=sm, softcap=sc, grad=g, split=False,
                                           soft_target=mode == "soft", focal=mode == "focal"))
                        # split mode (index targets): it swaps pass 1 for the merge and bounds pass 2,
                        # the same for every option: all off and all on, without and with a gradient
                        all_or_none = wt == sc and (sm == wt or mode == "focal")
                        if mode != "soft" and g != "scalar" and all_or_none:
                            combos.append(dict(combos[-1], split=True))
    if heaviest:  # (split rows exist at MAX_BLOCK only: not among the heaviest of every block)
        return [c for c in combos if c["weight"] and c["softcap"] and c["grad"] == "row"
                and (c["smoothing"] or c["focal"]) and not c["split"]]
    return combos

# ----------------------------------------------------------------------------------------------
# Linear cross-entropy tiles (celoss.kernels.linear_cross_entropy)
# ----------------------------------------------------------------------------------------------

LCE_KERNELS = ("stats", "backward_dx", "backward_dw")
LCE_FLAGS = {"stats": ("src", "bias", "softcap", "smoothing", "weight"),
             "backward_dx": ("src", "bias", "softcap", "smoothing", "weight", "filter"),
             "backward_dw": ("src", "bias", "softcap", "smoothing", "weight", "filter", "no_dw")}


def lce_plan(kernel="backward_dw", dtype="bfloat16", aligned=True, round_sizes=False, config=None, arch=None, **flags):
    """The plan (kernel, grid, kwargs, options, outputs) a launch would use, with small CPU tensors
    standing in for CUDA ones (only dtypes and alignments matter to the compiler; the launch
    configuration is the GPU one when TRITON_INTERPRET is unset). ``aligned=False``: odd D and
    strides, pointers off the 16-byte grid; ``round_sizes``: M and V multiples of 16 (another
    specialization); ``arch``: the compute capability whose backward tiles to take (80, 90; None:
    the default table). Flags: see :data:`LCE_FLAGS`."""
    unknown = set(flags) - set(LCE_FLAGS[kernel])
    if unknown:
        raise ValueError(f"unknown flags {unknown}")
    dt = getattr(torch, dtype)
    n, v = (32, 320) if round_sizes else (5, 301)
    d = 256 if aligned else 255  # wide enough for every BLOCK_N of the backward table

    def mat(rows, cols, dtype=dt):
        if aligned:
            return torch.zeros(rows, cols, dtype=dtype)
        return torch.zeros(rows, cols + 2, dtype=dtype)[:, 1:cols + 1]

    x, linear_weight = mat(n, d), mat(v, d)
    b = torch.zeros(v, dtype=dt) if flags.get("bias") else None
    src = torch.arange(n) if flags.get("src") else None
    tgt = torch.zeros(n, dtype=torch.int64)
    smoothing = bool(flags.get("smoothing"))
    weight = torch.ones(v) if flags.get("weight") else None
    softcap = 30.0 if flags.get("softcap") else None
    if kernel == "stats":
        return lce.stats_plan(x, linear_weight, b, src, tgt, weight, logit_scale=1.0, softcap=softcap,
                              need_wz=smoothing, config=config)
    if kernel in ("backward_dx", "backward_dw"):
        f32 = dict(dtype=torch.float32)
        dx = torch.zeros(n, d, **f32) if kernel == "backward_dx" else None
        dw = None if flags.get("no_dw") or kernel == "backward_dx" else torch.zeros(v, d, **f32)
        db = torch.zeros(v, **f32) if b is not None and kernel == "backward_dw" else None
        thr = torch.zeros(n, **f32) if flags.get("filter") else None
        unit = None if dt == torch.float32 else torch.ones(1, **f32)
        plans = lce.backward_plans(x, linear_weight, b, src, tgt, weight, torch.zeros(n, **f32),
                                   torch.zeros(n, 3, **f32), thr, dx, dw, db, logit_scale=1.0, softcap=softcap,
                                   has_d=smoothing, unit=unit, config=config, arch=arch)
        return plans[kernel.split("_")[1]]
    raise ValueError(kernel)


def lce_cases(kernel="backward", heaviest=False):
    """Flag combinations the launchers can produce (``heaviest``: the one with most live state).
    Class weights only matter with smoothing (the weighted_z / D terms)."""
    names = LCE_FLAGS[kernel]
    combos = []
    for values in itertools.product((False, True), repeat=len(names)):
        c = dict(zip(names, values))
        if c["weight"] and not c["smoothing"]:
            continue
        if c.get("no_dw") and not c["bias"]:  # the dW kernel then has nothing to do (db only)
            continue
        combos.append(c)
    if heaviest:
        return [c for c in combos if all(c[k] for k in names if not k.startswith("no_")) and not c.get("no_dw")]
    return combos

# ----------------------------------------------------------------------------------------------
# Distillation rows (celoss.kernels.distillation)
# ----------------------------------------------------------------------------------------------

def distill_plan(kind="kl", student="bfloat16", teacher="bfloat16", block=kd.MAX_BLOCK, aligned=True, *,
             target=False, hard=False, t_is_one=True, grad=None):
    """The plan a launch would use for rows whose ``block_config`` is ``block``, with small CPU
    tensors standing in for CUDA ones. ``aligned=False``: odd V and row strides and pointers off
    the 16-byte grid. ``hard``: a class term (needs ``target``); ``grad``: None, "scalar", "row"."""
    v = block if aligned else block - 1
    if block == kd.max_block(kind):
        v = 2 * block + (0 if aligned else 1)
    if block == kd.MIN_BLOCK and not aligned:
        v = block - 5
    assert kd.block_config(v, kind)[0] == block, (kind, block)
    n = 2

    def rows(dtype):
        dt = getattr(torch, dtype)
        return torch.zeros(n, v, dtype=dt) if aligned else torch.zeros(n, v + 2, dtype=dt)[:, 1:v + 1]

    s = rows(student)
    y = torch.zeros(n, dtype=torch.int64) if (target or hard) else None
    coef = torch.ones(n if grad == "row" else 1)
    g = rows(student) if grad else None
    return kd.distill_plan(s, rows(teacher), y, coef, g, kind=kind, temperature=1.0 if t_is_one else 2.0,
                           beta=0.5, alpha=0.5 if hard else 1.0, ignore_index=-100)


def distill_cases(heaviest=False):
    """Flag combinations the launcher can produce (``heaviest``: the most live state per kind)."""
    combos = []
    for kind in kd.KINDS:
        for target, hard in ((False, False), (True, False), (True, True)):
            for t_is_one in (True, False):
                for grad in (None, "scalar", "row"):
                    combos.append(dict(kind=kind, target=target, hard=hard, t_is_one=t_is_one, grad=grad))
    if heaviest:
        return [c for c in combos if c["hard"] and not c["t_is_one"] and c["grad"] == "row"]
    return combos

# ----------------------------------------------------------------------------------------------
# Binary elements (celoss.kernels.binary)
# ----------------------------------------------------------------------------------------------

def binary_plan(dtype="bfloat16", target_dtype="bfloat16", aligned=True, *, focal=False, weight=False,
             pos_weight=False, per_element=False, up=False, grad_input=False, grad_target=False):
    """The plan a launch would use, on small CPU stand-in tensors (``aligned=False``: an odd
    element count and pointers off the 16-byte grid)."""
    r, c = 3, (37 if aligned else 35)

    def t(dt):
        dt = getattr(torch, dt)
        return torch.zeros(r, c, dtype=dt) if aligned else torch.zeros(r * c + 1, dtype=dt)[1:].view(r, c)

    x, y = t(dtype), t(target_dtype)
    weights = torch.zeros(c).expand(r, c) if weight else None
    pw = torch.zeros(r, 1).expand(r, c) if pos_weight else None
    need = grad_input or grad_target
    coef = (t(dtype) if up else torch.ones(1)) if need else None
    return kb.binary_plan(x, y, weights, pw, coef, per_element=per_element, grad_input=grad_input,
                          grad_target=grad_target and not focal, focal_alpha=0.25,
                          focal_gamma=2.0 if focal else None)


def binary_cases(heaviest=False):
    """Flag combinations the launcher can produce (focal: no weights, no target gradient)."""
    combos = []
    for focal in (False, True):
        for weight in ((False,) if focal else (False, True)):
            for pos_weight in ((False,) if focal else (False, True)):
                for per_element in (False, True):
                    for grads in ((False, False), (True, False), (True, True)):
                        if focal and grads[1]:
                            continue
                        for up in ((False, True) if any(grads) else (False,)):
                            combos.append(dict(focal=focal, weight=weight, pos_weight=pos_weight,
                                               per_element=per_element, up=up,
                                               grad_input=grads[0], grad_target=grads[1]))
    if heaviest:
        return [c for c in combos if (c["focal"] or (c["weight"] and c["pos_weight"]))
                and c["per_element"] and c["up"] and c["grad_input"]]
    return combos

# ----------------------------------------------------------------------------------------------
# Token log-probabilities (celoss.kernels.logprobs)
# ----------------------------------------------------------------------------------------------

def logprobs_plan(kernel="forward", dtype="bfloat16", block=4096, *, has_gl=True, has_entropy=True):
    """A launch plan (one row of ``block`` classes)."""
    x = torch.empty(1, block, dtype=getattr(torch, dtype))
    y = torch.zeros(1, dtype=torch.int64)
    if kernel == "forward":
        return lp.forward_plan(x, y, ignore_index=-100, scale=1.0)
    vec = torch.empty(1, dtype=torch.float32)
    return lp.backward_plan(x, y, vec, vec, vec if has_gl else None, vec if has_entropy else None,
                         torch.empty_like(x), ignore_index=-100, scale=1.0)

# ----------------------------------------------------------------------------------------------
# Upstream-gradient scale (celoss.kernels.scale)
# ----------------------------------------------------------------------------------------------

SCALE_DTYPES = ("float32", "float16", "bfloat16")


def scale_plan(dtype="bfloat16", per_row=False, aligned=True):
    """The in-place scale's plan: a contiguous gradient by one scale, or rows (``aligned=False``:
    odd row length and stride, pointer off the 16-byte grid, as for in-place logits) by one per row."""
    dt = getattr(torch, dtype)
    c = 2 * ks.BLOCK + (0 if aligned else 1)  # several tiles per row: no loop bound specialized to 1
    grad = torch.zeros(3, c, dtype=dt) if aligned else torch.zeros(3, c + 2, dtype=dt)[:, 1:c + 1]
    return ks.scale_plan(grad, torch.ones(3 if per_row else 1))
