"""The server half of split learning: blocks ``[cut, n)`` (+ the head) and their LoRA.

:class:`SplitServer` is synchronous and thread-safe; ``aggregator.split_service`` feeds it
from the broker in worker threads. Each request is checked first (task, cut, shapes, dtypes,
finiteness, labels) and refused with a :class:`~schemas.errors.SplitRejected` that names what
is wrong, before anything changes. Vanilla forwards that arrive together with the same cut and
length go through the server part as one batch (the per-device losses are summed, so each
device still gets exactly the gradient of its own loss). U-shaped steps keep their graph
between the forward and the backward request, and drop it after ``step_timeout_s``, so a
device that vanishes mid-step holds nothing for long.

The server's LoRA is trained by its own optimizer; :class:`SplitFed` folds what it learned
since the last merge into every new global, so the global holds both halves.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor

from aggregator.strategies import MergeResult, Strategy, StrategyWrapper
from edgefed.ml.models import adapter_parameters, get_adapter
from edgefed.ml.split_model import head_loss, model_config, num_blocks, run_blocks
from edgefed.ml.tokens import IGNORE_INDEX
from schemas.errors import ConfigError, SplitRejected
from schemas.messages import SplitReply, SplitRequest, TensorMap

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SplitServerConfig:
    """How the split server trains and serves.

    Attributes:
        lr: AdamW learning rate of the server's LoRA.
        grad_clip: Max grad norm of the server's LoRA per step; None: no clipping.
        step_timeout_s: A U-shaped forward's graph is dropped when its backward is later.
        batch: Put vanilla forwards that arrive together through the server part at once.
        max_rows: Largest batch one request may carry.
        replies_kept: Answers remembered by request id, to answer retries without recomputing.
        keep_grads: Keep a copy of the server LoRA's gradients of the last step (tests).
    """

    lr: float = 5e-3
    grad_clip: float | None = 1.0
    step_timeout_s: float = 30.0
    batch: bool = True
    max_rows: int = 256
    replies_kept: int = 4096
    keep_grads: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0 or not self.step_timeout_s > 0 or self.max_rows < 1:
            raise ConfigError("split server needs lr > 0, step_timeout_s > 0 and max_rows >= 1")


@dataclass
class _Open:
    """A U-shaped step between its forward and its backward.

    Only the input is kept: other devices' steps change the server's LoRA in place meanwhile,
    so the backward recomputes the forward (which also holds no graph while a device is slow).
    """

    hidden: Tensor
    mask: Tensor | None
    cut: int
    shape: tuple[int, ...]
    opened: float


class SplitServer:
    """Serves split steps for many devices on one copy of the server part."""

    def __init__(
        self, model: PeftModel, *, task_id: str, config: SplitServerConfig | None = None
    ) -> None:
        """Serve ``task_id`` on ``model`` (the whole base model with the task's adapter)."""
        self.model = model
        self.task_id = task_id
        self.config = config or SplitServerConfig()
        self._blocks = num_blocks(model)
        base = model_config(model)
        self._hidden, self._vocab = int(base.hidden_size), int(base.vocab_size)
        self._max_len = int(base.max_position_embeddings)
        self._params = adapter_parameters(model)
        self._optimizer = torch.optim.AdamW(
            list(self._params.values()), lr=self.config.lr, weight_decay=0.0
        )
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], _Open] = {}
        self._replies: OrderedDict[str, SplitReply] = OrderedDict()
        self._snapshot: TensorMap = get_adapter(model)
        self.served = 0
        self.batches = 0
        self.expired = 0
        self.last_grads: TensorMap = {}
        model.train()

    # -- checks

    def check(self, request: SplitRequest) -> None:
        """Refuse a request that cannot be served; never changes any state.

        Raises:
            SplitRejected: With the reason and what exactly is wrong.
        """
        if request.task_id != self.task_id:
            raise SplitRejected("wrong_task", f"task {request.task_id!r} is not {self.task_id!r}")
        if not 1 <= request.cut < self._blocks:
            raise SplitRejected("wrong_shape", f"cut {request.cut} is not in 1..{self._blocks - 1}")
        main = request.tensors["hidden" if request.phase == "forward" else "grad"]
        rows, length = self._check_activations(main)
        if request.phase == "backward":
            self._check_backward(request, main)
            return
        self._check_token_inputs(request.tensors, rows, length)
        labels = request.tensors.get("labels")
        if labels is not None:
            self._check_labels(labels, request.choices)
        mask = request.tensors.get("attention_mask")
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise SplitRejected("malformed", "attention_mask holds values other than 0 and 1")

    def _check_activations(self, main: Tensor) -> tuple[int, int]:
        """Rows and length of a ``[batch, length, hidden]`` block of finite floats."""
        if main.dtype not in _FLOAT:
            raise SplitRejected("wrong_dtype", f"activations are {main.dtype}, not floating")
        rows, length = (main.shape[0], main.shape[1]) if main.dim() == 3 else (0, 0)
        if main.dim() != 3 or main.shape[2] != self._hidden or not 0 < length <= self._max_len:
            raise SplitRejected(
                "wrong_shape",
                f"activations of shape {list(main.shape)} are not [batch, 1..{self._max_len},"
                f" {self._hidden}]",
            )
        if not 0 < rows <= self.config.max_rows:
            raise SplitRejected("wrong_shape", f"{rows} rows; 1..{self.config.max_rows} allowed")
        if not bool(torch.isfinite(main).all()):
            raise SplitRejected("non_finite", "activations hold NaN or infinity")
        return rows, length

    def _check_backward(self, request: SplitRequest, grad: Tensor) -> None:
        """A gradient must answer an open forward of this device, in that output's shape."""
        step = self._open.get((request.client_id, request.step_id))
        if step is None:
            raise SplitRejected(
                "malformed", f"no open forward for step {request.step_id} (expired or unknown)"
            )
        if tuple(grad.shape) != step.shape:
            raise SplitRejected(
                "wrong_shape", f"grad {list(grad.shape)} != output {list(step.shape)}"
            )

    @staticmethod
    def _check_token_inputs(tensors: Mapping[str, Tensor], rows: int, length: int) -> None:
        """Labels and attention mask, when sent, are integers with one value per position."""
        for key in ("labels", "attention_mask"):
            t = tensors.get(key)
            if t is None:
                continue
            if t.dtype.is_floating_point or (t.dtype is torch.bool and key == "labels"):
                raise SplitRejected("wrong_dtype", f"{key} must be integers, not {t.dtype}")
            if tuple(t.shape) != (rows, length):
                raise SplitRejected("wrong_shape", f"{key} {list(t.shape)} != [{rows}, {length}]")

    def _check_labels(self, labels: Tensor, choices: Sequence[int]) -> None:
        """Labels lie in the vocabulary, score something, and within ``choices`` if given."""
        ok = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < self._vocab))
        if not bool(ok.all()):
            raise SplitRejected("malformed", f"labels outside 0..{self._vocab - 1} and -100")
        if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
            raise SplitRejected("malformed", "no position of the batch is scored")
        if choices:
            scored = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
            outside = sorted(set(scored.tolist()) - set(choices))
            if outside or max(choices) >= self._vocab:
                raise SplitRejected(
                    "malformed",
                    f"choices {list(choices)} must lie in the vocabulary of "
                    f"{self._vocab} and hold every scored label (not {outside})",
                )

    # -- serving

    def answered(self, request_id: str) -> SplitReply | None:
        """The answer already given to ``request_id`` (a retry gets it again), if any."""
        with self._lock:
            return self._replies.get(request_id)

    def serve(self, requests: list[SplitRequest]) -> list[SplitReply]:
        """Answer ``requests`` (checked or not), batching vanilla forwards that fit together."""
        with self._lock:
            self._expire()
            replies: dict[str, SplitReply] = {}
            batchable: dict[tuple[int, int], list[SplitRequest]] = {}
            unique: dict[str, SplitRequest] = {}
            for request in requests:
                unique.setdefault(request.request_id, request)
            for request in unique.values():
                cached = self._replies.get(request.request_id)
                if cached is not None:  # a retry: answered once, never trained twice
                    replies[request.request_id] = cached
                    continue
                try:
                    self.check(request)
                except SplitRejected as exc:
                    replies[request.request_id] = _refusal(request, exc)
                    continue
                if request.variant == "vanilla":
                    key = (request.cut, int(request.tensors["hidden"].shape[1]))
                    if not self.config.batch:
                        key = (request.cut, -len(batchable) - 1)
                    batchable.setdefault(key, []).append(request)
                else:
                    replies[request.request_id] = self._u_shaped(request)
            for group in batchable.values():
                for reply in self._vanilla(group):
                    replies[reply.request_id] = reply
            out = [replies[r.request_id] for r in requests]
            for reply in out:
                self._replies[reply.request_id] = reply
            while len(self._replies) > self.config.replies_kept:
                self._replies.popitem(last=False)
            return out

    def _vanilla(self, group: list[SplitRequest]) -> list[SplitReply]:
        started = time.perf_counter()
        cut = group[0].cut
        leaf = torch.cat([r.tensors["hidden"].float() for r in group]).requires_grad_(True)
        masks = [r.tensors.get("attention_mask") for r in group]
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat(
                [
                    m
                    if m is not None
                    else torch.ones(r.tensors["hidden"].shape[:2], dtype=torch.long)
                    for m, r in zip(masks, group, strict=True)
                ]
            ).long()
        out = run_blocks(self.model, leaf, mask, cut, self._blocks)
        losses: list[Tensor] = []
        row = 0
        for request in group:
            rows = int(request.tensors["hidden"].shape[0])
            labels = request.tensors["labels"]
            choices = request.choices or None
            losses.append(head_loss(self.model, out[row : row + rows], labels, choices))
            row += rows
        torch.stack(losses).sum().backward()  # type: ignore[no-untyped-call]
        self._step()
        assert leaf.grad is not None
        grads = torch.split(leaf.grad, [int(r.tensors["hidden"].shape[0]) for r in group])
        self.served += len(group)
        self.batches += 1
        spent = (time.perf_counter() - started) / len(group)
        return [
            SplitReply(
                request_id=r.request_id,
                client_id=r.client_id,
                accepted=True,
                loss=float(loss.detach()),
                tensors={"grad": g.contiguous()},
                server_s=spent,
            )
            for r, loss, g in zip(group, losses, grads, strict=True)
        ]

    def _u_shaped(self, request: SplitRequest) -> SplitReply:
        started = time.perf_counter()
        key = (request.client_id, request.step_id)
        if request.phase == "forward":
            hidden, mask = request.tensors["hidden"].float(), request.tensors.get("attention_mask")
            with torch.no_grad():
                out = run_blocks(self.model, hidden, mask, request.cut, self._blocks)
            self._open[key] = _Open(hidden, mask, request.cut, tuple(out.shape), time.monotonic())
            tensors = {"hidden": out.contiguous()}
        else:
            step = self._open.pop(key)
            leaf = step.hidden.requires_grad_(True)
            out = run_blocks(self.model, leaf, step.mask, step.cut, self._blocks)
            out.backward(request.tensors["grad"].float())  # type: ignore[no-untyped-call]
            self._step()
            assert leaf.grad is not None
            tensors = {"grad": leaf.grad.contiguous()}
            self.served += 1
        return SplitReply(
            request_id=request.request_id,
            client_id=request.client_id,
            accepted=True,
            tensors=tensors,
            server_s=time.perf_counter() - started,
        )

    def _step(self) -> None:
        params = [p for p in self._params.values() if p.grad is not None]
        if self.config.keep_grads:
            self.last_grads = {
                n: p.grad.detach().clone() for n, p in self._params.items() if p.grad is not None
            }
        if self.config.grad_clip is not None and params:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def _expire(self) -> None:
        limit = time.monotonic() - self.config.step_timeout_s
        for key in [k for k, step in self._open.items() if step.opened < limit]:
            del self._open[key]
            self.expired += 1

    @property
    def open_steps(self) -> int:
        """U-shaped steps waiting for their backward request."""
        return len(self._open)

    # -- the global model

    def load(self, adapter: TensorMap) -> None:
        """Continue from ``adapter`` (the global the service starts at); keeps the optimizer.

        A server restored by :meth:`load_state_dict` whose last merge is ``adapter`` keeps
        what it learned since that merge; any other global replaces the server's LoRA.
        """
        with self._lock, torch.no_grad():
            if self._snapshot.keys() == adapter.keys() and all(
                torch.equal(self._snapshot[name], tensor) for name, tensor in adapter.items()
            ):
                return
            for name, param in self._params.items():
                param.copy_(adapter[name])
            self._snapshot = {n: t.detach().clone() for n, t in adapter.items()}

    def compose(self, merged: TensorMap) -> TensorMap:
        """``merged`` plus what the server's LoRA learned since the last compose.

        The server continues from the result, so neither the devices' merged part nor the
        server's own steps are lost, whichever blocks each of them trained.
        """
        with self._lock:
            now = get_adapter(self.model)
            out = {n: t + (now[n] - self._snapshot[n]) for n, t in merged.items()}
            with torch.no_grad():
                for name, param in self._params.items():
                    param.copy_(out[name])
            self._snapshot = {n: t.clone() for n, t in out.items()}
            return out

    # -- checkpoints (the service registers the server as a Stateful part)

    def state_dict(self) -> dict[str, object]:
        """The server's LoRA, its value at the last merge, and AdamW's moments per tensor.

        Globals hold the server's LoRA only as of the last merge; this keeps its progress
        since then and the optimizer state, so a restarted aggregator resumes both.
        """
        with self._lock:
            names = list(self._params)
            moments = self._optimizer.state_dict()["state"]
            return {
                "adapter": {n: p.detach().clone() for n, p in self._params.items()},
                "snapshot": {n: t.clone() for n, t in self._snapshot.items()},
                "optimizer": {
                    names[index]: {key: _copy(value) for key, value in per_param.items()}
                    for index, per_param in moments.items()
                },
                "served": self.served,
            }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output (before serving; ``load`` then keeps it).

        Raises:
            ConfigError: The state does not fit this server's LoRA (names or shapes).
        """
        adapter = _tensor_map(state.get("adapter"), self._params, "adapter")
        snapshot = _tensor_map(state.get("snapshot"), self._snapshot, "snapshot")
        moments = state.get("optimizer")
        if not isinstance(moments, dict) or not set(moments) <= set(self._params):
            raise ConfigError("split server state: optimizer moments of unknown tensors")
        names = list(self._params)
        optimizer_state = {
            "state": {names.index(name): per_param for name, per_param in moments.items()},
            "param_groups": self._optimizer.state_dict()["param_groups"],
        }
        with self._lock, torch.no_grad():
            try:
                self._optimizer.load_state_dict(optimizer_state)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"split server state: optimizer state unusable: {exc}") from exc
            for name, param in self._params.items():
                param.copy_(adapter[name])
            self._snapshot = snapshot
            served = state.get("served")
            self.served = served if isinstance(served, int) else 0


def _copy(value: object) -> object:
    return value.detach().clone() if isinstance(value, Tensor) else value


def _tensor_map(value: object, like: Mapping[str, Tensor], what: str) -> TensorMap:
    """``value`` as tensors with exactly ``like``'s names, shapes and dtypes (fresh copies)."""
    if not isinstance(value, dict) or set(value) != set(like):
        raise ConfigError(f"split server state: {what} does not name this server's LoRA tensors")
    out: TensorMap = {}
    for name, reference in like.items():
        tensor = value[name]
        if not isinstance(tensor, Tensor) or tensor.shape != reference.shape:
            raise ConfigError(f"split server state: {what} {name} does not fit the LoRA")
        out[name] = tensor.detach().clone().to(reference.dtype)
    return out


