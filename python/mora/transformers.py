"""transformers models whose weights are borrowed from the daemon.

    import mora.transformers

    model = mora.transformers.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    lm = mora.transformers.from_pretrained("./tiny-llama", auto_class="AutoModelForCausalLM")

:func:`from_pretrained` builds the model as transformers' own
``from_pretrained`` does (the same class, the same dtype rules, tied weights
tied, ``eval()`` mode, the generation config read), but its parameters view
the daemon's copy: no read of the weight files, no copy. The lease on its
weights lasts as long as the model, or any tensor of it, lives (it ends when
they are collected); ``mora.release(model)`` ends it sooner.

transformers' dtype rules, as ``from_pretrained`` applies them: with no
``dtype`` (or ``torch_dtype``), or ``"auto"``, the config's ``dtype`` if it
names one, else the checkpoint's stored float dtype; a ``torch.dtype`` or its
name otherwise. Modules the class keeps in float32 (``_keep_in_fp32_modules``
for float16, ``_keep_in_fp32_modules_strict`` for float16 and bfloat16) get
float32 weights. The daemon holds float32, float16 and bfloat16 copies.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import Client, PathLike, StateDict
from ._modules import init_empty_weights, load_state_dict
from .errors import InvalidArgument, ModelNotFound

__all__ = ["from_pretrained"]

# safetensors' dtype names -> torch's, for the floats the daemon can hold.
_STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


class _Borrowed:
    """What a borrowed model was built from, as ``model._mora``: the client
    it borrowed through and the state dicts lent (each lease lasts while any
    tensor of its state dict lives; :func:`mora.release` empties them)."""

    def __init__(self, client: Client, state_dicts: List[StateDict], own_client: bool) -> None:
        self.client = client
        self.state_dicts = state_dicts
        self.own_client = own_client

    def __repr__(self) -> str:
        names = ", ".join(f"{sd.name} ({sd.dtype})" for sd in self.state_dicts)
        return f"<mora weights of {names} through {self.client!r}>"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def local_dir(model: PathLike, subfolder: Optional[str] = None, filename: str = "config.json", **hub: Any) -> Path:
    """The local folder of ``model`` (a directory, or a repo id in the hub
    cache, where ``filename`` is looked up as transformers would look it up),
    with ``subfolder`` appended."""
    name = os.fspath(model)
    if os.path.isdir(name):
        root = Path(name)
        folder = root / subfolder if subfolder else root
        if not folder.is_dir():
            raise ModelNotFound(f"{root} has no folder `{subfolder}`: give the subfolder of a component that exists")
        return folder
    if _looks_like_path(name):
        raise ModelNotFound(f"no such directory: {name}: give the path of a model directory, or a Hugging Face repo id")
    repo, _, rev = name.partition("@")
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in hub.items() if k in _HUB_KWARGS and v is not None}
    if rev:
        kwargs["revision"] = rev
    try:
        path = hf_hub_download(repo, filename, subfolder=subfolder or None, **kwargs)
    except Exception as e:  # huggingface_hub's offline, not-found and validation errors
        raise ModelNotFound(f"`{name}` has no {filename}{f' in `{subfolder}`' if subfolder else ''} in the Hugging Face cache: {type(e).__name__}") from e
    return Path(path).parent


def stored_dtype(folder: Path, variant: Optional[str] = None) -> Optional[str]:
    """The checkpoint's first float dtype (transformers' ``get_state_dict_dtype``),
    read from the safetensors header alone; None when there is no float."""
    stems = ["model", "diffusion_pytorch_model"]
    files: List[Path] = []
    for stem in stems:
        name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
        if (folder / name).is_file():
            files.append(folder / name)
        index = folder / (f"{stem}.safetensors.index.{variant}.json" if variant else f"{stem}.safetensors.index.json")
        if not files and index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files.extend(folder / s for s in shards[:1])
        if files:
            break
    if not files:
        return None
    with open(files[0], "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    for key in sorted(k for k in header if k != "__metadata__"):
        dt = header[key]["dtype"]
        if dt in _STORED:
            return _STORED[dt]
        if dt in ("F64",):
            raise InvalidArgument(f"{files[0]} stores float64 weights: the daemon holds float32, float16 or bfloat16; pass dtype=")
    return None


def _keep_fp32(patterns: List[str], name: str) -> bool:
    return any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", name) for p in patterns)


def borrow(
    client: Client,
    model: PathLike,
    dtype: Any,
    *,
    subfolder: Optional[str] = None,
    variant: Optional[str] = None,
    device: Any = "cpu",
    keep_fp32: Optional[List[str]] = None,
) -> Tuple[Dict[str, Any], List[StateDict]]:
    """The state dict of ``model`` in ``dtype`` from the daemon, with the
    tensors of ``keep_fp32`` modules taken from its float32 entry."""
    import torch

    sd = client.state_dict(model, dtype=dtype, device=device, subfolder=subfolder, variant=variant)
    lent = [sd]
    if keep_fp32 and dtype != torch.float32:
        names = [n for n in sd if _keep_fp32(keep_fp32, n)]
        if names:
            full = client.state_dict(model, dtype=torch.float32, device=device, subfolder=subfolder, variant=variant)
            lent.append(full)
            mixed = dict(sd)
            mixed.update((n, full[n]) for n in names)
            return mixed, lent
    return sd, lent


def torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise InvalidArgument(f"unknown dtype `{dtype}`: expected a torch dtype, its name, or \"auto\"")


def _main_dtype(dtype: Any, config: Any, folder: Path, variant: Optional[str]) -> Any:
    """transformers 5's ``_get_dtype``: the dtype the model is built in."""
    import torch

    if isinstance(dtype, dict):
        dtype = dtype.get("", torch.get_default_dtype())
    if dtype is None or dtype == "auto":
        found = getattr(config, "dtype", None)
        if found is None:
            found = stored_dtype(folder, variant) or torch.get_default_dtype()
        dtype = found
    return torch_dtype(dtype)


