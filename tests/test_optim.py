import torch
from torch import nn

from cribo_utils.train.optim import cancel_gradients_last_layer, clip_gradients, get_params_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.last_layer = nn.Linear(3, 2, bias=False)
        self.last_layer_c = nn.Linear(3, 2, bias=False)
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


def test_param_groups_split_by_dimension_and_skip_frozen():
    model = Toy()
    decayed, plain = get_params_groups(model)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decayed["params"]) == ids(
        [model.body.weight, model.last_layer.weight, model.last_layer_c.weight]
    )
    assert ids(plain["params"]) == ids([model.body.bias, model.norm.weight, model.norm.bias])
    assert plain["weight_decay"] == 0.0


def test_last_layers_frozen_only_before_the_given_epoch():
    model = Toy()
    loss = model.last_layer(model.body(torch.randn(5, 4))).sum() + model.last_layer_c(torch.randn(5, 3)).sum()
    loss.backward()
    cancel_gradients_last_layer(epoch=1, model=model, freeze_last_layer=1)
    assert model.last_layer.weight.grad is not None
    cancel_gradients_last_layer(epoch=0, model=model, freeze_last_layer=1)
    assert model.last_layer.weight.grad is None and model.last_layer_c.weight.grad is None
    assert model.body.weight.grad is not None


def test_clipping_is_per_tensor():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    grads = [
        torch.full_like(p, 10.0) if i == 0 else torch.full_like(p, 1e-3)
        for i, p in enumerate(model.parameters())
    ]
    for param, grad in zip(model.parameters(), grads, strict=True):
        param.grad = grad.clone()
    norms = clip_gradients(model, 1.0)
    torch.testing.assert_close(norms, torch.stack([g.norm() for g in grads]))
    params = list(model.parameters())
    assert abs(params[0].grad.norm().item() - 1.0) < 1e-4  # clipped to the threshold
    torch.testing.assert_close(params[1].grad, grads[1])  # small gradients untouched
    torch.testing.assert_close(params[2].grad, grads[2])


def test_adamw_step_matches_the_decoupled_update_equation():
    """One fused AdamW step: p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), m_hat = g, v_hat = g^2."""
    from cribo_utils.train.optim import build_optimizer

    torch.manual_seed(0)
    weight, bias = torch.randn(3, 4), torch.randn(4)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias[:3])
    optimizer = build_optimizer(get_params_groups(model), "adamw")
    lr, wd, eps = 0.1, 0.5, 1e-8
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = wd
    model(torch.randn(2, 4)).square().sum().backward()
    grad_w, grad_b = model.weight.grad.clone(), model.bias.grad.clone()
    optimizer.step()
    # After one step the bias-corrected moments are m_hat = g and v_hat = g^2.
    expected_w = weight * (1 - lr * wd) - lr * grad_w / (grad_w.abs() + eps)
    expected_b = bias[:3] - lr * grad_b / (grad_b.abs() + eps)
    torch.testing.assert_close(model.weight.detach(), expected_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.bias.detach(), expected_b, atol=1e-6, rtol=1e-5)


def test_clipping_dispatches_the_same_few_operators_for_any_number_of_tensors():
    """The clipping factors of all tensors form one vector: a fixed handful of operators, the per-tensor
    formula g * min(1, clip / (||g|| + 1e-6)) bit for bit."""
    from benchmarks.op_counter import OpCounter

    counts = []
    for depth in (2, 8):
        model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(depth)))
        for param in model.parameters():
            param.grad = torch.randn_like(param) * 5
        expected = [p.grad * torch.clamp(0.5 / (p.grad.norm() + 1e-6), max=1.0) for p in model.parameters()]
        counter = OpCounter()
        with counter:
            clip_gradients(model, 0.5)
        counts.append(counter.totals()["kernels"])
        for param, grad in zip(model.parameters(), expected, strict=True):
            assert torch.equal(param.grad, grad)
    assert counts[0] == counts[1] and sum(counts[0].values()) <= 8
