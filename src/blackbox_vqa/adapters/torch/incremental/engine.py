"""Exact incremental inference over a traced PyTorch VQA module, with branch caching.

The module (``forward(image [B,3,H,W], tokens [B,T]) -> logits [B,A]``) is traced once
with ``torch.fx``. For one original input every node's value is computed and kept
(batch 1). Then:

- **Image perturbations** (same question): nodes that do not depend on the image are
  taken from the original (the question branch runs once). Each perturbed image tensor
  differs from the original inside a box (computed from the tensors). Through the
  spatial operators -- convolutions (any stride, dilation, groups and padding mode),
  max and average pooling, element-wise operators (ReLU and other activations, batch
  norm in eval mode, arithmetic with scalars or per-channel constants) and sums or
  products of two perturbed maps (the union of their boxes) -- only the box plus the
  operator's receptive-field halo is computed, batched over the perturbations, over the
  original's cached activations, gathered for all perturbations at once (one indexed
  read of the sliding-window view, no per-item loop). A box that grows past
  ``threshold`` of its map, or a window whose reads (halo included) pass ``threshold``
  of the input map, or any other operator (global pooling, flatten, linear layers,
  attention, ...), turns the patches into full tensors and the rest runs as ordinary
  batched computation.
- **Word perturbations** (same image): nodes that do not depend on the question are
  taken from the original (the image branch runs once); the rest runs batched.

Everything computed is what the plain forward pass computes on the same numbers, so the
logits agree up to float reassociation.

**Approximate mode** (``image_logits(..., tau=TAU)``): Krypton's projective-field
thresholding (Nakandala, Kumar, Papakonstantinou, SIGMOD 2019). At every spatial
operator and every union of boxes, a box longer than ``ceil(TAU * side)`` on an axis is
cut to that length, centred on the patch; positions beyond it keep the original's
activations, so the patch never grows past ``TAU`` of a map and nothing beyond it is
materialised until the first global operator. Items of one batch share the patch size
(the largest kept box), yet an item's logits do not depend on which items share its
batch: an item whose box is cut has a patch exactly its box (every kept box is at most
the cap, so the batch's largest is the cap), and the positions of a longer patch outside
an item's own box read only unchanged positions, so they hold the original's values
(up to rounding) without being reset. Each spatial operator runs on patches or on the
whole map, whichever computes fewer positions, a patch position counted ``patch_cost``
times (:data:`PATCH_COST`); on the whole map the cut is re-applied to its output. Both
compute the same rule, so the choice changes only the rounding. The logits are then
approximate. (``TAU = 1`` cuts nothing and runs as exact mode does, choosing by
``threshold``.)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from blackbox_vqa.adapters.torch.incremental.boxes import (
    WindowSpec,
    changed_boxes,
    fit_starts,
    item_ranges,
    kept_ranges,
    output_centre,
    output_range,
    source_index,
)

__all__ = ["DEFAULT_THRESHOLD", "PATCH_COST", "EngineUnsupported", "IncrementalEngine",
           "OriginalRun"]

# Share of a feature map past which a box is computed in full (benchmarks/BENCHMARKS.md,
# "Incremental occlusion").
DEFAULT_THRESHOLD = 0.75

# Approximate mode: the cost of one output position computed on a patch (window gathered,
# operator run on it) in units of one position of the whole map. Measured on CPU, one
# thread, 64-image batches of 3 x 3 convolutions (benchmarks/patch_cost.py; BENCHMARKS.md,
# "Approximate incremental occlusion", fourth measurement): 0.72-1.0 on 28-112 maps,
# 0.89-1.40 on 14 x 14, 1.18-1.58 on 7 x 7 (512 channels). A middle value: where it is
# wrong the chosen way costs at most about 1.2x the other.
PATCH_COST = 1.3

IMAGE, TOKENS = "image", "tokens"

_UNARY_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout,
    nn.Dropout2d,
)
_UNARY_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.mish, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    torch.abs, torch.exp, torch.neg, torch.clamp, F.dropout,
})
_UNARY_METHODS = frozenset({
    "relu", "sigmoid", "tanh", "abs", "neg", "exp", "clamp", "contiguous", "float",
})
_BINARY_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
    torch.mul, torch.div, torch.maximum, torch.minimum,
})
_BINARY_METHODS = frozenset({"add", "sub", "mul", "div"})


class EngineUnsupported(Exception):
    """The module cannot be run incrementally (the message says why)."""


@dataclass
class _Patched:
    """A perturbed ``[N, C, H, W]`` activation: ``base`` ``[1, C, H, W]`` with ``patch``
    ``[N, C, h, w]`` pasted at rows ``top[n]:top[n]+h`` and columns ``left[n]:left[n]+w``.

    ``own`` (approximate mode): each item's own changed box ``(top, bottom, left, right)``
    ``[N]`` each, inside the patch (the patch is the batch's common size)."""

    base: torch.Tensor
    patch: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    own: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def boxes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each item's changed box ``(top, bottom, left, right)``, ``[N]`` each."""
        if self.own is not None:
            return self.own
        ph, pw = self.patch.shape[2:]
        return self.top, self.top + ph, self.left, self.left + pw

    @property
    def count(self) -> int:
        return int(self.patch.shape[0])

    def full(self) -> torch.Tensor:
        """The ``[N, C, H, W]`` tensor (the patch itself when it covers the map, else a
        new one)."""
        height, width = self.patch.shape[2:]
        if (height, width) == tuple(self.base.shape[2:]):
            return self.patch
        out = self.base.expand(self.count, *self.base.shape[1:]).clone()
        device = out.device
        items = torch.arange(self.count, device=device)[:, None, None]
        rows = (self.top.to(device)[:, None] + torch.arange(height, device=device))[:, :, None]
        cols = (self.left.to(device)[:, None] + torch.arange(width, device=device))[:, None, :]
        out[items, :, rows, cols] = self.patch.permute(0, 2, 3, 1)
        return out

    def crop(
        self, row0: torch.Tensor, rows: int, col0: torch.Tensor, cols: int, fill: float
    ) -> torch.Tensor:
        """Each item's ``rows x cols`` window starting at ``(row0[n], col0[n])``:
        ``[N, C, rows, cols]``; positions outside the map read ``fill``. One gather from
        the original's sliding windows, one from the patches' (no per-item loop)."""
        height, width = self.base.shape[2:]
        device = self.base.device
        r0, c0 = row0.to(device), col0.to(device)
        pad_top, pad_left = max(0, -int(r0.min())), max(0, -int(c0.min()))
        pad_bottom = max(0, int(r0.max()) + rows - height)
        pad_right = max(0, int(c0.max()) + cols - width)
        source = self.base[0]
        if pad_top or pad_left or pad_bottom or pad_right:
            source = F.pad(source, (pad_left, pad_right, pad_top, pad_bottom), value=fill)
        out = _base_windows(source, rows, cols, r0 + pad_top, c0 + pad_left)
        ph, pw = self.patch.shape[2:]
        dr, dc = r0 - self.top.to(device), c0 - self.left.to(device)  # window in the patch
        offsets, group = torch.unique(torch.stack([dr, dc], dim=1), dim=0, return_inverse=True)
        if len(offsets) <= _PASTE_GROUPS:  # few distinct offsets: slice copies per offset
            if len(offsets) == 1:
                return _paste_at(out, self.patch, int(offsets[0, 0]), int(offsets[0, 1]))
            for g, (row, col) in enumerate(offsets.tolist()):
                _paste_at(out, self.patch, row, col, (group == g).nonzero().squeeze(1))
            return out
        before_r, before_c = max(0, -int(dr.min())), max(0, -int(dc.min()))
        after_r = max(0, int(dr.max()) + rows - ph)
        after_c = max(0, int(dc.max()) + cols - pw)
        if before_r >= ph + rows or before_c >= pw + cols:  # no window meets its patch
            return out
        patch = self.patch
        if before_r or before_c or after_r or after_c:
            patch = F.pad(patch, (before_c, after_c, before_r, after_r))
        items = torch.arange(self.count, device=device)
        aligned = _windows_at(patch, rows, cols, items, dr + before_r, dc + before_c)
        in_r = dr[:, None] + torch.arange(rows, device=device)
        in_c = dc[:, None] + torch.arange(cols, device=device)
        mask = (((in_r >= 0) & (in_r < ph))[:, None, :, None]
                & ((in_c >= 0) & (in_c < pw))[:, None, None, :])
        return torch.where(mask, aligned, out)

    def window(self, rows: torch.Tensor, cols: torch.Tensor, fill: float) -> torch.Tensor:
        """Values at rows ``[N, R]`` x columns ``[N, S]`` of each item: ``[N, C, R, S]``;
        index ``-1`` reads ``fill``."""
        height, width = self.base.shape[2:]
        device = self.base.device
        rows, cols = rows.to(device), cols.to(device)
        top, left = self.top.to(device), self.left.to(device)
        extended = F.pad(self.base[0], (0, 1, 0, 1), value=fill)
        r = torch.where(rows < 0, height, rows)
        c = torch.where(cols < 0, width, cols)
        out = extended[:, r[:, :, None], c[:, None, :]].permute(1, 0, 2, 3)
        ph, pw = self.patch.shape[2:]
        local_r, local_c = rows - top[:, None], cols - left[:, None]
        inside_r = (rows >= 0) & (local_r >= 0) & (local_r < ph)
        inside_c = (cols >= 0) & (local_c >= 0) & (local_c < pw)
        items = torch.arange(self.count, device=device)[:, None, None]
        values = self.patch[items, :, local_r.clamp(0, ph - 1)[:, :, None],
                            local_c.clamp(0, pw - 1)[:, None, :]].permute(0, 3, 1, 2)
        mask = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]
        return torch.where(mask, values, out).contiguous()


