"""Operations and the registry of methods that compute them.

Importing this module does not import torch (the parent process stays light); everything that needs
torch, celoss or a peer library is imported inside the functions, in the worker process. A method
that can't run says why (``Method.unavailable``) and becomes a row of the report, never a crash.

Operations (``OPS``): ``ce`` (logits given), ``linear`` (fused linear cross-entropy from hidden states
and the classifier weight), ``logprobs`` (per-token log-probabilities and entropy from hidden states
and the classifier weight, the RL policy-loss building block), ``linear_distill`` (distillation from
the student's and the teacher's hidden states and classifiers), and the loss family ``focal``,
``sigmoid_focal``, ``bce``, ``distill``.
Each defines its inputs (deterministic per seed, created on the device in the dtype), which inputs
get gradients, the roofline floor of each phase (bytes moved or FLOPs), and the plain-PyTorch
("eager") composition that the peers are compared with.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "f32": "fp32", "bfloat16": "bf16",
                 "float16": "fp16", "half": "fp16", "f16": "fp16", "float64": "fp64", "double": "fp64"}
PHASES = ("fwd", "bwd", "train")  # train = forward + backward of one training step
FAMILY = ("focal", "sigmoid_focal", "bce", "distill")
DISTILL_TEMPERATURE = 2.0
FOCAL_GAMMA = 2.0
SIGMOID_FOCAL_ALPHA = 0.25
BCE_POSITIVE_RATE = 0.05
LOGPROBS_TEMPERATURE = 0.7  # a sampling temperature != 1, so the scaling is part of what is timed
ENTROPY_BONUS = 0.01        # the training step's loss: -(mean log-prob + ENTROPY_BONUS * mean entropy)


def canonical_dtype(name: str) -> str:
    name = name.strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in ELEMENT_SIZE:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(ELEMENT_SIZE)}")
    return name


def torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}[name]


# ----------------------------------------------------------------------------------------------
# Operations
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    name: str
    title: str
    keys: tuple          # argument order of the eager function and of celoss's function
    grad_keys: tuple     # inputs that get a gradient in the training step
    dims: tuple          # shape keys: ("N", "V") or ("N", "D", "V")
    floor_kind: str      # "bytes" (memory-bound) or "flops" (compute-bound)
    celoss_attr: str     # name of the celoss function
    param_keys: tuple = ()  # inputs that are parameters: they still require grad under no_grad (eval)
    products: int = 1    # N x D x V products of the forward (2 for distillation: student and teacher);
    #                      the backward's are always 2 (G W and G^T X: one layer gets gradients)

    def floor(self, shape: dict, dtype: str, phase: str) -> float:
        """Bytes that must move (or FLOPs that must run) in `phase` at the least."""
        n, v, e = shape["N"], shape["V"], ELEMENT_SIZE[dtype]
        if self.floor_kind == "flops":
            fwd = 2 * self.products
            return {"fwd": fwd, "bwd": 4, "train": fwd + 4}[phase] * n * shape["D"] * v
        reads = {"ce": 1, "focal": 1, "distill": 2, "bce": 2, "sigmoid_focal": 2}[self.name]
        # fwd reads the inputs; bwd writes the gradient; the fused training step does both
        return {"fwd": reads, "bwd": 1, "train": reads + 1}[phase] * n * v * e

    def grad_bytes(self, shape: dict, dtype: str) -> int:
        """Size of the gradients the training step must produce (memory is reported against it)."""
        e = ELEMENT_SIZE[dtype]
        if "D" in self.dims:
            return (shape["N"] + shape["V"]) * shape["D"] * e
        return shape["N"] * shape["V"] * e

    def input_bytes(self, shape: dict, dtype: str) -> int:
        e = ELEMENT_SIZE[dtype]
        if "D" in self.dims:
            return self.products * (shape["N"] + shape["V"]) * shape["D"] * e + shape["N"] * 8
        per = {"ce": 1, "focal": 1, "distill": 2, "bce": 2, "sigmoid_focal": 2}[self.name]
        return per * shape["N"] * shape["V"] * e + shape["N"] * 8

    def size(self, shape: dict) -> int:
        """Problem size used to order cells and to skip larger ones after an OOM or a timeout."""
        return shape["N"] * shape["V"] * shape.get("D", 1)

    def label(self, shape: dict) -> str:
        return " x ".join(str(shape[k]) for k in self.dims)


OPS = {
    "ce": Op("ce", "cross-entropy, logits given (N x V)", ("x", "y"), ("x",), ("N", "V"), "bytes",
             "cross_entropy"),
    "linear": Op("linear", "fused linear cross-entropy (N x D hidden, V x D classifier)", ("x", "w", "y"),
                 ("x", "w"), ("N", "D", "V"), "flops", "linear_cross_entropy", param_keys=("w",)),
    "logprobs": Op("logprobs", f"per-token log-probs and entropy from hidden states (N x D hidden, V x D "
                   f"classifier, T={LOGPROBS_TEMPERATURE})", ("x", "w", "y"), ("x", "w"), ("N", "D", "V"),
                   "flops", "linear_token_logprobs", param_keys=("w",)),
    "linear_distill": Op("linear_distill", f"distillation from hidden states, forward KL at "
                         f"T={DISTILL_TEMPERATURE} (student and teacher: N x D hidden, V x D classifier; "
                         f"gradients for the student)", ("x", "w", "xt", "wt"), ("x", "w"), ("N", "D", "V"),
                         "flops", "linear_distillation_loss", param_keys=("w",), products=2),
    "focal": Op("focal", f"softmax focal loss (gamma={FOCAL_GAMMA})", ("x", "y"), ("x",), ("N", "V"),
                "bytes", "focal_loss"),
    "sigmoid_focal": Op("sigmoid_focal", f"sigmoid focal loss (alpha={SIGMOID_FOCAL_ALPHA}, "
                        f"gamma={FOCAL_GAMMA}, multi-label)", ("x", "t"), ("x",), ("N", "V"), "bytes",
                        "sigmoid_focal_loss"),
    "bce": Op("bce", "binary cross-entropy with logits (multi-label)", ("x", "t"), ("x",), ("N", "V"),
              "bytes", "binary_cross_entropy_with_logits"),
    "distill": Op("distill", f"distillation, forward KL at T={DISTILL_TEMPERATURE} (student and teacher "
                  f"logits)", ("s", "t"), ("s",), ("N", "V"), "bytes", "distillation_loss"),
}
LINEAR_OPS = ("linear", "logprobs", "linear_distill")  # from hidden states: compared with the bare products
SUBCOMMAND_OPS = {"ce": ("ce",), "linear": ("linear",), "logprobs": ("logprobs",),
                  "linear_distill": ("linear_distill",), "family": FAMILY, "all": ("ce",) + LINEAR_OPS + FAMILY}


def make_inputs(op: Op, shape: dict, dtype: str, device: str, seed: int) -> dict:
    """Fresh random inputs (never zeros), generated on the device in the dtype, deterministic per seed."""
    import torch
    dt = torch_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    n, v = shape["N"], shape["V"]

    def randn(*size, scale=1.0):
        t = torch.randn(*size, generator=gen, device=device, dtype=dt)
        return t.mul_(scale) if scale != 1.0 else t

    def labels():
        return torch.randint(0, v, (n,), generator=gen, device=device)

    if op.name in ("ce", "focal"):
        inp = {"x": randn(n, v), "y": labels()}
    elif op.name in ("linear", "logprobs"):
        d = shape["D"]
        inp = {"x": randn(n, d), "w": randn(v, d, scale=d ** -0.5), "y": labels()}
    elif op.name == "linear_distill":  # a teacher as wide as the student, with sharper logits
        d = shape["D"]
        inp = {"x": randn(n, d), "w": randn(v, d, scale=d ** -0.5), "xt": randn(n, d),
               "wt": randn(v, d, scale=2 * d ** -0.5)}
    elif op.name in ("bce", "sigmoid_focal"):
        t = torch.rand(n, v, generator=gen, device=device, dtype=dt).lt_(BCE_POSITIVE_RATE).to(dt)
        inp = {"x": randn(n, v), "t": t}
    elif op.name == "distill":
        inp = {"s": randn(n, v), "t": randn(n, v, scale=2.0)}
    else:  # pragma: no cover
        raise KeyError(op.name)
    for k in op.grad_keys:
        inp[k].requires_grad_(True)
    return inp


# ---- eager (plain PyTorch) compositions: what users write today --------------------------------

def eager_fn(op_name: str) -> Callable:
    import torch
    import torch.nn.functional as F

    if op_name == "ce":
        def ce(x, y):
            return F.cross_entropy(x, y)
        return ce
    if op_name == "linear":
        def linear_ce(x, w, y):
            return F.cross_entropy(F.linear(x, w), y)
        return linear_ce
    if op_name == "logprobs":
        def logprobs(x, w, y):  # what RL code writes: full float32 logits, log_softmax, gather
            logp = F.log_softmax(F.linear(x, w).float() / LOGPROBS_TEMPERATURE, dim=-1)
            lp = logp.gather(-1, y[:, None]).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            return -(lp.mean() + ENTROPY_BONUS * entropy.mean())
        return logprobs
    if op_name == "linear_distill":
        distill = eager_fn("distill")

        def linear_distill(x, w, xt, wt):  # the teacher needs no graph: nothing of it requires grad
            return distill(F.linear(x, w), F.linear(xt, wt))
        return linear_distill
    if op_name == "focal":
        def focal(x, y):
            logp = F.log_softmax(x, dim=1)
            logpt = logp.gather(1, y[:, None]).squeeze(1)
            return (-((1 - logpt.exp()) ** FOCAL_GAMMA) * logpt).mean()
        return focal
    if op_name == "sigmoid_focal":
        def sigmoid_focal(x, t):  # torchvision.ops.sigmoid_focal_loss, reduction="mean"
            p = torch.sigmoid(x)
            ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            p_t = p * t + (1 - p) * (1 - t)
            loss = ce * ((1 - p_t) ** FOCAL_GAMMA)
            alpha_t = SIGMOID_FOCAL_ALPHA * t + (1 - SIGMOID_FOCAL_ALPHA) * (1 - t)
            return (alpha_t * loss).mean()
        return sigmoid_focal
    if op_name == "bce":
        def bce(x, t):
            return F.binary_cross_entropy_with_logits(x, t)
        return bce
    if op_name == "distill":
        temp = DISTILL_TEMPERATURE

        def distill(s, t):
            return F.kl_div(F.log_softmax(s / temp, dim=-1), F.log_softmax(t / temp, dim=-1),
                            log_target=True, reduction="batchmean") * (temp * temp)
        return distill
    raise KeyError(op_name)


def celoss_fn(op_name: str, backend: str, inplace: bool = False) -> Callable:
    import celoss

    if op_name == "ce":
        def ce(x, y):
            return celoss.cross_entropy(x, y, inplace_backward=inplace, backend=backend)
        return ce
    if op_name == "linear":
        def linear_ce(x, w, y):
            return celoss.linear_cross_entropy(x, w, y, backend=backend)
        return linear_ce
    if op_name == "logprobs":
        def logprobs(x, w, y):
            lp, entropy = celoss.linear_token_logprobs(x, w, y, temperature=LOGPROBS_TEMPERATURE,
                                                       return_entropy=True, backend=backend)
            return -(lp.mean() + ENTROPY_BONUS * entropy.mean())
        return logprobs
    if op_name == "linear_distill":
        def linear_distill(x, w, xt, wt):
            return celoss.linear_distillation_loss(x, w, xt, wt, temperature=DISTILL_TEMPERATURE, kind="kl",
                                                   backend=backend)
        return linear_distill
    if op_name == "focal":
        def focal(x, y):
            return celoss.focal_loss(x, y, gamma=FOCAL_GAMMA, backend=backend)
        return focal
    if op_name == "sigmoid_focal":
        def sigmoid_focal(x, t):
            return celoss.sigmoid_focal_loss(x, t, alpha=SIGMOID_FOCAL_ALPHA, gamma=FOCAL_GAMMA,
                                             reduction="mean", backend=backend)
        return sigmoid_focal
    if op_name == "bce":
        def bce(x, t):
            return celoss.binary_cross_entropy_with_logits(x, t, backend=backend)
        return bce
    if op_name == "distill":
        def distill(s, t):
            return celoss.distillation_loss(s, t, temperature=DISTILL_TEMPERATURE, kind="kl",
                                            backend=backend)
        return distill
    raise KeyError(op_name)


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

def scalar(out):
    """The loss tensor of an output (some peers return tuples)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class Impl:
    """A built method: ``forward(inp)`` runs the loss; ``train(inp, mark)`` runs one training step
    and calls ``mark()`` between its forward and backward parts. ``prepare(inp)`` runs before a
    training step's clock starts and its memory baseline is taken, and returns the step's inputs."""

    def __init__(self, fn: Callable, keys: tuple):
        self.fn, self.keys = fn, keys

    def prepare(self, inp: dict) -> dict:
        return inp

    def forward(self, inp: dict):
        return scalar(self.fn(*[inp[k] for k in self.keys]))

    def train(self, inp: dict, mark: Callable):
        loss = self.forward(inp)
        mark()
        loss.backward()
        return loss


