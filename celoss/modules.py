"""nn.Module wrappers mirroring torch.nn's loss modules (same constructor arguments plus extras)."""
from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor, nn

from .binary import binary_cross_entropy_with_logits
from .cross_entropy import cross_entropy
from .distillation import distillation_loss
from .focal import focal_loss, sigmoid_focal_loss
from .linear_cross_entropy import linear_cross_entropy
from .linear_distillation import linear_distillation_loss


def _keyword_extras(fn, extras: dict, taken=()) -> dict:
    """`extras` after checking that each is a keyword option of `fn` the module doesn't already set:
    a typo fails at construction, not at the first forward."""
    known = {name for name, p in inspect.signature(fn).parameters.items()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - set(taken)
    unknown = sorted(set(extras) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown} for {fn.__name__}; "
                        f"expected some of {sorted(known)}")
    return extras


class CrossEntropyLoss(nn.Module):
    """Mirrors ``torch.nn.CrossEntropyLoss`` on :func:`celoss.cross_entropy`: ``forward(input, target)``.

    Args:
        weight (Tensor, optional): ``(C)`` class weights, registered as a buffer (moves with
            ``.to()``). Default: None
        size_average (bool, optional): deprecated, as in ``torch.nn`` (see ``reduction``).
            Default: None
        ignore_index (int, optional): target value that is skipped. Default: -100
        reduce (bool, optional): deprecated, as in ``torch.nn`` (see ``reduction``). Default: None
        reduction (str, optional): ``"mean"`` (weighted), ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing (float, optional): in [0, 1]. Default: 0.0
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None
        **extras: further keyword options of :func:`celoss.cross_entropy` (``logit_scale``,
            ``softcap``, ``z_loss``, ``return_lse``, ``return_z_loss``, ``inplace_backward``); an
            unknown name raises TypeError here, not at the first forward.

    Shape:
        - Input: ``(C)``, ``(N, C)`` or ``(N, C, d_1, ..., d_K)``.
        - Target: ``()``, ``(N)`` or ``(N, d_1, ..., d_K)`` class indices, or probabilities of the
          input's shape.
        - Output: ``()``; with ``reduction="none"``, the input's shape without dim 1.

    Returns:
        What :func:`celoss.cross_entropy` returns: the loss, or a :class:`CrossEntropyOutput` when
        ``return_lse`` / ``return_z_loss`` is among the extras.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> loss_fn = celoss.CrossEntropyLoss(ignore_index=0, label_smoothing=0.1, z_loss=1e-4)
        >>> logits = torch.randn(4, 10, 7, requires_grad=True)   # (N, C, d1)
        >>> target = torch.randint(0, 10, (4, 7))
        >>> loss = loss_fn(logits, target)
        >>> loss.backward()
        >>> loss.shape, logits.grad.shape
        (torch.Size([]), torch.Size([4, 10, 7]))
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: Optional[str] = None, **extras):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.backend = backend
        self.extras = _keyword_extras(cross_entropy, extras, ("input", "target", "weight", "ignore_index",
                                                              "reduction", "label_smoothing", "backend"))

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, backend=self.backend, **self.extras)


class LinearCrossEntropyLoss(nn.Module):
    """Loss module of :func:`celoss.linear_cross_entropy`: ``forward(input, linear_weight, target,
    linear_bias=None)``; constructor arguments are that function's keyword options.

    Args:
        weight (Tensor, optional): ``(V)`` class weights, registered as a buffer. Default: None
        ignore_index (int, optional): target value that is skipped. Default: -100
        reduction (str, optional): ``"mean"`` (weighted), ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing (float, optional): in [0, 1]. Default: 0.0
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None
        **extras: further keyword options of :func:`celoss.linear_cross_entropy` (``shift``,
            ``z_loss``, ``softcap``, ``chunk_bytes``, ``engine``, ...); an unknown name raises
            TypeError here, not at the first forward.

    Shape:
        - Input: ``(..., D)``.
        - Linear_weight: ``(V, D)``; linear_bias: ``(V)``.
        - Target: ``input.shape[:-1]``.
        - Output: ``()``; with ``reduction="none"``, ``input.shape[:-1]`` (``(..., T - 1)`` with
          ``shift``).

    Returns:
        What :func:`celoss.linear_cross_entropy` returns.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> lm_head = torch.nn.Linear(32, 100, bias=False)
        >>> loss_fn = celoss.LinearCrossEntropyLoss(shift=True)
        >>> hidden = torch.randn(2, 8, 32)        # (B, T, D)
        >>> labels = torch.randint(0, 100, (2, 8))
        >>> loss = loss_fn(hidden, lm_head.weight, labels)
        >>> loss.backward()
        >>> lm_head.weight.grad.shape
        torch.Size([100, 32])
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, backend: Optional[str] = None, **extras):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.backend = backend
        self.extras = _keyword_extras(linear_cross_entropy, extras,
                                      ("input", "linear_weight", "target", "linear_bias", "weight", "reduction",
                                       "ignore_index", "label_smoothing", "backend"))

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, backend=self.backend, **self.extras)


