"""mora.diffusers.from_pretrained against diffusers' own from_pretrained on
the committed tiny pipelines (tests/fixtures/image/pipelines: SD 1.5, SD 2.1,
SDXL): the same pipeline class and components, the same dtypes, the weights
borrowed (no copy), and the same images for the same generator, bit for bit
on the CPU. Skipped, with the reason, where diffusers is missing."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest

import mora

# Without torch this module holds no tests: test_torch.py reports that skip
# once for all of them.
__test__ = importlib.util.find_spec("torch") is not None
if __test__:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    pytest.importorskip("transformers", reason="transformers is not installed")
    import mora.diffusers

PIPELINES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "image" / "pipelines"
WEIGHTED = ("text_encoder", "text_encoder_2", "unet", "vae")


def aligned(pipe):
    """``pipe`` with every parameter at a 64-byte aligned address.

    transformers 5 leaves the weights it reads in the file's mapping, at the
    file's offsets; torch's CPU matmul then takes another path for an
    unaligned weight, whose sums differ in the last bit. The daemon's tensors
    are aligned, as torch's own allocations are: a reference with its
    weights in torch's memory computes as they do."""
    for name in WEIGHTED:
        module = getattr(pipe, name, None)
        for p in module.parameters() if module is not None else ():
            if p.data_ptr() % 64:
                p.data = p.data.clone()
    return pipe


