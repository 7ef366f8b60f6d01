"""ONNX image classifiers as white-box PyTorch modules: the graph run op by op with torch.

An ONNX file is a protobuf (no pickle): :func:`onnx_module` parses it with ``onnx``, checks
it, and returns an ``nn.Module`` whose ``forward`` evaluates the graph's nodes in order with
``torch`` functions, so gradients flow to the input and every attack works on it. The
weights (the graph's initializers) are buffers of the module, on the module's device.

Why not ``onnx2torch``: it imports ``torchvision`` when it is imported (for its NMS and
RoIAlign converters), and redblue does not depend on torchvision (its wheels pull a CUDA
build of torch). The operators covered here are the ones image classifiers export to (the
convolution, pooling, normalisation, activation, linear and shape operators of opsets 11–21);
any other operator is named in a clear error. :func:`onnx_module`'s caller checks the module
against ``onnxruntime`` on real inputs (:mod:`redblue.model_sources`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from redblue.errors import IntegrityError

Op = Callable[[list[Any], dict[str, Any]], Any]


def _ints(value: Any) -> list[int]:
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]


def _pads(attrs: dict[str, Any], dims: int, x: torch.Tensor, kernel: Sequence[int]) -> tuple[list[int], bool]:
    """ONNX pads (all begins, then all ends, or ``auto_pad``) -> (F.pad order: last dim first,
    symmetric?)."""
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):  # output size ceil(input / stride), the odd pixel at the end (UPPER)
        strides = _ints(attrs.get("strides", [1] * dims))
        dilations = _ints(attrs.get("dilations", [1] * dims))
        begin, end = [], []
        for size, k, stride, dilation in zip(x.shape[2:], kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
    elif auto in ("NOTSET", "VALID"):
        pads = _ints(attrs.get("pads", [0] * 2 * dims)) if auto == "NOTSET" else [0] * 2 * dims
        begin, end = pads[:dims], pads[dims:]
    else:
        raise NotImplementedError(f"auto_pad={auto}")
    torch_pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        torch_pads += [b, e]
    return torch_pads, begin == end


def _conv(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    dims = w.dim() - 2
    pads, symmetric = _pads(attrs, dims, x, list(w.shape[2:]))
    padding: Any = pads[::2][::-1] if symmetric else 0
    if not symmetric:
        x = F.pad(x, pads)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(x, w, b, stride=_ints(attrs.get("strides", [1] * dims)), padding=padding,
                dilation=_ints(attrs.get("dilations", [1] * dims)), groups=int(attrs.get("group", 1)))  # fmt: skip


def _pool(kind: str) -> Op:
    def run(inputs: list[Any], attrs: dict[str, Any]) -> Any:
        x = inputs[0]
        kernel = _ints(attrs["kernel_shape"])
        dims = len(kernel)
        pads, symmetric = _pads(attrs, dims, x, kernel)
        strides = _ints(attrs.get("strides", [1] * dims))
        ceil = bool(attrs.get("ceil_mode", 0))
        padding: Any = pads[::2][::-1] if symmetric else 0
        if kind == "max":
            if not symmetric:
                x = F.pad(x, pads, value=-math.inf)
            pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
            return pool(x, kernel, strides, padding, dilation=_ints(attrs.get("dilations", [1] * dims)), ceil_mode=ceil)
        if any(d != 1 for d in _ints(attrs.get("dilations", [1] * dims))):
            raise NotImplementedError("AveragePool with dilations")
        include_pad = bool(attrs.get("count_include_pad", 0))
        avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        if symmetric:
            return avg(x, kernel, strides, padding, ceil_mode=ceil, count_include_pad=include_pad)
        # asymmetric pads: pool the zero-padded input, and divide by the share of real pixels
        # in each window unless the padding counts
        out = avg(F.pad(x, pads), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        if include_pad:
            return out
        ones = F.pad(torch.ones_like(x[:1, :1]), pads)
        return out / avg(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)

    return run


def _gemm(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    a, b = inputs[0], inputs[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    out = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        out = out + float(attrs.get("beta", 1.0)) * inputs[2]
    return out


def _batch_norm(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(attrs.get("epsilon", 1e-5)))


def _reshape(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _axes(inputs: list[Any], attrs: dict[str, Any]) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return _ints(inputs[1])
    return _ints(attrs["axes"]) if "axes" in attrs else None


def _squeeze(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    axes = _axes(inputs, attrs)
    return inputs[0].squeeze() if axes is None else inputs[0].squeeze(tuple(axes))


def _unsqueeze(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    axes = _axes(inputs, attrs) or []
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _reduce(fn: Callable[..., torch.Tensor]) -> Op:
    def run(inputs: list[Any], attrs: dict[str, Any]) -> Any:
        axes = _axes(inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return inputs[0]
            axes = list(range(inputs[0].dim()))
        return fn(inputs[0], dim=tuple(axes), keepdim=keep)

    return run


def _clip(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    return torch.clamp(inputs[0], min=low, max=high)


def _pad(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    pads = _ints(inputs[1]) if len(inputs) > 1 else _ints(attrs["pads"])
    value = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else float(attrs.get("value", 0.0))
    if len(inputs) > 3 and inputs[3] is not None:  # opset 18: pads for the listed axes only
        axes = [a % x.dim() for a in _ints(inputs[3])]
        full = [0] * (2 * x.dim())
        for i, axis in enumerate(axes):
            full[axis], full[axis + x.dim()] = pads[i], pads[i + len(axes)]
        pads = full
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(
        attrs.get("mode", "constant"), ""
    )
    if not mode:
        raise NotImplementedError(f"Pad mode {attrs.get('mode')}")
    dims = len(pads) // 2
    torch_pads: list[int] = []
    for b, e in zip(reversed(pads[:dims]), reversed(pads[dims:]), strict=True):
        torch_pads += [b, e]
    while torch_pads and torch_pads[-2:] == [0, 0]:  # leading dims unpadded: F.pad's reflect wants that
        torch_pads = torch_pads[:-2]
    return F.pad(x, torch_pads, mode=mode, value=value) if mode == "constant" else F.pad(x, torch_pads, mode=mode)


def _gather(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x, index = inputs[0], inputs[1].long()
    axis = int(attrs.get("axis", 0)) % x.dim()
    index = torch.where(index < 0, index + x.shape[axis], index)
    out = x.index_select(axis, index.reshape(-1))
    return out.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1 :])


def _slice(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    if len(inputs) == 1:  # opset < 10: starts, ends, axes are attributes
        inputs = [x, attrs["starts"], attrs["ends"], attrs.get("axes")]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 1:
            raise NotImplementedError("Slice with a negative step")
        size = x.shape[axis]
        index[axis % x.dim()] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
    return x[tuple(index)]


def _constant(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return torch.as_tensor(attrs[key])
    raise NotImplementedError("Constant without a value")


_ONNX_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16,
                11: torch.float64, 16: torch.bfloat16}  # fmt: skip


def _cast(inputs: list[Any], attrs: dict[str, Any]) -> Any:
    to = int(attrs["to"])
    if to not in _ONNX_DTYPES:
        raise NotImplementedError(f"Cast to ONNX type {to}")
    return inputs[0].to(_ONNX_DTYPES[to])


def _softmax(fn: Callable[..., torch.Tensor]) -> Op:
    def run(inputs: list[Any], attrs: dict[str, Any]) -> Any:
        x = inputs[0]
        if attrs[OPSET] >= 13:
            return fn(x, dim=int(attrs.get("axis", -1)))
        # opsets 1-12: the input is flattened to 2-D at ``axis`` (default 1) and normalised per row
        axis = int(attrs.get("axis", 1))
        axis = axis + x.dim() if axis < 0 else axis
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)

    return run


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Op:
    return lambda inputs, attrs: fn(inputs[0])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    return lambda inputs, attrs: fn(inputs[0], inputs[1])


OPSET = "__opset__"
"""Key under which every node's attributes carry the graph's opset (Softmax's meaning changed at 13)."""
MIN_OPSET = 9


class OnnxNodeError(Exception):
    """A node that redblue cannot evaluate as the graph uses it (an attribute it does not cover)."""


OPS: dict[str, Op] = {
    "Conv": _conv,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda i, a: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(lambda a, b: torch.div(a, b, rounding_mode="trunc")
                   if not (a.is_floating_point() or b.is_floating_point()) else torch.div(a, b)),
    "Pow": _binary(torch.pow),
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Softplus": _unary(F.softplus),
    "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Identity": _unary(lambda x: x),
    "Dropout": _unary(lambda x: x),  # inference: the identity
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], float(a.get("alpha", 0.01))),
    "Elu": lambda i, a: F.elu(i[0], float(a.get("alpha", 1.0))),
    "Gelu": lambda i, a: F.gelu(i[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none"),
    "HardSigmoid": lambda i, a: torch.clamp(float(a.get("alpha", 0.2)) * i[0] + float(a.get("beta", 0.5)), 0, 1),
    "HardSwish": _unary(F.hardswish),
    "Clip": _clip,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda i, a: i[0].permute(*(_ints(a["perm"]) if "perm" in a else reversed(range(i[0].dim())))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda i, a: torch.cat(list(i), dim=int(a["axis"])),
    "Shape": lambda i, a: torch.tensor(i[0].shape[slice(a.get("start", 0), a.get("end"))], dtype=torch.int64,
                                       device=i[0].device),
    "Gather": _gather,
    "Slice": _slice,
    "Cast": _cast,
    "Constant": _constant,
    "Pad": _pad,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
}
"""ONNX operator -> its evaluation on torch tensors (inputs in ONNX order, attributes by name)."""


class OnnxModule(nn.Module):
    """An ONNX graph evaluated with torch operators (see the module docstring)."""

    def __init__(self, graph: Any, initializers: dict[str, torch.Tensor], *, opset: int, where: str) -> None:
        super().__init__()
        from onnx import helper  # the optional dependency, needed only for ONNX files

        self._names: dict[str, str] = {}
        for i, (name, tensor) in enumerate(initializers.items()):
            key = f"init_{i}"
            self.register_buffer(key, tensor)
            self._names[name] = key
        self._nodes: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        for node in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            if node.op_type == "Constant" and "value" in attrs:
                from onnx import numpy_helper

                attrs["value"] = torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))
            attrs[OPSET] = opset
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        inputs = [i.name for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise IntegrityError(
                f"{where}: the graph has {len(inputs)} inputs and {len(graph.output)} outputs; expected an image classifier "
                "with one input (images) and one output (scores)"
            )
        self._input, self._output = inputs[0], graph.output[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {name: getattr(self, key) for name, key in self._names.items()}
        env[self._input] = x
        env[""] = None  # an omitted optional input
        for index, (op, inputs, outputs, attrs) in enumerate(self._nodes):
            try:
                result = OPS[op]([env[i] for i in inputs], attrs)
            except (NotImplementedError, KeyError, IndexError, TypeError) as exc:
                raise OnnxNodeError(f"node {index} ({op}, output {outputs[0]!r}): {exc}") from None
            for name, value in zip(outputs, result if isinstance(result, tuple) else (result,), strict=False):
                env[name] = value
        out: torch.Tensor = env[self._output]
        return out


def unsupported_ops(graph: Any) -> list[str]:
    """The graph's operators that :data:`OPS` does not cover (sorted, once each)."""
    return sorted({node.op_type for node in graph.node} - set(OPS))


def onnx_module(payload: bytes, where: str) -> tuple[OnnxModule, list[int | None]]:
    """(module, input shape with None for symbolic dims) of an ONNX model's bytes.

    IntegrityError naming ``where`` when the bytes are not a valid ONNX model, the graph
    uses an operator that is not covered, or is not a one-input one-output graph.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise IntegrityError(f"{where}: reading ONNX files needs the onnx package (pip install onnx onnxruntime)") from None
    try:
        model = onnx.load_from_string(payload)
        onnx.checker.check_model(model)
    except Exception as exc:  # the protobuf and checker errors have no common base class
        raise IntegrityError(f"{where}: not a valid ONNX model ({str(exc).strip().splitlines()[0][:200]})") from None
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise IntegrityError(f"{where}: ONNX opset {opset}; redblue reads opsets {MIN_OPSET} and later (export again)")
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise IntegrityError(
            f"{where}: weights stored in external data files ({external[0]}, …); save the model as one file "
            "(onnx.save(model, path, save_as_external_data=False))"
        )
    missing = unsupported_ops(graph)
    if missing:
        raise IntegrityError(
            f"{where}: ONNX operators not supported by redblue: {', '.join(missing)} (supported: {', '.join(sorted(OPS))})"
        )
    initializers = {t.name: torch.from_numpy(np.array(numpy_helper.to_array(t))) for t in graph.initializer}
    module = OnnxModule(graph, initializers, opset=opset, where=where)
    first = next(i for i in graph.input if i.name not in initializers)
    dims = first.type.tensor_type.shape.dim
    shape: list[int | None] = [int(d.dim_value) if d.HasField("dim_value") else None for d in dims]
    return module, shape


def shape_text(shape: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)
