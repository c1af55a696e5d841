"""DiTModule computes one gradient norm a step for clipping and `train/grad_norm` (the pre-clip
norm, written on logged steps) and clips exactly as `clip_grad_norm_` does."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from sora_lightning.models.dit import DiTConfig
from sora_lightning.train.dit_module import DiTModule


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))


def _module_with_grads() -> tuple[DiTModule, Recorder]:
    config = dataclasses.asdict(DiTConfig(hidden_size=32, depth=1, num_heads=2, text_dim=8))
    module = DiTModule(config, {"stages": [{"name": "images", "steps": 1, "frames": [1, 1]}]})
    recorder = Recorder()
    module._trainer = SimpleNamespace(global_step=4, log_every_n_steps=2, loggers=[recorder])
    torch.manual_seed(0)
    for param in module.dit.parameters():
        param.grad = torch.randn_like(param) * 10
    return module, recorder


def test_clipping_matches_clip_grad_norm_and_logs_the_pre_clip_norm() -> None:
    module, recorder = _module_with_grads()
    norm = torch.nn.utils.get_total_norm([p.grad for p in module.dit.parameters()])
    reference = [
        p.grad * torch.clamp(1.0 / (norm + 1e-6), max=1.0) for p in module.dit.parameters()
    ]
    optimizer = torch.optim.SGD(module.dit.parameters(), lr=0.1)
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    clipped = [p.grad for p in module.dit.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(clipped, reference, strict=True))
    assert torch.nn.utils.get_total_norm(clipped) < 1.0 + 1e-4 < float(norm)
    assert recorder.calls == [({"train/grad_norm": float(norm)}, 4)]  # before clipping


def test_without_clipping_the_norm_is_only_computed_on_logged_steps(monkeypatch) -> None:
    module, recorder = _module_with_grads()
    before = [p.grad.clone() for p in module.dit.parameters()]
    calls: list[int] = []
    total_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(
        torch.nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or total_norm(*a, **k)
    )
    optimizer = torch.optim.SGD(module.dit.parameters(), lr=0.1)
    module._trainer.global_step = 5  # not a logged step
    module.configure_gradient_clipping(optimizer, None, None)
    assert calls == [] and recorder.calls == []
    module._trainer.global_step = 6
    module.configure_gradient_clipping(optimizer, None, None)
    assert len(calls) == 1 and [step for _, step in recorder.calls] == [6]
    after = [p.grad for p in module.dit.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # not clipped
