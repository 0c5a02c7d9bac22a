"""What TensorRT's ONNX parser does with our samba.* nodes, checked before it runs.

    keys = parser_keys(proto, rule="10.3")      # [(node, (name, version, namespace))] as that parser looks up
    check_lookup(proto, registry_has, version)  # every plugin node found under its parser's rule, else SambaEdgeError
    mark_plugin_nodes(proto, kernels=KEY)       # the attributes `samba-edge build` puts on the nodes it parses

Why a model of the parser: TensorRT-RTX (our CPU build check) ships a newer onnx-tensorrt than the
TensorRT our users have. The fallback plugin importer of onnx-tensorrt before 10.10 (JetPack 6 =
TensorRT 10.3) takes the plugin name from op_type, the version from the `plugin_version` attribute
(default "1") and the namespace from the `plugin_namespace` attribute only (default ""); from 10.10
on a missing attribute falls back to the node's domain. A graph that builds on TensorRT-RTX can
therefore still fail with "Plugin not found" on an Orin; these rules make that a CPU-side check.
onnx-only: no TensorRT needed.
"""
from __future__ import annotations

from typing import Callable, Optional

from samba_edge.plugins.errors import SambaEdgeError

DOMAIN = "samba"
RULES = ("10.3", "10.10")           # before / from the release that reads the node's domain


def rule_for(version: str) -> str:
    """The lookup rule of a TensorRT version string ("10.3.0.30" -> "10.3")."""
    try:
        major, minor = (int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return "10.10"
    return "10.3" if (major, minor) < (10, 10) else "10.10"


def _attr(node, name: str) -> Optional[str]:
    for a in node.attribute:
        if a.name == name:
            return a.s.decode() if a.type == a.STRING else None
    return None


def parser_keys(proto, rule: str) -> list[tuple[object, tuple[str, str, str]]]:
    """(node, (plugin name, version, namespace)) for every samba.* node, as the parser of `rule` reads them."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}")
    out = []
    for node in proto.graph.node:
        if node.domain != DOMAIN:
            continue
        ns = _attr(node, "plugin_namespace")
        if ns is None:
            ns = "" if rule == "10.3" else node.domain
        out.append((node, (node.op_type, _attr(node, "plugin_version") or "1", ns)))
    return out


def check_lookup(proto, has_creator: Callable[[str, str, str], bool], version: str) -> None:
    """Every plugin node must resolve to a registered creator under the 10.3 rule AND under the rule of
    `version` (the TensorRT at hand): a graph that only the newer parsers accept is refused here."""
    for rule in sorted({"10.3", rule_for(version)}):
        for node, key in parser_keys(proto, rule):
            if not has_creator(*key):
                name, ver, ns = key
                raise SambaEdgeError(
                    f"node {node.name or node.op_type}: TensorRT {rule}'s ONNX parser would look up plugin "
                    f"{name!r} version {ver!r} in namespace {ns!r} and find none; re-export the artifact with "
                    "this samba-edge (its plugin nodes carry plugin_namespace=\"samba\")")


def mark_plugin_nodes(proto, kernels: Optional[str] = None, aot: bool = False) -> None:
    """In place: plugin_namespace on every samba.* node (for artifacts exported before it was written),
    the kernels key (trt_launch.KernelSet.key) the plugins launch, and `aot=1` for the aot_impl route."""
    import onnx

    for node in proto.graph.node:
        if node.domain != DOMAIN:
            continue
        have = {a.name for a in node.attribute}
        extra = {"plugin_namespace": DOMAIN} if "plugin_namespace" not in have else {}
        if kernels is not None:
            extra["kernels"] = kernels
        if aot:
            extra["aot"] = 1
        for a in [a for a in node.attribute if a.name in extra]:
            node.attribute.remove(a)
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in extra.items())
