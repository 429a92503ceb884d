"""ONNX ops of robaudit's own domain: torch ops that ONNX spells as several nodes, read as one.

torch's dynamo exporter writes some torch ops as small subgraphs around a comparison and
a Where: softplus (with its switch to x above a threshold), softshrink and threshold.
onnx2torch translates such a subgraph node by node, and the certificate refuses a Where
whose mask depends on the input, though the subgraph is one function it bounds exactly
(or refuses by name: a threshold that jumps). The loader
(`onnx_file._fuse_torch_patterns`) replaces the subgraph by one node of this domain
and adds the node's definition to the model as an ONNX function whose body is the
subgraph as written, so onnxruntime, which checks the translation (the whole network,
and node by node, `onnx_nodes.check_nodes`), runs exactly what the file runs, while
onnx2torch converts the node into the single torch module it stands for.
"""

from __future__ import annotations

import onnx
from onnx import helper
from torch import nn

TORCH_DOMAIN = "robaudit_torch"  # no dot: onnx2torch names its modules after the domain
SOFTPLUS = "Softplus"  # inputs x, beta, threshold (scalar constants); torch's nn.Softplus(beta, threshold)
SOFTSHRINK = "Softshrink"  # inputs x, lambd, zero; torch's nn.Softshrink(lambd)
THRESHOLD = "Threshold"  # inputs x, threshold, value; torch's nn.Threshold(threshold, value)


def _function(name: str, params: list[str], body: list[onnx.NodeProto], opset: int) -> onnx.FunctionProto:
    """This domain's op `name`, of x and its scalar `params`, defined by `body` at `opset` (output y)."""
    return helper.make_function(TORCH_DOMAIN, name, ["x", *params], ["y"], body, [helper.make_opsetid("", opset)])


def softplus_function(opset: int) -> onnx.FunctionProto:
    """torch's softplus, x where beta x > threshold else Softplus(beta x) / beta, as the dynamo exporter writes it."""
    body = [
        helper.make_node("Mul", ["x", "beta"], ["scaled"]),
        helper.make_node("Softplus", ["scaled"], ["smooth"]),
        helper.make_node("Div", ["smooth", "beta"], ["curve"]),
        helper.make_node("Greater", ["scaled", "threshold"], ["linear"]),
        helper.make_node("Where", ["linear", "x", "curve"], ["y"]),
    ]
    return _function(SOFTPLUS, ["beta", "threshold"], body, opset)


def softshrink_function(opset: int) -> onnx.FunctionProto:
    """torch's softshrink, x - sign(x) lambd where |x| > lambd else 0, as the dynamo exporter writes it."""
    body = [
        helper.make_node("Abs", ["x"], ["magnitude"]),
        helper.make_node("Greater", ["magnitude", "lambd"], ["outside"]),
        helper.make_node("Sign", ["x"], ["sign"]),
        helper.make_node("Mul", ["sign", "lambd"], ["step"]),
        helper.make_node("Sub", ["x", "step"], ["shrunk"]),
        helper.make_node("Mul", ["x", "zero"], ["zeroed"]),
        helper.make_node("Where", ["outside", "shrunk", "zeroed"], ["y"]),
    ]
    return _function(SOFTSHRINK, ["lambd", "zero"], body, opset)


def threshold_function(opset: int) -> onnx.FunctionProto:
    """torch's threshold, x where x > threshold else value, as the dynamo exporter writes it."""
    body = [
        helper.make_node("LessOrEqual", ["x", "threshold"], ["below"]),
        helper.make_node("Where", ["below", "value", "x"], ["y"]),
    ]
    return _function(THRESHOLD, ["threshold", "value"], body, max(opset, 12))  # LessOrEqual: opset 12


def function_at(name: str, opset: int) -> onnx.FunctionProto:
    """The definition of this domain's op `name`, its body at `opset` (its ops are the same at every opset robaudit uses)."""
    return {SOFTPLUS: softplus_function, SOFTSHRINK: softshrink_function, THRESHOLD: threshold_function}[name](opset)


_registered = False


def register_converters() -> None:
    """Teach onnx2torch this domain's ops (once per process)."""
    global _registered
    if _registered:
        return
    from onnx2torch.node_converters.registry import add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    modules = {
        SOFTPLUS: lambda beta, threshold: nn.Softplus(beta=beta, threshold=threshold),
        SOFTSHRINK: lambda lambd, zero: nn.Softshrink(lambd),
        THRESHOLD: lambda threshold, value: nn.Threshold(threshold, value),
    }
    for op, make in modules.items():

        def convert(node, graph, make=make) -> OperationConverterResult:  # type: ignore[no-untyped-def]
            params = (float(graph.initializers[name].to_torch()) for name in node.input_values[1:])
            return OperationConverterResult(
                torch_module=make(*params),
                onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
            )

        add_converter(operation_type=op, version=1, domain=TORCH_DOMAIN)(convert)

    _registered = True
