"""Tests for models/student_teacher.py: construction, checkpoint key names, forward modes, EMA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from cribo_utils.train.flag_configs import network_config
from models.student_teacher import CrIBoNetwork, NetworkConfig, build_student_teacher, update_teacher


def _args(**overrides) -> SimpleNamespace:
    values = {
        "arch": "vit_tiny",
        "patch_size": 16,
        "drop_path_rate": 0.1,
        "out_dim": 64,
        "out_dim_c": 32,
        "use_bn_in_head": False,
        "norm_last_layer": True,
        "image_size": 32,
        "depth": 2,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


class _DDPLike(nn.Module):
    """Stands in for DistributedDataParallel: the wrapped network sits under ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _released_key_shapes(depth: int = 12, width: int = 384, out_dim: int = 64, out_dim_c: int = 32) -> dict:
    """Key names of docs/method.md, Sec. 10 (ViT-S/16 at 224 px), with the shapes they have."""
    shapes = {
        "backbone.cls_token": (1, 1, width),
        "backbone.pos_embed": (1, 197, width),
        "backbone.patch_embed.proj.weight": (width, 3, 16, 16),
        "backbone.patch_embed.proj.bias": (width,),
    }
    layers = {
        "norm1": (width, width),
        "attn.qkv": (3 * width, width),
        "attn.proj": (width, width),
        "norm2": (width, width),
        "mlp.fc1": (4 * width, width),
        "mlp.fc2": (width, 4 * width),
    }
    for i in range(depth):
        for layer, (rows, cols) in layers.items():
            is_norm = layer.startswith("norm")
            shapes[f"backbone.blocks.{i}.{layer}.weight"] = (rows,) if is_norm else (rows, cols)
            shapes[f"backbone.blocks.{i}.{layer}.bias"] = (rows,)
    shapes["backbone.norm.weight"] = (width,)
    shapes["backbone.norm.bias"] = (width,)
    for index, (rows, cols) in zip((0, 2, 4), ((2048, width), (2048, 2048), (256, 2048)), strict=True):
        shapes[f"head.mlp.{index}.weight"] = (rows, cols)
        shapes[f"head.mlp.{index}.bias"] = (rows,)
    for layer, rows in (("last_layer", out_dim), ("last_layer_c", out_dim_c)):
        shapes[f"head.{layer}.weight_g"] = (rows, 1)
        shapes[f"head.{layer}.weight_v"] = (rows, 256)
    return shapes


def _perturb(network: nn.Module) -> None:
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn_like(param))


# ---------------------------------------------------------------------------------------------------
# construction


def test_student_and_teacher_start_identical() -> None:
    student, teacher = build_student_teacher(network_config(_args()))
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    assert student_state.keys() == teacher_state.keys()
    for name in student_state:
        assert torch.equal(student_state[name], teacher_state[name]), name
        assert student_state[name].data_ptr() != teacher_state[name].data_ptr(), name
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    assert frozen == {"head.last_layer.weight_g", "head.last_layer_c.weight_g"}  # norm_last_layer=True


