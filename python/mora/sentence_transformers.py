"""sentence-transformers models whose transformer is borrowed from the daemon.

    import mora.sentence_transformers

    model = mora.sentence_transformers.SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    embeddings = model.encode(["A man is eating food."])

:func:`SentenceTransformer` is ``sentence_transformers.SentenceTransformer``
with the same arguments: the same modules (pooling, normalisation, dense
layers), the same tokenizer, the same embeddings, but the transformer
module's weights are the daemon's copy, built by
:func:`mora.transformers.from_pretrained` instead of read from disk. The
lease on its weights lasts as long as the model (or any tensor of it) lives;
``mora.release(model)`` ends it sooner. Other modules with weights of their own (a
``Dense`` layer) are read from disk as usual: they are small.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from . import Client, PathLike
from . import transformers as _tf

__all__ = ["SentenceTransformer"]

_lock = threading.Lock()


def SentenceTransformer(
    model_name_or_path: PathLike,
    *args: Any,
    client: Optional[Client] = None,
    socket: Optional[PathLike] = None,
    **kwargs: Any,
) -> Any:
    """``sentence_transformers.SentenceTransformer(model_name_or_path, *args,
    **kwargs)`` with its transformer module's weights borrowed from the
    daemon (through ``client``, else a connection of the model's own to
    ``socket``). Only the torch backend's plain models are borrowed; a PEFT
    adapter or another backend loads as sentence-transformers loads it."""
    import sentence_transformers
    from sentence_transformers.base.modules import transformer as st_transformer

    own = client is None
    if client is None:
        from . import connect

        client = connect(socket)
    cls = st_transformer.Transformer
    original = cls._load_model
    borrowed = []

    def load_model(self: Any, name: str, task: str, config: Any, backend: str, is_peft_model: bool, **model_kwargs: Any) -> Any:
        auto = st_transformer.TRANSFORMER_TASK_TO_AUTO_MODEL.get(task)
        if backend != "torch" or is_peft_model or auto is None or getattr(config, "is_encoder_decoder", False):
            return original(self, name, task, config, backend, is_peft_model, **model_kwargs)
        keep = {k: model_kwargs[k] for k in ("dtype", "torch_dtype", "subfolder", "variant", *_tf._HUB_KWARGS) if k in model_kwargs}
        model = _tf.from_pretrained(name, auto, client=client, config=config, **keep)
        borrowed.append(model)
        return model

    try:
        with _lock:  # the patch is the class's: one construction at a time
            cls._load_model = load_model
            try:
                st = sentence_transformers.SentenceTransformer(model_name_or_path, *args, **kwargs)
            finally:
                cls._load_model = original
    except BaseException:
        if own:
            client.close()
        raise
    st._mora = _tf._Borrowed(client, [sd for m in borrowed for sd in m._mora.state_dicts], own)
    return st