# Most distinct window offsets (in their patches) a crop pastes by slice copies, one per
# offset; past it, one masked gather (grid cells: an offset for the interior and a few for
# the borders).
_PASTE_GROUPS = 16


def _base_windows(
    source: torch.Tensor, rows: int, cols: int, row0: torch.Tensor, col0: torch.Tensor
) -> torch.Tensor:
    """``source[:, row0[n]:row0[n]+rows, col0[n]:col0[n]+cols]`` for every ``n``:
    ``[N, C, rows, cols]`` from one map ``source`` ``[C, H, W]`` (every window inside it),
    by one ``index_select`` over its flattened positions (cheaper on CPU than indexing the
    sliding-window view)."""
    channels, _, width = source.shape
    device = source.device
    r = row0.to(device)[:, None] + torch.arange(rows, device=device)
    c = col0.to(device)[:, None] + torch.arange(cols, device=device)
    flat = (r[:, :, None] * width + c[:, None, :]).reshape(-1)
    picked = source.reshape(channels, -1).index_select(1, flat)
    return picked.view(channels, len(row0), rows, cols).permute(1, 0, 2, 3).contiguous()


def _paste_at(
    out: torch.Tensor, patch: torch.Tensor, dr: int, dc: int, items: torch.Tensor | None = None
) -> torch.Tensor:
    """``out`` ``[N, C, rows, cols]`` with ``patch`` ``[N, C, h, w]`` written where they
    overlap, for items whose window starts at offset ``(dr, dc)`` in their patch (all
    items, or the indices ``items``): window position ``(i, j)`` is patch position
    ``(i + dr, j + dc)``. Slice copies in place (no padding, gather or select)."""
    rows, cols = out.shape[2:]
    ph, pw = patch.shape[2:]
    r0, r1 = max(0, -dr), min(rows, ph - dr)
    c0, c1 = max(0, -dc), min(cols, pw - dc)
    if r0 < r1 and c0 < c1:
        source = patch[:, :, r0 + dr : r1 + dr, c0 + dc : c1 + dc]
        if items is None:
            out[:, :, r0:r1, c0:c1] = source
        else:
            out[items, :, r0:r1, c0:c1] = source[items]
    return out