def test_drop_path_only_in_student_and_flags_are_read() -> None:
    student, teacher = build_student_teacher(
        network_config(_args(depth=3, drop_path_rate=0.2, norm_last_layer=False))
    )
    assert [b.drop_path.drop_prob for b in student.backbone.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert [b.drop_path.drop_prob for b in teacher.backbone.blocks] == [0.0, 0.0, 0.0]
    assert student.backbone.pos_embed.shape == (1, 1 + 2 * 2, 192)  # image_size 32, patch 16
    assert student.head.last_layer.weight_g.shape == (64, 1)
    assert student.head.last_layer_c.weight_g.shape == (32, 1)
    assert student.head.last_layer.weight_g.requires_grad
    without_optional = _args()
    del without_optional.image_size, without_optional.depth
    student, _ = build_student_teacher(network_config(without_optional))
    assert student.backbone.pos_embed.shape == (1, 197, 192) and student.backbone.depth == 12
    assert not student.backbone.grad_checkpointing


def test_grad_checkpointing_only_in_the_student() -> None:
    student, teacher = build_student_teacher(network_config(_args(depth=2, grad_checkpointing=True)))
    assert student.backbone.grad_checkpointing and not teacher.backbone.grad_checkpointing


def test_key_names_equal_released_layout_and_load_strictly() -> None:
    with torch.device("meta"):
        student, teacher = build_student_teacher(
            network_config(_args(arch="vit_small", image_size=224, depth=None))
        )
    expected = _released_key_shapes()
    assert len(expected) == 160
    assert list(student.state_dict()) == list(expected)
    assert {k: tuple(v.shape) for k, v in teacher.state_dict().items()} == expected

    small_student, _ = build_student_teacher(network_config(_args(arch="vit_small", image_size=224, depth=2)))
    released = {name: torch.randn(shape) for name, shape in _released_key_shapes(depth=2).items()}
    small_student.load_state_dict(released, strict=True)
    assert torch.equal(small_student.head.last_layer_c.weight_v, released["head.last_layer_c.weight_v"])
    wrapped = _DDPLike(small_student)
    wrapped.load_state_dict({f"module.{k}": v for k, v in released.items()}, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        small_student.load_state_dict({k: v for k, v in released.items() if k != "backbone.norm.bias"})


def _random_assignment(batch_size: int, num_patches: int, n_clusters: int) -> tuple[Tensor, Tensor]:
    """Hard labels per view -> column-normalised (B, N, K) assignment and its labels."""
    labels = torch.randint(0, n_clusters, (batch_size, num_patches))
    one_hot = torch.nn.functional.one_hot(labels, n_clusters).float()
    return one_hot / one_hot.sum(dim=1, keepdim=True).clamp_min(1.0), labels


def _slow_objects(tokens: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Mean of the member tokens of every valid (image, cluster), image by image, cluster ascending."""
    rows = []
    for b in range(tokens.shape[0]):
        for k in range(valid.shape[1]):
            if valid[b, k]:
                rows.append(tokens[b][labels[b] == k].mean(dim=0))
    return torch.stack(rows)


def test_student_forward_pools_with_the_teacher_assignment() -> None:
    student, _ = build_student_teacher(network_config(_args(norm_last_layer=False)))
    student.eval()
    _perturb(student.head)  # separate last layers and magnitudes, so a mix-up shows
    images = torch.randn(6, 3, 32, 64)  # B = 3 images, two views, N = 2 * 4 patches
    assign1, labels1 = _random_assignment(3, 8, 4)
    assign2, labels2 = _random_assignment(3, 8, 4)
    valid = (assign1.sum(1) > 0) & (assign2.sum(1) > 0)
    valid[0, :] = False  # an image without any object
    with torch.no_grad():
        cls_logits, object_logits = student(images, assign1, assign2, valid)
        cls, patches = student.backbone.forward_features(images)
        objects1 = _slow_objects(patches[:3], labels1, valid)
        objects2 = _slow_objects(patches[3:], labels2, valid)
        expected_objects = torch.stack([student.head.forward_c(objects1), student.head.forward_c(objects2)])
    num_objects = int(valid.sum())
    assert cls_logits.shape == (6, 64) and object_logits.shape == (2, num_objects, 32)
    torch.testing.assert_close(cls_logits, student.head(cls), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(object_logits, expected_objects, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected 2 \\* 3 images"):
        student(images[:5], assign1, assign2, valid)


def test_student_forward_backpropagates_into_every_parameter() -> None:
    student, _ = build_student_teacher(network_config(_args(norm_last_layer=False, drop_path_rate=0.0)))
    assign, _ = _random_assignment(2, 4, 3)
    valid = torch.ones(2, 3, dtype=torch.bool)
    cls_logits, object_logits = student(torch.randn(4, 3, 32, 32), assign, assign, valid)
    (cls_logits.sum() + object_logits.sum()).backward()
    missing = [name for name, p in student.named_parameters() if p.grad is None]
    assert missing == []  # DDP needs every parameter used in the single forward


def test_teacher_head_outputs() -> None:
    _, teacher = build_student_teacher(network_config(_args(norm_last_layer=False)))
    _perturb(teacher.head)
    cls = torch.randn(4, 192)
    objects = (torch.randn(5, 192), torch.randn(5, 192))
    neighbours = (torch.randn(5, 192), torch.randn(5, 192))
    with torch.no_grad():
        cls_logits, object_logits, neighbour_logits = teacher.head_outputs(cls, objects, neighbours)
        _, object_logits_alone, none = teacher.head_outputs(cls, objects)
        head = teacher.head
        torch.testing.assert_close(cls_logits, head(cls), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(object_logits, torch.stack([head.forward_c(o) for o in objects]))
        torch.testing.assert_close(neighbour_logits, torch.stack([head.forward_c(n) for n in neighbours]))
        torch.testing.assert_close(object_logits_alone, object_logits)
    assert none is None and neighbour_logits.shape == (2, 5, 32)
    empty = torch.zeros(0, 192)
    _, no_objects, _ = teacher.head_outputs(cls, (empty, empty))
    assert no_objects.shape == (2, 0, 32)
    with pytest.raises(ValueError, match="same M"):
        teacher.head_outputs(cls, objects, (torch.randn(4, 192), torch.randn(4, 192)))


# ---------------------------------------------------------------------------------------------------
# EMA


@pytest.mark.parametrize("momentum", [0.7, 0.996])
def test_ema_formula_on_every_tensor(momentum: float) -> None:
    student, teacher = build_student_teacher(network_config(_args()))
    _perturb(student)  # includes the frozen weight_g, which the EMA must follow too
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    update_teacher(student, teacher, momentum)
    student_params = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        expected = momentum * before[name] + (1 - momentum) * student_params[name]
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-6, msg=name)
        assert not torch.equal(param, before[name]), name
        assert not param.requires_grad


def test_ema_by_hand_and_limits() -> None:
    student = nn.Linear(2, 1, bias=False)
    teacher = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[4.0, 0.0]]))
        teacher.weight.copy_(torch.tensor([[0.0, 2.0]]))
    update_teacher(student, teacher, 0.75)
    torch.testing.assert_close(teacher.weight, torch.tensor([[1.0, 1.5]]))  # 0.75 t + 0.25 s

    student_net, teacher_net = build_student_teacher(network_config(_args()))
    _perturb(student_net)
    before = {name: p.clone() for name, p in teacher_net.named_parameters()}
    update_teacher(student_net, teacher_net, 1.0)
    assert all(torch.equal(p, before[name]) for name, p in teacher_net.named_parameters())
    update_teacher(student_net, teacher_net, 0.0)
    student_params = dict(student_net.named_parameters())
    assert all(torch.equal(p, student_params[name]) for name, p in teacher_net.named_parameters())
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(student_net, teacher_net, 1.5)


def test_ema_pairs_by_name_through_ddp_prefix() -> None:
    student, teacher = build_student_teacher(network_config(_args()))
    _perturb(student)
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    update_teacher(_DDPLike(student), teacher, 0.5)
    student_params = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        torch.testing.assert_close(param, 0.5 * before[name] + 0.5 * student_params[name], msg=name)
    # A wrapped teacher (DDP around a batch-norm head) pairs the same way.
    update_teacher(_DDPLike(student), _DDPLike(teacher), 0.0)
    assert all(torch.equal(p, student_params[name]) for name, p in teacher.named_parameters())


class _Forward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 3)
        self.second = nn.Linear(3, 2)


class _Reversed(nn.Module):
    """Same names as _Forward, registered in the opposite order (a positional zip would mis-pair them)."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(3, 2)
        self.first = nn.Linear(2, 3)


def test_ema_pairs_by_name_not_by_position() -> None:
    student, teacher = _DDPLike(_Forward()), _Reversed()
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    update_teacher(student, teacher, 0.5)
    student_params = {name.removeprefix("module."): p for name, p in student.named_parameters()}
    for name, param in teacher.named_parameters():
        torch.testing.assert_close(param, 0.5 * before[name] + 0.5 * student_params[name], msg=name)


def test_ema_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="only in student: \\['extra.weight'"):
        student = _Forward()
        student.extra = nn.Linear(1, 1, bias=False)
        update_teacher(student, _Reversed(), 0.9)
    with pytest.raises(ValueError, match="only in teacher: \\['first.bias'\\]"):
        teacher = _Forward()
        student = _Forward()
        del student.first.bias
        student.first.register_parameter("bias", None)
        update_teacher(student, teacher, 0.9)
    wide = _Forward()
    wide.first = nn.Linear(2, 4)
    with pytest.raises(ValueError, match="shapes differ.*first.weight"):
        update_teacher(wide, _Forward(), 0.9)


def test_ema_of_batch_norm_buffers() -> None:
    student, teacher = build_student_teacher(network_config(_args(use_bn_in_head=True)))
    student.train()
    with torch.no_grad():
        student.head(torch.randn(8, 192))  # updates the student's running statistics
    buffers = dict(student.named_buffers())
    before = {name: b.clone() for name, b in teacher.named_buffers()}
    assert buffers and buffers["head.mlp.1.num_batches_tracked"] == 1
    update_teacher(student, teacher, 0.9)
    for name, buffer in teacher.named_buffers():
        if buffer.is_floating_point():
            torch.testing.assert_close(buffer, 0.9 * before[name] + 0.1 * buffers[name], msg=name)
        else:
            assert torch.equal(buffer, buffers[name]), name


def test_network_keys_are_backbone_and_head() -> None:
    student, _ = build_student_teacher(network_config(_args()))
    assert isinstance(student, CrIBoNetwork)
    assert {name.split(".")[0] for name in student.state_dict()} == {"backbone", "head"}


def test_ema_dispatches_two_operators_whatever_the_number_of_tensors() -> None:
    """The EMA is two multi-tensor operators (foreach multiply and add), with no per-tensor operator."""
    from benchmarks.op_counter import OpCounter

    student, teacher = build_student_teacher(
        NetworkConfig(arch="vit_tiny", patch_size=16, out_dim=8, out_dim_c=8, image_size=32, depth=2)
    )
    counter = OpCounter()
    with counter:
        update_teacher(student, teacher, 0.9)
    assert counter.totals()["ops"] == {"outside_sections": 2}
