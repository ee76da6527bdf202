"""Client procedures: pure functions of (task, the client's data, a model buffer).

The model buffer is scratch space owned by the backend and fully overwritten from ``task.state``;
all randomness comes from ``task.seed``. Algorithms add procedures with
``@CLIENT_PROCEDURES.register("name")``; a task picks one with ``task.kind``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedslim.data.types import TensorData
from fedslim.engine.flat import FlatStep, flat_parameters, flat_step
from fedslim.engine.task import ClientResult, ClientTask, LocalTrain, State
from fedslim.registry import CLIENT_PROCEDURES


def _fusable(params: list[nn.Parameter]) -> bool:
    """torch's fused (one-kernel) SGD/Adam steps take floating-point tensors on the CPU or CUDA."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def build_optimizer(params: list[nn.Parameter], train: LocalTrain) -> torch.optim.Optimizer:
    o = train.optimizer
    # The fused step does the same arithmetic as the per-tensor loop in one pass over each tensor; on
    # a one-core LeNet step it saved ~7 % (bench/step_cost.py). Numbers agree to the last bits of float32.
    fused = _fusable(params) or None
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay, fused=fused)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=train.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)
    raise ValueError(f"train.optimizer.name: unknown optimizer {o.name!r}")


def local_optimizer(model: nn.Module, train: LocalTrain) -> tuple[
        list[torch.Tensor], torch.optim.Optimizer | FlatStep, Callable[[], None]]:
    """What a client update steps ``model`` with: the tensors to clip, the optimizer, and the
    ``zero_grad`` to call before each backward. One flat tensor where the model allows it
    (:mod:`fedslim.engine.flat`), else torch.optim over the trainable parameters."""
    flat = flat_parameters(model)
    if flat is not None:
        return [flat.param], flat_step(flat.param, train), flat.zero_grad
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, train)
    return params, opt, functools.partial(opt.zero_grad, set_to_none=True)


def augment_draws(n: int, mode: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The random draws of one batch's augmentation, from ``gen`` on the CPU: a flip flag per sample,
    and for ``crop_flip`` a row and a column offset into the 4-pixel-padded image. Drawn on the CPU
    because a CUDA tensor cannot be drawn from a CPU generator, and so every device and backend gets
    the same augmentation."""
    if mode == "none":
        return ()
    draws: tuple[torch.Tensor, ...] = (torch.rand(n, generator=gen) < 0.5,)
    if mode == "crop_flip":
        draws += (torch.randint(0, 9, (n,), generator=gen), torch.randint(0, 9, (n,), generator=gen))
    return draws


def augment_with(x: torch.Tensor, mode: str, flip: torch.Tensor, dy: torch.Tensor | None = None,
                 dx: torch.Tensor | None = None) -> torch.Tensor:
    """Batched random horizontal flip (and 4-pixel-padded random crop) of ``x`` (N, C, H, W), with the
    draws of :func:`augment_draws` given."""
    n, _, h, w = x.shape
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if mode == "crop_flip":
        assert dy is not None and dx is not None
        pad = 4
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # n, h
        cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # n, w
        x = xp[torch.arange(n, device=x.device)[:, None, None, None],
               torch.arange(x.shape[1], device=x.device)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]
    return x


def masked_logits(logits: torch.Tensor, label_mask: torch.Tensor | None) -> torch.Tensor:
    """HeteroFL's masked loss: logits of classes the client does not hold are set to 0."""
    if label_mask is None:
        return logits
    return logits.masked_fill(~label_mask.to(logits.device), 0.0)


def state_delta(new: State, old: State) -> State:
    return {k: (new[k] - old[k]) for k in old}


def load_state(model: nn.Module, state: State) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"client model and payload disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    # A final batch of one sample breaks BatchNorm in training mode; fold it into the previous one.
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()  # pop first: `out[-2] = cat([out[-2], out.pop()])` would overwrite the wrong batch
        out[-1] = torch.cat([out[-1], last])
    return out


Schedule = list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]


def epoch_schedule(n: int, train: LocalTrain, gen: torch.Generator, image: bool) -> Schedule:
    """One local epoch on ``n`` samples: each batch's sample indices and its augmentation draws (none
    unless ``image``), drawn from ``gen`` on the CPU in the order a client update takes them."""
    mode = train.augment if image else "none"
    return [(idx, augment_draws(len(idx), mode, gen)) for idx in _batches(n, train.batch_size, gen)]


def schedule_to(schedule: Schedule, device: torch.device | str) -> Schedule:
    """``schedule`` on ``device``, in one copy: copying each step's indices to a GPU on its own would
    make the host wait for the previous step to finish every time."""
    if torch.device(device).type == "cpu" or not schedule:
        return schedule
    return _packed_to(schedule, device)


def _packed_to(schedule: Schedule, device: torch.device | str) -> Schedule:
    pieces = [t.long() for idx, draws in schedule for t in (idx, *draws)]
    moved = torch.cat(pieces).to(device).split([len(t) for t in pieces])
    out: Schedule = []
    k = 0
    for _, draws in schedule:
        got = moved[k:k + 1 + len(draws)]
        k += 1 + len(draws)
        out.append((got[0], tuple(g.to(d.dtype) for g, d in zip(got[1:], draws, strict=True))))
    return out


