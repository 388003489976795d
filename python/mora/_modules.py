"""Building a torch module without weights, then giving it Mora's.

A module fed from the daemon should not allocate and initialise weights that
the daemon's tensors then replace. ``torch.device("meta")`` avoids that, but
it also puts the module's buffers on meta, and non-persistent buffers (a CLIP
text model's ``position_ids``, rotary tables, attention masks) are in no
state dict: ``load_state_dict(..., assign=True)`` leaves them on meta without
a word, and the model then computes on memory nobody wrote.
:func:`init_empty_weights` puts only the parameters on meta, as accelerate's
``init_empty_weights()`` does by default (without depending on accelerate);
:func:`load_state_dict` assigns the state dict and refuses to return a module
with any tensor left on meta.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping, Optional

from .errors import MetaTensorsLeft

# torch.nn.Module.register_parameter is patched while any init_empty_weights()
# block is open, in any thread; the patch acts only in the threads inside one.
_lock = threading.Lock()
_local = threading.local()
_open_blocks = 0
_original: Optional[Callable[..., None]] = None


def _register_parameter_on_meta(module: Any, name: str, param: Any) -> None:
    assert _original is not None
    _original(module, name, param)
    if param is None or not getattr(_local, "depth", 0):
        return
    import torch

    p = module._parameters[name]
    if p.is_meta or isinstance(p, torch.nn.parameter.UninitializedParameter):
        return
    meta = type(p)(p.detach().to("meta"), requires_grad=p.requires_grad)
    meta.__dict__.update(p.__dict__)
    module._parameters[name] = meta


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Modules built in this block get their parameters on the ``meta``
    device (a shape, no memory, no initialisation) and their buffers real,
    on the default device.

    Use it instead of ``torch.device("meta")`` to build a module that
    :func:`load_state_dict` then fills from the daemon: buffers a state dict
    does not carry keep the values the module's constructor gave them. It is
    accelerate's ``init_empty_weights()`` (``include_buffers=False``), without
    accelerate. Each parameter is created as its module says and moved to
    meta as it is registered, so at most one parameter at a time takes
    memory. It affects only the threads inside a block; blocks nest.

        with mora.init_empty_weights():
            unet = UNet2DConditionModel.from_config(config)
        mora.load_state_dict(unet, client.state_dict(repo, subfolder="unet"))
    """
    import torch

    global _open_blocks, _original
    with _lock:
        if _open_blocks == 0:
            _original = torch.nn.Module.register_parameter
            torch.nn.Module.register_parameter = _register_parameter_on_meta  # type: ignore[method-assign]
        _open_blocks += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _lock:
            _open_blocks -= 1
            if _open_blocks == 0:
                # Leave a later patch (someone else's) in place: ours is inert outside a block.
                if torch.nn.Module.register_parameter is _register_parameter_on_meta:
                    torch.nn.Module.register_parameter = _original  # type: ignore[method-assign]


_SHOWN = 5


def load_state_dict(module: Any, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """Makes ``state_dict``'s tensors ``module``'s own, without a copy, and
    returns ``module``, never one that still has a tensor on ``meta``.

    It is ``module.load_state_dict(state_dict, strict=strict, assign=True)``
    (torch 2.1 or later): the parameters become the given tensors, so a
    module built under :func:`init_empty_weights` views the daemon's pages.
    Then, as ``from_pretrained`` does, ``module.tie_weights()`` is called
    where the module has one (transformers models): ``assign=True`` replaces
    the parameter a tie shared, and a tied weight absent from the checkpoint
    would otherwise keep the old one. Last, every parameter and buffer is
    checked: one still on ``meta`` has no data (a module built under
    ``torch.device("meta")`` whose buffers no state dict carries, or a
    parameter the state dict lacks with ``strict=False``), and raises
    :class:`~mora.errors.MetaTensorsLeft` naming it, instead of letting the
    model compute on memory nobody wrote.
    """
    module.load_state_dict(state_dict, strict=strict, assign=True)
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    params = [n for n, t in module.named_parameters(remove_duplicate=False) if t.is_meta]
    buffers = [n for n, t in module.named_buffers(remove_duplicate=False) if t.is_meta]
    if not params and not buffers:
        return module
    names = buffers + params
    shown = [f"{n} (buffer)" for n in buffers[:_SHOWN]] + [f"{n} (parameter)" for n in params[: max(0, _SHOWN - len(buffers))]]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    todo = []
    if buffers:
        todo.append(
            "these buffers are not in the state dict: build the module under mora.init_empty_weights(), "
            "not torch.device(\"meta\"), so they keep their constructed values"
        )
    if params:
        todo.append("the state dict lacks these parameters: load the checkpoint (or subfolder) this module's config belongs to")
    count = f"{len(names)} tensors of {type(module).__name__} are" if len(names) > 1 else f"1 tensor of {type(module).__name__} is"
    raise MetaTensorsLeft(
        f"{count} still on the meta device (no data) after load_state_dict: {', '.join(shown)}{more}; {'; '.join(todo)}",
        names,
    )
