"""Block outputs read with forward hooks during a forward pass: no backbone code changes, and the penultimate
features come from the same pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

from lightning_ood.errors import ConfigError


def unknown_blocks(
    names: Iterable[str], blocks: Mapping[str, nn.Module], modules: Mapping[str, nn.Module]
) -> list[str]:
    """The names that :func:`block_outputs` cannot capture: neither a block (``backbone.blocks()``) nor a submodule
    (``"<module>"`` or ``"<module>:input"`` of ``dict(backbone.named_modules())``)."""
    return [n for n in names if n not in blocks and n.removesuffix(":input") not in modules]


@contextmanager
def block_outputs(backbone: nn.Module, names: Iterable[str], copy: bool = True):
    """Capture, during forward passes in the ``with`` body, the outputs of the named blocks (``backbone.blocks()``)
    or submodules (``backbone.named_modules()``; ``"<module>:input"`` captures a module's input instead).

    Yields a dict that maps each name to the tensor of its latest call. Submodule outputs and inputs are copied,
    since the network may change them in place afterwards (torchvision's ``out += identity``); ``copy=False`` keeps
    the tensors the network goes on with, so that gradients can be taken with respect to them (NAC); only for
    outputs that the network does not change in place afterwards (the stage outputs, ``backbone.stages()``).
    """
    names = list(dict.fromkeys(names))
    if not names:  # nothing to capture: no hooks, no cost
        yield {}
        return
    blocks = backbone.blocks()
    modules = dict(backbone.named_modules())
    unknown = unknown_blocks(names, blocks, modules)
    if unknown:
        raise ConfigError(f"Unknown block(s) {unknown} of {type(backbone).__name__}. Blocks: {', '.join(blocks)}.")
    captured: dict[str, Tensor] = {}

    def store_output(name: str, copy: bool) -> Callable:
        def hook(module, inputs, output) -> None:
            output = output[0] if isinstance(output, tuple) else output
            captured[name] = output.clone() if copy else output

        return hook

    def store_input(name: str) -> Callable:
        def hook(module, inputs) -> None:
            captured[name] = inputs[0].clone() if copy else inputs[0]

        return hook

    handles = []
    for name in names:
        if name in blocks:
            handles.append(blocks[name].register_forward_hook(store_output(name, copy=False)))
        elif name.endswith(":input"):
            handles.append(modules[name.removesuffix(":input")].register_forward_pre_hook(store_input(name)))
        else:
            handles.append(modules[name].register_forward_hook(store_output(name, copy=copy)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