def _refusal(request: SplitRequest, exc: SplitRejected) -> SplitReply:
    return SplitReply(
        request_id=request.request_id,
        client_id=request.client_id,
        accepted=False,
        reason=exc.reason,
        detail=exc.detail,
    )


class SplitFed(StrategyWrapper[Strategy]):
    """A merge strategy for split learning: devices' parts merged, the server's folded in.

    Devices send deltas over the whole adapter, zero where they did not train (the blocks
    of the server part). An interpolating rule (FedAsync) would mix those zeros in as "the
    device's model equals the base there"; for it a zero tensor means "the device's model
    equals the current global there" instead. Every new global then gets the server's own
    progress (``compose``). The state checkpointed here is the wrapped strategy's; the server
    part's own state is checkpointed apart.
    """

    def __init__(self, inner: Strategy, server: SplitServer) -> None:
        """Wrap ``inner`` (FedAsync or FedBuff) for ``server``."""
        super().__init__(inner)
        self._server = server

    def submit(
        self,
        *,
        current: TensorMap,
        base: TensorMap,
        delta: TensorMap,
        staleness: int,
        num_samples: int,
        update_id: str,
    ) -> MergeResult:
        """Merge the device part through the wrapped strategy, then add the server part."""
        if self._inner.interpolates:  # untouched parts must say "stay where you are"
            delta = {n: d if bool(d.any()) else current[n] - base[n] for n, d in delta.items()}
        result = self._inner.submit(
            current=current,
            base=base,
            delta=delta,
            staleness=staleness,
            num_samples=num_samples,
            update_id=update_id,
        )
        if result.new_global is None:
            return result
        return dataclasses.replace(result, new_global=self._server.compose(result.new_global))

    def flush(self, *, current: TensorMap) -> MergeResult:
        """Apply the wrapped strategy's partial buffer (see ``FedBuff.flush``), then compose."""
        flush = getattr(self._inner, "flush", None)
        result: MergeResult = (
            flush(current=current) if flush else MergeResult(new_global=None, weight=0.0)
        )
        if result.new_global is None:
            return result
        return dataclasses.replace(result, new_global=self._server.compose(result.new_global))