# ----------------------------------------------------------------------------------------------
# Loss family: focal losses, binary cross-entropy with logits, distillation
# ----------------------------------------------------------------------------------------------

class FocalLoss(nn.Module):
    """Softmax focal loss module: ``forward(input, target)`` -> :func:`celoss.focal_loss` (class dim 1).

    Args:
        gamma (float, optional): focusing parameter, >= 0. Default: 2.0
        alpha (float, Tensor or None, optional): None, a float or a ``(C)`` per-class tensor
            (registered as a buffer when a tensor). Default: None
        ignore_index (int, optional): target value that is skipped. Default: -100
        reduction (str, optional): ``"mean"`` (over counted positions, not weighted by alpha),
            ``"sum"`` or ``"none"``. Default: ``"mean"``
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None

    Shape:
        - Input: ``(C)``, ``(N, C)`` or ``(N, C, d_1, ..., d_K)``.
        - Target: ``()``, ``(N)`` or ``(N, d_1, ..., d_K)`` class indices.
        - Output: ``()``; with ``reduction="none"``, the target's shape.

    Returns:
        Tensor: the loss, in the input's dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> loss_fn = celoss.FocalLoss(gamma=2.0, alpha=torch.tensor([0.25, 0.5, 1.0]))
        >>> logits = torch.randn(6, 3, requires_grad=True)
        >>> loss = loss_fn(logits, torch.tensor([0, 1, 2, 2, 1, 0]))
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, gamma: float = 2.0, alpha=None, ignore_index: int = -100, reduction: str = "mean", *,
                 backend: Optional[str] = None):
        super().__init__()
        self.gamma, self.ignore_index, self.reduction, self.backend = gamma, ignore_index, reduction, backend
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha

    def forward(self, input: Tensor, target: Tensor):
        return focal_loss(input, target, self.gamma, self.alpha, self.ignore_index, self.reduction,
                          backend=self.backend)


class SigmoidFocalLoss(nn.Module):
    """Module of :func:`celoss.sigmoid_focal_loss` (torchvision's definition): ``forward(inputs, targets)``.

    Args:
        alpha (float, optional): weight of the positive class; ``alpha < 0`` disables the weighting.
            Default: 0.25
        gamma (float, optional): focusing parameter, >= 0. Default: 2.0
        reduction (str, optional): ``"none"`` (as torchvision), ``"mean"`` or ``"sum"``.
            Default: ``"none"``
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None

    Shape:
        - Inputs: ``(*)``, any number of dimensions.
        - Targets: ``(*)``, the inputs' shape, probabilities in [0, 1].
        - Output: ``(*)`` with ``reduction="none"``, else ``()``.

    Returns:
        Tensor: the loss, in ``torch.promote_types(inputs.dtype, targets.dtype)``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> loss_fn = celoss.SigmoidFocalLoss(reduction="sum")
        >>> logits = torch.randn(8, 4, requires_grad=True)
        >>> loss = loss_fn(logits, (torch.rand(8, 4) > 0.7).float())
        >>> loss.backward()
        >>> loss.shape, logits.grad.shape
        (torch.Size([]), torch.Size([8, 4]))
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none", *,
                 backend: Optional[str] = None):
        super().__init__()
        self.alpha, self.gamma, self.reduction, self.backend = alpha, gamma, reduction, backend

    def forward(self, inputs: Tensor, targets: Tensor):
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction, backend=self.backend)


