"""Triton GPU kernels (installed as ``celoss.kernels``); use only relative imports in here."""
import os as _os


def _interpreter_numpy24_fix() -> None:
    """Triton <= 3.6's interpreter turns a runtime int kernel argument used as a ``range`` bound into
    a Python int with ``int(ndarray of shape (1,))``, which NumPy >= 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars"; triton-lang/triton#9171, fixed upstream by #9172).
    Under TRITON_INTERPRET=1 only, re-register ``tl.tensor.__index__`` with an explicit ``.item()``.
    No effect on compiled (GPU) kernels."""
    if _os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - triton missing or reorganised
        return
    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_celoss_index_fix", False):
        return

    def _index(self):
        data = self.handle.data
        return int(data.item() if getattr(data, "size", 0) == 1 else data)

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._celoss_index_fix = True
    _interp._patch_lang_tensor = patched


_interpreter_numpy24_fix()
