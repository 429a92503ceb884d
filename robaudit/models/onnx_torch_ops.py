"""ONNX ops of robaudit's own domain: torch ops that ONNX spells as several nodes, read as one.

torch's exporters write some torch ops as small subgraphs, among them a comparison and a
Where (softplus, with its switch to x above a threshold). onnx2torch translates such a
subgraph node by node, and the certificate refuses a Where whose mask depends on the
input, though the subgraph is one monotone function it bounds exactly. The loader
(`onnx_file._fuse_thresholded_softplus`) replaces the subgraph by one node of this domain
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


def softplus_function(opset: int) -> onnx.FunctionProto:
    """torch's softplus, x where beta x > threshold else Softplus(beta x) / beta, as the dynamo exporter writes it."""
    body = [
        helper.make_node("Mul", ["x", "beta"], ["scaled"]),
        helper.make_node("Softplus", ["scaled"], ["smooth"]),
        helper.make_node("Div", ["smooth", "beta"], ["curve"]),
        helper.make_node("Greater", ["scaled", "threshold"], ["linear"]),
        helper.make_node("Where", ["linear", "x", "curve"], ["y"]),
    ]
    return helper.make_function(
        TORCH_DOMAIN, SOFTPLUS, ["x", "beta", "threshold"], ["y"], body, [helper.make_opsetid("", opset)]
    )


def function_at(name: str, opset: int) -> onnx.FunctionProto:
    """The definition of this domain's op `name`, its body at `opset` (its ops are the same at every opset from 9 on)."""
    return {SOFTPLUS: softplus_function}[name](opset)


_registered = False


def register_converters() -> None:
    """Teach onnx2torch this domain's ops (once per process)."""
    global _registered
    if _registered:
        return
    from onnx2torch.node_converters.registry import add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    @add_converter(operation_type=SOFTPLUS, version=1, domain=TORCH_DOMAIN)
    def _softplus(node, graph) -> OperationConverterResult:  # type: ignore[no-untyped-def]
        beta, threshold = (float(graph.initializers[name].to_torch()) for name in node.input_values[1:3])
        return OperationConverterResult(
            torch_module=nn.Softplus(beta=beta, threshold=threshold),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    _registered = True
