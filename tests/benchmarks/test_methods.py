"""The benchmark methods compute what they claim (tiny CPU shapes, no timing): the in-place method
times a non-leaf as a model's logits are, and the log-probs rows compare celoss's
linear_token_logprobs with the eager composition they are measured against."""
import pytest
import torch

from benchmarks.methods import METHODS, OPS, make_inputs


def _build(method, op, shape, dtype="fp32"):
    reason = METHODS[method].unavailable(OPS[op], "cpu", dtype)
    if reason:
        pytest.skip(f"{method}: {reason}")
    return METHODS[method].build(OPS[op], "cpu", dtype, shape)


def _step(method, op, shape, seed=0):
    """One training step as the worker runs it: the loss and the gradients of the inputs."""
    inp = make_inputs(OPS[op], shape, "fp32", "cpu", seed=seed)
    impl = _build(method, op, shape)
    loss = impl.train(impl.prepare(inp), lambda: None)
    return inp, loss.detach(), {k: inp[k].grad for k in OPS[op].grad_keys}


def test_issue15_inplace_method_runs_on_non_leaf_logits():
    """inplace_backward=True refuses to overwrite a leaf; the method hands it a clone made untimed
    (prepare), and the leaf input gets the gradient through it, unchanged otherwise."""
    shape = {"N": 16, "V": 50}
    inp = make_inputs(OPS["ce"], shape, "fp32", "cpu", seed=3)
    before = inp["x"].detach().clone()
    impl = _build("celoss-cython-inplace", "ce", shape)
    args = impl.prepare(inp)
    assert not args["x"].is_leaf and args["x"].data_ptr() != inp["x"].data_ptr()
    loss = impl.train(args, lambda: None)
    x = before.double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(x, inp["y"])
    expected.backward()
    assert torch.equal(inp["x"].detach(), before)  # the input sets are reused: never overwritten
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inp["x"].grad.double(), x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["celoss-cython", "celoss-torch"])
def test_issue15_logprobs_rows_match_the_eager_composition(method):
    shape = {"N": 24, "D": 16, "V": 70}
    _, want_loss, want = _step("eager", "logprobs", shape)
    _, loss, got = _step(method, "logprobs", shape)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for k in ("x", "w"):
        assert want[k] is not None and want[k].abs().max() > 0
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_issue15_logprobs_is_a_flops_op_compared_with_the_bare_products():
    op = OPS["logprobs"]
    assert op.floor({"N": 8, "D": 3, "V": 10}, "bf16", "train") == 6 * 8 * 3 * 10
    assert "logprobs" in METHODS["matmuls"].ops and op.param_keys == ("w",)


@pytest.mark.parametrize("method", ["celoss-cython", "celoss-torch", "compile"])
def test_issue14_linear_distill_rows_match_the_eager_composition(method):
    """linear_distillation_loss rows compute the eager distillation_loss(F.linear(x, W), F.linear(x_t,
    W_t)) they are compared with: the loss and the student's gradients; the teacher gets none."""
    shape = {"N": 24, "D": 16, "V": 70}
    _, want_loss, want = _step("eager", "linear_distill", shape)
    inp, loss, got = _step(method, "linear_distill", shape)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for k in ("x", "w"):
        assert want[k] is not None and want[k].abs().max() > 0
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert inp["xt"].grad is None and inp["wt"].grad is None and not inp["wt"].requires_grad


def test_issue14_linear_distill_is_compared_with_both_forward_products():
    """The floor and the bare products of linear distillation count the teacher's forward product:
    4NDV forward, 8NDV forward+backward; the matmuls row computes X W^T and X_t W_t^T."""
    op = OPS["linear_distill"]
    shape = {"N": 8, "D": 3, "V": 10}
    assert [op.floor(shape, "fp32", p) for p in ("fwd", "bwd", "train")] == [4 * 240, 4 * 240, 8 * 240]
    assert op.grad_keys == ("x", "w") and op.param_keys == ("w",)
    inp = make_inputs(op, shape, "fp32", "cpu", seed=1)
    impl = _build("matmuls", "linear_distill", shape)
    student, teacher = impl.forward(inp)
    torch.testing.assert_close(teacher, inp["xt"] @ inp["wt"].T)
    torch.testing.assert_close(student, inp["x"].detach() @ inp["w"].detach().T)
    assert len(_build("matmuls", "linear", shape).forward(make_inputs(OPS["linear"], shape, "fp32", "cpu", 1))) == 1


def test_issue14_ops_from_hidden_states_have_every_preset():
    """linear_distill and logprobs are sub-commands (and part of "all") with every preset, each with
    eager, torch.compile and the bare products to compare with."""
    from benchmarks import suites
    from benchmarks.methods import SUBCOMMAND_OPS
    for op in ("logprobs", "linear_distill"):
        assert SUBCOMMAND_OPS[op] == (op,) and op in SUBCOMMAND_OPS["all"]
        for name in ("tiny", "quick", "full", "gpu"):
            for device in ("cpu", "cuda"):
                pre = suites.preset(name, op, device)
                assert pre["shapes"] and all(set(s) == {"N", "D", "V"} for s in pre["shapes"]), (op, name)
                if name != "tiny":
                    assert {"eager", "compile", "matmuls"} <= set(pre["methods"]), (op, name)
