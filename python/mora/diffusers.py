"""diffusers pipelines and models whose weights are borrowed from the daemon.

    import mora.diffusers

    pipe = mora.diffusers.from_pretrained("stabilityai/sd-turbo", torch_dtype=torch.float16)
    unet = mora.diffusers.from_pretrained("stabilityai/sd-turbo", subfolder="unet")

:func:`from_pretrained` returns what ``DiffusionPipeline.from_pretrained``
returns for the same arguments (the pipeline class ``model_index.json``
names, its scheduler, tokenizers and any component given as a keyword
argument), except that every component with weights (text encoders, UNet,
VAE: diffusers and transformers models) views the daemon's copy: no read of
the weight files, no copy. These are the cache entries ``mora-exec`` image
steps use (``client.state_dict(repo, subfolder=..., dtype=...)``).

dtypes are diffusers': ``torch_dtype`` (a dtype, or a dict by component
name with a ``"default"``) for every model; with none, diffusers models in
float32 and transformers models by transformers' rule (the config's
``dtype``, else the checkpoint's). ``variant`` applies to the components
that have weight files of that variant, as in diffusers.

The leases on the weights last as long as the pipeline, a component of it,
or any tensor of one lives (they end when those are collected);
``mora.release(pipe)`` ends them sooner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import Client, PathLike
from . import transformers as _tf
from ._modules import init_empty_weights, load_state_dict
from .errors import InvalidArgument, ModelNotFound

__all__ = ["from_pretrained"]


def _default_dtype(dtype: Any) -> Any:
    """``torch.set_default_dtype`` for the block (diffusers builds a model
    under its ``torch_dtype``, so buffers get it too)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def block():
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)

    return block() if dtype is not None and dtype.is_floating_point else contextlib.nullcontext()


def _diffusers_model(
    cls: Any,
    client: Client,
    model: str,
    folder: Path,
    *,
    subfolder: Optional[str],
    dtype: Any,
    variant: Optional[str],
    device: Any,
    name_or_path: Any,
    own_client: bool,
) -> Any:
    """``cls.from_pretrained(model, subfolder=, torch_dtype=, variant=)`` over the daemon's copy."""
    import torch

    if dtype is not None and not isinstance(dtype, torch.dtype):
        dtype = torch.float32  # as diffusers, which warns
    main = dtype if dtype is not None else torch.get_default_dtype()
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    keep = [keep] if isinstance(keep, str) else list(keep)
    sd, lent = _tf.borrow(
        client, model, main, subfolder=subfolder, variant=variant, device=device, keep_fp32=keep if dtype is not None else None
    )
    config = cls.load_config(str(folder))
    with init_empty_weights(), _default_dtype(dtype):
        m = cls.from_config(config)
    sd = dict(sd)  # diffusers renames old attention keys in place; the lent dict stays as lent
    fix = getattr(m, "_fix_state_dict_keys_on_load", None)
    if fix is not None:
        fix(sd)
    load_state_dict(m, sd)
    if str(device) != "cpu":
        m.to(device)  # the buffers; the lent parameters are there already
    m.register_to_config(_name_or_path=name_or_path)
    m.eval()
    m._mora = _tf._Borrowed(client, lent, own_client)
    return m


def _component(
    library: str,
    class_name: str,
    client: Client,
    model: str,
    folder: Path,
    *,
    subfolder: Optional[str],
    dtype: Any,
    variant: Optional[str],
    device: Any,
    name_or_path: Any,
    own_client: bool = False,
) -> Any:
    import importlib

    import diffusers

    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise InvalidArgument(f"{folder}: `{library}` has no class `{class_name}` (named in its config)")
    if issubclass(cls, diffusers.ModelMixin):
        return _diffusers_model(
            cls, client, model, folder, subfolder=subfolder, dtype=dtype, variant=variant, device=device,
            name_or_path=name_or_path, own_client=own_client,
        )
    return _tf.build(
        cls, client, model, folder, subfolder=subfolder, dtype=dtype, variant=variant, device=device,
        name_or_path=str(folder), own_client=own_client,
    )


def _has_weights(library: str, class_name: str) -> bool:
    """A torch model diffusers loads with from_pretrained (not a scheduler,
    tokenizer or feature extractor)."""
    import importlib

    import torch

    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and hasattr(cls, "from_pretrained")