def _fit_prefix(model: Any, sd: Dict[str, Any]) -> Dict[str, Any]:
    """Renames a checkpoint saved with (or without) the base model's prefix
    to the model's own names, as transformers does (``bert.`` for a model
    with a head read from a base checkpoint and the reverse). No tensor is
    copied."""
    want = set(model.state_dict())
    if not sd or want & set(sd):
        return sd
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return sd
    added = {f"{prefix}.{k}": v for k, v in sd.items()}
    if want & set(added):
        return added
    dropped = {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    return dropped if want & set(dropped) else sd


def build(
    cls: Any,
    client: Client,
    model: PathLike,
    folder: Path,
    *,
    subfolder: Optional[str] = None,
    dtype: Any = None,
    variant: Optional[str] = None,
    device: Any = "cpu",
    config: Any = None,
    name_or_path: Optional[str] = None,
    own_client: bool = False,
    config_kwargs: Optional[Dict[str, Any]] = None,
) -> Any:
    """A transformers model of class ``cls`` (a model class, or an Auto class)
    over the daemon's copy of ``model`` (``subfolder``), built as its
    ``from_pretrained`` builds it."""
    import torch

    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), **(config_kwargs or {}))
    main = _main_dtype(dtype, config, folder, variant)
    if hasattr(cls, "_model_mapping"):  # an Auto class: the concrete class for this config
        from transformers.models.auto.auto_factory import _get_model_class

        cls = _get_model_class(config, cls._model_mapping)
    keep: List[str] = []
    if main == torch.float16:
        keep += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    if main in (torch.float16, torch.bfloat16):
        keep += list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    sd, lent = borrow(client, model, main, subfolder=subfolder, variant=variant, device=device, keep_fp32=keep)
    with init_empty_weights():
        m = cls._from_config(config, dtype=main)
    load_state_dict(m, _fit_prefix(m, sd), strict=False)
    if str(device) != "cpu":
        m.to(device)  # the buffers; the lent parameters are there already
    m.eval()
    m.config.name_or_path = name_or_path if name_or_path is not None else os.fspath(model)
    if m.can_generate() and (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        m.generation_config = GenerationConfig.from_pretrained(str(folder))
    m._mora = _Borrowed(client, lent, own_client)
    return m


def from_pretrained(
    repo_or_path: PathLike,
    auto_class: Any = "AutoModel",
    *,
    client: Optional[Client] = None,
    socket: Optional[PathLike] = None,
    device: Any = "cpu",
    **kwargs: Any,
) -> Any:
    """``transformers.<auto_class>.from_pretrained(repo_or_path, **kwargs)``,
    with the weights borrowed from the daemon.

    ``auto_class``: an Auto class or its name (``"AutoModel"``,
    ``"AutoModelForCausalLM"``, ...), or a model class. ``kwargs``:
    ``dtype`` (or ``torch_dtype``), ``subfolder``, ``variant``, ``revision``,
    ``config``, and the config overrides transformers takes. ``client``: a
    :class:`mora.Client` to borrow through (default: a connection of the
    model's own, to ``socket``). ``device``: ``"cpu"`` or ``"cuda:N"``.
    The lease on its weights lasts while the model (or any tensor of it)
    lives; ``mora.release(model)`` ends it sooner.
    """
    import transformers

    cls = getattr(transformers, auto_class) if isinstance(auto_class, str) else auto_class
    dtype = kwargs.pop("dtype", None)
    td = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else td
    subfolder = kwargs.pop("subfolder", None) or None
    variant = kwargs.pop("variant", None)
    config = kwargs.pop("config", None)
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    folder = local_dir(repo_or_path, subfolder, "config.json", **hub)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), **kwargs)
    elif kwargs:
        raise InvalidArgument(f"unexpected arguments with config=: {', '.join(sorted(kwargs))}")
    own = client is None
    if client is None:
        from . import connect

        client = connect(socket)
    name = os.fspath(repo_or_path)
    if "@" in name and not os.path.isdir(name) and hub.get("revision"):
        raise InvalidArgument("give the revision once: as OWNER/NAME@REVISION or revision=")
    model = f"{name}@{hub['revision']}" if hub.get("revision") and "@" not in name and not os.path.isdir(name) else name
    try:
        return build(
            cls, client, model, folder, subfolder=subfolder, dtype=dtype, variant=variant, device=device,
            config=config, name_or_path=name, own_client=own,
        )
    except BaseException:
        if own:
            client.close()
        raise