class NonLeafImpl(Impl):
    """For ``inplace_backward=True``, which refuses to overwrite a leaf that requires grad: the timed
    step gets ``x.clone()``, a non-leaf like a model's logits (its gradient reaches the leaf input
    through the clone, as it reaches a model's parameters). The clone is made untimed, before the
    memory baseline: what is measured is the loss and its backward, as for the other methods."""

    def __init__(self, fn: Callable, keys: tuple, nonleaf_keys: tuple):
        super().__init__(fn, keys)
        self.nonleaf_keys = nonleaf_keys

    def prepare(self, inp):
        return {k: (t.clone() if k in self.nonleaf_keys else t) for k, t in inp.items()}


class MatmulImpl(Impl):
    """The bare products a loss from hidden states needs: X W^T (forward; for distillation the
    teacher's X_t W_t^T too), G W and G^T X (backward), with G a given N x V gradient. Outputs are
    allocated, as a real computation would."""

    def __init__(self, op, shape, dtype, device):
        import torch
        gen = torch.Generator(device=device).manual_seed(12345)
        self.g = torch.randn(shape["N"], shape["V"], generator=gen, device=device,
                             dtype=torch_dtype(dtype)).mul_(1e-4)
        self.layers = (("x", "w"), ("xt", "wt"))[:op.products]

    def forward(self, inp):
        return [inp[x].detach() @ inp[w].detach().T for x, w in self.layers]

    def train(self, inp, mark):
        logits = self.forward(inp)
        mark()
        del logits
        x, w = inp["x"].detach(), inp["w"].detach()
        gx = self.g @ w
        gw = self.g.T @ x
        return gx, gw  # the step's outputs stay alive until the clock stops (as gradients would)