def _windows_at(
    source: torch.Tensor, rows: int, cols: int, item: torch.Tensor, row0: torch.Tensor,
    col0: torch.Tensor,
) -> torch.Tensor:
    """``source[item[n], :, row0[n]:row0[n]+rows, col0[n]:col0[n]+cols]`` for every ``n``:
    ``[N, C, rows, cols]`` from ``source`` ``[B, C, H, W]``, in one gather over its
    sliding-window view (every window must lie inside ``source``)."""
    view = source.unfold(2, rows, 1).unfold(3, cols, 1)  # [B, C, H', W', rows, cols]
    return view[item, :, row0, col0]


@dataclass
class OriginalRun:
    """Every node's value on the original input (batch 1), and the logits ``[1, A]``."""

    values: dict[fx.Node, Any]
    logits: torch.Tensor
    image: torch.Tensor
    tokens: torch.Tensor


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    return (pair[0], pair[0]) if len(pair) == 1 else (pair[0], pair[1])


@dataclass(frozen=True)
class _Windowed:
    """A sliding-window operator: ``apply(window)`` runs it unpadded on a gathered window,
    ``full(x)`` runs it as the model does on a whole map."""

    rows: WindowSpec
    cols: WindowSpec
    fill: float
    apply: Callable[[torch.Tensor], torch.Tensor]
    full: Callable[[torch.Tensor], torch.Tensor]