def train_model(model: nn.Module, task: ClientTask, data: TensorData, *,
                penalty: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None) -> tuple[int, float, int]:
    """Local SGD/Adam on ``model`` in place. Returns (steps, mean loss, samples processed).

    ``penalty`` (a scalar tensor, recomputed every step) is added to the cross-entropy before the
    backward pass; ``after_step`` runs after the weights' optimizer step (a procedure with tensors of
    its own to step, such as DAC's gate logits, steps them there)."""
    assert task.train is not None, "a train task needs task.train"
    tr = task.train
    gen = torch.Generator()
    gen.manual_seed(task.seed)
    torch.manual_seed(task.seed)  # dropout draws from the global generator; pin it to this task
    dev = next(model.parameters()).device
    model.train()
    params, opt, zero_grad = local_optimizer(model, tr)
    masks = {k: m.to(dev) for k, m in task.param_masks.items()} if task.param_masks else None
    named = dict(model.named_parameters())
    steps, seen, loss_sum = 0, 0, torch.zeros((), device=dev)
    n = len(data)
    if n == 0:
        return 0, 0.0, 0
    image = data.x.dim() == 4
    label_mask = task.label_mask.to(dev) if task.label_mask is not None else None
    done = False
    for _ in range(tr.epochs):
        for idx, draws in schedule_to(epoch_schedule(n, tr, gen, image), data.x.device):
            xb, yb = data.x[idx], data.y[idx]
            if draws:
                xb = augment_with(xb, tr.augment, *draws)
            out = masked_logits(_forward(model, xb, task, n), label_mask)
            loss = F.cross_entropy(out, yb)
            zero_grad()
            # The penalty trains but stays out of the reported loss, which is the cross-entropy in every round.
            (loss + penalty() if penalty is not None else loss).backward()
            if tr.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, tr.grad_clip)
            opt.step()
            if after_step is not None:
                after_step()
            if masks:
                with torch.no_grad():
                    for k, m in masks.items():
                        named[k].mul_(m)
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
            steps += 1
            if tr.max_steps is not None and steps >= tr.max_steps:
                done = True
                break
        if done:
            break
    return steps, float(loss_sum) / max(seen, 1), seen


def _forward(model: nn.Module, xb: torch.Tensor, task: ClientTask, n: int) -> torch.Tensor:
    if len(xb) != 1:
        return model(xb)
    try:
        return model(xb)
    except ValueError as e:
        # torch's BatchNorm cannot take batch statistics of one value per channel (a batch of one sample
        # reaching a BatchNorm1d, or a BatchNorm2d on 1x1 maps). Said with what the user can change.
        if "Expected more than 1 value per channel" not in str(e):
            raise
        why = (f"the client holds {n} training sample" if n == 1 else
               f"train.batch_size is {task.train.batch_size if task.train else 1}")
        raise ValueError(f"client {task.client} (round {task.round}): a batch of one sample cannot train "
                         f"{task.spec.name}, whose BatchNorm then sees one value per channel ({why}); give every "
                         f"client two or more samples (data.partition.min_size) and use train.batch_size of 2 or "
                         f"more, or a model without BatchNorm") from None


def train_delta(task: ClientTask, data: TensorData, model: nn.Module, *,
                penalty: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None) -> ClientResult:
    """Load the task's start weights into ``model``, train it (with :func:`train_model`'s hooks) and
    return the weight delta: the ``train`` procedure, and the body of a procedure that adds a term."""
    dev = next(model.parameters()).device
    start = {k: v.to(dev) for k, v in task.state.items()}
    load_state(model, start)
    steps, loss, seen = train_model(model, task, data, penalty=penalty, after_step=after_step)
    new = {k: v.detach() for k, v in model.state_dict().items()}
    # contiguous: a channels-last buffer's weights would otherwise give channels-last deltas.
    delta = {k: (new[k] - start[k]).contiguous().cpu() for k in start}
    return ClientResult(task.client, task.round, delta, len(data), steps, loss, {"samples_processed": seen})


@CLIENT_PROCEDURES.register("train", "local training; returns the weight delta")
def train_procedure(task: ClientTask, data: TensorData, model: nn.Module) -> ClientResult:
    return train_delta(task, data, model)


@CLIENT_PROCEDURES.register("evaluate", "metrics of the received model on the client's local split")
def evaluate_procedure(task: ClientTask, data: TensorData, model: nn.Module) -> ClientResult:
    from fedslim.metrics import evaluate

    load_state(model, {k: v.to(next(model.parameters()).device) for k, v in task.state.items()})
    metrics = evaluate(model, data, task.spec.num_classes, label_mask=task.label_mask,
                       batch_size=int(task.extras.get("batch_size", 1000)))
    return ClientResult(task.client, task.round, {}, len(data), 0, metrics.get("loss", 0.0), {"metrics": metrics})