@dataclass
class Method:
    name: str
    ops: tuple
    doc: str
    check: Callable[[Op, str, str], Optional[str]]  # (op, device, dtype) -> reason it can't run
    build: Callable[[Op, str, str, dict], Impl]      # (op, device, dtype, shape) -> Impl
    destroys: tuple = ()   # phases in which it overwrites its inputs (restored before each call)
    compiles: bool = False  # needs torch._dynamo.reset() before building

    def unavailable(self, op: Op, device: str, dtype: str) -> Optional[str]:
        if op.name not in self.ops:
            return f"{self.name} does not implement {op.name}"
        try:
            return self.check(op, device, dtype)
        except Exception as exc:  # a broken import is a reason, not a crash
            return f"{type(exc).__name__}: {exc}"


def _missing(module: str) -> Optional[str]:
    try:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    except Exception as exc:
        return f"{module} can't be found: {type(exc).__name__}: {exc}"
    return None


def _import_reason(module: str) -> Optional[str]:
    reason = _missing(module)
    if reason:
        return reason
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"import {module} failed: {type(exc).__name__}: {exc}"
    return None


def _needs_cuda(device: str) -> Optional[str]:
    return None if device == "cuda" else "CUDA only"


def _celoss_check(backend: str):
    def check(op: Op, device: str, dtype: str):
        reason = _import_reason("celoss")
        if reason:
            return reason
        import celoss
        if not hasattr(celoss, op.celoss_attr):
            return f"celoss.{op.celoss_attr} does not exist yet"
        backend_reason = celoss.available_backends().get(backend, f"unknown backend {backend}")
        if backend_reason:
            return f"backend {backend}: {backend_reason}"
        if backend == "triton" and device != "cuda":
            return "the triton backend runs on CUDA here (the interpreter is not a benchmark)"
        if backend == "cython" and device != "cpu":
            return "the cython backend runs on CPU tensors only"
        return None
    return check