def _conv_op(module: nn.Conv2d) -> _Windowed | None:
    if isinstance(module.padding, str):
        return None
    kernel, stride = _pair(module.kernel_size), _pair(module.stride)
    dilation, padding = _pair(module.dilation), _pair(module.padding)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    weight, bias, groups = module.weight, module.bias, module.groups

    def apply(window: torch.Tensor) -> torch.Tensor:
        return F.conv2d(window, weight, bias, stride, 0, dilation, groups)

    return _Windowed(
        WindowSpec(kernel[0], stride[0], dilation[0], padding[0], mode),
        WindowSpec(kernel[1], stride[1], dilation[1], padding[1], mode),
        0.0, apply, module,
    )


def _max_pool_op(module: nn.MaxPool2d) -> _Windowed | None:
    if module.return_indices:
        return None
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    dilation, padding = _pair(module.dilation), _pair(module.padding)

    def apply(window: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(window, kernel, stride, 0, dilation)

    return _Windowed(
        WindowSpec(kernel[0], stride[0], dilation[0], padding[0]),
        WindowSpec(kernel[1], stride[1], dilation[1], padding[1]),
        float("-inf"), apply, module,
    )


def _avg_pool_op(module: nn.AvgPool2d) -> _Windowed | None:
    padding = _pair(module.padding)
    if module.ceil_mode or (any(padding) and not module.count_include_pad):
        return None
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    divisor = module.divisor_override

    def apply(window: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(window, kernel, stride, 0, False, True, divisor)

    return _Windowed(
        WindowSpec(kernel[0], stride[0], 1, padding[0]),
        WindowSpec(kernel[1], stride[1], 1, padding[1]),
        0.0, apply, module,
    )


def _windowed(module: nn.Module) -> _Windowed | None:
    if isinstance(module, nn.Conv2d):
        return _conv_op(module)
    if isinstance(module, nn.MaxPool2d):
        return _max_pool_op(module)
    if isinstance(module, nn.AvgPool2d):
        return _avg_pool_op(module)
    return None


def _pointwise_module(module: nn.Module) -> bool:
    """Whether ``module`` acts on each position alone (batch norm only in eval mode with
    running statistics, dropout only in eval mode)."""
    if isinstance(module, nn.BatchNorm2d):
        return not module.training and module.running_mean is not None
    if isinstance(module, nn.Dropout | nn.Dropout2d):
        return not module.training
    return isinstance(module, _UNARY_MODULES)


def _inplace(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.kwargs.get("inplace"):
        return True
    return node.op == "call_method" and str(node.target).endswith("_")


def _channel_constant(value: Any) -> bool:
    """A scalar, or a tensor that broadcasts over ``[N, C, H, W]`` without spatial extent."""
    if isinstance(value, int | float | bool):
        return True
    if not isinstance(value, torch.Tensor):
        return False
    if value.numel() == 1:
        return True
    return value.dim() == 4 and value.shape[0] == 1 and value.shape[2] == value.shape[3] == 1


class IncrementalEngine:
    """Trace ``module`` once; score image and word perturbations of one original input.

    Args:
        module: ``forward(image [B,3,H,W], tokens [B,T]) -> logits [B,A]``.
        threshold: share of a feature map past which a box is computed in full (exact
            mode, and approximate mode at ``tau = 1``).
        patch_cost: approximate mode (``tau < 1``): a layer runs on patches when
            ``patch_cost`` times the positions its patches compute is below the whole
            map's positions, else on the whole map (same values, other rounding).

    Raises:
        EngineUnsupported: the module could not be traced or has an unexpected signature.
    """

    def __init__(
        self, module: nn.Module, *, threshold: float = DEFAULT_THRESHOLD,
        patch_cost: float = PATCH_COST,
    ) -> None:
        try:
            traced = fx.symbolic_trace(module)
        except Exception as exc:  # torch.fx raises many kinds of errors
            raise EngineUnsupported(
                f"torch.fx could not trace the module ({type(exc).__name__}: {exc})"
            ) from exc
        self.module = traced
        self.threshold = threshold
        self.patch_cost = patch_cost
        self.nodes = list(traced.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 2:
            raise EngineUnsupported(
                f"the traced forward takes {len(placeholders)} inputs, expected (image, tokens)"
            )
        self.deps: dict[fx.Node, frozenset[str]] = {}
        self.placeholder_kind = {placeholders[0]: IMAGE, placeholders[1]: TOKENS}
        for node in self.nodes:
            if node.op == "placeholder":
                self.deps[node] = frozenset({self.placeholder_kind[node]})
            else:
                found: set[str] = set()
                for inp in node.all_input_nodes:
                    found |= self.deps[inp]
                self.deps[node] = frozenset(found)
        self.modules = dict(traced.named_modules())
        self.stats: dict[str, int] = {}
        self._tau: float | None = None

    @property
    def _cuts(self) -> bool:
        """Approximate mode with ``tau < 1`` (boxes are cut; full vs patch by cost)."""
        return self._tau is not None and self._tau < 1.0

    # -- execution helpers ---------------------------------------------------------------

    def _submodule(self, node: fx.Node) -> nn.Module | None:
        return self.modules[str(node.target)] if node.op == "call_module" else None

    def _call(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self._submodule(node)
        if _inplace(node, module):
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        if node.op == "call_module":
            assert module is not None
            return module(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, str(node.target))(*rest, **kwargs)
        if node.op == "get_attr":
            return _fetch_attr(self.module, str(node.target))
        raise EngineUnsupported(f"unknown node kind {node.op!r}")

    def _node_inputs(
        self, node: fx.Node, lookup: Callable[[fx.Node], Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        return tuple(args), dict(kwargs)

    def original(self, image: torch.Tensor, tokens: torch.Tensor) -> OriginalRun:
        """Run the original input ``[1, 3, H, W]``, ``[1, T]`` keeping every node's value."""
        values: dict[fx.Node, Any] = {}
        logits: Any = None
        for node in self.nodes:
            if node.op == "placeholder":
                values[node] = image if self.placeholder_kind[node] == IMAGE else tokens
            elif node.op == "output":
                logits = values[node.args[0]]  # type: ignore[index]
            else:
                args, kwargs = self._node_inputs(node, values.__getitem__)
                values[node] = self._call(node, args, kwargs)
        if not isinstance(logits, torch.Tensor):
            raise EngineUnsupported("the traced forward does not return one tensor")
        return OriginalRun(values, logits, image, tokens)

    # -- word perturbations: the image branch once ----------------------------------------

    def word_logits(self, run: OriginalRun, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, A]`` for the original image with each row of ``tokens`` ``[N, T]``."""
        count = tokens.shape[0]
        values: dict[fx.Node, Any] = {}

        def lookup(node: fx.Node) -> Any:
            if TOKENS not in self.deps[node]:
                return _batched(run.values[node], count) if self.deps[node] else run.values[node]
            return values[node]

        return self._run_rest(TOKENS, tokens, values, lookup)

    def _run_rest(
        self, kind: str, value: torch.Tensor, values: dict[fx.Node, Any],
        lookup: Callable[[fx.Node], Any],
    ) -> torch.Tensor:
        for node in self.nodes:
            if kind not in self.deps[node] or node.op == "output":
                continue
            if node.op == "placeholder":
                values[node] = value
                continue
            args, kwargs = self._node_inputs(node, lookup)
            values[node] = self._call(node, args, kwargs)
        output = next(n for n in reversed(self.nodes) if n.op == "output")
        result = lookup(output.args[0])  # type: ignore[arg-type]
        if isinstance(result, _Patched):
            result = result.full()
        return result  # type: ignore[no-any-return]

    # -- image perturbations: only the changed windows -----------------------------------

    def image_logits(
        self, run: OriginalRun, images: torch.Tensor, *, tau: float | None = None
    ) -> torch.Tensor:
        """Logits ``[N, A]`` for each image of ``images`` ``[N, 3, H, W]`` with the original
        question: exact, or with ``tau`` in ``(0, 1]`` approximate (boxes capped at ``tau``
        of each map's side, see the module docstring)."""
        self._tau = tau
        try:
            return self._image_logits(run, images)
        finally:
            self._tau = None

    def _image_logits(self, run: OriginalRun, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        top, bottom, left, right = (v.cpu() for v in changed_boxes(run.image, images))
        own = (top, bottom, left, right) if self._tau is not None else None
        height, width = images.shape[2:]
        h = int((bottom - top).max().item())
        w = int((right - left).max().item())
        top, left = fit_starts(top, h, height), fit_starts(left, w, width)
        device = images.device
        patch = _windows_at(images, h, w, torch.arange(count, device=device),
                            top.to(device), left.to(device))
        start = _Patched(run.image, patch, top, left, own)
        values: dict[fx.Node, Any] = {}
        self.stats = {"patched": 0, "full": 0, "truncated": 0, "kept_full": 0}

        def lookup(node: fx.Node) -> Any:
            if IMAGE not in self.deps[node]:
                return _batched(run.values[node], count) if self.deps[node] else run.values[node]
            return values[node]

        for node in self.nodes:
            if IMAGE not in self.deps[node] or node.op == "output":
                continue
            if node.op == "placeholder":
                values[node] = start
                continue
            values[node] = self._image_node(node, run, lookup)
        output = next(n for n in reversed(self.nodes) if n.op == "output")
        result = lookup(output.args[0])  # type: ignore[arg-type]
        return result.full() if isinstance(result, _Patched) else result  # type: ignore[no-any-return]

    def _image_node(
        self, node: fx.Node, run: OriginalRun, lookup: Callable[[fx.Node], Any]
    ) -> Any:
        raw = [lookup(n) for n in node.all_input_nodes]
        if any(isinstance(v, _Patched) for v in raw):
            patched = self._patched_node(node, run, lookup)
            if patched is not None:
                self.stats["patched"] += 1
                return patched

        def full(n: fx.Node) -> Any:
            value = lookup(n)
            return value.full() if isinstance(value, _Patched) else value

        self.stats["full"] += 1
        args, kwargs = self._node_inputs(node, full)
        return self._call(node, args, kwargs)

    def _patched_node(
        self, node: fx.Node, run: OriginalRun, lookup: Callable[[fx.Node], Any]
    ) -> _Patched | torch.Size | None:
        """The node's output as patches, or ``None`` when it must run on full tensors."""
        base = run.values[node]
        args, kwargs = self._node_inputs(node, lookup)
        first = args[0] if args else None
        if node.op == "call_function" and node.target is getattr and args[1] == "shape" \
                and isinstance(first, _Patched):
            return torch.Size([first.count, *first.base.shape[1:]])
        if node.op == "call_method" and node.target == "size" and isinstance(first, _Patched) \
                and len(args) == 1 and not kwargs:
            return torch.Size([first.count, *first.base.shape[1:]])
        if not isinstance(base, torch.Tensor) or base.dim() != 4:
            return None
        module = self._submodule(node)
        if module is not None:
            if len(args) != 1 or kwargs or not isinstance(first, _Patched):
                return None
            op = _windowed(module)
            if op is not None:
                return self._window_node(op, first, base)
            if _pointwise_module(module):
                return self._pointwise(node, module, first, args, kwargs, base)
            return None
        target = node.target
        unary = (node.op == "call_function" and target in _UNARY_FUNCTIONS) or (
            node.op == "call_method" and target in _UNARY_METHODS)
        if unary and isinstance(first, _Patched) and not any(
            isinstance(a, torch.Tensor | _Patched) for a in (*args[1:], *kwargs.values())
        ):
            return self._pointwise(node, None, first, args, kwargs, base)
        if node.op == "call_function" and target in (torch.cat, torch.concat):
            return self._concat(node, args, kwargs, base)
        binary = (node.op == "call_function" and target in _BINARY_FUNCTIONS) or (
            node.op == "call_method" and target in _BINARY_METHODS)
        if binary and len(args) == 2 and not kwargs:
            return self._binary(node, args[0], args[1], base)
        return None

    def _pointwise(
        self, node: fx.Node, module: nn.Module | None, first: _Patched,
        args: tuple[Any, ...], kwargs: dict[str, Any], base: torch.Tensor,
    ) -> _Patched | None:
        out = self._call(node, (first.patch, *args[1:]), kwargs)
        return self._checked(out, first, base)

    def _checked(self, out: Any, like: _Patched, base: torch.Tensor) -> _Patched | None:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            return None
        if out.shape[0] != like.count or out.shape[1] != base.shape[1]:
            return None
        if out.shape[2:] != like.patch.shape[2:]:
            return None
        return _Patched(base, out, like.top, like.left, like.own)

    def _binary(self, node: fx.Node, a: Any, b: Any, base: torch.Tensor) -> _Patched | None:
        if isinstance(a, _Patched) and isinstance(b, _Patched):
            if a.base.shape != b.base.shape or a.base.shape[2:] != base.shape[2:]:
                return None
            a, b = self._union(a, b, base)
            if a is None or b is None:
                return None
            out = self._call(node, (a.patch, b.patch), {})
            return self._checked(out, a, base)
        if isinstance(a, _Patched) and _channel_constant(b):
            return self._checked(self._call(node, (a.patch, b), {}), a, base)
        if isinstance(b, _Patched) and _channel_constant(a):
            return self._checked(self._call(node, (a, b.patch), {}), b, base)
        return None

    def _concat(
        self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], base: torch.Tensor
    ) -> _Patched | None:
        """``torch.cat`` of perturbed maps along channels: the union of their boxes."""
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        parts = args[0] if args else kwargs.get("tensors")
        if dim not in (1, -3) or not isinstance(parts, list | tuple) or not parts:
            return None
        if not all(isinstance(p, _Patched) for p in parts):
            return None
        if any(p.base.shape[2:] != base.shape[2:] for p in parts):
            return None
        aligned = self._aligned(list(parts), base)
        if aligned is None:
            return None
        out = torch.cat([p.patch for p in aligned], dim=1)
        return self._checked(out, aligned[0], base)

    def _union(
        self, a: _Patched, b: _Patched, base: torch.Tensor
    ) -> tuple[_Patched | None, _Patched | None]:
        aligned = self._aligned([a, b], base)
        return (None, None) if aligned is None else (aligned[0], aligned[1])

    def _aligned(self, values: list[_Patched], base: torch.Tensor) -> list[_Patched] | None:
        """``values`` re-cut to one common box per item (the union of theirs, capped when
        boxes are cut), or ``None`` when that box passes the threshold (never when boxes
        are cut: the rule must hold whatever the batch's largest box)."""
        height, width = base.shape[2:]
        boxes = [v.boxes() for v in values]
        top = torch.stack([b[0] for b in boxes]).amin(dim=0)
        bottom = torch.stack([b[1] for b in boxes]).amax(dim=0)
        left = torch.stack([b[2] for b in boxes]).amin(dim=0)
        right = torch.stack([b[3] for b in boxes]).amax(dim=0)
        own = None
        if self._tau is not None:
            top, bottom = self._kept(top, bottom, (top + bottom - 1).double() / 2, height)
            left, right = self._kept(left, right, (left + right - 1).double() / 2, width)
            own = (top, bottom, left, right)
        h = int((bottom - top).max().item())
        w = int((right - left).max().item())
        if h * w > self.threshold * height * width and not self._cuts:
            return None
        top, left = fit_starts(top, h, height), fit_starts(left, w, width)
        out = []
        for v in values:
            same = tuple(v.patch.shape[2:]) == (h, w) and bool((v.top == top).all()) \
                and bool((v.left == left).all())
            out.append(v if same else _Patched(v.base, v.crop(top, h, left, w, 0.0), top, left))
        return [_Patched(v.base, v.patch, v.top, v.left, own) for v in out]

    def _window_node(self, op: _Windowed, value: _Patched, base: torch.Tensor) -> _Patched | None:
        in_h, in_w = value.base.shape[2:]
        out_h, out_w = base.shape[2:]
        ph, pw = value.patch.shape[2:]
        own = None
        if self._tau is None:
            top, h = output_range(value.top, value.top + ph, op.rows, out_h, in_h)
            left, w = output_range(value.left, value.left + pw, op.cols, out_w, in_w)
        else:
            r0, r1, c0, c1 = value.boxes()
            first, stop = item_ranges(r0, r1, op.rows, out_h, in_h)
            top, bottom = self._kept(first, stop, output_centre(r0, r1, op.rows), out_h)
            first, stop = item_ranges(c0, c1, op.cols, out_w, in_w)
            left, right = self._kept(first, stop, output_centre(c0, c1, op.cols), out_w)
            own = (top, bottom, left, right)
            h = int((bottom - top).max().item())
            w = int((right - left).max().item())
            top, left = fit_starts(top, h, out_h), fit_starts(left, w, out_w)
        # the window a patch reads, halo included, against the input map: past the
        # threshold the whole layer runs batched (cheaper than gathering most of the map)
        reads = ((h - 1) * op.rows.stride + op.rows.reach) * ((w - 1) * op.cols.stride
                                                                + op.cols.reach)
        if self._cuts:  # the cheaper way by positions computed; both give the same values
            whole = self.patch_cost * h * w >= out_h * out_w
        else:
            whole = h * w > self.threshold * out_h * out_w or reads > self.threshold * in_h * in_w
        if whole:
            return None if own is None else self._full_kept(op, value, base, own)
        if op.rows.mode == op.cols.mode == "constant":
            window = value.crop(top * op.rows.stride - op.rows.padding,
                                (h - 1) * op.rows.stride + op.rows.reach,
                                left * op.cols.stride - op.cols.padding,
                                (w - 1) * op.cols.stride + op.cols.reach, op.fill)
        else:
            rows = source_index(top, h, op.rows, in_h)
            cols = source_index(left, w, op.cols, in_w)
            window = value.window(rows, cols, op.fill)
        out = op.apply(window)
        if tuple(out.shape[2:]) != (h, w):
            raise EngineUnsupported(
                f"window arithmetic disagrees with the operator ({tuple(out.shape)} vs {h}x{w})"
            )
        return _Patched(base, out, top, left, own)

    def _full_kept(
        self, op: _Windowed, value: _Patched, base: torch.Tensor,
        own: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> _Patched:
        """Approximate mode where the whole map is cheaper (or, at ``tau = 1``, past the
        threshold): the layer on the whole map, batched, then
        every position outside each item's kept box ``own`` reset to the original's (the
        same rule as the patched path, as one full-map patch)."""
        out = op.full(value.full())
        device = out.device
        top, bottom, left, right = (v.to(device) for v in own)
        rows = torch.arange(out.shape[2], device=device)
        cols = torch.arange(out.shape[3], device=device)
        inside = (((rows >= top[:, None]) & (rows < bottom[:, None]))[:, None, :, None]
                  & ((cols >= left[:, None]) & (cols < right[:, None]))[:, None, None, :])
        self.stats["kept_full"] += 1
        zero = torch.zeros_like(own[0])
        return _Patched(base, torch.where(inside, out, base), zero, zero, own)

    def _kept(
        self, first: torch.Tensor, stop: torch.Tensor, centre: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-item ranges ``[first, stop)`` capped at ``tau`` of ``size`` (see
        :func:`~blackbox_vqa.adapters.torch.incremental.boxes.kept_ranges`)."""
        tau = self._tau or 1.0
        start, end = kept_ranges(first, stop, centre, size, tau)
        self.stats["truncated"] += int(((end - start) < (stop - first)).sum().item())
        return start, end


def _batched(value: Any, count: int) -> Any:
    """A branch value computed on the batch-1 original, repeated for ``count`` items."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
        return value.expand(count, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_batched(v, count) for v in value)
    if isinstance(value, list):
        return [_batched(v, count) for v in value]
    return value


def _fetch_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def iter_hooked(module: nn.Module) -> Iterator[str]:
    """Names of submodules of ``module`` carrying forward or forward-pre hooks."""
    for name, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks:
            yield name or type(module).__name__