def _has_variant(folder: Path, variant: str) -> bool:
    """diffusers' ``_identify_model_variants``: a file of ``folder`` carries ``variant``."""
    return folder.is_dir() and any(len(p.split(".")) > 1 and p.split(".")[1].startswith(variant) for p in os.listdir(folder))


def from_pretrained(
    repo_or_path: PathLike,
    *,
    client: Optional[Client] = None,
    socket: Optional[PathLike] = None,
    device: Any = "cpu",
    **kwargs: Any,
) -> Any:
    """``DiffusionPipeline.from_pretrained(repo_or_path, **kwargs)``, with
    every component that has weights borrowed from the daemon; with
    ``subfolder=``, the one model there (``subfolder="unet"``: the
    ``UNet2DConditionModel``), as ``<ModelClass>.from_pretrained``.

    ``kwargs`` are diffusers': ``torch_dtype`` (or ``dtype``), ``variant``,
    ``revision``, component overrides (``scheduler=...``,
    ``safety_checker=None``), and the rest, passed on. ``client``: a
    :class:`mora.Client` to borrow through (default: a connection of the
    pipeline's own, to ``socket``). ``device``: ``"cpu"`` or ``"cuda:N"``.
    """
    import torch

    name = os.fspath(repo_or_path)
    dtype_key = "dtype" if kwargs.get("dtype") is not None else "torch_dtype"
    dtype = kwargs.pop("dtype", None)
    td = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else td
    variant = kwargs.get("variant")
    subfolder = kwargs.pop("subfolder", None) or None
    hub = {k: kwargs[k] for k in _tf._HUB_KWARGS if k in kwargs}
    own = client is None
    if subfolder is not None:
        folder = _tf.local_dir(name, subfolder, "config.json", **hub)
        config = json.loads((folder / "config.json").read_text())
        if "_class_name" in config:
            library, class_name = "diffusers", config["_class_name"]
        elif config.get("architectures"):
            library, class_name = "transformers", config["architectures"][0]
        else:
            raise InvalidArgument(f"{folder}/config.json names no class (`_class_name` or `architectures`): not a diffusers or transformers model")
        extra = sorted(set(kwargs) - {"variant", *hub})
        if extra:
            raise InvalidArgument(f"unexpected arguments for one model (subfolder=): {', '.join(extra)}")
        if client is None:
            from . import connect

            client = connect(socket)
        try:
            return _component(
                library, class_name, client, name, folder, subfolder=subfolder, dtype=dtype, variant=variant,
                device=device, name_or_path=repo_or_path, own_client=own,
            )
        except BaseException:
            if own:
                client.close()
            raise

    import diffusers

    root = _tf.local_dir(name, None, "model_index.json", **hub)
    if not (root / "model_index.json").is_file():
        parts = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        raise ModelNotFound(
            f"{root} has no model_index.json: not a diffusers pipeline"
            + (f"; for one model give subfolder= ({', '.join(parts)})" if parts else "")
        )
    index = json.loads((root / "model_index.json").read_text())
    if client is None:
        from . import connect

        client = connect(socket)
    borrowed: Dict[str, Any] = {}
    try:
        for comp, spec in index.items():
            if comp.startswith("_") or comp in kwargs or not isinstance(spec, list) or len(spec) != 2 or None in spec:
                continue
            library, class_name = spec
            if not _has_weights(library, class_name):
                continue
            want = dtype.get(comp, dtype.get("default", torch.float32)) if isinstance(dtype, dict) else dtype
            comp_variant = variant if variant and _has_variant(root / comp, variant) else None
            borrowed[comp] = _component(
                library, class_name, client, name, root / comp, subfolder=comp, dtype=want, variant=comp_variant,
                device=device, name_or_path=str(root / comp),
            )
        if dtype is not None:
            kwargs[dtype_key] = dtype
        # diffusers reads OWNER/NAME@REVISION as no repo id: give it the snapshot folder then.
        where = str(root) if "@" in name and not os.path.isdir(name) else name
        pipe = diffusers.DiffusionPipeline.from_pretrained(where, **kwargs, **borrowed)
    except BaseException:
        if own:
            client.close()
        raise
    lent: List[Any] = [sd for m in borrowed.values() for sd in m._mora.state_dicts]
    pipe._mora = _tf._Borrowed(client, lent, own)
    return pipe