def _celoss_build(backend: str, inplace: bool = False, cache: bool = True):
    def build(op: Op, device: str, dtype: str, shape: dict):
        import celoss
        celoss.set_cpu_cache_limit(None if cache else 0)
        if inplace:
            return NonLeafImpl(celoss_fn(op.name, backend, inplace), op.keys, op.grad_keys)
        return Impl(celoss_fn(op.name, backend, inplace), op.keys)
    return build


def _eager_build(op, device, dtype, shape):
    return Impl(eager_fn(op.name), op.keys)


def _compile_build(op, device, dtype, shape):
    import torch
    return Impl(torch.compile(eager_fn(op.name), dynamic=False), op.keys)


def _liger_build(op, device, dtype, shape):
    if op.name == "ce":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        m = LigerCrossEntropyLoss()
        return Impl(lambda x, y: m(x, y), op.keys)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    m = LigerFusedLinearCrossEntropyLoss()
    return Impl(lambda x, w, y: m(w, x, y), op.keys)


def _cce_build(exact: bool):
    def build(op, device, dtype, shape):
        import cut_cross_entropy
        from cut_cross_entropy import linear_cross_entropy
        if not exact:
            return Impl(lambda x, w, y: linear_cross_entropy(x, w, y, impl="cce"), op.keys)
        impls = getattr(cut_cross_entropy, "LinearCrossEntropyImpl", None)
        if impls is None:
            impls = getattr(importlib.import_module("cut_cross_entropy.linear_cross_entropy"),
                            "LinearCrossEntropyImpl", [])
        if any(m.name.lower() == "cce_exact" for m in impls):
            return Impl(lambda x, w, y: linear_cross_entropy(x, w, y, impl="cce_exact"), op.keys)
        # releases before the exact preset (e.g. 25.1.1): exact = CCE without gradient filtering
        return Impl(lambda x, w, y: linear_cross_entropy(x, w, y, impl="cce", filter_eps=None), op.keys)
    return build