def image(pipe, seed=0):
    return pipe(
        prompt="a cat on a mat", num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_a_pipeline_borrowed_from_the_daemon_makes_diffusers_images_bit_for_bit(daemon, name):
    path = PIPELINES / name
    pipe = mora.diffusers.from_pretrained(path, socket=daemon.socket)
    ref = diffusers.DiffusionPipeline.from_pretrained(path)
    assert type(pipe) is type(ref)
    assert pipe.components.keys() == ref.components.keys()
    lent = {sd.name: sd for sd in pipe._mora.state_dicts}
    for comp in WEIGHTED:
        got, want = getattr(pipe, comp, None), getattr(ref, comp, None)
        if want is None:
            continue
        assert type(got) is type(want) and got.dtype == want.dtype, comp
        sd = lent[str(path / comp)]
        first, tensor = next(iter(sd.items()))
        # The component's parameters are the daemon's pages (no copy).
        assert any(p.data_ptr() == tensor.data_ptr() for p in got.parameters()), (comp, first)
        for key, t in want.state_dict().items():
            assert torch.equal(got.state_dict()[key], t), (comp, key)
    assert type(pipe.scheduler) is type(ref.scheduler) and pipe.scheduler.config == ref.scheduler.config
    assert (image(pipe) == image(aligned(ref))).all()
    with mora.connect(daemon.socket) as client:
        assert {m["name"] for m in client.ps() if m["leases"]} >= set(lent)


def test_dtypes_and_overrides_are_diffusers_own(daemon):
    path = PIPELINES / "sd15"
    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    args = dict(torch_dtype={"unet": torch.float16, "default": torch.bfloat16}, scheduler=scheduler, safety_checker=None)
    pipe = mora.diffusers.from_pretrained(path, socket=daemon.socket, **args)
    ref = diffusers.DiffusionPipeline.from_pretrained(path, **args)
    assert pipe.scheduler is scheduler and pipe.safety_checker is None
    for comp in ("text_encoder", "unet", "vae"):
        got = {k: t.dtype for k, t in getattr(pipe, comp).state_dict().items()}
        want = {k: t.dtype for k, t in getattr(ref, comp).state_dict().items()}
        assert got == want, comp
        buffers = {k: t.dtype for k, t in getattr(ref, comp).named_buffers()}
        assert {k: t.dtype for k, t in getattr(pipe, comp).named_buffers()} == buffers, comp
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.bfloat16


def test_one_model_by_subfolder_is_its_class_from_pretrained(daemon):
    path = PIPELINES / "sd15"
    unet = mora.diffusers.from_pretrained(path, subfolder="unet", socket=daemon.socket)
    ref = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    assert type(unet) is diffusers.UNet2DConditionModel and not unet.training
    assert unet.config == ref.config
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(unet(sample, 500, encoder_hidden_states=context).sample, ref(sample, 500, encoder_hidden_states=context).sample)
    text = mora.diffusers.from_pretrained(path, subfolder="text_encoder", socket=daemon.socket)
    assert type(text).__name__ == "CLIPTextModel" and text.dtype == torch.float32


def leased(client, path):
    return {m["name"] for m in client.ps() if m["leases"] and m["name"].startswith(str(path))}


def test_a_borrowed_model_keeps_its_lease_until_collected(daemon):
    path = PIPELINES / "sd15"
    unet = mora.diffusers.from_pretrained(path, subfolder="unet", socket=daemon.socket, torch_dtype=torch.float16)
    entry = str(path / "unet")
    gc.collect()
    with mora.connect(daemon.socket) as client:
        with pytest.raises(mora.DaemonError) as e:
            client.evict(entry, dtype="f16")
        assert e.value.kind == "refused"
        del unet
        gc.collect()
        # Ended by the time the last tensor is collected: no wait for the daemon.
        assert entry not in leased(client, path)
        assert client.evict(entry, dtype="f16").models


def test_a_pipeline_holds_its_leases_until_collected_or_released(daemon):
    path = PIPELINES / "sd15"
    pipe = mora.diffusers.from_pretrained(path, socket=daemon.socket)
    comps = {str(path / c) for c in WEIGHTED if getattr(pipe, c, None) is not None}
    with mora.connect(daemon.socket) as client:
        assert leased(client, path) == comps
        with pytest.raises(mora.DaemonError, match="leased by pid"):
            client.evict(str(path / "unet"), dtype="f32")
        assert mora.release(pipe) is True
        assert leased(client, path) == set()
        assert pipe.unet.conv_in.weight.is_meta
        with pytest.raises(mora.Released, match="weights were given back with mora.release"):
            image(pipe)
        assert client.evict(str(path / "unet"), dtype="f32").models
        # A pipeline dropped unreleased gives its leases back when collected.
        pipe = mora.diffusers.from_pretrained(path, socket=daemon.socket)
        assert leased(client, path) == comps
        del pipe
        gc.collect()
        assert leased(client, path) == set()


def test_a_pipeline_root_without_model_index_names_its_models(daemon, tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(mora.ModelNotFound) as e:
        mora.diffusers.from_pretrained(tmp_path, socket=daemon.socket)
    assert "no model_index.json" in str(e.value) and "subfolder= (unet)" in str(e.value), str(e.value)
    with pytest.raises(mora.ModelNotFound) as e:
        mora.diffusers.from_pretrained(tmp_path / "missing", socket=daemon.socket)
    assert "no such directory" in str(e.value) and "\n" not in str(e.value), str(e.value)


LORAS = PIPELINES.parent.parent / "lora"


@pytest.mark.parametrize("adapter, weight_name", [("sd15-diffusers", None), ("sd15-kohya", "lora.safetensors")])
def test_a_lora_loads_over_a_borrowed_pipeline_as_over_diffusers_own(daemon, adapter, weight_name):
    """diffusers' `load_lora_weights` on a pipeline borrowed from the daemon
    gives the images it gives on diffusers' own pipeline (PEFT wraps the
    layers: the base stays the daemon's pages); `fuse_lora` writes into the
    weights, which copies the touched pages into this process alone."""
    pytest.importorskip("peft", reason="peft is not installed (diffusers needs it for LoRAs)")
    path, lora = PIPELINES / "sd15", LORAS / adapter
    kw = {"weight_name": weight_name} if weight_name else {}
    ref = aligned(diffusers.DiffusionPipeline.from_pretrained(path))
    plain = image(ref)
    ref.load_lora_weights(lora, **kw)
    pipe = mora.diffusers.from_pretrained(path, socket=daemon.socket)
    pipe.load_lora_weights(lora, **kw)
    with_lora = image(pipe)
    assert (with_lora == image(ref)).all()
    assert not (with_lora == plain).all(), "the adapter changed nothing"
    # Fused into the borrowed weights: this process's copy-on-write pages.
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ref.fuse_lora()
    ref.unload_lora_weights()
    assert (image(pipe) == image(ref)).all()
    # The daemon's copy is untouched: a fresh borrowed pipeline is the base.
    again = mora.diffusers.from_pretrained(path, socket=daemon.socket)
    assert (image(again) == plain).all()


def test_a_kohya_lora_lent_by_the_daemon_loads_as_from_its_file(daemon):
    """The adapter's tensors borrowed from the daemon (its file is a cache
    entry of its own) load into diffusers as the file does."""
    pytest.importorskip("peft", reason="peft is not installed (diffusers needs it for LoRAs)")
    path, lora = PIPELINES / "sd15", LORAS / "sd15-kohya" / "lora.safetensors"
    ref = aligned(diffusers.DiffusionPipeline.from_pretrained(path))
    ref.load_lora_weights(lora.parent, weight_name=lora.name)
    pipe = mora.diffusers.from_pretrained(path, socket=daemon.socket)
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(str(lora), dtype="f32")
        pipe.load_lora_weights(dict(sd))
        assert str(lora) in {m["name"] for m in client.ps()}
    assert (image(pipe) == image(ref)).all()
