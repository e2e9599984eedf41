"""Where ONNX Runtime placed a session's nodes, as ONNX Runtime itself records it, and the rule a
CUDA session must meet.

With the session option ``session.record_ep_graph_assignment_info`` on, ONNX Runtime records the
provider of every node it runs (``InferenceSession.get_provider_graph_assignment_info``): the
nodes after its graph optimizations, with the tables' function bodies inlined, so a compressed
table shows as the ops of its body. Memory copies between host and device that ONNX Runtime adds
(``MemcpyFromHost``, ``MemcpyToHost``) are nodes too. On a CPU session every node is on CPU.

The rule on CUDA: the embedding lookups (the nodes the exporter names ``lookup``:
``ctrserve.export.package.LOOKUP_NODE``) and the MLPs and interaction (``Gemm``, ``MatMul`` and
their fused forms) run on the GPU. ONNX Runtime places small shape computations (``Shape`` ->
``Gather``/``Concat``/``Range``) on CPU on purpose, beside kernels that read shapes from host
memory: those may stay there, so "no node on CPU" would be the wrong rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnxruntime as ort

from ctrserve.export.package import LOOKUP_NODE

#: The session option that makes ONNX Runtime record each node's provider.
RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
#: The MLPs' and the interaction's op types, ONNX Runtime's fusions included.
MLP_OPS = frozenset({"Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


@dataclass(frozen=True)
class PlacedNode:
    provider: str
    op_type: str
    name: str

    @property
    def hot(self) -> bool:
        """Whether the GPU rule covers the node: an embedding lookup or an MLP node."""
        return LOOKUP_NODE in self.name or self.op_type in MLP_OPS


@dataclass(frozen=True)
class Placement:
    """The nodes of one session with their providers, in ONNX Runtime's order of providers."""

    nodes: tuple[PlacedNode, ...]

    @classmethod
    def of(cls, session: ort.InferenceSession) -> Placement:
        """The session's placement (created with ``RECORD_ASSIGNMENT`` on)."""
        return cls(tuple(PlacedNode(subgraph.ep_name, node.op_type, node.name)
                         for subgraph in session.get_provider_graph_assignment_info()
                         for node in subgraph.get_nodes()))

    def op_types(self) -> dict[str, dict[str, int]]:
        """Node counts by op type, by provider (op types most frequent first)."""
        providers = dict.fromkeys(node.provider for node in self.nodes)
        return {provider: dict(Counter(node.op_type for node in self.nodes
                                       if node.provider == provider).most_common())
                for provider in providers}

    def lookups(self) -> int:
        return sum(LOOKUP_NODE in node.name for node in self.nodes)

    def hot_nodes_off(self, provider: str) -> list[PlacedNode]:
        """The lookups and MLP nodes not placed on ``provider``."""
        return [node for node in self.nodes if node.hot and node.provider != provider]

    def to_dict(self) -> dict[str, dict]:
        """``{provider: {"nodes": count, "op_types": {op type: count}}}``: the model metadata's
        form."""
        return {provider: {"nodes": sum(counts.values()), "op_types": counts}
                for provider, counts in self.op_types().items()}

    def summary(self) -> str:
        """One line: each provider's node count and op types."""
        return "; ".join(
            f"{provider} {sum(counts.values())} nodes ("
            + ", ".join(f"{op} {count}" for op, count in counts.items()) + ")"
            for provider, counts in self.op_types().items())


def describe(placement: dict[str, dict]) -> str:
    """A placement in its metadata form (``Placement.to_dict``), one provider a line."""
    return "\n".join(
        f"{provider}: {entry['nodes']} nodes: "
        + ", ".join(f"{op} {count}" for op, count in entry["op_types"].items())
        for provider, entry in placement.items())