def _torch_lce_check(op, device, dtype):
    import torch.nn.functional as F
    if not hasattr(F, "linear_cross_entropy"):
        import torch
        return f"torch {torch.__version__} has no F.linear_cross_entropy (PyTorch >= 2.13)"
    return None


def _torch_lce_chunked_check(op, device, dtype):
    import torch
    return _torch_lce_check(op, device, dtype) or (
        None if hasattr(torch.nn, "LinearCrossEntropyOptions")
        else f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions")


def _torch_lce_build(chunked: bool):
    def build(op, device, dtype, shape):
        import torch
        import torch.nn.functional as F
        if chunked:
            opts = torch.nn.LinearCrossEntropyOptions()  # "auto": PyTorch's per-(device, dtype) pick
            return Impl(lambda x, w, y: F.linear_cross_entropy(x, w, y, options=opts), op.keys)
        return Impl(lambda x, w, y: F.linear_cross_entropy(x, w, y), op.keys)
    return build


def _ok(op, device, dtype):
    return None


ALL_OPS = ("ce",) + LINEAR_OPS + FAMILY
METHODS: dict[str, Method] = {}


def _register(m: Method):
    METHODS[m.name] = m


for _b in ("triton", "cython", "torch"):
    _what = {"triton": "Triton kernels (CUDA)", "cython": "OpenMP/Cython kernels (CPU)",
             "torch": "the chunked pure-PyTorch reference backend"}[_b]
    _register(Method(f"celoss-{_b}", ALL_OPS, f"celoss, {_what}", _celoss_check(_b), _celoss_build(_b)))
    if _b != "torch":
        _register(Method(f"celoss-{_b}-inplace", ("ce",),
                         f"celoss, {_what}, inplace_backward=True (gradient written into the logits; "
                         f"the logits are a clone of the input made before the clock starts, as a "
                         f"model's last op makes them)",
                         _celoss_check(_b), _celoss_build(_b, inplace=True)))
_register(Method("celoss-cython-nocache", ("ce",), "celoss, OpenMP/Cython kernels (CPU), the gradient in a "
                 "fresh buffer every call (CPU buffer cache off: CELOSS_CPU_CACHE_MB=0)",
                 _celoss_check("cython"), _celoss_build("cython", cache=False)))
_register(Method("eager", ALL_OPS, "PyTorch eager (F.cross_entropy / the F.* composition)", _ok, _eager_build))
_register(Method("compile", ALL_OPS, "torch.compile of the eager composition (dynamic=False; compile time "
                 "is the '1st call' column)", _ok, _compile_build, compiles=True))
_register(Method("torch-lce", ("linear",), "F.linear_cross_entropy, options=None (reference path)",
                 _torch_lce_check, _torch_lce_build(False)))
_register(Method("torch-lce-chunked", ("linear",),
                 "F.linear_cross_entropy with LinearCrossEntropyOptions() (chunked, auto policy)",
                 _torch_lce_chunked_check, _torch_lce_build(True)))
_register(Method("liger", ("ce", "linear"),
                 "Liger-Kernel: LigerCrossEntropyLoss (gradient in place) / LigerFusedLinearCrossEntropyLoss",
                 lambda op, device, dtype: _needs_cuda(device) or _import_reason("liger_kernel.transformers"),
                 _liger_build, destroys=("fwd", "train")))
_register(Method("cce", ("linear",), "Cut Cross-Entropy, impl='cce' (default: gradient filtering)",
                 lambda op, device, dtype: _needs_cuda(device) or _import_reason("cut_cross_entropy"),
                 _cce_build(exact=False)))
_register(Method("cce-exact", ("linear",), "Cut Cross-Entropy without gradient filtering: impl='cce_exact' where the installed version "
                 "has it, else impl='cce' with filter_eps=None",
                 lambda op, device, dtype: _needs_cuda(device) or _import_reason("cut_cross_entropy"),
                 _cce_build(exact=True)))
_register(Method("matmuls", LINEAR_OPS, "the bare products X W^T (fwd; distillation: the teacher's X_t W_t^T "
                 "too), G W and G^T X (bwd): the floor a loss from hidden states (linear CE, log-probs, "
                 "linear distillation) is compared with", _ok,
                 lambda op, device, dtype, shape: MatmulImpl(op, shape, dtype, device)))

# Order of the tables: ours first, then the references. Order of execution: ours, then what the
# ratios need (matmuls, eager), the peers, and the slow-to-start ones last (so a run budget cuts them).
METHOD_ORDER = list(METHODS)
RUN_ORDER = ["celoss-triton", "celoss-triton-inplace", "celoss-cython", "celoss-cython-inplace",
             "celoss-cython-nocache", "matmuls",
             "eager", "liger", "cce", "cce-exact", "torch-lce", "torch-lce-chunked", "celoss-torch", "compile"]
assert sorted(RUN_ORDER) == sorted(METHODS)


def native_backend(device: str) -> str:
    return "triton" if device == "cuda" else "cython"


def select_methods(op: str, patterns: list[str], device: str) -> list[str]:
    """Method names for `op` matching glob `patterns` ({native} = the device's celoss backend)."""
    import fnmatch
    native = native_backend(device)
    pats = [p.strip().replace("{native}", native) for p in patterns if p.strip()]
    out = []
    for name in METHOD_ORDER:
        if op in METHODS[name].ops and any(fnmatch.fnmatchcase(name, p) for p in pats):
            out.append(name)
    return out