class BCEWithLogitsLoss(nn.Module):
    """Mirrors ``torch.nn.BCEWithLogitsLoss`` (weight and pos_weight buffers) on
    :func:`celoss.binary_cross_entropy_with_logits`: ``forward(input, target)``.

    Args:
        weight (Tensor, optional): rescaling weight broadcast to the input's shape, registered as a
            buffer. Default: None
        size_average (bool, optional): deprecated, as in ``torch.nn`` (see ``reduction``).
            Default: None
        reduce (bool, optional): deprecated, as in ``torch.nn`` (see ``reduction``). Default: None
        reduction (str, optional): ``"mean"``, ``"sum"`` or ``"none"``. Default: ``"mean"``
        pos_weight (Tensor, optional): weight of the positive term broadcast to the input's shape
            (``(C)``: one per class of the last dimension), registered as a buffer. Default: None
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None

    Shape:
        - Input: ``(*)``, any number of dimensions.
        - Target: ``(*)``, the input's shape.
        - Output: ``()``; with ``reduction="none"``, ``(*)``.

    Returns:
        Tensor: the loss, in ``torch.promote_types(input.dtype, target.dtype)``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> loss_fn = celoss.BCEWithLogitsLoss(pos_weight=torch.full((5,), 3.0))
        >>> logits = torch.randn(4, 5, requires_grad=True)
        >>> target = torch.randint(0, 2, (4, 5)).float()
        >>> ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((5,), 3.0))
        >>> torch.allclose(loss_fn(logits, target), ref(logits, target))
        True
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None, *, backend: Optional[str] = None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction, self.backend = reduction, backend

    def forward(self, input: Tensor, target: Tensor):
        return binary_cross_entropy_with_logits(input, target, self.weight, self.reduction, self.pos_weight,
                                                backend=self.backend)


class DistillationLoss(nn.Module):
    """Module of :func:`celoss.distillation_loss`: ``forward(student_logits, teacher_logits, target=None)``;
    constructor arguments are that function's keyword options.

    Args:
        temperature (float, optional): softmax temperature ``T`` (> 0). Default: 1.0
        kind (str, optional): ``"kl"``, ``"reverse_kl"``, ``"ce"`` or ``"jsd"``. Default: ``"kl"``
        beta (float, optional): the JSD mixture weight, in [0, 1]. Default: 0.5
        alpha (float, optional): weight of the soft term; ``1 - alpha`` weighs the hard-label
            cross-entropy (needs a target unless 1). Default: 1.0
        ignore_index (int, optional): target value whose rows are excluded. Default: -100
        reduction (str, optional): ``"batchmean"``, ``"mean"``, ``"sum"`` or ``"none"``.
            Default: ``"batchmean"``
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None

    Shape:
        - Student_logits, teacher_logits: ``(..., V)``.
        - Target: ``(...)`` int64, optional.
        - Output: ``()``; with ``reduction="none"``, ``(...)``.

    Returns:
        Tensor: the loss, in the student's dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> loss_fn = celoss.DistillationLoss(temperature=2.0, kind="jsd", alpha=0.9)
        >>> student = torch.randn(2, 5, 50, requires_grad=True)   # (B, T, V)
        >>> teacher = torch.randn(2, 5, 50)
        >>> loss = loss_fn(student, teacher, torch.randint(0, 50, (2, 5)))
        >>> loss.backward()
        >>> loss.shape, student.grad.shape
        (torch.Size([]), torch.Size([2, 5, 50]))
    """

    def __init__(self, temperature: float = 1.0, kind: str = "kl", beta: float = 0.5, alpha: float = 1.0,
                 ignore_index: int = -100, reduction: str = "batchmean", *, backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.kind, self.beta, self.alpha = temperature, kind, beta, alpha
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None):
        return distillation_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                                 kind=self.kind, beta=self.beta, alpha=self.alpha,
                                 ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)




class LinearDistillationLoss(nn.Module):
    """Module of :func:`celoss.linear_distillation_loss`: ``forward(student_input, student_weight,
    teacher_input, teacher_weight, target=None)`` (biases as keyword arguments of forward);
    constructor arguments are that function's keyword options.

    Args:
        **options: keyword options of :func:`celoss.linear_distillation_loss` (``temperature``,
            ``kind``, ``beta``, ``alpha``, ``ignore_index``, ``reduction``, ``shift``,
            ``chunk_bytes``, ``backend``); an unknown name raises TypeError here, not at the first
            forward.

    Shape:
        - Student_input: ``(..., D_s)``; teacher_input: ``(..., D_t)``.
        - Student_weight: ``(V, D_s)``; teacher_weight: ``(V, D_t)``; biases: ``(V)``.
        - Target: ``(...)`` int64, optional.
        - Output: ``()``; with ``reduction="none"``, ``(...)`` (``(..., T - 1)`` with ``shift``).

    Returns:
        Tensor: the loss, in the student's dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> student = torch.nn.Linear(16, 100)
        >>> teacher = torch.nn.Linear(32, 100).requires_grad_(False)   # frozen
        >>> loss_fn = celoss.LinearDistillationLoss(temperature=2.0, shift=True)
        >>> x_s, x_t = torch.randn(2, 8, 16), torch.randn(2, 8, 32)   # (B, T, D)
        >>> loss = loss_fn(x_s, student.weight, x_t, teacher.weight, student_bias=student.bias,
        ...                teacher_bias=teacher.bias)
        >>> loss.backward()
        >>> student.weight.grad.shape, teacher.weight.grad is None
        (torch.Size([100, 16]), True)
    """

    def __init__(self, **options):
        super().__init__()
        self.options = _keyword_extras(linear_distillation_loss, options,
                                       ("student_input", "student_weight", "teacher_input", "teacher_weight",
                                        "target", "student_bias", "teacher_bias"))

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                target: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None):
        return linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                        student_bias=student_bias, teacher_bias=teacher_bias, **self.options)
